"""Where the intersection load's publish calls wait on NATS: the load of ``--profile intersection``
(four raw 1080p cameras, a 262k-point lidar and JPEG, a thread per sensor on one Bus) published
from this process to an embedded nats-server, received by a Bus in a child process.

The NATS backend's socket writer (``_direct_write``) and its copy for queue-group pulls
(``_keep_for_pulls``) are timed by wrapping them in this process; nothing else changes.

    python benchmarks/nats_intersection_trace.py [--seconds 30] [--slowest 3]

Prints, per topic, frames sent, late and skipped and the longest publish call; how many frames
were copied for pulls (no queue group listens here, so each copy was for nothing); and, for the
slowest JPEG publish calls, what the loop thread wrote and copied while each waited.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from typing import Any, Dict, List, Tuple

from msight_fast import connect
from msight_fast.backends import nats as nats_backend
from msight_fast.bench import INTERSECTION_LOAD, paced_streams, publish_paced, start_broker

JPEG = "cam/jpeg"


def _receive(opts: Dict[str, Any], topics: List[str], ready: Any, stop: Any) -> None:
    bus = connect("nats", **opts)
    subs = [bus.subscribe(t) for t in topics]

    def take(s: Any) -> None:
        while not stop.is_set():
            s.recv(0.2)
    for s in subs:
        threading.Thread(target=take, args=(s,), daemon=True).start()
    ready.set()
    stop.wait(600)
    bus.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--slowest", type=int, default=3, help="JPEG publish calls to break down")
    args = ap.parse_args()

    events: List[Tuple[str, int, int, str]] = []       # kind, start ns, end ns, subject or topic
    real_write, real_keep = nats_backend._direct_write, nats_backend.NatsTransport._keep_for_pulls

    def write(nc: Any, subject: str, data: Any, reply: Any, *rest: Any) -> Any:
        t0 = time.monotonic_ns()
        w = real_write(nc, subject, data, reply, *rest)
        events.append(("write", t0, time.monotonic_ns(), subject))
        return w

    def keep(self: Any, *a: Any) -> Any:
        t0 = time.monotonic_ns()
        out = real_keep(self, *a)
        events.append(("copy", t0, time.monotonic_ns(), threading.current_thread().name))
        return out
    nats_backend._direct_write = write
    nats_backend.NatsTransport._keep_for_pulls = keep   # type: ignore[method-assign]

    broker = start_broker("nats")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    topics = [t for t, _, _ in INTERSECTION_LOAD]
    child = ctx.Process(target=_receive, args=(broker.options(), topics, ready, stop), daemon=True)
    child.start()
    try:
        if not ready.wait(120):
            raise SystemExit("the receiver did not start")
        bus = connect("nats", **broker.options())
        publish = bus.publish

        def timed(topic: str, obj: Any, **kw: Any) -> Any:
            t0 = time.monotonic_ns()
            try:
                return publish(topic, obj, **kw)
            finally:
                events.append(("publish", t0, time.monotonic_ns(), topic))
        bus.publish = timed                              # type: ignore[method-assign]
        rows = publish_paced(bus, paced_streams(INTERSECTION_LOAD), args.seconds)
        bus.flush(60)
        bus.close()
    finally:
        stop.set()
        child.join(30)
        broker.stop()

    print(f"{'topic':<10} {'sent':>5} {'late':>5} {'skipped':>7} {'longest publish ms':>19}")
    for r in rows:
        print(f"{r['topic']:<10} {r['sent']:>5} {r['late']:>5} {r['skipped']:>7} {r['publish_max_ms']:>19.1f}")
    copies = [e for e in events if e[0] == "copy"]
    print(f"frames copied for queue-group pulls: {len(copies)}"
          + (f", {sum(e[2] - e[1] for e in copies) / 1e6:.1f} ms in all" if copies else ""))
    jpegs = sorted((e for e in events if e[0] == "publish" and e[3] == JPEG), key=lambda e: e[1] - e[2])
    for _, t0, t1, _ in jpegs[:args.slowest]:
        inside = [e for e in events if t0 <= e[1] < t1 and e[0] != "publish"]
        first = next((e for e in inside if e[0] == "write" and e[3] == JPEG), None)
        copies_in = sum(1 for e in inside if e[0] == "copy")
        if first is None:
            # a JPEG under ZERO_COPY_MIN is copied into the hand-off: publish returns before its write
            print(f"JPEG publish of {(t1 - t0) / 1e6:.1f} ms: returned before its write (copied); "
                  f"{copies_in} copies for pulls meanwhile")
            continue
        others = [e for e in inside if e[0] == "write" and e[3] != JPEG and e[1] < first[1]]
        print(f"JPEG publish of {(t1 - t0) / 1e6:.1f} ms: its write began after {(first[1] - t0) / 1e6:.1f} ms, "
              f"behind {len(others)} messages of {len({e[3] for e in others})} other subjects; "
              f"{copies_in} copies for pulls meanwhile")


if __name__ == "__main__":
    main()
