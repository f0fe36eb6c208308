"""Shared-memory backend: latency, throughput, large frames, small frames and fan-out, each
next to a memcpy of the same frame measured in the same run. One publisher process, one
subscriber process (this one), unless said otherwise. Writes results/shm.{json,md}.

    python benchmarks/shm.py [--seconds 3] [--runs 3]

What each row is:
- ``latency``: frames published at 200 Hz (the subscriber is asleep on its futex when each one
  comes), publish to receipt (``time.time_ns()`` on both sides, one clock).
- ``throughput``: published as fast as the publisher can; delivered frames per second.
- ``loan`` publishes write the frame into ``Bus.loan()``'s array (the publisher touches one byte
  of it: a camera driver would fill it); ``copy`` publishes an existing array (one memcpy).
- ``fan-out``: publisher CPU per frame at 30 fps, with 0 and then 4 subscriber processes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

OUT = Path(__file__).resolve().parent / "results"
SHAPES: Dict[str, Tuple[Tuple[int, ...], Any]] = {
    "1080p": ((1080, 1920, 3), np.uint8),
    "4k": ((2160, 3840, 3), np.uint8),
    "lidar262k": ((262144,), np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])),
    "1k": ((1024,), np.uint8),
}


def _cpu() -> float:
    """CPU seconds of this process, to the microsecond (os.times counts 10 ms ticks)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def memcpy_s(shape: Tuple[int, ...], dtype: Any, reps: int = 50) -> float:
    """Median seconds of one copy of such an array into a preallocated one (this machine's memcpy)."""
    a = np.ones(shape, dtype)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _publisher(d: str, topic: str, name: str, mode: str, hz: float, seconds: float, ready: Any, go: Any,
               out: Any) -> None:
    import msight_fast as mf
    shape, dtype = SHAPES[name]
    bus = mf.connect("shm", dir=d, slots=16)
    src = np.ones(shape, dtype)
    # the segment is made (and its pages reserved) at a topic's first frame: not in the measured window
    a = bus.loan(topic, shape, dtype)
    del a
    ready.set()
    go.wait()
    period = 1.0 / hz if hz else 0.0
    n, t0, c0 = 0, time.monotonic(), _cpu()
    nxt = t0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if period:
            if now < nxt:
                time.sleep(nxt - now)
            nxt += period
        if mode == "loan":
            a = bus.loan(topic, shape, dtype)
            a.view(np.uint8).reshape(-1)[0] = n & 0xFF
            bus.publish(topic, a, encoding="raw")
        else:
            bus.publish(topic, src, encoding="raw")
        n += 1
    out[0], out[1], out[2] = n, time.monotonic() - t0, _cpu() - c0
    out[3] = bus.stats().get("dropped", 0)
    bus.close()


def _subscriber(d: str, topic: str, seconds: float, ready: Any, out: Any) -> None:
    import msight_fast as mf
    bus = mf.connect("shm", dir=d)
    sub = bus.subscribe(topic)
    ready.set()
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sub.recv(timeout=0.2) is not None:
            n += 1
    out[0] = n
    bus.close()


def run(name: str, mode: str, hz: float, seconds: float, procs: int = 0, local: bool = True) -> Dict[str, Any]:
    """One measurement: a publisher process; a subscriber here (``local``) and ``procs`` more processes."""
    import msight_fast as mf
    ctx = mp.get_context("spawn")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="msf-bench-")
    topic = f"bench_{name}"
    bus = mf.connect("shm", dir=d)
    sub = bus.subscribe(topic) if local else None
    others = []
    for _ in range(procs):
        r, o = ctx.Event(), ctx.Array("d", 1)
        p = ctx.Process(target=_subscriber, args=(d, topic, seconds + 10, r, o), daemon=True)
        p.start()
        r.wait(60)
        others.append((p, o))
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Array("d", 4)
    p = ctx.Process(target=_publisher, args=(d, topic, name, mode, hz, seconds, ready, go, out), daemon=True)
    p.start()
    ready.wait(60)
    lat: List[int] = []
    t: List[float] = []
    c0 = _cpu()
    go.set()
    end = time.monotonic() + seconds + 5
    if sub is not None:
        while p.is_alive() and time.monotonic() < end:
            f = sub.recv(timeout=0.2)
            if f is not None:
                lat.append(time.time_ns() - f.publish_ts_ns)
                t.append(time.monotonic())
        while True:                        # what is still in the ring
            f = sub.recv(timeout=0.3)
            if f is None:
                break
            lat.append(time.time_ns() - f.publish_ts_ns)
            t.append(time.monotonic())
    p.join(30)
    sub_cpu = _cpu() - c0
    st = sub.stats() if sub is not None else {}
    for q, _ in others:
        q.join(seconds + 30)
    bus.close()
    os.rmdir(d) if not os.listdir(d) else None
    published = int(out[0])
    n = len(t)
    arr = np.array(lat, dtype=np.float64) / 1e3 if lat else np.array([np.nan])
    span = t[-1] - t[0] if n > 1 else 0.0
    return {"payload": name, "mode": mode, "hz": hz, "subscribers": procs + local, "published": published,
            "received": n, "gaps": st.get("gaps"), "sub_dropped": st.get("dropped"), "pub_dropped": int(out[3]),
            "fps": (n - 1) / span if span else 0.0, "pub_fps": published / out[1] if out[1] else 0.0,
            "p50_us": float(np.percentile(arr, 50)), "p99_us": float(np.percentile(arr, 99)),
            "pub_cpu_us_per_frame": out[2] / published * 1e6 if published else float("nan"),
            "sub_cpu_us_per_frame": sub_cpu / n * 1e6 if n else float("nan"),
            "others_received": [int(o[0]) for _, o in others]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3, help="repeats of each measurement (median and spread)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [("1080p", "loan", 200.0, 0), ("1080p", "copy", 200.0, 0),
            ("1080p", "loan", 0.0, 0), ("1080p", "copy", 0.0, 0),
            ("4k", "loan", 200.0, 0), ("4k", "loan", 0.0, 0),
            ("lidar262k", "loan", 200.0, 0), ("lidar262k", "loan", 0.0, 0),
            ("1k", "copy", 0.0, 0),
            ("1080p", "loan", 30.0, 0), ("1080p", "loan", 30.0, 4)]   # fan-out: no subscriber, then 4
    rows = []
    for k, (name, mode, hz, subs) in enumerate(plan):
        fan = k >= len(plan) - 2
        shape, dtype = SHAPES[name]
        runs = []
        for _ in range(a.runs):
            mc = memcpy_s(shape, dtype)
            r = run(name, mode, hz, a.seconds, procs=subs, local=not fan)
            r["memcpy_us"] = mc * 1e6
            r["memcpy_GBps"] = np.prod(shape) * np.dtype(dtype).itemsize / mc / 1e9
            runs.append(r)
            print(f"{name:9s} {mode:4s} hz={hz:5g} subs={r['subscribers']} fps={r['fps']:9.0f} "
                  f"p50={r['p50_us']:8.1f}us p99={r['p99_us']:8.1f}us pubcpu={r['pub_cpu_us_per_frame']:7.1f}us "
                  f"memcpy={mc * 1e6:7.1f}us gaps={r['gaps']} dropped={r['sub_dropped']}/{r['pub_dropped']}",
                  flush=True)
        rows.append({"payload": name, "mode": mode, "hz": hz, "subscribers": runs[0]["subscribers"], "runs": runs})
    (out / "shm.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))
    md = table(rows)
    (out / "shm.md").write_text(md + "\n")
    print(md)
    return 0


def table(rows: List[Dict[str, Any]]) -> str:
    def med(rs: List[Dict[str, Any]], k: str) -> float:
        return float(statistics.median(r[k] for r in rs))

    def spread(rs: List[Dict[str, Any]], k: str) -> str:
        v = [r[k] for r in rs]
        return f"{min(v):,.0f}–{max(v):,.0f}"
    lines = ["| payload | publish | rate | subs | delivered fps (runs) | p50 µs (runs) | p99 µs | "
             "memcpy µs | p50 / memcpy | MB/s / memcpy | pub CPU µs/frame | lost |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rs = row["runs"]
        nbytes = int(np.prod(SHAPES[row["payload"]][0]) * np.dtype(SHAPES[row["payload"]][1]).itemsize)
        fps, p50, mc = med(rs, "fps"), med(rs, "p50_us"), med(rs, "memcpy_us")
        bw_ratio = fps * nbytes / (nbytes / (mc / 1e6)) if mc else float("nan")
        if rs[0]["others_received"]:       # fan-out: what the slowest of the subscriber processes got
            lost = sum(r["published"] - min(r["others_received"]) for r in rs)
        else:
            lost = sum(r["published"] - r["received"] for r in rs) if rs[0]["received"] else "-"
        rate = "max" if not row["hz"] else f"{row['hz']:g} Hz"
        lines.append(f"| {row['payload']} | {row['mode']} | {rate} | {row['subscribers']} | "
                     f"{fps:,.0f} ({spread(rs, 'fps')}) | {p50:,.1f} ({spread(rs, 'p50_us')}) | "
                     f"{med(rs, 'p99_us'):,.1f} | {mc:,.1f} | {p50 / mc:.2f} | {bw_ratio:.2f} | "
                     f"{med(rs, 'pub_cpu_us_per_frame'):,.1f} | {lost} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
