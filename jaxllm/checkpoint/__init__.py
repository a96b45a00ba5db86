"""Checkpoints: the directory format (`format`), array digests (`digests`), writing (`save`) and reading
(`restore`) parameters, failures reported in one line (`failures`), the files that travel with a model
(`companions`), and a training run's items (`training`).

The public names of `format`, `failures`, `save` and `restore` are importable from here, loaded on first use,
so that `jaxllm.checkpoint.companions` (which the tokenizer needs) does not pull in orbax and JAX.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MODEL_JSON": "format",
    "RECORD_JSON": "format",
    "KINDS": "format",
    "CheckpointError": "format",
    "DamagedCheckpoint": "format",
    "write_model_config": "format",
    "read_model_config": "format",
    "resolve": "format",
    "find_tokenizer": "format",
    "is_checkpoint": "format",
    "manager": "format",
    "step_finished": "format",
    "params_kind": "format",
    "step_record": "format",
    "write_record": "format",
    "stored_kind": "format",
    "require_kind": "format",
    "verify_digests": "format",
    "one_line": "failures",
    "describe_failure": "failures",
    "is_storage_failure": "failures",
    "quiet_failed_reads": "failures",
    "quiet_failed_saves": "failures",
    "StreamedArray": "save",
    "trim_host_memory": "save",
    "is_stacked": "save",
    "save_params": "save",
    "StoredArray": "restore",
    "open_arrays": "restore",
    "abstract_params": "restore",
    "load_params": "restore",
    "latest_step": "restore",
    "restore_params": "restore",
    "to_numpy": "restore",
    "restore_tree": "restore",
    "restore_leaves": "restore",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxllm.checkpoint.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxllm.checkpoint' has no attribute '{name}'")
