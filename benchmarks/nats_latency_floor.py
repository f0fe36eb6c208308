"""Publish-to-receipt latency of one idle 1080p frame over NATS, a frame every 30 ms, with a
nats-server started for each measurement and the subscriber in a process of its own:

- msight_fast: the default server, so the frame goes as 7 fragments; and through the raised
  server below, as one message;
- bare nats-py: one 6 MB message, max_payload raised (its publish time in the first 8 bytes; the
  script's own ``bytes()`` of the body, which nats-py needs, is counted in its latency: about
  0.5 ms);
- raw sockets: one 6 MB PUB written with ``sendmsg`` and read with ``recv_into`` by a thread of
  the same process, no client library at all: the floor the server hop itself sets here.

    python benchmarks/nats_latency_floor.py [--frames 40] [--runs 3]

Prints each run's p50 (and min, max) per contender, then the median of the runs' p50s and their range.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from msight_fast import connect
from msight_fast.bench import start_broker


def _sub_ours(servers: list, n: int, ready: Any, out: Any) -> None:
    """The subscriber process: the latency of every frame it gets, until ``n`` or 3 s of silence."""
    bus = connect("nats", servers=servers)
    sub = bus.subscribe("floor")
    ready.set()
    lat: list = []
    while len(lat) < n:
        f = sub.recv(3 if lat else 60)       # the first frame waits out the publisher's start
        if f is None:
            break
        lat.append((time.time_ns() - f.publish_ts_ns) / 1e6)
        f.release()
    out.send(lat)
    bus.close()


def _sub_raw(servers: list, n: int, ready: Any, out: Any) -> None:
    import nats

    async def run() -> list:
        nc = await nats.connect(servers)
        q: asyncio.Queue = asyncio.Queue()

        async def cb(m: Any) -> None:
            await q.put((time.time_ns() - int.from_bytes(m.data[:8], "little")) / 1e6)
        await nc.subscribe("floor", cb=cb)
        await nc.flush()
        ready.set()
        lat: list = []
        try:
            while len(lat) < n:
                lat.append(await asyncio.wait_for(q.get(), 3 if lat else 60))
        except asyncio.TimeoutError:
            pass
        await nc.close()
        return lat
    out.send(asyncio.run(run()))


def _split(n: int, raised: bool, sub_main: Callable[..., None], publish: Callable[[list], None]) -> list:
    """Start a server and a subscriber process; ``publish(servers)`` sends ``n`` frames here."""
    b = start_broker("nats", raw=raised)
    p: Optional[Any] = None
    try:
        ctx = mp.get_context("spawn")
        ready, (rx, tx) = ctx.Event(), ctx.Pipe(False)
        p = ctx.Process(target=sub_main, args=(b.options()["servers"], n, ready, tx), daemon=True)
        p.start()
        if not ready.wait(60):          # set once its SUB is flushed to the server (both clients flush)
            raise RuntimeError("the subscriber process did not start")
        publish(b.options()["servers"])
        lat = rx.recv() if rx.poll(60) else []
        if len(lat) < n // 2:
            raise RuntimeError(f"the subscriber got {len(lat)} of {n} frames")
        return lat[5:]
    finally:
        if p is not None:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        b.stop()


def ours(n: int, raised: bool = False) -> list:
    def publish(servers: list) -> None:
        bus = connect("nats", servers=servers)
        arr = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        for _ in range(n):
            bus.publish("floor", arr)
            time.sleep(0.03)
        bus.close()
    return _split(n, raised, _sub_ours, publish)


def raw(n: int) -> list:
    import nats

    def publish(servers: list) -> None:
        async def run() -> None:
            nc = await nats.connect(servers)
            body = bytearray(6_220_800)
            for _ in range(n):
                body[:8] = time.time_ns().to_bytes(8, "little")
                await nc.publish("floor", bytes(body))     # nats-py takes bytes
                await nc.flush()
                await asyncio.sleep(0.03)
            await nc.close()
        asyncio.run(run())
    return _split(n, True, _sub_raw, publish)


def _recv_some(sock: socket.socket, into: memoryview) -> int:
    k = sock.recv_into(into)
    if not k:
        raise ConnectionError("the server closed the connection")
    return k


def _send_all(sock: socket.socket, parts: list) -> None:
    """``sendmsg`` until every byte is out: with a timeout set it may send part of the message."""
    views = [memoryview(p) for p in parts]
    while views:
        k = sock.sendmsg(views)
        while views and k >= views[0].nbytes:
            k -= views[0].nbytes
            views.pop(0)
        if views and k:
            views[0] = views[0][k:]


def sockets(n: int) -> list:
    b = start_broker("nats", raw=True)
    try:
        host, port = b.options()["servers"][0].split("//")[1].rsplit(":", 1)
        conns: list = []
        for _ in range(2):
            c = socket.create_connection((host, int(port)), timeout=10)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.makefile("rb").readline()                               # INFO
            c.settimeout(10)            # every wait bounded; sendmsg may then send part: see _send_all
            c.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
            conns.append(c)
        pub, sub = conns
        sub.sendall(b"SUB floor 1\r\nPING\r\n")
        buf = bytearray(8 << 20)
        mv = memoryview(buf)
        got = 0
        while b"PONG\r\n" not in buf[:got]:                         # subscribed
            got += _recv_some(sub, mv[got:])
        pub.sendall(b"PING\r\n")
        pub.recv(64)                                                   # connected
        body = np.random.default_rng(0).integers(0, 256, 6_220_800, dtype=np.uint8).tobytes()
        want = len(b"MSG floor 1 %d\r\n" % len(body)) + len(body) + 2
        lat = []
        for _ in range(n):
            done: list = []

            def read(done: list = done) -> None:
                k = 0
                try:
                    while k < want:
                        k += _recv_some(sub, mv[k:])
                except OSError:
                    return                       # reported below: the message did not come back
                done.append(time.perf_counter())
            th = threading.Thread(target=read, daemon=True)
            th.start()
            t0 = time.perf_counter()
            _send_all(pub, [b"PUB floor %d\r\n" % len(body), body, b"\r\n"])
            th.join(10)
            if not done:
                raise RuntimeError("raw sockets: the message did not come back within 10 s")
            lat.append((done[0] - t0) * 1e3)
            time.sleep(0.03)
        return lat[5:]
    finally:
        for c in conns:
            c.close()
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    n = a.frames + 5
    contenders = (("msight_fast (fragmented, default server)", ours),
                  ("msight_fast (one message, raised server)", lambda k: ours(k, True)),
                  ("bare nats-py (one message)", raw), ("raw sockets (one message, no client)", sockets))
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
