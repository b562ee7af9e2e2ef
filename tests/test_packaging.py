"""What a wheel needs besides its files: every third-party package the source imports is a declared dependency.

scripts/check_wheel.sh installs the wheel over the tested environment instead of resolving its dependencies again
(minutes on 2 cores), so an import that works only because that environment happens to hold the package (through
another package's requirements, or the test extras) would pass there; this test catches it from the source.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from conftest import REPO

SRC = REPO / "src" / "oloraplus"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "oloraplus" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(SRC).as_posix())
    return found


def test_every_third_party_import_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_normalized(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    module_to_dists = packages_distributions()
    undeclared = {}
    for module, files in _imported_top_level_modules().items():
        dists = {_normalized(d) for d in module_to_dists.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
