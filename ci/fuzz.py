"""Differential fuzzing of the wire codecs: N structure-aware mutations through both decoders.

    python ci/fuzz.py N [--seed S] [--impl both|cython|python] [--out DIR] [--show K]
    python ci/fuzz.py --replay FILE...          classify saved inputs again (.bin from --out)

The mutations and the classifier are tests/fuzzing.py (loaded by path: this runs against the
installed package, never the source tree's copy). Prints a table of outcomes per implementation,
the number of disagreements and the first few offending inputs as hex, saves every distinct
offender under --out, and exits 3 when any input escaped as another exception than FrameError,
broke an invariant, or made the codecs disagree (0: none; 2: usage or setup error). The input
being decoded is mirrored into OUT/last-input.bin, so a crash leaves it behind.
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import importlib.util
import mmap
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
EXIT_FINDINGS, EXIT_USAGE = 3, 2
KINDS = {b"F": "frame", b"P": "fragment"}
LAST_INPUT_MAX = 4 << 20


def load_engine() -> Any:
    spec = importlib.util.spec_from_file_location("msight_fuzzing", ROOT / "tests" / "fuzzing.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


class LastInput:
    """The input being decoded, in a shared file mapping: the kernel keeps it if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "wb") as fh:
            fh.truncate(9 + LAST_INPUT_MAX)
        self._fh = open(path, "r+b")
        self._mm = mmap.mmap(self._fh.fileno(), 9 + LAST_INPUT_MAX)

    def set(self, kind: str, buf: bytes) -> None:
        n = min(len(buf), LAST_INPUT_MAX)
        self._mm[:9] = struct.pack("<Qc", n, b"F" if kind == "frame" else b"P")
        self._mm[9:9 + n] = buf[:n]

    def close(self) -> None:
        self._mm.close()
        self._fh.close()
        self.path.unlink()                 # a complete run leaves no stale "last input" behind


def read_saved(path: Path) -> Tuple[str, bytes]:
    raw = path.read_bytes()
    if path.name == "last-input.bin":
        n, kind = struct.unpack_from("<Qc", raw)
        return KINDS[kind], raw[9:9 + n]
    return ("fragment" if raw[:4] == b"\x93MSP" else "frame"), raw


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, nargs="?", help="number of mutations")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--impl", choices=("both", "cython", "python"), default="both")
    ap.add_argument("--out", type=Path, default=None, help="where offending inputs go (default: a new temp dir)")
    ap.add_argument("--show", type=int, default=5, help="offending inputs to print")
    ap.add_argument("--fragment-share", type=float, default=0.15)
    ap.add_argument("--core-dir", type=Path, default=None,
                    help="fail unless the compiled core is loaded from under this directory")
    ap.add_argument("--replay", type=Path, nargs="+", default=None)
    a = ap.parse_args(argv)
    if a.replay is None and (a.n is None or a.n < 1):
        ap.error("give N >= 1, or --replay FILE")

    faulthandler.enable()                  # a crash prints where it happened
    warnings.simplefilter("error")         # a warning out of a decoder counts, as under pytest
    F = load_engine()
    from msight_fast import _impl
    if a.impl in ("both", "cython") and not _impl.HAS_EXTENSIONS:
        print(f"the compiled core is not loaded ({_impl.EXTENSION_ERROR!r}); use --impl python to fuzz "
              "the twin alone", file=sys.stderr)
        return EXIT_USAGE
    impls = F.implementations(a.impl)
    core = getattr(impls.get("cython"), "__file__", None)
    if a.core_dir is not None and (core is None or not Path(core).resolve().is_relative_to(a.core_dir.resolve())):
        print(f"the compiled core in use is {core}, not the one built under {a.core_dir}", file=sys.stderr)
        return EXIT_USAGE
    print(f"codecs: {', '.join(impls)}" + (f" (compiled core: {core})" if core else ""))

    if a.replay is not None:
        bad = 0
        for p in a.replay:
            kind, buf = read_saved(p)
            v = F.classify(buf, impls, kind)
            bad += v.failed
            print(f"{p}: {kind} of {len(buf)} bytes: {v.outcomes} {'AGREE' if v.agree else 'DISAGREE: ' + v.why}")
            for k, m in v.messages.items():
                print(f"  {k}: {m}")
        return EXIT_FINDINGS if bad else 0

    out = a.out or Path(tempfile.mkdtemp(prefix="msight-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    seeds, mismatches = F.seed_frames(impls)
    mut = F.Mutator(seeds, fragment_share=a.fragment_share)
    last = LastInput(out / "last-input.bin")
    print(f"{a.n} mutations of {len(seeds)} seed frames, seed {a.seed}; offending inputs go to {out}")
    for m in mismatches:
        print(f"ENCODERS DIFFER: {m}")

    counts: collections.Counter[Tuple[str, str, str]] = collections.Counter()
    by_sig: collections.Counter[Any] = collections.Counter()
    first: List[Tuple[int, Any, Any]] = []
    disagree = failed = saved = 0
    step = max(1, a.n // 10)
    t0 = time.monotonic()
    for i in range(a.n):
        case = mut.case(a.seed, i)
        last.set(case.kind, case.buf)
        v = F.classify(case.buf, impls, case.kind)
        for name, o in v.outcomes.items():
            counts[(case.kind, o, name)] += 1
        if v.failed:
            failed += 1
            disagree += not v.agree
            sig = (case.kind,) + v.signature()
            by_sig[sig] += 1
            if by_sig[sig] == 1 or saved < 100:
                if saved < 1000:
                    stem = out / f"{case.kind}-seed{a.seed}-case{i}"
                    stem.with_suffix(".bin").write_bytes(case.buf)
                    stem.with_suffix(".txt").write_text(
                        f"seed {a.seed} case {i} ({case.kind}, {len(case.buf)} bytes)\nmutations: {case.ops}\n"
                        f"outcomes: {v.outcomes}\nagree: {v.agree} {v.why}\nmessages: {v.messages}\n"
                        f"hex: {case.buf.hex()}\n")
                    saved += 1
                if by_sig[sig] == 1 and len(first) < a.show:
                    first.append((i, case, v))
        if (i + 1) % step == 0 or i + 1 == a.n:
            dt = time.monotonic() - t0
            print(f"  {i + 1:>9}/{a.n} ({100 * (i + 1) // a.n:3d}%)  {(i + 1) / dt:8.0f} cases/s  "
                  f"failures so far: {failed}", flush=True)
    last.close()

    names = list(impls)
    rows = sorted({(k, o) for k, o, _ in counts})
    w = max([len(f"{k} {o}") for k, o in rows] + [20])
    print(f"\n{'outcome':<{w}} " + " ".join(f"{n:>10}" for n in names))
    for k, o in rows:
        print(f"{k + ' ' + o:<{w}} " + " ".join(f"{counts[(k, o, n)]:>10}" for n in names))
    print(f"disagreements: {disagree if len(names) > 1 else 'n/a (one implementation)'}")
    print(f"failing inputs: {failed} ({len(by_sig)} distinct kinds), {saved} saved to {out}")
    for sig, n in by_sig.most_common(20):
        print(f"  {n:>7} x {sig[0]} {dict(sig[1])} {sig[3] or ''}".rstrip())
    for i, case, v in first:
        print(f"\ncase {i} (seed {a.seed}, {case.kind}, {len(case.buf)} bytes; mutations {case.ops})")
        print(f"  outcomes: {v.outcomes}" + ("" if v.agree else f"\n  disagree: {v.why}"))
        for k, m in v.messages.items():
            print(f"  {k}: {m}")
        print(f"  hex: {F.hexdump(case.buf, 2048)}")
    if mismatches:
        failed += len(mismatches)
    return EXIT_FINDINGS if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
