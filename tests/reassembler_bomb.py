"""Reassembler bombs, run in a fresh process so that its peak RSS is the reassembler's own.

    python tests/reassembler_bomb.py [MAX_FRAME_BYTES [MAX_PENDING [N_FORGED]]]
        (defaults 268435456 8 10000: the Subscription's reassembler at the default max_frame_bytes)
    python tests/reassembler_bomb.py fork [locked]

The first form feeds ``N_FORGED`` forged fragments of varied geometry (huge totals in 1-byte
chunks, the largest total in the smallest chunks, many chunk sizes, forged and genuine ids,
fragments that break a geometry rule) with one genuine fragmented frame interleaved, and prints
one JSON line: the documented bound (``Reassembler.memory_bound``), the peak RSS growth over the
baseline taken just before the first fragment, whether the genuine frame came out intact, and
the reassembler's counters. The second form checks that a forked child drops timed-out frames on
its own clock (the reaper thread does not survive fork) and exits 0 when it does.
"""
from __future__ import annotations

import json
import os
import random
import resource
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from msight_fast import Frame, FrameError, Reassembler, codec, encode, fragment
from msight_fast import _schema as S

GENUINE_PUB = 0x5EED_0000_0000_0001


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def forged(pub: int, frame_id: int, index: int, count: int, total: int, chunk_size: int,
           offset: Optional[int] = None, chunk_len: Optional[int] = None, sending: int = 0) -> bytes:
    """A fragment with a valid CRC and whatever geometry (and ``sending``) is asked for."""
    if offset is None:
        offset = index * chunk_size
    if chunk_len is None:
        chunk_len = max(0, min(chunk_size, total - offset))
    chunk = bytes([index & 0xFF]) * chunk_len
    head = codec.impl.pack_fragment_header(frame_id, pub, index & 0xFFFFFFFF, count & 0xFFFFFFFF,
                                           total, offset, chunk_size & 0xFFFFFFFF, chunk, sending)
    return head + chunk


def _geometry(rng: random.Random, total: int) -> Tuple[int, int, int]:
    """(count, chunk_size, index) of a valid fragment of a ``total``-byte frame, chunk <= 4 KiB."""
    least = -(-total // S.MAX_FRAGMENT_COUNT)
    chunk_size = max(least, min(rng.choice([1, 7, 64, 1000, 4096]), total))
    count = -(-total // chunk_size)
    return count, chunk_size, rng.randrange(count)


def forgeries(n: int, max_frame_bytes: int, genuine_frame_id: int, seed: int = 0,
              genuine_sending: int = 0) -> Iterator[bytes]:
    """``n`` forged fragments, made one at a time (a list of them would weigh on the RSS);
    ``genuine_sending``: the genuine fragments' ``sending``, which a watching forger copies."""
    rng = random.Random(seed)
    forgers = [rng.getrandbits(64) | 1 for _ in range(3)]
    frame_ids = [rng.getrandbits(64) for _ in range(6)]          # reused: forged frames that fill up
    # two other geometries under the genuine frame's own ids
    genuine_geoms = [(max_frame_bytes, -(-max_frame_bytes // S.MAX_FRAGMENT_COUNT)), (1000, 7)]
    for i in range(n):
        kind = i % 6
        if kind == 0:              # the original bomb: a huge total in 1-byte chunks
            total = rng.choice([256 << 20, max_frame_bytes, 1 << 40])
            yield forged(rng.choice(forgers), rng.getrandbits(64), 0, total, total, 1)
        elif kind == 1:            # the largest total in the smallest chunks, a chunk anywhere
            total = max_frame_bytes
            chunk_size = -(-total // S.MAX_FRAGMENT_COUNT)
            count = -(-total // chunk_size)
            fid = rng.choice(frame_ids) if rng.random() < 0.5 else rng.getrandbits(64)
            yield forged(rng.choice(forgers), fid, rng.randrange(count), count, total, chunk_size)
        elif kind == 2:            # varied totals and chunk sizes from the forging publishers
            total = rng.randint(1, max_frame_bytes)
            count, chunk_size, index = _geometry(rng, total)
            yield forged(rng.choice(forgers), rng.choice(frame_ids), index, count, total, chunk_size)
        elif kind == 3:            # the genuine frame's ids and sending with another geometry
            total, chunk_size = rng.choice(genuine_geoms)
            count = -(-total // chunk_size)
            yield forged(GENUINE_PUB, genuine_frame_id, rng.randrange(count), count, total, chunk_size,
                         sending=genuine_sending)
        elif kind == 4:            # a new publisher and frame each time
            total = rng.randint(1, max_frame_bytes)
            count, chunk_size, index = _geometry(rng, total)
            yield forged(rng.getrandbits(64), rng.getrandbits(64), index, count, total, chunk_size)
        else:                      # a valid CRC on a geometry that breaks one rule
            total = rng.randint(2, max_frame_bytes)
            count, chunk_size, index = _geometry(rng, total)
            pub, fid = rng.choice(forgers), rng.getrandbits(64)
            rule = rng.randrange(6)
            if rule == 0:          # count is not ceil(total / chunk_size)
                yield forged(pub, fid, index, count + 1, total, chunk_size)
            elif rule == 1:        # over max_frame_bytes
                yield forged(pub, fid, 0, count, max_frame_bytes + 1, chunk_size)
            elif rule == 2:        # index past count
                yield forged(pub, fid, count, count, total, chunk_size, offset=count * chunk_size, chunk_len=1)
            elif rule == 3:        # offset off its place
                yield forged(pub, fid, index, count, total, chunk_size, offset=index * chunk_size + 1)
            elif rule == 4:        # a chunk one byte too long
                yield forged(pub, fid, index, count, total, chunk_size,
                             chunk_len=min(chunk_size, total - index * chunk_size) + 1)
            else:                  # more fragments than a frame may have
                yield forged(pub, fid, 0, S.MAX_FRAGMENT_COUNT + 1, S.MAX_FRAGMENT_COUNT + 1, 1)


def run(max_frame_bytes: int = 256 << 20, max_pending: int = 8, n_forged: int = 10_000,
        seed: int = 0) -> Dict[str, Any]:
    """Feed the bombs with one genuine frame interleaved; returns the figures (see the module docstring)."""
    # the genuine frame: a few MiB in 64 KiB fragments with the compiled core; smaller with the
    # pure-Python twin, whose CRC32C runs at a few MB/s
    n_bytes = min(max_frame_bytes // 2, (4 << 20) if codec.HAS_EXTENSIONS else (1 << 20))
    arr = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)
    frame = Frame.from_array(arr, sensor_name="cam")
    frame.publisher_id = GENUINE_PUB
    genuine = fragment(encode(frame), 64 << 10)
    # long enough that nothing times out during the run: the bound must hold by quotas alone
    r = Reassembler(max_frame_bytes=max_frame_bytes, max_pending=max_pending, timeout_s=600)
    stride = max(1, n_forged // len(genuine))
    baseline = peak_rss()
    out: List[Any] = []
    rejected = 0
    t0 = time.monotonic()
    sending = codec.impl.parse_fragment_header(genuine[0])[7]
    for i, msg in enumerate(forgeries(n_forged, max_frame_bytes, frame.frame_id, seed, sending)):
        if i % stride == 0 and i // stride < len(genuine):
            got = r.feed(genuine[i // stride])
            if got is not None:
                out.append(bytes(got.data) == arr.tobytes())
        try:
            if r.feed(msg) is not None:
                out.append(False)          # a forgery must never make a frame
        except FrameError:
            rejected += 1
    for g in genuine[min(len(genuine), -(-n_forged // stride)):]:
        got = r.feed(g)
        if got is not None:
            out.append(bytes(got.data) == arr.tobytes())
    growth = peak_rss() - baseline
    return {"max_frame_bytes": max_frame_bytes, "max_pending": max_pending, "forged": n_forged,
            "memory_bound": r.memory_bound, "peak_rss_growth": growth, "baseline_rss": baseline,
            "genuine_ok": out == [True], "rejected_raised": rejected, "stats": r.stats(),
            "extensions": codec.HAS_EXTENSIONS, "seconds": round(time.monotonic() - t0, 2)}


def fork_check(hold_lock: bool = False) -> int:
    """0 when a forked child drops timed-out frames with no feed, on its own reaper thread; with
    ``hold_lock``, also when a parent thread held the reassembler's lock at the fork."""
    def first_fragment(seed: int) -> bytes:
        f = Frame.from_array(np.full(20_000, seed, np.uint8), sensor_name="cam")
        return fragment(encode(f), 4096)[0]

    r = Reassembler(timeout_s=1.0)
    r.feed(first_fragment(1))                      # the parent's reaper now runs
    if hold_lock:
        r._lock.acquire()                          # as a feed() in another thread would, mid-copy
    pid = os.fork()
    if pid and hold_lock:
        r._lock.release()
    if pid == 0:
        code = 3
        try:
            ok = _wait(lambda: r.pending == 0)     # the frame inherited from the parent
            r.feed(first_fragment(2))              # and one of the child's own
            ok = ok and _wait(lambda: r.pending == 0) and r.expired >= 2 and r.evicted == 0
            ok = ok and any(t.name == "msight-fast-reaper" for t in threading.enumerate())
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8


def _wait(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)                           # polling the reaper thread's work
    return True


if __name__ == "__main__":
    if sys.argv[1:2] == ["fork"]:
        sys.exit(fork_check(hold_lock=sys.argv[2:3] == ["locked"]))
    args = [int(a) for a in sys.argv[1:4]]
    print(json.dumps(run(*args)))
