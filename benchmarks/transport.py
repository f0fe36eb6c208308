"""Transport benchmark: every backend x payload, msight_fast against the raw client, plus the
loopback TCP ceiling, all in one run. Writes benchmarks/results/transport.{json,md,png}.

    python benchmarks/transport.py [--seconds 4] [--backends redis,nats,kafka,shm] \
        [--payloads 1080p,4k,jpeg,lidar,lidar262k,1k]

With ``--sustained S`` it publishes a sensor profile (``--profile``) at its rates for S seconds
instead: ``roadside`` (the default) writes results/sustained.{md,json}, ``intersection``
results/sustained_intersection.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from msight_style import core_publisher, core_subscriber

from msight_fast.bench import (
    PAYLOAD_NAMES,
    PROFILE_TEXT,
    PROFILES,
    profile_broker_args,
    run_profile,
    run_sustained,
    run_transport,
    tcp_ceiling,
)

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
    backends = [b for b in ("redis", "nats", "kafka", "shm") if any(r["backend"] == b for r in results)]
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


# ---------------------------------------------------------------- sustained profiles
def _n(v) -> str:
    return "-" if v is None else f"{v:,}"


def _ms(v) -> str:
    return "-" if v is None or v != v else f"{v:.1f}"


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def profile_table(profile: str, seconds: float, results) -> str:
    """The markdown of a sustained profile run: what was run, then per backend a row per topic and a total."""
    notes = next((r["payloads"] for r in results if r.get("payloads")), {})
    offered = next((r["total"]["offered_MBps"] for r in results if r.get("total")), None)
    args = [f"{r['backend']}: `{' '.join(r['broker_args'])}`" for r in results if r.get("broker_args")]
    lines = [f"Sustained {profile} load for {seconds:g} s: {PROFILE_TEXT[profile]}.", "",
             "Payloads: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) + ".",
             f"Offered: {offered:,.0f} MB/s." if offered is not None else None,
             "Embedded brokers run with their defaults" + (", except " + "; ".join(args) if args else "") + ".", "",
             "expected = rate x seconds; late = sent, but handed to the Bus after its next frame was due; "
             "skipped = its slot was over before its thread could send it (a sensor that falls behind sends its "
             "newest frame, it does not catch up in a burst); errors = publishes refused (broker away); "
             "lost = sent but not received; delivered = received / expected; latency = publish to receipt; "
             "start lag = how late each publish began against its deadline; publish max = the longest "
             "publish call.", "",
             "| backend | topic | rate Hz | expected | sent | late | skipped | errors | received | lost | gaps "
             "| delivered | MB/s | p50 ms | p99 ms | start lag p99 ms | publish max ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cpu = []
    for r in results:
        b = r["backend"]
        if r.get("error"):
            lines.append(f"| {b} | failed: {r['error']} |" + " |" * 15)
            continue
        for t in r["topics"]:
            lines.append(f"| {b} | {t['topic']} ({t['payload']}) | {t['hz']:g} | {_n(t['expected'])} | "
                         f"{_n(t['sent'])} | {_n(t['late'])} | {_n(t['skipped'])} | {_n(t['errors'])} | "
                         f"{_n(t['received'])} | {_n(t['lost'])} | {_n(t['gaps'])} | {_pct(t['delivered'])} | "
                         f"{t['MBps']:,.1f} | {_ms(t['p50_ms'])} | {_ms(t['p99_ms'])} | {_ms(t['lag_p99_ms'])} | "
                         f"{_ms(t.get('publish_max_ms'))} |")
        tt = r["total"]
        lines.append(f"| **{b}** | **total** | | {_n(tt['expected'])} | {_n(tt['sent'])} | {_n(tt['late'])} | "
                     f"{_n(tt['skipped'])} | {_n(tt['errors'])} | {_n(tt['received'])} | {_n(tt['lost'])} | "
                     f"{_n(tt['gaps'])} | **{_pct(tt['delivered'])}** | {tt['MBps']:,.1f} | {_ms(tt['p50_ms'])} | "
                     f"{_ms(tt['p99_ms'])} | | |")
        c = r["cpu_s"]
        cpu.append(f"{b} " + " / ".join("-" if c[k] is None else f"{c[k]:.1f}"
                                        for k in ("publisher", "subscriber", "broker")))
        for what in ("publisher_failed", "flush_error"):
            if r.get(what):
                cpu.append(f"{b} {what.replace('_', ' ')}: {r[what]}")
        cpu += [f"{b} {t['topic']} publisher thread failed: {t['failed']}" for t in r["topics"] if t.get("failed")]
    if cpu:
        lines += ["", "CPU seconds over the run, publisher process / subscriber process / broker: "
                  + "; ".join(cpu) + "."]
    return "\n".join(x for x in lines if x is not None)


def plot_profile(profile: str, seconds: float, results, path: Path) -> None:
    """Per backend: the fraction of expected frames sent and delivered per topic, and p50/p99 latency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), sharey="row", squeeze=False)
    for k, r in enumerate(results):
        top, bottom = axes[0][k], axes[1][k]
        top.set_title(r["backend"])
        if r.get("error"):
            top.text(0.5, 0.5, "failed", ha="center", va="center", transform=top.transAxes)
            bottom.set_axis_off()
            continue
        rows = r["topics"]
        xs = list(range(len(rows)))
        names = [t["topic"] for t in rows]
        sent = [t["sent"] / t["expected"] if t["expected"] else 0 for t in rows]
        got = [t["delivered"] for t in rows]
        top.bar(xs, sent, 0.8, color="tab:gray", alpha=0.4, label="sent / expected")
        top.bar(xs, got, 0.5, color="tab:blue", label="delivered / expected")
        top.axhline(1.0, color="black", lw=0.8)
        top.set_ylim(0, 1.1)
        top.set_ylabel("fraction of expected frames")
        top.set_title(f"{r['backend']}: {100 * r['total']['delivered']:.1f}% delivered, "
                      f"{r['total']['MBps']:,.0f} MB/s")
        top.set_xticks(xs)
        top.set_xticklabels(names, rotation=30, fontsize=8)
        p50 = [t["p50_ms"] for t in rows]
        p99 = [t["p99_ms"] for t in rows]
        bottom.bar([x - 0.2 for x in xs], p50, 0.4, color="tab:blue", label="p50")
        bottom.bar([x + 0.2 for x in xs], p99, 0.4, color="tab:orange", label="p99")
        bottom.set_yscale("log")
        bottom.set_ylabel("publish to receipt, ms (log)")
        bottom.set_xticks(xs)
        bottom.set_xticklabels(names, rotation=30, fontsize=8)
    axes[0][0].legend(fontsize=8, loc="lower left")
    if not results[0].get("error"):
        axes[1][0].legend(fontsize=8)
    fig.suptitle(f"Sustained {profile} load, {seconds:g} s\n(a thread per sensor on one Bus -> broker -> "
                 "one subscriber process)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sustained_profile(profile: str, seconds: float, backends, out: Path, nats_max_payload: int = 0) -> int:
    """Run ``profile`` on each backend; write results/sustained_<profile>.{md,json,png}."""
    results = []
    for b in backends:
        t0 = time.monotonic()
        try:
            r = run_profile(b, seconds, profile, nats_max_payload=nats_max_payload)
        except Exception as e:  # noqa: BLE001 - one backend failing does not discard the others
            r = {"backend": b, "profile": profile, "seconds": seconds,
                 "broker_args": profile_broker_args(profile, b), "error": repr(e)}
        results.append(r)
        tot = r.get("total") or {}
        print(f"{b:6s} delivered {_pct(tot.get('delivered'))} ({_n(tot.get('received'))} of "
              f"{_n(tot.get('expected'))}) sent {_n(tot.get('sent'))} late {_n(tot.get('late'))} "
              f"skipped {_n(tot.get('skipped'))} lost {_n(tot.get('lost'))} p99 {_ms(tot.get('p99_ms'))} ms "
              f"({time.monotonic() - t0:.0f}s) {r.get('error', '')}", flush=True)
    stem = f"sustained_{profile}"
    (out / f"{stem}.json").write_text(json.dumps({"profile": profile, "seconds": seconds,
                                                  "date": time.strftime("%Y-%m-%d %H:%M"), "results": results},
                                                 indent=1))
    md = profile_table(profile, seconds, results)
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    try:
        plot_profile(profile, seconds, results, out / f"{stem}.png")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--backends", default="redis,nats,kafka")
    ap.add_argument("--payloads", default=",".join(PAYLOAD_NAMES))
    ap.add_argument("--paths", default=",".join(PATHS), help="msight = this library, raw = the bare client, "
                    "core = an MSight-Core-style pipeline (msgpack, thread per publish, Kafka flush per message)")
    ap.add_argument("--out", default=str(OUT), help="where the json, md and png go")
    ap.add_argument("--sustained", type=float, default=0,
                    help="instead: a sensor load (--profile) at its rates for this many seconds")
    ap.add_argument("--profile", default="roadside", choices=list(PROFILES),
                    help="with --sustained: roadside (1080p@30, JPEG@30, lidar@10 Hz from one thread) or "
                    "intersection (4 raw 1080p cameras@15, 262k-point lidar@10, JPEG@30, a thread per sensor)")
    ap.add_argument("--nats-max-payload", type=int, default=0,
                    help="with --sustained and a profile: start nats-server with this max_payload (default: the "
                    "server's 1 MB), so frames up to it go as one message instead of fragments")
    a = ap.parse_args()
    if a.nats_max_payload and not (a.sustained and a.profile != "roadside"):
        ap.error("--nats-max-payload applies to --sustained runs of a profile other than roadside")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.sustained and a.profile != "roadside":
        return sustained_profile(a.profile, a.sustained, a.backends.split(","), out, a.nats_max_payload)
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
                if b == "shm" and path != "msight":
                    continue                   # no broker, no raw client: shm is compared with the others
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
