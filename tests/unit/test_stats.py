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
