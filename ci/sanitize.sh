#!/usr/bin/env bash
# Build the compiled core with -fsanitize=address,undefined into a scratch copy of the source and
# run the hostile-input and fuzz tests against it. Python itself is not instrumented, so the ASan
# runtime is preloaded; leak detection is off because CPython's own allocations would drown it.
#
# ci/fuzz.sh sources this file for msf_sanitized_build and msf_sanitizer_env only (one build
# recipe for both), so nothing below the function definitions runs when it is sourced.
set -euo pipefail

# msf_sanitized_build SRC WORK: copy SRC's package, tests and build files into WORK and build the
# instrumented core in place there (a clean copy: no normal build of the extension shadows it).
msf_sanitized_build() {
  local src="$1" dst="$2" py="${PYTHON:-python3}"
  cp -r "$src/msight_fast" "$src/tests" "$src/setup.py" "$src/pyproject.toml" "$src/README.md" "$dst/"
  find "$dst/msight_fast" \( -name '*.so' -o -name '*.c' -o -name '__pycache__' \) -prune -exec rm -rf {} +
  "$py" -m pip install -q "cython>=3.0.10" "numpy>=2.0" "setuptools>=77"    # pyproject.toml build-system.requires
  (cd "$dst" && MSIGHT_FAST_SANITIZE=address,undefined MSIGHT_FAST_DEBUG=1 "$py" setup.py -q build_ext --inplace \
     >build.log 2>&1) || { cat "$dst/build.log"; return 1; }
}

# msf_sanitizer_env: export what a process needs to run the instrumented core (call it last:
# every later command of the shell runs with the sanitizer runtime preloaded).
msf_sanitizer_env() {
  local asan ubsan
  asan="$(gcc -print-file-name=libasan.so)"
  ubsan="$(gcc -print-file-name=libubsan.so)"
  export LD_PRELOAD="$asan:$ubsan"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
}

[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
msf_sanitized_build "$here" "$work"
cd "$work"
msf_sanitizer_env
# MSIGHT_DATA_DIR, when set, names other sample data; unset, the sample packaged in msight_fast/sample/ is used
"$py" -c "import msight_fast._ext._wire as w, sys; print('sanitized core:', w.__file__)"
MSIGHT_FUZZ_CASES=100000 \
"$py" -m pytest -q -p no:cacheprovider tests/unit/test_hostile.py tests/unit/test_fragment.py \
  tests/unit/test_golden.py tests/unit/test_codec.py tests/unit/test_hostile_regressions.py \
  tests/unit/test_differential.py tests/unit/test_mutation_corpus.py \
  tests/unit/test_subscription_hostile.py tests/unit/test_frame_release.py tests/unit/test_shm.py \
  tests/unit/test_batch.py tests/unit/test_batch_shared.py tests/unit/test_stats.py \
  tests/unit/test_small_frames.py tests/unit/test_small_lane.py tests/unit/test_recv_lane.py -k "not frame_ids_unique" "$@"
