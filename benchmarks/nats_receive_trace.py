"""Where an idle 1080p frame's time goes on the NATS subscriber's side: from the frame's
``publish_ts_ns`` to the first and the last socket read of it, and to ``recv``'s return, with a
frame every 30 ms, the subscriber in a process of its own:

- the default server (1 MB ``max_payload``): the frame comes as 7 fragments;
- a server with ``max_payload`` raised: the frame comes as one message.

The reads are timed by wrapping the NATS backend's own socket reader
(``_FastReader.buffer_updated``) in the subscriber process; nothing else changes. The first read
of a frame is the first after the previous frame's ``recv`` returned.

    python benchmarks/nats_receive_trace.py [--frames 40]

Prints the median over the frames (the first 5 left out) of each time, in ms, and of the reads
per frame.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from msight_fast import connect
from msight_fast.bench import start_broker


def _subscriber(servers: List[str], n: int, ready: Any, out: Any) -> None:
    from msight_fast.backends import nats as nats_backend

    reads: List[int] = []
    real = nats_backend._FastReader.buffer_updated

    def timed(self: Any, nbytes: int) -> None:
        real(self, nbytes)
        reads.append(time.time_ns())

    nats_backend._FastReader.buffer_updated = timed     # type: ignore[method-assign]
    bus = connect("nats", servers=servers)
    sub = bus.subscribe("trace")
    ready.set()
    got: List[Tuple[int, List[int], int]] = []
    while len(got) < n:
        f = sub.recv(3 if got else 60)
        if f is None:
            break
        got.append((f.publish_ts_ns, list(reads), time.time_ns()))
        reads.clear()
        f.release()
    out.send(got)
    bus.close()


def trace(frames: int, raised: bool) -> Dict[str, float]:
    b = start_broker("nats", raw=raised)
    ctx = mp.get_context("spawn")
    ready, (rx, tx) = ctx.Event(), ctx.Pipe(False)
    p = ctx.Process(target=_subscriber, args=(b.options()["servers"], frames, ready, tx), daemon=True)
    try:
        p.start()
        if not ready.wait(60):
            raise RuntimeError("the subscriber process did not start")
        bus = connect("nats", servers=b.options()["servers"])
        arr = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        for _ in range(frames):
            bus.publish("trace", arr)
            time.sleep(0.03)
        got = rx.recv() if rx.poll(60) else []
        bus.close()
    finally:
        p.join(10)
        if p.is_alive():
            p.terminate()
        b.stop()
    rows = [(ts, r, t) for ts, r, t in got[5:] if r]
    if not rows:
        raise RuntimeError("no frame came back")

    def med(values: List[float]) -> float:
        return statistics.median(values)
    return {"first read": med([(r[0] - ts) / 1e6 for ts, r, _ in rows]),
            "last read": med([(r[-1] - ts) / 1e6 for ts, r, _ in rows]),
            "recv returns": med([(t - ts) / 1e6 for ts, _, t in rows]),
            "reads": med([float(len(r)) for _, r, _ in rows])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    a = ap.parse_args()
    for name, raised in (("7 fragments, default server", False), ("one message, raised server", True)):
        r = trace(a.frames + 5, raised)
        print(f"{name:30s} " + "  ".join(f"{k} {v:6.2f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
