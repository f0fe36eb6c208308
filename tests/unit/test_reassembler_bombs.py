"""The Reassembler under attack: forged geometry, floods from one publisher, memory bombs, and
timed-out frames that must go on the clock (no feed needed)."""
import gc
import json
import subprocess
import sys
import threading
import tracemalloc
import weakref

import numpy as np
import pytest

from msight_fast import Frame, FrameError, Reassembler, codec, encode, fragment
from msight_fast import _schema as S
from msight_fast.bus import Subscription
from msight_fast.config import RedisConfig

from ..helpers import REPO, ScriptedSource, wait_for
from ..reassembler_bomb import forged

A, B, C = 0xA, 0xB, 0xC


def _frame(pub, n=20_000, seed=0, max_size=4096):
    """(payload, fragments) of one frame of publisher ``pub``; small, as the twin's CRC is slow."""
    arr = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    f = Frame.from_array(arr, sensor_name="cam")
    f.publisher_id = pub
    return arr, fragment(encode(f), max_size)


def _intact(out, arr):
    done = [g for g in out if g is not None]
    return len(done) == 1 and np.array_equal(done[0].array, arr)


def _reaper_threads():
    return [t for t in threading.enumerate() if t.name == "msight-fast-reaper"]


# index, count, total, chunk_size, and offset / chunk length when not the consistent ones
BAD_GEOMETRY = {
    "total over max_frame_bytes": (0, 65_537, (256 << 20) + 1, 4097, None, None),
    "256 MB in 1-byte chunks": (0, 256 << 20, 256 << 20, 1, None, None),
    "count over 65536": (0, 65_537, 65_537, 1, None, None),
    "zero total": (0, 0, 0, 1, None, None),
    "zero chunk size": (0, 1, 100, 0, None, None),
    "count not ceil(total / chunk)": (0, 11, 100, 10, None, None),
    "index past count": (10, 10, 100, 10, None, 1),
    "offset not index x chunk": (1, 10, 100, 10, 11, None),
    "chunk shorter than its place": (0, 10, 100, 10, None, 9),
    "last chunk longer than the rest": (9, 10, 95, 10, None, 10),
}


@pytest.mark.parametrize("case", sorted(BAD_GEOMETRY))
def test_a_rejected_fragment_allocates_nothing_and_leaves_nothing(case):
    index, count, total, chunk_size, offset, chunk_len = BAD_GEOMETRY[case]
    msg = forged(A, 1, index, count, total, chunk_size, offset=offset, chunk_len=chunk_len)
    r = Reassembler()
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="max_frame_bytes|geometry|does not fit"):
            r.feed(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"{peak} bytes allocated for a rejected fragment"
    assert r.pending == 0 and r.rejected == 1 and not r._abandoned and not r._done
    assert r.stats()["refused"] == r.stats()["evicted"] == 0


def test_the_documented_bound_covers_what_a_pending_frame_and_a_remembered_key_cost():
    n, total, chunk = 64, 65_536 * 100, 100                   # the largest map: 65,536 chunks
    r = Reassembler(max_frame_bytes=total, max_pending=n, max_pending_per_publisher=n)
    top = (1 << 64) - 1                                       # the largest ids make the largest keys
    msgs = [forged(top - i, top - i, 0, 65_536, total, chunk, sending=0xFFFFFFFF) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for m in msgs:
            r.feed(m)
        held = tracemalloc.get_traced_memory()[0] - base
        r.expire(now=float("inf"))                            # every key now in the abandoned LRU
        keys = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert r.pending == 0 and r.expired == n and len(r._abandoned) == n
    per_frame = held / n - (total + S.ALIGN + 65_536)
    assert 0 < per_frame < codec._ENTRY_OVERHEAD / 4          # the rest of 8 KiB: allocation rounding
    assert 0 < keys / n < codec._KEY_COST
    assert r.memory_bound == n * (total + 64 + 65_536 + 8192) + 2 * (4 * n + 64) * 1024


def test_a_forged_first_fragment_with_the_genuine_ids_cannot_stop_the_genuine_frame():
    arr, frags = _frame(A)
    fid, _, _, count, total, _, chunk_size, sending, _ = codec.impl.parse_fragment_header(frags[0])
    r = Reassembler()
    # the same (publisher_id, frame_id, sending), another geometry, before any genuine fragment
    with pytest.raises(FrameError):            # its chunk is not a frame: it cannot complete as one
        r.feed(forged(A, fid, 0, 1, 5000, 5000, sending=sending))
    assert r.feed(forged(A, fid, 0, 3, 5000, 2000, sending=sending)) is None
    assert r.pending == 1
    assert _intact([r.feed(f) for f in frags], arr)
    assert r.rejected == 1 and r.completed == 1 and r.pending == 1    # the forgery waits for its time
    assert r.expire(now=float("inf")) == 1 and r.pending == 0


def test_forged_fragments_interleaved_with_the_genuine_ones_do_not_spoil_it():
    arr, frags = _frame(A, n=60_000)
    head = codec.impl.parse_fragment_header(frags[0])
    fid, sending = head[0], head[7]
    total = sum(len(f) - S.FRAG_HEADER_LEN for f in frags)
    n = len(frags)
    # two other geometries under the genuine ids and sending; the second one gets all its chunks,
    # so it completes (as garbage, rejected) in the middle of the genuine frame
    before = [forged(A, fid, i % 30, 30, 30 * 100, 100, sending=sending) for i in range(n)]
    after = [forged(A, fid, i % 7, -(-total // 9999), total, 9999, sending=sending) for i in range(n)]
    r = Reassembler()
    out = []

    def feed(msg):
        try:
            out.append(r.feed(msg))
        except FrameError:
            out.append("rejected")

    for i in range(n):
        feed(before[i])
        feed(frags[i])
        feed(after[i])
    assert _intact([o for o in out if o != "rejected"], arr)
    assert r.completed == 1 and out.count("rejected") == r.rejected == 1 and r.evicted == 0
    assert r.pending_keys() == [(A, fid)]        # the unfinished forgery, under the pair it forged


def test_a_publisher_at_its_quota_evicts_only_its_own_oldest():
    r = Reassembler(max_pending=8)                        # 4 per publisher
    b_frames = [_frame(B, seed=s) for s in (1, 2)]
    for _, frags in b_frames:
        assert r.feed(frags[0]) is None                   # B's frames in progress...
    a_frames = [_frame(A, seed=10 + s) for s in range(20)]
    for _, frags in a_frames:
        assert r.feed(frags[0]) is None                   # ...through A's flood
    assert r.evicted == 16 and r.refused == 0 and r.expired == 0 and r.pending == 6
    fids = {codec.impl.parse_fragment_header(f[0])[0] for _, f in a_frames[-4:]}
    assert {k for k in r.pending_keys() if k[0] == A} == {(A, fid) for fid in fids}   # A's newest four
    for arr, frags in b_frames:
        assert _intact([r.feed(f) for f in frags[1:]], arr)
    # the rest of an evicted frame is dropped and counted, without taking room again
    assert all(r.feed(f) is None for f in a_frames[0][1][1:])
    assert r.refused == len(a_frames[0][1]) - 1 and r.evicted == 16 and r.pending == 4
    arr, frags = a_frames[-1]
    assert _intact([r.feed(f) for f in frags[1:]], arr)   # and A's newest still completes


def test_a_new_publisher_is_refused_when_every_slot_is_held_by_others_and_nobody_is_evicted():
    r = Reassembler(max_pending=4)                        # 2 per publisher
    held = [_frame(A, seed=1), _frame(A, seed=2), _frame(B, seed=3), _frame(B, seed=4)]
    for _, frags in held:
        r.feed(frags[0])
    arr_c, frags_c = _frame(C, seed=5)
    assert r.feed(frags_c[0]) is None
    assert r.refused == 1 and r.pending == 4 and r.evicted == 0
    assert all(r.feed(f) is None for f in frags_c[1:])   # the rest of C's frame: refused too
    assert r.refused == len(frags_c) and r.pending == 4 and r.evicted == 0
    for arr, frags in held:                               # every frame in progress completes
        assert _intact([r.feed(f) for f in frags[1:]], arr)
    arr_c2, frags_c2 = _frame(C, seed=6)                  # room again: C's next frame is taken
    assert _intact([r.feed(f) for f in frags_c2], arr_c2)
    assert r.stats() == {"completed": 5, "expired": 0, "evicted": 0, "refused": len(frags_c),
                         "duplicates": 0, "rejected": 0, "pending": 0}


def test_quota_arguments():
    assert Reassembler(max_pending=8).max_pending_per_publisher == 4
    assert Reassembler(max_pending=1).max_pending_per_publisher == 1
    for bad in (0, 9):
        with pytest.raises(ValueError):
            Reassembler(max_pending=8, max_pending_per_publisher=bad)


def test_a_timed_out_frame_is_freed_on_the_clock_with_no_further_feed():
    r = Reassembler(timeout_s=0.2)
    _, frags = _frame(A)
    assert r.feed(frags[0]) is None and r.pending == 1
    wait_for(lambda: r.pending == 0, "the reaper to drop the timed-out frame", timeout=10)
    assert r.expired == 1 and r.evicted == 0 and r.refused == 0
    assert r.feed(frags[1]) is None and r.refused == 1 and r.pending == 0   # its rest is dropped
    assert len(_reaper_threads()) == 1


def test_one_reaper_serves_every_reassembler():
    rs = [Reassembler(timeout_s=0.2 + i / 10) for i in range(5)]
    for i, r in enumerate(rs):
        r.feed(_frame(A, seed=i)[1][0])
    wait_for(lambda: all(r.pending == 0 for r in rs), "every reassembler's frame to time out", timeout=10)
    assert [r.expired for r in rs] == [1] * 5 and len(_reaper_threads()) == 1


def test_the_reaper_holds_reassemblers_weakly():
    r = Reassembler(timeout_s=600)
    r.feed(_frame(A)[1][0])
    assert _reaper_threads() and id(r) in codec._REAPER._watched
    ref = weakref.ref(r)
    del r

    def collected():
        gc.collect()
        return ref() is None

    wait_for(collected, "the dropped reassembler to be collected", timeout=10)
    assert _reaper_threads()                               # the reaper runs on, for the others


@pytest.mark.parametrize("lock", ["", "locked"])
def test_a_forked_child_expires_frames_on_its_own_reaper(lock):
    # "locked": a parent thread held the reassembler's lock at the fork; the child's copy must not
    # stay held forever (its holder does not exist in the child)
    res = subprocess.run([sys.executable, str(REPO / "tests" / "reassembler_bomb.py"), "fork"]
                         + ([lock] if lock else []), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_reassembler_bombs_stay_under_the_documented_bound():
    """10,000 forged fragments of varied geometry and one genuine frame, in a fresh process."""
    mfb, pending = 8 << 20, 8
    res = subprocess.run([sys.executable, str(REPO / "tests" / "reassembler_bomb.py"), str(mfb), str(pending)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nreassembler bombs ({got['forged']} forged fragments, max_frame_bytes={mfb}, max_pending={pending}, "
          f"extensions={got['extensions']}): peak RSS growth {got['peak_rss_growth'] / 2**20:.1f} MiB, "
          f"documented bound {got['memory_bound'] / 2**20:.1f} MiB; {got['stats']}")
    assert got["memory_bound"] == Reassembler(mfb, pending).memory_bound < 65 << 20
    assert 0 <= got["peak_rss_growth"] < got["memory_bound"]
    assert got["genuine_ok"]
    st = got["stats"]
    assert st["pending"] <= pending and st["completed"] == 1 and st["expired"] == 0
    assert st["evicted"] > 0 and st["refused"] > 0 and st["rejected"] == got["rejected_raised"] > 0


def test_subscription_releases_the_tokens_of_evicted_and_refused_frames():
    msgs = []
    for pub, seeds in ((A, range(5)), (B, range(5, 9)), (C, [9])):   # A: one over its quota of 4
        for s in seeds:
            msgs.append((_frame(pub, seed=s)[1][0], (pub, s)))
    src = ScriptedSource(msgs)
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    assert sub.recv(0) is None
    st = sub.stats()
    assert st["fragments_evicted"] == 1 and st["fragments_refused"] == 1 and st["fragments_expired"] == 0
    # A's oldest frame (evicted) and C's (refused: A and B hold the 8 slots) let go of their offsets
    assert sorted(src.handed_tokens) == [(A, 0), (C, 9)]
    assert sorted(t for ts in sub._tokens.values() for t in ts) == sorted(t for _, t in msgs
                                                                          if t not in ((A, 0), (C, 9)))


def test_subscription_releases_the_tokens_of_a_frame_the_reaper_expired_between_recvs():
    _, frags = _frame(A)
    src = ScriptedSource([(frags[0], ("p", 0)), (frags[1], ("p", 1))])
    sub = Subscription(None, "t", src, RedisConfig(), None, whole_stream=True)
    sub._reasm = Reassembler(timeout_s=0.2)
    assert sub.recv(0) is None and sub._reasm.pending == 1 and not src.handed_tokens
    wait_for(lambda: sub._reasm.pending == 0, "the reaper to drop the frame", timeout=10)
    assert sub.recv(0) is None                            # nothing arrives: the offsets go anyway
    assert src.handed_tokens == [("p", 0), ("p", 1)] and not sub._tokens
    assert sub.stats()["fragments_expired"] == 1


def test_a_publisher_holding_frames_makes_room_from_its_own_when_every_slot_is_taken():
    r = Reassembler(max_pending=4)                        # 2 per publisher
    a1, a2, b1 = _frame(A, seed=1), _frame(A, seed=2), _frame(B, seed=3)
    for _, frags in (a1, b1, a2):
        r.feed(frags[0])
    c1 = _frame(C, seed=4)
    r.feed(c1[1][0])                                      # the fourth slot
    b2 = _frame(B, seed=5)
    assert r.feed(b2[1][0]) is None                       # B holds one, all four taken: B's own goes
    assert r.evicted == 1 and r.refused == 0 and r.pending == 4
    assert {k[0] for k in r.pending_keys()} == {A, B, C}
    for arr, frags in (a1, a2, c1, b2):
        assert _intact([r.feed(f) for f in frags[1:]], arr)


def _same_geometry_forgery(genuine: bytes) -> bytes:
    """A fragment with the genuine one's ids and geometry and other bytes: what an attacker who
    watches the wire can race against the genuine fragment."""
    fid, pub, index, count, total, offset, chunk_size, sending, chunk = codec.impl.parse_fragment_header(genuine)
    bad = bytes(b ^ 0xFF for b in bytes(chunk))
    return codec.impl.pack_fragment_header(fid, pub, index, count, total, offset, chunk_size, bad, sending) + bad


@pytest.mark.parametrize("forgery_first", [True, False])
def test_two_different_copies_of_one_fragment_drop_the_frame_rather_than_mix_it(forgery_first):
    arr, frags = _frame(A)
    fake = _same_geometry_forgery(frags[1])
    r = Reassembler()
    order = [frags[0], fake, frags[1]] if forgery_first else [frags[0], frags[1], fake]
    assert r.feed(order[0]) is None and r.feed(order[1]) is None
    with pytest.raises(FrameError, match="different bytes"):
        r.feed(order[2])
    assert r.rejected == 1 and r.pending == 0
    assert all(r.feed(f) is None for f in frags[2:])       # the rest is dropped, never delivered
    assert r.completed == 0 and r.refused == len(frags) - 2
    # an identical copy is a plain duplicate
    arr2, frags2 = _frame(A, seed=9)
    assert r.feed(frags2[0]) is None and r.feed(frags2[0]) is None and r.duplicates == 1
    assert _intact([r.feed(f) for f in frags2[1:]], arr2)


def test_an_expired_frame_sent_again_from_its_first_fragment_starts_over():
    # a Kafka consumer group re-delivers from the last committed offset after a rebalance: the
    # fragments of a frame that expired meanwhile come again, from index 0
    arr, frags = _frame(A)
    r = Reassembler()
    assert all(r.feed(f) is None for f in frags[:2])
    assert r.expire(now=float("inf")) == 1
    assert r.feed(frags[2]) is None and r.refused == 1      # a straggler of the dropped frame
    assert _intact([r.feed(f) for f in frags], arr)          # the whole frame again
    assert r.completed == 1 and r.pending == 0
