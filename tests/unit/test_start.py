"""Where a subscription starts (``start=``): the Bus's normalisation, and the memory backend's
retained log read from the beginning, the end, an offset or a time."""
from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any, Iterator, List

import pytest

import msight_fast
from msight_fast import registry
from msight_fast.backends.base import Start
from msight_fast.bus import _start
from msight_fast.errors import ConfigError

from ..contract import collect
from ..helpers import wait_for

UTC = dt.timezone.utc


# -- Bus._start: what start= may be
@pytest.mark.parametrize("given, expected", [
    ("beginning", Start.beginning()),
    ("end", Start.end()),
    (0, Start.offset(0)),
    (12345, Start.offset(12345)),
    (Start.time(7), Start.time(7)),
    (Start.offset(3), Start.offset(3)),
    (Start.end(), Start.end()),
])
def test_start_is_normalised(given: Any, expected: Start) -> None:
    assert _start(given, False) == expected


def test_no_start_is_live_or_the_beginning() -> None:
    assert _start(None, False) is None
    assert _start(None, True) == Start.beginning()


def test_an_aware_datetime_is_its_ns_since_the_epoch_to_the_microsecond() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert _start(when, False) == Start.time(1714979289_123456_000)
    # the same instant in another zone is the same start
    east = when.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert _start(east, False) == Start.time(1714979289_123456_000)
    assert _start(dt.datetime(1970, 1, 1, tzinfo=UTC), False) == Start.time(0)


@pytest.mark.parametrize("bad", [
    dt.datetime(2024, 5, 6, 7, 8, 9),          # naive: which zone?
    True, False,                               # a bool is not an offset
    -1, Start.offset(-5), Start.time(-1),      # before the first offset / the epoch
    1 << 63, Start.offset(1 << 63),            # beyond Kafka's int64 offsets
    dt.datetime(1969, 12, 31, 23, 59, tzinfo=UTC),
    "latest", "", 1.5, b"end", [0],
    Start("sometime", 0),                      # type: ignore[arg-type]  # a kind Start does not know
])
def test_what_cannot_be_a_start_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError):
        _start(bad, False)


@pytest.mark.parametrize("start", ["beginning", "end", 0, Start.end()])
def test_start_and_from_beginning_together_are_a_config_error(start: Any) -> None:
    with pytest.raises(ConfigError):
        _start(start, True)


def test_only_the_persistent_backends_take_an_offset_or_a_time() -> None:
    """The Bus refuses offset/time starts where ``persistence`` is False (the refusal itself, on
    real redis and NATS brokers, is in tests/integration/test_kafka_seek.py)."""
    assert registry.capabilities("redis").persistence is False
    assert registry.capabilities("nats").persistence is False
    assert registry.capabilities("kafka").persistence is True
    assert registry.capabilities("memory").persistence is True


# -- the memory backend
@pytest.fixture
def make_bus() -> Iterator[Any]:
    """connect("memory") to a broker of this test's own; every Bus made is closed after the test."""
    name, made = f"test-{uuid.uuid4().hex}", []

    def make(**opts: Any) -> msight_fast.Bus:
        bus = msight_fast.connect("memory", name=name, **opts)
        made.append(bus)
        return bus

    yield make
    for b in made:
        b.close()


@pytest.fixture
def topic() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def _seqs(sub: Any, n: int) -> List[int]:
    """The seqs of the next n frames, then checks that nothing else is queued."""
    got = [f.seq for f in collect(sub, n, timeout=5)]
    assert sub.recv(timeout=0.05) is None, "more frames than expected"
    return got


def _after_now() -> int:
    """A time.time_ns() value later than every frame logged so far and earlier than every frame
    logged after this returns (waits out a clock that does not move between two readings)."""
    before = time.time_ns()
    wait_for(lambda: time.time_ns() > before, "the clock to move on", timeout=5, interval=0.001)
    split = time.time_ns()
    wait_for(lambda: time.time_ns() > split, "the clock to move on", timeout=5, interval=0.001)
    return split


def test_memory_starts_at_the_beginning_end_offset_and_time(make_bus: Any, topic: str) -> None:
    pub = make_bus()
    for i in range(5):
        pub.publish(topic, b"a%d" % i)
    split = _after_now()
    for i in range(5):
        pub.publish(topic, b"b%d" % i)
    bus = make_bus()
    assert _seqs(bus.subscribe(topic, start="beginning"), 10) == list(range(1, 11))
    assert _seqs(bus.subscribe(topic, from_beginning=True), 10) == list(range(1, 11))
    assert _seqs(bus.subscribe(topic, start=0), 10) == list(range(1, 11))
    assert _seqs(bus.subscribe(topic, start=Start.offset(3)), 7) == list(range(4, 11))
    assert _seqs(bus.subscribe(topic, start=9), 1) == [10]
    assert _seqs(bus.subscribe(topic, start=Start.time(split)), 5) == list(range(6, 11))
    aware = dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=split // 1000 + 1)
    assert _seqs(bus.subscribe(topic, start=aware), 5) == list(range(6, 11))
    assert _seqs(bus.subscribe(topic, start=Start.time(0)), 10) == list(range(1, 11))

    # what starts at the end, past the log, or after the last frame's time gets only what follows
    late = [bus.subscribe(topic, start="end"), bus.subscribe(topic, start=Start.offset(10)),
            bus.subscribe(topic, start=Start.offset(10**6)), bus.subscribe(topic, start=Start.time(_after_now())),
            bus.subscribe(topic)]
    pub.publish(topic, b"new")
    for sub in late:
        assert _seqs(sub, 1) == [11]


def test_memory_offsets_count_from_the_first_frame_ever_published(make_bus: Any, topic: str) -> None:
    """Trimming the retained log keeps offsets where they were; an offset before the window
    starts at the window's first frame."""
    pub = make_bus(retain_bytes=4000)
    for _ in range(20):
        pub.publish(topic, b"x" * 900)
    bus = make_bus()
    window = [f.seq for f in collect(bus.subscribe(topic, start="beginning"), 20, timeout=1)]
    assert 1 < window[0] and window[-1] == 20 and window == list(range(window[0], 21)), window
    first = window[0] - 1                      # the offset of the oldest frame retained
    assert _seqs(bus.subscribe(topic, start=Start.offset(0)), len(window)) == window
    assert _seqs(bus.subscribe(topic, start=Start.offset(first - 1)), len(window)) == window
    assert _seqs(bus.subscribe(topic, start=Start.offset(first)), len(window)) == window
    assert _seqs(bus.subscribe(topic, start=Start.offset(first + 1)), len(window) - 1) == window[1:]
    assert _seqs(bus.subscribe(topic, start=Start.offset(19)), 1) == [20]


def test_memory_start_in_a_group_replays_to_that_member(make_bus: Any, topic: str) -> None:
    pub = make_bus()
    for i in range(4):
        pub.publish(topic, b"%d" % i)
    member = make_bus().subscribe(topic, group_id="g", start=Start.offset(2))
    assert _seqs(member, 2) == [3, 4]
