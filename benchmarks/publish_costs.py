"""What one ``Bus.publish`` of a small frame costs the publishing thread, beside the bare client's
call, in one process and one run (no subscriber; the broker is the embedded tansu):

    python benchmarks/publish_costs.py [--frames 20000] [--rounds 7] [--payload 1k]

- ``memory``: ``Bus.publish`` on the in-process backend: the Bus's own work (frame, header,
  sequence, lock) plus the memory backend's hand-off;
- ``kafka``: ``Bus.publish`` on Kafka, small frames batched (the default);
- ``raw confluent-kafka``: ``Producer.produce`` of the same bytes with an 8-byte timestamp in
  front, plus ``poll(0)``: the transport benchmark's raw publisher loop.

Prints the median over rounds of the mean µs per call in each round, and the range over rounds.
The rounds of the three contenders are interleaved, so a busy moment of the machine hits all three.
"""
from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

from msight_fast import connect
from msight_fast.bench import make_payload, start_broker


def _per_call_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--payload", default="1k")
    a = ap.parse_args()
    obj, enc, _ = make_payload(a.payload)
    body = (obj.tobytes() if isinstance(obj, np.ndarray) else obj)[8:]
    broker = start_broker("kafka")
    buses: List[Any] = []
    try:
        from confluent_kafka import Producer
        opts: Dict[str, Any] = broker.options()
        mem = connect("memory")
        buses.append(mem)
        kafka = connect("kafka", **opts)
        buses.append(kafka)
        raw = Producer({"bootstrap.servers": ",".join(opts["servers"]), "linger.ms": 5})
        for bus in (mem, kafka):               # topics made and limits known before timing
            bus.publish("costs", obj, encoding=enc)
            bus.flush(60)
        raw.produce("costs-raw", body)
        raw.flush(60)

        def raw_call() -> None:
            raw.produce("costs-raw", struct.pack("<q", time.time_ns()) + body)
            raw.poll(0)
        runs: Dict[str, Callable[[], Any]] = {
            "Bus.publish, memory": lambda: mem.publish("costs", obj, encoding=enc),
            "Bus.publish, kafka": lambda: kafka.publish("costs", obj, encoding=enc),
            "raw confluent-kafka produce": raw_call,
        }
        out: Dict[str, List[float]] = {k: [] for k in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():
                out[name].append(_per_call_us(fn, a.frames))
                # drained outside the timing, as a paced publisher's queue would be
                if name.endswith("kafka"):
                    kafka.flush(60)
                elif name.startswith("raw"):
                    raw.flush(60)
        print(f"{a.payload} frames, {a.frames} calls a round, {a.rounds} rounds: µs per call, median [range]")
        for name, v in out.items():
            print(f"  {name:30s} {statistics.median(v):6.2f}  [{min(v):.2f}–{max(v):.2f}]")
    finally:
        for bus in buses:
            bus.close()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
