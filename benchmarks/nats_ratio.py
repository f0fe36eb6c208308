"""NATS 1080p delivered rate against bare nats-py, with its spread over runs:

    python benchmarks/nats_ratio.py [--runs 3] [--seconds 4]

Each run measures, one after another (publisher process, subscriber in this process, a fresh
nats-server each, as ``benchmarks/transport.py`` does):

- ``raw``: bare nats-py, one 6 MB message per frame, the server's ``max_payload`` raised;
- ``msight, default server``: msight_fast through the default 1 MB ``max_payload``, so each
  frame goes as 7 fragments (the transport table's cell);
- ``msight, same server as raw``: msight_fast through the same raised server as raw, so each
  frame goes as one message: like for like with raw.

Prints each run's delivered frames/s and CPU, then the median ratio to raw and its range.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Dict, List

from msight_fast.bench import run_transport, start_broker


def _one(name: str, seconds: float) -> Dict[str, Any]:
    if name == "msight, same server as raw":
        b = start_broker("nats", raw=True)
        try:
            return run_transport("nats", "1080p", seconds, "msight", broker=b)
        finally:
            b.stop()
    return run_transport("nats", "1080p", seconds, "raw" if name == "raw" else "msight")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    names = ("raw", "msight, default server", "msight, same server as raw")
    fps: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(a.runs):
        for name in names:
            res = _one(name, a.seconds)
            fps[name].append(res["fps"])
            n = max(res["received"], 1)
            cpu = " / ".join("-" if res.get(k) is None else f"{res[k] / n * 1e3:.1f}"
                             for k in ("pub_cpu_s", "sub_cpu_s", "broker_cpu_s"))
            print(f"run {r + 1} {name:28s} {res['fps']:7.1f} frames/s  lost {res['lost']}  "
                  f"CPU ms/frame pub / sub / broker {cpu}", flush=True)
    for name in names[1:]:
        ratios = [m / w for m, w in zip(fps[name], fps["raw"]) if w]
        if ratios:
            print(f"{name:28s} / raw: median {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}–{max(ratios):.2f}] over {len(ratios)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
