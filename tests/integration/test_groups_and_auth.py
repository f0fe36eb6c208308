"""Backend-specific semantics: queue/consumer groups, Kafka replay, authentication."""
import numpy as np
import pytest

import msight_fast
from msight_fast import AuthError, brokers

from .conftest import collect

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["nats", "kafka"])
def test_two_subscribers_in_one_group_share_the_stream(broker_pool, topic, kind):
    info = broker_pool(kind)
    extra = {"partition_key": "frame"} if kind == "kafka" else {}
    pub = msight_fast.connect(kind, **info.options, **extra)
    b1, b2 = msight_fast.connect(kind, **info.options), msight_fast.connect(kind, **info.options)
    try:
        s1 = b1.subscribe(topic, group_id="g")
        s2 = b2.subscribe(topic, group_id="g")
        if kind == "kafka":
            # the second join rebalances the group: wait until both members own partitions
            import time
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (s1.stats()["assigned_partitions"]
                                                       and s2.stats()["assigned_partitions"]):
                s1.recv(0.2)
                s2.recv(0.2)
            assert s1.stats()["assigned_partitions"] and s2.stats()["assigned_partitions"]
        for i in range(200):
            pub.publish(topic, np.full(64, i % 256, np.uint8), meta={"i": i})
        pub.flush(60)
        got1, got2 = [], []
        import time
        deadline = time.monotonic() + 60
        while len(got1) + len(got2) < 200 and time.monotonic() < deadline:
            for s, acc in ((s1, got1), (s2, got2)):
                f = s.recv(0.05)
                if f is not None:
                    acc.append(f.meta["i"])
        seen = got1 + got2
        assert sorted(seen) == list(range(200))            # each frame reached exactly one member
        assert got1 and got2                               # and both members got some
    finally:
        for b in (pub, b1, b2):
            b.close()


def test_kafka_new_group_from_beginning_reads_earlier_frames(broker_pool, topic):
    info = broker_pool("kafka")
    pub = msight_fast.connect("kafka", **info.options)
    try:
        for i in range(10):
            pub.publish(topic, f"frame {i}".encode())
        pub.flush(30)
        with msight_fast.connect("kafka", **info.options) as late:
            sub = late.subscribe(topic, group_id="late_group", from_beginning=True)
            got = collect(sub, 10)
            assert [bytes(f.data) for f in got] == [f"frame {i}".encode() for i in range(10)]
    finally:
        pub.close()


def test_redis_wrong_password_is_auth_error():
    b = brokers.start("redis", password="right-pass")
    try:
        with pytest.raises(AuthError) as e:
            msight_fast.connect("redis", host="127.0.0.1", port=b.port, password="wrong-pass", connect_timeout_s=3)
        assert "wrong-pass" not in str(e.value)
        with pytest.raises(AuthError):
            msight_fast.connect("redis", host="127.0.0.1", port=b.port, connect_timeout_s=3)
        with msight_fast.connect("redis", host="127.0.0.1", port=b.port, password="right-pass") as ok:
            ok.publish("x", b"fine")
            ok.flush(5)
    finally:
        b.stop()


def test_nats_wrong_password_is_auth_error():
    b = brokers.start("nats", user="alice", password="right-pass")
    try:
        with pytest.raises(AuthError) as e:
            msight_fast.connect("nats", servers=[b.address], username="alice", password="wrong-pass",
                                connect_timeout_s=3)
        assert "wrong-pass" not in str(e.value)
        with msight_fast.connect("nats", servers=[b.address], username="alice", password="right-pass") as ok:
            ok.publish("x", b"fine")
            ok.flush(5)
    finally:
        b.stop()


def test_kafka_delivery_failures_come_back_through_flush(topic):
    from msight_fast import PublishError
    b = brokers.start("kafka")
    bus = msight_fast.connect("kafka", servers=[b.address],
                              producer_config={"message.timeout.ms": 2000})
    try:
        bus.publish(topic, b"before")                 # the topic exists and works...
        bus.flush(30)
        b.stop()                                      # ...then the broker goes away
        for i in range(5):
            bus.publish(topic, b"lost %d" % i)        # returns at once: librdkafka has the frame
        with pytest.raises(PublishError) as e:
            bus.flush(30)
        assert len(e.value.failures) == 5 and all(t == topic for t, _ in e.value.failures)
    finally:
        b.stop()
        bus.close()


def _raw_message_sizes(servers, topic, n_expected, timeout=60.0):
    """Sizes of the Kafka messages on ``topic``, read with a bare consumer from the beginning."""
    import time

    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": ",".join(servers), "group.id": f"raw-{topic}",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                  "fetch.wait.max.ms": 10})
    c.subscribe([topic])
    sizes = []
    deadline = time.monotonic() + timeout
    try:
        while len(sizes) < n_expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                sizes.append(len(m.value()))
    finally:
        c.close()
    return sizes


@pytest.mark.parametrize("explicit", [300_000, None])
def test_kafka_fragments_fit_the_topic_limit(broker_pool, topic, explicit):
    """With max_message_bytes the option decides; without it, the topic's max.message.bytes as
    the broker reports it (tansu reports nothing: Kafka's default, 1,000,000)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    from msight_fast.backends.kafka import DEFAULT_MESSAGE_BYTES, limit_from_topic_config
    info = broker_pool("kafka")
    opts = dict(info.options)
    if explicit:
        opts["max_message_bytes"] = explicit
    frame = np.random.default_rng(5).integers(0, 256, 2_500_000, dtype=np.uint8)
    with msight_fast.connect("kafka", **opts) as bus:
        sub = bus.subscribe(topic)
        bus.publish(topic, frame)
        bus.flush(30)
        got = collect(sub, 1)
    assert len(got) == 1 and np.array_equal(got[0].array, frame)
    if explicit:
        limit = explicit
    else:
        admin = AdminClient({"bootstrap.servers": ",".join(info.options["servers"])})
        res = ConfigResource("topic", topic)
        try:
            reported = limit_from_topic_config(admin.describe_configs([res])[res].result(10))
        except Exception:  # noqa: BLE001 - a broker that does not answer
            reported = None
        limit = reported or DEFAULT_MESSAGE_BYTES
    sizes = _raw_message_sizes(info.options["servers"], topic, -(-2_500_000 // limit))
    assert sizes and all(s <= limit for s in sizes), (sizes, limit)
    assert sum(sizes) > 2_500_000                   # all of the frame, in fragments
