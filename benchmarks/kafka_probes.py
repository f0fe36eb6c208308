"""Kafka probes behind three settings of backends/kafka.py, each on a tansu broker started here:

1. idle publish-to-recv latency through msight_fast (a 1 KB and a 1080p frame, one at a time):
   what the consumer's poll-then-consume(255, 0) loop gives (consume(256, 0.1) held ~100 ms);
2. first delivery of an idempotent producer fed right after Producer(), with and without the
   metadata round trip connect() now makes;
3. CPU of librdkafka's broker thread while one Bus publishes 1080p for 3 s, per
   max.in.flight.requests.per.connection (5, idempotence's maximum, against the default 2).

    python benchmarks/kafka_probes.py
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from msight_fast import brokers, connect


def idle_latency(b: brokers.Broker) -> None:
    pub, subbus = connect("kafka", **b.options()), connect("kafka", **b.options())
    for name, obj in (("1 KB", bytes(1024)), ("1080p", np.zeros((1080, 1920, 3), np.uint8))):
        topic = f"idle_{time.time_ns()}"
        sub = subbus.subscribe(topic)
        lat = []
        for _ in range(12):
            pub.publish(topic, obj)
            f = sub.recv(10)
            lat.append((time.time_ns() - f.publish_ts_ns) / 1e6)
            time.sleep(0.2)
        print(f"1. idle publish->recv, {name:5s}: p50 {np.percentile(lat[2:], 50):6.1f} ms  max {max(lat[2:]):6.1f}")
    pub.close()
    subbus.close()


def first_delivery(b: brokers.Broker) -> None:
    admin = AdminClient({"bootstrap.servers": b.address})
    for connect_first in (False, True):
        topic = f"first_{time.time_ns()}"
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        p = Producer({"bootstrap.servers": b.address, "enable.idempotence": True, "acks": "all"})
        if connect_first:
            p.list_topics(timeout=10)
        t0, got = time.monotonic(), {}
        p.produce(topic, b"x", on_delivery=lambda e, m, got=got: got.setdefault("t", time.monotonic()))
        p.flush(30)
        print(f"2. first delivery, idempotent producer, metadata round trip first={connect_first}: "
              f"{(got['t'] - t0) * 1e3:6.1f} ms")


def _thread_cpu() -> dict:
    out = {}
    for d in glob.glob(f"/proc/{os.getpid()}/task/*"):
        try:
            name = open(d + "/comm").read().strip()
            f = open(d + "/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[d] = (name, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def broker_thread_cpu(b: brokers.Broker) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    for inflight in (5, 2):
        bus = connect("kafka", **b.options(),
                      producer_config={"max.in.flight.requests.per.connection": inflight})
        topic = f"cpu_{time.time_ns()}"
        bus.publish(topic, frame)
        bus.flush(30)
        before, t0, n = _thread_cpu(), time.monotonic(), 0
        while time.monotonic() - t0 < 3:
            bus.publish(topic, frame)
            n += 1
        bus.flush(60)
        after = _thread_cpu()
        rdk = sum(c - before.get(k, (None, 0.0))[1] for k, (name, c) in after.items() if name.startswith("rdk:broker"))
        print(f"3. 1080p for 3 s, {inflight} requests in flight: {n} frames, librdkafka broker threads "
              f"{rdk:.2f} CPU-s")
        bus.close()


def main() -> None:
    b = brokers.start("kafka")
    try:
        idle_latency(b)
        first_delivery(b)
        broker_thread_cpu(b)
    finally:
        b.stop()


if __name__ == "__main__":
    main()
