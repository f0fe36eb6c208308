"""The compiled ``SmallLane``: ``Bus.publish``'s whole publish of a small frame into its topic's
open batch, in one call. What it takes must be what the usual way (``stamp_parts``, then the
batch) would have written; what it does not take it must leave untouched, so the usual way
numbers, counts and refuses it as before. The transport here is the memory backend with a batch
state of Kafka's shape (the lane's integration with Kafka's own is in
tests/integration/test_kafka_batch.py)."""
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from msight_fast import BackendUnavailable, FrameError, FrameTooLarge, PublishError, registry
from msight_fast import _schema as S
from msight_fast.backends.memory import MemoryTransport
from msight_fast.bus import Bus
from msight_fast.codec import BatchWriter, Frame, SmallLane, encode

from ..helpers import held_by_another_thread

pytestmark = pytest.mark.skipif(SmallLane is None, reason="the compiled core is not built")

KEY = b"k" * 8
SMALL = 2048
MIN_FRAME = 128


class _Batch(BatchWriter):  # type: ignore[misc,valid-type]
    __slots__ = ("key",)


class _Laned(MemoryTransport):
    """The memory backend with a Kafka-shaped batch state for the compiled lane."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.small_frame_bytes = SMALL
        self._limits: Dict[str, int] = {}
        self._batches: Dict[Tuple[str, int], Any] = {}
        self._blk = threading.Condition()
        self._last_key: Tuple[int, Optional[bytes]] = (0, None)
        self._broken: Optional[str] = None
        self.sent: List[int] = []                  # the count of each batch the lane sent
        self.send_error: Optional[Exception] = None
        self.usual = 0                             # frames that went the usual way (send_small)

    def send_small(self, *args: Any) -> None:
        self.usual += 1
        super().send_small(*args)

    def small_lane(self, bus: Any) -> Any:
        assert SmallLane is not None
        return SmallLane(bus, self, limits=self._limits, batches=self._batches, blk=self._blk, send=self._send,
                         cap=min(SMALL, bus.config.max_frame_bytes), batch_max=1 << 20, min_frame=MIN_FRAME)

    def _send(self, b: Any, deadline: float) -> None:
        assert self._blk._is_owned()                # type: ignore[attr-defined]
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(b.count)

    def open_batch(self, bus: Bus, topic: str, limit: int = 1 << 20) -> Any:
        """A batch open for ``topic``, under ``bus``'s key, as Kafka's first frame leaves it."""
        self._limits[topic] = limit
        self._last_key = (bus.publisher_id, KEY)
        b = _Batch()
        b.key = KEY
        self._batches[(topic, -1)] = b
        return b


def _bus(name: str, **over: Any) -> Tuple[Bus, _Laned]:
    cfg = registry.load_config("memory", dict({"name": name}, **over))
    t = _Laned(cfg)
    return Bus(t, cfg), t


def _free(bus: Bus, t: _Laned) -> None:
    """Both locks were let go."""
    assert bus._lock.acquire(False)
    bus._lock.release()
    assert not t._blk._is_owned()                  # type: ignore[attr-defined]  (an RLock)


@pytest.mark.parametrize("checksum", [False, True])
def test_a_small_frame_goes_into_the_open_batch_as_the_usual_encode_would_write_it(checksum: bool) -> None:
    bus, t = _bus(f"lane-takes-{checksum}", checksum=checksum)
    b = t.open_batch(bus, "cam")
    payload = bytes(range(200))
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    f1 = bus.publish("cam", payload, encoding="raw", device_name="dev", capture_ts_ns=7)
    f2 = bus.publish("cam", arr, sensor_name="lidar", meta={"a": 1})
    assert (f1.seq, f2.seq) == (1, 2) and f1.publisher_id == f2.publisher_id == bus.publisher_id
    assert f1.publish_ts_ns != 0 and f2.publish_ts_ns != 0          # stamped (a new frame has 0)
    assert f1.capture_ts_ns == 7 and f1.device_name == "dev" and t.usual == 0
    assert b.count == 2
    # the stamped frames, encoded the usual way, are the bytes the lane wrote
    assert b.frames() == [encode(f1, checksum=checksum), encode(f2, checksum=checksum)]
    assert bus.published == 2 and bus._seq["cam"] == 2 and t.sent == []
    assert bus.stats()["publish_errors"] == 0
    _free(bus, t)


def _usual(bus: Bus, t: _Laned, case: str) -> Tuple[str, Any]:
    """Set up ``case``, one the lane must pass on; returns the topic and what to publish."""
    topic = "cam"
    b = t.open_batch(bus, topic)
    obj: Any = b"x" * 100
    if case == "a ready Frame":
        obj = Frame.from_bytes(b"x" * 100, sensor_name="cam", encoding="bytes")
    elif case == "a payload of small_frame_bytes":
        obj = b"x" * SMALL
    elif case == "an array of small_frame_bytes":
        obj = np.zeros(SMALL // 8, np.float64)
    elif case == "no limit known":
        del t._limits[topic]
    elif case == "a broken producer":
        t._broken = "gone"
    elif case == "another publisher's key":
        t._last_key = (bus.publisher_id + 1, KEY)
    elif case == "no batch open":
        del t._batches[(topic, -1)]
    elif case == "another key":
        b.key = b"other"
    elif case == "no room":
        t._limits[topic] = 200
    elif case == "over max_frame_bytes":
        obj = b"x" * 1100                    # max_frame_bytes 1024 below, under small_frame_bytes
    else:
        raise AssertionError(case)
    return topic, obj


CASES = ["a ready Frame", "a payload of small_frame_bytes", "an array of small_frame_bytes", "no limit known",
         "a broken producer", "another publisher's key", "no batch open", "another key", "no room"]


@pytest.mark.parametrize("case", CASES)
def test_what_it_does_not_take_goes_the_usual_way_untouched(case: str) -> None:
    bus, t = _bus(f"lane-passes-{case}")
    topic, obj = _usual(bus, t, case)
    b = t._batches.get((topic, -1))
    sub = bus.subscribe(topic)
    if len(S._id_pool) < 4:
        S._id_pool.extend(S.new_frame_id() for _ in range(4))
    ids = len(S._id_pool)
    f = bus.publish(topic, obj)
    assert f.seq == 1 and bus._seq[topic] == 1 and bus.published == 1    # numbered and counted once
    # built once: a frame the lane built and did not take is the one the usual way publishes
    assert len(S._id_pool) == ids - (0 if case == "a ready Frame" else 1)
    assert bus.publish_errors == 0 and t.usual == (0 if "of small_frame_bytes" in case else 1)   # else send()
    assert b is None or b.count == 0
    got = sub.recv(5)                                     # the memory backend carried it the usual way
    assert got is not None and got.seq == 1 and got.nbytes == f.nbytes and t.sent == []
    _free(bus, t)


def test_a_frame_over_max_frame_bytes_is_still_refused_and_leaves_no_gap() -> None:
    bus, t = _bus("lane-too-large", max_frame_bytes=1024)
    topic, obj = _usual(bus, t, "over max_frame_bytes")
    with pytest.raises(FrameTooLarge):
        bus.publish(topic, obj)
    assert t._batches[(topic, -1)].count == 0 and topic not in bus._seq
    assert bus.publish(topic, b"x" * 10).seq == 1 and t._batches[(topic, -1)].count == 1
    _free(bus, t)


@pytest.mark.parametrize("held", ["the Bus's lock", "the batch lock"])
def test_a_busy_lock_is_never_waited_for(held: str) -> None:
    bus, t = _bus(f"lane-busy-{held}")
    b = t.open_batch(bus, "cam")
    lock: Any = bus._lock if held == "the Bus's lock" else t._blk
    with held_by_another_thread(lock):
        ids = len(S._id_pool)
        assert bus._fast("cam", b"x" * 10, {}) is None    # type: ignore[attr-defined]
        assert len(S._id_pool) == ids                     # not even built
    assert b.count == 0 and "cam" not in bus._seq and bus.published == 0
    _free(bus, t)


def test_a_closed_bus_a_bad_topic_and_a_spent_seq_are_refused_as_before() -> None:
    bus, t = _bus("lane-refused")
    b = t.open_batch(bus, "cam")
    for topic in ("", b"cam"):
        with pytest.raises(ValueError, match="non-empty str"):
            bus.publish(topic, b"x")                    # type: ignore[arg-type]
    bus._seq["cam"] = (1 << 64) - 1
    with pytest.raises(OverflowError):                   # as stamp_parts raises it on the usual way
        bus.publish("cam", b"x")
    assert b.count == 0 and bus._seq["cam"] == (1 << 64) - 1
    bus.close()
    with pytest.raises(ValueError, match="closed"):
        bus.publish("cam", b"x")
    assert b.count == 0


def test_bad_fields_raise_as_on_the_usual_way() -> None:
    bus, t = _bus("lane-fields")
    b = t.open_batch(bus, "cam")
    with pytest.raises(FrameError):
        bus.publish("cam", b"x", sensor_name="\ud800")
    with pytest.raises(TypeError):
        bus.publish("cam", b"x", bogus=1)
    # refused as the usual way refuses a frame it cannot build: not numbered, not counted
    assert b.count == 0 and bus.published == 0 and bus.publish_errors == 0 and "cam" not in bus._seq
    _free(bus, t)


def test_a_full_batch_goes_out_and_a_failed_send_is_the_callers_error() -> None:
    bus, t = _bus("lane-full")
    # room for one frame of 100 bytes (228 bytes encoded, 232 padded, and the batch's header and
    # index), not for another
    b = t.open_batch(bus, "cam", limit=24 + 8 + 192 + MIN_FRAME)
    bus.publish("cam", b"x" * 100)
    assert t.sent == [1] and bus.published == 1           # full once it had the frame: sent
    t._batches[("cam", -1)] = b
    b.clear()
    t.send_error = BackendUnavailable("no room in the producer")
    assert bus.publish("cam", b"x" * 100).seq == 2        # in the batch, which goes once there is room
    assert bus.published == 2 and bus._seq["cam"] == 2 and b.count == 1
    b.clear()
    t.send_error = PublishError("refused by the test")
    with pytest.raises(PublishError, match="refused by the test"):
        bus.publish("cam", b"x" * 100)
    assert bus.published == 2 and bus._seq["cam"] == 2 and bus.publish_errors == 1
    b.clear()
    t.send_error = RuntimeError("a bug")                 # not the library's error: passed on as it is
    with pytest.raises(RuntimeError, match="a bug"):
        bus.publish("cam", b"x" * 100)
    assert bus.published == 2 and bus._seq["cam"] == 2 and bus.publish_errors == 1
    _free(bus, t)


def test_threads_publishing_through_the_lane_lose_and_repeat_nothing() -> None:
    bus, t = _bus("lane-threads")
    b = t.open_batch(bus, "cam", limit=1 << 22)
    per, threads = 400, 4
    seen: List[List[int]] = [[] for _ in range(threads)]

    def run(i: int) -> None:
        for _ in range(per):
            seen[i].append(bus.publish("cam", bytes([i]) * 16).seq)
    ths = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert not any(th.is_alive() for th in ths)
    assert all(s == sorted(s) for s in seen)
    assert sorted(x for s in seen for x in s) == list(range(1, per * threads + 1))
    # a frame that found a lock busy went the usual way: each went one way, once
    assert b.count > 0 and b.count + t.usual == per * threads == bus.published
    _free(bus, t)


def test_a_lane_is_initialised_once() -> None:
    bus, t = _bus("lane-once")
    with pytest.raises(TypeError, match="once"):
        bus._fast.__init__(bus, t, limits={}, batches={}, blk=t._blk, send=t._send, cap=1,  # type: ignore[attr-defined]
                           batch_max=1, min_frame=1)
