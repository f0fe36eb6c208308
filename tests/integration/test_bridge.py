"""The Bridge between real brokers: Redis -> NATS and NATS -> Kafka with a 1080p frame (fragmented on
NATS and Kafka) and a bytes frame, and a destination broker killed and restarted under a stream
(msight_fast/bridge.py).

Recovery times are printed as ``MEASURE`` lines (run with ``-s`` to see them); nothing asserts
speed beyond bounds that prove no call hangs.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List

import numpy as np
import pytest

import msight_fast
from msight_fast import MsightFastError
from msight_fast.bridge import Bridge

from ..helpers import Receiver, raw_frame, real_jpeg
from .conftest import collect, wait_for

pytestmark = pytest.mark.integration
SLACK_S = 4.0                    # a loaded 2-core machine: bounds prove that nothing hangs, no more


@pytest.fixture
def connect_to(broker_pool):
    """connect(kind) to the session's broker of that kind; every Bus made is closed after the test."""
    made: List[msight_fast.Bus] = []

    def make(kind, **opts):
        bus = msight_fast.connect(kind, **{**broker_pool(kind).options, **opts})
        made.append(bus)
        return bus

    yield make
    for b in made:
        b.close()


def _bridge_threads():
    return [t for t in threading.enumerate() if t.name.startswith("msight-fast-bridge ")]


@pytest.mark.parametrize("src_kind,dst_kind", [("redis", "nats"), ("nats", "kafka")])
def test_frames_cross_bit_exact(connect_to, topic, src_kind, dst_kind):
    src, dst, rx = connect_to(src_kind), connect_to(dst_kind), connect_to(dst_kind)
    img_topic, blob_topic = topic + "_img", topic + "_blob"
    subs = {t: rx.subscribe(t) for t in (img_topic, blob_topic)}
    with Bridge([img_topic, blob_topic], src=src, dst=dst) as bridge:
        img = src.publish(img_topic, raw_frame(1080, 1920, seed=5), sensor_name="front_cam", device_name="rsu-3",
                          encoding="bgr8", frame_id=901, capture_ts_ns=1_700_000_000_000_000_001,
                          meta={"exposure_us": 900, "gain": 2.25, "site": "mcity"})
        blob = src.publish(blob_topic, real_jpeg(), encoding="jpeg", capture_ts_ns=123, meta={"q": 85})
        src.flush(30)
        limit = dst._t.max_message(img_topic)
        assert limit is not None and img.nbytes > limit          # the 1080p frame is fragmented on dst
        got = {t: collect(s, 1, timeout=90) for t, s in subs.items()}
        wait_for(lambda: all(s["forwarded"] == 1 for s in bridge.stats().values()), "the counters", timeout=60)
    assert not _bridge_threads()
    for sent, t in ((img, img_topic), (blob, blob_topic)):
        assert len(got[t]) == 1, t
        f = got[t][0]
        assert (f.sensor_name, f.device_name, f.encoding, f.frame_id, f.capture_ts_ns, f.creation_ts_ns, f.meta) == \
            (sent.sensor_name, sent.device_name, sent.encoding, sent.frame_id, sent.capture_ts_ns,
             sent.creation_ts_ns, sent.meta)
        assert bytes(f.data) == bytes(sent.data)
        assert (f.seq, f.publisher_id) == (1, dst.publisher_id)
    a = got[img_topic][0].array
    assert a is not None and a.shape == (1080, 1920, 3) and a.dtype == np.uint8
    assert got[blob_topic][0].array is None
    for t, st in bridge.stats().items():
        assert (st["received"], st["forwarded"], st["failed"], st["gaps"], st["undelivered"]) == (1, 1, 0, 0, 0), t
        assert st["dst_publish_errors"] == 0


class _Stream:
    """Publishes on the source: 1 KB frames at ~100/s on ``small`` and (1080, 1920, 3) uint8 frames
    at ~3/s on ``big`` (these do not fit NATS's reconnect buffer: while the server is away their
    publishes on the destination give up, and are counted)."""

    def __init__(self, bus: msight_fast.Bus, small: str, big: str) -> None:
        self.bus, self.small, self.big = bus, small, big
        self.sent: Dict[str, int] = {small: 0, big: 0}
        self.errors: List[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        img, blob = raw_frame(1080, 1920, seed=7), bytes(1000)
        i = 0
        while not self.stop.is_set():
            for t, obj in ((self.small, blob),) + (((self.big, img),) if i % 33 == 0 else ()):
                try:
                    self.bus.publish(t, obj, meta={"i": i})
                    self.sent[t] += 1
                except MsightFastError as e:       # the source broker stays up: none expected
                    self.errors.append(e)
            i += 1
            self.stop.wait(0.01)                   # pacing the stream, not synchronising

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the publisher thread hung"


def test_destination_killed_and_restarted_forwarding_resumes_and_the_loss_is_counted(
        broker_pool, own_broker, topic, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="msight_fast")
    conf = tmp_path / "nats.conf"
    conf.write_text("max_pending: 1GB\n")          # a receiver behind on this shared machine is not cut off
    b = own_broker("nats", extra_args=["-c", str(conf)])
    src = msight_fast.connect("redis", **broker_pool("redis").options)
    dst = msight_fast.connect("nats", **b.options(), publish_timeout_s=1.0)
    rx_bus = msight_fast.connect("nats", **b.options(), max_pending_bytes=1 << 30)
    small, big = topic + ".small", topic + ".big"
    stream = None
    readers: Dict[str, Receiver] = {}
    bridge = Bridge([small, big], src=src, dst=dst)
    try:
        readers = {t: Receiver(rx_bus.subscribe(t)) for t in (small, big)}
        bridge.start()
        stream = _Stream(src, small, big)
        wait_for(lambda: len(readers[small].got) >= 100 and len(readers[big].got) >= 2, "frames before the kill",
                 timeout=60)

        t_kill = time.monotonic()
        b.kill()
        wait_for(lambda: bridge.stats()[big]["failed"] >= 1, "a forward to give up while the server is away",
                 timeout=60)
        before = {t: bridge.stats()[t]["forwarded"] for t in readers}   # dst seqs handed out before the restart
        t_up = time.monotonic()
        b.restart()
        first = {t: wait_for(lambda r=readers[t], s=before[t]: r.first_after(s), f"frames on {t} after the restart",
                             timeout=60) for t in readers}
        wait_for(lambda: len(readers[small].got) > before[small] + 200, "the stream to go on", timeout=60)
        stream.finish()
        src.flush(30)
        assert not stream.errors, stream.errors[:3]

        # every frame published on the source reached the bridge or is a gap there
        wait_for(lambda: all(bridge.stats()[t]["received"] + bridge.stats()[t]["gaps"] == stream.sent[t]
                             for t in readers), "the bridge to receive the last frames", timeout=60)
        wait_for(lambda: all(bridge.stats()[t]["received"] == bridge.stats()[t]["forwarded"]
                             + bridge.stats()[t]["failed"] for t in readers), "the last forwards", timeout=60)
        st = bridge.stop()
        assert not _bridge_threads()
        lost_total = 0
        for t, r in readers.items():
            last = st[t]["forwarded"]                # dst numbers the frames it took 1..forwarded
            wait_for(lambda r=r, last=last: last in r.seq_set(), f"the last frame forwarded on {t}", timeout=60)
            r.finish()
            got = r.seqs()
            rs = r.sub.stats()
            assert len(got) == len(set(got)) and set(got) <= set(range(1, last + 1))
            assert len(got) + rs["gaps"] == last, (t, len(got), rs["gaps"], last)     # lost after the bridge
            s = st[t]
            assert s["received"] == s["forwarded"] + s["failed"] and s["dropped"] == 0
            assert set(s["failed_by"]) <= {"BackendUnavailable"}, s["failed_by"]
            # every frame published was received, or counted: at the source, by the bridge, at dst
            lost = s["gaps"] + s["failed"] + rs["gaps"]
            assert len(got) + lost == stream.sent[t], (t, len(got), s, rs["gaps"], stream.sent[t])
            lost_total += lost
        assert st[big]["failed"] >= 1 and lost_total >= st[big]["failed"]
        ds = dst.stats()
        assert ds["connected"] and ds["reconnects"] >= 1 and ds["publish_errors"] >= st[big]["failed"]
        assert "not forwarded" in caplog.text
        recovered = {t: first[t] - t_up for t in readers}
        print(f"\nMEASURE bridge redis -> nats, nats kill -9 + restart: down {t_up - t_kill:.2f} s; first frame at "
              f"the destination after the restart began: small {recovered[small]:.2f} s, big {recovered[big]:.2f} s; "
              f"published {stream.sent}, forwarded {[st[t]['forwarded'] for t in readers]}, failed "
              f"{[st[t]['failed'] for t in readers]}, gaps at dst {[readers[t].sub.stats()['gaps'] for t in readers]}",
              flush=True)
        assert max(recovered.values()) < 5.0 + SLACK_S
    finally:
        for w in [stream, *readers.values()]:
            if w is not None:
                w.stop.set()
                w.thread.join(30)
        bridge.stop()
        for bus in (src, dst, rx_bus):
            bus.close()
