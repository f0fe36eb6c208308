"""What receiving one small frame costs a Kafka subscriber, beside the bare client, in one process
and one run (the broker is the embedded tansu):

    python benchmarks/recv_costs.py [--frames 100000] [--rounds 5] [--payload 1k]

The frames are in the log before a round starts (published through the Bus, so batched; the raw
messages one per frame), and each round reads all of them with a new consumer group from the
beginning: what is timed is the steady state of a subscriber that is behind, from its first frame
to its last, fetches included.

- ``Subscription.recv``: a ``recv`` per frame, as an application calls it;
- ``raw confluent-kafka poll``: ``Consumer.poll`` per message and its value read, as the transport
  benchmark's raw subscriber does.

Prints the median over rounds of µs per frame, wall clock and this process's CPU (every thread,
librdkafka's included), with the range over rounds. The two contenders' rounds alternate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from msight_fast import connect
from msight_fast.bench import _cpu_s, make_payload, start_broker


def _timed(first: Callable[[], None], rest: Callable[[], None]) -> Tuple[float, float]:
    """µs per frame (wall, CPU) of ``rest``, after ``first`` (the wait for the group's assignment)."""
    first()
    t0, c0 = time.perf_counter(), _cpu_s()
    rest()
    return time.perf_counter() - t0, _cpu_s() - c0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100_000, help="frames read a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--payload", default="1k")
    a = ap.parse_args()
    obj, enc, _ = make_payload(a.payload)
    body = obj.tobytes() if isinstance(obj, np.ndarray) else obj
    n = a.frames
    broker = start_broker("kafka")
    try:
        from confluent_kafka import Consumer, Producer
        opts: Dict[str, Any] = broker.options()
        servers = ",".join(opts["servers"])
        pub = connect("kafka", **opts)
        for _ in range(n):
            pub.publish("costs", obj, encoding=enc)
        pub.flush(120)
        pub.close()
        raw = Producer({"bootstrap.servers": servers, "linger.ms": 5})
        for _ in range(n):
            raw.produce("costs-raw", body)
            raw.poll(0)
        raw.flush(120)

        def msight_round(r: int) -> Tuple[float, float]:
            bus = connect("kafka", fetch_wait_max_ms=10, **opts)
            sub = bus.subscribe("costs", group_id=f"costs-{r}-{time.time_ns()}", from_beginning=True)
            try:
                def first() -> None:
                    while sub.recv(1.0) is None:
                        pass

                def rest() -> None:
                    for _ in range(n - 1):
                        if sub.recv(30.0) is None:
                            raise RuntimeError("Subscription.recv: frames missing")
                return _timed(first, rest)
            finally:
                bus.close()

        def raw_round(r: int) -> Tuple[float, float]:
            c = Consumer({"bootstrap.servers": servers, "group.id": f"costs-raw-{r}-{time.time_ns()}",
                          "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                          "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 10})
            c.subscribe(["costs-raw"])
            try:
                def first() -> None:
                    while True:
                        m = c.poll(1.0)
                        if m is not None and m.error() is None:
                            return

                def rest() -> None:
                    got = 1
                    deadline = time.monotonic() + 60
                    while got < n:
                        m = c.poll(1.0)
                        if m is not None and m.error() is None and m.value() is not None:
                            got += 1
                        elif time.monotonic() > deadline:
                            raise RuntimeError("raw poll: messages missing")
                return _timed(first, rest)
            finally:
                c.close()

        runs: Dict[str, Callable[[int], Tuple[float, float]]] = {
            "Subscription.recv, kafka": msight_round,
            "raw confluent-kafka poll": raw_round,
        }
        out: Dict[str, List[Tuple[float, float]]] = {k: [] for k in runs}
        for r in range(a.rounds):
            for name, fn in runs.items():
                wall, cpu = fn(r)
                out[name].append((wall / (n - 1) * 1e6, cpu / (n - 1) * 1e6))
        print(f"{a.payload} frames, {n} a round, {a.rounds} rounds: µs per frame, median [range]")
        for name, v in out.items():
            w, c = [x[0] for x in v], [x[1] for x in v]
            print(f"  {name:28s} wall {statistics.median(w):6.2f} [{min(w):.2f}–{max(w):.2f}]"
                  f"   CPU {statistics.median(c):6.2f} [{min(c):.2f}–{max(c):.2f}]")
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
