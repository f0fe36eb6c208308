"""One contract, three backends: the contract's tests (tests/contract.py) and the drop-in's,
on real Redis, NATS and Kafka brokers."""
import time

import pytest

import msight_fast
from msight_fast import BackendUnavailable, Frame, NodeConfig, compat, connect_node, encode

from ..contract import *  # noqa: F401,F403 - the contract's tests, collected here
from .conftest import collect

pytestmark = pytest.mark.integration


def _raw_publisher(backend, group_id=None, framed=None):
    """An MSight-Core-style node (the compat layer), built from MSight Core's constructor arguments."""
    o = backend.options
    if backend.kind == "redis":
        class Client:   # a redis-py-shaped object: compat reads its connection kwargs
            class connection_pool:
                connection_kwargs = {"host": o["host"], "port": o["port"], "db": o.get("db", 0),
                                     "password": o.get("password")}
        return compat.RedisPubSub(Client(), framed=framed)
    if backend.kind == "nats":
        cfg = {"servers": o["servers"]}
        if group_id:
            cfg["group_id"] = group_id
        return compat.NATSPubSub(cfg, framed=framed)
    return compat.KafkaPubSub({"servers": o["servers"], "group_id": group_id}, framed=framed)


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
