"""Where shm's time goes, measured in one process (medians of repeated calls):

    python benchmarks/shm_costs.py

- a 1080p frame copied into slots that rotate (as a publisher's do) with memcpy, and with the
  streaming copy ``Mapping.write`` uses, beside a memcpy into one cached buffer;
- the first write into a freshly mapped 1080p slot, without and with ``MAP_POPULATE``;
- ``Bus.publish`` of a 1 KB frame on shm (no subscriber), and ``publish`` + ``recv`` of one.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

N = 1080 * 1920 * 3
SLOTS = 16


def _med_us(f: Callable[[], object], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def copies(d: str) -> Dict[str, float]:
    from msight_fast._ext import _shm
    path = os.path.join(d, "msf-costs-copy")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, SLOTS * N)
    mm = mmap.mmap(fd, SLOTS * N, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    os.close(fd)
    m: Optional[Any] = _shm.Mapping(mm)
    base = m.address()
    src = np.ones(N, np.uint8)
    dst = np.empty_like(src)
    k = [0]

    def rot_memcpy() -> None:
        ctypes.memmove(base + (k[0] % SLOTS) * N, src.ctypes.data, N)
        k[0] += 1

    def rot_stream() -> None:
        assert m is not None
        m.write((k[0] % SLOTS) * N, src)
        k[0] += 1
    out = {"memcpy_cached_us": _med_us(lambda: np.copyto(dst, src), 60),
           "memcpy_rotating_slots_us": _med_us(rot_memcpy, 60),
           "stream_rotating_slots_us": _med_us(rot_stream, 60)}
    m = None                                   # lets go of the mapping's buffer, so it can close
    mm.close()
    os.unlink(path)
    return out


def first_touch(d: str) -> Dict[str, float]:
    from msight_fast._ext import _shm
    src = np.ones(N, np.uint8)
    out = {}
    for name, flags in (("first_write_plain_us", mmap.MAP_SHARED),
                        ("first_write_populated_us", mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))):
        ts = []
        for i in range(5):
            path = os.path.join(d, f"msf-costs-touch-{i}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.posix_fallocate(fd, 0, N)
            mm = mmap.mmap(fd, N, flags=flags)
            os.close(fd)
            m = _shm.Mapping(mm)
            t0 = time.perf_counter()
            m.write(0, src)
            ts.append(time.perf_counter() - t0)
            del m
            mm.close()
            os.unlink(path)
        out[name] = statistics.median(ts) * 1e6
    return out


def small_frames(d: str) -> Dict[str, float]:
    import msight_fast
    bus = msight_fast.connect("shm", dir=d, slots=64)
    sub = bus.subscribe("costs/loop")
    src = np.ones(1024, np.uint8)
    bus.publish("costs/alone", src, encoding="raw")
    bus.publish("costs/loop", src, encoding="raw")
    sub.recv(timeout=1)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        bus.publish("costs/alone", src, encoding="raw")
    pub_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        bus.publish("costs/loop", src, encoding="raw")
        sub.recv(timeout=1)
    both_us = (time.perf_counter() - t0) / n * 1e6
    bus.close()
    return {"publish_1k_us": pub_us, "publish_and_recv_1k_us": both_us, "recv_1k_us": both_us - pub_us}


def main() -> int:
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="msf-costs-")
    try:
        res: Dict[str, float] = {}
        res.update(copies(d))
        res.update(first_touch(d))
        res.update(small_frames(d))
    finally:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)
    for k, v in res.items():
        print(f"{k:28s} {v:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
