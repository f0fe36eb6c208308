"""Record the sustained sensor load to an MCAP file, then read it back; optionally play it back.

    python benchmarks/record_load.py [--backend redis] [--seconds 30] [--out run.mcap] [--play]

The load is the sustained benchmark's (``msight_fast.bench.SENSOR_LOAD``: raw 1080p at 30 fps,
JPEG at 30 fps, lidar at 10 Hz) from one publisher process on one Bus, to an embedded broker. A
``Recorder`` in this process writes it to local disk. Reported per topic: frames sent, recorded
and read back (bit-exact payload sizes), lost, gaps; the file's bytes and the MB/s written over the
recording. With ``--play`` the file is then played back at ``--rate`` into the same broker, with a
subscriber counting what arrives, and the Player's timing drift against the recorded timeline is
reported (p50, p99, max). Results go to ``benchmarks/results/record_load.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="redis", choices=["redis", "nats", "kafka"])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", default=None, help="the MCAP file (default: a temporary file, removed at the end)")
    ap.add_argument("--play", action="store_true", help="play the recording back and measure timing drift")
    ap.add_argument("--rate", type=float, default=1.0)
    args = ap.parse_args(argv)

    from msight_fast import bench, connect
    from msight_fast.record import Player, Recorder, read_mcap

    topics = [t for t, _, _ in bench.SENSOR_LOAD]
    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="msf-record-", dir=os.environ.get("MSIGHT_RECORD_DIR"))
        path = os.path.join(tmp, "load.mcap")
    else:
        path = args.out
    b = bench.start_broker(args.backend)
    result: Dict[str, Any] = {"backend": args.backend, "seconds": args.seconds, "path": path}
    try:
        opts = b.options()
        rec = Recorder(topics, path, backend=args.backend, **opts)
        rec.start()
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Array("q", len(topics))
        p = ctx.Process(target=bench._pub_sensors, args=(args.backend, opts, args.seconds, ready, go, out),
                        daemon=True)
        p.start()
        if not ready.wait(120):
            raise RuntimeError("the sensor publisher did not start")
        t0 = time.monotonic()
        go.set()
        p.join(args.seconds + 120)
        sent = {t: int(out[i]) for i, t in enumerate(topics)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = rec.stats()["topics"]
            if all(got.get(t, {}).get("received", 0) >= sent[t] for t in topics):
                break
            time.sleep(0.1)
        summary = rec.stop()
        wall = time.monotonic() - t0
        size = os.path.getsize(path)
        back: Dict[str, int] = {t: 0 for t in topics}
        back_bytes = 0
        t1 = time.monotonic()
        for f in read_mcap(path):
            t = _topic_of(f, topics)
            back[t] = back.get(t, 0) + 1
            back_bytes += f.nbytes
        read_s = time.monotonic() - t1
        rows = []
        for t in topics:
            st = summary["topics"][t]
            rows.append({"topic": t, "sent": sent[t], "recorded": st["received"], "read_back": back.get(t, 0),
                         "lost": sent[t] - st["received"], "gaps": st.get("gaps"), "bytes": st.get("bytes")})
        result.update(rows=rows, file_bytes=size, wall_s=wall, mb_per_s_written=size / 1e6 / wall,
                      read_back_s=read_s, read_back_mb_per_s=back_bytes / 1e6 / read_s if read_s else None)
        if args.play:
            result["play"] = _play(args, opts, path, topics, Player, connect)
    finally:
        b.stop()
        if tmp is not None:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
    _report(result)
    return 0


def _topic_of(frame: Any, topics: List[str]) -> str:
    """Which load topic a frame came from (the load publishes sensor_name = topic)."""
    return frame.sensor_name if frame.sensor_name in topics else ""


def _play(args: argparse.Namespace, opts: Dict[str, Any], path: str, topics: List[str], Player: Any,
          connect: Any) -> Dict[str, Any]:
    bus = connect(args.backend, **opts)
    subs = {t: bus.subscribe(t) for t in topics}
    counts = {t: 0 for t in topics}
    stop = threading.Event()

    def take(t: str) -> None:
        while not stop.is_set():
            if subs[t].recv(0.2) is not None:
                counts[t] += 1
    threads = [threading.Thread(target=take, args=(t,), daemon=True) for t in topics]
    for th in threads:
        th.start()
    player = Player(path, backend=args.backend, rate=args.rate, **opts)
    player.run()
    st = player.stats()
    # drift over the run, apart from each frame's jitter: the median lateness of the frames of the
    # first 5 s against that of the last 5 s (the Player keeps each frame's lateness, in order)
    late = list(player._drift)
    k = max(1, int(len(late) * 5 / max(1e-9, st["elapsed_s"])))
    st["drift_ms"]["first5s_p50"] = float(np.median(late[:k]))
    st["drift_ms"]["last5s_p50"] = float(np.median(late[-k:]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(counts.values()) < st["frames"]:
        time.sleep(0.1)
    stop.set()
    for th in threads:
        th.join(5)
    gaps = {t: subs[t].stats()["gaps"] for t in topics}
    bus.close()
    return {"stats": st, "received": counts, "gaps": gaps}


def _report(r: Dict[str, Any]) -> None:
    lines = [f"### Recording the sustained load on {r['backend']} for {r['seconds']:.0f} s",
             "", "| topic | sent | recorded | read back | lost | gaps | MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['topic']} | {row['sent']} | {row['recorded']} | {row['read_back']} | {row['lost']} | "
                     f"{row['gaps']} | {(row['bytes'] or 0) / 1e6:,.1f} |")
    lines += ["", f"File: {r['file_bytes'] / 1e6:,.1f} MB written in {r['wall_s']:.1f} s "
              f"({r['mb_per_s_written']:,.1f} MB/s); read back at {r['read_back_mb_per_s'] or 0:,.0f} MB/s."]
    if "play" in r:
        st = r["play"]["stats"]
        d = st["drift_ms"]
        lines += ["", f"Play at rate {st.get('rate', 1.0)}: {st['frames']} frames; lateness p50 "
                  f"{d['p50']:.2f} ms, p99 {d['p99']:.2f} ms, max {d['max']:.2f} ms; median lateness "
                  f"{d['first5s_p50']:.2f} ms in the first 5 s and {d['last5s_p50']:.2f} ms in the last 5 s; "
                  f"received {r['play']['received']}, gaps {r['play']['gaps']}"]
    text = "\n".join(lines)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "record_load.md").write_text(text + "\n")
    (out / "record_load.json").write_text(json.dumps(r, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
