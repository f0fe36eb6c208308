#!/usr/bin/env bash
# Build the compiled core with -fsanitize=address,undefined into a scratch copy of the source and
# run the hostile-input and fuzz tests against it. Python itself is not instrumented, so the ASan
# runtime is preloaded; leak detection is off because CPython's own allocations would drown it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# a clean copy, so no in-place build of the normal extension shadows the sanitized one
cp -r "$here/msight_fast" "$here/tests" "$here/setup.py" "$here/pyproject.toml" "$here/README.md" "$work/"
find "$work/msight_fast" \( -name '*.so' -o -name '*.c' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cd "$work"
"$py" -m pip install -q "cython>=3.0.10" "numpy>=2.0" setuptools
MSIGHT_FAST_SANITIZE=address,undefined MSIGHT_FAST_DEBUG=1 "$py" setup.py -q build_ext --inplace >build.log 2>&1 \
  || { cat build.log; exit 1; }
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export MSIGHT_DATA_DIR="${MSIGHT_DATA_DIR:-$here/../shared/data}"
"$py" -c "import msight_fast._ext._wire as w, sys; print('sanitized core:', w.__file__)"
"$py" -m pytest -q -p no:cacheprovider tests/unit/test_hostile.py tests/unit/test_fragment.py \
  tests/unit/test_golden.py tests/unit/test_codec.py -k "not frame_ids_unique" "$@"
