#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it into a fresh virtual environment, run it there.
#
# Cheap by design: installing the ~1.6 GB of dependencies a second time took 9m43s on this project's 2-core machine
# (under load), so the fresh venv borrows the dependencies of the already-built, already-tested $VENV through a .pth
# path line, and only the wheel itself installs into it (--no-deps).
# Proves: the wheel builds from pyproject.toml alone (isolated PEP 517 build, outside the work tree); it holds every
# module, the presets and any report templates; the console script and `import oloraplus` run from the installed copy,
# not from src/; the presets load from it; every requirement in the wheel's metadata is satisfied, name and version
# range, by the environment the tests passed in.
# Does not prove: that pip resolves those requirements from scratch (the Makefile's env build does that for
# `-e .[test]`, and `pip install --dry-run --ignore-installed -c constraints.txt WHEEL` does it for the wheel), nor
# that no import relies on an undeclared package: tests/test_packaging.py checks that from the source.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PY:-python3}
start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build from a copy: an in-tree setuptools build leaves build/ and *.egg-info behind
mkdir "$work/src" && cp -r pyproject.toml README.md "$work/src/" && cp -r src "$work/src/src"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/pip" wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/oloraplus-*.whl)

# every module and data file of the package is in the wheel
"$VENV/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = Path("src")
wanted = [p for p in (src / "oloraplus").rglob("*") if p.is_file() and "__pycache__" not in p.parts
          and (p.suffix == ".py" or p.parent.name == "presets" or p.parent.as_posix().endswith("report/templates"))]
missing = sorted(p.relative_to(src).as_posix() for p in wanted if p.relative_to(src).as_posix() not in names)
assert not missing, f"not in the wheel: {missing}"
presets = [n for n in names if n.startswith("oloraplus/presets/")]
assert presets, "no presets in the wheel"
print(f"wheel: {Path(sys.argv[1]).name}, {len(names)} files, presets: {', '.join(sorted(Path(n).stem for n in presets))}")
EOF

"$PY" -m venv "$work/venv"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
built=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# a path line goes on sys.path after the venv's own site-packages; the built env's .pth files (its editable
# install of oloraplus) are not run, so `oloraplus` can only come from the wheel
echo "$(cd "$built" && pwd)" > "$site/zz_tested_dependencies.pth"
"$work/venv/bin/pip" install -q --no-deps "$wheel"

cd "$work"  # away from the repo: nothing may come from src/
venv/bin/oloraplus --help >/dev/null
venv/bin/oloraplus train --help | grep -q -- "--report_to"
venv/bin/python - "$site" <<'EOF'
import sys
from importlib.metadata import distribution, version
from packaging.requirements import Requirement

import oloraplus
from oloraplus.cli import PRESETS, load_preset

assert oloraplus.__file__.startswith(sys.argv[1]), f"oloraplus imported from {oloraplus.__file__}, not the wheel"
for name in PRESETS:
    assert load_preset(name), name
unmet = []
for line in distribution("oloraplus").requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (test) or another platform
    try:
        have = version(req.name)
    except Exception:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (have {have})")
assert not unmet, f"requirements not met: {unmet}"
print(f"installed wheel: oloraplus --help runs, {len(PRESETS)} presets load, every requirement met")
EOF
echo "wheel check passed in $((SECONDS - start))s"
