"""The package's layers: spec and compile -> kernels -> the core -> backends -> framework
layers, with no arrow pointing up and no cycle among module-level imports.

Read from the source (``ast``), so that an import added anywhere is seen, including one
inside a function (a lazy import may point down or sideways, never up).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import lstm_multi

PACKAGE = pathlib.Path(lstm_multi.__file__).parent

#: what each group of modules may import from lstm_multi (beyond its own group)
ALLOWED = {
    "environment": set(),
    "compile": set(),
    "kernels": {"compile", "environment"},
    "core": {"compile", "kernels", "environment", "core"},
    "backends": {"compile", "kernels", "environment", "core"},
    "layers": {"compile", "kernels", "environment", "core", "backends"},
    "tools": {"compile", "kernels", "environment", "core", "backends", "layers"},
}
#: the framework layers (lstm_multi.torch, the Flax, Equinox and Keras layers, ONNX export) and
#: the tools above everything (check_variant, the benchmark, the package's own __init__)
LAYERS = {"torch", "flax", "equinox", "keras", "onnx"}
TOOLS = {"testing", "bench", "__init__"}


def group(module: str) -> str:
    """The group of ``lstm_multi.<name>...``."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    if name in ("compile", "kernels", "backends", "environment"):
        return name
    if name in LAYERS:
        return "layers"
    if name in TOOLS:
        return "tools"
    return "core"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, top_level_only: bool):
    """The lstm_multi modules ``path`` imports (relative imports resolved)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lstm_multi"):
                continue
            for alias in node.names:  # ``from . import spec`` imports lstm_multi.spec
                candidate = f"{target}.{alias.name}"
                known = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py")
                yield candidate if known.exists() or known.with_suffix("").is_dir() else target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("lstm_multi"))


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_import_points_up(path):
    mine = group(module_name(path))
    for target in imports(path, top_level_only=False):
        theirs = group(target)
        assert theirs == mine or theirs in ALLOWED[mine], (
            f"{module_name(path)} ({mine}) imports {target} ({theirs})"
        )


def test_no_cycle_among_module_level_imports():
    graph = {module_name(p): set(imports(p, top_level_only=True)) for p in SOURCES}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done" or node not in graph:
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join([*trail, node])}"
        state[node] = "open"
        for target in graph[node]:
            if target != node and not node.startswith(target + "."):  # a package's own parts
                visit(target, [*trail, node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The power of the check: a spec that imported a backend would fail it."""
    fake = tmp_path / "lstm_multi"
    (fake / "backends").mkdir(parents=True)
    (fake / "spec.py").write_text("from .backends import torch_ops\n")
    (fake / "backends" / "torch_ops.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"lstm_multi.spec \(core\) imports"):
        test_no_import_points_up(fake / "spec.py")
