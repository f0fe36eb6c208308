"""An MSight-Core-style codec, written here from a description of MSight Core 2.0.2: a msgpack map of
metadata plus ``arr.tobytes()``; point clouds zstd level 3 with a new compressor per frame and the
dtype as JSON; decode = unpack (+ decompress) + ``np.frombuffer`` + reshape."""
from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import zstandard


def encode(payload, sensor_name="cam", encoding="bgr8") -> bytes:
    d = {"sensor_name": sensor_name, "frame_id": time.time_ns(), "creation_timestamp": time.time(),
         "capture_timestamp": time.time(), "data_type": "msight_core.data.ImageData", "encoding": encoding}
    if isinstance(payload, np.ndarray):
        if payload.dtype.names:
            d["points"] = zstandard.ZstdCompressor(level=3).compress(payload.tobytes())
            d["dtype"] = json.dumps(payload.dtype.descr)
            d["n"] = len(payload)
        else:
            d["image"] = payload.tobytes()
            d["shape"] = list(payload.shape)
            d["dtype"] = payload.dtype.str
    else:
        d["image"] = bytes(payload)
    return msgpack.packb(d, use_bin_type=True)


def decode(buf):
    return from_dict(msgpack.unpackb(buf, raw=False))


def from_dict(d: dict):
    if "points" in d:
        raw = zstandard.ZstdDecompressor().decompress(d["points"])
        dt = np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2])) for f in json.loads(d["dtype"])])
        return np.frombuffer(raw, dtype=dt)
    if "shape" in d:
        return np.frombuffer(d["image"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
    return np.frombuffer(d["image"], dtype=np.uint8)


# ---------------------------------------------------------------- the MSight-Core-style transport
# Publisher and subscriber for bench.run_transport(path="core"), written from a description of
# MSight Core's transport: msgpack frames (the codec above); Redis through redis-py
# (a synchronous publish, its pub/sub reader); NATS through nats-py on an event-loop thread that
# each publish hands its coroutine to and waits on (run_coroutine_threadsafe(...).result()), a
# callback doing queue.put to the consuming thread; Kafka produce() then flush() per message and a
# consumer with default fetch settings polled one message at a time. The broker limits it needs
# are raised for it (NATS max_payload, producer message.max.bytes), as MSight Core cannot fragment;
# the consumer's session/heartbeat times are shortened only so that tansu assigns partitions fast.

def _latency_ns(d: dict) -> int:
    return time.time_ns() - int(d["creation_timestamp"] * 1e9)


def core_publisher(backend, opts, topic, payload, seconds, ready, go, out) -> None:
    from msight_fast.bench import _cpu_s, make_payload
    obj, enc, _ = make_payload(payload)
    n = 0
    if backend == "redis":
        import redis
        r = redis.Redis(host="127.0.0.1", port=opts["port"])
        r.ping()
        send, done = (lambda data: r.publish(topic, data)), (lambda: None)
    elif backend == "nats":
        import asyncio
        import threading

        import nats
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        nc = asyncio.run_coroutine_threadsafe(nats.connect(opts["servers"]), loop).result(30)

        def send(data: bytes) -> None:                    # a cross-thread round trip per publish
            asyncio.run_coroutine_threadsafe(nc.publish(topic, data), loop).result()

        def done() -> None:
            asyncio.run_coroutine_threadsafe(nc.flush(120), loop).result()
            asyncio.run_coroutine_threadsafe(nc.close(), loop).result()
    else:
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": ",".join(opts["servers"]), "message.max.bytes": 67108864})
        p.list_topics(timeout=30)

        def send(data: bytes) -> None:
            p.produce(topic, data)
            p.flush()
        done = lambda: p.flush(120)  # noqa: E731
    ready.set()
    go.wait()
    t0, c0 = time.monotonic(), _cpu_s()
    while time.monotonic() - t0 < seconds:
        send(encode(obj, encoding=enc))
        n += 1
    done()
    out[0], out[1], out[2] = n, time.monotonic() - t0, _cpu_s() - c0


def _take(rec, data: bytes) -> None:
    d = msgpack.unpackb(data, raw=False)
    from_dict(d)
    rec.add(_latency_ns(d), len(data))


def core_subscriber(backend, opts, topic, rec, stop, ready) -> None:
    if backend == "redis":
        from msight_fast.bench import redis_py_messages
        for data in redis_py_messages(opts["port"], topic, stop, ready):
            _take(rec, data)
    elif backend == "nats":
        import asyncio
        import queue
        import threading

        import nats
        q: queue.Queue = queue.Queue()
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def cb(msg) -> None:
            q.put(msg.data)

        async def setup():
            nc = await nats.connect(opts["servers"])
            await nc.subscribe(topic, cb=cb)
            await nc.flush()
            return nc
        nc = asyncio.run_coroutine_threadsafe(setup(), loop).result(30)
        ready.set()
        while not stop.is_set():
            try:
                data = q.get(timeout=0.2)
            except queue.Empty:
                continue
            _take(rec, data)
        asyncio.run_coroutine_threadsafe(nc.close(), loop).result(30)
    else:
        import os

        from confluent_kafka import Consumer
        c = Consumer({"bootstrap.servers": ",".join(opts["servers"]),
                      "group.id": f"core-{os.getpid()}-{time.time_ns()}",
                      "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        c.subscribe([topic], on_assign=lambda *_: ready.set())
        while not stop.is_set():
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                _take(rec, m.value())
        c.close()
