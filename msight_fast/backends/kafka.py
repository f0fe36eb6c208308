"""Kafka backend through confluent-kafka (librdkafka): persistence, at-least-once, consumer groups.

Producer: idempotent (``enable.idempotence``, ``acks=all``), batched (``linger.ms``), never a
flush per message; the bytes in flight are bounded (``max_in_flight_bytes``) so latency cannot
grow without bound: ``publish`` waits for room instead. Delivery errors come back via ``flush``.
Frames above the topic's message limit (``max_message_bytes``, by default the topic's
``max.message.bytes`` as the broker reports it, else 1,000,000) are fragmented, straight from the
frame's parts; every fragment of a frame has the frame's key,
so all of them land on one partition, in order. The key is the publisher id by default (a
publisher's frames stay in order, as Kafka orders only within a partition) or, with
``partition_key="frame"``, the frame id (one publisher's frames spread over the partitions, so a
consumer group can share one camera; order then holds only per partition).

Consumer: ``group.id`` from ``group_id`` (without one, a private group: every subscriber gets
every frame). Offsets are stored only for messages whose frame has been handed to the
application and then released (the next ``recv`` or ``ack()``), never ahead of delivery, and are
committed every second and on ``ack()``: a member that dies loses nothing; the group re-delivers.
A fragmented frame's offsets are stored only once the whole frame was handed over.

Threads: librdkafka's own, plus one poll thread per subscription. Copies: one to encode the frame (confluent-kafka needs
``bytes``), one inside librdkafka on produce; on receipt one (``msg.value()``).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ..errors import AuthError, BackendUnavailable, ConfigError, PublishError
from .base import Capabilities, Outgoing, Source, Transport

log = logging.getLogger("msight_fast")
FRAG_SLACK = 512                 # record-batch overhead kept free under the message limit
DEFAULT_MESSAGE_BYTES = 1_000_000   # Kafka's default max.message.bytes, when the broker won't say


def limit_from_topic_config(entries: Any) -> Optional[int]:
    """The topic's ``max.message.bytes`` from a DescribeConfigs answer (name -> entry with
    ``.value``), or None when it is absent or not a sane number."""
    entry = (entries or {}).get("max.message.bytes")
    try:
        value = int(getattr(entry, "value", None))
    except (TypeError, ValueError):
        return None
    return value if 1024 <= value <= 1 << 31 else None
_AUTH_CODES = {"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
               "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED"}


def _client_config(cfg: Any) -> Dict[str, Any]:
    c: Dict[str, Any] = {"bootstrap.servers": ",".join(cfg.servers), "logger": logging.getLogger("msight_fast.librdkafka"),
                         "socket.connection.setup.timeout.ms": int(cfg.connect_timeout_s * 1000)}
    tls = cfg.use_tls or bool(cfg.tls_ca_cert_file)
    if cfg.sasl_mechanism:
        c["security.protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        c["sasl.mechanism"] = cfg.sasl_mechanism
        if cfg.sasl_mechanism == "OAUTHBEARER":
            token = cfg.sasl_oauth_token
            c["oauth_cb"] = lambda _config: (token, time.time() + 3600)
        else:
            c["sasl.username"], c["sasl.password"] = cfg.sasl_username, cfg.sasl_password
    elif tls:
        c["security.protocol"] = "SSL"
    if tls:
        if cfg.tls_ca_cert_file:
            c["ssl.ca.location"] = cfg.tls_ca_cert_file
        if cfg.tls_cert_file:
            c["ssl.certificate.location"], c["ssl.key.location"] = cfg.tls_cert_file, cfg.tls_key_file
        c["enable.ssl.certificate.verification"] = bool(cfg.tls_verify)
        c["ssl.endpoint.identification.algorithm"] = "https" if cfg.tls_check_hostname else "none"
    return c


def _raise_for(e: Exception, what: str, cfg: Any) -> None:
    err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
    name = err.name() if err is not None else ""
    where = ", ".join(cfg.servers)
    if name in _AUTH_CODES or "auth" in str(e).lower():
        raise AuthError(f"Kafka at {where} refused {what}: {err.str() if err else e}") from None
    raise BackendUnavailable(f"Kafka at {where}: {what} failed within {cfg.connect_timeout_s} s: "
                             f"{err.str() if err else e}") from None


class KafkaTransport(Transport):
    name = "kafka"
    CAPABILITIES = Capabilities(delivery="at_least_once", groups="consumer", persistence=True, max_message=None)
    capabilities = CAPABILITIES

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._base = _client_config(cfg)
        self._errors: List[str] = []
        self._admin = AdminClient(dict(self._base, error_cb=self._on_error))
        try:
            md = self._admin.list_topics(timeout=cfg.connect_timeout_s)
        except KafkaException as e:
            _raise_for(e, "the metadata request", cfg)
        if self._errors and any("auth" in x.lower() for x in self._errors):
            raise AuthError(f"Kafka at {', '.join(cfg.servers)} refused the credentials: {self._errors[-1]}")
        self._topics: Set[str] = set(md.topics)
        self._limits: Dict[str, int] = {}               # topic -> largest message we send
        pconf = dict(self._base)
        pconf.update({
            "enable.idempotence": True, "acks": "all", "linger.ms": cfg.linger_ms,
            # at idempotence's maximum of 5 requests in flight librdkafka's broker thread spun at
            # ~80% of a core on tansu (2.44 of 3 s, 1080p); at 2 it used 0.3 s and, on this 2-core
            # box, delivered 1080p went from 15.9-17.3 to 18.7-20.9 fps
            "max.in.flight.requests.per.connection": 2,
            # the client-side check only; each topic's own limit decides the fragment size
            "message.max.bytes": max(cfg.max_message_bytes or 0, 64 << 20) + 4096,
            "queue.buffering.max.kbytes": max(1024, cfg.max_in_flight_bytes // 1024),
            "queue.buffering.max.messages": 100_000,
            "error_cb": self._on_error,
            # one callback registered once, called for failures only: a callback per produce()
            # and a report per message cost more than the produce itself for small frames
            "on_delivery": self._delivered, "delivery.report.only.error": True,
        })
        pconf.update(cfg.producer_config)
        self.producer = Producer(pconf)
        # a metadata round trip makes the producer connect now and, when its producer-id
        # request has not yet been put off, get its id: then the first frames are not held
        # ~500 ms. It works only some of the time (benchmarks/kafka_probes.py, probe 2): when
        # librdkafka asked before the connection was up it retries on a 500 ms timer
        try:
            self.producer.list_topics(timeout=cfg.connect_timeout_s)
        except KafkaException as e:
            _raise_for(e, "the producer's metadata request", cfg)
        self._failures: List[Tuple[str, str]] = []
        self._produced = 0

    def _on_error(self, err: KafkaError) -> None:
        self._errors.append(err.str())
        if len(self._errors) > 100:
            del self._errors[:50]

    def ensure_topic(self, topic: str) -> None:
        """Create the topic on first use where the broker allows it; else an error naming it."""
        if topic in self._topics:
            if topic not in self._limits:
                self._limits[topic] = self._topic_limit(topic)
            return
        fut = self._admin.create_topics([NewTopic(topic, num_partitions=self.cfg.num_partitions,
                                                  replication_factor=1)])[topic]
        try:
            fut.result(self.cfg.connect_timeout_s)
        except KafkaException as e:
            err = e.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ConfigError(f"Kafka topic {topic!r} does not exist and could not be created: {err.str()}") from None
        except Exception as e:  # noqa: BLE001 - a timeout of the admin future
            raise BackendUnavailable(f"Kafka: creating topic {topic!r} failed: {e!r}") from None
        self._topics.add(topic)
        self._limits[topic] = self._topic_limit(topic)

    def _topic_limit(self, topic: str) -> int:
        """The size above which frames on ``topic`` are fragmented (fragment headers included)."""
        if self.cfg.max_message_bytes:
            return self.cfg.max_message_bytes - FRAG_SLACK
        limit = None
        try:
            res = ConfigResource("topic", topic)
            fut = self._admin.describe_configs([res], request_timeout=self.cfg.connect_timeout_s)[res]
            limit = limit_from_topic_config(fut.result(self.cfg.connect_timeout_s))
        except Exception as e:  # noqa: BLE001 - brokers that do not answer (tansu): the default
            log.debug("msight_fast: describe_configs of %r: %r", topic, e)
        if limit is None:
            limit = DEFAULT_MESSAGE_BYTES
        return limit - FRAG_SLACK

    # -- publish
    def max_message(self, topic: str) -> Optional[int]:
        self.ensure_topic(topic)
        return self._limits[topic]

    def send(self, msg: Outgoing, deadline: float) -> None:
        self.ensure_topic(msg.topic)
        # all fragments of a frame share its key, hence one partition; "publisher" keeps a
        # publisher's frames in order, "frame" spreads them for a consumer group to share
        k = msg.publisher_id if self.cfg.partition_key == "publisher" or not msg.frame_id else msg.frame_id
        # bytes (confluent-kafka takes no views): one copy, whole or in fragments
        self._produce(msg.topic, msg.messages(), k.to_bytes(8, "little") if k else None)

    def _produce(self, topic: str, msgs: list, key: Optional[bytes]) -> None:
        for m in msgs:
            while True:
                try:
                    self.producer.produce(topic, value=m, key=key)
                    break
                except BufferError:                               # bound reached: wait for room
                    self.producer.poll(0.05)
                except KafkaException as e:
                    raise PublishError(f"Kafka produce to {topic!r} failed: {e}", [(topic, str(e))]) from None
        self._produced += 1
        if self._produced % 64 == 0:
            self.producer.poll(0)                                 # serve error reports and callbacks

    def _delivered(self, err: Optional[KafkaError], msg: Any) -> None:
        if err is not None:
            self._failures.append((msg.topic() if msg is not None else "?", err.str()))

    def flush(self, timeout: Optional[float]) -> None:
        left = self.producer.flush(-1 if timeout is None else timeout)
        if left:
            raise PublishError(f"{left} Kafka messages undelivered after {timeout} s",
                               [("?", "timeout")] * left)
        if self._failures:
            failures, self._failures = self._failures, []
            raise PublishError(f"{len(failures)} Kafka deliveries failed: {failures[0][1]}", failures)

    def open(self, topic: str, group_id: Optional[str], from_beginning: bool) -> Source:
        self.ensure_topic(topic)
        return KafkaSource(self, topic, group_id, from_beginning)

    def close(self) -> None:
        try:
            self.producer.flush(5)
        except Exception:  # noqa: BLE001
            pass


class KafkaSource(Source):
    """A consumer run by a background poll thread, so the member stays live through rebalances
    whatever the application does; offsets follow the frames handed out.

    The thread hands messages over through a queue bounded in bytes; when it is full the thread
    pauses fetching (never drops: Kafka must not lose anything) and resumes below half.
    """

    ASSIGN_TIMEOUT_S = 60.0

    def __init__(self, t: KafkaTransport, topic: str, group_id: Optional[str], from_beginning: bool) -> None:
        self.t = t
        self.topic = topic
        self.from_beginning = from_beginning
        cfg = t.cfg
        conf = dict(t._base)
        conf.update({
            "group.id": group_id or f"msight_fast-{uuid.uuid4().hex}",
            "enable.auto.commit": True, "enable.auto.offset.store": False, "auto.commit.interval.ms": 1000,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            # tansu and small clusters: fast group joins, and no long-poll wait for latency
            "session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 10,
            "fetch.max.bytes": max(52428800, (cfg.max_message_bytes or 0) * 2),
            "max.partition.fetch.bytes": max(1048576, (cfg.max_message_bytes or 0) + 4096),
            "receive.message.max.bytes": max(100_000_000, (cfg.max_message_bytes or 0) * 2 + 4096),
            "queued.max.messages.kbytes": max(1024, cfg.max_pending_bytes // 1024 // 4),
            "error_cb": t._on_error,
        })
        conf.update(cfg.consumer_config)
        self.c = Consumer(conf)
        self._max_bytes = cfg.max_pending_bytes
        self._mutex = threading.Lock()                  # taken directly on per-message paths
        self._lock = threading.Condition(self._mutex)
        self._q: Deque[Tuple[list, int]] = collections.deque()   # fetched batches, bytes
        self._q_bytes = 0
        # the batch the application's thread is taking messages from, without the lock; a
        # rebalance bumps _gen and the taker drops what it holds of the revoked partitions
        self._local: list = []
        self._li = 0
        self._gen = self._local_gen = 0
        self._gone: Set[int] = set()
        self._since_store = 0
        self._paused = False
        self._assigned: Optional[List[int]] = None
        self._seen: Dict[int, Deque[int]] = {}          # partition -> offsets taken, in order
        self._done: Dict[int, Set[int]] = {}            # partition -> offsets whose frame is released
        self._handed: List[Tuple[int, int]] = []        # released at the next next() / ack()
        self._to_store: List[TopicPartition] = []      # for the poll thread to store
        self._commit_req: List[threading.Event] = []   # for the poll thread to commit
        self.redelivered = 0
        self._closed = False
        self.c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._run, name=f"msight_fast-kafka-{topic}", daemon=True)
        self._thread.start()
        with self._lock:                                # return only once partitions are ours
            ok = self._lock.wait_for(lambda: self._assigned is not None or self._closed, self.ASSIGN_TIMEOUT_S)
        if not ok:
            self.close()
            raise BackendUnavailable(f"Kafka: no partitions of {topic!r} assigned within {self.ASSIGN_TIMEOUT_S} s")

    def _run(self) -> None:
        # the only thread that touches the consumer: confluent-kafka calls made from two threads
        # at once were seen to deadlock (store_offsets against consume)
        c = self.c
        try:
            while not self._closed:
                self._serve_requests()
                # consume(n, t) waits out all of t unless n messages come (100 ms of latency
                # per idle frame, measured); poll() returns on the first message, and then
                # consume(n, 0) takes whatever else is already fetched, without waiting
                m = c.poll(0.1)
                self._take([m] + c.consume(255, 0) if m is not None else [])
        finally:
            self._serve_requests()
            try:
                c.close()                    # commits the stored offsets, leaves the group
            except Exception:  # noqa: BLE001
                pass

    def _serve_requests(self) -> None:
        with self._lock:
            store, self._to_store = self._to_store, []
            commits, self._commit_req = self._commit_req, []
        self._store(store)
        for ev in commits:
            try:
                self.c.commit(asynchronous=False)
            except KafkaException as e:
                if e.args[0].code() != KafkaError._NO_OFFSET:
                    ev.error = e
            ev.set()

    def _take(self, msgs: list) -> None:
        if not msgs and not self._paused:
            return
        # handed over a batch at a time: one lock round per consume() call, not per message
        nbytes = sum([len(m) for m in msgs if m.error() is None]) if msgs else 0
        with self._lock:
            if msgs:
                self._q.append((msgs, nbytes))
                self._q_bytes += nbytes
                self._lock.notify_all()
            over = self._q_bytes > self._max_bytes
            under = self._q_bytes < self._max_bytes // 2
            assignment = [TopicPartition(self.topic, p) for p in (self._assigned or [])]
        try:
            if over and not self._paused and assignment:
                self.c.pause(assignment)
                self._paused = True
            elif under and self._paused:
                if assignment:
                    self.c.resume(assignment)
                self._paused = False
        except KafkaException as e:
            log.debug("msight_fast: pause/resume: %s", e)

    def _on_assign(self, consumer: Any, parts: List[TopicPartition]) -> None:
        # Resolve where each partition starts now (frames published right after subscribe()
        # must not be missed) and commit that position for a partition the group has never
        # committed: otherwise a member that dies before its first auto-commit leaves the
        # group with no position, and its successor would start at "latest" and skip
        # everything the dead member had not finished.
        committed = consumer.committed(parts, timeout=10)
        fixed, anchor = [], []
        for tp in committed:
            if tp.offset < 0:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
                tp.offset = lo if self.from_beginning else hi
                anchor.append(TopicPartition(tp.topic, tp.partition, tp.offset))
            fixed.append(tp)
        consumer.assign(fixed)
        if anchor:
            try:
                consumer.commit(offsets=anchor, asynchronous=False)
            except KafkaException as e:
                log.warning("msight_fast: could not commit the starting offsets of %r: %s", self.topic, e)
        self._paused = False
        with self._lock:
            self._assigned = [tp.partition for tp in fixed]
            self._lock.notify_all()

    def _on_revoke(self, consumer: Any, parts: List[TopicPartition]) -> None:
        gone = {tp.partition for tp in parts}        # runs in the poll thread, inside consume()
        with self._lock:
            store = self._to_store + self._releasable()
            self._to_store = []
        self._store(store)
        with self._lock:
            # what was fetched but not handed out belongs to the partitions' next owner now
            keep: Deque[Tuple[list, int]] = collections.deque()
            for batch, _ in self._q:
                rest = [m for m in batch if m.partition() not in gone]
                if rest:
                    keep.append((rest, sum([len(m) for m in rest if m.error() is None])))
            self._q = keep
            self._q_bytes = sum(n for _, n in keep)
            self._gone |= gone
            self._gen += 1
            for p in gone:
                self._seen.pop(p, None)
                self._done.pop(p, None)
            self._assigned = [p for p in (self._assigned or []) if p not in gone]
        try:
            consumer.commit(asynchronous=False)
        except KafkaException:
            pass

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        while True:
            if self._local_gen != self._gen:
                with self._mutex:                       # a rebalance: drop what was revoked
                    gone, self._gone = self._gone, set()
                    self._local_gen = self._gen
                    self._local = [m for m in self._local[self._li:] if m.partition() not in gone]
                    self._li = 0
            if self._li < len(self._local):
                m = self._local[self._li]
                self._li += 1
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("msight_fast: Kafka consumer error on %r: %s", self.topic, err.str())
                    continue
                p, o = m.partition(), m.offset()
                with self._mutex:
                    seen = self._seen.setdefault(p, collections.deque())
                    if seen and o <= seen[-1]:
                        self.redelivered += 1
                    seen.append(o)
                    self._since_store += 1
                    if self._since_store >= 64:         # store released offsets now and then
                        self._since_store = 0
                        self._to_store.extend(self._releasable())
                return m.value(), (p, o)
            with self._lock:
                self._to_store.extend(self._releasable())   # the poll thread stores them
                self._since_store = 0
                if not self._q:
                    if self._closed or not self._lock.wait(timeout) or not self._q:
                        return None
                self._local, n = self._q.popleft()
                self._q_bytes -= n
                self._li = 0
                self._local_gen = self._gen

    def handed(self, frame: Any, tokens: list) -> None:
        with self._mutex:
            self._handed.extend(tokens)

    def _releasable(self) -> List[TopicPartition]:
        """Offsets to store: up to the first message whose frame has not been released yet.

        Called with the lock held; the caller stores them after letting go of it, because
        librdkafka may be running a rebalance callback that waits for this lock.
        """
        if not self._handed:
            return []
        for p, o in self._handed:
            self._done.setdefault(p, set()).add(o)
        self._handed.clear()
        store = []
        for p, done in self._done.items():
            seen = self._seen.get(p)
            last = None
            while seen and seen[0] in done:
                last = seen.popleft()
                done.discard(last)
            if last is not None:
                store.append(TopicPartition(self.topic, p, last + 1))
        return store

    def _store(self, store: List[TopicPartition]) -> None:
        if store:
            try:
                self.c.store_offsets(offsets=store)
            except KafkaException as e:      # partition revoked meanwhile: the next owner re-reads
                log.debug("msight_fast: store_offsets: %s", e)

    def ack(self) -> None:
        ev = threading.Event()
        ev.error = None  # type: ignore[attr-defined]
        with self._lock:
            self._to_store.extend(self._releasable())
            self._commit_req.append(ev)
        if not ev.wait(30):
            raise BackendUnavailable(f"Kafka: committing offsets of {self.topic!r} did not finish within 30 s")
        if ev.error is not None:  # type: ignore[attr-defined]
            raise ev.error  # type: ignore[attr-defined]

    def stats(self) -> dict:
        with self._lock:
            return {"redelivered": self.redelivered, "assigned_partitions": list(self._assigned or []),
                    "pending_bytes": self._q_bytes, "paused": self._paused, "dropped": 0}

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._to_store.extend(self._releasable())
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(30)            # the thread stores, commits and closes the consumer
