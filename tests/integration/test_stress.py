"""Raw frames at full size on every backend: fragmentation over broker limits, crashes,
slow subscribers and bounded memory. Real brokers, real processes, real signals."""
import json
import signal
import time
from pathlib import Path

import pytest

import msight_fast
from msight_fast import brokers

from ..helpers import raw_frame
from .conftest import collect, spawn_member, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pause_until_dropped(child, out, pub, topic, frame, n_flood, dropped):
    """Let the child take frame 1, freeze it, flood it until the server drops it, resume it, and
    publish (paced) until it gets frames past the flood. Returns the child's stdout and stderr."""
    pub.publish(topic, frame)
    pub.flush(10)
    wait_for(lambda: _seqs(out) == [1], "the first frame")
    child.send_signal(signal.SIGSTOP)
    for _ in range(n_flood):
        pub.publish(topic, frame)
    pub.flush(10)
    wait_for(dropped, "the server to drop the paused subscriber")
    child.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(s > n_flood + 1 for s in _seqs(out)):
        pub.publish(topic, frame)
        time.sleep(0.1)                      # paced: the resumed subscriber must keep up
    pub.close()
    child.send_signal(signal.SIGTERM)
    return child.communicate(timeout=30)


def _seqs(path):
    return [int(x) for x in Path(path).read_text().split()] if Path(path).exists() else []


def test_nats_large_frames_with_default_max_payload(broker_pool, topic):
    info = broker_pool("nats")
    pub = msight_fast.connect("nats", **info.options)
    b1, b2, g1, g2 = (msight_fast.connect("nats", **info.options) for _ in range(4))
    try:
        assert pub._t.max_payload == 1 << 20            # the server default, not raised
        s1, s2 = b1.subscribe(topic), b2.subscribe(topic)
        q1, q2 = g1.subscribe(topic, group_id="workers"), g2.subscribe(topic, group_id="workers")
        frames = [raw_frame(1080, 1920, seed=i) for i in range(3)] + [raw_frame(2160, 3840, seed=9)]
        for fr in frames:
            pub.publish(topic, fr)
        pub.flush(60)
        for s in (s1, s2):
            got = collect(s, len(frames))
            assert [f.array.tobytes() == fr.tobytes() for f, fr in zip(got, frames)] == [True] * len(frames)
        got_q = []
        deadline = time.monotonic() + 60
        while len(got_q) < len(frames) and time.monotonic() < deadline:
            for q in (q1, q2):
                f = q.recv(0.1)
                if f is not None:
                    got_q.append((q is q1, f.seq, f.array.tobytes() == frames[f.seq - 1].tobytes()))
        assert sorted(s for _, s, _ in got_q) == [1, 2, 3, 4] and all(ok for _, _, ok in got_q)
    finally:
        for b in (pub, b1, b2, g1, g2):
            b.close()


def test_kafka_consumer_killed_mid_stream_loses_nothing(broker_pool, topic, tmp_path):
    info = broker_pool("kafka")
    n = 40
    out1, out2 = tmp_path / "c1.txt", tmp_path / "c2.txt"
    c1 = spawn_member("kafka", info.options, topic, out1, group="crashers", sleep_s=0.05)
    pub = msight_fast.connect("kafka", **info.options)
    try:
        for i in range(n):
            pub.publish(topic, raw_frame(480, 640, seed=i))      # 0.9 MB: whole, near the limit
        pub.publish(topic, raw_frame(1080, 1920, seed=99))        # 6 MB: fragmented
        pub.flush(60)
        deadline = time.monotonic() + 60
        while len(_seqs(out1)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        c1.send_signal(signal.SIGKILL)                           # dies holding unprocessed frames
        c1.communicate(timeout=30)
        first = _seqs(out1)
        assert 5 <= len(first) < n + 1
        c2 = spawn_member("kafka", info.options, topic, out2, group="crashers", seconds=45)
        deadline = time.monotonic() + 60
        while set(first) | set(_seqs(out2)) != set(range(1, n + 2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        c2.send_signal(signal.SIGTERM)
        c2.communicate(timeout=30)
        assert set(first) | set(_seqs(out2)) == set(range(1, n + 2))   # every frame, at least once
    finally:
        pub.close()


def test_redis_subscriber_paused_until_dropped_reconnects_and_reports_the_gap(tmp_path, topic):
    b = brokers.start("redis")
    try:
        opts = b.options()
        from msight_fast.backends.redis import _Conn
        with msight_fast.connect("redis", **opts) as admin:
            c = _Conn(admin.config)
        # a small limit so that a few frames overflow it, as 32 MB does for raw 1080p
        assert c.call(b"CONFIG", b"SET", b"client-output-buffer-limit", b"pubsub 4mb 2mb 60") == b"OK"
        out = tmp_path / "seqs.txt"
        child = spawn_member("redis", opts, topic, out, seconds=40)
        pub = msight_fast.connect("redis", **opts)
        _, err = _pause_until_dropped(child, out, pub, topic, raw_frame(480, 640), 40,
                                      lambda: c.call(b"CLIENT", b"LIST", b"TYPE", b"pubsub") == b"")
        c.close()
        seqs = _seqs(out)
        assert any(s > 41 for s in seqs), err[-2000:]            # frames after the drop arrived
        assert err.count("client-output-buffer-limit pubsub") == 1   # one warning naming the setting
        assert len(seqs) < max(seqs)                             # some frames really were lost
    finally:
        b.stop()


@pytest.mark.parametrize("kind", ["nats", "kafka"])
def test_slow_subscriber_memory_stays_bounded(broker_pool, topic, tmp_path, kind):
    info = broker_pool(kind)
    bound = 48 << 20
    out = tmp_path / "seqs.txt"
    # NATS: 20 frames/s taken; Kafka, whose producer is slower here: 5 frames/s, so a backlog builds
    child = spawn_member(kind, info.options, topic, out, sleep_s=0.05 if kind == "nats" else 0.2,
                   max_pending=bound, seconds=12)
    pub = msight_fast.connect(kind, **info.options)
    frame = raw_frame(1080, 1920)
    try:
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < 6:                         # ~6 MB frames at full speed
            pub.publish(topic, frame)
            sent += 1
        pub.flush(60)
    finally:
        pub.close()
    stdout, err = child.communicate(timeout=90)
    st = json.loads(stdout.strip().splitlines()[-1])
    total = sent * frame.nbytes
    assert total > 4 * bound                                     # the publisher really outran it
    # the process holds the bounded queue, frames in reassembly and the interpreter: never the backlog
    assert st["peak_rss"] < 400 << 20, (st, sent)
    if kind == "nats":
        assert st["dropped"] > 0                                 # drops are counted, not hidden
    else:
        assert st["received"] < sent and st["dropped"] == 0      # Kafka keeps the rest in the log
        assert st["gaps"] == 0                                   # and what it delivered has no holes


def test_nats_slow_consumer_dropped_by_server_reconnects_and_reports(tmp_path, topic):
    import urllib.request
    conf = tmp_path / "nats.conf"
    conf.write_text("max_pending: 4MB\n")       # small, so a paused client overflows it quickly
    mport = brokers.free_port()
    b = brokers.start("nats", extra_args=["-c", str(conf), "-m", str(mport)])

    def subscribers():
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/connz?subs=1", timeout=5) as r:
            conns = json.loads(r.read())["connections"]
        return sum(1 for c in conns if c.get("subscriptions_list"))
    try:
        opts = b.options()
        out = tmp_path / "seqs.txt"
        child = spawn_member("nats", opts, topic, out, seconds=40)
        pub = msight_fast.connect("nats", **opts)
        stdout, err = _pause_until_dropped(child, out, pub, topic, raw_frame(480, 640), 20, lambda: subscribers() == 0)
        assert stdout.strip(), err[-3000:]
        st = json.loads(stdout.strip().splitlines()[-1])
        assert any(s > 21 for s in _seqs(out)), err[-2000:]     # it came back and got new frames
        assert st["gaps"] > 0 and st["reconnects"] >= 1          # and says what it lost, and why
        assert err.count("NATS connection lost") == 1 and "'max_pending'" in err   # one warning, naming the setting
    finally:
        b.stop()
