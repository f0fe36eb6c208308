"""Redis faults with a real redis-server: kill -9 and restart mid-stream, a broker that is down and
a stalled broker (many publisher threads on one Bus: tests/contract.py). Frames are accounted for
exactly: the subscriber's ``received + gaps`` equals the publisher's ``published``."""
import logging
import signal
import threading
import time

import numpy as np
import pytest

import msight_fast
from msight_fast import BackendUnavailable, PublishError
from msight_fast.backends import redis as redis_backend
from msight_fast.config import RedisConfig

from .conftest import wait_for

pytestmark = pytest.mark.integration

# the server must not drop a subscriber that falls behind while the machine is busy
NO_PUBSUB_LIMIT = ["--client-output-buffer-limit", "pubsub", "0", "0", "0"]
BASE = np.random.default_rng(7).integers(0, 256, (6 << 20) + 8192, dtype=np.uint8)


@pytest.fixture
def connect():
    """``msight_fast.connect`` to a broker from own_broker; every Bus made is closed after the test."""
    made = []

    def make(broker, **opts):
        bus = msight_fast.connect("redis", **broker.options(), **opts)
        made.append(bus)
        return bus
    yield make
    for bus in made:
        bus.close()


def _small(i: int) -> bytes:
    return i.to_bytes(8, "little") * 128                  # 1 KB that names its index


class Receiver:
    """Receives from ``sub`` in a thread, checks each frame with ``check(frame) -> key``, and
    keeps (key, seq, monotonic receipt time)."""

    def __init__(self, sub, check):
        self.sub, self.check = sub, check
        self.got = []
        self.errors = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                f = self.sub.recv(timeout=0.5)
                if f is not None:
                    self.got.append((self.check(f), f.seq, time.monotonic()))
            except Exception as e:  # noqa: BLE001 - recv must never raise: any exception fails the test
                self.errors.append(repr(e))
                return

    def max_seq(self):
        return max((s for _, s, _ in self.got), default=0)

    def close(self):
        self.stop.set()
        self.t.join(30)


class StreamPublisher:
    """1 KB frames at ~500/s and a (1080, 1920, 3) uint8 frame every 50th, from one thread."""

    def __init__(self, bus, topic):
        self.bus, self.topic = bus, topic
        self.attempts = self.ok = 0
        self.errors = []
        self.stop = threading.Event()
        self.big = BASE[:1080 * 1920 * 3].reshape(1080, 1920, 3).copy()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        due = time.monotonic()
        i = 0
        while not self.stop.is_set():
            i += 1
            if i % 50 == 0:
                self.big.reshape(-1)[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
                obj = self.big
            else:
                obj = _small(i)
            self.attempts += 1
            try:
                self.bus.publish(self.topic, obj, meta={"i": i})
                self.ok += 1
            except BackendUnavailable as e:
                self.errors.append(type(e).__name__)
                due = time.monotonic()
            except Exception as e:  # noqa: BLE001 - anything else fails the test
                self.errors.append(repr(e))
                return
            due += 0.002
            self.stop.wait(max(0.0, due - time.monotonic()))   # pacing, not synchronisation

    def close(self):
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive()


def _first_frame_back(bus, sub, topic, timeout=60.0):
    """Publish until ``sub`` gets a frame again (those before it resubscribed are gaps)."""
    def one():
        try:
            bus.publish(topic, b"again")
        except BackendUnavailable:
            pass
        return sub.recv(timeout=0.5)
    return wait_for(one, "the subscription to come back", timeout)


def _check_stream_frame(f):
    i = f.meta["i"]
    data = np.frombuffer(f.data, np.uint8)
    if i % 50 == 0:
        assert data.size == 1080 * 1920 * 3 and int.from_bytes(data[:8].tobytes(), "little") == i
        assert np.array_equal(data[8:], BASE[8:1080 * 1920 * 3]), f"frame {i} damaged"
    else:
        assert data.tobytes() == _small(i), f"frame {i} damaged"
    return i


def test_kill_9_and_restart_mid_stream_the_same_bus_and_subscription_carry_on(own_broker, connect, topic):
    b = own_broker("redis", extra_args=NO_PUBSUB_LIMIT)
    bus = connect(b, publish_timeout_s=2.0)
    sub = bus.subscribe(topic)
    rx = Receiver(sub, _check_stream_frame)
    tx = StreamPublisher(bus, topic)
    try:
        wait_for(lambda: len(rx.got) >= 300 and any(k % 50 == 0 for k, _, _ in rx.got), "frames before the kill", 60)
        b.kill()
        # down long enough that publishes give up (publish_timeout_s) and every backoff is at its longest
        wait_for(lambda: not bus.stats()["connected"] and not sub.stats()["connected"] and tx.errors,
                 "both sides to see the cut and a publish to give up")
        up = time.monotonic()
        b.restart()
        listening = time.monotonic() - up
        wait_for(lambda: any(t > up for _, _, t in rx.got), "the first frame after the restart", 30)
        recovery = min(t for _, _, t in rx.got if t > up) - up
        print(f"\nrecovery: first frame {recovery:.3f} s after the restart began "
              f"(restart() saw the port open after {listening:.3f} s)")
        assert recovery < 5.0
        n = len(rx.got)
        wait_for(lambda: len(rx.got) >= n + 300 and any(k % 50 == 0 and t > up for k, _, t in rx.got),
                 "small and 1080p frames after the restart", 60)
        tx.close()
        wait_for(lambda: rx.max_seq() == bus.published, "the last frame published", 30)
    finally:
        tx.close()
        rx.close()
    assert rx.errors == [] and set(tx.errors) <= {"BackendUnavailable"}, (rx.errors, tx.errors)
    st, ps = sub.stats(), bus.stats()
    print(f"published {ps['published']}, publish_errors {ps['publish_errors']}, lost {ps['lost']}; "
          f"received {st['received']}, gaps {st['gaps']}")
    # every attempt either failed in publish() or was published; every published frame was
    # received or is a gap (those a cut lost, counted in ``lost``, are among the gaps)
    assert tx.attempts == ps["published"] + ps["publish_errors"] and ps["publish_errors"] == len(tx.errors)
    assert st["received"] + st["gaps"] == ps["published"]
    assert st["received"] == len(rx.got) and st["duplicates"] == 0 and st["rejected"] == 0
    assert [s for _, s, _ in rx.got] == sorted(s for _, s, _ in rx.got)
    assert ps["connected"] and ps["disconnects"] >= 1 and ps["reconnects"] >= 1
    assert st["connected"] and st["disconnects"] >= 1 and st["reconnects"] >= 1
    assert 0 <= ps["lost"] <= ps["published"]


def test_broker_down_publish_fails_on_time_recv_returns_none_and_both_recover(own_broker, connect, topic):
    b = own_broker("redis")
    limit = 1.0
    bus = connect(b, publish_timeout_s=limit)
    sub = bus.subscribe(topic)
    bus.publish(topic, b"before")
    bus.flush(10)                                    # acknowledged: only frames after the kill can be lost
    assert bytes(sub.recv(timeout=10).data) == b"before"
    b.kill()
    raised = taken = 0
    end = time.monotonic() + 60
    while raised < 3:                                # the kernel may take a write or two before the cut shows
        assert time.monotonic() < end, "publish never failed with the broker down"
        t0 = time.monotonic()
        try:
            bus.publish(topic, b"down")
            taken += 1
        except BackendUnavailable:
            raised += 1
        assert time.monotonic() - t0 < limit + 3.0     # within publish_timeout_s, plus slack
    for _ in range(3):
        t0 = time.monotonic()
        assert sub.recv(timeout=1) is None
        assert time.monotonic() - t0 < 1 + 3.0
    assert not bus.stats()["connected"] and not sub.stats()["connected"]
    assert bus.stats()["lost"] == taken              # taken by the kernel of a dead server: none reached it
    b.restart()

    def publishes():
        try:
            bus.publish(topic, b"after")
            return True
        except BackendUnavailable:
            return False
    wait_for(publishes, "a publish to succeed after the restart", 30)
    got = _first_frame_back(bus, sub, topic)
    if taken:
        with pytest.raises(PublishError) as e:       # flush reports what the cut lost
            bus.flush(10)
        assert len(e.value.failures) == taken
    bus.flush(10)                                    # reported once
    ps, st = bus.stats(), sub.stats()
    assert ps["reconnects"] >= 1 and st["reconnects"] >= 1 and ps["connected"] and st["connected"]
    assert ps["publish_errors"] >= 3
    assert st["received"] + st["gaps"] == got.seq    # nothing unaccounted up to the last frame seen


def test_stalled_broker_publish_fails_on_time_and_a_silent_subscription_is_replaced(own_broker, connect, topic):
    b = own_broker("redis")
    limit = 1.0
    bus = connect(b, publish_timeout_s=limit)
    sub = bus.subscribe(topic)
    sub._src.ping_idle_s, sub._src.health_timeout_s = 0.3, 1.0   # the half-open check, shortened
    frame = BASE[:1 << 20]
    bus.publish(topic, frame)
    assert sub.recv(timeout=10) is not None
    b.pause()                                        # SIGSTOP: the connection stays open, nothing answers
    try:
        raised = 0
        end = time.monotonic() + 60
        while raised < 2:                            # the socket buffers take a few frames first
            assert time.monotonic() < end, "publish never failed with the broker stalled"
            t0 = time.monotonic()
            try:
                bus.publish(topic, frame)
            except BackendUnavailable:
                raised += 1
            assert time.monotonic() - t0 < limit + 3.0
        wait_for(lambda: sub.recv(timeout=0.2) is None and sub.stats()["disconnects"] >= 1,
                 "the silent subscription to be dropped", 30)
        for _ in range(2):
            t0 = time.monotonic()
            assert sub.recv(timeout=1) is None        # reconnect attempts time out: still on time
            assert time.monotonic() - t0 < 1 + 3.0
    finally:
        b.proc.send_signal(signal.SIGCONT)
    got = _first_frame_back(bus, sub, topic)
    st = sub.stats()
    assert st["reconnects"] >= 1 and st["connected"]
    assert st["received"] + st["gaps"] == got.seq and st["duplicates"] == 0


def test_a_resubscription_the_server_refuses_backs_off_until_it_is_allowed_again(own_broker, connect, topic, caplog):
    """The server drops a subscriber whose user loses the channel (ACL), then refuses SUBSCRIBE on
    each new connection: that is a failed attempt, retried with backoff, not a reconnect and a new
    cut each time; once the channel is allowed again the same subscription carries on."""
    caplog.set_level(logging.WARNING, logger="msight_fast")
    b = own_broker("redis")
    admin = redis_backend._Conn(RedisConfig(host="127.0.0.1", port=b.port))

    def acl(*rules: bytes) -> None:
        assert admin.call(b"ACL", b"SETUSER", b"alice", *rules) == b"OK"
    acl(b"on", b">pw", b"~*", b"+@all", b"resetchannels", b"&" + topic.encode())
    try:
        bus = connect(b, username="alice", password="pw")
        sub = bus.subscribe(topic)
        bus.publish(topic, b"before")
        assert bytes(sub.recv(timeout=10).data) == b"before"
        acl(b"resetchannels")                        # the server closes the subscribed connection
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert sub.recv(timeout=0.5) is None
            assert time.monotonic() - t0 < 0.5 + 3.0
        st = sub.stats()
        assert st["disconnects"] == 1 and st["reconnects"] == 0 and not st["connected"], st
        assert len(caplog.records) <= 3, [r.getMessage()[:120] for r in caplog.records]
        acl(b"&" + topic.encode())
        got = _first_frame_back(bus, sub, topic)
        st = sub.stats()
        assert st["disconnects"] == 1 and st["reconnects"] == 1 and st["connected"]
        assert st["received"] + st["gaps"] == got.seq
    finally:
        admin.close()


def test_a_refused_select_names_the_server_once(broker_pool):
    with pytest.raises(BackendUnavailable) as e:
        msight_fast.connect("redis", **broker_pool("redis").options, db=99)
    assert str(e.value).count("Redis at") == 1 and "SELECT" in str(e.value)


def test_refused_publishes_are_counted_but_their_reasons_kept_bounded(own_broker, connect, topic):
    """Every PUBLISH refused (the user lost the channel) and no flush for a long while: the count
    is exact, the reasons kept for flush() stay bounded."""
    b = own_broker("redis")
    admin = redis_backend._Conn(RedisConfig(host="127.0.0.1", port=b.port))
    try:
        assert admin.call(b"ACL", b"SETUSER", b"alice", b"on", b">pw", b"~*", b"+@all", b"resetchannels") == b"OK"
        bus = connect(b, username="alice", password="pw")
        n = redis_backend.MAX_FAILURES + 500
        for _ in range(n):
            bus.publish(topic, b"x")
        assert len(bus._t._failures) <= redis_backend.MAX_FAILURES
        with pytest.raises(PublishError) as e:
            bus.flush(10)
        assert str(e.value).startswith(f"{n} publishes failed") and "NOPERM" in str(e.value)
        assert 0 < len(e.value.failures) <= redis_backend.MAX_FAILURES
        bus.flush(10)                                # reported once
    finally:
        admin.close()
