"""Kafka batching of small frames (docs/wire-format.md 2a, and 2b's shared header) on the session's
tansu broker: what goes on the wire at the edges of the size bounds, order and completeness from several threads, mixed
sizes, the linger, flush and close, at-least-once across a consumer that stops or dies mid-batch,
malformed batches, and a time start inside a batch.

Every Bus here publishes with one key (its publisher id), so its frames land on one partition in
the order it sent them; a bare confluent-kafka consumer reads that partition to see the messages.
"""
from __future__ import annotations

import signal
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, List, Optional, Set

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

import msight_fast
from msight_fast import PublishError
from msight_fast.backends.base import Start
from msight_fast.codec import (
    BATCH_MAGIC,
    Frame,
    SmallLane,
    batch_frames,
    crc32c,
    decode,
    encode,
    fragment,
    is_batch,
    pack_batch,
)

from .conftest import collect, spawn_member, wait_for

pytestmark = [pytest.mark.integration]


def pending(bus: msight_fast.Bus, topic: str) -> int:
    """Frames of ``topic`` waiting in the publisher's batches."""
    return sum(b.count for b in bus._t._batches.values() if b.topic == topic)   # type: ignore[attr-defined]


def raw_messages(servers: List[str], topic: str, n: int, timeout: float = 60.0,
                 partitions: Optional[List[int]] = None) -> List[bytes]:
    """The first ``n`` Kafka messages of ``topic`` (one partition holds them), read from the
    beginning; with ``partitions``, each message's partition is appended to it."""
    c = Consumer({"bootstrap.servers": ",".join(servers), "group.id": f"raw-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                  "fetch.wait.max.ms": 10, "enable.auto.commit": False})
    c.subscribe([topic])
    out: List[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None and m.value() is not None:
                out.append(m.value())
                if partitions is not None:
                    partitions.append(m.partition())
        extra = c.poll(1.0)                               # nothing more than expected
        assert extra is None or extra.error() is not None, "more messages than expected"
    finally:
        c.close()
    return out


def payload_for(topic: str, n: int) -> bytes:
    """A payload that makes the frame Bus.publish(topic, payload) encodes exactly ``n`` bytes long."""
    head = len(encode(Frame.from_bytes(b"", sensor_name=topic, encoding="bytes")))
    assert n >= head
    return b"p" * (n - head)


def counts(msgs: List[bytes]) -> List[int]:
    """Frames per message: a batch's count, 1 for a plain frame."""
    return [len(batch_frames(m)) if is_batch(m) else 1 for m in msgs]


def frames_of(msg: bytes) -> List[bytes]:
    """The frames one message carries: a batch's (either layout), or the message itself."""
    return batch_frames(msg) if is_batch(msg) else [msg]


def forged_batch(items: List[bytes]) -> bytes:
    """A batch container of whatever ``items`` are (pack_batch takes whole frames only), its
    header CRC right, so that only what it holds is wrong."""
    n = len(items)
    index = struct.pack(f"<{n}I", *[len(x) for x in items])
    pad = bytes(-(24 + 4 * n) & 7)
    body = b"".join(x + bytes(-len(x) & 7) for x in items)
    total = 24 + len(index) + len(pad) + len(body)
    head = struct.pack("<4sBBHIIQ", BATCH_MAGIC, 1, 0, 0, n, 0, total)
    crc = crc32c(index, crc32c(head[16:], crc32c(head[:12])))
    return struct.pack("<4sBBHIIQ", BATCH_MAGIC, 1, 0, 0, n, crc, total) + index + pad + body


def at_frame(msg: bytes) -> bytes:
    """The first frame a message carries."""
    return frames_of(msg)[0]


def seqs(frames: List[Any]) -> List[int]:
    return [f.seq for f in frames]


def test_many_small_frames_from_several_threads_arrive_in_order_once(kafka: Any, topic: str) -> None:
    pub, sub = kafka(), kafka().subscribe(topic)
    n_threads, per_thread = 4, 1500
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, 1024 + per_thread, dtype=np.uint8).tobytes()
    errors: List[BaseException] = []

    def publish(t: int) -> None:
        try:
            for i in range(per_thread):
                # each frame's own bytes: a batch writer reused with a stale byte in it shows here
                body = bytes([t]) + noise[i:i + 1023]
                pub.publish(topic, body, meta={"thread": t, "i": i, "crc": zlib.crc32(body)})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    got = collect(sub, n_threads * per_thread, timeout=180)
    for th in threads:
        th.join(60)
    assert not errors
    assert len(got) == n_threads * per_thread
    # the Bus numbers frames in the order it sends them: one partition keeps that order
    assert seqs(got) == list(range(1, n_threads * per_thread + 1))
    for t in range(n_threads):
        assert [f.meta["i"] for f in got if f.meta["thread"] == t] == list(range(per_thread))
    assert all(zlib.crc32(f.data) == f.meta["crc"] for f in got)
    st = sub.stats()
    assert st["gaps"] == 0 and st["duplicates"] == 0 and st["rejected"] == 0
    assert pub._t.frames_batched > n_threads * per_thread // 2       # type: ignore[attr-defined]
    assert pub._t.writers_reused > 0       # type: ignore[attr-defined]  # its batch writers were reused
    assert pub.stats()["lost"] == 0 and sub.recv(timeout=1) is None


def test_a_batch_the_producer_refuses_counts_each_of_its_frames_lost(kafka: Any, topic: str) -> None:
    """A batch dropped for good: each frame in it is counted in lost and reported by flush, and
    the writer kept for reuse does not take the count with it."""
    pub = kafka(batch_linger_ms=60_000)
    pub.publish(topic, b"first")                 # an idle topic: out at once, alone
    pub.flush(60)
    for i in range(5):
        pub.publish(topic, b"frame %d" % i)
    assert pending(pub, topic) == 5
    t = pub._t                                   # type: ignore[attr-defined]

    def refuse(topic_: str, *args: Any, **kwargs: Any) -> None:
        raise PublishError("refused by the test", [(topic_, "refused by the test")])
    t._produce = refuse
    with pytest.raises(PublishError) as e:
        pub.flush(10)
    assert len(e.value.failures) == 5 and pub.stats()["lost"] == 5
    assert pending(pub, topic) == 0 and len(t._spare) == 1 and t._spare[0].count == 0


@pytest.mark.parametrize("shared", [True, False])
def test_the_size_bounds_on_the_wire(kafka: Any, topic: str, shared: bool) -> None:
    """A frame exactly at batch_max_frame_bytes is batched, one byte over is not; a batch that
    reaches batch_max_bytes exactly goes out at once: at exactly that size with whole frames, and
    smaller with a shared header, which carries the same frames bit for bit."""
    pub = kafka(batch_max_frame_bytes=1024, batch_max_bytes=4136, batch_linger_ms=60_000,
                batch_shared_header=shared)
    sub = kafka().subscribe(topic)
    at, over, small = payload_for(topic, 1024), payload_for(topic, 1025), payload_for(topic, 200)
    pub.publish(topic, at)                       # an idle topic: out at once, alone
    for _ in range(4):
        pub.publish(topic, at)                   # 40 + 4 x 1024 = 4136: full
    assert pending(pub, topic) == 0              # out when full, not by linger or flush
    pub.publish(topic, over)                     # over the bound: a message of its own
    pub.publish(topic, small)
    pub.publish(topic, small)
    assert pending(pub, topic) == 2              # a linger of 60 s holds them
    pub.flush(30)
    assert pending(pub, topic) == 0
    msgs = raw_messages(kafka.options["servers"], topic, 4)
    assert counts(msgs) == [1, 4, 1, 2]
    assert [len(m) for m in msgs[::2]] == [1024, 1025]
    assert not is_batch(msgs[0]) and not is_batch(msgs[2])
    assert [m[6] & 1 for m in (msgs[1], msgs[3])] == [int(shared)] * 2      # flag bit 0: a shared header
    # whole: 40 bytes of container and 4 frames; shared: 32, one header, 3 entries of 18-72, 4 payloads
    t = int.from_bytes(at_frame(msgs[1])[24:32], "little")
    if shared:
        assert 32 + 4 * 1024 - 3 * t + 3 * 18 <= len(msgs[1]) <= 32 + 4 * 1024 - 3 * t + 3 * 72
    else:
        assert len(msgs[1]) == 4136
    assert [decode(f).seq for f in frames_of(msgs[1])] == [2, 3, 4, 5]
    assert seqs(collect(sub, 8, timeout=60)) == list(range(1, 9))


def test_frame_keys_spread_batches_over_the_partitions(kafka: Any, topic: str) -> None:
    """partition_key="frame": a batch per partition, each frame in the partition its id picks."""
    pub = kafka(partition_key="frame")
    assert pub._t.small_frame_bytes == 0         # type: ignore[attr-defined]  # send() picks the partition
    sub = kafka().subscribe(topic)
    for i in range(400):
        pub.publish(topic, b"f %d" % i)
    pub.flush(30)
    parts: List[int] = []
    n_msgs = pub._t._produced                    # type: ignore[attr-defined]  # messages this producer sent
    msgs = raw_messages(kafka.options["servers"], topic, n_msgs, partitions=parts)
    n_parts = pub.config.num_partitions          # type: ignore[attr-defined]  # KafkaConfig's
    assert sum(counts(msgs)) == 400 and len(set(parts)) == n_parts
    for m, part in zip(msgs, parts):
        if is_batch(m):
            ids = [decode(f).frame_id for f in batch_frames(m)]
            assert {i % n_parts for i in ids} == {part}
    assert sum(1 for m in msgs if is_batch(m)) >= 4
    got = collect(sub, 400, timeout=60)
    assert sorted(bytes(f.data) for f in got) == sorted(b"f %d" % i for i in range(400))


def test_small_frames_are_keyed_by_their_publisher_from_the_first(kafka: Any, topic: str) -> None:
    """Bus.publish hands small frames to the transport's short path (send_small), which keys every
    message with the publisher's id as send() does: from the first frame, of a topic not yet known
    (send_small leaves that one to send), through the batches after it."""
    pub = kafka()
    assert pub._t.small_frame_bytes > 0          # type: ignore[attr-defined]
    for i in range(300):
        pub.publish(topic, b"k %d" % i)
    pub.flush(30)
    n_msgs = pub._t._produced                    # type: ignore[attr-defined]
    c = Consumer({"bootstrap.servers": ",".join(kafka.options["servers"]), "group.id": f"raw-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                  "fetch.wait.max.ms": 10, "enable.auto.commit": False})
    c.subscribe([topic])
    got: List[Any] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < n_msgs and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                got.append((m.key(), m.value()))
    finally:
        c.close()
    assert len(got) == n_msgs
    assert {k for k, _ in got} == {pub.publisher_id.to_bytes(8, "little")}
    values = [v for _, v in got]
    assert sum(counts(values)) == 300 and any(is_batch(v) for v in values)
    frames = [decode(f) for v in values for f in frames_of(v)]
    assert [bytes(f.data) for f in frames] == [b"k %d" % i for i in range(300)]
    assert seqs(frames) == list(range(1, 301))


def test_mixed_sizes_keep_their_order(kafka: Any, topic: str) -> None:
    """Small frames batched, larger ones alone, the largest fragmented: one stream, in order."""
    pub, sub = kafka(), kafka().subscribe(topic)
    rng = np.random.default_rng(7)
    sizes = [100, 16_000, 20_000, 1000, 2_500_000, 300, 16_384, 40, 17_000, 5]
    sent = []
    for i in range(30):
        body = rng.integers(0, 256, sizes[i % len(sizes)], dtype=np.uint8).tobytes()
        sent.append(pub.publish(topic, body, meta={"crc": zlib.crc32(body)}))
    pub.flush(60)
    got = collect(sub, 30, timeout=120)
    assert seqs(got) == [f.seq for f in sent]
    assert [f.nbytes for f in got] == [f.nbytes for f in sent]
    assert all(zlib.crc32(f.data) == f.meta["crc"] for f in got)
    assert pub._t.frames_batched > 0            # type: ignore[attr-defined]
    assert sub.recv(timeout=1) is None


def test_the_linger_sends_a_lone_pending_frame(kafka: Any, topic: str) -> None:
    linger_s = 0.3
    pub = kafka(batch_linger_ms=int(linger_s * 1000))
    sub = kafka().subscribe(topic)
    pub.publish(topic, b"first")                 # idle topic: out at once
    t0 = time.monotonic()
    pub.publish(topic, b"second")                # right behind it: waits in a batch for the linger
    assert pending(pub, topic) == 1
    got = collect(sub, 2, timeout=linger_s + 30)  # no flush: the linger thread sends it
    assert seqs(got) == [1, 2] and bytes(got[1].data) == b"second"
    assert time.monotonic() - t0 < linger_s + 30
    assert pending(pub, topic) == 0


def test_close_sends_what_is_batched(kafka: Any, topic: str) -> None:
    pub = kafka(batch_linger_ms=60_000)
    sub = kafka().subscribe(topic)
    for i in range(50):
        pub.publish(topic, b"frame %d" % i)
    assert pending(pub, topic) == 49             # the first went out alone
    pub.close()                                  # no flush
    got = collect(sub, 50, timeout=60)
    assert seqs(got) == list(range(1, 51))
    assert pub.stats()["lost"] == 0


def _four_batches(pub: msight_fast.Bus, topic: str, per_batch: int) -> List[int]:
    """Seq 1 alone (an idle topic), then three batches of ``per_batch``; the last seq of each message."""
    pub.publish(topic, b"alone")
    pub.flush(30)
    for _ in range(3):
        for _ in range(per_batch):
            pub.publish(topic, b"x" * 500)
        pub.flush(30)
    return [1] + [1 + per_batch * k for k in (1, 2, 3)]


def test_a_consumer_that_stops_mid_batch_gets_the_whole_batch_again(kafka: Any, topic: str) -> None:
    pub = kafka(batch_linger_ms=60_000)
    ends = _four_batches(pub, topic, 50)
    assert counts(raw_messages(kafka.options["servers"], topic, 4)) == [1, 50, 50, 50]
    group = f"g_{uuid.uuid4().hex[:8]}"
    first = kafka().subscribe(topic, group_id=group, from_beginning=True)
    assert seqs(collect(first, 76, timeout=60)) == list(range(1, 77))   # half of the second batch
    first.ack()                                  # commits what was released: up to the first batch
    first.close()
    again = kafka().subscribe(topic, group_id=group, from_beginning=True)
    got = collect(again, 100, timeout=60)
    assert seqs(got) == list(range(ends[1] + 1, ends[3] + 1))           # the second batch whole, then the third
    assert again.recv(timeout=2) is None
    again.ack()


def _lines(path: Path) -> List[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_consumer_killed_mid_batch_leaves_its_batch_to_the_group(kafka: Any, topic: str, tmp_path: Path) -> None:
    """kill -9 in the middle of a batch: the group delivers again every frame after the last
    batch the dead member finished (more, if its last commit was older)."""
    opts = dict(kafka.options)
    group = f"g_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "child.txt"
    pub = kafka(batch_linger_ms=60_000)
    pub.publish(topic, b"topic")                 # the topic exists before the child subscribes
    pub.flush(30)
    child = spawn_member("kafka", opts, topic, out, group=group, sleep_s=0.02, seconds=120)
    try:
        ends = [e + 1 for e in _four_batches(pub, topic, 100)]   # seqs 2.., after the first frame
        # 75 frames (1.5 s) into the batch 103-202, half a second before its end: past an
        # auto-commit (every 1 s), so whatever the child had released is committed
        wait_for(lambda: len(_lines(out)) >= 175, "the child to be late in its third message", timeout=90)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        theirs = _lines(out)
        last = max(theirs)
        assert ends[1] < last < ends[2]          # killed inside the batch ends[1]+1 .. ends[2]
        done = max(e for e in ends if e <= last)  # the end of the last batch it finished
        member = kafka().subscribe(topic, group_id=group)
        want = set(range(done + 1, ends[3] + 1))
        got: Set[int] = set()
        deadline = time.monotonic() + 120
        while not want <= got and time.monotonic() < deadline:
            f = member.recv(timeout=0.5)
            if f is not None:
                got.add(f.seq)
        assert want <= got, sorted(want - got)[:20]              # at least once: the dead member's batch again
        assert set(range(2, ends[3] + 1)) <= got | set(theirs)    # and nothing lost
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)


def test_malformed_batches_are_rejected_and_release_their_offsets(kafka: Any, topic: str) -> None:
    frames = [encode(Frame.from_bytes(b"frame %d" % i, sensor_name="raw", encoding="bytes", frame_id=i + 1))
              for i in range(8)]
    good = pack_batch([[f] for f in frames[:3]])
    broken = bytearray(frames[7])
    broken[50] ^= 1                              # its seq: the frame's header CRC no longer holds
    # a sound container with one bad frame: the frames around it are delivered, it is rejected
    holed = forged_batch([frames[6], bytes(broken), frames[7]])
    bad_crc = bytearray(good)
    bad_crc[12] ^= 1
    frag = fragment(encode(Frame.from_bytes(b"z" * 3000, sensor_name="raw", encoding="bytes")), 1000)[0]
    nested = forged_batch([frames[0], frag])     # a fragment inside a batch, with a right CRC
    p = Producer({"bootstrap.servers": ",".join(kafka.options["servers"])})
    kafka().subscribe(topic).close()             # the topic, with the library's partitions
    for value in (good, bytes(bad_crc), nested, pack_batch([[f] for f in frames[3:6]]), holed):
        p.produce(topic, value=value, key=b"k")
    assert p.flush(30) == 0
    group = f"g_{uuid.uuid4().hex[:8]}"
    sub = kafka().subscribe(topic, group_id=group, from_beginning=True)
    got = collect(sub, 8, timeout=60)
    assert [bytes(f.data) for f in got] == [b"frame %d" % i for i in range(8)]
    assert sub.recv(timeout=2) is None
    assert sub.stats()["rejected"] == 3 and sub._src.batch_rejected == 2    # type: ignore[attr-defined]
    sub.ack()
    sub.close()
    again = kafka().subscribe(topic, group_id=group, from_beginning=True)
    assert again.recv(timeout=3) is None         # every offset, the rejected ones too, was released


def test_a_time_start_inside_a_batch_is_exact(kafka: Any, topic: str) -> None:
    pub = kafka(batch_linger_ms=60_000)
    for _ in range(5):
        pub.publish(topic, b"x" * 100)           # seq 1 alone, 2-5 wait in a batch
    split = time.time_ns() + 1
    up = -(-split // 1_000_000) * 1_000_000
    wait_for(lambda: time.time_ns() >= up, "the clock to pass the split", timeout=5, interval=0.001)
    for _ in range(5):
        pub.publish(topic, b"x" * 100)           # 6-10 join them; one batch, produced after the split
    pub.flush(30)
    assert counts(raw_messages(kafka.options["servers"], topic, 2)) == [1, 9]
    with kafka().subscribe(topic, start=Start.time(split)) as sub:
        assert seqs(collect(sub, 5, timeout=60)) == list(range(6, 11))
        assert sub.recv(timeout=2) is None
        assert sub._src.start_skipped >= 4       # type: ignore[attr-defined]  # 2-5 by their publish time


@pytest.mark.parametrize("shortest", ["compiled", "add_small"])
def test_the_shortest_path_takes_only_what_the_open_batch_holds(kafka: Any, topic: str, shortest: str) -> None:
    """Bus.publish stamps a small frame straight into the topic's open batch: in one compiled call
    (SmallLane) where the core is built, else through add_small. Every other frame goes the usual
    way: one with no batch open, and one over max_frame_bytes (here below batch_max_frame_bytes),
    refused as before, leaving no gap. On the wire and at the subscriber, the frames are the same
    whichever path took them, payload CRCs included."""
    if shortest == "compiled" and SmallLane is None:
        pytest.skip("the compiled core is not built")
    pub = kafka(batch_max_frame_bytes=2048, batch_max_bytes=4136, batch_linger_ms=60_000, max_frame_bytes=1024,
                checksum=True)
    sub = kafka().subscribe(topic)
    if shortest == "add_small":
        pub._fast = None                                           # type: ignore[attr-defined]
    lane, fast = pub._lane, pub._fast                              # type: ignore[attr-defined]
    assert (fast is not None) == (shortest == "compiled")
    taken: List[str] = []                                          # who took each frame, in turn

    def watched(*args: Any) -> bool:
        took: bool = lane(*args)
        taken.append("add_small" if took else "no")
        return took

    def watched_fast(*args: Any) -> Any:
        got = fast(*args)
        if got is not None and not isinstance(got, tuple):        # (frame,): built, not taken
            taken.append("compiled")
        return got
    pub._lane = watched                                            # type: ignore[attr-defined]
    if fast is not None:
        pub._fast = watched_fast                                   # type: ignore[attr-defined]
    at, small = payload_for(topic, 1024), payload_for(topic, 200)
    pub.publish(topic, at)                       # an idle topic: out at once, alone
    for _ in range(4):
        pub.publish(topic, at)                   # the first opens a batch, the last fills it
    assert pending(pub, topic) == 0
    pub.publish(topic, small)                    # no batch open: the usual way opens one
    with pytest.raises(msight_fast.FrameTooLarge):
        pub.publish(topic, payload_for(topic, 1025))
    pub.publish(topic, small)
    # what the compiled lane passes on, add_small is asked for (and refuses: the same rules). The
    # lane never waits for a lock: a frame that finds the batch lock busy (the linger or delivery
    # thread holding it a moment) is add_small's instead, so either shortcut may take a frame here
    took = ["shortcut" if x in ("compiled", "add_small") else x for x in taken]
    assert took == ["no", "no", "shortcut", "shortcut", "shortcut", "no", "no", "shortcut"]
    assert shortest in taken
    assert pending(pub, topic) == 2
    pub.flush(30)
    msgs = raw_messages(kafka.options["servers"], topic, 3)
    assert counts(msgs) == [1, 4, 2]
    wire = [f for m in msgs for f in frames_of(m)]
    assert all(int.from_bytes(f[6:8], "little") & 1 for f in wire)      # flag bit 0: a payload CRC
    assert [decode(f).seq for f in wire] == list(range(1, 8))
    got = collect(sub, 7, timeout=60)
    assert seqs(got) == list(range(1, 8)) and [bytes(f.data) for f in got] == [at] * 5 + [small] * 2
    assert sub.stats()["gaps"] == 0 and pub.stats()["publish_errors"] == 0
