"""The compiled ``RecvLane``: ``Subscription.recv``'s common case on Kafka, a decoded batch's next
frame counted and handed over in one call. It must hand exactly what the usual way (the
source's ``next``, then ``recv``'s own steps) would, count it the same, and leave the batch's
last frame, which carries the batch's token, and every other case to the usual way. The source
here is a stub with KafkaSource's cursor; the lane on Kafka itself runs in every Kafka test of
tests/integration."""
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from msight_fast import connect
from msight_fast.backends.base import Source
from msight_fast.codec import BatchCursor, Frame, RecvLane, decode, stamp_parts

from ..helpers import drain, held_by_another_thread

pytestmark = pytest.mark.skipif(RecvLane is None, reason="the compiled core is not built")

PID = 77


def _frames(first: int, n: int) -> List[Any]:
    out: List[Any] = []
    for seq in range(first, first + n):
        f = Frame.from_bytes(bytes([seq % 256]) * 40, sensor_name="cam", encoding="bytes")
        out.append(decode(b"".join(bytes(x) for x in stamp_parts(f, seq, PID))))
    return out


class _Batches(Source):
    """Batches of decoded frames, handed as KafkaSource hands them: the token with the last."""

    def __init__(self, batches: Iterator[List[Any]]) -> None:
        self.cur = BatchCursor()
        self._gen = self._local_gen = 0
        self.batches = batches
        self.handed_tokens: List[Any] = []
        self.nexts = 0
        self.tok = 0

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        self.nexts += 1
        c = self.cur
        if c.i >= len(c.frames):
            got = next(self.batches, None)
            if got is None:
                return None
            self.tok += 1
            c.frames, c.i = got, 0
        f = c.frames[c.i]
        c.i += 1
        return f, (f"batch {self.tok}" if c.i == len(c.frames) else None)

    def handed(self, frame: Any, tokens: List[Any]) -> None:
        self.handed_tokens.extend(tokens)

    def recv_lane(self, sub: Any) -> Any:
        assert RecvLane is not None
        return RecvLane(sub, self, self.cur)


def _sub(name: str, batches: List[List[Any]], lane: bool = True) -> Tuple[Any, _Batches]:
    bus = connect("memory", name=name)
    sub = bus.subscribe("cam")
    src = _Batches(iter(batches))
    sub._src = src
    sub._fast = src.recv_lane(sub) if lane else None
    return sub, src


def test_the_lane_hands_and_counts_what_the_usual_way_does() -> None:
    batches = [_frames(1, 5), _frames(6, 1), _frames(7, 3)]
    fast, fsrc = _sub("recv-lane-on", [list(b) for b in batches])
    slow, ssrc = _sub("recv-lane-off", [list(b) for b in batches], lane=False)
    got_fast, got_slow = drain(fast), drain(slow)
    assert [f.seq for f in got_fast] == [f.seq for f in got_slow] == list(range(1, 10))
    assert all(a is b for a, b in zip(got_fast, [f for b in batches for f in b]))   # the very frames
    # each batch's token was handed once, with its last frame, either way
    assert fsrc.handed_tokens == ssrc.handed_tokens == ["batch 1", "batch 2", "batch 3"]
    # the lane took each batch's frames between its first (which the usual way's next opens) and
    # its last: the source was asked for 2 + 1 + 2 frames, and the empty answer; without it, 9 + 1
    assert (fsrc.nexts, ssrc.nexts) == (6, 10)
    a, b = fast.stats(), slow.stats()
    for k in ("received", "bytes", "gaps", "duplicates", "publishers", "rejected"):
        assert a[k] == b[k], k
    assert a["received"] == 9 and a["gaps"] == 0 and a["latency_p50_ns"] is not None
    assert fast._lat._i == slow._lat._i == 9                   # a latency for every frame, either way


def _lane_case(case: str) -> Tuple[Any, _Batches]:
    sub, src = _sub(f"recv-lane-{case}", [_frames(1, 4)])
    assert sub.recv(0).seq == 1                 # a batch under way: the lane would take the next
    if case == "tokens held":
        sub._tokens[(0, 0, 0, 0, 0, 0)] = ["held"]
    elif case == "a rebalance to apply":
        src._gen += 1
    elif case == "a frame left as bytes":
        src.cur.frames[1] = b"not a frame"
    elif case == "closed":
        sub._closed = True
    else:
        raise AssertionError(case)
    return sub, src


@pytest.mark.parametrize("case", ["tokens held", "a rebalance to apply", "a frame left as bytes", "closed"])
def test_the_lane_takes_nothing_where_the_usual_way_decides(case: str) -> None:
    sub, src = _lane_case(case)
    before = (src.cur.i, sub.received)
    assert sub._fast() is None
    assert (src.cur.i, sub.received) == before


def test_a_busy_subscription_is_never_waited_for() -> None:
    sub, src = _sub("recv-lane-busy", [_frames(1, 4)])
    assert sub.recv(0).seq == 1
    with held_by_another_thread(sub._rlock):
        assert sub._fast() is None and src.cur.i == 1
    assert sub.recv(0).seq == 2 and sub.received == 2


def test_a_frame_left_as_bytes_is_rejected_by_the_usual_way() -> None:
    sub, src = _lane_case("a frame left as bytes")
    got = drain(sub)
    assert [f.seq for f in got] == [3, 4] and sub.rejected == 1 and src.handed_tokens == ["batch 1"]


def test_a_lane_is_initialised_once() -> None:
    sub, src = _sub("recv-lane-once", [])
    with pytest.raises(TypeError, match="once"):
        sub._fast.__init__(sub, src, src.cur)
