"""The package's shape: the engine (the package root, planning/, kernels/) imports nothing from
tools/, testing/ or integrations/, and no module imports another that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import gemma4_flexring

PACKAGE = Path(gemma4_flexring.__file__).parent
ROOMS_ABOVE_THE_ENGINE = ("tools", "testing", "integrations")
# The public names users import, kept where modules moved: each is the moved module itself.
FACES = {"gemma4_flexring.hf", "gemma4_flexring.simulated", "gemma4_flexring.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file, lazily or not)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # ``from . import x`` names a module
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "engine"


def test_the_engine_imports_no_tool_test_aid_or_integration():
    graph = import_graph()
    engine = [m for m in graph if _room(m) not in ROOMS_ABOVE_THE_ENGINE and m not in FACES]
    assert "gemma4_flexring.ops" in engine and "gemma4_flexring.planning.plan" in engine
    upward = [(m, t) for m in engine for t in graph[m] if _room(t) in ROOMS_ABOVE_THE_ENGINE or t in FACES]
    assert not upward, upward


def test_no_import_cycles():
    """The package's ``__init__`` only gathers public names; below it, imports form no cycle."""
    graph = {m: {t for t in ts if t != "gemma4_flexring"} for m, ts in import_graph().items() if m != "gemma4_flexring"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
