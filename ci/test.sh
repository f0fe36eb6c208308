#!/usr/bin/env bash
# The one test command: builds the wheel, installs it into a virtual environment (.venv-ci, made
# once and reused; .ci/run makes a fresh one; not editable), and runs every suite against the installed package from a copy of tests/ outside
# the source tree, so nothing can import the source checkout by accident.
#
#   bash ci/test.sh            everything (unit x2, manylinux wheel, sanitizer, integration, sdist, bench smoke)
#   bash ci/test.sh unit       only the unit suites
# Environment: PYTHON (default python3), MSIGHT_TEST_* to use external brokers (see tests/README.md).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
what="${1:-all}"
py="${PYTHON:-python3}"
venv="${MSIGHT_CI_VENV:-$here/.venv-ci}"
# MSIGHT_DATA_DIR, when set, names other sample data; unset, the sample packaged in msight_fast/sample/ is used
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { printf '\n=== %s (%(%H:%M:%S)T)\n' "$*" -1; }

step "virtual environment at $venv"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install -q --upgrade pip setuptools wheel build

step "build the wheel from the source tree"
dist="$(mktemp -d)"
work="$(mktemp -d)"
trap 'rm -rf "$dist" "$work"' EXIT
"$vpy" -m pip wheel -q --no-deps -w "$dist" "$here"
whl="$(ls "$dist"/msight_fast-*.whl)"
echo "built $(basename "$whl")"
# list once into a variable: with pipefail, 'unzip | grep -q' fails when grep exits early (SIGPIPE)
listing="$(unzip -l "$whl")"
if grep -qE '_wire\.c$|\.pyx$' <<<"$listing"; then echo "wheel carries generated C or .pyx" >&2; exit 1; fi
grep -qE 'py\.typed' <<<"$listing" || { echo "wheel lacks py.typed" >&2; exit 1; }
grep -qE '_wire\.pyi' <<<"$listing" || { echo "wheel lacks the _wire.pyi stub" >&2; exit 1; }

step "install the wheel with the test extra"
"$vpy" -m pip install -q --force-reinstall --no-deps "$whl"
"$vpy" -m pip install -q "$whl[test]"

step "static checks: mypy --strict and ruff on the source tree (versions pinned by the lint extra)"
if "$vpy" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  "$vpy" -m pip install -q "$whl[lint]"
  (cd "$here" && "$vpy" -m mypy --strict msight_fast tests/typing && "$vpy" -m ruff check .)
else
  echo "skipped: the pinned mypy needs Python 3.10 or newer (this is $("$vpy" -V))"
fi

cp -r "$here/tests" "$here/pyproject.toml" "$work/"
cd "$work"
"$vpy" -c "import msight_fast, sys; assert 'site-packages' in msight_fast.__file__, msight_fast.__file__; \
print('testing', msight_fast.__file__, 'extension:', msight_fast.HAS_EXTENSIONS)"

run_pytest() { "$vpy" -m pytest -p no:cacheprovider "$@"; }

step "unit tests, compiled core"
run_pytest tests/unit -q
step "unit tests, pure-Python twin (MSIGHT_FAST_NO_EXTENSIONS=1)"
MSIGHT_FAST_NO_EXTENSIONS=1 run_pytest tests/unit -q
[ "$what" = unit ] && exit 0

step "manylinux wheel: auditwheel repair, unit tests against it in a fresh venv (ci/wheel.sh)"
if [ "$(uname -s)" = Linux ]; then
  PYTHON="$py" bash "$here/ci/wheel.sh"
else
  echo "skipped: manylinux wheels are built and repaired on Linux only"
fi

step "hostile-input tests under AddressSanitizer + UBSan"
PYTHON="$vpy" bash "$here/ci/sanitize.sh"

if [ -d tests/integration ] && ls tests/integration/test_*.py >/dev/null 2>&1; then
  step "integration tests against real brokers"
  run_pytest tests/integration -q
fi
if [ -d tests/cli ] && ls tests/cli/test_*.py >/dev/null 2>&1; then
  step "command-line tests (the installed console script)"
  PATH="$venv/bin:$PATH" MSIGHT_CLI_REQUIRED=1 run_pytest tests/cli -q
fi

step "the sdist builds a working wheel"
"$vpy" -m build -q --sdist -o "$dist" "$here" >/dev/null
sdist="$(ls "$dist"/msight_fast-*.tar.gz)"
sdist_listing="$(tar tzf "$sdist")"
if grep -qE '_wire\.c$' <<<"$sdist_listing"; then echo "sdist carries generated C" >&2; exit 1; fi
grep -qE '_wire\.pyx$' <<<"$sdist_listing" || { echo "sdist lacks the .pyx source" >&2; exit 1; }
"$vpy" -m pip wheel -q --no-deps -w "$dist/from-sdist" "$sdist"
svenv="$work/sdist-venv"
"$py" -m venv "$svenv"
"$svenv/bin/python" -m pip install -q "$dist"/from-sdist/msight_fast-*.whl
(cd / && "$svenv/bin/python" -c "import msight_fast as m, numpy as np; assert m.HAS_EXTENSIONS; \
f = m.decode(m.encode(m.Frame.from_array(np.ones((4, 4, 3), np.uint8), sensor_name='s'))); \
assert f.array.sum() == 48; print('wheel built from the sdist works')")

step "benchmark smoke run (each benchmark once, no timing)"
"$vpy" -m pip install -q "$whl[bench]"
cp -r "$here/benchmarks" "$work/"
run_pytest benchmarks -q --benchmark-disable -x
step "all passed"
