"""The shared-memory backend (``connect("shm")``, msight_fast/backends/shm.py), across processes.

Publishers and holders in other processes are tests/shm_child.py; every test has a directory of
its own under /dev/shm, which must hold no ``msf-*`` file once every Bus is closed. Frames carry
``shm_child.pattern(shape, k)`` with ``k`` in their meta, so a torn or stale slot shows up as a
content mismatch.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import msight_fast
from msight_fast import BackendUnavailable, ConfigError, FrameTooLarge
from msight_fast.backends import shm

from ..helpers import wait_for
from ..shm_child import matches, pattern

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shm backend needs Linux (futexes, /dev/shm)"),
    pytest.mark.skipif(shm._shm is None,
                       reason="the shm backend needs its compiled module, msight_fast._ext._shm, which is not built"),
]

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shm_child.py")
HD = (1080, 1920, 3)
UHD = (2160, 3840, 3)
SMALL = (120, 160, 3)
SLACK = 5.0                     # what a bound allows on top of a timeout, on a loaded machine


# ---------------------------------------------------------------------------------- the rig
class Child:
    """A tests/shm_child.py process; its stdout's JSON events are collected by a thread."""

    def __init__(self, args: List[str]) -> None:
        self.args = args
        self._err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen([sys.executable, CHILD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._err, text=True, bufsize=1)
        self.events: List[Dict[str, Any]] = []
        self._eof = False
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "noise", "line": line}
            with self._cv:
                self.events.append(ev)
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()[-3000:]

    def wait(self, event: str, n: int = 1, timeout: float = 60.0) -> List[Dict[str, Any]]:
        """The first ``n`` events named ``event``, waited for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                got = [e for e in self.events if e.get("event") == event]
                if len(got) >= n:
                    return got[:n]
                left = deadline - time.monotonic()
                assert not self._eof and left > 0, (f"child {self.args[:1]} gave {len(got)} of {n} {event!r} "
                                                    f"events: {self.events[-5:]}\n{self.stderr()}")
                self._cv.wait(min(left, 0.5))

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def finish(self, timeout: float = 60.0) -> Dict[str, Any]:
        """Close its stdin (a lingering child then closes its Bus) and wait for it; its ``done`` event."""
        assert self.p.stdin is not None
        self.p.stdin.close()
        assert self.p.wait(timeout) == 0, self.stderr()
        self._t.join(10)
        return self.wait("done", timeout=1)[0]

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def cleanup(self) -> bool:
        """Kill it if it still runs (a test that failed half way); True then."""
        running = self.p.poll() is None
        self.kill()
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._t.join(10)
        self._err.close()
        return running


class Rig:
    """Buses and child processes of one test, all in one directory; closed after the test."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.topic = f"cam/{uuid.uuid4().hex[:8]}"
        self.buses: List[msight_fast.Bus] = []
        self.children: List[Child] = []

    def connect(self, **opts: Any) -> msight_fast.Bus:
        bus = msight_fast.connect("shm", dir=self.dir, **opts)
        self.buses.append(bus)
        return bus

    def spawn(self, role: str, *args: str, topic: Optional[str] = None) -> Child:
        c = Child([role, "--dir", self.dir, "--topic", topic or self.topic, *args])
        self.children.append(c)
        return c

    def files(self, suffix: str = "") -> List[str]:
        return sorted(n for n in os.listdir(self.dir) if n.startswith("msf-") and n.endswith(suffix))

    def close(self) -> None:
        killed = [c.cleanup() for c in self.children]
        for b in self.buses:
            b.close()
        if any(killed):
            # a child killed here (a test that stopped half way) may leave its segment: removing
            # it is sweep's job, which the tests of kills check themselves
            shm.sweep(self.dir)


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A fresh directory under /dev/shm; at teardown (after every Bus closed) it must hold no msf-* file."""
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="msf-test-")
    # files the tests forge are this user's private files, as the library's are: the hostile
    # writer shm guards against here is another process of the same user
    old = os.umask(0o077)
    try:
        yield d
    finally:
        os.umask(old)
    left = sorted(n for n in os.listdir(d) if n.startswith("msf-"))
    shutil.rmtree(d, ignore_errors=True)
    assert left == [], f"left behind in {d} after every Bus closed: {left}"


@pytest.fixture
def rig(shm_dir: str) -> Iterator[Rig]:
    r = Rig(shm_dir)
    try:
        yield r
    finally:
        r.close()


@dataclass
class Got:
    seq: int
    k: int
    publisher: int
    ok: bool                    # the content was pattern(shape, k)


def _checked(f: msight_fast.Frame) -> Got:
    """What the test needs of a frame, its content checked while it is still held, then given back."""
    with f:
        k = int(f.meta.get("k", f.seq))
        return Got(f.seq, k, f.publisher_id, matches(f.array, k))


def receive(sub: msight_fast.Subscription, n: int, timeout: float = 60.0) -> List[Got]:
    """Up to ``n`` frames within ``timeout``, each checked on arrival."""
    out: List[Got] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        f = sub.recv(timeout=0.5)
        if f is not None:
            out.append(_checked(f))
    return out


def drain(sub: msight_fast.Subscription, quiet: float = 0.3, timeout: float = 30.0) -> List[Got]:
    """Every frame until none comes for ``quiet`` seconds."""
    out: List[Got] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = sub.recv(timeout=quiet)
        if f is None:
            break
        out.append(_checked(f))
    return out


def publish(bus: msight_fast.Bus, topic: str, shape: Tuple[int, ...], k: int, loan: bool = False) -> msight_fast.Frame:
    if loan:
        arr = bus.loan(topic, shape)
        pattern(shape, k, out=arr)
    else:
        arr = pattern(shape, k)
    return bus.publish(topic, arr, meta={"k": k})


def shape_arg(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def hold_two_slots(pub: msight_fast.Bus, topic: str, s1: msight_fast.Subscription,
                   s2: msight_fast.Subscription) -> Tuple[msight_fast.Frame, msight_fast.Frame]:
    """With slots=2: s1 holds frame 1 and s2 frame 2, so every slot is held."""
    publish(pub, topic, SMALL, 1)
    f1 = s1.recv(timeout=10)
    assert f1 is not None and f1.seq == 1
    assert s2.recv(timeout=10).seq == 1
    publish(pub, topic, SMALL, 2)
    f2 = s2.recv(timeout=10)
    assert f2 is not None and f2.seq == 2
    return f1, f2


# ---------------------------------------------------------------------------------- 1. round trip
@pytest.mark.parametrize("mode", ["copy", "loan"])
def test_cross_process_1080p_frames_arrive_bit_exact_without_gaps(rig: Rig, mode: str) -> None:
    n = 12
    sub = rig.connect().subscribe(rig.topic)
    # n + 2 slots: the ring never wraps, so a subscriber slowed by the machine's load loses nothing;
    # the child lingers, so its segment stays until read (see ..._retired_before_the_reader_looked_...)
    child = rig.spawn("pub", "--count", str(n), "--shape", shape_arg(HD), "--mode", mode,
                      "--slots", str(n + 2), "--linger")
    got = receive(sub, n)
    done = child.wait("done")[0]
    assert done["errors"] == [] and done["published"] == n
    assert done["stats"]["dropped"] == 0 and done["stats"]["zero_copy"] == (n if mode == "loan" else 0)
    assert [g.seq for g in got] == list(range(1, n + 1))
    assert all(g.ok for g in got), [g for g in got if not g.ok]
    st = sub.stats()
    assert st["received"] == n and st["gaps"] == 0 and st["dropped"] == 0 and st["rejected"] == 0
    assert st["publishers"] == 1
    child.finish()


# ---------------------------------------------------------------------------------- 2. zero copy
def _mappings_of(path: str) -> List[Tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            cols = line.split(maxsplit=5)
            if len(cols) == 6 and cols[5].strip() == path:
                lo, hi = cols[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def test_cross_process_frames_are_read_only_views_into_the_segment(rig: Rig) -> None:
    sub = rig.connect().subscribe(rig.topic)
    child = rig.spawn("pub", "--count", "3", "--shape", shape_arg(HD), "--mode", "loan", "--linger")
    child.wait("done")
    [seg] = rig.files(".seg")                 # the child lingers: its segment is still there
    for k in (1, 2, 3):
        f = sub.recv(timeout=30)
        assert f is not None and f.seq == k and matches(f.array, k)
        ranges = _mappings_of(os.path.join(rig.dir, seg))
        assert ranges, "the segment file is not mapped in the subscriber"
        lo = f.array.__array_interface__["data"][0]
        hi = lo + f.array.nbytes
        assert any(a <= lo and hi <= b for a, b in ranges), (hex(lo), [(hex(a), hex(b)) for a, b in ranges])
        assert f.array.flags.writeable is False
        with pytest.raises(ValueError):
            f.array.flags.writeable = True
        with pytest.raises(ValueError):
            f.array[0, 0, 0] = 1
    child.finish()


# ---------------------------------------------------------------------------------- 3. loans
def test_a_loan_is_writable_until_published_then_read_only(rig: Rig) -> None:
    pub = rig.connect(slots=4)
    sub = rig.connect().subscribe(rig.topic)
    a = pub.loan(rig.topic, SMALL)
    assert isinstance(a, np.ndarray) and a.shape == SMALL and a.dtype == np.uint8 and a.flags.writeable
    pattern(SMALL, 1, out=a)
    pub.publish(rig.topic, a, meta={"k": 1})
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0, 0] = 0
    f = pub.loan(rig.topic, (300,), np.float32)
    assert f.dtype == np.float32 and f.flags.writeable
    f[:] = np.linspace(0, 1, 300, dtype=np.float32)
    pub.publish(rig.topic, f, meta={"k": 2})
    got = sub.recv(timeout=10)
    assert got is not None and got.seq == 1 and matches(got.array, 1)
    got = sub.recv(timeout=10)
    assert got is not None and got.array.dtype == np.float32
    assert np.array_equal(got.array, np.linspace(0, 1, 300, dtype=np.float32))
    assert pub.stats()["zero_copy"] == 2 and pub.stats()["dropped"] == 0


def test_a_dropped_loan_gives_its_slot_back(rig: Rig) -> None:
    slots = 3
    pub = rig.connect(slots=slots)
    sb = rig.connect()
    s2 = sb.subscribe(rig.topic)
    loans = [pub.loan(rig.topic, SMALL) for _ in range(slots - 1)]
    with pytest.raises(BackendUnavailable, match="not published yet"):
        pub.loan(rig.topic, SMALL)            # bounded: one slot always stays for publishing
    del loans
    gc.collect()
    # nothing held: more frames than slots, each received
    for k in range(1, 2 * slots + 1):
        publish(pub, rig.topic, SMALL, k)
        [g] = receive(s2, 1, timeout=10)
        assert (g.seq, g.ok) == (k, True)
    # s1 holds one slot and s2 another while it reads: had a dropped loan kept a slot, none would
    # be left for publishing and frames would be dropped
    s1 = sb.subscribe(rig.topic)
    k0 = 2 * slots + 1
    publish(pub, rig.topic, SMALL, k0)
    held = s1.recv(timeout=10)
    assert held is not None and held.seq == k0
    for k in range(k0, k0 + 2 * slots):
        if k > k0:
            publish(pub, rig.topic, SMALL, k)
        f = s2.recv(timeout=10)                        # gives the one before back, holds this one
        assert f is not None and (f.seq, matches(f.array, k)) == (k, True)
    assert pub.stats()["dropped"] == 0
    assert s2.stats()["gaps"] == 0 and s2.stats()["dropped"] == 0


def test_a_loan_outlives_a_segment_change(rig: Rig) -> None:
    pub = rig.connect(slots=4)
    sub = rig.connect().subscribe(rig.topic)
    a = pub.loan(rig.topic, SMALL)
    pattern(SMALL, 2, out=a)
    publish(pub, rig.topic, HD, 1)                     # a bigger segment: the loan's is retired
    pub.publish(rig.topic, a, meta={"k": 2})           # copied from the old slot into the new segment
    got = receive(sub, 2, timeout=10)
    assert [(g.seq, g.ok) for g in got] == [(1, True), (2, True)]
    del a
    gc.collect()
    for k in range(3, 12):                             # nothing of the old loan is in the way
        publish(pub, rig.topic, HD, k)
        assert [(g.seq, g.ok) for g in receive(sub, 1, timeout=10)] == [(k, True)]
    assert pub.stats()["dropped"] == 0


def test_loan_on_the_memory_backend_is_a_plain_array() -> None:
    name = f"shm-loan-{uuid.uuid4().hex}"
    with msight_fast.connect("memory", name=name) as pub, msight_fast.connect("memory", name=name) as sb:
        sub = sb.subscribe("t")
        a = pub.loan("t", SMALL)
        assert type(a) is np.ndarray and a.flags.writeable and a.flags.owndata and a.shape == SMALL
        pattern(SMALL, 7, out=a)
        pub.publish("t", a, meta={"k": 7})
        f = sub.recv(timeout=5)
        assert f is not None and matches(f.array, 7)


# ---------------------------------------------------------------------------------- 4. publisher killed
@pytest.mark.parametrize("mode", ["copy", "loan"])
def test_a_publisher_killed_mid_stream(rig: Rig, mode: str) -> None:
    sub = rig.connect().subscribe(rig.topic)
    # as fast as it can, so it is most likely killed in the middle of writing a slot, and the
    # slots the subscriber does not hold are overwritten while it reads the one it holds
    child = rig.spawn("pub", "--count", "0", "--shape", "720x1280x3", "--checksum", "--mode", mode)
    torn: List[Got] = []

    def check(g: List[Got]) -> None:
        torn.extend(x for x in g if not x.ok or x.seq != x.k)

    before = receive(sub, 20, timeout=60)
    check(before)
    assert len(before) == 20
    [seg] = rig.files(".seg")
    child.kill()
    # what it committed may still come; then nothing: recv returns None within its timeout, and the
    # reader removes the dead publisher's segment
    deadline = time.monotonic() + 5.0
    nones = 0
    while time.monotonic() < deadline and (seg in rig.files() or nones == 0):
        t0 = time.monotonic()
        f = sub.recv(timeout=0.3)
        assert time.monotonic() - t0 < 0.3 + SLACK
        if f is None:
            nones += 1
        else:
            check([_checked(f)])
    assert seg not in rig.files(), "the dead publisher's segment is still there after 5 s"
    assert nones > 0
    assert torn == []
    assert sub.stats()["rejected"] == 0                  # every checksum matched
    # a new publisher on the topic reaches the same subscription
    child2 = rig.spawn("pub", "--count", "5", "--shape", "720x1280x3", "--checksum", "--linger")
    got = receive(sub, 5, timeout=60)
    assert [g.seq for g in got] == [1, 2, 3, 4, 5] and all(g.ok for g in got)
    assert got[0].publisher != before[0].publisher
    assert sub.stats()["publishers"] == 2 and sub.stats()["rejected"] == 0
    child2.finish()


# ---------------------------------------------------------------------------------- 5. holder killed
def test_a_killed_holder_is_reaped_and_a_blocked_publisher_goes_on(rig: Rig) -> None:
    pub = rig.connect(slots=2, full_policy="block", publish_timeout_s=60)
    live = rig.connect(zero_copy=False).subscribe(rig.topic)     # it holds no slot between recvs
    a = rig.spawn("hold", "--take", "1")
    b = rig.spawn("hold", "--take", "2")
    a.wait("ready")
    b.wait("ready")
    stop = threading.Event()
    errors: List[str] = []
    count = [0]

    def publishing() -> None:
        k = 0
        while not stop.is_set():
            try:
                publish(pub, rig.topic, SMALL, k + 1)
                k += 1
                count[0] = k
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(repr(e))
                return
            stop.wait(0.005)                  # pacing, so the readers and children get the CPU too

    seen: List[Got] = []

    def reading() -> None:
        while not stop.is_set():
            seen.extend(receive(live, 1, timeout=0.5))

    threads = [threading.Thread(target=publishing, daemon=True), threading.Thread(target=reading, daemon=True)]
    for t in threads:
        t.start()
    try:
        a.wait("held")
        b.wait("held")
        # both slots held by the children: the publisher waits in full_policy=block's loop, which
        # flags it in the segment's header
        seg = pub._t._pubs[rig.topic].seg
        wait_for(lambda: seg.ld32(shm._shm.H_PUB_WAITING) == 1, "the publisher to block")
        at_kill = count[0]
        seen_at_kill = len(seen)
        a.kill()
        wait_for(lambda: count[0] >= at_kill + 20, "the publisher to go on after the holder's death", timeout=30)
        wait_for(lambda: len(seen) >= seen_at_kill + 5, "the live subscriber to receive after the death", timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(70)
    assert errors == []
    assert all(g.ok for g in seen) and [g.seq for g in seen] == sorted({g.seq for g in seen})
    st = pub.stats()
    assert st["readers_reaped"] >= 1 and st["publish_errors"] == 0
    assert all(e["ok"] for e in a.events + b.events if e["event"] == "got")


# ---------------------------------------------------------------------------------- 6. bounds
def test_full_policy_drop_never_blocks_when_every_slot_is_held(rig: Rig) -> None:
    pub = rig.connect(slots=2, full_policy="drop")
    sb = rig.connect()
    s1, s2 = sb.subscribe(rig.topic), sb.subscribe(rig.topic)
    f1, _ = hold_two_slots(pub, rig.topic, s1, s2)
    t0 = time.monotonic()
    for k in range(3, 203):
        publish(pub, rig.topic, SMALL, k)
    assert time.monotonic() - t0 < 60                  # bounded: not a wait per frame
    st = pub.stats()
    assert st["dropped"] == 200 and st["publish_errors"] == 0 and st["published"] == 202
    f1.release()
    publish(pub, rig.topic, SMALL, 203)
    assert pub.stats()["dropped"] == 200
    f = s2.recv(timeout=10)
    assert f is not None and f.seq == 203 and matches(f.array, 203)
    assert s2.stats()["gaps"] == 200                   # what was dropped is a gap for the readers


def test_full_policy_block_times_out_then_goes_on_after_a_release(rig: Rig) -> None:
    pub = rig.connect(slots=2, full_policy="block", publish_timeout_s=0.5)
    sb = rig.connect()
    s1, s2 = sb.subscribe(rig.topic), sb.subscribe(rig.topic)
    f1, _ = hold_two_slots(pub, rig.topic, s1, s2)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="full_policy=block"):
        publish(pub, rig.topic, SMALL, 3)
    assert time.monotonic() - t0 < 0.5 + SLACK
    f1.release()
    publish(pub, rig.topic, SMALL, 3)                    # the refused frame used no seq: this is 3
    f = s2.recv(timeout=10)
    assert f is not None and f.seq == 3 and matches(f.array, 3)
    assert s2.stats()["gaps"] == 0
    st = pub.stats()
    assert st["publish_errors"] == 1 and st["blocked"] >= 1 and st["dropped"] == 0


def test_a_release_wakes_a_blocked_publisher(rig: Rig) -> None:
    pub = rig.connect(slots=2, full_policy="block", publish_timeout_s=60)
    sb = rig.connect()
    s1, s2 = sb.subscribe(rig.topic), sb.subscribe(rig.topic)
    f1, _ = hold_two_slots(pub, rig.topic, s1, s2)
    done = threading.Event()
    errors: List[str] = []

    def run() -> None:
        try:
            publish(pub, rig.topic, SMALL, 3)
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(repr(e))
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: pub._t.blocked >= 1, "the publish to block")
    assert not done.is_set()
    f1.release()
    assert done.wait(30), "the publish did not go on after the release"    # far below its 60 s timeout
    t.join(5)
    assert errors == []
    f = s2.recv(timeout=10)
    assert f is not None and f.seq == 3 and matches(f.array, 3)


def test_stats_do_not_wait_for_a_blocked_publish(rig: Rig) -> None:
    pub = rig.connect(slots=2, full_policy="block", publish_timeout_s=60)
    sb = rig.connect()
    s1, s2 = sb.subscribe(rig.topic), sb.subscribe(rig.topic)
    f1, _ = hold_two_slots(pub, rig.topic, s1, s2)
    publisher = threading.Thread(target=lambda: publish(pub, rig.topic, SMALL, 3), daemon=True)
    publisher.start()
    wait_for(lambda: pub._t.blocked >= 1, "the publish to block")
    got = threading.Event()
    stats = threading.Thread(target=lambda: (pub.stats(), got.set()), daemon=True)
    stats.start()
    returned = got.wait(3.0)
    f1.release()                            # lets the publish, and so the stats, go on either way
    publisher.join(30)
    stats.join(30)
    assert returned, "Bus.stats() waited for the blocked publish"


def test_a_subscriber_that_falls_behind_counts_what_it_lost(rig: Rig) -> None:
    pub = rig.connect(slots=2)
    sub = rig.connect().subscribe(rig.topic)
    publish(pub, rig.topic, SMALL, 1)
    assert [g.seq for g in receive(sub, 1, timeout=10)] == [1]
    for k in range(2, 12):                             # ten more into two slots, nobody reading
        publish(pub, rig.topic, SMALL, k)
    got = drain(sub)
    assert got and all(g.ok for g in got) and got[-1].seq == 11
    st = sub.stats()
    assert st["dropped"] > 0 and st["dropped"] + len(got) == 10 and st["gaps"] == st["dropped"]
    assert pub.stats()["overrun"] > 0 and pub.stats()["dropped"] == 0


def test_a_held_frame_is_never_overwritten(rig: Rig) -> None:
    pub = rig.connect(slots=2)
    sub = rig.connect().subscribe(rig.topic)
    publish(pub, rig.topic, HD, 1)
    held = sub.recv(timeout=10)
    assert held is not None and held.seq == 1
    for k in range(2, 41):                             # into the one slot left, over and over
        publish(pub, rig.topic, HD, k)
    assert matches(held.array, 1)
    assert pub.stats()["dropped"] == 0 and pub.stats()["overrun"] > 0
    with pytest.raises(BackendUnavailable, match="no slot to lend"):
        other = rig.connect().subscribe(rig.topic)     # a second holder: now every slot is held
        publish(pub, rig.topic, HD, 41)
        assert other.recv(timeout=10).seq == 41
        pub.loan(rig.topic, HD)                        # full_policy=drop: a loan has no slot to wait for
    held.release()
    assert matches(pattern(HD, 42, out=pub.loan(rig.topic, HD)), 42)


def test_without_zero_copy_frames_stay_intact_after_their_slot_is_reused(rig: Rig) -> None:
    pub = rig.connect(slots=2)
    sub = rig.connect(zero_copy=False).subscribe(rig.topic)
    kept = []
    for k in range(1, 7):
        publish(pub, rig.topic, SMALL, k)
        f = sub.recv(timeout=10)
        assert f is not None and f.seq == k
        kept.append(f)
    assert [matches(f.array, k) for k, f in enumerate(kept, 1)] == [True] * 6


def _65_readers(rig: Rig) -> Tuple[msight_fast.Bus, List[msight_fast.Subscription]]:
    """A publisher's segment with one reader more than it has rows: the last one is refused."""
    pub = rig.connect()
    sb = rig.connect()
    subs = [sb.subscribe(rig.topic) for _ in range(shm._shm.MAX_ROWS + 1)]
    publish(pub, rig.topic, SMALL, 1)
    for s in subs:                                     # each attaches at its first recv, in this order
        s.recv(timeout=0.2)
    return pub, subs


def test_a_reader_past_the_64th_on_a_segment_is_refused_and_counted(rig: Rig) -> None:
    _, subs = _65_readers(rig)
    st = [s.stats() for s in subs]
    assert [x["received"] for x in st] == [1] * shm._shm.MAX_ROWS + [0]
    assert st[-1]["segments_refused"] == 1 and sum(x["segments_refused"] for x in st[:-1]) == 0


def test_a_refused_reader_joins_once_a_row_is_free(rig: Rig) -> None:
    pub, subs = _65_readers(rig)
    subs[0].close()                                    # a row is free again
    publish(pub, rig.topic, SMALL, 2)
    # it subscribed before frame 1, which is still in the ring: it gets both, late but not lost
    assert [g.seq for g in receive(subs[-1], 2, timeout=3)] == [1, 2]


@pytest.mark.parametrize("retired_by", ["growth", "close"])
def test_frames_of_a_segment_retired_before_the_reader_looked_are_received_or_counted(rig: Rig,
                                                                                     retired_by: str) -> None:
    sub = rig.connect().subscribe(rig.topic)           # subscribed before every frame
    pub = rig.connect(slots=8)
    for k in (1, 2, 3):
        publish(pub, rig.topic, SMALL, k)
    if retired_by == "growth":
        publish(pub, rig.topic, HD, 4)                 # a bigger segment; the small one is retired
    else:
        pub.close()
    n = 4 if retired_by == "growth" else 3
    got = drain(sub)
    st = sub.stats()
    assert len(got) + st["dropped"] + st["gaps"] == n, (len(got), st["dropped"], st["gaps"])


def test_a_fixed_slot_size_refuses_bigger_frames(rig: Rig) -> None:
    pub = rig.connect(slot_bytes=64 << 10)
    sub = rig.connect().subscribe(rig.topic)
    with pytest.raises(FrameTooLarge, match="slot size"):
        pub.publish(rig.topic, np.zeros(128 << 10, np.uint8))
    publish(pub, rig.topic, SMALL[:2], 1)              # 19 KB fits, and no seq was used
    f = sub.recv(timeout=10)
    assert f is not None and f.seq == 1 and matches(f.array, 1)


# ---------------------------------------------------------------------------------- 7. cleanup
def test_nothing_is_left_once_every_user_closed(rig: Rig) -> None:
    pub, sb = rig.connect(slots=2), rig.connect()
    sub = sb.subscribe(rig.topic)
    other = sb.subscribe(rig.topic + "/b")
    publish(pub, rig.topic, SMALL, 1)
    publish(pub, rig.topic, HD, 2)                     # a second, bigger segment
    publish(pub, rig.topic + "/b", SMALL, 1)
    assert receive(sub, 1, timeout=10)[0].ok
    assert len(rig.files(".bell")) == 2 and rig.files(".seg")
    held = other.recv(timeout=10)                      # closed while holding a frame
    assert held is not None
    pub.close()
    sb.close()
    assert rig.files() == []


@pytest.mark.parametrize("how", ["sweep", "connect"])
def test_a_killed_publishers_files_are_swept(rig: Rig, how: str) -> None:
    child = rig.spawn("pub", "--count", "3", "--shape", shape_arg(SMALL), "--linger")
    child.wait("done")
    child.kill()                                        # no reader: nobody noticed yet
    assert len(rig.files(".seg")) == 1 and len(rig.files(".bell")) == 1
    if how == "sweep":
        assert shm.sweep(rig.dir) == 2
    else:
        rig.connect()
    assert rig.files() == []


def _state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (Z: a zombie)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_a_zombie_publishers_files_are_swept(rig: Rig) -> None:
    """A publisher killed and not yet reaped by its parent (a zombie) writes nothing more: dead."""
    child = rig.spawn("pub", "--count", "3", "--shape", shape_arg(SMALL), "--linger")
    child.wait("done")
    os.kill(child.p.pid, signal.SIGKILL)
    try:
        wait_for(lambda: _state(child.p.pid) == "Z", "the child to be a zombie")
        assert len(rig.files()) == 2
        shm.sweep(rig.dir)
        assert rig.files() == []
    finally:
        child.kill()                                   # reaped: the fixture's sweep can then remove it
        shm.sweep(rig.dir)


# ---------------------------------------------------------------------------------- 8. join and leave
def test_subscribers_join_and_leave_at_any_time(rig: Rig) -> None:
    early = rig.connect().subscribe(rig.topic)         # before the publisher exists
    pub = rig.connect(slots=4)
    publish(pub, rig.topic, SMALL, 1)
    assert [(g.seq, g.ok) for g in receive(early, 1, timeout=10)] == [(1, True)]
    publish(pub, rig.topic, SMALL, 2)
    assert [(g.seq, g.ok) for g in receive(early, 1, timeout=10)] == [(2, True)]
    late = rig.connect().subscribe(rig.topic)          # after frames 1 and 2: it starts at 3
    leaving = rig.connect().subscribe(rig.topic)
    for k in range(3, 13):
        publish(pub, rig.topic, SMALL, k)
        if k == 6:
            held = leaving.recv(timeout=10)            # it leaves holding a frame
            assert held is not None and held.seq == 3
            leaving.close()
        for s in (early, late):
            assert [(g.seq, g.ok) for g in receive(s, 1, timeout=10)] == [(k, True)]
    for s in (early, late):
        assert s.stats()["gaps"] == 0 and s.stats()["dropped"] == 0
    assert pub.stats()["dropped"] == 0


def test_threads_sharing_a_subscription_each_get_other_frames(rig: Rig) -> None:
    pub = rig.connect(slots=64)
    sub = rig.connect().subscribe(rig.topic)
    publish(pub, rig.topic, SMALL, 1)
    assert [g.seq for g in receive(sub, 1, timeout=10)] == [1]     # attached: the burst below fits the ring
    seen: List[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            f = sub.recv(timeout=0.2)
            if f is not None:
                with lock:
                    seen.append(f.seq)

    readers = [threading.Thread(target=read, daemon=True) for _ in range(4)]
    for r in readers:
        r.start()
    try:
        for k in range(2, 52):
            publish(pub, rig.topic, SMALL, k)
        wait_for(lambda: len(seen) >= 50, "50 frames over the 4 threads")
    finally:
        stop.set()
        for r in readers:
            r.join(10)
    assert sorted(seen) == list(range(2, 52))          # each frame to exactly one thread
    assert sub.stats()["dropped"] == 0 and sub.stats()["gaps"] == 0


def test_a_publisher_whose_frames_grow_is_followed_in_order(rig: Rig) -> None:
    sub = rig.connect().subscribe(rig.topic)
    pub = rig.connect(slots=4)
    publish(pub, rig.topic, HD, 1)
    assert [(g.seq, g.ok) for g in receive(sub, 1, timeout=30)] == [(1, True)]
    # the subscriber reads the 1080p segment; the rest comes before it reads again: two more
    # frames there, then 4K frames in a new, bigger segment (the old one is retired)
    publish(pub, rig.topic, HD, 2)
    publish(pub, rig.topic, HD, 3)
    for k in (4, 5, 6):
        publish(pub, rig.topic, UHD, k, loan=(k == 5))
    got = receive(sub, 5, timeout=60)
    assert [g.seq for g in got] == [2, 3, 4, 5, 6] and all(g.ok for g in got)
    st = sub.stats()
    assert st["gaps"] == 0 and st["dropped"] == 0 and st["segments"] == 1
    assert len(rig.files(".seg")) == 1                 # the retired segment is gone
    assert pub.stats()["overrun"] == 0 and pub.stats()["dropped"] == 0


# ---------------------------------------------------------------------------------- 9. two publishers
def test_two_publisher_processes_on_one_topic(rig: Rig) -> None:
    n = 30
    sub = rig.connect().subscribe(rig.topic)
    kids = [rig.spawn("pub", "--count", str(n), "--shape", shape_arg(SMALL), "--slots", "64", "--linger")
            for _ in range(2)]
    got = receive(sub, 2 * n, timeout=60)
    for c in kids:
        assert c.wait("done")[0]["errors"] == []
    by_pub: Dict[int, List[int]] = {}
    for g in got:
        by_pub.setdefault(g.publisher, []).append(g.seq)
    assert len(by_pub) == 2 and all(seqs == list(range(1, n + 1)) for seqs in by_pub.values())
    assert all(g.ok for g in got)
    st = sub.stats()
    assert st["gaps"] == 0 and st["dropped"] == 0 and st["publishers"] == 2 and st["segments"] == 2
    for c in kids:
        c.finish()


# ---------------------------------------------------------------------------------- 10. idle and close
def test_recv_on_an_idle_topic_returns_none_in_time(rig: Rig) -> None:
    sub = rig.connect().subscribe(rig.topic)
    for timeout in (0.0, 0.3, 1.2):
        t0 = time.monotonic()
        assert sub.recv(timeout=timeout) is None
        assert time.monotonic() - t0 < timeout + SLACK


@pytest.mark.parametrize("closer", ["subscription", "bus"])
def test_close_from_another_thread_ends_a_blocked_recv(rig: Rig, closer: str) -> None:
    bus = rig.connect()
    sub = bus.subscribe(rig.topic)
    out: List[Any] = []
    t = threading.Thread(target=lambda: out.append(sub.recv(timeout=60)), daemon=True)
    t.start()
    bell = sub._src.bell.map                           # the recv sleeps on the topic's doorbell
    wait_for(lambda: bell.ld32(shm._shm.B_WAITERS) >= 1, "the recv to sleep")
    t0 = time.monotonic()
    (sub if closer == "subscription" else bus).close()
    t.join(SLACK + 5)
    assert not t.is_alive() and out == [None]
    assert time.monotonic() - t0 < SLACK + 5


# ---------------------------------------------------------------------------------- 11. hostile
def _forged_segment(topic: str, *, slots: int = 2, cap: int = 64 << 10, pid: Optional[int] = None,
                    start: Optional[int] = None, size: Optional[int] = None, log_len: Optional[int] = None,
                    write_count: int = 0) -> bytearray:
    """A segment header written by hand (the layout of msight_fast/_ext/_shm.pyx)."""
    S = shm._shm
    ll, data_off, slot_bytes, full = S.layout(min(max(slots, 2), 64), cap)
    buf = bytearray(full if size is None else size)
    me = shm._self()
    struct.pack_into("<QIIIIQQIIQQQQQ", buf, 0, S.MAGIC, S.VERSION, slots, ll if log_len is None else log_len,
                     S.MAX_ROWS, slot_bytes if slots <= 64 else 1 << 50, data_off,
                     me[0] if pid is None else pid, 0, me[1] if start is None else start,
                     1, time.time_ns() + 10**12, 1, write_count)
    name = topic.encode()
    struct.pack_into("<I", buf, S.H_TOPIC_LEN, len(name))
    buf[S.H_TOPIC:S.H_TOPIC + len(name)] = name
    return buf


def test_garbage_segments_neither_crash_nor_hang_a_subscriber(rig: Rig) -> None:
    S = shm._shm
    h = shm.topic_hash(rig.topic)
    paths = [os.path.join(rig.dir, f"msf-{h}-000000000000000{i}-000001.seg") for i in range(1, 6)]
    rng = np.random.default_rng(3)
    with open(paths[0], "wb") as fh:                    # random bytes
        fh.write(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    with open(paths[1], "wb") as fh:                    # the magic, with absurd geometry
        fh.write(_forged_segment(rig.topic, slots=1000, size=S.SLOTS_OFF + 4096))
    with open(paths[2], "wb") as fh:                    # a sane header, on a file too short for it
        fh.write(_forged_segment(rig.topic, size=S.SLOTS_OFF + 4096))
    with open(paths[3], "wb") as fh:                    # the magic, and a log length the geometry does not give
        fh.write(_forged_segment(rig.topic, log_len=1 << 30))
    # a well-formed segment of a live owner (this process) whose log, slots and counter are garbage
    buf = _forged_segment(rig.topic, write_count=1000)
    log_off = S.SLOTS_OFF + S.SLOT_SIZE * 2
    buf[log_off:log_off + 8 * 8] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    struct.pack_into("<Q", buf, log_off + 8 * (999 % 8), (999 << 16) | 0)      # frame 999: in slot 0...
    struct.pack_into("<QQQ", buf, S.SLOTS_OFF, 2 * 999 + 2, S.HDR_AREA, 100)   # ...100 bytes of noise
    struct.pack_into("<Q", buf, log_off + 8 * (998 % 8), (998 << 16) | 1)      # frame 998: in slot 1,
    struct.pack_into("<QQQ", buf, S.SLOTS_OFF + S.SLOT_SIZE, 2 * 998 + 2, 1 << 40, 1 << 40)  # out of bounds
    with open(paths[4], "wb") as fh:
        fh.write(buf)
    try:
        sub = rig.connect().subscribe(rig.topic)
        t0 = time.monotonic()
        assert sub.recv(timeout=0.5) is None            # noise is refused, not handed out
        assert time.monotonic() - t0 < 0.5 + SLACK
        pub = rig.connect()
        for k in range(1, 6):
            publish(pub, rig.topic, SMALL, k)
            got = receive(sub, 1, timeout=10)
            assert [(g.seq, g.ok) for g in got] == [(k, True)]
        assert sub.stats()["rejected"] >= 1 and sub.stats()["gaps"] == 0
    finally:
        for p in paths:
            os.unlink(p)


@pytest.mark.parametrize("what", ["segment", "bell"])
def test_a_pid_out_of_range_in_a_file_is_a_dead_process(rig: Rig, what: str) -> None:
    """Any process of the user can write the files: a pid no process can have (here >= 2**31,
    which os.kill refuses with OverflowError) must not break connect or subscribe."""
    S = shm._shm
    h = shm.topic_hash(rig.topic)
    if what == "segment":
        path = os.path.join(rig.dir, f"msf-{h}-0000000000000001-000001.seg")
        data = bytes(_forged_segment(rig.topic, pid=0xFFFFFFFF, start=0))
    else:
        path = os.path.join(rig.dir, f"msf-{h}.bell")
        users = struct.pack("<IIQ", 0xFFFFFFF0, 0, 0) * S.MAX_USERS
        data = bytes(S.B_USERS) + users
        data += bytes(S.BELL_BYTES - len(data))
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        sub = rig.connect().subscribe(rig.topic)
        pub = rig.connect()
        publish(pub, rig.topic, SMALL, 1)
        assert [(g.seq, g.ok) for g in receive(sub, 1, timeout=10)] == [(1, True)]
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.parametrize("opts", [{"slots": 1}, {"slots": 65}, {"full_policy": "x"}, {"slot_bytes": 10},
                                  {"slots": "many"}, {"zero_copy": "maybe"}])
def test_out_of_range_options_are_config_errors(shm_dir: str, opts: Dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        msight_fast.connect("shm", dir=shm_dir, **opts)


def test_out_of_range_environment_is_a_config_error(shm_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSIGHT_SHM_SLOTS", "1")
    with pytest.raises(ConfigError, match="MSIGHT_SHM_SLOTS"):
        msight_fast.connect("shm", dir=shm_dir)


def test_a_missing_directory_is_backend_unavailable(shm_dir: str) -> None:
    with pytest.raises(BackendUnavailable, match="not a directory"):
        msight_fast.connect("shm", dir=os.path.join(shm_dir, "nope"))


def test_groups_and_persistence_are_clear_errors(shm_dir: str) -> None:
    bus = msight_fast.connect("shm", dir=shm_dir)
    try:
        with pytest.raises(ConfigError, match="broadcast only"):
            bus.subscribe("t", group_id="workers")
        with pytest.raises(ConfigError, match="keeps no messages"):
            bus.subscribe("t", from_beginning=True)
        with pytest.raises(ConfigError, match="keeps no messages"):
            bus.subscribe("t", start="beginning")
        # a node's group (shared with its other backends) is ignored with a warning, not refused
        node = msight_fast.connect_node(msight_fast.NodeConfig(name="n", group_id="g", backend="shm",
                                                               options={"dir": shm_dir}))
        try:
            node.subscribe("t").close()
        finally:
            node.close()
    finally:
        bus.close()


# ---------------------------------------------------------------------------------- review fixes
def test_a_forked_child_leaves_the_parents_segments_alone(rig: Rig) -> None:
    pub = rig.connect()
    sub = rig.connect().subscribe(rig.topic)
    publish(pub, rig.topic, SMALL, 1)
    assert [g.seq for g in receive(sub, 1, timeout=10)] == [1]
    pid = os.fork()
    if pid == 0:                                       # the child: its copy is out of use, and it exits normally
        code = 0
        try:
            pub.publish(rig.topic, b"from the child")
            code = 3                                   # it must have raised
        except BackendUnavailable as e:
            code = 0 if "fork" in str(e) else 4
        except BaseException:
            code = 5
        finally:
            import atexit
            atexit._run_exitfuncs()                    # what a normal exit runs: must not close the parent's
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    for k in (2, 3, 4):
        publish(pub, rig.topic, SMALL, k)
    assert [g.seq for g in receive(sub, 3, timeout=10)] == [2, 3, 4]
    assert len(rig.files(".seg")) == 1


def test_a_reshaped_loan_keeps_its_slot_until_every_view_is_gone(rig: Rig) -> None:
    pub = rig.connect()
    sub = rig.connect().subscribe(rig.topic)
    flat = pub.loan(rig.topic, 120 * 160 * 3)
    img = flat.reshape(SMALL)                          # a view; the loan itself is dropped below
    del flat
    import gc
    gc.collect()
    pattern(SMALL, 1, out=img)
    pub.publish(rig.topic, img, meta={"k": 1})
    assert pub.stats()["zero_copy"] == 1 and not img.flags.writeable
    got = receive(sub, 1, timeout=10)
    assert [(g.seq, g.ok) for g in got] == [(1, True)]


def test_foreign_files_in_the_directory_are_neither_trusted_nor_a_hang(rig: Rig) -> None:
    h = shm.topic_hash(rig.topic)
    os.mkfifo(os.path.join(rig.dir, f"msf-{h}-00000000000000aa-000001.seg"))   # an open of it would block
    os.mkfifo(os.path.join(rig.dir, "msf-ffffffffffffffffffff.bell"))
    loose = os.path.join(rig.dir, f"msf-{h}-00000000000000bb-000001.seg")
    with open(loose, "wb") as f:                       # readable by all: not one of ours, left alone
        f.write(b"\0" * 8192)
    os.chmod(loose, 0o644)
    done = threading.Event()
    result: List[Any] = []

    def run() -> None:
        try:
            pub = rig.connect()                        # connect sweeps the directory
            sub = rig.connect().subscribe(rig.topic)
            publish(pub, rig.topic, SMALL, 1)
            result.extend(receive(sub, 1, timeout=10))
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "a FIFO in the directory hung connect, sweep or recv"
    assert [(g.seq, g.ok) for g in result] == [(1, True)]
    assert os.path.exists(loose)
    for n in os.listdir(rig.dir):                      # the fixture checks for msf-* files: these are the test's
        if not n.endswith(".seg") or "-00000000000000" in n:
            p = os.path.join(rig.dir, n)
            if not os.path.isfile(p) or os.stat(p).st_mode & 0o077:
                os.unlink(p)


def test_a_loan_published_inside_a_frame_turns_read_only_too(rig: Rig) -> None:
    pub = rig.connect()
    sub = rig.connect().subscribe(rig.topic)
    img = pub.loan(rig.topic, SMALL)
    pattern(SMALL, 1, out=img)
    pub.publish(rig.topic, msight_fast.Frame.from_array(img, sensor_name="cam", meta={"k": 1}))
    assert pub.stats()["zero_copy"] == 1 and not img.flags.writeable
    with pytest.raises(ValueError):
        img[0, 0, 0] = 7                               # the slot is committed: readers may hold it
    assert [(g.seq, g.ok) for g in receive(sub, 1, timeout=10)] == [(1, True)]
