"""The package's layers import only downward, and no module imports itself through others (a static check
over every import statement, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmms_adaptive

PACKAGE = Path(lmms_adaptive.__file__).parent
# Lowest first. A module may import its own layer and the layers before it.
LAYERS = ("core", "controllers", "serving", "integration", "tools", "default")
TOP_LEVEL = {"lmms_adaptive": "core", "lmms_adaptive.train": "tools"}  # the package and its `-m` alias


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    layer = module.split(".")[1]
    assert layer in LAYERS, f"{module} is in no layer: put it under one of {', '.join(LAYERS)}"
    return layer


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports (`from pkg import submodule` counts as that submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; import lmms_adaptive.<layer>.<module>"
            base = node.module or ""
            if base.split(".")[0] == "lmms_adaptive":
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lmms_adaptive"}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_every_import_points_down_the_layers() -> None:
    wrong = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
