"""Print the codec benchmark table (medians, ratios, targets) from a pytest-benchmark JSON file.

    python benchmarks/table.py .benchmarks/codec.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

ORDER = ["raw1080", "raw4k", "jpeg", "lidar", "lidar262k", "1k"]
COLS = ["ext.encode", "ext.encode_parts", "ext.decode", "py.encode", "py.encode_parts", "py.decode",
        "floor.memcpy", "pickle5_inband.encode", "pickle5_inband.decode", "pickle5_oob.encode",
        "pickle5_oob.decode", "msight.encode", "msight.decode", "fragment_joined", "fragment_parts"]


def fmt(us: float) -> str:
    return f"{us:,.1f}" if us >= 10 else f"{us:.2f}"


def main(path: str) -> int:
    data = json.load(open(path))
    med = defaultdict(dict)
    extra = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        med[info["payload"]][info["contender"]] = b["stats"]["median"] * 1e6
        extra[info["payload"]][info["contender"]] = info
    names = [n for n in ORDER if n in med]
    cols = [c for c in COLS if any(c in med[n] for n in names)]
    print(f"Medians in µs ({data.get('machine_info', {}).get('cpu', {}).get('brand_raw', 'cpu?')}, "
          f"{data['datetime'][:19]})\n")
    print("| contender | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for c in cols:
        print(f"| {c} | " + " | ".join(fmt(med[n][c]) if c in med[n] else "" for n in names) + " |")
    print("\nRatios and targets\n")
    print("| payload | decode µs (≤1.5) | decode / pickle5-oob decode (≤0.5) | encode_parts µs (≤2) | "
          "encode / memcpy floor (≤1.1 for raw1080, raw4k, lidar262k) | vs MSight encode | vs MSight decode |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fails = []
    for n in names:
        m = med[n]
        if "ext.decode" not in m:
            continue
        d, p, e = m["ext.decode"], m["pickle5_oob.decode"], m["ext.encode_parts"]
        f = m["ext.encode"] / m["floor.memcpy"]
        ok_f = n not in ("raw1080", "raw4k", "lidar262k") or f <= 1.1
        for cond, what in ((d <= 1.5, f"{n} decode {d:.2f} µs"), (d / p <= 0.5, f"{n} decode/pickle {d / p:.2f}"),
                           (e <= 2.0, f"{n} encode_parts {e:.2f} µs"), (ok_f, f"{n} encode/floor {f:.2f}")):
            if not cond:
                fails.append(what)
        print(f"| {n} | {d:.2f} | {d / p:.2f} | {e:.2f} | {f:.2f} | "
              f"{m['msight.encode'] / m['ext.encode']:.1f}x faster | {m['msight.decode'] / d:.0f}x faster |")
    hdr = extra.get("raw1080", {}).get("ext.encode_parts", {}).get("header_bytes")
    if hdr is not None:
        print(f"\nHeader of a 1080p image frame with sensor and device names set: {hdr} bytes (target ≤ 256)")
        if hdr > 256:
            fails.append(f"header {hdr} bytes")
    print("\nTargets missed: " + (", ".join(fails) if fails else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/codec.json"))
