"""The ``msight-fast`` command: demo, local brokers, hz/bw/lat/echo/pub/bench tools, record/play.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .errors import BackendUnavailable, MsightFastError

if TYPE_CHECKING:
    from .bus import Bus, Subscription
    from .codec import Frame

DEMO_TOPICS = ("demo/camera/raw", "demo/camera/jpeg", "demo/lidar")


def _err(msg: str) -> int:
    from .config import scrub
    print(f"msight-fast: error: {scrub(msg)}", file=sys.stderr)
    return 1


def _connect(args: argparse.Namespace, **extra: Any) -> Bus:
    from . import connect
    opts = dict(extra)
    if getattr(args, "timeout", None):
        opts["connect_timeout_s"] = args.timeout
    return connect(args.backend, **opts)


# ---------------------------------------------------------------- sources of frames
def _load_images(data: Optional[Path]) -> Tuple[List[np.ndarray], List[bytes]]:
    """(raw frames, jpeg bytes) for the demo: the Mcity sequence, or synthetic moving frames."""
    jpegs: List[bytes] = []
    raws: List[np.ndarray] = []
    try:
        from PIL import Image
        have_pil = True
    except ImportError:
        have_pil = False
    if data is not None:
        from .sample import camera_files
        jpegs = [f.read_bytes() for f in camera_files(data)]
        if have_pil:
            import io
            for j in jpegs:
                rgb = np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))
                raws.append(np.ascontiguousarray(rgb[..., ::-1]))    # bgr8, as a camera node sends
    if not raws:
        h, w = 960, 1280
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 255 // (w + h))], -1).astype(np.uint8)
        raws = [np.ascontiguousarray(np.roll(base, 40 * i, axis=1)) for i in range(10)]
    if not jpegs and have_pil:
        import io
        for r in raws[:10]:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(r[..., ::-1])).save(buf, format="JPEG", quality=85)
            jpegs.append(buf.getvalue())
    return raws, jpegs


def _load_sweep(data: Optional[Path]) -> np.ndarray:
    from .pcd import read_pcd, synthetic_sweep
    from .sample import pcd_file
    p = pcd_file(data) if data is not None else None
    return read_pcd(p) if p is not None else synthetic_sweep(38_690, seed=3)


def _publisher(role: str, backend: str, env: Dict[str, str], data: Optional[str], rate: float,
               stop: Any, sent: Any) -> None:
    """Runs in its own process: the camera or the lidar node."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import connect
    bus = connect(backend)
    d = Path(data) if data else None
    period = 1.0 / rate
    try:
        if role == "camera":
            raws, jpegs = _load_images(d)
            i = 0
            nxt = time.monotonic()
            while not stop.is_set():
                bus.publish(DEMO_TOPICS[0], raws[i % len(raws)], sensor_name="mcity_camera", encoding="bgr8")
                sent[0] += 1
                if jpegs:
                    bus.publish(DEMO_TOPICS[1], jpegs[i % len(jpegs)], sensor_name="mcity_camera", encoding="jpeg")
                    sent[1] += 1
                i += 1
                nxt += period
                stop.wait(max(0.0, nxt - time.monotonic()))
        else:
            sweep = _load_sweep(d)
            nxt = time.monotonic()
            while not stop.is_set():
                bus.publish(DEMO_TOPICS[2], sweep, sensor_name="mcity_lidar", encoding="pointcloud")
                sent[2] += 1
                nxt += period
                stop.wait(max(0.0, nxt - time.monotonic()))
        bus.flush(30)
    finally:
        bus.close()


class _Tap:
    """Receives one topic in a thread and keeps its numbers."""

    def __init__(self, bus: Bus, topic: str, group_id: Optional[str] = None) -> None:
        self.topic = topic
        self.sub = bus.subscribe(topic, group_id=group_id)
        self.times: List[float] = []
        self.sizes: List[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            f = self.sub.recv(timeout=0.2)
            if f is not None:
                self.times.append(time.monotonic())
                self.sizes.append(f.nbytes)

    def window(self, seconds: float) -> Tuple[float, float]:
        now = time.monotonic()
        n = 0
        b = 0
        for t, s in zip(reversed(self.times), reversed(self.sizes)):
            if now - t > seconds:
                break
            n += 1
            b += s
        return n / seconds, b / seconds / 1e6


def _fmt_ms(ns: Optional[int]) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f}"


def _table(rows: List[List[Any]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r: List[Any]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def cmd_demo(args: argparse.Namespace) -> int:
    from . import brokers, registry
    backend = registry.backend_name(args.backend)
    spec = registry.get(backend)
    if not spec.crosses_processes:
        ok = ", ".join(n for n in registry.names() if registry.get(n).crosses_processes)
        return _err(f"the demo runs its sensors in separate processes; the {backend} backend does not cross "
                    f"processes (use one of {ok})")
    # the data is checked before a broker is started, so a bad --data leaves none running
    from . import sample
    data = args.data
    if data and not sample.camera_files(Path(data)):
        return _err(f"--data {data}: no camera_seq/*.jpg or .jpg files there")
    if data:
        source = f"frames from {data}"
    elif sample.camera_files(sample.DIR):
        data, source = str(sample.DIR), "the Mcity sample packaged in msight_fast/sample/"
    else:
        source = "synthetic frames"
    env: Dict[str, str] = {}
    local = None
    if not spec.broker:                        # shm: no broker, the processes meet in shared memory
        where = "shared memory (no broker)"
    else:
        try:
            probe = _connect(argparse.Namespace(backend=backend, timeout=2.0))
            probe.close()
            where = "the configured broker"
        except BackendUnavailable:
            local = brokers.start(backend)
            env = local.env()
            where = f"an embedded {backend} broker at {local.address} (stopped at the end)"
    os.environ.update(env)
    print(f"msight-fast demo: {backend} via {where}; {args.seconds:g} s; {source}", flush=True)
    from . import connect
    bus = connect(backend)
    taps: List[_Tap] = []
    threads = [threading.Thread(target=lambda t=t: taps.append(_Tap(bus, t))) for t in DEMO_TOPICS]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    taps.sort(key=lambda t: DEMO_TOPICS.index(t.topic))
    for t in taps:
        t.thread.start()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    sent = ctx.Array("q", 3)
    procs = [ctx.Process(target=_publisher, args=(role, backend, env, data, args.rate, stop, sent), daemon=True)
             for role in ("camera", "lidar")]
    for p in procs:
        p.start()
    tty = sys.stdout.isatty()
    t_end = time.monotonic() + args.seconds
    shown = 0
    try:
        while time.monotonic() < t_end:
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))   # display refresh period
            rows = []
            for t in taps:
                st = t.sub.stats()
                fps, mbs = t.window(2.0)
                rows.append([t.topic, st["received"], f"{fps:.1f}", f"{mbs:.1f}", _fmt_ms(st["latency_p50_ns"]),
                             _fmt_ms(st["latency_p99_ns"]), st["gaps"]])
            text = _table(rows, ["topic", "frames", "fps", "MB/s", "p50 ms", "p99 ms", "gaps"])
            if tty and shown:
                sys.stdout.write(f"\x1b[{shown}A\x1b[J")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            shown = text.count("\n") + 1
    except KeyboardInterrupt:
        pass
    stop.set()
    for p in procs:
        p.join(30)
    # let what is in flight arrive before the summary
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(t.sub.stats()["received"] < sent[i] for i, t in enumerate(taps)):
        time.sleep(0.05)
    for t in taps:
        t.stop.set()
        t.thread.join(2)
    rows = []
    total_gaps = lost = received = 0
    for i, t in enumerate(taps):
        st = t.sub.stats()
        dur = (t.times[-1] - t.times[0]) if len(t.times) > 1 else 0.0
        fps = (len(t.times) - 1) / dur if dur else 0.0
        mbs = sum(t.sizes[1:]) / dur / 1e6 if dur else 0.0
        rows.append([t.topic, sent[i], st["received"], sent[i] - st["received"], st["gaps"], f"{fps:.1f}",
                     f"{mbs:.1f}", _fmt_ms(st["latency_p50_ns"]), _fmt_ms(st["latency_p99_ns"])])
        total_gaps += st["gaps"] or 0        # None only for a group member; the demo has none
        lost += max(0, sent[i] - st["received"])
        received += st["received"]
    print("\nsummary")
    print(_table(rows, ["topic", "sent", "received", "lost", "gaps", "fps", "MB/s", "p50 ms", "p99 ms"]))
    bus.close()
    if local is not None:
        local.stop()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        return _err(f"a publisher process failed (exit code {bad[0]})")
    if not received:
        return _err("no frames were received")
    return 0


# ---------------------------------------------------------------- topic tools
def _frames(args: argparse.Namespace) -> Iterator[Tuple[float, Frame, Subscription]]:
    bus = _connect(args)
    sub = bus.subscribe(args.topic, group_id=args.group_id)
    end = None if not args.seconds else time.monotonic() + args.seconds
    try:
        while end is None or time.monotonic() < end:
            f = sub.recv(timeout=0.2 if end is None else max(0.01, min(0.2, end - time.monotonic())))
            if f is not None:
                yield time.monotonic(), f, sub
    finally:
        bus.close()


def cmd_echo(args: argparse.Namespace) -> int:
    n = 0
    for _, f, _ in _frames(args):
        a = f.array
        if a is None:
            shape = "bytes"
        else:
            dtype = a.dtype.str if a.dtype.names is None else "struct" + str(list(a.dtype.names))
            shape = f"shape={list(a.shape)} dtype={dtype}"
        print(f"sensor={f.sensor_name} device={f.device_name or '-'} encoding={f.encoding} {shape} size={f.nbytes} "
              f"seq={f.seq} frame_id={f.frame_id} capture_ts_ns={f.capture_ts_ns} publish_ts_ns={f.publish_ts_ns}"
              + (f" meta={json.dumps(f.meta)}" if f.meta else ""), flush=True)
        n += 1
        if args.count and n >= args.count:
            break
    return 0


_Report = Callable[[List[float], List[int], "Subscription"], str]


def _periodic(args: argparse.Namespace, report: _Report) -> int:
    times: List[float] = []
    sizes: List[int] = []
    last = time.monotonic()
    got = False
    for t, f, sub in _frames(args):
        times.append(t)
        sizes.append(f.nbytes)
        del times[:-args.window], sizes[:-args.window]
        got = True
        if t - last >= 1.0:
            last = t
            print(report(times, sizes, sub), flush=True)
    if got:
        print(report(times, sizes, sub), flush=True)
        return 0
    return _err(f"no frames on {args.topic!r}")


def cmd_hz(args: argparse.Namespace) -> int:
    def report(times: List[float], sizes: List[int], sub: Subscription) -> str:
        if len(times) < 2:
            return "average rate: - (1 frame)"
        d = np.diff(times)
        return (f"average rate: {1 / d.mean():.3f} Hz  min: {d.min():.4f}s max: {d.max():.4f}s "
                f"std dev: {d.std():.5f}s window: {len(times)}")
    return _periodic(args, report)


def cmd_bw(args: argparse.Namespace) -> int:
    def report(times: List[float], sizes: List[int], sub: Subscription) -> str:
        if len(times) < 2:
            return f"bandwidth: - (1 frame of {sizes[-1]} B)"
        span = times[-1] - times[0]
        return (f"bandwidth: {sum(sizes[1:]) / span / 1e6:.2f} MB/s  mean size: {np.mean(sizes) / 1e6:.3f} MB "
                f"min: {min(sizes)} B max: {max(sizes)} B window: {len(times)}")
    return _periodic(args, report)


def cmd_lat(args: argparse.Namespace) -> int:
    def report(times: List[float], sizes: List[int], sub: Subscription) -> str:
        st = sub.stats()
        return (f"latency p50: {_fmt_ms(st['latency_p50_ns'])} ms  p99: {_fmt_ms(st['latency_p99_ns'])} ms  "
                f"max: {_fmt_ms(st['latency_max_ns'])} ms  received: {st['received']} gaps: {st['gaps']} "
                f"duplicates: {st['duplicates']} dropped: {st['dropped']}")
    return _periodic(args, report)


def cmd_pub(args: argparse.Namespace) -> int:
    from .pcd import read_pcd
    items: List[Tuple[Any, Optional[str]]] = []      # bytes or an ndarray, and its encoding
    for name in args.files:
        p = Path(name)
        if not p.is_file():
            return _err(f"{name}: no such file")
        ext = p.suffix.lower()
        if ext in (".jpg", ".jpeg", ".png"):
            items.append((p.read_bytes(), "jpeg" if ext != ".png" else "png"))
        elif ext == ".npy":
            items.append((np.load(p, allow_pickle=False), None))
        elif ext == ".pcd":
            items.append((read_pcd(p), "pointcloud"))
        else:
            return _err(f"{name}: unsupported file type (images, .npy, .pcd)")
    bus = _connect(args)
    n = 0
    period = 1.0 / args.rate
    nxt = time.monotonic()
    try:
        while True:
            for obj, encoding in items:
                bus.publish(args.topic, obj, sensor_name=args.sensor_name or args.topic, encoding=encoding)
                n += 1
                if args.count and n >= args.count:
                    bus.flush(30)
                    print(f"published {n} frames on {args.topic!r}")
                    return 0
                nxt += period
                time.sleep(max(0.0, nxt - time.monotonic()))    # pacing to --rate
            if not args.loop and not args.count:
                bus.flush(30)
                print(f"published {n} frames on {args.topic!r}")
                return 0
    finally:
        bus.close()


# ---------------------------------------------------------------- record / play
def _viz(command: str, *modules: str) -> Optional[str]:
    """The one-line error when the viz extra is missing, else None."""
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return f'{command} needs {name}, from the viz extra: pip install "msight_fast[viz]"'
    return None


class _Interrupts:
    """SIGTERM raises KeyboardInterrupt as SIGINT does (both end a recording cleanly), and
    ``quiet()`` ignores both while the file is finished: a second Ctrl-C must not cut that short."""

    def __enter__(self) -> _Interrupts:
        self._old: Optional[Tuple[Any, Any]] = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        try:
            signal.signal(signal.SIGTERM, self._raise)
        except ValueError:                     # not the main thread: no handlers to set
            self._old = None
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def quiet(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old[0])
            signal.signal(signal.SIGTERM, self._old[1])


def _size(text: str) -> int:
    """A byte count: digits with an optional K, M or G (powers of 1024)."""
    t = text.strip().upper()
    t = t[:-1] if t.endswith("B") else t
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return n


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return v


def _connect_options(args: argparse.Namespace) -> Dict[str, Any]:
    return {"connect_timeout_s": args.timeout} if getattr(args, "timeout", None) else {}


def cmd_view(args: argparse.Namespace) -> int:
    missing = _viz("view", "foxglove")
    if missing:
        return _err(missing)
    from .view import run
    return run(args)


def cmd_record(args: argparse.Namespace) -> int:
    missing = _viz("record", "mcap", "foxglove")
    if missing:
        return _err(missing)
    from .record import Recorder
    out = Path(args.output)
    if out.exists() and not args.force:
        return _err(f"{out} exists (give --force to overwrite it)")
    if not out.parent.is_dir():
        return _err(f"{out.parent}: no such directory")
    rec = Recorder(args.topics, out, backend=args.backend, duration=args.duration, max_bytes=args.max_bytes,
                   progress=True, compression=args.compression, **_connect_options(args))
    with _Interrupts() as intr:
        try:
            rec.start()
            print(f"recording {', '.join(args.topics)} to {out} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            while not rec.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            intr.quiet()
            summary = rec.stop()
    topics = summary["topics"]
    mb = summary["bytes"] / 1e6
    per = ", ".join(f"{t} {v['frames']} frames {v['gaps'] if v['gaps'] is not None else '-'} gaps"
                    + (f" {v['dropped']} dropped" if v["dropped"] else "") for t, v in topics.items())
    print(f"recorded {summary['frames']} frames, {mb:.1f} MB in {summary['duration_s']:.1f} s "
          f"({summary['mb_per_s']:.1f} MB/s) to {out}; {per}.", flush=True)
    return 0


def cmd_play(args: argparse.Namespace) -> int:
    missing = _viz("play", "mcap")
    if missing:
        return _err(missing)
    from .record import Player
    src = Path(args.file)
    if not src.is_file():
        return _err(f"{src}: no such file")
    player = Player(src, backend=args.backend, rate=args.rate, loop=args.loop, topics=args.topics,
                    progress=True, **_connect_options(args))
    with _Interrupts() as intr:
        try:
            player.start()
            while not player.join(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            intr.quiet()
            player.stop(30.0)
    st = player.stats()
    d = st["drift_ms"]

    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1f}"
    print(f"played {st['frames']} frames, {st['bytes'] / 1e6:.1f} MB in {st['elapsed_s']:.1f} s "
          f"({st['loops']} pass{'es' if st['loops'] != 1 else ''}); drift p50 {ms(d['p50'])} ms, "
          f"p99 {ms(d['p99'])} ms, max {ms(d['max'])} ms; {st['errors']} errors.", flush=True)
    if st["errors"]:
        return _err(f"{st['errors']} frames could not be published")
    return 0


# ---------------------------------------------------------------- bridge
def _key_value(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. port=6380)")
    return key, value


def _typed_options(backend: str, pairs: List[Tuple[str, str]], flag: str) -> Dict[str, Any]:
    """``--from-opt``/``--to-opt`` pairs as connect() keyword options, typed after the backend's
    config field: numbers and booleans parsed, dicts from a literal, ``none`` for an optional
    field; the rest (hosts, passwords, server lists) stays text, which the config parses as it
    parses the ``MSIGHT_*`` variables (so a password of digits stays a str)."""
    import ast
    import dataclasses
    import re

    from . import registry
    from .errors import ConfigError
    cls = registry.get(backend).config_cls
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    defaults = cls()
    out: Dict[str, Any] = {}
    for key, text in pairs:
        if key not in fields:
            out[key] = text                 # the config names it and lists the valid options
            continue
        default, t = getattr(defaults, key), text.strip()
        value: Any = text
        if t.lower() in ("none", "null") and "Optional" in fields[key]:
            value = None
        elif isinstance(default, bool):
            value = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}.get(t.lower(), text)
        elif isinstance(default, (int, float)) or fields[key] == "Optional[int]":
            if re.fullmatch(r"[+-]?\d+", t):
                value = int(t)
            elif re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", t):
                value = float(t)
        elif isinstance(default, dict):
            try:
                value = ast.literal_eval(t)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ConfigError(f"{flag} {key}={text!r} is not a dict literal "
                                  "(e.g. {'linger.ms': 10})") from None
        out[key] = value
    return out


def _bridge_setup(args: argparse.Namespace) -> Tuple[str, str, Dict[str, Any], Dict[str, Any]]:
    """The two backends and their connect() options; ConfigError for what cannot work."""
    from . import registry
    from .errors import ConfigError
    src, dst = registry.backend_name(args.src), registry.backend_name(args.dst)
    src_opts = _typed_options(src, args.from_opt, "--from-opt")
    dst_opts = _typed_options(dst, args.to_opt, "--to-opt")
    if args.timeout:
        src_opts.setdefault("connect_timeout_s", args.timeout)
        dst_opts.setdefault("connect_timeout_s", args.timeout)
    if src == dst:
        # the same broker would hand the bridge back every frame it forwards, to forward again
        if not args.allow_same:
            raise ConfigError(f"--from and --to are both {src}: on the same broker every frame forwarded "
                              "comes back to the bridge and is forwarded again, without end; give --allow-same "
                              "if --from-opt and --to-opt point at two different brokers")
        if registry.load_config(src, src_opts) == registry.load_config(dst, dst_opts):
            raise ConfigError(f"--allow-same: --from and --to connect to the same {src} broker with the same "
                              "options; use --from-opt/--to-opt to point them at two brokers")
    return src, dst, src_opts, dst_opts


def cmd_bridge(args: argparse.Namespace) -> int:
    from . import connect
    from .bridge import Bridge
    from .config import scrub
    from .errors import ConfigError
    try:
        src_name, dst_name, src_opts, dst_opts = _bridge_setup(args)
    except ConfigError as e:
        print(f"msight-fast: error: {scrub(str(e))}", file=sys.stderr)
        return 2
    buses: List[Bus] = []
    try:
        for flag, name, opts in (("--from", src_name, src_opts), ("--to", dst_name, dst_opts)):
            try:
                buses.append(connect(name, **opts))
            except MsightFastError as e:      # which side could not connect
                e.args = (f"{flag} {name}: {e}",) + tuple(e.args[1:])
                raise
        bridge = Bridge(args.topics, src=buses[0], dst=buses[1], group_id=args.group)
        return _run_bridge(bridge, args)
    except ConfigError as e:
        print(f"msight-fast: error: {scrub(str(e))}", file=sys.stderr)
        return 2
    finally:
        for b in buses:
            b.close()


def _run_bridge(bridge: Any, args: argparse.Namespace) -> int:
    """Forward until Ctrl-C, SIGTERM or --duration; a line per topic each second on a terminal."""
    t0 = time.monotonic()
    end = t0 + args.duration if args.duration else float("inf")
    with _Interrupts() as intr:
        try:
            bridge.start()
            print(f"bridging {', '.join(bridge.topics)} from {bridge.src.backend} to {bridge.dst.backend} "
                  "(Ctrl-C to stop)", file=sys.stderr, flush=True)
            tty = sys.stderr.isatty()
            last = {t: 0 for t in bridge.topics}
            shown = 0
            t_last = time.monotonic()
            while time.monotonic() < end:
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))    # display refresh period
                if not tty:
                    continue
                now = time.monotonic()
                lines = []
                for topic, st in bridge.stats().items():
                    rate = (st["forwarded"] - last[topic]) / max(1e-9, now - t_last)
                    last[topic] = st["forwarded"]
                    lines.append(f"{topic}: {rate:.1f} frames/s forwarded ({st['forwarded']} in all), "
                                 f"gaps {_dash(st['gaps'])}, dropped {_dash(st['dropped'])}, errors {st['failed']}")
                t_last = now
                if shown:
                    sys.stderr.write(f"\x1b[{shown}A\x1b[J")
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()
                shown = len(lines)
        except KeyboardInterrupt:
            pass
        finally:
            intr.quiet()
            stats = bridge.stop()
    per = "; ".join(f"{t} {s['forwarded']} forwarded, {s['failed']} failed, {_dash(s['gaps'])} gaps, "
                    f"{_dash(s['dropped'])} dropped" + (f", {s['undelivered']} undelivered" if s["undelivered"] else "")
                    for t, s in stats.items())
    print(f"bridged {bridge.src.backend} -> {bridge.dst.backend} for {time.monotonic() - t0:.1f} s: {per}.",
          flush=True)
    return 0


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


# ---------------------------------------------------------------- brokers
def _state_dir() -> Path:
    d = Path(os.environ.get("MSIGHT_FAST_STATE_DIR", Path.home() / ".cache" / "msight_fast" / "brokers"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def cmd_broker(args: argparse.Namespace) -> int:
    from . import brokers
    kinds = [args.kind] if args.kind else list(brokers.KINDS)
    if args.action == "start":
        if not args.kind:
            kinds = ["redis"]
        for k in kinds:
            state = _state_dir() / f"{k}.json"
            if state.exists():
                s = json.loads(state.read_text())
                if _alive(s["pid"]):
                    print(f"# {k} already running (pid {s['pid']})")
                    for var, val in s["env"].items():
                        print(f"export {var}=\"{val}\"")
                    continue
            b = brokers.start(k, args.port, detach=True)
            state.write_text(json.dumps({"pid": b.proc.pid, "port": b.port, "env": b.env(), "log": b.log_path}))
            print(f"# {k} broker started at {b.address} (pid {b.proc.pid}); stop it with: msight-fast broker stop {k}")
            for var, val in b.env().items():
                print(f"export {var}=\"{val}\"")
        return 0
    rc = 0
    for k in kinds:
        state = _state_dir() / f"{k}.json"
        if not state.exists():
            if args.kind:
                print(f"{k}: not running")
                rc = 1 if args.action == "stop" else rc
            continue
        s = json.loads(state.read_text())
        alive = _alive(s["pid"])
        if args.action == "status":
            print(f"{k}: {'running' if alive else 'dead'} pid {s['pid']} port {s['port']}")
        else:
            if alive:
                os.kill(s["pid"], signal.SIGTERM)
            state.unlink()
            print(f"{k}: stopped")
    return rc


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_quick
    print(run_quick(args.backend, args.payload, args.seconds))
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import registry
    backends, with_broker = list(registry.names()), list(registry.with_broker())
    p = argparse.ArgumentParser(prog="msight-fast",
                                description="Fast camera and lidar transport over Redis, NATS and Kafka.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('msight_fast').__version__}")
    sp = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser, topic: bool = True) -> None:
        q.add_argument("--backend", choices=backends, default=None,
                       help="default: $MSIGHT_PUBSUB_BACKEND or redis")
        q.add_argument("--timeout", type=float, default=None, help="broker connect timeout in seconds (default 5)")
        if topic:
            q.add_argument("topic")
            q.add_argument("--group-id", default=None, help="NATS queue group / Kafka consumer group")

    q = sp.add_parser("demo", help="camera and lidar frames flowing, with rates and latency on screen")
    common(q, topic=False)
    q.add_argument("--seconds", type=float, default=15.0)
    q.add_argument("--rate", type=float, default=10.0, help="frames per second per sensor (default 10)")
    q.add_argument("--data", default=None, help="a folder of camera_seq/*.jpg (or *.jpg) and a *.pcd sweep "
                   "(default: the Mcity sample packaged in msight_fast/sample/)")
    q.set_defaults(fn=cmd_demo)

    q = sp.add_parser("broker", help="start, stop or show a local broker from the bundled binaries")
    q.add_argument("action", choices=["start", "stop", "status"])
    q.add_argument("kind", nargs="?", choices=with_broker)
    q.add_argument("--port", type=int, default=None)
    q.set_defaults(fn=cmd_broker)

    q = sp.add_parser("pub", help="publish images, .npy arrays or .pcd sweeps at a rate")
    common(q)
    q.add_argument("files", nargs="+")
    q.add_argument("--rate", type=float, default=10.0)
    q.add_argument("--count", type=int, default=0, help="stop after N frames (cycling through the files)")
    q.add_argument("--loop", action="store_true", help="cycle through the files until interrupted")
    q.add_argument("--sensor-name", default=None)
    q.set_defaults(fn=cmd_pub)

    for name, fn, text in (("echo", cmd_echo, "print frame headers (never the payload)"),
                           ("hz", cmd_hz, "receive rate with min/max/std over a window"),
                           ("bw", cmd_bw, "bandwidth over a window"),
                           ("lat", cmd_lat, "latency percentiles, gaps and drops from the headers")):
        q = sp.add_parser(name, help=text)
        common(q)
        q.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
        if name == "echo":
            q.add_argument("--count", type=int, default=0, help="stop after N frames")
        else:
            q.add_argument("--window", type=int, default=100, help="frames in the window (default 100)")
        q.set_defaults(fn=fn)

    q = sp.add_parser("record", help="record topics to an MCAP file (Foxglove messages where they fit)")
    q.add_argument("topics", nargs="+", metavar="TOPIC")
    q.add_argument("-o", "--output", required=True, help="the .mcap file to write")
    q.add_argument("--duration", type=_positive, default=None, help="stop after this many seconds")
    q.add_argument("--max-bytes", type=_size, default=None,
                   help="stop once this much is written (bytes, or with a K, M or G suffix)")
    q.add_argument("--compression", choices=["none", "zstd", "lz4"], default="none",
                   help="MCAP chunk compression (default none: frames are mostly compressed already)")
    q.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    common(q, topic=False)
    q.set_defaults(fn=cmd_record)

    q = sp.add_parser("play", help="publish an MCAP recording's frames at their recorded timing")
    q.add_argument("file")
    q.add_argument("--rate", type=_positive, default=1.0, help="speed factor (default 1: as recorded)")
    q.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
    q.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="play these topics only")
    common(q, topic=False)
    q.set_defaults(fn=cmd_play)

    q = sp.add_parser("view", help="show topics live in Foxglove: a Foxglove WebSocket server bridging the bus")
    from .view import add_arguments as _view_arguments
    _view_arguments(q)
    common(q, topic=False)
    q.set_defaults(fn=cmd_view)

    q = sp.add_parser("bridge", help="forward topics from one backend to another (e.g. --from shm --to nats)",
                      description="Forward every frame of the topics from one backend to the same topics on "
                      "another; the destination gives each a new seq, publisher id and publish time.")
    q.add_argument("topics", nargs="+", metavar="TOPIC")
    q.add_argument("--from", dest="src", required=True, choices=backends, help="the backend to receive from")
    q.add_argument("--to", dest="dst", required=True, choices=backends, help="the backend to publish on")
    q.add_argument("--group", default=None, help="receive in this group on the source (NATS queue group / "
                   "Kafka consumer group), so several bridges share the frames")
    q.add_argument("--from-opt", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="a connect() option of the source (repeatable), e.g. port=6380 (default: the MSIGHT_* "
                   "variables)")
    q.add_argument("--to-opt", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="a connect() option of the destination (repeatable), e.g. servers=nats://host:4222")
    q.add_argument("--duration", type=_positive, default=None, help="stop after this many seconds")
    q.add_argument("--timeout", type=_positive, default=None, help="broker connect timeout in seconds (default 5)")
    q.add_argument("--allow-same", action="store_true",
                   help="allow --from and --to to be the same backend (two brokers of one kind): on one broker "
                   "the bridge would get back every frame it forwards")
    q.set_defaults(fn=cmd_bridge)

    q = sp.add_parser("bench", help="a quick transport measurement with the raw-client baseline in the same run")
    q.add_argument("--backend", choices=with_broker, default=None)
    q.add_argument("--payload", choices=["1080p", "4k", "jpeg", "lidar", "1k"], default="1080p")
    q.add_argument("--seconds", type=float, default=4.0)
    q.set_defaults(fn=cmd_bench)
    return p


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM ends a command as Ctrl-C does, through its finally blocks: buses close, so a shm
    # publisher removes its segment and a broker connection says goodbye
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        rc: int = args.fn(args)
        return rc
    except KeyboardInterrupt:
        return 130
    except (MsightFastError, OSError) as e:
        return _err(str(e))


if __name__ == "__main__":
    sys.exit(main())
