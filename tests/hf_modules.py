"""A private transformers module cache for a fixture's `trust_remote_code` loads.

transformers imports remote code as `transformers_modules.<dir name>` from the first HF_MODULES_CACHE it
put on sys.path; a later fixture's cache, patched in the same process, would write its modules where the
already imported `transformers_modules` package never looks (ModuleNotFoundError, by test order). So the
package is forgotten and the new cache comes first on sys.path, both undone with the patch."""
import sys


def private_module_cache(patch, cache) -> None:
    import transformers.dynamic_module_utils as dynamic

    for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
        patch.delitem(sys.modules, name)
    patch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    patch.setattr(sys, "path", [str(cache), *sys.path])
