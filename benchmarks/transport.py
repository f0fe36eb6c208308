"""Transport benchmark: every backend x payload, msight_fast against the raw client, plus the
loopback TCP ceiling, all in one run. Writes benchmarks/results/transport.{json,md,png}.

    python benchmarks/transport.py [--seconds 4] [--backends redis,nats,kafka] \
        [--payloads 1080p,4k,jpeg,lidar,lidar262k,1k]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from msight_style import core_publisher, core_subscriber

from msight_fast.bench import PAYLOAD_NAMES, run_sustained, run_transport, tcp_ceiling

PATHS = ("msight", "raw", "core")   # this library, the bare client, the MSight-Core-style pipeline

OUT = Path(__file__).resolve().parent / "results"


def table(results, ceiling) -> str:
    lines = [f"Loopback TCP ceiling (6 MB messages, sendall/recv_into): {ceiling['GBps']:.2f} GB/s "
             f"({ceiling['msgs_per_s']:.0f} msgs/s)", "",
             "| backend | payload | path | published | received | lost % | delivered fps | MB/s | p50 ms | p99 ms "
             "| vs raw (fps) | vs core (fps) | CPU µs/frame pub / sub / broker |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["backend"], r["payload"], r["path"]): r for r in results}

    def ratio(r, other):
        base = by.get((r["backend"], r["payload"], other))
        if r["path"] != "msight" or not base:
            return ""
        return f"{r['fps'] / base['fps']:.2f}x" if base["fps"] else "inf"
    def cpu(r):
        def per(key, n):
            v = r.get(key)
            return f"{v / n * 1e6:,.0f}" if v is not None and n else "-"
        return (f"{per('pub_cpu_s', r['published'])} / {per('sub_cpu_s', r['received'])} / "
                f"{per('broker_cpu_s', r['received'])}")
    for r in results:
        lines.append(f"| {r['backend']} | {r['payload']} | {r['path']} | {r['published']:,} | {r['received']:,} | "
                     f"{r['loss_pct']:.1f} | {r['fps']:,.1f} | {r['MBps']:,.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | "
                     f"{ratio(r, 'raw')} | {ratio(r, 'core')} | {cpu(r)} |")
    return "\n".join(lines)


def plot(results, ceiling, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    payloads = [p for p in PAYLOAD_NAMES if any(r["payload"] == p for r in results)]
    backends = [b for b in ("redis", "nats", "kafka") if any(r["backend"] == b for r in results)]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], backends):
        xs = range(len(payloads))
        styles = (("msight", "tab:blue", "msight_fast"), ("raw", "tab:gray", "raw client"),
                  ("core", "tab:orange", "MSight-Core-style"))
        for k, (pth, color, label) in enumerate(styles):
            vals = [next((r["MBps"] for r in results
                          if r["backend"] == b and r["payload"] == p and r["path"] == pth), 0)
                    for p in payloads]
            ax.bar([x + 0.27 * k for x in xs], vals, 0.27, label=label, color=color)
        ax.axhline(ceiling["GBps"] * 1000, color="tab:red", ls="--", lw=1, label="loopback TCP ceiling")
        ax.set_title(b)
        ax.set_xticks([x + 0.27 for x in xs])
        ax.set_xticklabels(payloads, rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("delivered MB/s (log)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Delivered throughput, 1 publisher process -> broker -> 1 subscriber, 2-core box")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--backends", default="redis,nats,kafka")
    ap.add_argument("--payloads", default=",".join(PAYLOAD_NAMES))
    ap.add_argument("--paths", default=",".join(PATHS), help="msight = this library, raw = the bare client, "
                    "core = an MSight-Core-style pipeline (msgpack, thread per publish, Kafka flush per message)")
    ap.add_argument("--out", default=str(OUT), help="where the json, md and png go")
    ap.add_argument("--sustained", type=float, default=0,
                    help="instead: the sensor load (1080p@30, JPEG@30, lidar@10 Hz) for this many seconds")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.sustained:
        rows = [r for b in a.backends.split(",") for r in run_sustained(b, a.sustained)]
        lines = [f"Sustained sensor load on one bus for {a.sustained:g} s", "",
                 "| backend | topic | rate Hz | sent | received | lost | gaps | p50 ms | p99 ms |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['backend']} | {r['topic']} ({r['payload']}) | {r['hz']:g} | {r['sent']} | {r['received']} | "
                  f"{r['lost']} | {r['gaps']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in rows]
        (out / "sustained.md").write_text("\n".join(lines) + "\n")
        (out / "sustained.json").write_text(json.dumps(rows, indent=1))
        print("\n".join(lines))
        return 0
    ceiling = tcp_ceiling(a.seconds)
    print(f"tcp ceiling {ceiling['GBps']:.2f} GB/s", flush=True)
    results = []
    for b in a.backends.split(","):
        for p in a.payloads.split(","):
            for path in a.paths.split(","):
                t0 = time.monotonic()
                core = {"publisher": core_publisher, "subscriber": core_subscriber} if path == "core" else {}
                try:
                    r = run_transport(b, p, a.seconds, path, **core)
                except Exception as e:  # noqa: BLE001 - a failed reference is reported, not fatal
                    r = {"backend": b, "payload": p, "path": path, "published": 0, "received": 0, "lost": 0,
                         "loss_pct": float("nan"), "fps": 0.0, "MBps": 0.0, "p50_ms": float("nan"),
                         "p99_ms": float("nan"), "error": repr(e)}
                results.append(r)
                print(f"{b:6s} {p:9s} {path:6s} fps={r['fps']:9.1f} MB/s={r['MBps']:8.1f} lost={r['lost']:6d} "
                      f"p50={r['p50_ms']:8.2f} p99={r['p99_ms']:8.2f} dropped={r.get('sub_dropped')} "
                      f"gaps={r.get('sub_gaps')} "
                      f"({time.monotonic() - t0:.0f}s) {r.get('error', '')}",
                      flush=True)
    (out / "transport.json").write_text(json.dumps({"ceiling": ceiling, "results": results,
                                                    "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    md = table(results, ceiling)
    (out / "transport.md").write_text(md + "\n")
    print(md)
    try:
        plot(results, ceiling, out / "transport.png")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
