"""One contract, three backends: every test here runs on Redis, NATS and Kafka."""
import time

import numpy as np
import pytest

import msight_fast
from msight_fast import BackendUnavailable, Frame, FrameTooLarge, NodeConfig, compat, connect_node, encode

from ..helpers import raw_frame, real_jpeg, real_sweep
from .conftest import collect

pytestmark = pytest.mark.integration


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
    sent = pub.publish(topic, p, sensor_name="mcity_cam", encoding="jpeg" if name == "jpeg" else None) \
        if isinstance(p, np.ndarray) else pub.publish(topic, p, sensor_name="mcity_cam",
                                                      encoding="jpeg" if name == "jpeg" else "bytes")
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


def _raw_publisher(backend):
    """An MSight-Core-style publisher (the compat layer) that sends bytes we encode by hand."""
    o = backend.options
    if backend.kind == "redis":
        class Client:   # a redis-py-shaped object: compat reads its connection kwargs
            class connection_pool:
                connection_kwargs = {"host": o["host"], "port": o["port"], "db": o.get("db", 0),
                                     "password": o.get("password")}
        return compat.RedisPubSub(Client())
    if backend.kind == "nats":
        return compat.NATSPubSub({"servers": o["servers"]})
    return compat.KafkaPubSub({"servers": o["servers"], "group_id": None})


def test_gaps_are_counted_when_frames_go_missing(backend, make_bus, topic):
    sub = make_bus().subscribe(topic)
    raw = _raw_publisher(backend)
    try:
        for seq in (1, 2, 3, 7, 8, 10):        # 4, 5, 6 and 9 "lost"
            f = Frame.from_bytes(b"x" * 100, sensor_name="s", encoding="raw")
            f.seq, f.publisher_id, f.publish_ts_ns = seq, 4242, time.time_ns()
            raw.publish(topic, encode(f))
        if backend.kind == "kafka":
            raw.flush(30)
        got = collect(sub, 6)
    finally:
        raw.close()
    assert [f.seq for f in got] == [1, 2, 3, 7, 8, 10]
    assert sub.stats()["gaps"] == 4


def test_compat_classes_carry_raw_bytes_both_ways(backend, topic):
    class Topic:
        name = topic
    a, b = _raw_publisher(backend), _raw_publisher(backend)
    try:
        b.subscribe(Topic())
        it = b.listen()
        payloads = [b"\x00\x01msgpack-ish", bytes(range(256)) * 100, b""]
        for p in payloads:
            a.publish(Topic(), p)
        if backend.kind == "kafka":
            a.flush(30)
        assert [next(it) for _ in payloads] == payloads
    finally:
        a.close()
        b.close()


def test_no_broker_raises_backend_unavailable_quickly(backend):
    port = msight_fast.brokers.free_port()
    opts = {"host": "127.0.0.1", "port": port} if backend.kind == "redis" else \
        {"servers": [("nats://" if backend.kind == "nats" else "") + f"127.0.0.1:{port}"]}
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        msight_fast.connect(backend.kind, connect_timeout_s=2, **opts)
    assert time.monotonic() - t0 < 2 + 10      # bounded by connect_timeout_s, never a hang


def test_oversize_frame_is_refused_before_sending(make_bus, topic):
    bus = make_bus(max_frame_bytes=1 << 20)
    with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
        bus.publish(topic, np.zeros(2 << 20, np.uint8))


def test_node_config_groups(backend, broker_pool, topic, caplog):
    node = NodeConfig(name="detector", group_id="workers", backend=backend.kind, options=dict(backend.options))
    bus = connect_node(node)
    try:
        if backend.kind == "redis":
            with caplog.at_level("WARNING", logger="msight_fast"):
                sub = bus.subscribe(topic)
            assert sub.group_id is None and "ignored on Redis" in caplog.text
        else:
            sub = bus.subscribe(topic)
            assert sub.group_id == "workers"
            assert NodeConfig(name="detector").effective_group(backend.kind) == (
                "detector_group" if backend.kind == "kafka" else None)
    finally:
        bus.close()
