"""Kafka subscriptions that start at the beginning, the end, an offset or a time (``start=``),
on the session's tansu broker; and the brokers that keep nothing refusing offset/time starts.

Every topic here gets its frames from one Bus, so they all land on one partition (the key is the
publisher id) at offsets 0, 1, ...: an offset start k gives exactly frames k.. (seqs k+1..), and
the other partitions are empty. Ten frames are published in two record batches of five with a
time between them, ``split``: frames 1-5 carry Kafka timestamps before it, 6-10 at or after it.
"""
from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any, List, Tuple

import pytest

import msight_fast
from msight_fast.backends.base import Start
from msight_fast.errors import ConfigError

from .conftest import collect, wait_for

pytestmark = [pytest.mark.integration]

UTC = dt.timezone.utc


@pytest.fixture
def kafka(kafka: Any) -> Any:
    """The conftest's, with batching off: one Kafka message per frame, so an offset names a frame
    (batched, an offset names a batch: docs/wire-format.md 2a)."""
    def make(**opts: Any) -> msight_fast.Bus:
        return kafka(**{"batch_max_frame_bytes": 0, **opts})
    return make


def _publish(bus: msight_fast.Bus, topic: str, n: int) -> None:
    for _ in range(n):
        bus.publish(topic, b"x" * 100)
    bus.flush(30)                              # acknowledged: in the broker's log, timestamps given


def _ten_frames(kafka: Any, topic: str) -> Tuple[msight_fast.Bus, int]:
    """Publish frames 1-5, then 6-10 once the clock is surely past ``split`` (ns); returns the
    publishing Bus and ``split``. Kafka timestamps are the producer's ms, floored: frames 1-5,
    acknowledged before ``split`` was taken, are below it, and 6-10, produced once the clock
    passed the ms that ``split`` rounds up to, are at or after it."""
    pub = kafka()
    _publish(pub, topic, 5)
    split = time.time_ns() + 1                 # after every timestamp of the first five
    up = -(-split // 1_000_000) * 1_000_000    # the ms a start at split looks for, in ns
    wait_for(lambda: time.time_ns() >= up, "the clock to pass the split", timeout=5, interval=0.001)
    _publish(pub, topic, 5)
    return pub, split


def _seqs(sub: msight_fast.Subscription, n: int) -> List[int]:
    """The seqs of the next n frames, then checks that no other frame follows for a while."""
    got = [f.seq for f in collect(sub, n, timeout=60)]
    extra = sub.recv(timeout=2)
    assert extra is None, f"got {got} and then seq {extra.seq}"
    return got


def test_an_offset_start_gives_exactly_the_frames_from_that_offset(kafka: Any, topic: str) -> None:
    _ten_frames(kafka, topic)
    bus = kafka()
    for k in (0, 3, 5, 7, 9):
        with bus.subscribe(topic, start=Start.offset(k)) as sub:
            assert _seqs(sub, 10 - k) == list(range(k + 1, 11)), k
    with bus.subscribe(topic, start=4) as sub:           # a plain int is an offset
        assert _seqs(sub, 6) == list(range(5, 11))


def test_a_time_start_gives_exactly_the_frames_at_or_after_it(kafka: Any, topic: str) -> None:
    _, split = _ten_frames(kafka, topic)
    bus = kafka()
    with bus.subscribe(topic, start=Start.time(split)) as sub:
        assert _seqs(sub, 5) == list(range(6, 11))
    # a datetime (microseconds) at the same split: its ms rounds up to the same one
    aware = dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=-(-split // 1000))
    with bus.subscribe(topic, start=aware) as sub:
        assert _seqs(sub, 5) == list(range(6, 11))
    with bus.subscribe(topic, start=aware.astimezone(dt.timezone(dt.timedelta(hours=-5)))) as sub:
        assert _seqs(sub, 5) == list(range(6, 11))
    with bus.subscribe(topic, start=Start.time(0)) as sub:
        assert _seqs(sub, 10) == list(range(1, 11))


def test_a_time_inside_one_record_batch_is_exact(kafka: Any, topic: str) -> None:
    """All ten frames in one record batch (a long linger, no flush between): a broker that looks
    times up per batch (tansu) answers its first offset; the older five are skipped, and counted."""
    pub = kafka(linger_ms=3000)
    for _ in range(5):
        pub.publish(topic, b"x" * 100)     # stamped now, sent with the next five
    split = time.time_ns() + 1
    up = -(-split // 1_000_000) * 1_000_000
    wait_for(lambda: time.time_ns() >= up, "the clock to pass the split", timeout=5, interval=0.001)
    _publish(pub, topic, 5)
    with kafka().subscribe(topic, start=Start.time(split)) as sub:
        assert _seqs(sub, 5) == list(range(6, 11))
        skipped = sub._src.start_skipped                 # type: ignore[attr-defined]  # KafkaSource's count
        assert skipped in (0, 5), skipped                # 5 where the broker answered the batch's start


def test_the_beginning_gives_every_frame(kafka: Any, topic: str) -> None:
    _ten_frames(kafka, topic)
    bus = kafka()
    with bus.subscribe(topic, start="beginning") as sub:
        assert _seqs(sub, 10) == list(range(1, 11))
    with bus.subscribe(topic, start=Start.beginning()) as sub:
        assert _seqs(sub, 10) == list(range(1, 11))


def test_the_end_a_later_time_and_a_far_offset_give_only_what_follows(kafka: Any, topic: str) -> None:
    """Nothing already in the log, even the rest of the last record batch (tansu reports the log's
    end by that batch's base offset + 1) or messages older than a time the broker's lookup
    answered with an early offset (tansu answers 0 where no message is that recent)."""
    pub, _ = _ten_frames(kafka, topic)
    bus = kafka()
    after = time.time_ns() + 1
    subs = [bus.subscribe(topic, start="end"), bus.subscribe(topic, start=Start.end()),
            bus.subscribe(topic, start=Start.offset(10)), bus.subscribe(topic, start=Start.offset(10**9)),
            bus.subscribe(topic, start=Start.time(after)), bus.subscribe(topic)]
    up = -(-after // 1_000_000) * 1_000_000
    wait_for(lambda: time.time_ns() >= up, "the clock to pass the start", timeout=5, interval=0.001)
    _publish(pub, topic, 3)
    for i, sub in enumerate(subs):
        assert _seqs(sub, 3) == [11, 12, 13], i
    skipped = subs[4]._src.start_skipped                 # type: ignore[attr-defined]  # KafkaSource's count
    assert skipped in (0, 10), skipped                   # 10 where the broker's time lookup said 0


def test_a_group_with_committed_offsets_obeys_start_on_its_first_assignment(kafka: Any, topic: str) -> None:
    pub, split = _ten_frames(kafka, topic)
    group = f"g_{uuid.uuid4().hex[:8]}"
    bus = kafka()
    with bus.subscribe(topic, group_id=group, start="beginning") as first:
        assert _seqs(first, 10) == list(range(1, 11))
        first.ack()                                      # the group has committed offset 10
    with bus.subscribe(topic, group_id=group, start=Start.offset(3)) as sub:
        assert _seqs(sub, 7) == list(range(4, 11))
        sub.ack()
    with bus.subscribe(topic, group_id=group, start=Start.time(split)) as sub:
        assert _seqs(sub, 5) == list(range(6, 11))
        sub.ack()
    # without a start the group resumes where it was (so the starts above did override it)
    with bus.subscribe(topic, group_id=group) as resumed:
        _publish(pub, topic, 1)
        assert _seqs(resumed, 1) == [11]
    # and "beginning" is from_beginning: it starts a group at the beginning, but a group that
    # has committed offsets resumes there (what the MSight drop-in's members rely on)
    with bus.subscribe(topic, group_id=group, start="beginning") as again:
        _publish(pub, topic, 1)
        assert _seqs(again, 1) == [12]


def test_a_resolved_start_is_committed_at_once(kafka: Any, topic: str) -> None:
    """A member that dies before its first commit leaves the group at its start, not at the end
    of the log: the next member (no start) reads from there."""
    _ten_frames(kafka, topic)
    group = f"g_{uuid.uuid4().hex[:8]}"
    bus = kafka()
    dead = bus.subscribe(topic, group_id=group, start=Start.offset(6))
    dead.close()                                         # took nothing, committed nothing itself
    with bus.subscribe(topic, group_id=group) as next_member:
        assert _seqs(next_member, 4) == [7, 8, 9, 10]


def test_a_start_applies_to_partitions_a_member_gets_after_its_first_assignment(kafka: Any, topic: str) -> None:
    """A member that joins a group second may first get none of the partitions holding frames (or
    none at all); its start applies to each partition the first time it gets one, so once the
    other member leaves it reads the frames from its start, not from the group's committed offset
    (the end, where the first member began)."""
    _ten_frames(kafka, topic)
    group = f"g_{uuid.uuid4().hex[:8]}"
    bus = kafka()
    first = bus.subscribe(topic, group_id=group)         # live: commits the end of every partition
    second = bus.subscribe(topic, group_id=group, start=Start.offset(7))
    first.close()                                        # every partition goes to the second member
    try:
        assert _seqs(second, 3) == [8, 9, 10]
    finally:
        second.close()


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_brokers_that_keep_nothing_refuse_offset_and_time_starts(broker_pool: Any, topic: str, kind: str) -> None:
    info = broker_pool(kind)
    with msight_fast.connect(kind, **info.options) as bus:
        for start in (0, Start.offset(3), Start.time(time.time_ns()), dt.datetime.now(UTC), "beginning"):
            with pytest.raises(ConfigError):
                bus.subscribe(topic, start=start)
        # "end" is what they do anyway: a live subscription
        with bus.subscribe(topic, start="end") as sub:
            wait_for(lambda: (bus.publish(topic, b"x"), sub.recv(timeout=0.5))[1] is not None,
                     "a frame to the live subscription", timeout=30)
