"""Transport measurement: one publisher process -> broker -> one subscriber (this process).

Used by ``msight-fast bench`` and by ``benchmarks/transport.py``. Every run starts its own broker
on a free loopback port (the raw NATS reference gets ``max_payload`` raised, for that reference
only) and measures, at the subscriber: delivered frames/s and MB/s between the first and the last
frame, frames lost, and publish-to-receipt latency percentiles.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import brokers

if TYPE_CHECKING:
    from .bus import Subscription

PAYLOAD_NAMES = ("1080p", "4k", "jpeg", "lidar", "lidar262k", "1k")


def make_payload(name: str) -> Tuple[Union[np.ndarray, bytes], str, int]:
    """(object to publish, encoding, size in bytes)."""
    from .pcd import read_pcd, synthetic_sweep
    from .sample import data_dir, image_file, pcd_file
    data = data_dir()
    rng = np.random.default_rng(0)
    obj: Union[np.ndarray, bytes]
    if name == "1080p":
        obj, enc = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8), "bgr8"
    elif name == "4k":
        obj, enc = rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8), "bgr8"
    elif name == "jpeg":
        p = image_file(data) if data is not None else None
        obj = p.read_bytes() if p is not None else rng.integers(0, 256, 364_261, dtype=np.uint8).tobytes()
        enc = "jpeg"
    elif name == "lidar":
        p = pcd_file(data) if data is not None else None
        obj, enc = (read_pcd(p) if p is not None else synthetic_sweep(38_690)), "pointcloud"
    elif name == "lidar262k":
        obj, enc = synthetic_sweep(262_144), "pointcloud"
    elif name == "1k":
        obj, enc = rng.integers(0, 256, 1024, dtype=np.uint8).tobytes(), "bytes"
    else:
        raise ValueError(f"unknown payload {name!r}; one of {', '.join(PAYLOAD_NAMES)}")
    size = obj.nbytes if isinstance(obj, np.ndarray) else len(obj)
    return obj, enc, size


def start_broker(backend: str, raw: bool = False, extra_args: Sequence[str] = ()) -> brokers.Broker:
    """A broker on a free loopback port; ``extra_args`` go on its command line."""
    extra = list(extra_args)
    if backend == "nats" and raw:
        # max_payload only, the one limit raised when the raw-client references were measured; the
        # slow-consumer bound (max_pending, 64 MB) stays the server's default for every path
        extra += nats_config_args(64 << 20)
    return brokers.start(backend, extra_args=extra)


def nats_config_args(max_payload: int) -> List[str]:
    """nats-server arguments for a config file that sets ``max_payload`` (it has no flag for it);
    the file goes when this process exits (a restarted broker reads it again)."""
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write(f"max_payload: {int(max_payload)}\n")
    conf.close()
    atexit.register(_unlink_quietly, conf.name)
    return ["-c", conf.name]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------- publishers (child processes)
def _pub_msight(backend: str, opts: Dict[str, Any], topic: str, payload: str, seconds: float, ready: Any, go: Any,
                out: Any) -> None:
    from . import connect
    obj, enc, _ = make_payload(payload)
    bus = connect(backend, **opts)
    ready.set()
    go.wait()
    n, t0, c0 = 0, time.monotonic(), _cpu_s()
    while time.monotonic() - t0 < seconds:
        bus.publish(topic, obj, encoding=enc)
        n += 1
    bus.flush(120)
    out[0], out[1], out[2] = n, time.monotonic() - t0, _cpu_s() - c0
    bus.close()


def _cpu_s() -> float:
    """CPU seconds of this whole process (every thread, librdkafka's included)."""
    t = os.times()
    return t.user + t.system


def _stamped(body: bytes) -> bytes:
    return struct.pack("<q", time.time_ns()) + body


def _pub_raw(backend: str, opts: Dict[str, Any], topic: str, payload: str, seconds: float, ready: Any, go: Any,
             out: Any) -> None:
    obj, _, size = make_payload(payload)
    body = (obj.tobytes() if isinstance(obj, np.ndarray) else obj)[8:]
    n = 0
    c0 = 0.0
    if backend == "redis":
        import redis
        r = redis.Redis(host="127.0.0.1", port=opts["port"])
        r.ping()
        ready.set()
        go.wait()
        t0, c0 = time.monotonic(), _cpu_s()
        while time.monotonic() - t0 < seconds:
            r.publish(topic, _stamped(body))
            n += 1
    elif backend == "nats":
        import asyncio

        import nats

        async def run() -> int:
            nc = await nats.connect(opts["servers"])
            ready.set()
            go.wait()
            k, start = 0, time.monotonic()
            while time.monotonic() - start < seconds:
                await nc.publish(topic, _stamped(body))
                k += 1
            await nc.flush(120)
            await nc.close()
            return k
        t0, c0 = time.monotonic(), _cpu_s()
        n = asyncio.run(run())
    else:
        n, t0, c0 = raw_kafka_publish(opts, topic, body, seconds, ready, go)
    out[0], out[1], out[2] = n, time.monotonic() - t0, _cpu_s() - c0


def raw_kafka_publish(opts: Dict[str, Any], topic: str, body: bytes, seconds: float, ready: Any,
                      go: Any) -> Tuple[int, float, float]:
    """The raw Kafka path's publisher: confluent-kafka ``produce`` + ``poll(0)`` of ``body``,
    stamped, for ``seconds`` after ``go``; (messages, start, CPU seconds at the start)."""
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": ",".join(opts["servers"]), "linger.ms": 5,
                  "message.max.bytes": 67108864, "queue.buffering.max.kbytes": 1048576})
    p.list_topics(timeout=30)
    ready.set()
    go.wait()
    n = 0
    t0, c0 = time.monotonic(), _cpu_s()
    while time.monotonic() - t0 < seconds:
        while True:
            try:
                p.produce(topic, _stamped(body))
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
        n += 1
    p.flush(120)
    return n, t0, c0


# ---------------------------------------------------------------- subscribers (this process)
class _Recorder:
    def __init__(self) -> None:
        self.t: List[float] = []
        self.lat: List[int] = []
        self.size = 0
        self.nbytes = 0                         # every frame's payload bytes
        self.stats: Mapping[str, Any] = {}      # the Subscription's, when the path has one

    def add(self, lat_ns: int, size: int) -> None:
        self.t.append(time.monotonic())
        self.lat.append(lat_ns)
        self.size = size
        self.nbytes += size


def _sub_msight(backend: str, opts: Dict[str, Any], topic: str, rec: _Recorder, stop: threading.Event,
                ready: threading.Event) -> None:
    from . import connect
    if backend == "kafka":                 # the raw consumer below waits 10 ms a fetch too: like for like
        opts = dict(opts, fetch_wait_max_ms=10)
    bus = connect(backend, **opts)
    sub = bus.subscribe(topic)
    ready.set()
    while not stop.is_set():
        f = sub.recv(0.2)
        if f is not None:
            rec.add(time.time_ns() - f.publish_ts_ns, f.nbytes)
    rec.stats = sub.stats()
    bus.close()


def redis_py_messages(port: int, topic: str, stop: threading.Event, ready: threading.Event) -> Iterator[bytes]:
    """The payloads redis-py's pub/sub reader (hiredis parser) gets on ``topic`` until ``stop``."""
    import redis
    ps = redis.Redis(host="127.0.0.1", port=port).pubsub()
    ps.subscribe(topic)
    ps.get_message(timeout=5)
    ready.set()
    try:
        while not stop.is_set():
            m = ps.get_message(timeout=0.2)
            if m and m["type"] == "message":
                yield m["data"]
    finally:
        ps.close()


def _sub_raw(backend: str, opts: Dict[str, Any], topic: str, rec: _Recorder, stop: threading.Event,
             ready: threading.Event) -> None:
    def ts(b: bytes) -> int:
        stamp: int = struct.unpack_from("<q", b)[0]
        return stamp
    if backend == "redis":
        for data in redis_py_messages(opts["port"], topic, stop, ready):
            rec.add(time.time_ns() - ts(data), len(data))
    elif backend == "nats":
        import asyncio

        import nats

        async def run() -> None:
            nc = await nats.connect(opts["servers"])
            sub = await nc.subscribe(topic, pending_bytes_limit=1 << 30, pending_msgs_limit=1_000_000)
            await nc.flush()
            ready.set()
            while not stop.is_set():
                try:
                    m = await sub.next_msg(timeout=0.2)
                except Exception:  # noqa: BLE001 - a timeout
                    continue
                rec.add(time.time_ns() - ts(m.data), len(m.data))
            await nc.close()
        asyncio.run(run())
    else:
        from confluent_kafka import Consumer
        c = Consumer({"bootstrap.servers": ",".join(opts["servers"]), "group.id": f"raw-{os.getpid()}-{time.time_ns()}",
                      "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                      "fetch.wait.max.ms": 10, "fetch.max.bytes": 67108864, "max.partition.fetch.bytes": 67108864,
                      "receive.message.max.bytes": 68157440})
        c.subscribe([topic], on_assign=lambda *_: ready.set())
        while not stop.is_set():
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                v = m.value()
                if v is not None:
                    rec.add(time.time_ns() - ts(v), len(v))
        c.close()


def run_transport(backend: str, payload: str, seconds: float = 4.0, path: str = "msight",
                  broker: Optional[brokers.Broker] = None, publisher: Optional[Callable[..., None]] = None,
                  subscriber: Optional[Callable[..., None]] = None) -> Dict[str, Any]:
    """One measurement; ``path`` is ``msight`` (this library), ``raw`` (the bare client) or any
    other name with its own ``publisher`` (run in a spawned process: a module-level function) and
    ``subscriber``, called like ``_pub_raw`` and ``_sub_raw``. Only ``msight`` gets the broker's
    default limits; the others get NATS ``max_payload`` raised."""
    own = broker is None
    if backend == "shm":                  # no broker: publisher and subscriber meet in shared memory
        if path != "msight":
            raise ValueError("shm has no raw client to compare with: only path='msight'")
        b: Optional[brokers.Broker] = None
        opts: Dict[str, Any] = {"dir": tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                                        prefix="msf-bench-")}
    else:
        b = broker or start_broker(backend, raw=(path != "msight"))
        opts = b.options()
    topic = f"bench_{payload}_{path}_{time.time_ns()}"
    if backend == "kafka" and b is not None:
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": b.address})      # kept alive until the call ends
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    rec = _Recorder()
    stop, ready = threading.Event(), threading.Event()
    target = subscriber or (_sub_msight if path == "msight" else _sub_raw)
    th = threading.Thread(target=target, args=(backend, opts, topic, rec, stop, ready), daemon=True)
    th.start()
    if not ready.wait(90):
        raise RuntimeError(f"{backend} subscriber not ready")
    ctx = mp.get_context("spawn")
    child_ready, go = ctx.Event(), ctx.Event()
    out = ctx.Array("d", 3)
    p = ctx.Process(target=publisher or (_pub_msight if path == "msight" else _pub_raw),
                    args=(backend, opts, topic, payload, seconds, child_ready, go, out), daemon=True)
    p.start()
    if not child_ready.wait(120):                 # the child has imported and connected
        raise RuntimeError(f"{backend} publisher did not start")
    # a broker passed in is measured too: whatever else it serves meanwhile is counted with it
    broker_cpu = _proc_cpu(b.proc.pid) if b is not None else None
    sub_cpu0 = _cpu_s()
    go.set()
    p.join(seconds + 180)
    published = int(out[0])
    deadline = time.monotonic() + 15
    last = -1
    while time.monotonic() < deadline and len(rec.t) < published:
        if len(rec.t) == last and rec.t and time.monotonic() - rec.t[-1] > 3:
            break            # nothing more is coming
        last = len(rec.t)
        time.sleep(0.1)
    sub_cpu = _cpu_s() - sub_cpu0
    if broker_cpu is not None and b is not None:
        broker_cpu = (_proc_cpu(b.proc.pid) or 0.0) - broker_cpu
    stop.set()
    th.join(30)
    if own and b is not None:
        b.stop()
    if b is None:
        shutil.rmtree(opts["dir"], ignore_errors=True)
    n = len(rec.t)
    span = rec.t[-1] - rec.t[0] if n > 1 else 0.0
    lat = np.array(rec.lat, dtype=np.float64) / 1e6 if n else np.array([np.nan])
    return {"backend": backend, "payload": payload, "path": path, "published": published,
            "pub_fps": published / out[1] if out[1] else 0.0, "received": n,
            "lost": published - n, "loss_pct": 100.0 * (published - n) / published if published else float("nan"),
            "fps": (n - 1) / span if span else 0.0, "MBps": (n - 1) * rec.size / span / 1e6 if span else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "msg_bytes": rec.size, "sub_dropped": getattr(rec, "stats", {}).get("dropped"),
            # CPU seconds: the publisher process over its publish window, this (subscriber)
            # process and the broker from go to the last frame; per delivered frame in the table
            "pub_cpu_s": float(out[2]), "sub_cpu_s": sub_cpu, "broker_cpu_s": broker_cpu,
            "sub_gaps": getattr(rec, "stats", {}).get("gaps")}


def _proc_cpu(pid: int) -> Optional[float]:
    """CPU seconds of another process from /proc (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _tcp_rx(port_q: Any, seconds: float, size: int, out: Any) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    c, _ = srv.accept()
    buf = bytearray(size)
    mv = memoryview(buf)
    total = 0
    t0 = None
    while True:
        k = c.recv_into(mv[total % size:])
        if not k:
            break
        if t0 is None:
            t0 = time.monotonic()
        total += k
    out[0], out[1] = total, time.monotonic() - (t0 or time.monotonic())


def tcp_ceiling(seconds: float = 3.0, size: int = 6_220_800) -> Dict[str, float]:
    """Loopback TCP between two processes: sendall of ``size``-byte messages, recv_into a buffer."""
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Array("d", 2)
    p = ctx.Process(target=_tcp_rx, args=(q, seconds, size, out), daemon=True)
    p.start()
    s = socket.create_connection(("127.0.0.1", q.get(timeout=30)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(size)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        s.sendall(msg)
    s.close()
    p.join(30)
    gbps = out[0] / out[1] / 1e9 if out[1] else 0.0
    return {"GBps": gbps, "msgs_per_s": out[0] / size / out[1] if out[1] else 0.0}


def run_quick(backend: Optional[str], payload: str, seconds: float) -> str:
    from .registry import backend_name
    name = backend_name(backend)
    payload = {"4k": "4k", "1080p": "1080p"}.get(payload, payload)
    rows = []
    for path in ("msight", "raw"):
        try:
            r = run_transport(name, payload, seconds, path)
        except ImportError as e:
            rows.append(f"{path:>7}: n/a ({e})")
            continue
        rows.append(f"{path:>7}: {r['fps']:9.1f} frames/s {r['MBps']:8.1f} MB/s  lost {r['lost']:6d} of "
                    f"{r['published']:6d}  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms")
    head = f"{name} / {payload} / {seconds:g} s (msight = msight_fast; raw = the bare client, same broker binary)"
    return "\n".join([head] + rows)


# ---------------------------------------------------------------- sustained sensor load
Load = Sequence[Tuple[str, str, float]]          # (topic, payload name, rate in Hz), one per sensor

SENSOR_LOAD = (("cam/raw", "1080p", 30.0), ("cam/jpeg", "jpeg", 30.0), ("lidar", "lidar", 10.0))
INTERSECTION_LOAD = (("cam1/raw", "1080p", 15.0), ("cam2/raw", "1080p", 15.0), ("cam3/raw", "1080p", 15.0),
                     ("cam4/raw", "1080p", 15.0), ("lidar", "lidar262k", 10.0), ("cam/jpeg", "jpeg", 30.0))
PROFILES: Dict[str, Load] = {"roadside": SENSOR_LOAD, "intersection": INTERSECTION_LOAD}
PROFILE_TEXT = {
    "roadside": "one publisher thread paces every stream on one Bus (raw 1080p at 30 fps, JPEG at 30 fps, "
                "the lidar sweep at 10 Hz)",
    "intersection": "a thread per sensor on one Bus, each paced with absolute deadlines (4 raw 1080p cameras "
                    "at 15 fps, a 262,144-point lidar at 10 Hz, JPEG at 30 fps); every sensor's first frame is "
                    "due at the same instant",
}

# The intersection's subscriber takes ~440 MB/s on six connections under one GIL: a stall of 0.4 s
# queues more than 32 MB (five and a half camera frames) on one camera's connection, past Redis's
# default hard limit (pubsub 32mb 8mb 60), and Redis drops that subscriber. The roadside profile keeps the
# defaults its published figures were measured with.
REDIS_PUBSUB_LIMIT = ("--client-output-buffer-limit", "pubsub", "512mb", "256mb", "60")


def profile_broker_args(profile: str, backend: str) -> List[str]:
    """Arguments beyond the defaults that the embedded broker gets for ``profile`` (reported with it)."""
    if profile == "intersection" and backend == "redis":
        return list(REDIS_PUBSUB_LIMIT)
    return []


def payload_note(name: str) -> str:
    """What a payload is and where it comes from: the JPEG is the real Mcity frame only when
    ``MSIGHT_DATA_DIR`` names the full data, else the packaged sample."""
    obj, enc, size = make_payload(name)
    if name == "jpeg":
        from .sample import DIR, data_dir, image_file
        d = data_dir()
        p = image_file(d) if d is not None else None
        if p is None:
            src = "random bytes (no sample data found)"
        elif d == DIR:
            src = f"the packaged sample frame {p.name} (MSIGHT_DATA_DIR unset or without frames)"
        else:
            src = f"{p.name} from MSIGHT_DATA_DIR"
        return f"{size:,} B, {src}"
    if name == "lidar262k":
        return f"{size:,} B, a synthetic 262,144-point sweep"
    if isinstance(obj, np.ndarray) and enc != "pointcloud":
        return f"{size:,} B, random {'x'.join(map(str, obj.shape))} {enc}"
    return f"{size:,} B, {enc}"


def _catch_up(k: int, t0: float, period: float, now: float) -> int:
    """The frame to publish at ``now``: ``k``, or a later one when the slots after ``k`` are over
    too (a sensor that fell behind sends its newest frame and skips the rest, it does not burst)."""
    over = int((now - (t0 + k * period)) // period)
    return k + over if over > 0 else k


def _pace(bus: Any, topic: str, obj: Any, enc: str, hz: float, t0: float, out: Dict[str, Any],
          stop: threading.Event) -> None:
    """Publish ``out["expected"]`` frames of one sensor, frame k due at ``t0 + k / hz``; counts into ``out``."""
    from .errors import MsightFastError
    n: int = out["expected"]
    period = 1.0 / hz
    lags: List[float] = []
    holds: List[float] = []                   # how long each publish call took
    sent = late = skipped = errors = 0
    k = 0
    try:
        while k < n and not stop.is_set():
            now = time.monotonic()
            due = t0 + k * period
            if now < due:
                stop.wait(due - now)              # not due yet; stop ends the wait early
                continue
            j = min(_catch_up(k, t0, period, now), n)
            skipped += j - k
            k = j
            if k == n:
                break
            due = t0 + k * period
            lags.append(now - due)
            try:
                bus.publish(topic, obj, encoding=enc)
            except MsightFastError:           # a broker away past publish_timeout_s: counted, go on
                errors += 1
                holds.append(time.monotonic() - now)
            else:
                sent += 1
                done = time.monotonic()
                holds.append(done - now)
                if done > due + period:       # handed over after the next frame was due
                    late += 1
            k += 1
    except Exception as e:  # noqa: BLE001 - reported with the counts, not lost in a thread
        out["failed"] = repr(e)
    finally:
        skipped += n - k if stop.is_set() and "failed" not in out else 0
        lag = np.array(lags or [np.nan]) * 1e3
        hold = np.array(holds or [np.nan]) * 1e3
        out.update(sent=sent, late=late, skipped=skipped, errors=errors,
                   lag_p50_ms=float(np.percentile(lag, 50)), lag_p99_ms=float(np.percentile(lag, 99)),
                   lag_max_ms=float(lag.max()), publish_p50_ms=float(np.percentile(hold, 50)),
                   publish_p99_ms=float(np.percentile(hold, 99)), publish_max_ms=float(hold.max()))


def paced_streams(load: Load) -> List[Tuple[str, Any, str, float]]:
    """``publish_paced``'s streams for ``load``: (topic, object, encoding, rate); the sensors of
    one payload kind share one object, made once."""
    made: Dict[str, Tuple[Any, str, int]] = {}
    streams = []
    for topic, payload, hz in load:
        if payload not in made:
            made[payload] = make_payload(payload)
        obj, enc, _ = made[payload]
        streams.append((topic, obj, enc, hz))
    return streams


def publish_paced(bus: Any, streams: Sequence[Tuple[str, Any, str, float]], seconds: float) -> List[Dict[str, Any]]:
    """Publish every stream (topic, object, encoding, Hz) from its own thread on ``bus`` for
    ``seconds``; per stream: expected (rate x seconds), sent, late, skipped, errors and how late
    each publish began (lag p50/p99/max ms), and how long each publish call took (publish
    p50/p99/max ms). sent + skipped + errors == expected unless ``failed``."""
    t0 = time.monotonic()
    stop = threading.Event()
    outs: List[Dict[str, Any]] = [{"topic": t, "hz": hz, "expected": int(round(hz * seconds)), "sent": 0, "late": 0,
                                   "skipped": 0, "errors": 0, "lag_p50_ms": float("nan"), "lag_p99_ms": float("nan"),
                                   "lag_max_ms": float("nan"), "publish_p50_ms": float("nan"),
                                   "publish_p99_ms": float("nan"), "publish_max_ms": float("nan")}
                                  for t, _, _, hz in streams]
    threads = [threading.Thread(target=_pace, args=(bus, t, obj, enc, hz, t0, o, stop), name=f"pace {t}", daemon=True)
               for (t, obj, enc, hz), o in zip(streams, outs)]
    for th in threads:
        th.start()
    # a publish waits at most publish_timeout_s, so every thread ends by then
    grace = float(getattr(getattr(bus, "config", None), "publish_timeout_s", 5.0)) + 30.0
    end = t0 + seconds + grace
    for th in threads:
        th.join(max(0.0, end - time.monotonic()))
    stop.set()
    for th, o in zip(threads, outs):
        th.join(grace)
        if th.is_alive():
            o["failed"] = f"still publishing {grace:.0f} s after the end"
    return outs


def _pub_sensors(backend: str, opts: Dict[str, Any], seconds: float, ready: Any, go: Any, out: Any,
                 load: Load = SENSOR_LOAD) -> None:
    """One bus, the streams paced from one thread, as a roadside node would publish them."""
    from . import connect
    bus = connect(backend, **opts)
    streams: List[List[Any]] = []                 # [topic, object, encoding, period, next due]
    for topic, payload, hz in load:
        obj, enc, _ = make_payload(payload)
        streams.append([topic, obj, enc, 1.0 / hz, 0.0])
    ready.set()
    go.wait()
    t0 = time.monotonic()
    for s in streams:
        s[4] = t0
    counts = [0] * len(streams)
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        i = min(range(len(streams)), key=lambda k: streams[k][4])   # the stream due first
        topic, obj, enc, period, due = streams[i]
        if due > now:
            time.sleep(due - now)                                      # pacing to the sensor rates
        bus.publish(topic, obj, encoding=enc)
        counts[i] += 1
        streams[i][4] = due + period
    bus.flush(60)
    for i, c in enumerate(counts):
        out[i] = c
    bus.close()


def _pub_threads(backend: str, opts: Dict[str, Any], seconds: float, ready: Any, go: Any, out: Any,
                 load: Load = INTERSECTION_LOAD) -> None:
    """One bus, a thread per sensor (``publish_paced``); puts its rows and CPU seconds on ``out`` (a queue)."""
    from . import connect
    from .errors import MsightFastError
    result: Dict[str, Any] = {"rows": [], "cpu_s": None, "flush": None}
    try:
        bus = connect(backend, **opts)
    except Exception as e:  # noqa: BLE001 - the parent reports it
        out.put(dict(result, failed=repr(e)))
        ready.set()
        return
    try:
        streams = paced_streams(load)
        ready.set()
        if not go.wait(300):
            result["failed"] = "never told to start"
            return
        c0 = _cpu_s()
        result["rows"] = publish_paced(bus, streams, seconds)
        try:
            bus.flush(60)
        except MsightFastError as e:
            result["flush"] = repr(e)
        result["cpu_s"] = _cpu_s() - c0
    except Exception as e:  # noqa: BLE001 - the parent reports it
        result["failed"] = repr(e)
    finally:
        ready.set()                             # a failure before go is reported, not waited out
        out.put(result)
        bus.close()


def _drain(recs: Mapping[str, _Recorder], sent: Mapping[str, int], limit_s: float = 30.0,
           quiet_s: float = 3.0) -> None:
    """Wait until every frame sent has arrived, or nothing has for ``quiet_s`` (the rest is lost)."""
    now = time.monotonic()
    deadline, last, changed = now + limit_s, -1, now
    while now < deadline and any(len(recs[t].t) < n for t, n in sent.items()):
        got = sum(len(r.t) for r in recs.values())
        if got != last:
            last, changed = got, now
        elif now - changed > quiet_s:
            break
        time.sleep(0.1)
        now = time.monotonic()


def _pct(ms: List[float], q: float) -> float:
    return float(np.percentile(ms, q)) if ms else float("nan")


def run_profile(backend: str, seconds: float = 20.0, profile: str = "roadside",
                load: Optional[Load] = None, nats_max_payload: int = 0) -> Dict[str, Any]:
    """Publish a profile's sensor load (``PROFILES``; ``load`` overrides its sensors) for ``seconds``
    from one publisher process (a thread on the in-process ``memory`` backend) to a broker started
    for the run, and receive every topic on one Bus here.

    Returns backend, profile, seconds, broker_args, payloads (what each payload is), topics (per
    topic: expected, sent, late, skipped, errors, received, lost, gaps, dropped, delivered =
    received / expected, MB/s, p50/p99 ms publish to receipt, lag_p50/p99/max_ms how late publishes
    began, publish_p50/p99/max_ms how long a publish call took; late/skipped/errors/lag/publish
    are None for ``roadside``, whose publisher does not count them), total, and cpu_s (publisher, subscriber, broker).
    """
    from . import connect
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    load = tuple(load or PROFILES[profile])
    extra = profile_broker_args(profile, backend)
    in_process = backend == "memory"
    reported = list(extra)
    if backend == "nats" and nats_max_payload:
        extra += nats_config_args(nats_max_payload)
        reported.append(f"max_payload: {nats_max_payload} (config file)")   # the file itself is temporary
    b = None if in_process else start_broker(backend, extra_args=extra)
    try:
        opts: Dict[str, Any] = b.options() if b is not None else {"name": f"bench-{os.getpid()}-{time.time_ns()}"}
        bus = connect(backend, **opts)
        try:
            return _run_profile(bus, b, backend, opts, seconds, profile, load, reported)
        finally:
            bus.close()
    finally:
        if b is not None:
            b.stop()


def _run_profile(bus: Any, b: Optional[brokers.Broker], backend: str, opts: Dict[str, Any], seconds: float,
                 profile: str, load: Load, extra: List[str]) -> Dict[str, Any]:
    import queue
    topics = [t for t, _, _ in load]
    subs: Dict[str, Subscription] = {}
    failures: List[str] = []

    def subscribe(t: str) -> None:
        try:
            subs[t] = bus.subscribe(t)
        except Exception as e:  # noqa: BLE001 - raised below, in this thread
            failures.append(f"subscribe {t}: {e!r}")
    threads = [threading.Thread(target=subscribe, args=(t,)) for t in topics]   # Kafka assigns each in parallel
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if failures or len(subs) < len(topics):
        raise RuntimeError(f"{backend}: " + ("; ".join(failures) or "a subscription did not open within 120 s"))
    recs = {t: _Recorder() for t in topics}
    stop = threading.Event()

    def take(topic: str) -> None:
        while not stop.is_set():
            f = subs[topic].recv(0.2)
            if f is not None:
                recs[topic].add(time.time_ns() - f.publish_ts_ns, f.nbytes)
    takers = [threading.Thread(target=take, args=(t,), daemon=True) for t in topics]
    for th in takers:
        th.start()
    threaded = profile != "roadside"
    target = _pub_threads if threaded else _pub_sensors
    ready: Any
    go: Any
    out: Any
    if backend == "memory":
        ready, go = threading.Event(), threading.Event()
        out = queue.Queue() if threaded else [0] * len(load)
        p: Any = threading.Thread(target=target, args=(backend, opts, seconds, ready, go, out, load), daemon=True)
    else:
        ctx = mp.get_context("spawn")
        ready, go = ctx.Event(), ctx.Event()
        out = ctx.Queue() if threaded else ctx.Array("q", len(load))
        p = ctx.Process(target=target, args=(backend, opts, seconds, ready, go, out, load), daemon=True)
    p.start()
    if not ready.wait(120):
        raise RuntimeError(f"{backend} sensor publisher did not start")
    broker_cpu0 = _proc_cpu(b.proc.pid) if b is not None else None
    sub_cpu0 = _cpu_s()
    go.set()
    pub: Dict[str, Any]
    if threaded:
        # read before join: a child process waits on exit until its queue is drained
        report: Optional[Dict[str, Any]] = None
        deadline = time.monotonic() + seconds + 180
        while report is None and time.monotonic() < deadline:
            alive = p.is_alive()
            try:
                report = out.get(timeout=1.0)
            except queue.Empty:
                if not alive:                   # it died without a word: do not wait out the deadline
                    break
        pub = report or {"rows": [], "cpu_s": None, "failed": "the publisher reported nothing"}
        p.join(60)
    else:
        p.join(seconds + 120)
        pub = {"rows": [{"topic": t, "sent": int(out[i])} for i, t in enumerate(topics)], "cpu_s": None}
    by_topic = {r["topic"]: r for r in pub["rows"]}
    sent = {t: int(by_topic.get(t, {}).get("sent", 0)) for t in topics}
    _drain(recs, sent)
    sub_cpu = _cpu_s() - sub_cpu0
    broker_cpu = None
    if broker_cpu0 is not None and b is not None:
        broker_cpu = (_proc_cpu(b.proc.pid) or 0.0) - broker_cpu0
    stop.set()
    for th in takers:
        th.join(5)
    notes = {name: payload_note(name) for name in dict.fromkeys(pl for _, pl, _ in load)}
    sizes = {name: make_payload(name)[2] for name in notes}
    rows, all_lat = [], []
    for topic, payload, hz in load:
        r, pr, st = recs[topic], by_topic.get(topic, {}), subs[topic].stats()
        lat = [v / 1e6 for v in r.lat]
        all_lat += lat
        expected = int(pr.get("expected", round(hz * seconds)))
        got = len(r.t)
        rows.append({"backend": backend, "profile": profile, "topic": topic, "payload": payload, "hz": hz,
                     "expected": expected, "sent": sent[topic], "late": pr.get("late"), "skipped": pr.get("skipped"),
                     "errors": pr.get("errors"), "received": got, "lost": sent[topic] - got,
                     "gaps": st.get("gaps"), "dropped": st.get("dropped"), "disconnects": st.get("disconnects"),
                     "delivered": got / expected if expected else float("nan"),
                     "MBps": r.nbytes / seconds / 1e6, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                     "lag_p50_ms": pr.get("lag_p50_ms"), "lag_p99_ms": pr.get("lag_p99_ms"),
                     "lag_max_ms": pr.get("lag_max_ms"), "publish_p50_ms": pr.get("publish_p50_ms"),
                     "publish_p99_ms": pr.get("publish_p99_ms"), "publish_max_ms": pr.get("publish_max_ms"),
                     "failed": pr.get("failed")})

    def total(key: str) -> Optional[int]:
        vals = [r[key] for r in rows]
        return None if any(v is None for v in vals) else int(sum(vals))
    exp, got = total("expected") or 0, total("received") or 0
    counted = ("expected", "sent", "late", "skipped", "errors", "received", "lost", "gaps", "dropped")
    tot: Dict[str, Any] = {k: total(k) for k in counted}
    tot.update(delivered=got / exp if exp else float("nan"),
               offered_MBps=sum(r["expected"] * sizes[r["payload"]] for r in rows) / seconds / 1e6,
               MBps=sum(r["MBps"] for r in rows), p50_ms=_pct(all_lat, 50), p99_ms=_pct(all_lat, 99))
    return {"backend": backend, "profile": profile, "seconds": seconds, "broker_args": extra, "payloads": notes,
            "topics": rows, "total": tot, "publisher_failed": pub.get("failed"), "flush_error": pub.get("flush"),
            "cpu_s": {"publisher": pub.get("cpu_s"), "subscriber": sub_cpu, "broker": broker_cpu}}


def run_sustained(backend: str, seconds: float = 20.0, profile: str = "roadside") -> List[Dict[str, Any]]:
    """Publish a profile's sensor load for ``seconds``; per topic: sent, received, lost, gaps,
    p50/p99 ms and the rest of ``run_profile``'s rows."""
    rows: List[Dict[str, Any]] = run_profile(backend, seconds, profile)["topics"]
    return rows
