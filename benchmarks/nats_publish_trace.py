"""Where a NATS publish of one idle 1080p frame spends its time before the bytes leave: from the
frame's ``publish_ts_ns`` to the first write on the socket, to the end of the frame's last one
(its queue-group announcement aside), and to ``publish``'s return, with a frame every 30 ms and no subscriber:

- the default server (1 MB ``max_payload``): the frame goes as 7 fragments;
- a server with ``max_payload`` raised: the frame goes as one message.

The writes are timed by wrapping the NATS backend's own socket writer (``_direct_write``) in
this process; nothing else changes.

    python benchmarks/nats_publish_trace.py [--frames 40]

Prints the median over the frames (the first 5 left out) of each time, in ms.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from msight_fast import connect
from msight_fast.backends import nats as nats_backend
from msight_fast.bench import start_broker


def trace(frames: int, raised: bool) -> Dict[str, float]:
    writes: List[Tuple[int, int]] = []
    real = nats_backend._direct_write

    def timed(nc: Any, subject: str, data: Any, reply: Any, *rest: Any) -> Any:
        t0 = time.time_ns()
        w = real(nc, subject, data, reply, *rest)
        if subject == "trace":                 # not the queue-group announcement that follows
            writes.append((t0, time.time_ns()))
        return w

    b = start_broker("nats", raw=raised)
    nats_backend._direct_write = timed         # type: ignore[assignment]
    rows: Dict[str, List[float]] = {"first write begins": [], "last write ends": [], "publish returns": []}
    try:
        bus = connect("nats", servers=b.options()["servers"])
        arr = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        try:
            for i in range(frames):
                writes.clear()
                f = bus.publish("trace", arr)
                back = time.time_ns()
                time.sleep(0.03)                # idle between frames; the announcement is written meanwhile
                ts = f.publish_ts_ns
                frame_writes = [w for w in writes if w[0] <= back]
                if i < 5 or not frame_writes:
                    continue
                rows["first write begins"].append((frame_writes[0][0] - ts) / 1e6)
                rows["last write ends"].append((frame_writes[-1][1] - ts) / 1e6)
                rows["publish returns"].append((back - ts) / 1e6)
        finally:
            bus.close()
    finally:
        nats_backend._direct_write = real      # type: ignore[assignment]
        b.stop()
    return {k: statistics.median(v) for k, v in rows.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    a = ap.parse_args()
    for raised, name in ((False, "default server (7 fragments)"), (True, "max_payload raised (one message)")):
        got = trace(a.frames, raised)
        print(f"{name:34s} " + "  ".join(f"{k} {v:5.2f} ms" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
