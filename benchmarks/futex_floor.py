"""The floor under shm's idle latency: a futex wake-up reaching a Python waiter in another process.

    python benchmarks/futex_floor.py [--frames 400] [--period-ms 5]

One process sleeps in ``futex_wait`` (through msight_fast's compiled shm module, as a subscriber
does); this one stamps ``time.time_ns()`` into shared memory and wakes it every ``period``. Prints
the median from the stamp to the waiter running again.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any


def _waiter(path: str, n: int, ready: Any, out: Any) -> None:
    from msight_fast._ext import _shm
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    os.close(fd)
    m = _shm.Mapping(mm)
    lat = []
    seen = m.ld32(0)
    ready.set()
    for _ in range(n):
        while m.ld32(0) == seen:
            m.futex_wait(0, seen, 1.0)
        now = time.time_ns()
        seen = m.ld32(0)
        lat.append(now - m.ld64(8))
    out.put(sorted(lat)[len(lat) // 2] / 1e3)


def main() -> int:
    from msight_fast._ext import _shm
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--period-ms", type=float, default=5.0)
    a = ap.parse_args()
    fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="msf-futex-")
    os.ftruncate(fd, 4096)
    mm = mmap.mmap(fd, 4096)
    os.close(fd)
    m = _shm.Mapping(mm)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_waiter, args=(path, a.frames, ready, out))
    p.start()
    try:
        ready.wait(60)
        time.sleep(0.2)                        # the waiter is asleep in futex_wait
        for _ in range(a.frames):
            time.sleep(a.period_ms / 1e3)
            m.st64(8, time.time_ns())
            m.add32(0, 1)
            m.futex_wake(0)
        print(f"futex wake-up to a Python waiter in another process: p50 {out.get(timeout=60):.1f} us "
              f"({a.frames} wake-ups, one every {a.period_ms:g} ms)")
        p.join(10)
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
