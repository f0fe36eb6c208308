"""The seeded mutation corpus: MSIGHT_FUZZ_CASES (default 20,000) structure-aware mutations of
valid frames and fragments (tests/fuzzing.py) through every available codec.

Every outcome must be "ok" or FrameError in each implementation; with both codecs loaded (not
under MSIGHT_FAST_NO_EXTENSIONS=1) they must also agree on every input. The seed is fixed
(MSIGHT_FUZZ_SEED overrides it), so a failure names a case that ``ci/fuzz.py`` reproduces:
``python ci/fuzz.py N --seed S`` runs the same cases, and ``--replay`` takes the saved input.
ci/sanitize.sh runs 100,000 cases against the compiled core built with ASan and UBSan.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Dict, List, Tuple

import pytest

from ..fuzzing import Mutator, classify, hexdump, implementations, seed_frames

CASES = int(os.environ.get("MSIGHT_FUZZ_CASES", "20000"))
SEED = int(os.environ.get("MSIGHT_FUZZ_SEED", "20240601"))


@pytest.fixture(scope="module")
def seeds() -> Tuple[List[bytes], List[str]]:
    return seed_frames()


def test_encoders_agree_bit_for_bit_on_every_seed(seeds):
    if len(implementations()) < 2:
        pytest.skip("one codec loaded (MSIGHT_FAST_NO_EXTENSIONS=1 or no compiled core): nothing to compare")
    frames, mismatches = seeds
    assert len(frames) >= 40 and not mismatches


def test_every_seed_decodes_alike_in_every_codec(seeds):
    impls = implementations()
    for buf in seeds[0]:
        v = classify(buf, impls)
        assert set(v.outcomes.values()) == {"ok"} and v.agree, (v, hexdump(buf, 512))


def test_mutation_corpus(seeds):
    impls = implementations()
    mut = Mutator(seeds[0])
    counts: Dict[Tuple[str, str, str], int] = collections.Counter()
    failures: Dict[Any, List[Tuple[int, Any, Any]]] = {}
    for i in range(CASES):
        case = mut.case(SEED, i)
        v = classify(case.buf, impls, case.kind)
        for name, o in v.outcomes.items():
            counts[(case.kind, name, o)] += 1
        if v.failed:
            failures.setdefault((case.kind,) + v.signature(), []).append((i, case, v))
    table = "\n".join(f"  {k} {n} {o}: {c}" for (k, n, o), c in sorted(counts.items()))
    if failures:
        lines = [f"{sum(len(x) for x in failures.values())} of {CASES} cases failed (seed {SEED}), "
                 f"{len(failures)} kinds; reproduce with: python ci/fuzz.py {CASES} --seed {SEED}", table]
        for cases in list(failures.values())[:8]:
            i, case, v = cases[0]
            lines.append(f"\n{len(cases)} x {v.outcomes} {v.why}\n  first: case {i} ({case.kind}, "
                         f"{len(case.buf)} bytes, mutations {case.ops})\n  messages: {v.messages}\n"
                         f"  hex: {hexdump(case.buf, 1024)}")
        pytest.fail("\n".join(lines), pytrace=False)
    # the corpus must reach past the early checks, and be refused by them too: else it tests little
    for name in impls:
        ok = counts[("frame", name, "ok")]
        refused = counts[("frame", name, "FrameError")]
        assert ok >= CASES // 20 and refused >= CASES // 4, f"a lopsided corpus:\n{table}"
