"""The Bus's path for small frames: frames up to a transport's ``small_frame_bytes`` go to
``send_small`` (no Outgoing), larger ones to ``send``; both number and count frames alike."""
from typing import Any, List, Sequence

import pytest

from msight_fast import BackendUnavailable, registry
from msight_fast.backends.base import Outgoing
from msight_fast.backends.memory import MemoryTransport
from msight_fast.bus import Bus
from msight_fast.codec import stamp_parts


class _Recording(MemoryTransport):
    """The memory backend, with a small-frame path that records each call, then takes the
    default one (``send`` of the Outgoing it builds)."""

    def __init__(self, cfg: Any, small: int) -> None:
        super().__init__(cfg)
        self.small_frame_bytes = small
        self.smalls: List[tuple] = []
        self.sends: List[Outgoing] = []
        self.refuse = False

    def send(self, msg: Outgoing, deadline: float) -> None:
        self.sends.append(msg)
        super().send(msg, deadline)

    def send_small(self, topic: str, parts: Sequence[Any], nbytes: int, publisher_id: int, frame_id: int,
                   deadline: float) -> None:
        if self.refuse:
            raise BackendUnavailable("refused by the test")
        self.smalls.append((topic, nbytes, publisher_id, frame_id))
        super().send_small(topic, parts, nbytes, publisher_id, frame_id, deadline)


def _bus(small: int, name: str) -> Bus:
    cfg = registry.load_config("memory", {"name": name})
    return Bus(_Recording(cfg, small), cfg)


def test_small_frames_take_send_small_and_the_rest_send():
    bus = _bus(600, "small-frames-routing")
    t = bus._t
    try:
        sub = bus.subscribe("s")
        small = bus.publish("s", b"a" * 100, encoding="jpeg")
        large = bus.publish("s", b"b" * 1000)
        at_limit = bus.publish("s", b"c" * (600 - 128))          # a 128-byte header: exactly the limit
        # the small frames went through send_small with their own fields; the default then built
        # the Outgoing that send() gets, so every frame reached send once, in order
        assert [s[0] for s in t.smalls] == ["s", "s"]
        assert [s[1] for s in t.smalls] == [128 + 100, 600]
        assert {s[2] for s in t.smalls} == {bus.publisher_id}
        assert [s[3] for s in t.smalls] == [small.frame_id, at_limit.frame_id]
        assert [m.frame_id for m in t.sends] == [small.frame_id, large.frame_id, at_limit.frame_id]
        assert [m.nbytes for m in t.sends] == [228, 1128, 600]
        got = [sub.recv(5.0) for _ in range(3)]
        assert [(f.seq, f.frame_id, bytes(f.data[:1])) for f in got] == [
            (1, small.frame_id, b"a"), (2, large.frame_id, b"b"), (3, at_limit.frame_id, b"c")]
        assert got[0].encoding == "jpeg" and got[1].encoding == "bytes" and got[0].sensor_name == "s"
        assert bus.published == 3
    finally:
        bus.close()


def test_a_refused_small_frame_leaves_no_gap_and_is_counted():
    bus = _bus(1 << 20, "small-frames-refused")
    t = bus._t
    try:
        sub = bus.subscribe("s")
        bus.publish("s", b"1")
        t.refuse = True
        with pytest.raises(BackendUnavailable):
            bus.publish("s", b"2")
        t.refuse = False
        bus.publish("s", b"3")
        assert [sub.recv(5.0).seq for _ in range(2)] == [1, 2]       # numbered as sent: no gap
        assert (bus.published, bus.publish_errors) == (2, 1)
        assert sub.stats()["gaps"] == 0
    finally:
        bus.close()


def test_transports_without_a_small_path_get_every_frame_through_send():
    bus = _bus(0, "small-frames-none")
    t = bus._t
    try:
        bus.publish("s", b"x")
        assert t.smalls == [] and len(t.sends) == 1
    finally:
        bus.close()


def test_the_default_small_path_fragments_above_the_message_limit():
    """A backend that leaves fragmenting to the Bus gets a small frame over its message limit in
    fragments from the default send_small, as the Bus would have split it for send."""
    cfg = registry.load_config("memory", {"name": "small-frames-fragments", "max_message_bytes": 4096})
    bus = Bus(_Recording(cfg, 1 << 20), cfg)
    t = bus._t
    try:
        sub = bus.subscribe("s")
        payload = bytes(range(256)) * 40                              # 10,240 bytes: three fragments
        sent = bus.publish("s", payload)
        assert len(t.smalls) == 1 and len(t.sends) == 1
        assert t.sends[0].fragments is not None and len(t.sends[0].fragments) == 3
        assert all(len(m) <= 4096 for m in t.sends[0].fragments)
        got = sub.recv(5.0)
        assert got is not None and got.frame_id == sent.frame_id and bytes(got.data) == payload
    finally:
        bus.close()


class _Lane(_Recording):
    """A transport with a shortest path (``add_small``) that takes, passes on, or refuses."""

    def __init__(self, cfg: Any, small: int) -> None:
        super().__init__(cfg, small)
        self.lane: List[tuple] = []
        self.mode = "take"

    def add_small(self, topic: str, frame: Any, seq: int, publisher_id: int, checksum: bool,
                  deadline: float) -> bool:
        self.lane.append((topic, seq, self.mode))
        if self.mode == "refuse":
            raise BackendUnavailable("refused by the test")
        if self.mode == "pass":
            return False
        parts = stamp_parts(frame, seq, publisher_id, checksum)
        n = len(parts[0]) + frame.nbytes
        MemoryTransport.send(self, Outgoing(topic, publisher_id, frame.frame_id, n, parts), deadline)
        return True


def test_the_shortest_path_takes_passes_or_refuses_and_the_numbering_holds():
    cfg = registry.load_config("memory", {"name": "small-frames-lane"})
    bus = Bus(_Lane(cfg, 600), cfg)
    t = bus._t
    try:
        sub = bus.subscribe("s")
        a = bus.publish("s", b"a")                       # taken by the lane: no send_small, no send
        assert (t.lane, t.smalls, t.sends) == ([("s", 1, "take")], [], [])
        t.mode = "pass"
        bus.publish("s", b"b")                           # passed on: the usual small path
        assert t.lane[-1] == ("s", 2, "pass") and len(t.smalls) == 1 and len(t.sends) == 1
        t.mode = "refuse"
        with pytest.raises(BackendUnavailable):
            bus.publish("s", b"c")
        assert t.lane[-1] == ("s", 3, "refuse") and len(t.smalls) == 1
        t.mode = "take"
        bus.publish("s", b"d")                           # numbered 3: the refused frame left no gap
        big = bus.publish("s", b"e" * 1000)              # over small_frame_bytes: not asked
        assert t.lane[-1] == ("s", 3, "take") and len(t.lane) == 4 and t.sends[-1].frame_id == big.frame_id
        got = [sub.recv(5.0) for _ in range(4)]
        assert [(f.seq, bytes(f.data[:1])) for f in got] == [(1, b"a"), (2, b"b"), (3, b"d"), (4, b"e")]
        assert got[0].frame_id == a.frame_id and got[3].frame_id == big.frame_id
        assert (bus.published, bus.publish_errors) == (4, 1)
        assert sub.stats()["gaps"] == 0
    finally:
        bus.close()


def test_a_transport_without_small_frames_is_never_asked_on_the_shortest_path():
    cfg = registry.load_config("memory", {"name": "small-frames-no-lane"})
    bus = Bus(_Lane(cfg, 0), cfg)
    try:
        bus.publish("s", b"x")
        assert bus._t.lane == [] and len(bus._t.sends) == 1
    finally:
        bus.close()
