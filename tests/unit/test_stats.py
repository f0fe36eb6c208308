"""Sequence accounting in bounded memory, checked against a plain model that remembers everything."""
import random
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from msight_fast.stats import SeqTracker


def _model(seqs):
    """Gaps and duplicates by brute force: missing numbers between first seen and highest, repeats."""
    first, seen, dups = seqs[0], set(), 0
    for s in seqs:
        if s < first:
            continue
        if s in seen:
            dups += 1
        seen.add(s)
    gaps = (max(seen) - first + 1) - len(seen)
    return gaps, dups


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=200))
def test_matches_the_model_within_its_memory(seqs):
    t = SeqTracker()
    for s in seqs:
        t.see(7, s)
    assert (t.gaps, t.duplicates) == _model(seqs)


def test_memory_stays_bounded_over_a_long_run_with_losses():
    t = SeqTracker(max_publishers=64, max_holes=1024)
    rng = random.Random(1)
    tracemalloc.start()
    seq = 0
    for _ in range(200_000):
        seq += 1 + (rng.random() < 0.05) * rng.randint(1, 5)    # 5% of frames lost in bursts
        t.see(1, seq)
    for pub in range(1000):                                     # many publishers come and go
        for s in range(1, 20):
            t.see(1000 + pub, s)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert t.publishers == 64 and t.forgotten == 1000 + 1 - 64
    assert peak < 2 << 20                                       # a run of any length: ~MBs, not growing


def test_a_jump_longer_than_the_hole_memory_still_counts_every_gap():
    t = SeqTracker(max_holes=10)
    t.see(1, 1)
    t.see(1, 1_000_001)
    assert t.gaps == 999_999
    t.see(1, 1_000_000)                   # a late arrival it still remembers as a hole
    assert t.gaps == 999_998
    t.see(1, 5)                           # too old to know: neither gap nor duplicate
    assert (t.gaps, t.duplicates) == (999_998, 0)


class _LruModel:
    """The tracker's rules by brute force for several publishers: every number remembered, the
    least recently seen publisher forgotten past ``max_publishers`` (its gaps stay counted)."""

    def __init__(self, max_publishers):
        self.max_publishers = max_publishers
        self.pubs = {}                    # insertion order = recency: pub -> [first, seen, dups]
        self.retired_gaps = self.forgotten = self.retired_dups = 0

    @staticmethod
    def _gaps(first, seen):
        return (max(seen) - first + 1) - len(seen)

    def see(self, pub, seq):
        st = self.pubs.pop(pub, None)
        if st is None:
            st = [seq, set(), 0]
        if seq >= st[0]:
            if seq in st[1]:
                st[2] += 1
            st[1].add(seq)
        self.pubs[pub] = st
        if len(self.pubs) > self.max_publishers:
            old = next(iter(self.pubs))
            first, seen, dups = self.pubs.pop(old)
            self.retired_gaps += self._gaps(first, seen)
            self.retired_dups += dups
            self.forgotten += 1

    def counts(self):
        gaps = self.retired_gaps + sum(self._gaps(f, s) for f, s, _ in self.pubs.values())
        dups = self.retired_dups + sum(d for _, _, d in self.pubs.values())
        return gaps, dups, len(self.pubs), self.forgotten


# runs of consecutive numbers from a few publishers, interleaved: the in-order case that skips the
# lookup, broken by jumps, repeats, late numbers and switches between publishers
_steps = st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1, 1, 1, 1, 2, 5, 0, -1, -3])),
                  min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(_steps, st.integers(0, 5))
def test_runs_from_several_publishers_match_the_model(steps, max_publishers):
    t, m = SeqTracker(max_publishers=max_publishers), _LruModel(max_publishers)
    last = {}
    for pub, step in steps:
        seq = max(1, last.get(pub, 0) + step)
        last[pub] = max(last.get(pub, 0), seq)
        t.see(pub, seq)
        m.see(pub, seq)
        assert (t.gaps, t.duplicates, t.publishers, t.forgotten) == m.counts()


def test_the_publisher_seen_last_is_the_last_forgotten():
    t = SeqTracker(max_publishers=2)
    t.see(1, 1)
    t.see(2, 1)
    t.see(1, 2)                           # 1 is seen last again, after 2
    t.see(1, 3)                           # in order: no lookup, and 1 stays the most recent
    t.see(3, 1)                           # one too many: 2, the least recent, is forgotten
    assert sorted(t.publisher_ids()) == [1, 3] and t.forgotten == 1
    t.see(2, 2)                           # 2 starts over: not a gap, not a duplicate
    assert (t.gaps, t.duplicates) == (0, 0)


# -- Tally: a Subscription's per-frame accounting, compiled and twin fed the same frames
import pytest  # noqa: E402

from msight_fast import codec  # noqa: E402
from msight_fast.stats import LatencyWindow, PyTally  # noqa: E402

try:
    from msight_fast._ext import _wire
except ImportError:
    _wire = None
# the compiled Tally takes the compiled Frame: compared where that is the codec's Frame
TALLIES = [PyTally] + ([_wire.Tally] if _wire is not None and codec.Frame is _wire.Frame else [])

_U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 2**63, 2**64 - 2, 2**64 - 1]))
_I64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, -(2**63), 2**63 - 1]))
_NOW = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1, 2**63, 2**70, -(2**63), -(2**63) - 1]))
_EVENT = st.one_of(
    st.tuples(st.just("frame"), st.integers(0, 300), st.sampled_from([0, 1, 2, 3, 2**64 - 1]), _U64, _I64, _NOW),
    st.tuples(st.just("run"), st.sampled_from([1, 2]), st.integers(0, 2**64 - 1), st.integers(1, 40)),
    st.tuples(st.just("bytes"), st.integers(0, 5000)),
    st.tuples(st.just("sync"),))


def _counts(t):
    """What the common case leaves as it is: readable without a sync."""
    tr = t.tracker
    return (t.received, t.nbytes, tr.gaps, tr.duplicates, tr.forgotten, tr.publishers)


def _state(t):
    t.sync()
    tr, w = t.tracker, t.window
    pubs = [(k, p.high, p.low, list(p.holes)) for k, p in tr._pubs.items()]
    return _counts(t), pubs, w._i, list(w._a)


@pytest.mark.skipif(len(TALLIES) < 2, reason="the compiled Tally, against the twin")
@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=60), st.integers(1, 5), st.integers(0, 6))
def test_the_compiled_tally_counts_what_the_twin_counts(events, window, holes):
    """Any frames: in-order runs, repeats, jumps, forged seqs and times, clocks past i64, messages
    taken as bytes. The counts agree after every step; tracker and window after each sync, so
    frames also arrive while the compiled one holds its common case unwritten."""
    clock = []
    tallies = [T(SeqTracker(max_publishers=2, max_holes=holes), LatencyWindow(window), lambda: clock[-1])
               for T in TALLIES]

    def feed(n, pid, seq, ts, now):
        clock.append(now)
        for t in tallies:
            f = codec.Frame.from_bytes(b"x" * n, sensor_name="s", encoding="bytes")
            f.publisher_id, f.seq, f.publish_ts_ns = pid, seq, ts
            t.took(f)

    for ev in events:
        if ev[0] == "frame":
            feed(*ev[1:])
        elif ev[0] == "run":                      # the common case: one publisher's next numbers
            _, pid, start, k = ev
            for s in range(start, min(start + k, 2**64)):
                feed(10, pid, s, 5, 1_000)
        elif ev[0] == "bytes":
            for t in tallies:
                t.took_bytes(ev[1])
        else:
            assert len({repr(_state(t)) for t in tallies}) == 1
        assert len({_counts(t) for t in tallies}) == 1
    assert len({repr(_state(t)) for t in tallies}) == 1


def test_a_tally_counts_frames_latency_and_sequence():
    for T in TALLIES:
        t = T(SeqTracker(), LatencyWindow(4), lambda: 10_000)
        for seq, ts in [(1, 9_000), (2, 9_500), (4, 0), (4, 9_990)]:
            f = codec.Frame.from_bytes(b"abc", sensor_name="s", encoding="bytes")
            f.publisher_id, f.seq, f.publish_ts_ns = 7, seq, ts
            t.took(f)
        t.took_bytes(100)
        t.sync()
        assert (t.received, t.nbytes) == (5, 4 * 3 + 100)
        assert (t.tracker.gaps, t.tracker.duplicates) == (1, 1)            # 3 missing, 4 twice
        assert t.window._i == 3 and sorted(t.window._a[:3]) == [10, 500, 1_000]   # no time: no latency
        assert t.window.summary()["latency_max_ns"] == 1_000


def test_a_tally_refuses_a_second_init_and_a_replaced_ring():
    if len(TALLIES) < 2:
        pytest.skip("the compiled Tally")
    w = LatencyWindow(4)
    t = TALLIES[1](SeqTracker(), w, lambda: 0)
    with pytest.raises(TypeError):
        t.__init__(SeqTracker(), LatencyWindow(4), lambda: 0)
    w._a = type(w._a)("q", bytes(32))
    with pytest.raises(RuntimeError):
        t.sync()
