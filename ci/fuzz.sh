#!/usr/bin/env bash
# Differential fuzzing of the two codecs (ci/fuzz.py, engine in tests/fuzzing.py):
#
#   bash ci/fuzz.sh 1000000 [--sanitize] [--seed S] [--impl both|cython|python] [--out DIR]
#
# Runs against the installed package (PYTHON, default python3, must have it). With --sanitize the
# compiled core is first built with ASan + UBSan into a scratch copy, exactly as ci/sanitize.sh
# does (same function), and the run has the sanitizer runtime preloaded: then "no crash" means no
# sanitizer report either. Prints "crashes: 0" only when the run completed. Exit status: 0 clean;
# 3 escapes or disagreements (listed, inputs saved under --out); anything else a crash or error.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
usage() { echo "usage: bash ci/fuzz.sh N [--sanitize] [--seed S] [--impl both|cython|python] [--out DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [[ "$1" =~ ^[0-9]+$ ]] || usage
n="$1"; shift
sanitize=0; out=""; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --out) [ $# -ge 2 ] || usage; out="$2"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ -n "$out" ] || out="$(mktemp -d "${TMPDIR:-/tmp}/msight-fuzz.XXXXXX")"
mkdir -p "$out"
log="$out/fuzz.log"

run=("$py" "$here/ci/fuzz.py" "$n" --out "$out" ${args[@]+"${args[@]}"})
if [ "$sanitize" = 1 ]; then
  # shellcheck source=ci/sanitize.sh
  source "$here/ci/sanitize.sh"              # defines msf_sanitized_build and msf_sanitizer_env only
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "building the compiled core with ASan + UBSan in $work"
  msf_sanitized_build "$here" "$work"
  run+=(--core-dir "$work")
  set +e
  # the instrumented copy comes first on the path; the sanitizer runtime only for this process
  (cd "$work" && msf_sanitizer_env && export UBSAN_OPTIONS="$UBSAN_OPTIONS:abort_on_error=1" \
     && PYTHONPATH="$work" exec "${run[@]}") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
else
  set +e
  "${run[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
fi

report=0
grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|Fatal Python error' "$log" && report=1
if [ "$report" = 0 ] && { [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ]; }; then
  echo "crashes: 0"
  exit "$rc"
fi
if [ "$report" = 1 ] || [ "$rc" -ge 128 ]; then
  echo "CRASH (exit status $rc; the report is in $log)"
  [ -s "$out/last-input.bin" ] && echo "the input being decoded: $out/last-input.bin (replay: $py $here/ci/fuzz.py --replay $out/last-input.bin)"
else
  echo "the run did not complete (exit status $rc; see $log)"
fi
exit $(( rc == 0 || rc == 3 ? 1 : rc ))
