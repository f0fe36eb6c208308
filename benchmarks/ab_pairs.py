"""One cell of the transport table from two source trees, alternated, with the CPU behind it:

    python benchmarks/ab_pairs.py --a <tree> --b <tree> [--backend redis] [--payload 1080p]
        [--path msight] [--pairs 10] [--seconds 4] [--json <file>]

A tree is a checkout of this repository with its extension built (a ``git worktree`` of another
commit, with ``msight_fast/_ext/*.so`` copied in where the extension did not change). Each run
is that tree's own ``benchmarks/transport.py`` for the one cell, in a fresh process with a fresh
broker, with the tree first on ``PYTHONPATH``. The runs go in ABBA order, so a drift of the
machine over the runs weighs on both sides alike; the two runs of a pair are the b/a ratio.

Besides the delivered rate, it prints each side's CPU per frame, as the transport table does
(the publishing process's per frame published; the subscribing process's and the broker's per
frame received), and the broker's CPU seconds per second of delivery ("broker cores"). Where the
broker is the bottleneck (a single-threaded redis-server near a whole core), the rate follows
the broker's CPU per frame; a client change shows as its own CPU per frame too, taken here
against the broker's of the same run so that a slower machine moves both alike. An even
``--pairs`` keeps the order balanced.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List


def _run(tree: str, a: argparse.Namespace) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        cmd = [sys.executable, os.path.join(tree, "benchmarks", "transport.py"), "--backends", a.backend,
               "--payloads", a.payload, "--paths", a.path, "--seconds", str(a.seconds), "--out", out]
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
        with open(os.path.join(out, "transport.json")) as f:
            rows = json.load(f)["results"]
    row = next(r for r in rows if (r["backend"], r["payload"], r["path"]) == (a.backend, a.payload, a.path))
    # as transport.py's table: the publisher's CPU per frame published, the others' per frame received
    n = {"pub": max(row["published"], 1), "sub": max(row["received"], 1), "broker": max(row["received"], 1)}
    per = {k: (row.get(k + "_cpu_s") or 0.0) / n[k] * 1e6 for k in ("pub", "sub", "broker")}
    # the broker's CPU seconds per second of delivery (first to last receipt): near 1 for a
    # single-threaded broker that is the bottleneck; a multi-threaded one can pass 1
    wall = row["received"] / row["fps"] if row.get("fps") else 0.0
    return {"fps": row["fps"], "lost": row["lost"], "pub_us": per["pub"], "sub_us": per["sub"],
            "broker_us": per["broker"], "broker_busy": (row.get("broker_cpu_s") or 0.0) / wall if wall else 0.0}


def _ratios(runs: Dict[str, List[Dict[str, Any]]]) -> List[float]:
    """Each pair's b/a delivered rate."""
    return [rb["fps"] / ra["fps"] for ra, rb in zip(runs["a"], runs["b"]) if ra["fps"]]


def _save(path: str, a: argparse.Namespace, runs: Dict[str, List[Dict[str, Any]]]) -> None:
    with open(path, "w") as f:
        json.dump({"args": vars(a), "runs": runs, "ratios": _ratios(runs)}, f, indent=1)


def _med(runs: List[Dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the first tree (the baseline)")
    ap.add_argument("--b", required=True, help="the second tree")
    ap.add_argument("--backend", default="redis")
    ap.add_argument("--payload", default="1080p")
    ap.add_argument("--path", default="msight")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", help="write every run's figures here")
    a = ap.parse_args()
    trees = {"a": os.path.abspath(a.a), "b": os.path.abspath(a.b)}
    runs: Dict[str, List[Dict[str, Any]]] = {"a": [], "b": []}
    for k in range(a.pairs):
        for side in ("ab" if k % 2 == 0 else "ba"):
            r = _run(trees[side], a)
            runs[side].append(r)
            print(f"pair {k + 1:2d} {side}: {r['fps']:10.1f} frames/s  lost {r['lost']}  CPU µs/frame pub / sub / "
                  f"broker {r['pub_us']:,.0f} / {r['sub_us']:,.0f} / {r['broker_us']:,.0f}  broker cores "
                  f"{r['broker_busy']:.2f}", flush=True)
            if a.json:                     # kept run by run: a run that fails loses none before it
                _save(a.json, a, runs)
    ratios = _ratios(runs)
    if not ratios:
        print("no run delivered a frame")
        return 1
    print(f"\n{a.backend} {a.payload} {a.path}, {a.pairs} pairs of {a.seconds:g} s")
    for side in "ab":
        rs = runs[side]
        print(f"  {side}: {_med(rs, 'fps'):,.1f} frames/s ({min(r['fps'] for r in rs):,.1f}–"
              f"{max(r['fps'] for r in rs):,.1f}); CPU µs/frame pub / sub / broker {_med(rs, 'pub_us'):,.0f} / "
              f"{_med(rs, 'sub_us'):,.0f} / {_med(rs, 'broker_us'):,.0f}; broker cores {_med(rs, 'broker_busy'):.2f}")
    print(f"  b/a delivered rate: median {statistics.median(ratios):.3f}x ({min(ratios):.2f}–{max(ratios):.2f}), "
          f"b higher in {sum(x > 1 for x in ratios)} of {len(ratios)} pairs")
    for who in ("pub", "sub", "broker"):
        rel = [(rb[who + "_us"] / rb["broker_us"]) / (ra[who + "_us"] / ra["broker_us"])
               for ra, rb in zip(runs["a"], runs["b"]) if ra["broker_us"] and rb["broker_us"] and ra[who + "_us"]]
        raw = [rb[who + "_us"] / ra[who + "_us"] for ra, rb in zip(runs["a"], runs["b"]) if ra[who + "_us"]]
        if raw:
            line = f"  b/a {who} CPU per frame: median {statistics.median(raw):.3f}x ({min(raw):.2f}–{max(raw):.2f})"
            if who != "broker" and rel:
                line += (f"; against the broker's of the same run: median {statistics.median(rel):.3f}x "
                         f"({min(rel):.2f}–{max(rel):.2f})")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
