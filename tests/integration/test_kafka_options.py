"""Kafka topic creation and consumer timings on tansu, and on brokers that implement less.

A broker that does not implement CreateTopics or DescribeConfigs, or whose CreateTopics predates
the broker-default replication factor (KIP-464, CreateTopics v4), is tansu behind
``KafkaApiFilter``: a proxy that edits the broker's ApiVersions answer, through which a Kafka
client learns what the broker implements. librdkafka then refuses those requests as it would
for such a broker; nothing in msight_fast is patched. tansu advertises the filter's address, so
every connection of every client goes through it.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient

import msight_fast
from msight_fast import brokers

from .conftest import collect, wait_for

pytestmark = [pytest.mark.integration]

API_VERSIONS, CREATE_TOPICS, DESCRIBE_CONFIGS = 18, 19, 32
N_FRAMES = 33


# -- a proxy that makes tansu look like a broker implementing less
def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _read_frame(s: socket.socket) -> bytes:
    (n,) = struct.unpack(">i", _recv_exact(s, 4))
    return _recv_exact(s, n)


def _uvarint(b: bytes, off: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        byte = b[off]
        off += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, off
        shift += 7


def _enc_uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _skip_tags(b: bytes, off: int) -> int:
    n, off = _uvarint(b, off)
    for _ in range(n):
        _, off = _uvarint(b, off)
        size, off = _uvarint(b, off)
        off += size
    return off


def filter_api_versions(body: bytes, version: int, hide: Set[int], cap: Dict[int, int]) -> bytes:
    """An ApiVersions response body (after the correlation id) without the APIs in ``hide`` and
    with the highest version of each API in ``cap`` lowered to it (v3+ is the flexible format:
    compact array, tagged fields)."""
    (err,) = struct.unpack_from(">h", body, 0)
    if err != 0:
        return body
    off = 2
    if version >= 3:
        n, off = _uvarint(body, off)
        n -= 1
    else:
        (n,) = struct.unpack_from(">i", body, off)
        off += 4
    kept = []
    for _ in range(n):
        start = off
        key, lo, hi = struct.unpack_from(">hhh", body, off)
        off += 6
        if version >= 3:
            off = _skip_tags(body, off)
        if key in hide or (key in cap and lo > cap[key]):
            continue
        entry = body[start:off]
        if key in cap:
            entry = struct.pack(">hhh", key, lo, min(hi, cap[key])) + entry[6:]
        kept.append(entry)
    count = _enc_uvarint(len(kept) + 1) if version >= 3 else struct.pack(">i", len(kept))
    return body[:2] + count + b"".join(kept) + body[off:]


class KafkaApiFilter:
    """A TCP proxy to a Kafka broker that edits its ApiVersions answers (``hide``: API keys the
    broker seems not to implement; ``cap``: API key -> highest version it seems to have) and
    forwards everything else untouched. ``rewritten`` counts the answers edited."""

    def __init__(self, hide: Iterable[int] = (), cap: Optional[Dict[int, int]] = None) -> None:
        self.hide, self.cap = set(hide), dict(cap or {})
        self.upstream: Optional[Tuple[str, int]] = None
        self.rewritten = 0
        self._lock = threading.Lock()
        self._socks: Set[socket.socket] = set()
        self._closed = False
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(64)
        self.port: int = self._listen.getsockname()[1]
        threading.Thread(target=self._accept, name="kafka-api-filter", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:                  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            assert self.upstream is not None
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._closed:
                client.close()
                server.close()
                return
            self._socks |= {client, server}
        # (correlation id, api key, api version) of each request, in order: a broker answers
        # the requests of one connection in the order they came
        pending: Deque[Tuple[int, int, int]] = collections.deque()

        def requests() -> None:
            try:
                while True:
                    f = _read_frame(client)
                    key, ver, corr = struct.unpack_from(">hhi", f, 0)
                    pending.append((corr, key, ver))   # before the broker can answer it
                    server.sendall(struct.pack(">i", len(f)) + f)
            except (OSError, EOFError):
                pass
            finally:
                self._drop(client, server)
        threading.Thread(target=requests, daemon=True).start()
        try:
            while True:
                f = _read_frame(server)
                (corr,) = struct.unpack_from(">i", f, 0)
                while pending and pending[0][0] != corr:
                    pending.popleft()
                if pending and pending[0][1] == API_VERSIONS:
                    f = f[:4] + filter_api_versions(f[4:], pending.popleft()[2], self.hide, self.cap)
                    self.rewritten += 1
                client.sendall(struct.pack(">i", len(f)) + f)
        except (OSError, EOFError):
            pass
        finally:
            self._drop(client, server)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            self._socks -= set(socks)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        self._listen.close()
        self._drop(*socks)


class FilteredKafka:
    """tansu on a free port, advertising (and so reached only through) a KafkaApiFilter."""

    def __init__(self, **filter_kw: Any) -> None:
        self.filter = KafkaApiFilter(**filter_kw)
        self.port = brokers.free_port()
        args = [brokers.binary("kafka"), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.filter.port}"]
        fd, log_path = tempfile.mkstemp(prefix="msight_fast-kafka-filtered-", suffix=".log")
        proc = subprocess.Popen(args, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(fd)
        self.broker = brokers.Broker("kafka", self.port, proc, log_path, args=args)
        self.filter.upstream = ("127.0.0.1", self.port)
        try:
            wait_for(self._listening, "tansu to listen", timeout=30)
        except BaseException:
            self.close()
            raise

    def _listening(self) -> bool:
        assert self.broker.alive(), f"tansu exited: {self.broker.log()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    @property
    def servers(self) -> List[str]:
        return [f"127.0.0.1:{self.filter.port}"]

    def close(self) -> None:
        self.filter.close()
        self.broker.stop()


@pytest.fixture
def filtered_kafka() -> Iterator[Any]:
    made: List[FilteredKafka] = []

    def start(**filter_kw: Any) -> FilteredKafka:
        k = FilteredKafka(**filter_kw)
        made.append(k)
        return k

    yield start
    for k in made:
        k.close()


# -- helpers
def _flows(bus: msight_fast.Bus, topic: str, n: int = N_FRAMES, big: bool = False) -> None:
    """Subscribe, publish ``n`` frames (the last one 3 MB when ``big``: fragmented under the
    default message limit) and receive every one of them, whole."""
    sub = bus.subscribe(topic)
    try:
        sent = [np.full(1024, i, dtype=np.uint8) for i in range(n)]
        if big:
            sent[-1] = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
        for a in sent:
            bus.publish(topic, a)
        bus.flush(30)
        got = collect(sub, n, timeout=60)
        assert len(got) == n, f"{len(got)} of {n} frames arrived"
        by_seq = sorted(got, key=lambda f: f.seq)
        for f, a in zip(by_seq, sent):
            assert np.array_equal(f.array, a)
    finally:
        sub.close()


def _topic_metadata(servers: List[str], topic: str) -> Any:
    md = AdminClient({"bootstrap.servers": ",".join(servers)}).list_topics(timeout=10)
    return md.topics.get(topic), md


def _lines(caplog: Any, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "msight_fast" and text in r.getMessage()]


# -- tests
def test_topics_get_the_brokers_default_replication_and_frames_flow(broker_pool, topic, caplog):
    """replication_factor=-1 (the default) on tansu: it accepts -1 (KIP-464) and gives its one
    replica; num_partitions still decides the partitions; no fallback is logged."""
    caplog.set_level(logging.INFO, logger="msight_fast")
    info = broker_pool("kafka")
    bus = msight_fast.connect("kafka", **info.options)
    try:
        assert bus._t.cfg.replication_factor == -1
        _flows(bus, topic)
        tm, md = _topic_metadata(info.options["servers"], topic)
        assert tm is not None and len(tm.partitions) == 4
        replicas = {len(p.replicas) for p in tm.partitions.values()}
        assert len(replicas) == 1 and 1 <= replicas.pop() <= len(md.brokers), tm.partitions
        assert not _lines(caplog, "replication_factor=-1") and not _lines(caplog, "CreateTopics")
        assert bus._t._replication == -1            # -1 was accepted: no fallback
    finally:
        bus.close()


@pytest.mark.parametrize("fetch_wait_max_ms", [1, 2000])
def test_frames_flow_with_a_short_and_a_long_fetch_wait(broker_pool, topic, fetch_wait_max_ms):
    info = broker_pool("kafka")
    bus = msight_fast.connect("kafka", fetch_wait_max_ms=fetch_wait_max_ms, **info.options)
    try:
        _flows(bus, topic)
    finally:
        bus.close()


def test_fetch_wait_from_the_environment_and_recv_does_not_hang(broker_pool, topic, monkeypatch):
    """MSIGHT_KAFKA_FETCH_WAIT_MAX_MS is read; a long fetch wait does not make recv() outlast
    its timeout when nothing comes."""
    monkeypatch.setenv("MSIGHT_KAFKA_FETCH_WAIT_MAX_MS", "3000")
    info = broker_pool("kafka")
    bus = msight_fast.connect("kafka", **info.options)
    try:
        assert bus._t.cfg.fetch_wait_max_ms == 3000
        sub = bus.subscribe(topic)
        t0 = time.monotonic()
        assert sub.recv(timeout=1.0) is None
        assert time.monotonic() - t0 < 1.0 + 4.0
        bus.publish(topic, np.arange(16, dtype=np.uint8))
        got = collect(sub, 1, timeout=30)
        assert len(got) == 1 and np.array_equal(got[0].array, np.arange(16, dtype=np.uint8))
    finally:
        bus.close()


def test_a_broker_without_create_topics_and_describe_configs(filtered_kafka, topic, caplog):
    """connect() works; topics come from the broker's auto-creation; frames (one of them
    fragmented under the default 1,000,000-byte limit) flow; each fallback logs one line, once
    per Bus, not once per topic."""
    caplog.set_level(logging.INFO, logger="msight_fast")
    k = filtered_kafka(hide={CREATE_TOPICS, DESCRIBE_CONFIGS})
    bus = msight_fast.connect("kafka", servers=k.servers)
    try:
        assert k.filter.rewritten >= 1                 # librdkafka took the edited ApiVersions
        _flows(bus, topic, big=True)
        _flows(bus, topic + "_second")
        create = _lines(caplog, "does not implement CreateTopics")
        describe = _lines(caplog, "max.message.bytes")
        assert len(create) == 1 and "auto-creation" in create[0], create
        assert len(describe) == 1 and "DescribeConfigs" in describe[0] and "1000000" in describe[0], describe
        assert bus._t._auto_create and not bus._t._describe
        assert bus._t.max_message(topic) == 1_000_000 - 512
        for t in (topic, topic + "_second"):
            tm, _ = _topic_metadata(k.servers, t)
            assert tm is not None and tm.error is None and tm.partitions
    finally:
        bus.close()


def test_a_broker_without_create_topics_recreates_lost_topics_by_auto_creation(filtered_kafka, topic, caplog):
    """After a restart that lost every topic (tansu with memory storage), the watcher has the
    broker auto-create this Bus's topic again, and frames flow on the same Subscription."""
    caplog.set_level(logging.INFO, logger="msight_fast")
    k = filtered_kafka(hide={CREATE_TOPICS})
    bus = msight_fast.connect("kafka", servers=k.servers, publish_timeout_s=2.0)
    try:
        sub = bus.subscribe(topic)
        bus.publish(topic, np.zeros(8, np.uint8))
        assert len(collect(sub, 1, timeout=30)) == 1
        k.broker.restart()
        # the topic comes back by auto-creation: the watcher's, or the consumer's own metadata
        # request, whichever asks first (so topics_recreated may stay 0); what matters is that
        # frames flow again on the same Subscription
        want = np.arange(8, dtype=np.uint8)

        def arrived() -> bool:
            try:
                bus.publish(topic, want)
            except msight_fast.MsightFastError:
                return False                     # the producer may still be reconnecting
            f = sub.recv(timeout=1.0)
            return f is not None and np.array_equal(f.array, want)
        wait_for(arrived, "a frame on the re-created topic", timeout=90, interval=0.2)
        assert len(_lines(caplog, "does not implement CreateTopics")) == 1
    finally:
        bus.close()


def test_a_single_broker_that_refuses_the_default_replication_gets_one(filtered_kafka, topic, caplog):
    """A broker whose CreateTopics predates KIP-464 (v3): librdkafka refuses -1; with one broker
    the topic is created with replication factor 1 and num_partitions, with one log line."""
    caplog.set_level(logging.INFO, logger="msight_fast")
    k = filtered_kafka(cap={CREATE_TOPICS: 3})
    bus = msight_fast.connect("kafka", servers=k.servers)
    try:
        _flows(bus, topic)
        _flows(bus, topic + "_second")
        lines = _lines(caplog, "refused replication_factor=-1")
        assert len(lines) == 1 and "one broker" in lines[0] and "KIP-464" in lines[0], lines
        assert not _lines(caplog, "does not implement CreateTopics")
        assert bus._t._replication == 1
        for t in (topic, topic + "_second"):
            tm, _ = _topic_metadata(k.servers, t)
            assert tm is not None and len(tm.partitions) == 4
    finally:
        bus.close()


def test_an_explicit_replication_factor_is_used_as_given(filtered_kafka, topic, caplog):
    """replication_factor=1 on the pre-KIP-464 broker: no refusal, no fallback line."""
    caplog.set_level(logging.INFO, logger="msight_fast")
    k = filtered_kafka(cap={CREATE_TOPICS: 3})
    bus = msight_fast.connect("kafka", servers=k.servers, replication_factor=1)
    try:
        _flows(bus, topic)
        assert not _lines(caplog, "refused replication_factor")
        tm, _ = _topic_metadata(k.servers, topic)
        assert tm is not None and len(tm.partitions) == 4
    finally:
        bus.close()
