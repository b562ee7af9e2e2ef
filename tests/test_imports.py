"""The package's modules import one another one way: no cycle, not even through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import oloraplus

PACKAGE = Path(oloraplus.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if name else []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("oloraplus").lstrip(".")
                    for a in node.names
                    if a.name.split(".")[0] == "oloraplus"
                ]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1
                    base = here if is_pkg else here[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "oloraplus":
                    mod = node.module.removeprefix("oloraplus").lstrip(".")
                else:
                    continue
                # `from oloraplus import train` names a module; `from oloraplus.x import f` names x
                targets = [
                    f"{mod}.{a.name}".lstrip(".") if f"{mod}.{a.name}".lstrip(".") in files else mod for a in node.names
                ]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_run_pipeline_imports_downwards():
    graph = import_graph()
    assert "train" not in graph["evaluate"] and "evaluate" in graph["train"]  # train evaluates what it trained
    assert "evaluate" not in graph["stats"] and "train" not in graph["stats"]
