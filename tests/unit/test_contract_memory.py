"""The backend contract on the in-memory backend: no broker, so it runs in the unit stage."""
import uuid

import pytest

import msight_fast

from ..contract import *  # noqa: F401,F403 - the contract's tests, collected here
from ..contract import collect


@pytest.fixture
def topic():
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_bus():
    """connect("memory") to a broker of this test's own; every Bus made is closed after the test."""
    name, made = f"test-{uuid.uuid4().hex}", []
    # The pure-Python twin computes each fragment's CRC32C in Python (seconds per 6 MB frame), so
    # with it frames go whole here; tests/unit/test_fragment.py covers the twin's fragments.
    defaults = {} if msight_fast.HAS_EXTENSIONS else {"max_message_bytes": None}

    def make(**opts):
        bus = msight_fast.connect("memory", name=name, **{**defaults, **opts})
        made.append(bus)
        return bus

    yield make
    for b in made:
        b.close()


def test_frames_above_the_message_limit_are_fragmented_and_put_back(make_bus, topic):
    import numpy as np
    pub = make_bus(max_message_bytes=4096)
    sub = make_bus(max_message_bytes=4096).subscribe(topic)
    a = np.arange(100_000, dtype=np.uint32)
    pub.publish(topic, a)
    [f] = collect(sub, 1, timeout=5)
    assert np.array_equal(f.array, a) and sub.stats()["fragments_expired"] == 0


def test_buses_with_different_names_do_not_see_each_other(topic):
    with msight_fast.connect("memory", name=f"a-{topic}") as a, msight_fast.connect("memory", name=f"b-{topic}") as b:
        sub = b.subscribe(topic)
        a.publish(topic, b"x")
        assert sub.recv(timeout=0.1) is None


def test_a_full_subscriber_queue_drops_and_counts(make_bus, topic):
    """Local queue drops count in ``dropped``; between frames received they are also ``gaps``."""
    pub = make_bus()
    sub = make_bus(max_pending_bytes=64 << 10).subscribe(topic)
    pub.publish(topic, b"first")
    assert sub.recv(timeout=5).seq == 1
    for _ in range(100):
        pub.publish(topic, b"z" * 4000)
    pub.publish(topic, b"last")
    got = collect(sub, 102, timeout=0.5)
    st = sub.stats()
    assert got[-1].seq == 102
    assert st["dropped"] > 0 and len(got) + 1 + st["dropped"] == 102 and st["gaps"] == st["dropped"]


def test_node_bus_groups_follow_capabilities(topic):
    node = msight_fast.NodeConfig(name="detector", backend="memory", options={"name": f"n-{topic}"})
    with msight_fast.connect_node(node) as bus:
        assert bus.subscribe(topic).group_id is None          # queue groups only when asked for
    node.group_id = "workers"
    with msight_fast.connect_node(node) as bus:
        assert bus.subscribe(topic).group_id == "workers"
