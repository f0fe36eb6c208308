"""Publish-to-receipt latency of one idle 1080p frame over NATS: msight_fast (default server,
fragmented) against bare nats-py (one 6 MB message, max_payload raised), one process each side
of a nats-server started for the run. Shows the floor nats-py and the server set for raw frames.

    python benchmarks/nats_latency_floor.py [--frames 40]
"""
from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from msight_fast import connect
from msight_fast.bench import start_broker


def ours(n: int) -> list:
    b = start_broker("nats")
    try:
        pub, subbus = connect("nats", **b.options()), connect("nats", **b.options())
        sub = subbus.subscribe("floor")
        arr = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        lat = []
        for _ in range(n):
            pub.publish("floor", arr)
            f = sub.recv(10)
            lat.append((time.time_ns() - f.publish_ts_ns) / 1e6)
            time.sleep(0.03)
        pub.close()
        subbus.close()
        return lat[5:]
    finally:
        b.stop()


def raw(n: int) -> list:
    import nats
    b = start_broker("nats", raw=True)

    async def run() -> list:
        pub, subc = await nats.connect(b.options()["servers"]), await nats.connect(b.options()["servers"])
        q: asyncio.Queue = asyncio.Queue()

        async def cb(m) -> None:
            await q.put(time.time_ns())
        await subc.subscribe("floor", cb=cb)
        await subc.flush()
        body, lat = bytes(6_220_800), []
        for _ in range(n):
            t0 = time.time_ns()
            await pub.publish("floor", body)
            await pub.flush()
            lat.append((await asyncio.wait_for(q.get(), 10) - t0) / 1e6)
            await asyncio.sleep(0.03)
        await pub.close()
        await subc.close()
        return lat[5:]
    try:
        return asyncio.run(run())
    finally:
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    n = ap.parse_args().frames + 5
    for name, fn in (("msight_fast (fragmented, default server)", ours), ("bare nats-py (one message)", raw)):
        lat = fn(n)
        print(f"{name:42s} p50 {np.percentile(lat, 50):5.1f} ms  min {min(lat):5.1f}  max {max(lat):5.1f}")


if __name__ == "__main__":
    main()
