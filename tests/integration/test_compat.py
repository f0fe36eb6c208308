"""The MSight Core drop-in on real brokers: MSight's threading, both wire modes, and its Kafka rules."""
import threading

import numpy as np
import pytest

from msight_fast import FrameTooLarge

from .conftest import wait_for
from .test_conformance import _raw_publisher

pytestmark = pytest.mark.integration


class _Topic:
    def __init__(self, name):
        self.name = name


def _listen_into(node, n):
    """Read ``n`` payloads from ``node.listen()`` in a thread; returns (list, thread)."""
    got = []

    def run():
        for p in node.listen():
            got.append(p)
            if len(got) >= n:
                return
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return got, t


@pytest.mark.parametrize("framed", [False, True], ids=["plain", "framed"])
def test_a_new_thread_per_publish_as_msight_core_does(backend, topic, framed):
    pub, sub = _raw_publisher(backend, framed=framed), _raw_publisher(backend)
    try:
        sub.subscribe(_Topic(topic))
        n = 100
        got, reader = _listen_into(sub, n)
        payloads = [bytes([k]) * (50_000 + k) for k in range(n)]
        ts = [threading.Thread(target=pub.publish, args=(_Topic(topic), p)) for p in payloads]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        pub.flush(30)
        wait_for(lambda: len(got) >= n, f"{n} payloads", timeout=90)
        assert sorted(got) == sorted(payloads)                 # every payload, intact, once
        assert pub.stats()["publisher"]["published"] == n
    finally:
        pub.close()
        sub.close()


def test_framed_mode_fragments_payloads_above_the_broker_limit(backend, topic):
    big = np.random.default_rng(3).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    plain, framed, sub = _raw_publisher(backend), _raw_publisher(backend, framed=True), _raw_publisher(backend)
    try:
        sub.subscribe(topic)
        got, reader = _listen_into(sub, 3)
        if backend.kind != "redis":                            # Redis takes 3 MB whole
            with pytest.raises(FrameTooLarge):
                plain.publish(topic, big)                      # as MSight Core fails
        framed.publish(topic, big)
        framed.publish(topic, b"after")
        plain.publish(topic, b"plain bytes")                   # a mixed deployment keeps working
        for p in (framed, plain):
            p.flush(30)
        wait_for(lambda: len(got) >= 3, "3 payloads", timeout=60)
        assert sorted(got, key=len) == [b"after", b"plain bytes", big]
        st = sub.stats()["subscription"]
        assert st["gaps"] == 0 and st["received"] == 3 and st["publishers"] == 1
    finally:
        for node in (plain, framed, sub):
            node.close()


def test_listen_ends_after_close(backend, topic):
    node = _raw_publisher(backend)
    node.subscribe(topic)
    done = threading.Event()

    def run():
        for _ in node.listen():
            pass
        done.set()
    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: node._sub._rlock.locked(), "listen() to block in recv")   # the case being tested
    node.close()
    assert done.wait(15), "listen() kept running after close()"


def test_kafka_compat_group_starts_at_the_earliest_offset(broker_pool, topic):
    info = broker_pool("kafka")

    class B:
        kind, options = "kafka", info.options
    pub = _raw_publisher(B)
    try:
        for i in range(3):
            pub.publish(topic, b"before %d" % i)              # published before the group exists
        pub.flush(30)
        sub = _raw_publisher(B, group_id=f"g-{topic}")
        try:
            sub.subscribe(topic)
            got, _ = _listen_into(sub, 3)
            wait_for(lambda: len(got) >= 3, "the frames published before the group joined", timeout=60)
            assert got == [b"before 0", b"before 1", b"before 2"]
        finally:
            sub.close()
    finally:
        pub.close()
