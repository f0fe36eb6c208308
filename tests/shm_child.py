"""A publisher or a subscriber of the shm backend in a process of its own, for tests/unit/test_shm.py.

Run by path (``python tests/shm_child.py pub|hold ...``; see ``main``). Every line it prints on
stdout is one JSON object with an ``event`` key, flushed at once, so the test can wait for it:

- ``pub``: ``ready`` (connected), then ``done`` with the count published, the errors and
  ``Bus.stats()``. Frame ``k`` (1, 2, ...; its seq, since one Bus publishes nothing else on the
  topic) carries ``pattern(shape, k)``. ``--count 0`` publishes until killed; ``--linger`` keeps
  the Bus (and its segment) open after ``done`` until stdin closes.
- ``hold``: ``ready`` (subscribed), ``got`` for each frame received, with its seq and whether
  its content matched; the ``--take``-th frame is kept (``held``) and recv is never called
  again. A ``release`` line on stdin gives it back (``released``); at stdin's end the child
  closes and prints ``done`` with the subscription's stats.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np

_BASES: Dict[Tuple[int, ...], np.ndarray] = {}


def parse_shape(text: str) -> Tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def _base(shape: Tuple[int, ...]) -> np.ndarray:
    b = _BASES.get(shape)
    if b is None:
        n = 1
        for d in shape:
            n *= d
        # 251 is prime: rows and planes of any image shape get different bytes, so a slot mixing
        # two frames (or shifted by any offset) does not match either
        b = _BASES[shape] = (np.arange(n, dtype=np.uint32) % 251).astype(np.uint8).reshape(shape)
    return b


def pattern(shape: Tuple[int, ...], k: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Frame ``k``'s pixels: every byte depends on its index and on ``k``."""
    return np.add(_base(shape), np.uint8(k % 256), out=out)


def matches(arr: Any, k: int) -> bool:
    """``arr`` is exactly ``pattern(arr.shape, k)``."""
    return arr is not None and arr.dtype == np.uint8 and np.array_equal(arr, pattern(tuple(arr.shape), k))


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def _options(a: argparse.Namespace) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"dir": a.dir, "slots": a.slots, "full_policy": a.full_policy,
                            "publish_timeout_s": a.publish_timeout}
    if a.checksum:
        opts["checksum"] = True
    return opts


def publish(a: argparse.Namespace) -> None:
    import msight_fast
    shape = parse_shape(a.shape)
    bus = msight_fast.connect("shm", **_options(a))
    _say(event="ready")
    period = 1.0 / a.rate if a.rate > 0 else 0.0
    import threading
    pace = threading.Event()            # never set: its wait() paces the stream
    k, errors = 0, []
    while a.count == 0 or k < a.count:
        try:
            if a.mode == "loan":
                arr = bus.loan(a.topic, shape)
                pattern(shape, k + 1, out=arr)
            else:
                arr = pattern(shape, k + 1)
            bus.publish(a.topic, arr, meta={"k": k + 1})
            k += 1
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            errors.append(repr(e))
            if len(errors) > 100:
                break
        if period:
            pace.wait(period)
    _say(event="done", published=k, errors=errors, stats=dict(bus.stats()))
    if a.linger:
        sys.stdin.read()                # until the test closes our stdin
    bus.close()


def hold(a: argparse.Namespace) -> None:
    import msight_fast
    bus = msight_fast.connect("shm", **_options(a))
    sub = bus.subscribe(a.topic)
    _say(event="ready")
    frame = None
    got = 0
    while got < a.take:
        frame = sub.recv(timeout=0.5)
        if frame is None:
            continue
        got += 1
        k = int(frame.meta.get("k", frame.seq))
        _say(event="got", seq=frame.seq, ok=matches(frame.array, k))
    assert frame is not None
    _say(event="held", seq=frame.seq)
    for line in sys.stdin:              # recv is never called again: the frame stays held
        if line.strip() == "release":
            frame.release()
            _say(event="released")
    st = dict(sub.stats())
    bus.close()
    _say(event="done", stats=st)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=["pub", "hold"])
    p.add_argument("--dir", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--full-policy", default="drop")
    p.add_argument("--publish-timeout", type=float, default=5.0)
    p.add_argument("--checksum", action="store_true")
    p.add_argument("--count", type=int, default=10, help="frames to publish; 0: until killed")
    p.add_argument("--rate", type=float, default=0.0, help="frames per second; 0: as fast as it can")
    p.add_argument("--shape", default="1080x1920x3")
    p.add_argument("--mode", choices=["copy", "loan"], default="copy")
    p.add_argument("--linger", action="store_true", help="stay connected after the last frame until stdin closes")
    p.add_argument("--take", type=int, default=1, help="hold: keep the take-th frame received")
    a = p.parse_args()
    publish(a) if a.role == "pub" else hold(a)


if __name__ == "__main__":
    main()
