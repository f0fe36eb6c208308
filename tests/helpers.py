"""Test data (real Mcity frames from MSIGHT_DATA_DIR when set, else from the sample packaged in
msight_fast/sample/; synthetic frames of the same shapes only when neither holds data) and small
helpers the suites share."""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np

from msight_fast import sample
from msight_fast.backends.base import Source
from msight_fast.pcd import read_pcd, synthetic_sweep

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Optional[Path]:
    """MSIGHT_DATA_DIR when it holds frames, else the packaged sample, else None."""
    return sample.data_dir()


def real_jpeg() -> bytes:
    d = data_dir()
    p = sample.image_file(d) if d is not None else None
    if p is not None:
        return p.read_bytes()
    # a JPEG-shaped blob: SOI marker, random body, EOI marker (the transport never parses it)
    rng = np.random.default_rng(1)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 364_000, dtype=np.uint8).tobytes() + b"\xff\xd9"


def real_sweep() -> np.ndarray:
    d = data_dir()
    p = sample.pcd_file(d) if d is not None else None
    if p is not None:
        return read_pcd(p)
    return synthetic_sweep(38_690, seed=2)


def camera_sequence() -> List[bytes]:
    d = data_dir()
    if d is not None:
        return [p.read_bytes() for p in sample.camera_files(d)]
    return [real_jpeg()[: 80_000 + i] for i in range(30)]


def raw_frame(h: int = 1080, w: int = 1920, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def wait_for(cond, what, timeout=30.0, interval=0.02):
    """Poll ``cond`` until it is true, or fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)                 # polling state that another thread or process changes


class Receiver:
    """Receives from one subscription in a thread, noting (seq, arrival time) of every frame."""

    def __init__(self, sub) -> None:
        self.sub = sub
        self.got: List[Tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="receiver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            f = self.sub.recv(timeout=0.2)
            if f is not None:
                self.got.append((f.seq, time.monotonic()))

    def seqs(self) -> List[int]:
        return [s for s, _ in list(self.got)]

    def seq_set(self) -> Set[int]:
        return {s for s, _ in list(self.got)}

    def first_after(self, seq: int) -> Optional[float]:
        """Arrival time of the first frame numbered above ``seq``."""
        return next((t for s, t in list(self.got) if s > seq), None)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "recv() hung"


class ScriptedSource(Source):
    """A Source that hands out scripted (message, token) pairs, for driving a Subscription with no
    broker; records the tokens handed back (``handed_tokens``) and with which frame (``log``)."""

    def __init__(self, messages: Iterable[Tuple[Any, Any]]) -> None:
        self.q = collections.deque(messages)
        self.handed_tokens: List[Any] = []
        self.log: List[Tuple[Optional[str], List[Any]]] = []   # (sensor_name or None, tokens)

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        return self.q.popleft() if self.q else None

    def handed(self, frame: Any, tokens: List[Any]) -> None:
        self.handed_tokens.extend(tokens)
        self.log.append((None if frame is None else frame.sensor_name, list(tokens)))

    def released(self) -> List[Any]:
        return sorted(self.handed_tokens)


def drain(sub: Any) -> List[Any]:
    """Every frame ``sub`` has ready now: ``recv(0)`` until it gives None."""
    out = []
    while True:
        f = sub.recv(0)
        if f is None:
            return out
        out.append(f)


@contextlib.contextmanager
def held_by_another_thread(lock: Any) -> Iterator[None]:
    """``lock`` held for the block by a thread of its own, so it is busy to this one (an RLock too)."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait(30)
    th = threading.Thread(target=hold, daemon=True)
    th.start()
    try:
        assert taken.wait(30), "the other thread never took the lock"
        yield
    finally:
        done.set()
        th.join(30)
