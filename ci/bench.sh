#!/usr/bin/env bash
# Benchmarks, installed from the source tree into their own venv:
#   bash ci/bench.sh codec       codec table (pytest-benchmark JSON -> benchmarks/table.py)
#   bash ci/bench.sh transport   publisher -> broker -> subscriber, all backends and payloads
# Medians on a shared 2-core machine move between runs: compare ratios within one run.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
what="${1:-codec}"
py="${PYTHON:-python3}"
venv="${MSIGHT_BENCH_VENV:-$here/.venv-bench}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install -q --upgrade pip setuptools
"$vpy" -m pip install -q "$here[bench]"
# MSIGHT_DATA_DIR, when set, names other sample data; unset, the sample packaged in msight_fast/sample/ is used
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$here/benchmarks" "$work/"
cd "$work"
case "$what" in
  codec)
    mkdir -p "$here/benchmarks/results"
    "$vpy" -m pytest -q -p no:cacheprovider benchmarks/test_codec_bench.py --benchmark-max-time=1.0 \
      --benchmark-min-rounds=20 --benchmark-json="$here/benchmarks/results/codec.json" >/dev/null
    # keep the statistics, drop the raw timings (tens of MB)
    "$vpy" -c "import json,sys; p=sys.argv[1]; d=json.load(open(p)); [b['stats'].pop('data', None) for b in d['benchmarks']]; json.dump(d, open(p, 'w'), indent=1)" \
      "$here/benchmarks/results/codec.json"
    "$vpy" "$here/benchmarks/table.py" "$here/benchmarks/results/codec.json" | tee "$here/benchmarks/results/codec.md"
    ;;
  transport)
    "$vpy" benchmarks/transport.py --out "$here/benchmarks/results" "${@:2}"
    ;;
  *) echo "usage: bash ci/bench.sh codec|transport" >&2; exit 2 ;;
esac
