"""NATS through real faults: kill -9 and restart, cluster failover, a server that is away or
stalled, and a queue group losing a member (many publishing threads on one Bus: tests/contract.py).

Every test starts its own nats-server(s) on free loopback ports. Recovery times are printed
(run with ``-s`` to see them) and bounded only to prove that nothing hangs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

import msight_fast
from msight_fast import brokers
from msight_fast.backends import nats as nats_backend
from msight_fast.errors import BackendUnavailable, MsightFastError, PublishError

from ..helpers import Receiver, raw_frame
from .conftest import collect, spawn_member, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SLACK = 4.0                     # seconds a bounded call may overrun its bound on a loaded machine


class Stream:
    """A publisher thread: 1 KB frames at ~500/s on ``small`` and (1080, 1920, 3) uint8 frames
    (6.2 MB, fragmented at the 1 MB max_payload) at ~10/s on ``big``."""

    def __init__(self, bus: msight_fast.Bus, small: str, big: str) -> None:
        self.bus, self.small, self.big = bus, small, big
        self.seqs: Dict[str, List[int]] = {small: [], big: []}
        self.errors: List[Tuple[float, BaseException]] = []
        self.attempts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self.thread.start()

    def _publish(self, topic: str, obj: object) -> None:
        try:
            self.seqs[topic].append(self.bus.publish(topic, obj).seq)
        except MsightFastError as e:
            self.errors.append((time.monotonic(), e))
        self.attempts += 1

    def _run(self) -> None:
        img = raw_frame(1080, 1920, seed=3)
        blob = bytes(1000)
        start = next_big = time.monotonic()
        n = 0
        while not self.stop.is_set():
            if time.monotonic() >= next_big:
                self._publish(self.big, img)
                next_big = max(next_big + 0.1, time.monotonic())   # no backlog after a long wait
            self._publish(self.small, blob)
            n += 1
            behind = time.monotonic() - (start + n * 0.002)
            if behind > 0.1:                 # after a long publish, resume the pace, no burst
                start, n = time.monotonic(), 0
            elif behind < 0:
                time.sleep(-behind)          # pacing the stream, not synchronising

    def last(self, topic: str) -> int:
        return self.seqs[topic][-1] if self.seqs[topic] else 0

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the publisher thread hung"


def _stop(*workers: object) -> None:
    """Stop the threads of a failed test before its Buses close under them."""
    for w in workers:
        if w is not None:
            w.stop.set()
            w.thread.join(30)


def _drain_and_account(stream: Stream, readers: Dict[str, Receiver], pub: msight_fast.Bus) -> Dict[str, int]:
    """Stop publishing, let the tail arrive, and check that every frame published is either
    received (once) or counted as a gap; frames the publisher counted lost are among the gaps."""
    stream.finish()
    try:
        pub.flush(30)
    except PublishError as e:
        # frames whose write the cut broke mid-way (a broken pipe) were counted lost when it
        # happened; the next flush reports them, once, and the one after it comes back clean
        failed = re.match(r"(\d+) frames failed: ", str(e))
        assert failed is not None, e
        assert pub.stats()["lost"] >= int(failed.group(1)), (e, pub.stats()["lost"])
        pub.flush(30)
    gaps = 0
    for topic, r in readers.items():
        last = stream.last(topic)
        wait_for(lambda r=r, last=last: last in r.seqs(), f"the last frame on {topic} (seq {last})", timeout=30)
        r.finish()
        got = r.seqs()
        st = r.sub.stats()
        assert len(got) == len(set(got)) and st["duplicates"] == 0
        assert set(got) <= set(stream.seqs[topic]) == set(range(1, last + 1))   # refusals take no seq
        assert st["dropped"] == 0
        assert len(got) + st["gaps"] == last, (topic, len(got), st["gaps"], last)
        gaps += st["gaps"]
    ps = pub.stats()
    assert ps["lost"] <= gaps                      # a frame lost at the publisher never arrived
    assert ps["publish_errors"] == len(stream.errors)
    assert all(isinstance(e, BackendUnavailable) for _, e in stream.errors), stream.errors[:3]
    return {"gaps": gaps, "lost": ps["lost"], "publish_errors": ps["publish_errors"],
            "published": sum(len(v) for v in stream.seqs.values())}


def _big_pending_conf(tmp_path: Path) -> List[str]:
    """Server arguments that keep a subscriber which falls behind on this shared machine from
    being dropped as a slow consumer: these tests count the losses of a cut, not of that."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_pending: 1GB\n")
    return ["-c", str(conf)]


def test_kill_9_and_restart_mid_stream(own_broker, topic, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="msight_fast")
    b = own_broker("nats", extra_args=_big_pending_conf(tmp_path))
    sub_bus = msight_fast.connect("nats", **b.options(), max_pending_bytes=1 << 30)
    pub = msight_fast.connect("nats", **b.options())
    stream = None
    readers: Dict[str, Receiver] = {}
    try:
        small, big = topic + ".small", topic + ".big"
        readers = {small: Receiver(sub_bus.subscribe(small)), big: Receiver(sub_bus.subscribe(big))}
        stream = Stream(pub, small, big)
        wait_for(lambda: len(readers[small].got) >= 200 and len(readers[big].got) >= 3, "frames before the kill")

        t_kill = time.monotonic()
        b.kill()
        wait_for(lambda: pub.stats()["disconnects"] >= 1 and sub_bus.stats()["disconnects"] >= 1,
                 "both Buses to notice the kill")
        before = {t: stream.last(t) for t in readers}      # published before the cut was known
        tried = stream.attempts
        wait_for(lambda: stream.attempts > tried, "a publish while the server is down")
        t_up = time.monotonic()                              # frames may flow before restart() returns
        b.restart()
        first = {t: wait_for(lambda r=readers[t], s=before[t]: r.first_after(s), f"frames on {t} after the restart",
                             timeout=30) for t in readers}
        wait_for(lambda: len(readers[small].seqs()) > before[small] + 500, "the stream to go on", timeout=60)
        counts = _drain_and_account(stream, readers, pub)

        ps, ss = pub.stats(), sub_bus.stats()
        assert ps["connected"] and ss["connected"]
        assert ps["reconnects"] >= 1 and ss["reconnects"] >= 1
        recovered = {t: first[t] - t_up for t in readers}
        print(f"\nNATS kill -9 + restart: down {t_up - t_kill:.2f} s; first frame after the restart began: "
              f"small {recovered[small]:.2f} s, big {recovered[big]:.2f} s; outage seen by the publisher "
              f"{ps['last_outage_s']:.2f} s, by the subscriber {ss['last_outage_s']:.2f} s; {counts}")
        assert recovered[small] < 5.0 + SLACK and recovered[big] < 5.0 + SLACK
        text = caplog.text
        assert text.count("NATS connection lost") == ps["disconnects"] + ss["disconnects"]
        assert "the server restarted" in text and "'max_pending'" not in text   # the cause, not the wrong advice
    finally:
        _stop(stream, *readers.values())
        pub.close()
        sub_bus.close()


def _cluster(own_broker, extra: List[str], n: int = 3) -> List[brokers.Broker]:
    ports = [brokers.free_port() for _ in range(n)]
    cports = [brokers.free_port() for _ in range(n)]
    mports = [brokers.free_port() for _ in range(n)]
    nodes = []
    for i in range(n):
        routes = ",".join(f"nats://127.0.0.1:{cports[j]}" for j in range(n) if j != i)
        nodes.append(own_broker("nats", port=ports[i], extra_args=[
            "--cluster_name", "msf", "--cluster", f"nats://127.0.0.1:{cports[i]}", "--routes", routes,
            "-m", str(mports[i])] + extra))

    def peers(i: int) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{mports[i]}/routez", timeout=5) as r:
            return len({x["remote_id"] for x in json.loads(r.read())["routes"]})
    wait_for(lambda: all(peers(i) == n - 1 for i in range(n)), "the cluster's routes", timeout=60, interval=0.1)
    return nodes


def test_cluster_failover(own_broker, topic, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="msight_fast")
    nodes = _cluster(own_broker, _big_pending_conf(tmp_path))
    pub = msight_fast.connect("nats", servers=[n.address for n in nodes])
    victim = next(n for n in nodes if n.port == pub._t.nc.connected_url.port)
    others = [n for n in nodes if n is not victim]
    sub_bus = msight_fast.connect("nats", servers=[n.address for n in others], max_pending_bytes=1 << 30)
    stream = None
    readers: Dict[str, Receiver] = {}
    try:
        assert sub_bus._t.nc.connected_url.port != victim.port
        small, big = topic + ".small", topic + ".big"
        readers = {small: Receiver(sub_bus.subscribe(small)), big: Receiver(sub_bus.subscribe(big))}
        stream = Stream(pub, small, big)
        # a second of stream first: nats-py waits reconnect_time_wait before retrying a server it
        # connected to less than that long ago, which would add 0.5 s to this measurement
        wait_for(lambda: len(readers[small].got) >= 500 and len(readers[big].got) >= 3, "frames before the kill")

        t_kill = time.monotonic()
        victim.kill()
        wait_for(lambda: pub.stats()["disconnects"] >= 1, "the publisher to notice the kill")
        before = {t: stream.last(t) for t in readers}
        first = {t: wait_for(lambda r=readers[t], s=before[t]: r.first_after(s), f"frames on {t} after the kill",
                             timeout=30) for t in readers}
        wait_for(lambda: len(readers[small].seqs()) > before[small] + 500, "the stream to go on", timeout=60)
        counts = _drain_and_account(stream, readers, pub)

        ps = pub.stats()
        assert stream.errors == [] and ps["publish_errors"] == 0       # no error reached publish()
        assert ps["connected"] and ps["reconnects"] >= 1
        assert pub._t.nc.connected_url.port in {n.port for n in others}
        assert sub_bus.stats()["disconnects"] == 0                      # its node stayed up
        flow = {t: first[t] - t_kill for t in readers}
        print(f"\nNATS cluster failover: publisher outage {ps['last_outage_s']:.3f} s; frames flow again "
              f"{flow[small]:.3f} s (small), {flow[big]:.3f} s (big) after the kill; {counts}")
        assert flow[small] < 2.0 + SLACK and flow[big] < 2.0 + SLACK
        assert "failed over from" in caplog.text
    finally:
        _stop(stream, *readers.values())
        pub.close()
        sub_bus.close()


def test_broker_down_publish_recv_flush_subscribe_are_bounded(own_broker, topic):
    b = own_broker("nats")
    bus = msight_fast.connect("nats", **b.options(), publish_timeout_s=2.0, connect_timeout_s=2.0)
    try:
        sub = bus.subscribe(topic)              # on the same Bus: resubscribed before its buffer is sent
        bus.publish(topic, b"before")
        assert len(collect(sub, 1, timeout=10)) == 1
        b.kill()
        wait_for(lambda: not bus.stats()["connected"], "the Bus to notice the kill")

        t = time.monotonic()
        assert sub.recv(timeout=1) is None                         # returns, never raises
        assert time.monotonic() - t < 1 + SLACK

        # Decision: while the server is away a publish succeeds into nats-py's reconnect buffer
        # (2 MB) as long as the frame fits; then it waits for the server up to
        # publish_timeout_s and raises BackendUnavailable. What was accepted is delivered once
        # the server is back, or counted lost.
        t = time.monotonic()
        with pytest.raises(BackendUnavailable):
            bus.publish(topic, raw_frame(1080, 1920))               # 6 MB never fits the buffer
        waited = time.monotonic() - t
        assert 2.0 * 0.9 <= waited < 2.0 + SLACK                    # it honoured publish_timeout_s
        accepted = 0
        refused = None
        for _ in range(10_000):
            t = time.monotonic()
            try:
                bus.publish(topic, bytes(1000))
                accepted += 1
            except BackendUnavailable as e:
                refused = e
                break
            finally:
                assert time.monotonic() - t < 2.0 + SLACK
        assert refused is not None and 1000 < accepted < 2100      # the buffer's 2 MB, then refusals
        assert "away" in str(refused)

        t = time.monotonic()
        with pytest.raises(BackendUnavailable):
            bus.subscribe(topic + ".later")
        assert time.monotonic() - t < 2.0 + 2 + SLACK
        t = time.monotonic()
        with pytest.raises(PublishError):
            bus.flush(timeout=1)
        assert time.monotonic() - t < 1 + SLACK
        st = bus.stats()
        assert not st["connected"] and st["disconnects"] == 1 and st["publish_errors"] == 2

        # admission counts what the loop thread holds as well as nats-py's buffer: at most the
        # message in its hand can overflow the buffer (refused by nats-py, counted lost)
        lost = bus.stats()["lost"]
        assert lost <= 2, f"{lost} of {accepted} frames admitted while away overflowed the reconnect buffer"
        b.restart()
        wait_for(lambda: bus.stats()["connected"], "the reconnect")
        got = collect(sub, accepted - lost, timeout=30)
        assert bus.stats()["lost"] == lost
        assert len(got) + lost == accepted and len({f.seq for f in got}) == len(got)
        assert sub.stats()["gaps"] == 0 or lost > 0
        print(f"\nNATS broker down: publish raised after {waited:.2f} s (publish_timeout_s 2); "
              f"{accepted} frames went to the reconnect buffer: {len(got)} delivered after the restart, {lost} lost")

        # accepted while the server is away, then closed before it came back: counted lost
        b.kill()
        wait_for(lambda: not bus.stats()["connected"], "the Bus to notice the second kill")
        for _ in range(10):
            bus.publish(topic, bytes(1000))
        t = time.monotonic()
        bus.close()
        assert time.monotonic() - t < 5 + 5 + 2 + SLACK
        assert bus.stats()["lost"] == lost + 10
    finally:
        bus.close()


@contextlib.contextmanager
def _to_be_stalled(own_broker, topic, publish_timeout_s):
    """A nats-server of the test's own, a Bus publishing to it and a subscription to ``topic``:
    (server, bus, sub). At the end the server runs again (SIGCONT, harmless if it does) and both
    Buses are closed, whatever happened."""
    b = own_broker("nats")
    bus = msight_fast.connect("nats", **b.options(), publish_timeout_s=publish_timeout_s)
    sub_bus = msight_fast.connect("nats", **b.options())
    try:
        yield b, bus, sub_bus.subscribe(topic)
    finally:
        b.resume()
        bus.close()
        sub_bus.close()


def test_stalled_server_publish_and_flush_are_bounded(own_broker, topic):
    with _to_be_stalled(own_broker, topic, 2.0) as (b, bus, sub):
        frame = raw_frame(1080, 1920)
        bus.publish(topic, frame)
        assert len(collect(sub, 1, timeout=20)) == 1
        b.pause()                                        # SIGSTOP: the sockets stay open, nothing is read
        refused = None
        for _ in range(100):
            t = time.monotonic()
            try:
                bus.publish(topic, frame)
            except BackendUnavailable as e:
                refused = e
                break
            finally:
                assert time.monotonic() - t < 2.0 + SLACK
        assert refused is not None and "takes no data" in str(refused)
        assert bus.stats()["lost"] >= 1
        # the refused frame's fragments are views of this array: none may be made or written from
        # it any more, or a frame of old and new bytes would reach the subscriber
        original = frame.copy()
        frame[:] = 7
        t = time.monotonic()
        with pytest.raises(PublishError):
            bus.flush(timeout=1)
        assert time.monotonic() - t < 1 + SLACK
        b.resume()
        last = bus.publish(topic, frame).seq
        bus.flush(30)
        seen: List[msight_fast.Frame] = []

        def got_last() -> bool:
            seen.extend(collect(sub, 1, timeout=1))
            return any(f.seq == last for f in seen)
        wait_for(got_last, "a frame after the stall", timeout=60)
        for f in seen:
            assert np.array_equal(f.array, original) or bool((f.array == 7).all()), f.seq
        st = sub.stats()
        assert st["rejected"] == 0 and st["duplicates"] == 0


def test_a_frame_sent_again_after_a_give_up_arrives(own_broker, topic):
    # one Frame object published until a stalled server makes a publish give up part way, then
    # published again once it is back: every sending that publish accepted arrives, and so does
    # the retry (it has the given-up sending's seq and a new stamp; that sending's part expires)
    with _to_be_stalled(own_broker, topic, 1.0) as (b, bus, sub):
        arr = raw_frame(1080, 1920)
        frame = msight_fast.Frame.from_array(arr, sensor_name="cam")
        accepted = [bus.publish(topic, frame).seq]
        assert [f.seq for f in collect(sub, 1, timeout=20)] == accepted
        b.pause()
        gave_up = False
        for _ in range(100):
            try:
                accepted.append(bus.publish(topic, frame).seq)
            except BackendUnavailable:
                gave_up = True
                break
        assert gave_up
        b.resume()
        accepted.append(bus.publish(topic, frame).seq)
        bus.flush(30)
        got = collect(sub, len(accepted) - 1, timeout=60)
        assert [f.seq for f in got] == accepted[1:]
        assert {f.frame_id for f in got} == {frame.frame_id}
        assert all(np.array_equal(f.array, arr) for f in got)
        assert sub.stats()["duplicates"] == 0 and sub.stats()["rejected"] == 0
        # the given-up sending was counted lost, and the part of it the server passed on expires
        assert bus.stats()["lost"] >= 1
        wait_for(lambda: sub.stats()["fragments_expired"] >= 1, "the given-up sending's part to expire", timeout=30)


def test_a_stalled_server_holding_unsent_frames_is_left_for_another(own_broker, topic, monkeypatch):
    """A server that stops reading (SIGSTOP: no reset, its window closes) while 6 MB frames fill
    the connection's buffers: the unanswered PINGs must move the publisher to the other server
    while the first is still stopped, though the old connection can never send what it holds."""
    a, b = own_broker("nats"), own_broker("nats")
    monkeypatch.setattr(nats_backend, "PING_INTERVAL_S", 0.5)     # stale after ~2 s, not 30-40 s
    pub = msight_fast.connect("nats", servers=[a.address, b.address], publish_timeout_s=1.0, connect_timeout_s=2.0)
    monkeypatch.undo()
    victim, other = (a, b) if pub._t.nc.connected_url.port == a.port else (b, a)
    sub_bus = msight_fast.connect("nats", **other.options())
    try:
        sub = sub_bus.subscribe(topic)
        frame = raw_frame(1080, 1920)
        victim.pause()
        t0 = time.monotonic()

        def through_the_other() -> Optional[msight_fast.Frame]:
            try:
                pub.publish(topic, frame)
            except BackendUnavailable:
                pass
            return sub.recv(timeout=0.2)
        wait_for(through_the_other, "a frame through the other server while the first is stopped", timeout=30)
        print(f"\nNATS stalled server left after {time.monotonic() - t0:.2f} s (PINGs every 0.5 s)")
        assert victim.alive() and pub.stats()["disconnects"] >= 1
        assert pub._t.nc.connected_url.port == other.port
    finally:
        victim.proc.send_signal(signal.SIGCONT)
        pub.close()
        sub_bus.close()


def _lines(path: Path) -> List[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("how", ["kill", "close"])
def test_queue_group_member_lost_survivor_keeps_receiving(broker_pool, topic, tmp_path, how):
    info = broker_pool("nats")
    pub = msight_fast.connect("nats", **info.options)
    survivor = msight_fast.connect("nats", **info.options)
    s1 = survivor.subscribe(topic, group_id="workers")
    out = tmp_path / "member.txt"
    other_bus = None
    proc = None
    s2 = None
    try:
        if how == "kill":
            proc = spawn_member("nats", info.options, topic, out, group="workers", seconds=120)
        else:
            other_bus = msight_fast.connect("nats", **info.options)
            s2 = other_bus.subscribe(topic, group_id="workers")
            assert s2.stats()["gaps"] is None
        got1: List[int] = []
        got2: List[int] = []

        def both_served() -> bool:
            pub.publish(topic, bytes(1000))
            for s, got in ((s1, got1), (s2, got2)):
                f = s.recv(timeout=0.01) if s is not None else None
                if f is not None:
                    got.append(f.seq)
            return bool(got1) and (bool(got2) if s2 is not None else bool(_lines(out)))
        wait_for(both_served, "both members to get frames", timeout=60)
        assert s1.stats()["gaps"] is None                              # a member sees part of the stream

        if how == "kill":
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        else:
            other_bus.close()
        # the server forgets the member when it sees the connection end; from then on the
        # survivor gets every frame
        for attempt in range(20):  # noqa: B007 - reported after the loop
            batch = [pub.publish(topic, bytes(1000)).seq for _ in range(20)]
            pub.flush(10)
            got = {f.seq for f in collect(s1, 20, timeout=5)} & set(batch)
            if got == set(batch):
                break
        else:
            pytest.fail("the survivor never got every frame after the member was lost")
        img = raw_frame(1080, 1920, seed=5)                            # fragmented: pulled from the publisher
        seq = pub.publish(topic, img).seq
        f = wait_for(lambda: next((f for f in collect(s1, 1, timeout=1) if f.seq == seq), None),
                     "the fragmented frame", timeout=30)
        assert np.array_equal(f.array, img)
        assert s1.stats()["gaps"] is None
        print(f"\nNATS queue group, member {how}: the survivor got every frame after {attempt + 1} batch(es)")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for bb in (pub, survivor, other_bus):
            if bb is not None:
                bb.close()
