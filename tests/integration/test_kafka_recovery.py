"""Kafka through broker crashes, a failed producer and a killed group member, on a tansu of the
test's own (memory storage: a restart loses topics, groups, offsets and producer state); and, on
the session's broker, a watcher thread meeting an error it did not expect, ack() after close, and
a partition's log starting over under one assignment.

Recovery times are printed as ``MEASURE`` lines (run with ``-s`` to see them); nothing asserts
speed beyond bounds that prove no call hangs.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

import msight_fast
from msight_fast import BackendUnavailable, MsightFastError, PublishError

from ..helpers import Receiver, raw_frame
from .conftest import spawn_member, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SLACK_S = 4.0                    # on top of publish_timeout_s: a loaded 2-core box, never a hang


def _measure(what: str, value: float) -> None:
    print(f"MEASURE {what}: {value:.2f} s", flush=True)


class Streamer:
    """One thread publishing 1 KB frames at ~500/s with a (1080, 1920, 3) frame in every 50 (~10/s),
    noting each publish that succeeded (seq, start time) and each that raised (time, duration, type)."""

    def __init__(self, bus: msight_fast.Bus, topic: str, rate_hz: float = 500.0, big_every: int = 50) -> None:
        self.bus, self.topic, self.period, self.big_every = bus, topic, 1.0 / rate_hz, big_every
        self.ok: List[Tuple[int, float]] = []
        self.errors: List[Tuple[float, float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        small, big = np.arange(1024, dtype=np.uint8), raw_frame(1080, 1920, seed=3)
        i, next_t = 0, time.monotonic()
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                f = self.bus.publish(self.topic, big if i % self.big_every == 0 else small)
                self.ok.append((f.seq, t))
            except MsightFastError as e:
                self.errors.append((t, time.monotonic() - t, type(e).__name__))
            except Exception as e:  # noqa: BLE001 - a raw client exception is a failure of the test
                self.errors.append((t, time.monotonic() - t, "RAW " + repr(e)))
            i += 1
            next_t = max(next_t + self.period, time.monotonic() - 0.5)   # no burst after a stall
            self.stop.wait(max(0.0, next_t - time.monotonic()))           # pacing, not synchronisation

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_broker_killed_mid_stream_and_restarted(own_broker, topic):
    """kill -9 under 1 KB and 6 MB frames, restart on the same port: the same Bus and Subscription
    carry on, and every frame published is received or counted (gap or lost)."""
    b = own_broker("kafka")
    bus = msight_fast.connect("kafka", servers=[b.address], publish_timeout_s=2.0)
    try:
        sub = bus.subscribe(topic)
        rx = Receiver(sub)
        tx = Streamer(bus, topic)
        wait_for(lambda: len(rx.got) > 300, "the stream to flow", timeout=60)
        t_kill = time.monotonic()
        b.kill()
        wait_for(lambda: not bus.stats()["connected"], "the Bus to notice the broker gone", timeout=30)
        _measure("kafka kill: outage noticed after", time.monotonic() - t_kill)
        # the producer queue fills (6 MB frames), then publishes give up at their deadline
        wait_for(lambda: any(t >= t_kill for t, _, _ in tx.errors), "a publish to give up", timeout=60)
        b.restart()
        t_up = time.monotonic()
        wait_for(lambda: rx.got and rx.got[-1][1] > t_up, "a frame after the restart", timeout=60)
        _measure("kafka restart: first frame received after", rx.got[-1][1] - t_up)
        wait_for(lambda: bus.stats()["connected"], "the Bus to see the broker back", timeout=30)
        wait_for(lambda: any(t > t_up for _, t in tx.ok), "a publish after the restart", timeout=30)
        first_new = min(s for s, t in tx.ok if t > t_up)
        wait_for(lambda: first_new in rx.seq_set(), "the first frame published after the restart", timeout=60)
        _measure("kafka restart: first frame published after the restart received after",
                 dict(rx.got)[first_new] - t_up)
        wait_for(lambda: len([1 for _, t in rx.got if t > t_up]) >= 1000, "the stream to flow again", timeout=60)
        tx.finish()
        bus.flush(60)
        last = tx.ok[-1][0]
        wait_for(lambda: last in rx.seq_set(), "the last frame", timeout=60)
        rx.finish()

        published = [s for s, _ in tx.ok]
        assert published == list(range(1, last + 1))         # a refused publish leaves no gap
        assert not [e for e in tx.errors if e[2].startswith("RAW")], tx.errors
        assert all(d < 2.0 + SLACK_S for _, d, _ in tx.errors), tx.errors   # bounded by publish_timeout_s
        received = rx.seq_set()
        missing = set(published) - received
        st, bst = sub.stats(), bus.stats()
        print(f"MEASURE kafka kill: published {last}, received {len(received)}, missing {len(missing)}, "
              f"gaps {st['gaps']}, lost {bst['lost']}, duplicates {st['duplicates']}, publish errors "
              f"{len(tx.errors)}, offset_resets {st['offset_resets']}", flush=True)
        assert len(missing) <= st["gaps"] + bst["lost"]      # every frame received or counted
        after = {s for s, t in tx.ok if t > t_up}
        assert after <= received                              # nothing published after the restart is lost
        assert bst["disconnects"] >= 1 and bst["reconnects"] >= 1 and bst["connected"]
        assert bst["topics_recreated"] >= 1 and st["assigned_partitions"]
    finally:
        bus.close()


def test_publish_while_broker_down_raises_in_time_then_works(own_broker, topic):
    b = own_broker("kafka")
    bus = msight_fast.connect("kafka", servers=[b.address], publish_timeout_s=2.0)
    reader = msight_fast.connect("kafka", servers=[b.address])
    try:
        sub = reader.subscribe(topic)
        bus.publish(topic, b"before")
        bus.flush(30)
        assert sub.recv(timeout=30) is not None
        b.kill()
        wait_for(lambda: not bus.stats()["connected"], "the Bus to notice the broker gone", timeout=30)
        big = raw_frame(1080, 1920, seed=1)
        raised: Optional[BaseException] = None
        for _ in range(20):                  # the 16 MB producer queue takes a few 6 MB frames
            t0 = time.monotonic()
            try:
                bus.publish(topic, big)
            except MsightFastError as e:
                raised = e
            took = time.monotonic() - t0
            assert took < 2.0 + SLACK_S, f"publish took {took:.1f} s with publish_timeout_s=2"
            if raised is not None:
                break
        assert isinstance(raised, BackendUnavailable), raised
        _measure("kafka down: publish raised BackendUnavailable after", took)
        b.restart()
        t_up = time.monotonic()
        f = wait_for(lambda: _try_publish(bus, topic, b"after"), "a publish to succeed again", timeout=60)
        _measure("kafka down: publish works again after the restart in", time.monotonic() - t_up)
        bus.flush(60)
        wait_for(lambda: _recv_seq(sub, f.seq), "the frame published after the restart", timeout=60)
        _measure("kafka down: that frame received after the restart in", time.monotonic() - t_up)
        assert bus.stats()["reconnects"] >= 1
    finally:
        bus.close()
        reader.close()


def _try_publish(bus: msight_fast.Bus, topic: str, data: bytes):
    try:
        return bus.publish(topic, data)
    except MsightFastError:
        return None


def _recv_seq(sub: msight_fast.Subscription, seq: int) -> bool:
    f = sub.recv(timeout=0.5)
    return f is not None and f.seq >= seq and bytes(f.data) == b"after"


def test_fatal_idempotent_producer_is_replaced(own_broker, topic):
    """An idempotent producer whose state the broker lost (tansu restarted under it): publish
    raises a msight_fast error, never librdkafka's, and a later publish goes out on a new producer."""
    b = own_broker("kafka")
    bus = msight_fast.connect("kafka", servers=[b.address], publish_timeout_s=2.0,
                              producer_config={"enable.idempotence": True})
    try:
        assert bus.stats()["idempotent"]
        stop = threading.Event()
        outcomes: List[Tuple[float, Optional[BaseException]]] = []
        published: List[Tuple[float, int]] = []       # (when the publish began, seq) of those accepted

        def stream() -> None:              # messages in flight when the broker dies
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    published.append((t0, bus.publish(topic, np.arange(1024, dtype=np.uint8)).seq))
                    outcomes.append((time.monotonic(), None))
                except Exception as e:  # noqa: BLE001 - inspected below
                    outcomes.append((time.monotonic(), e))
                stop.wait(0.002)           # pacing

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        wait_for(lambda: len(outcomes) > 200, "the stream to flow", timeout=30)
        b.kill()
        b.restart()
        t_up = time.monotonic()
        # the topic back at once, as another client would make it: the producer's retries then
        # meet the broker's missing producer state (librdkafka: fatal, or an endless epoch bump)
        # before the Bus's own recovery can see the topic gone
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": b.address})
        try:
            admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(30)
        except KafkaException:
            pass                           # the Bus's recovery was first: it exists either way
        wait_for(lambda: bus.stats()["producer_recreated"] >= 1, "the producer to be replaced", timeout=60)
        t_new = time.monotonic()           # publishes begun from now on go to the new producer
        _measure("kafka fatal: producer replaced after the restart in", t_new - t_up)
        # (the old producer may have accepted publishes after the restart too: not enough)
        wait_for(lambda: len([1 for t, _ in published if t > t_new]) >= 50, "publishes on the new producer",
                 timeout=60)
        stop.set()
        th.join(30)
        errors = [e for _, e in outcomes if e is not None]
        assert all(isinstance(e, MsightFastError) for e in errors), errors[:5]
        replaced = [e for e in errors if isinstance(e, PublishError) and "new producer" in str(e)]
        # the fatal error reaches a publish as a PublishError naming the new producer, or, when a
        # batch of these small frames met it in the linger thread, is counted there (the frames of
        # that batch and what the old producer held: lost); either way no librdkafka error escapes
        assert replaced or bus.stats()["lost"] > 0, (errors[:5], bus.stats()["lost"])
        if replaced:
            print(f"MEASURE kafka fatal: {replaced[0]}", flush=True)
        try:
            bus.flush(30)
        except PublishError as e:
            # deliveries the old producer failed before it was condemned (the broker had forgotten
            # its id) are reported once, by the next flush; they were counted lost when they failed
            assert "deliveries failed" in str(e), e
            assert bus.stats()["lost"] >= len(e.failures), (e, bus.stats()["lost"])
            bus.flush(30)                  # reported once: the new producer then flushes clean
        # every frame accepted after the restart is in the log (the broker stays up from then on)
        # or counted lost (held by the producer that was thrown away); after the replacement, all
        # of them are in the log
        after_up = {s for t, s in published if t > t_up}
        on_new = {s for t, s in published if t > t_new}
        with msight_fast.connect("kafka", servers=[b.address]) as reader:
            rx = Receiver(reader.subscribe(topic, from_beginning=True))
            try:
                wait_for(lambda: on_new <= rx.seq_set(), "every frame published on the new producer", timeout=60)
                wait_for(lambda: len(after_up - rx.seq_set()) <= bus.stats()["lost"],
                         "every frame published after the restart received or counted lost", timeout=30)
            finally:
                rx.finish()
        print(f"MEASURE kafka fatal: after the restart {len(after_up)} accepted, "
              f"{len(after_up - rx.seq_set())} not in the log, lost {bus.stats()['lost']}", flush=True)
    finally:
        bus.close()


def _seqs(path: Path) -> List[int]:
    # the last line may be half written when the child is killed
    return [int(x) for x in path.read_text().split("\n")[:-1] if x] if path.exists() else []


def test_group_member_killed_survivor_delivers_everything(own_broker, topic, tmp_path):
    b = own_broker("kafka")
    opts = {"servers": [b.address]}
    pub = msight_fast.connect("kafka", **opts, partition_key="frame")   # frames spread over the partitions
    mine = msight_fast.connect("kafka", **opts)
    out = tmp_path / "child.txt"
    child = None
    try:
        sub = mine.subscribe(topic, group_id="pair")
        child = spawn_member("kafka", opts, topic, out, group="pair", seconds=120)
        wait_for(lambda: _recv_rebalanced(sub), "the group to share the partitions", timeout=90)
        rx = Receiver(sub)
        stop = threading.Event()
        sent: List[int] = []
        refused: List[MsightFastError] = []

        def stream() -> None:
            while not stop.is_set():
                try:                       # a refused frame takes no seq: `sent` stays 1..n
                    sent.append(pub.publish(topic, np.arange(2048, dtype=np.uint8)).seq)
                except MsightFastError as e:
                    refused.append(e)
                stop.wait(0.005)           # pacing

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        wait_for(lambda: len(_seqs(out)) > 200 and len(rx.got) > 200, "both members to receive", timeout=60)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        t_kill = time.monotonic()
        wait_for(lambda: len(sub.stats()["assigned_partitions"]) == 4, "the survivor to take every partition",
                 timeout=90)
        _measure("kafka group: survivor owns every partition after the kill in", time.monotonic() - t_kill)
        n_then = len(sent)
        wait_for(lambda: len(sent) > n_then + 200, "more frames", timeout=60)
        stop.set()
        th.join(30)
        assert not th.is_alive()
        pub.flush(60)
        everything = set(sent)
        assert sorted(sent) == list(range(1, len(sent) + 1))
        wait_for(lambda: everything <= set(_seqs(out)) | rx.seq_set(), "every frame to be delivered", timeout=90)
        _measure("kafka group: every frame delivered after the kill in", time.monotonic() - t_kill)
        rx.finish()
        theirs, ours = set(_seqs(out)), rx.seq_set()
        both = theirs & ours
        st = sub.stats()
        print(f"MEASURE kafka group: sent {len(sent)}, child {len(theirs)}, survivor {len(ours)}, "
              f"delivered to both {len(both)}, survivor replayed {st['replayed']}, redelivered {st['redelivered']}, "
              f"duplicates {st['duplicates']}, lag {st['lag']}, publishes refused {len(refused)}", flush=True)
        assert st["gaps"] is None                                # another member's frame is no gap
        assert st["replayed"] > 0                                # the takeover is counted...
        assert len(both) <= st["replayed"] + st["redelivered"]   # ...and bounds the real repeats
        wait_for(lambda: sub.stats()["lag"] == 0, "the survivor's lag to read 0 (nothing left unread)", timeout=30)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
        pub.close()
        mine.close()


def _recv_rebalanced(sub: msight_fast.Subscription) -> bool:
    sub.recv(timeout=0.2)                # keeps the member taking part while the group rebalances
    return len(sub.stats()["assigned_partitions"]) == 2


def test_the_watcher_outlives_an_unexpected_error(broker_pool):
    """An error the watcher thread does not expect (one injected into its probe here) must not
    end it: nobody would notice the broker back, and ack() would be refused for good."""
    bus = msight_fast.connect("kafka", **broker_pool("kafka").options)
    try:
        t = bus._t
        real, calls = t._probe, []

        def probe_failing_once() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected")
            real()

        t._probe = probe_failing_once
        t.mark_down("an outage the test made up")
        assert not bus.stats()["connected"]
        wait_for(lambda: len(calls) >= 2 and bus.stats()["connected"], "the watcher to probe again", timeout=30)
        assert t._watcher.is_alive()
    finally:
        bus.close()


def test_ack_after_close_returns_at_once(broker_pool, topic):
    bus = msight_fast.connect("kafka", **broker_pool("kafka").options)
    try:
        sub = bus.subscribe(topic)
        sub.close()
        t0 = time.monotonic()
        sub.ack()                           # close() committed what was handed: nothing to wait for
        assert time.monotonic() - t0 < SLACK_S
    finally:
        bus.close()


class _Fetched:
    """A fetched message as KafkaSource.next reads it. Used only where a real broker cannot be
    made to do it on cue: hand a member, under one assignment, a log that started over."""

    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return b"x"

    def __len__(self) -> int:
        return 1


def test_offsets_of_a_log_that_started_over_are_stored_for_the_new_log(broker_pool, topic):
    """A partition's log starts over under one assignment (a broker that lost it): what the old
    log left unreleased (a fragment of a frame never completed) must neither hold back nor be
    taken for the new log's messages at the same offsets: every new message handed is committed."""
    from confluent_kafka import Consumer, TopicPartition

    opts = broker_pool("kafka").options
    group = f"g-{topic}"
    bus = msight_fast.connect("kafka", **opts)
    try:
        sub = bus.subscribe(topic, group_id=group)
        src = sub._src
        p = sub.stats()["assigned_partitions"][0]

        def fetch(offsets: range) -> List[Tuple[bytes, object]]:
            with src._lock:                 # as the poll thread hands a fetched batch over
                src._q.append(([_Fetched(p, o) for o in offsets], 0))
                src._lock.notify_all()
            got = [src.next(5.0) for _ in offsets]
            assert all(g is not None for g in got)
            return got                      # type: ignore[return-value]

        (_, t100), (_, t101) = fetch(range(100, 102))
        src.handed(None, [t101])            # 100 is a fragment whose frame never completes
        for _, token in fetch(range(102)):      # the new log, past the old one's offsets
            src.handed(None, [token])
        src.handed(None, [t100])            # the old frame given up on, after all that
        for _, token in fetch(range(102, 104)):
            src.handed(None, [token])
        sub.ack()
        c = Consumer({"bootstrap.servers": ",".join(opts["servers"]), "group.id": group})
        try:
            committed = c.committed([TopicPartition(topic, p)], timeout=30)[0].offset
        finally:
            c.close()
        assert committed == 104
    finally:
        bus.close()
