"""Publish-to-receipt latency of one idle 1080p frame over NATS, in one process with a
nats-server started for each measurement:

- msight_fast: the default server, so the frame goes as 7 fragments;
- bare nats-py: one 6 MB message, max_payload raised;
- raw sockets: one 6 MB PUB written with ``sendmsg`` and read with ``recv_into`` by a thread, no
  client library at all: the floor the server hop itself sets on this machine.

    python benchmarks/nats_latency_floor.py [--frames 40] [--runs 3]

Prints each run's p50 (and min, max) per contender, then the median of the runs' p50s.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
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


def sockets(n: int) -> list:
    b = start_broker("nats", raw=True)
    try:
        host, port = b.options()["servers"][0].split("//")[1].rsplit(":", 1)
        conns = []
        for _ in range(2):
            c = socket.create_connection((host, int(port)), timeout=10)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.makefile("rb").readline()                               # INFO
            c.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
            conns.append(c)
        pub, sub = conns
        sub.sendall(b"SUB floor 1\r\nPING\r\n")
        buf = bytearray(8 << 20)
        mv = memoryview(buf)
        got = 0
        while b"PONG\r\n" not in buf[:got]:                         # subscribed
            got += sub.recv_into(mv[got:])
        pub.sendall(b"PING\r\n")
        pub.recv(64)                                                   # connected
        body = np.random.default_rng(0).integers(0, 256, 6_220_800, dtype=np.uint8).tobytes()
        want = len(b"MSG floor 1 %d\r\n" % len(body)) + len(body) + 2
        lat = []
        for _ in range(n):
            done: list = []

            def read(done: list = done) -> None:
                k = 0
                while k < want:
                    k += sub.recv_into(mv[k:])
                done.append(time.perf_counter())
            th = threading.Thread(target=read)
            th.start()
            t0 = time.perf_counter()
            pub.sendmsg([b"PUB floor %d\r\n" % len(body), body, b"\r\n"])
            th.join(10)
            lat.append((done[0] - t0) * 1e3)
            time.sleep(0.03)
        pub.close()
        sub.close()
        return lat[5:]
    finally:
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    n = a.frames + 5
    contenders = (("msight_fast (fragmented, default server)", ours), ("bare nats-py (one message)", raw),
                  ("raw sockets (one message, no client)", sockets))
    p50s: dict = {name: [] for name, _ in contenders}
    for r in range(a.runs):
        for name, fn in contenders:                  # interleaved: a busy moment hits every contender
            lat = fn(n)
            p50s[name].append(float(np.percentile(lat, 50)))
            print(f"run {r + 1} {name:42s} p50 {p50s[name][-1]:5.1f} ms  min {min(lat):5.1f}  max {max(lat):5.1f}",
                  flush=True)
    if a.runs > 1:
        for name, v in p50s.items():
            print(f"median of {a.runs} runs' p50: {name:42s} {statistics.median(v):5.1f} ms "
                  f"[{min(v):.1f}–{max(v):.1f}]")


if __name__ == "__main__":
    main()
