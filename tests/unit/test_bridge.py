"""The Bridge between two in-process brokers (the memory backend under two names), and the
bridge command's option handling (msight_fast/bridge.py, msight_fast/cli.py)."""
from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid

import numpy as np
import pytest

import msight_fast
from msight_fast import ConfigError, registry
from msight_fast.bridge import Bridge
from msight_fast.pcd import synthetic_sweep

from ..contract import collect
from ..helpers import raw_frame, wait_for

SLACK_S = 4.0                    # a loaded 2-core machine: bounds prove that nothing hangs, no more


@pytest.fixture
def buses():
    """Two memory Buses on two in-process brokers of their own: nothing published on one reaches the other."""
    made = []

    def make(**opts):
        bus = msight_fast.connect("memory", **opts)
        made.append(bus)
        return bus

    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    yield (lambda **o: make(name=a, **o)), (lambda **o: make(name=b, **o))
    for bus in made:
        bus.close()


def _bridge_threads():
    return [t for t in threading.enumerate() if t.name.startswith("msight-fast-bridge ")]


def _same_fields(got, sent):
    assert (got.sensor_name, got.device_name, got.encoding, got.frame_id, got.capture_ts_ns, got.creation_ts_ns,
            got.meta) == (sent.sensor_name, sent.device_name, sent.encoding, sent.frame_id, sent.capture_ts_ns,
                          sent.creation_ts_ns, sent.meta)
    assert bytes(got.data) == bytes(sent.data)
    if sent.array is None:
        assert got.array is None
    else:
        assert got.array.dtype == sent.array.dtype and got.array.shape == sent.array.shape
        assert got.array.tobytes() == sent.array.tobytes()


def test_frames_cross_bit_exact_with_their_fields_and_a_new_seq(buses):
    side_a, side_b = buses
    src, dst, other = side_a(), side_b(), side_a()
    topics = ["cam/front", "cam/jpeg", "lidar/top", "cam/big"]
    subs = {t: dst.subscribe(t) for t in topics}
    echo = other.subscribe("cam/front")            # what src itself carries: the original publisher's numbers
    rng = np.random.default_rng(4)
    with Bridge(topics, src=src, dst=dst) as bridge:
        assert bridge.running
        sent = {
            "cam/front": src.publish("cam/front", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
                                     sensor_name="front_cam", device_name="rsu-7", encoding="bgr8", frame_id=77,
                                     capture_ts_ns=1_700_000_000_123_456_789,
                                     meta={"exposure_us": 1250, "gain": 1.5, "site": "mcity"}),
            "cam/jpeg": src.publish("cam/jpeg", b"\xff\xd8" + rng.bytes(50_000) + b"\xff\xd9", encoding="jpeg",
                                    capture_ts_ns=42),
            "lidar/top": src.publish("lidar/top", synthetic_sweep(20_000, seed=1), encoding="pointcloud",
                                     meta={"frame": "lidar_top"}),
            # 6.2 MB: fragmented at the memory backend's 1 MiB message limit on both sides
            "cam/big": src.publish("cam/big", raw_frame(1080, 1920, seed=2), encoding="bgr8"),
        }
        assert dst.capabilities.max_message is not None and sent["cam/big"].nbytes > dst.capabilities.max_message
        got = {t: collect(subs[t], 1, timeout=30) for t in topics}
        [orig] = collect(echo, 1, timeout=30)
        for t in topics:
            assert len(got[t]) == 1, t
            f = got[t][0]
            _same_fields(f, sent[t])
            assert f.seq == 1 and f.publisher_id == dst.publisher_id != src.publisher_id
            assert f.publish_ts_ns >= sent[t].publish_ts_ns
        assert (orig.publisher_id, orig.seq) == (src.publisher_id, 1)
        wait_for(lambda: all(bridge.stats()[t]["forwarded"] == 1 for t in topics), "the counters")
        for t, st in bridge.stats().items():
            assert (st["received"], st["forwarded"], st["failed"], st["gaps"], st["dropped"]) == (1, 1, 0, 0, 0), t
            assert st["source"]["topic"] == t and st["dst_publish_errors"] == 0 and st["last_error"] is None
    assert not bridge.running and not _bridge_threads()
    for s in subs.values():                       # one frame each, nothing more (no echo, no copy)
        assert s.recv(timeout=0.2) is None


def test_every_frame_of_a_stream_in_order(buses):
    side_a, side_b = buses
    src, dst = side_a(), side_b()
    sub = dst.subscribe("t")
    with Bridge("t", src=src, dst=dst) as bridge:
        for i in range(300):
            src.publish("t", np.full(1000, i % 256, dtype=np.uint8), meta={"i": i})
        got = collect(sub, 300, timeout=60)
        st = bridge.stats()["t"]
    assert [f.meta["i"] for f in got] == list(range(300))
    assert [f.seq for f in got] == list(range(1, 301))
    assert all(int(f.array[0]) == i % 256 for i, f in enumerate(got))
    assert st["forwarded"] == st["received"] == 300 and sub.stats()["gaps"] == 0


@pytest.mark.skipif("shm" not in registry.names(), reason="no shm backend in this build")
def test_from_shared_memory_by_name(tmp_path):
    """A same-host shm topic to another backend, named like any other: its frames are slots lent to
    the bridge, and with 2 slots and the drop policy none is lost."""
    opts = {"dir": str(tmp_path), "slots": 2}
    pub, src = msight_fast.connect("shm", **opts), msight_fast.connect("shm", **opts)
    dst = msight_fast.connect("memory", name=uuid.uuid4().hex)
    try:
        sub = dst.subscribe("cam")
        with Bridge("cam", src=src, dst=dst) as bridge:
            sent = []
            for i in range(40):
                sent.append(pub.publish("cam", np.full((240, 320, 3), i, dtype=np.uint8), encoding="bgr8",
                                        meta={"i": i}))
                wait_for(lambda i=i: bridge.stats()["cam"]["forwarded"] == i + 1, f"frame {i} forwarded")
            got = collect(sub, 40, timeout=30)
        assert [f.meta["i"] for f in got] == list(range(40))
        for f, s in zip(got, sent):
            _same_fields(f, s)
        assert pub.stats()["dropped"] == 0 and bridge.stats()["cam"]["gaps"] == 0
    finally:
        for b in (pub, src, dst):
            b.close()


def test_a_refused_publish_is_counted_and_later_frames_flow(buses, caplog):
    caplog.set_level(logging.WARNING, logger="msight_fast")
    side_a, side_b = buses
    src, dst = side_a(), side_b(max_frame_bytes=64 << 10)      # dst takes frames up to 64 KiB
    sub = dst.subscribe("t")
    bridge = Bridge(["t"], src=src, dst=dst).start()
    try:
        src.publish("t", b"a" * 1000, meta={"i": 0})
        src.publish("t", b"b" * (100 << 10), meta={"i": 1})     # over dst's max_frame_bytes
        src.publish("t", b"c" * 1000, meta={"i": 2})
        got = collect(sub, 2, timeout=30)
        assert [f.meta["i"] for f in got] == [0, 2] and bytes(got[1].data) == b"c" * 1000
        assert [f.seq for f in got] == [1, 2]                    # a refused frame takes no seq on dst
        wait_for(lambda: bridge.stats()["t"]["forwarded"] == 2, "the counters")
        for _ in range(20):                                      # more refusals: counted, logged once
            src.publish("t", b"x" * (100 << 10))
        src.publish("t", b"d" * 1000, meta={"i": 3})
        [last] = collect(sub, 1, timeout=30)
        assert last.meta["i"] == 3
    finally:
        st = bridge.stop()["t"]
    assert (st["received"], st["forwarded"], st["failed"]) == (24, 3, 21)
    assert st["failed_by"] == {"FrameTooLarge": 21} and st["last_error"].startswith("FrameTooLarge")
    assert st["received"] == st["forwarded"] + st["failed"]
    warnings = [r for r in caplog.records if "not forwarded" in r.getMessage()]
    assert len(warnings) == 1 and "'t'" in warnings[0].getMessage()     # rate-limited: one in 5 s


def test_stop_is_prompt_idempotent_and_leaves_no_thread(buses):
    side_a, side_b = buses
    src, dst = side_a(), side_b()
    before = set(threading.enumerate())
    bridge = Bridge([f"t{i}" for i in range(8)], src=src, dst=dst).start()
    assert len(_bridge_threads()) == 8
    src.publish("t3", b"x")
    wait_for(lambda: bridge.stats()["t3"]["forwarded"] == 1, "a frame forwarded")
    t0 = time.monotonic()
    st = bridge.stop()
    took = time.monotonic() - t0
    assert took < 1.0 + SLACK_S, took              # each thread wakes within its 0.2 s recv
    assert not _bridge_threads() and set(threading.enumerate()) <= before
    assert st["t3"]["forwarded"] == 1
    assert bridge.stop() == st                     # again: nothing left to do, the same numbers
    assert not bridge.running


def test_a_source_bus_closed_under_the_bridge_does_not_spin(buses):
    side_a, side_b = buses
    src, dst = side_a(), side_b()
    bridge = Bridge(["t"], src=src, dst=dst).start()
    src.close()                                    # closes the bridge's subscription too
    t0 = time.process_time()
    time.sleep(1.0)                                # observing CPU use over a second, not synchronising
    assert time.process_time() - t0 < 0.5          # a spinning thread would use the whole second
    t1 = time.monotonic()
    bridge.stop()
    assert time.monotonic() - t1 < 1.0 + SLACK_S and not _bridge_threads()


def test_refusals(buses):
    side_a, side_b = buses
    src, dst = side_a(), side_b()
    with pytest.raises(ConfigError, match="same Bus"):
        Bridge(["t"], src=src, dst=src)
    with pytest.raises(ConfigError, match="at least one topic"):
        Bridge([], src=src, dst=dst)
    with pytest.raises(ConfigError, match="non-empty str"):
        Bridge(["t", ""], src=src, dst=dst)
    bridge = Bridge(["t", "t"], src=src, dst=dst)
    assert bridge.topics == ["t"]
    bridge.start()
    try:
        with pytest.raises(RuntimeError):
            bridge.start()
    finally:
        bridge.stop()


def test_a_subscribe_that_fails_leaves_nothing_open(buses):
    side_a, side_b = buses
    src, dst = side_a(), side_b()
    src.subscribe("probe").close()
    bridge = Bridge(["a", "b"], src=src, dst=dst)
    real = src.subscribe
    opened = []

    def subscribe(topic, **kw):                    # the second topic's subscription is refused
        if topic == "b":
            raise ConfigError("refused")
        s = real(topic, **kw)
        opened.append(s)
        return s
    src.subscribe = subscribe
    with pytest.raises(ConfigError, match="refused"):
        bridge.start()
    assert opened and all(s._closed for s in opened) and not _bridge_threads()


# ---------------------------------------------------------------- the command's options
def _args(**kw):
    base = dict(src="redis", dst="nats", from_opt=[], to_opt=[], timeout=None, allow_same=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_options_are_typed_after_the_backends_config():
    from msight_fast.cli import _typed_options
    got = _typed_options("redis", [("port", "6380"), ("password", "12345"), ("use_tls", "yes"),
                                   ("publish_timeout_s", "1.5"), ("host", "10.0.0.1")], "--from-opt")
    assert got == {"port": 6380, "password": "12345", "use_tls": True, "publish_timeout_s": 1.5, "host": "10.0.0.1"}
    got = _typed_options("kafka", [("producer_config", "{'linger.ms': 10}"), ("max_message_bytes", "none"),
                                   ("servers", "a:9092,b:9092")], "--to-opt")
    assert got == {"producer_config": {"linger.ms": 10}, "max_message_bytes": None, "servers": "a:9092,b:9092"}
    assert _typed_options("nats", [("max_payload", "2097152")], "--to-opt") == {"max_payload": 2097152}
    assert _typed_options("redis", [("nosuch", "1")], "--from-opt") == {"nosuch": "1"}   # connect() says why
    with pytest.raises(ConfigError, match="dict literal"):
        _typed_options("kafka", [("consumer_config", "linger=1")], "--to-opt")


def test_key_value_parsing():
    from msight_fast.cli import _key_value
    assert _key_value("publish-timeout-s=2") == ("publish_timeout_s", "2")
    assert _key_value("servers=nats://a:4222,nats://b:4222") == ("servers", "nats://a:4222,nats://b:4222")
    for bad in ("port", "=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _key_value(bad)


def test_the_same_backend_is_refused_unless_allowed_and_never_the_same_broker():
    from msight_fast.cli import _bridge_setup
    with pytest.raises(ConfigError, match="--allow-same"):
        _bridge_setup(_args(src="redis", dst="redis"))
    with pytest.raises(ConfigError, match="same redis broker"):
        _bridge_setup(_args(src="redis", dst="redis", allow_same=True, from_opt=[("port", "6380")],
                            to_opt=[("port", "6380")]))
    src, dst, so, do = _bridge_setup(_args(src="redis", dst="redis", allow_same=True, to_opt=[("port", "6380")],
                                           timeout=2.0))
    assert (src, dst, so, do) == ("redis", "redis", {"connect_timeout_s": 2.0},
                                  {"port": 6380, "connect_timeout_s": 2.0})
    assert _bridge_setup(_args(src="memory", dst="nats"))[:2] == ("memory", "nats")
