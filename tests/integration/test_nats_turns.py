"""Threads that share one NATS Bus: a long frame (sent as fragments, which its publisher waits to
see written) holds back no other thread's frame, long frames go one at a time, and a long frame
that cannot be written in time fails alone, counted; and a batch taken whole puts frames of one
message first. The socket is held up by a fault-injecting proxy in front of a real nats-server,
the loop thread by a callback that waits."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

import msight_fast
from msight_fast import encode, fragment
from msight_fast.backends import nats as nats_backend
from msight_fast.errors import BackendUnavailable

from ..faultproxy import UP, FaultProxy
from ..helpers import wait_for

nats = pytest.importorskip("nats")

pytestmark = [pytest.mark.integration]



def _most(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return default


# a long frame larger than all that can take it while the proxy reads nothing: the most the
# publisher's send buffer and the proxy's receive buffer may grow to, and the bytes asyncio may
# hold for the socket, so that its publisher is still waiting for its writes
_HELD = (_most("/proc/sys/net/ipv4/tcp_wmem", 4 << 20) + _most("/proc/sys/net/ipv4/tcp_rmem", 32 << 20)
         + nats_backend.DIRECT_HIGH_WATER + (8 << 20))
LONG = (-(-_HELD // (4096 * 3)), 4096, 3)


def _upstream(broker_pool: Any) -> Any:
    host, port = broker_pool("nats").options["servers"][0].rsplit("/", 1)[1].split(":")
    return host, int(port)


def _publish_in_thread(bus: Any, topic: str, a: np.ndarray, out: Dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out["frame"] = bus.publish(topic, a)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e
        out["done"] = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@contextlib.contextmanager
def _plain_listener(servers: List[str], *subjects: str) -> Iterator[List[str]]:
    """A plain nats-py client on a loop thread of its own: the subject of each message on
    ``subjects``, in the order they arrive."""
    arrivals: List[str] = []

    async def listen(nc: Any) -> None:
        async def note(msg: Any) -> None:
            arrivals.append(msg.subject)
        for subject in subjects:
            await nc.subscribe(subject, cb=note)
        await nc.flush()

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    nc = None
    try:
        nc = asyncio.run_coroutine_threadsafe(nats.connect(servers=servers), loop).result(30)
        asyncio.run_coroutine_threadsafe(listen(nc), loop).result(30)
        yield arrivals
    finally:
        if nc is not None:
            asyncio.run_coroutine_threadsafe(nc.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


def test_a_frame_of_one_message_passes_a_long_frame_held_up_and_long_frames_go_one_at_a_time(
        broker_pool: Any) -> None:
    long_topic, other = f"turns/long/{uuid.uuid4().hex[:8]}", f"turns/other/{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(21)
    first, second = rng.integers(0, 256, LONG, dtype=np.uint8), rng.integers(0, 256, LONG, dtype=np.uint8)
    small = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)      # 120 KB: one message
    with _plain_listener(broker_pool("nats").options["servers"], long_topic, other) as arrivals:
        with FaultProxy(_upstream(broker_pool)) as proxy, \
                msight_fast.connect("nats", servers=[f"nats://{proxy.host}:{proxy.port}"],
                                    publish_timeout_s=60) as bus, \
                msight_fast.connect("nats", **broker_pool("nats").options) as sub_bus, \
                sub_bus.subscribe(long_topic) as longs, sub_bus.subscribe(other) as others:
            assert 0 < bus._t.long_frame_bytes <= first.nbytes
            proxy.stall(direction=UP)
            a: Dict[str, Any] = {}
            ta = _publish_in_thread(bus, long_topic, first, a)
            # the first long frame is handed over, and its publisher waits for its writes out of turn
            wait_for(lambda: bus.published == 1 and bus._t._scheduled, "the first long frame to be handed over")
            c: Dict[str, Any] = {}
            tc = _publish_in_thread(bus, long_topic, second, c)
            bus.publish(other, small)                     # returns while the long frame is held up
            assert "done" not in a and "done" not in c
            assert bus.published == 2                     # the first long frame and this one
            resumed = time.time_ns()
            proxy.resume(direction=UP)
            ta.join(60)
            tc.join(60)
            assert "error" not in a and "error" not in c
            assert c["done"] >= a["done"]
            # the second long frame took its turn, and its publish time, only once the first was written
            assert c["frame"].publish_ts_ns > resumed > a["frame"].publish_ts_ns
            got_small = others.recv(30)
            got = [longs.recv(60), longs.recv(60)]
        assert got_small is not None and np.array_equal(got_small.array, small)
        assert [f.seq for f in got if f is not None] == [1, 2]
        assert np.array_equal(got[0].array, first) and np.array_equal(got[1].array, second)
        per_frame = len(fragment([encode(got[0])], bus._t.max_payload))
        assert per_frame > 8
        wait_for(lambda: arrivals.count(long_topic) == 2 * per_frame, "every fragment at the plain subscriber")
        # on the wire, the small frame went before the rest of the first long frame's fragments
        assert arrivals.index(other) < per_frame
        assert arrivals.count(other) == 1


def test_a_long_frame_not_written_in_time_fails_alone_counted_and_the_next_one_goes(broker_pool: Any) -> None:
    topic = f"turns/late/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(22).integers(0, 256, LONG, dtype=np.uint8)
    with FaultProxy(_upstream(broker_pool)) as proxy, \
            msight_fast.connect("nats", servers=[f"nats://{proxy.host}:{proxy.port}"],
                                publish_timeout_s=1.0) as bus, \
            msight_fast.connect("nats", **broker_pool("nats").options) as sub_bus, \
            sub_bus.subscribe(topic) as sub:
        proxy.stall(direction=UP)
        with pytest.raises(BackendUnavailable):
            bus.publish(topic, a)
        s = bus.stats()
        assert s["published"] == 0 and s["publish_errors"] == 1 and s["lost"] == 1
        assert not bus._long.locked() and not bus._lock.locked()
        proxy.resume(direction=UP)
        # the connection may have been dropped mid-frame (what was written of it cannot be
        # followed by anything else): the next publish goes once it is back
        deadline = time.monotonic() + 60
        while True:
            try:
                sent = bus.publish(topic, a)
                break
            except BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
        got = None
        while got is None or got.seq != sent.seq:
            got = sub.recv(60)
            assert got is not None
        assert np.array_equal(got.array, a)
        # the failed frame's number was used: its loss shows as a gap, as the publisher counted it
        assert sent.seq >= 2


def test_a_batch_taken_whole_puts_a_frame_of_one_message_before_a_fragmented_one(broker_pool: Any) -> None:
    """A fragmented frame and then another thread's frame of one message, both handed over while
    the loop thread is busy, are taken as one batch: the frame of one message is written first."""
    long_topic, other = f"turns/batch/{uuid.uuid4().hex[:8]}", f"turns/one/{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(23)
    big = rng.integers(0, 256, (800, 1000, 3), dtype=np.uint8)     # 2.4 MB: fragments under 1 MB
    small = b"x" * 1000
    with _plain_listener(broker_pool("nats").options["servers"], long_topic, other) as arrivals:
        with msight_fast.connect("nats", **broker_pool("nats").options) as bus:
            t = bus._t
            assert big.nbytes > t.max_payload
            sent = bus.publish(long_topic, big)           # starts the pull service, which needs the loop
            per_frame = len(fragment([encode(sent)], t.max_payload))
            assert per_frame > 1
            wait_for(lambda: arrivals.count(long_topic) == per_frame, "every fragment of the first frame")
            arrivals.clear()
            # the first frame's announcement and the rest of its hand-off are written by now
            wait_for(lambda: not t._q and not t._scheduled, "the hand-off to be empty")
            entered, gate = threading.Event(), threading.Event()

            def hold() -> None:
                entered.set()
                gate.wait(30)
            t._L.loop.call_soon_threadsafe(hold)
            assert entered.wait(30)
            assert not t._q
            try:
                a: Dict[str, Any] = {}
                ta = _publish_in_thread(bus, long_topic, big, a)
                wait_for(lambda: len(t._q) == per_frame, "the fragmented frame to be handed over")
                c: Dict[str, Any] = {}
                tc = _publish_in_thread(bus, other, small, c)
                wait_for(lambda: len(t._q) == per_frame + 1, "the frame of one message to be handed over")
            finally:
                gate.set()
            ta.join(60)
            tc.join(60)
            assert not ta.is_alive() and not tc.is_alive()
            assert "frame" in a and "frame" in c, (a, c)
            wait_for(lambda: len(arrivals) == per_frame + 1, "every message at the plain subscriber")
        assert arrivals == [other] + [long_topic] * per_frame
