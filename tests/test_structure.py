"""The package's shape: no import circles (function-local imports included), a short list of root modules,
no file past 450 lines, no private names imported across modules, and arrows that point down."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxllm"
ROOT_MODULES = {"__init__.py", "cli.py", "config.py", "sharding.py", "distributed.py", "storage.py", "xla_flags.py"}
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules) -> str | None:
    """The jaxllm module an import names (a name imported from a package that is a submodule counts as it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, list[tuple[int, list[str]]]]]:
    """module → {imported module: [(line, names imported)]}, every import at any depth."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        edges = graph.setdefault(mod, {})
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, []) if sub in modules else (base, [alias.name]))
            for target, names in targets:
                if not target.startswith("jaxllm"):
                    continue
                resolved = _resolve(target, modules)
                if resolved and resolved != mod:
                    edges.setdefault(resolved, []).append((node.lineno, names))
        for target in _lazy_exports(path):  # a package that loads its names on first use still imports them
            edges.setdefault(target, []).append((0, []))
    return graph


def _lazy_exports(path: pathlib.Path) -> set[str]:
    """The modules an `__init__.py`'s `_EXPORTS = {name: module}` table names (see jaxllm/train/__init__.py)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            package = _module_name(path)
            return {v.value if v.value.startswith("jaxllm") else f"{package}.{v.value}"
                    for v in node.value.values if isinstance(v, ast.Constant)}
    return set()


def find_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    graph = import_graph()
    # lora/files.py imports the models inside functions only: that arrow must be seen.
    assert "jaxllm.models" in graph["jaxllm.lora.files"]
    assert "jaxllm.checkpoint.restore" in graph["jaxllm.checkpoint"]  # named in its lazy _EXPORTS table
    ring = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert find_cycles(ring) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_package_root_holds_only_the_shared_modules():
    extra = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
    assert not extra, f"modules at the package root that belong in a package: {extra}"


def test_no_file_over_the_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_private_names_across_modules():
    bad = [f"{mod} imports {name} from {target} (line {line})"
           for mod, edges in import_graph().items() for target, uses in edges.items()
           for line, names in uses for name in names if name.startswith("_")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("low, high", [("jaxllm.models", "jaxllm.train"), ("jaxllm.models", "jaxllm.stages"),
                                       ("jaxllm.models", "jaxllm.rlhf"), ("jaxllm.checkpoint", "jaxllm.train"),
                                       ("jaxllm.storage", "jaxllm.train"), ("jaxllm.config", "jaxllm.models")])
def test_arrows_point_down(low, high):
    up = sorted(f"{mod} → {target}" for mod, edges in import_graph().items() if mod.startswith(low)
                for target in edges if target.startswith(high))
    assert not up, f"{low} must not import {high}: {up}"


def test_nothing_imports_a_cli_module_but_the_command_table():
    bad = sorted(f"{mod} → {target}" for mod, edges in import_graph().items() for target in edges
                 if target.endswith(".cli") and mod != "jaxllm.cli" and not mod.endswith(".cli"))
    assert not bad, bad


def test_orbax_is_imported_only_by_the_checkpoint_package():
    """Every writer goes through `jaxllm.checkpoint` (the format, digests, verified restore); orbax's API is
    imported nowhere else, function-local imports included."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "checkpoint":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names
                          if n == "orbax" or n.startswith("orbax.")]
    assert offenders == []
