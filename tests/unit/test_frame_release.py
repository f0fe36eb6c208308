"""Frame.release() and ``with frame:`` over both codecs (the `wire` fixture).

A backend that lends its buffer (shared memory) hands decode() a "lease": an object that exports the
slot's bytes and has ``_msf_release()``. A decoded frame's release() calls it at most once per frame
(a second release() is a no-op); frames not made by decode() never call it, even when built from a
lease. The leases here are small Python classes that count their calls.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, List

import numpy as np
import pytest

from msight_fast import _impl, _pywire


class Lease(bytearray):
    """A lent buffer: bytes in a bytearray, release calls counted."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls = 0

    def _msf_release(self) -> None:
        self.calls += 1


class ArrayLease(np.ndarray):
    """A lent buffer as a numpy uint8 array subclass."""

    calls: int

    def _msf_release(self) -> None:
        self.calls += 1


def array_lease(data: bytes) -> ArrayLease:
    a = np.frombuffer(data, np.uint8).copy().view(ArrayLease)
    a.calls = 0
    return a


class FailingLease(Lease):
    def _msf_release(self) -> None:
        super()._msf_release()
        raise RuntimeError("slot already gone")


PIXELS = np.arange(24, dtype="<u2").reshape(4, 6)


def encoded(wire: ModuleType) -> bytes:
    out: bytes = wire.encode(wire.Frame.from_array(PIXELS, sensor_name="cam", meta={"k": 1}))
    return out


def test_release_calls_the_lease_once(wire: ModuleType) -> None:
    lease = Lease(encoded(wire))
    f = wire.decode(lease)
    assert np.array_equal(f.array, PIXELS)
    # the premise of an early give-back: the array is a view of the lent bytes, not a copy
    assert np.shares_memory(f.array, np.frombuffer(lease, np.uint8))
    assert lease.calls == 0
    assert f.release() is None
    assert lease.calls == 1
    f.release()                           # idempotent: the lease is not called again for this frame
    assert lease.calls == 1


def test_release_through_a_numpy_lease(wire: ModuleType) -> None:
    lease = array_lease(encoded(wire))
    f = wire.decode(lease)
    assert np.array_equal(f.array, PIXELS)
    f.release()
    f.release()
    assert lease.calls == 1


def test_release_of_a_bytes_frame(wire: ModuleType) -> None:
    lease = Lease(wire.encode(wire.Frame.from_bytes(b"jpeg bytes", sensor_name="cam", encoding="jpeg")))
    f = wire.decode(lease)
    assert bytes(f.data) == b"jpeg bytes"
    f.release()
    assert lease.calls == 1


def test_with_releases_at_exit(wire: ModuleType) -> None:
    lease = Lease(encoded(wire))
    with wire.decode(lease) as f:
        assert type(f) is wire.Frame
        assert lease.calls == 0
        assert int(f.array.sum()) == int(PIXELS.sum())
    assert lease.calls == 1
    f.release()
    assert lease.calls == 1


def test_with_releases_when_the_block_raises(wire: ModuleType) -> None:
    lease = Lease(encoded(wire))
    with pytest.raises(KeyError, match="boom"):   # not swallowed by __exit__
        with wire.decode(lease):
            raise KeyError("boom")
    assert lease.calls == 1


def test_exit_does_not_suppress(wire: ModuleType) -> None:
    f = wire.decode(Lease(encoded(wire)))
    assert not f.__exit__(ValueError, ValueError("x"), None)


def test_decoded_from_a_memoryview_of_the_lease(wire: ModuleType) -> None:
    lease = Lease(encoded(wire))
    f = wire.decode(memoryview(lease))
    f.release()
    assert lease.calls == 1


def test_decoded_from_part_of_a_larger_slot(wire: ModuleType) -> None:
    # a shared-memory slot is larger than the frame in it: decode gets a slice of a view of the slot
    data = encoded(wire)
    lease = Lease(data + bytes(4096))
    f = wire.decode(memoryview(lease)[:len(data)])
    assert np.array_equal(f.array, PIXELS)
    f.release()
    assert lease.calls == 1


def test_each_frame_of_one_lease_releases_it(wire: ModuleType) -> None:
    # the count is per frame: the lease itself must be idempotent (the shared-memory one is)
    lease = Lease(encoded(wire))
    a, b = wire.decode(lease), wire.decode(lease)
    a.release()
    b.release()
    a.release()
    assert lease.calls == 2


def test_a_failing_lease_raises_once(wire: ModuleType) -> None:
    lease = FailingLease(encoded(wire))
    f = wire.decode(lease)
    with pytest.raises(RuntimeError, match="slot already gone"):
        f.release()
    f.release()                           # already given back: not called a second time
    assert lease.calls == 1


def test_frames_not_decoded_do_nothing(wire: ModuleType) -> None:
    data = encoded(wire)
    frames = [wire.Frame(),
              wire.Frame.from_array(PIXELS, sensor_name="cam"),
              wire.Frame.from_bytes(b"abc", sensor_name="cam", encoding="raw"),
              wire.decode(data),
              wire.decode(bytearray(data)),
              wire.decode(memoryview(data))]
    for f in frames:
        f.release()
        f.release()
        with f as same:
            assert same is f
    assert np.array_equal(frames[3].array, PIXELS)   # a frame without a lease stays usable


def test_a_frame_built_from_a_lease_does_not_release_it(wire: ModuleType) -> None:
    # only decoded frames own leases: building a frame from one (to send it on) gives nothing back
    lease = Lease(encoded(wire))
    alease = array_lease(encoded(wire))
    for f in (wire.Frame.from_bytes(lease, sensor_name="cam", encoding="raw"),
              wire.Frame.from_bytes(memoryview(lease), sensor_name="cam", encoding="raw"),
              wire.Frame.from_array(alease, sensor_name="cam")):
        f.release()
        with f:
            pass
    assert lease.calls == 0 and alease.calls == 0


def test_a_decoded_frame_re_encodes_before_release(wire: ModuleType) -> None:
    lease = Lease(encoded(wire))
    with wire.decode(lease) as f:
        again = wire.encode(f)
    assert again == bytes(lease)
    assert lease.calls == 1


def _script(wire: ModuleType) -> List[Any]:
    """Everything the tests above observe, as one list: what release and ``with`` did."""
    out: List[Any] = []
    data = encoded(wire)
    for make in (Lease, array_lease):
        lease = make(data)
        f = wire.decode(lease)
        out += [f.release(), lease.calls, f.release(), lease.calls]
        with wire.decode(memoryview(lease)) as g:
            out.append(lease.calls)
        out += [g.__exit__(None, None, None), lease.calls]
    failing = FailingLease(data)
    f = wire.decode(failing)
    for _ in range(2):
        try:
            f.release()
            out.append("ok")
        except RuntimeError as e:
            out.append(repr(e))
    out.append(failing.calls)
    built = Lease(data)
    wire.Frame.from_bytes(built, sensor_name="s", encoding="raw").release()
    out.append(built.calls)
    return out


@pytest.mark.skipif(not _impl.HAS_EXTENSIONS, reason="compares the compiled core with the twin, and the "
                    "compiled core is not loaded (MSIGHT_FAST_NO_EXTENSIONS=1 or a failed build)")
def test_both_codecs_release_alike() -> None:
    got: Dict[str, List[Any]] = {"cython": _script(_impl.impl), "python": _script(_pywire)}
    assert got["cython"] == got["python"]
    assert got["python"] == [None, 1, None, 1, 1, None, 2] * 2 + ["RuntimeError('slot already gone')", "ok", 1, 0]
