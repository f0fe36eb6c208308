"""The backend contract (tests/contract.py) on the shared-memory backend: no broker, one
directory of its own under /dev/shm per test.

The buses copy each frame out of its slot (``zero_copy=False``): the contract keeps frames past
the next ``recv``, and a zero-copy frame's slot may then be written again. 64 slots per
publisher: bursts the contract publishes before reading fit in the ring.
"""
import os
import shutil
import sys
import tempfile
import threading
import uuid
import zlib
from typing import Any, Callable, Iterator, List

import numpy as np
import pytest

import msight_fast
from msight_fast.backends import shm
from msight_fast.stats import BusStats, SubscriptionStats

from .. import contract as _contract
from ..contract import *  # noqa: F401,F403 - the contract's tests, collected here
from ..helpers import wait_for

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shm backend needs Linux (futexes, /dev/shm)"),
    pytest.mark.skipif(shm._shm is None,
                       reason="the shm backend needs its compiled module, msight_fast._ext._shm, which is not built"),
]


MakeBus = Callable[..., msight_fast.Bus]


@pytest.fixture
def topic() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_bus() -> Iterator[MakeBus]:
    """connect("shm") in a fresh directory; every Bus made is closed after the test, and then the
    directory must hold no msf-* file."""
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="msf-test-")
    made: List[msight_fast.Bus] = []

    def make(**opts: Any) -> msight_fast.Bus:
        bus = msight_fast.connect("shm", **{"dir": d, "slots": 64, "zero_copy": False, **opts})
        made.append(bus)
        return bus

    try:
        yield make
    finally:
        for b in made:
            b.close()
        left = sorted(n for n in os.listdir(d) if n.startswith("msf-"))
        shutil.rmtree(d, ignore_errors=True)
    assert left == [], f"left behind in {d} after every Bus closed: {left}"


# What shm cannot pass, as the contract states it; each is shadowed here (the contract's function
# objects are shared with the other backends' modules, so they are not marked in place).

def test_two_broadcast_subscribers_each_get_every_frame_in_order(make_bus: MakeBus, topic: str) -> None:
    _contract.test_two_broadcast_subscribers_each_get_every_frame_in_order(make_bus, topic)


@pytest.mark.skip(reason="inherent to shm (best effort, readers do not hold the publisher back): 8 threads publish "
                  "2400 frames of up to 6 MB in about a second, faster than one reader copies them out, and the "
                  "64-slot ring overwrites what it has not read yet (counted in dropped and gaps)")
def test_concurrent_publishers_on_one_bus_keep_each_threads_order(make_bus: MakeBus, topic: str) -> None:
    _contract.test_concurrent_publishers_on_one_bus_keep_each_threads_order(make_bus, topic)


@pytest.mark.skip(reason="inherent to shm (best effort, a ring of 64 slots): 200 frames published in a tight loop "
                  "outrun the readers, which attach to the new segment when they wake; what the ring overwrote "
                  "first is counted in dropped")
def test_concurrent_readers_share_one_subscription(make_bus: MakeBus, topic: str) -> None:
    _contract.test_concurrent_readers_share_one_subscription(make_bus, topic)


def test_a_thread_per_publish(make_bus: MakeBus, topic: str) -> None:
    """shm's form of the contract's test: 100 threads, one 3.7 MB frame each, at once. The ring is
    best effort, so a reader that falls 64 frames behind such a burst loses the oldest (the
    contract's form failed that way once on a loaded machine); every frame read must still be
    whole, none may come twice, frames come in publish order, and each one not read is counted."""
    n = 100
    pub, sub = make_bus(publish_timeout_s=120), make_bus().subscribe(topic)
    got: List[Any] = []
    bad: List[Any] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            f = sub.recv(timeout=0.2)
            if f is not None:
                if zlib.crc32(f.data) != f.meta.get("crc", -1):
                    bad.append(f.meta)
                got.append((f.meta.get("thread"), f.seq))

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()

    def run(k: int) -> None:
        a = np.full(3_700_000, k, np.uint8)
        pub.publish(topic, a, meta={"thread": k, "i": 0, "crc": zlib.crc32(a)})

    try:
        errors = _contract._in_threads(run, n)
        pub.flush(60)
        wait_for(lambda: len(got) + sub.stats()["dropped"] >= n, "every frame received or counted as dropped", 60)
    finally:
        stop.set()
        rx.join(10)
    assert errors == [] and bad == []
    threads = [th for th, _ in got]
    assert len(set(threads)) == len(threads)                       # none twice
    assert [s for _, s in got] == sorted(s for _, s in got)        # publish order
    assert len(got) + sub.stats()["dropped"] == n                  # the rest counted
    assert len(got) > 0


def test_every_stats_key_is_declared(make_bus: MakeBus, topic: str) -> None:
    pub, sub = make_bus(), make_bus().subscribe(topic)
    pub.publish(topic, b"x")
    assert sub.recv(timeout=10) is not None
    declared_sub, declared_bus = set(SubscriptionStats.__annotations__), set(BusStats.__annotations__)
    assert set(sub.stats()) <= declared_sub, set(sub.stats()) - declared_sub
    assert set(pub.stats()) <= declared_bus, set(pub.stats()) - declared_bus
