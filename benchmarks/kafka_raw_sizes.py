"""What a message's size costs on tansu: raw confluent-kafka, as the transport table's raw Kafka
path runs it, with messages of each size given, one run after the other, alternating sizes.

Reads how much of a gap against the raw client's 1 KB rate a few hundred more bytes per frame
explain: a msight_fast frame of 1 KB payload is 1,152 or 1,216 bytes whole (a 128- or 192-byte
header), or about 1,050 in a batch that shares one header (docs/wire-format.md 2b).

    python benchmarks/kafka_raw_sizes.py --sizes 1024,1050,1216 --runs 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Dict, List

from msight_fast import bench as B


def _pub_sized(backend: str, opts: Dict[str, Any], topic: str, payload: str, seconds: float, ready: Any, go: Any,
               out: Any) -> None:
    """``_pub_raw``'s Kafka publisher, with messages of ``MSF_RAW_SIZE`` bytes (stamped, as there)."""
    body = os.urandom(int(os.environ["MSF_RAW_SIZE"]) - 8)
    n, t0, c0 = B.raw_kafka_publish(opts, topic, body, seconds, ready, go)
    out[0], out[1], out[2] = n, time.monotonic() - t0, B._cpu_s() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description="Raw confluent-kafka on tansu, with messages of the sizes given.")
    ap.add_argument("--sizes", default="1024,1050,1216", help="message sizes in bytes, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if min(sizes) < 8:
        ap.error("every size must be at least 8 bytes: the timestamp the subscriber reads")
    fps: Dict[int, List[float]] = {s: [] for s in sizes}
    for r in range(a.runs):
        for s in sizes:
            os.environ["MSF_RAW_SIZE"] = str(s)       # the spawned publisher inherits it
            d = B.run_transport("kafka", "1k", a.seconds, path=f"raw{s}", publisher=_pub_sized,
                                subscriber=B._sub_raw)
            fps[s].append(d["fps"])
            per = (d["broker_cpu_s"] or 0.0) * 1e6 / max(1, d["received"])
            print(f"run {r + 1} {s:6d} bytes: {d['fps']:10,.0f} fps, lost {d['lost']}, tansu {per:.1f} µs/message",
                  flush=True)
    for s in sizes:
        print(f"{s:6d} bytes: median {statistics.median(fps[s]):10,.0f} fps over {a.runs} runs")


if __name__ == "__main__":
    main()
