"""The backend contract, as tests: every backend in the registry must pass these.

Imported by tests/unit/test_contract_memory.py (the in-memory backend, no broker) and by
tests/integration/test_conformance.py (Redis, NATS and Kafka, real brokers). Each module that
imports them provides the fixtures ``make_bus`` (connect; closed after the test) and ``topic``.
What a backend does not offer (groups, persistence) is skipped by its declared Capabilities.
"""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from msight_fast import Frame, FrameTooLarge
from msight_fast.stats import BusStats, SubscriptionStats

from .helpers import raw_frame, real_jpeg, real_sweep


def collect(sub, n, timeout=60.0):
    """Receive n frames, each within a deadline; fewer if the deadline passes."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        f = sub.recv(timeout=max(0.05, deadline - time.monotonic()))
        if f is not None:
            out.append(f)
    return out


class Drain:
    """Receives from a subscription in a thread (so publishers never wait on a full pipe)."""

    def __init__(self, sub, n, timeout=120.0):
        self.sub, self.n, self.frames, self.bad = sub, n, [], []
        self.done = threading.Event()
        self._t = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._t.start()

    def _run(self, timeout):
        deadline = time.monotonic() + timeout
        while len(self.frames) < self.n and time.monotonic() < deadline:
            f = self.sub.recv(timeout=0.5)
            if f is None:
                continue
            if zlib.crc32(f.data) != f.meta.get("crc", -1):
                self.bad.append(f.meta)
            self.frames.append((f.meta.get("thread"), f.meta.get("i"), f.publisher_id, f.seq))
        self.done.set()

    def wait(self, timeout=180.0):
        assert self.done.wait(timeout), "the receiving thread did not finish"
        return self.frames


def _payloads():
    rng = np.random.default_rng(5)
    return {
        "raw1080": raw_frame(1080, 1920, seed=1),
        "jpeg": real_jpeg(),
        "lidar": real_sweep(),
        "1k": rng.integers(0, 256, 1024, dtype=np.uint8).tobytes(),
    }


PAYLOADS = _payloads()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_bit_exact_round_trip(make_bus, topic, name):
    pub, subbus = make_bus(), make_bus()
    sub = subbus.subscribe(topic)
    p = PAYLOADS[name]
    enc = "jpeg" if name == "jpeg" else (None if isinstance(p, np.ndarray) else "bytes")
    sent = pub.publish(topic, p, sensor_name="mcity_cam", **({"encoding": enc} if enc else {}))
    pub.flush(30)
    [f] = collect(sub, 1)
    if isinstance(p, np.ndarray):
        assert f.array.dtype == p.dtype and f.array.shape == p.shape
        assert f.array.tobytes() == p.tobytes()
    else:
        assert f.array is None and bytes(f.data) == p
    assert (f.sensor_name, f.frame_id, f.seq, f.publisher_id) == ("mcity_cam", sent.frame_id, 1, pub.publisher_id)
    assert f.publish_ts_ns >= f.capture_ts_ns > 0
    st = sub.stats()
    assert st["received"] == 1 and st["gaps"] == 0 and st["latency_p50_ns"] >= 0
    assert pub.stats()["published"] == 1


def test_two_broadcast_subscribers_each_get_every_frame_in_order(make_bus, topic):
    pub = make_bus()
    s1, s2 = make_bus().subscribe(topic), make_bus().subscribe(topic)
    small = np.arange(3000, dtype=np.uint8)
    for i in range(60):
        pub.publish(topic, PAYLOADS["raw1080"] if i % 20 == 5 else small, meta={"i": i})
    pub.flush(60)
    for s in (s1, s2):
        got = collect(s, 60)
        assert [f.meta["i"] for f in got] == list(range(60))
        assert [f.seq for f in got] == list(range(1, 61))
        st = s.stats()
        assert st["gaps"] == 0 and st["duplicates"] == 0 and st["received"] == 60
        # every key a backend reports is declared, with its type, for the users' type checkers
        assert set(st) <= set(SubscriptionStats.__annotations__), set(st) - set(SubscriptionStats.__annotations__)
    assert set(pub.stats()) <= set(BusStats.__annotations__), set(pub.stats()) - set(BusStats.__annotations__)


def test_a_frame_published_again_arrives_each_time(make_bus, topic):
    # over the message limit (a 6 MB frame), fragments are keyed by frame id: the same Frame
    # published twice, or another frame given its id, must not pass for late copies of the first
    pub = make_bus()
    subs = [make_bus().subscribe(topic)]
    if pub.capabilities.groups is not None:         # a queue member pulls each sending by its key
        subs.append(make_bus().subscribe(topic, group_id=f"one-{topic}"))
    arr = PAYLOADS["raw1080"]
    big = Frame.from_array(arr, sensor_name="cam")
    other = np.ascontiguousarray(arr[::-1])
    pub.publish(topic, big)
    pub.publish(topic, big)
    pub.publish(topic, other, sensor_name="cam", frame_id=big.frame_id)
    pub.flush(60)
    for sub in subs:
        got = collect(sub, 3, timeout=30)
        assert [f.seq for f in got] == [1, 2, 3]
        assert {f.frame_id for f in got} == {big.frame_id}
        assert [zlib.crc32(f.array) for f in got] == [zlib.crc32(arr)] * 2 + [zlib.crc32(other)]
        assert sub.stats()["received"] == 3


def test_oversize_frame_is_refused_before_sending(make_bus, topic):
    bus = make_bus(max_frame_bytes=1 << 20)
    with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
        bus.publish(topic, np.zeros(2 << 20, np.uint8))
    bus.publish(topic, b"fits")                       # the refusal left the Bus usable...
    assert bus.stats()["published"] == 1              # ...and used no sequence number


def test_recv_times_out_with_none(make_bus, topic):
    sub = make_bus().subscribe(topic)
    t0 = time.monotonic()
    assert sub.recv(timeout=0.2) is None
    assert time.monotonic() - t0 < 0.2 + 5            # bounded: never a hang


def test_close_from_another_thread_ends_a_blocked_recv(make_bus, topic):
    sub = make_bus().subscribe(topic)
    out = []
    t = threading.Thread(target=lambda: out.append(sub.recv(timeout=60)), daemon=True)
    t.start()
    closer = threading.Timer(0.2, sub.close)
    closer.start()
    t.join(30)
    closer.join()
    assert not t.is_alive() and out == [None]


def _in_threads(target, n, join_s=300):
    """Run ``target(k)`` in ``n`` threads at once; returns the errors they raised."""
    errors = []

    def run(k):
        try:
            target(k)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            errors.append(repr(e))

    ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(join_s)
    return errors


def _mixed(thread, i):
    """Frame ``i`` of publishing thread ``thread``: 1 KB to 6 MB, mostly small."""
    size = (6 << 20) if i % 60 == 7 else (200 << 10) if i % 10 == 3 else 1024 + 37 * i
    return np.full(size, (thread * 31 + i) % 251, np.uint8)


def test_concurrent_publishers_on_one_bus_keep_each_threads_order(make_bus, topic):
    """8 threads x 300 frames of 1 KB to 6 MB on one Bus: every frame intact, each thread's in order."""
    threads, per = 8, 300
    # what is tested is order and integrity, not speed: a loaded machine must not fail it by the
    # publish timeout of a thread queued behind the others
    pub, sub = make_bus(publish_timeout_s=120), make_bus().subscribe(topic)
    drain = Drain(sub, threads * per)

    def run(k):
        for i in range(per):
            a = _mixed(k, i)
            pub.publish(topic, a, meta={"thread": k, "i": i, "crc": zlib.crc32(a)})

    errors = _in_threads(run, threads)
    pub.flush(60)
    got = drain.wait()
    assert errors == [] and drain.bad == []
    assert len(got) == threads * per
    for k in range(threads):
        assert [i for th, i, _, _ in got if th == k] == list(range(per))
    assert [s for _, _, _, s in got] == list(range(1, threads * per + 1))   # one wire order, seq order
    assert sub.stats()["gaps"] == 0 and sub.stats()["duplicates"] == 0


def test_a_thread_per_publish(make_bus, topic):
    """MSight Core's Node.publish starts a thread per message: 100 threads, one 3.7 MB frame each."""
    n = 100
    pub, sub = make_bus(publish_timeout_s=120), make_bus().subscribe(topic)   # as above
    drain = Drain(sub, n)

    def run(k):
        a = np.full(3_700_000, k, np.uint8)
        pub.publish(topic, a, meta={"thread": k, "i": 0, "crc": zlib.crc32(a)})

    errors = _in_threads(run, n)
    pub.flush(60)
    got = drain.wait()
    assert errors == [] and drain.bad == []
    assert sorted(th for th, _, _, _ in got) == list(range(n))


def test_concurrent_readers_share_one_subscription(make_bus, topic):
    pub, sub = make_bus(), make_bus().subscribe(topic)
    seen, lock = [], threading.Lock()
    stop = threading.Event()

    def read():
        while not stop.is_set():
            f = sub.recv(timeout=0.2)
            if f is not None:
                with lock:
                    seen.append(f.seq)

    readers = [threading.Thread(target=read, daemon=True) for _ in range(4)]
    for r in readers:
        r.start()
    for _ in range(200):
        pub.publish(topic, b"x" * 100)
    pub.flush(30)
    deadline = time.monotonic() + 60
    while len(seen) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)                      # polling what the reader threads collect
    stop.set()
    for r in readers:
        r.join(10)
    assert sorted(seen) == list(range(1, 201))        # each frame to exactly one reader


def test_group_members_share_frames_and_report_no_gaps(make_bus, topic):
    pub = make_bus()
    if pub.capabilities.groups is None:
        pytest.skip(f"{pub.backend} has no groups")
    a = make_bus().subscribe(topic, group_id=f"workers-{topic}")
    b = make_bus().subscribe(topic, group_id=f"workers-{topic}")
    n = 40
    partition_key = {"partition_key": "frame"} if pub.backend == "kafka" else {}
    if partition_key:       # one publisher's frames must spread over the group's partitions
        pub = make_bus(**partition_key)
    for i in range(n):
        pub.publish(topic, b"f" * 500, meta={"i": i})
    pub.flush(30)
    got = {"a": [], "b": []}
    deadline = time.monotonic() + 60
    while len(got["a"]) + len(got["b"]) < n and time.monotonic() < deadline:
        for name, s in (("a", a), ("b", b)):
            f = s.recv(timeout=0.05)
            if f is not None:
                got[name].append(f.meta["i"])
    assert sorted(got["a"] + got["b"]) == list(range(n))    # each frame to exactly one member
    assert a.stats()["gaps"] is None and b.stats()["gaps"] is None


def test_from_beginning_replays_what_was_kept(make_bus, topic):
    pub = make_bus()
    if not pub.capabilities.persistence:
        pytest.skip(f"{pub.backend} keeps nothing")
    for i in range(5):
        pub.publish(topic, b"kept", meta={"i": i})
    pub.flush(30)
    late = make_bus().subscribe(topic, from_beginning=True)
    assert [f.meta["i"] for f in collect(late, 5)] == list(range(5))


def test_capabilities_are_declared(make_bus):
    caps = make_bus().capabilities
    assert caps.delivery in ("best_effort", "at_least_once")
    assert caps.groups in (None, "queue", "consumer")
    assert isinstance(caps.persistence, bool)
    assert caps.max_message is None or caps.max_message >= 1024


def test_publish_and_subscribe_after_close_raise(make_bus, topic):
    bus = make_bus()
    bus.close()
    with pytest.raises(ValueError):
        bus.publish(topic, b"x")
    with pytest.raises(ValueError):
        bus.subscribe(topic)
