"""Kafka backend through confluent-kafka (librdkafka): persistence, at-least-once, consumer groups.

Producer: ``acks=all``, batched (``linger.ms``), never a flush per message; the bytes in flight
are bounded (``max_in_flight_bytes``) so latency cannot grow without bound: ``publish`` waits for
room, up to its deadline, then raises ``BackendUnavailable``. While the broker is away frames
queue in librdkafka up to that bound and go out when it is back. Delivery errors come back via
``flush`` and count in ``stats()["lost"]``. Not idempotent unless asked for (see
``_producer_config`` for why); a producer that librdkafka declares fatally failed is replaced on
the next publish, which raises ``PublishError``; what the dead one still held counts as lost.

Small frames (up to ``batch_max_frame_bytes``, 16 KiB) are batched: coalesced per topic into one
Kafka message, a batch container (docs/wire-format.md 2a), so that the cost Kafka has per message
(the client's, the broker's, the consumer's) is paid once per batch. Frames that differ only in
ids, times, lengths and CRCs share one header in it (2b, ``batch_shared_header``), so the broker
carries and stores 22-35 bytes of entry per 1 KB frame instead of a 128-byte or longer header. A batch goes out when it
reaches ``batch_max_bytes`` (or the topic's limit), ``batch_linger_ms`` after its first frame (the
linger thread), before a larger frame or raw message of its topic (order per publisher is kept),
and on ``flush`` and ``close``; a frame that finds its topic idle (nothing sent on it within the
linger) goes out at once, alone, so a sparse sensor waits for no linger. A batch whose delivery
fails counts each of its frames in ``lost``. Messages sent with ``send_bytes`` (the MSight
drop-in's plain mode) are never batched.

Frames above the topic's message limit (``max_message_bytes``, by default the topic's
``max.message.bytes`` as the broker reports it, else 1,000,000) are fragmented, straight from the
frame's parts; every fragment of a frame has the frame's key,
so all of them land on one partition, in order. The key is the publisher id by default (a
publisher's frames stay in order, as Kafka orders only within a partition) or, with
``partition_key="frame"``, the frame id (one publisher's frames spread over the partitions, so a
consumer group can share one camera; order then holds only per partition; a batch takes its
first frame's key, so batches, not single small frames, are spread).

Topics are created on first use with ``num_partitions`` and ``replication_factor`` (by default
-1, the broker's own default). A single broker that refuses -1 (older than KIP-464) gets 1; a
cluster that does is a ``ConfigError``, never a silent guess. A broker that implements no
CreateTopics creates topics itself on first use (its auto-creation), one without DescribeConfigs
gets the default message limit: each fallback logs one line.

Recovery: one watcher thread per transport serves the producer's callbacks (also while nobody
publishes), notices the broker going away (librdkafka's ``_TRANSPORT`` / ``_ALL_BROKERS_DOWN``),
probes it until it answers, and then creates again every topic this transport uses that the
broker no longer has (a broker that lost its state, as tansu with memory storage does on a
restart). ``stats()``: connected, disconnects, reconnects, lost, producer_recreated.

Consumer: ``group.id`` from ``group_id`` (without one, a private group: every subscriber gets
every frame). Offsets are stored only for messages whose frame has been handed to the
application and then released (the next ``recv`` or ``ack()``), never ahead of delivery, and are
committed every second and on ``ack()``: a member that dies loses nothing; the group re-delivers.
A fragmented frame's offsets are stored only once the whole frame was handed over; a batch's
offset once its last frame was, which the Subscription hands after all the others (it takes and
hands one message at a time, under its lock; a member that dies mid-batch gets the whole batch
again).
Kafka offsets, ``lag`` and the repeat counters count messages, so a batch is one. The poll
thread outlives every error; after a broker restart the group re-joins and a partition whose
committed offset the broker lost starts at the beginning of its (new) log. Loss and repeats in a
group are reported per member as ``lag``, ``redelivered``, ``replayed`` and ``offset_resets``
(see ``KafkaSource.stats``).

Where a subscription starts (``start``, the first time this member is assigned each partition; a
partition it gets back after a rebalance resumes from the group's committed offset):
``"end"`` and a live subscription's never-committed partitions start at the log's end as a
Fetch reports it (tansu 0.6 answers ListOffsets "latest" with the last record batch's base
offset + 1, which would replay the rest of that batch); an offset is clamped to the log; a time
is looked up with ListOffsets by timestamp, to the millisecond (Kafka's timestamps are ms: the
start is rounded up to one), and made exact on the client: messages older than it that the
broker's answer included (tansu resolves a time per batch, and answers 0 where no
message is that recent) are skipped, logged once and counted in ``KafkaSource.start_skipped``.

Threads: librdkafka's own, the watcher, the linger thread (from the first batch on), and one poll
thread per subscription. Copies: one to encode the frame (confluent-kafka needs ``bytes``), one
inside librdkafka on produce; on receipt one (``msg.value()``). A batched frame is copied once more
on each side: into its batch, and out of it into a ``bytes`` of its own (faster to hand on than a
view, and a frame kept does not pin its whole batch).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, NoReturn, Optional, Sequence, Set, Tuple, Union

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_STORED,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ..codec import (
    BATCH_MAGIC,
    MAX_BATCH_COUNT,
    BatchCursor,
    BatchWriter,
    Frame,
    RecvLane,
    SmallLane,
    batch_frames,
    batch_size,
    decode,
    fragment,
)
from ..errors import (
    AuthError,
    BackendUnavailable,
    ConfigError,
    FrameError,
    FrameTooLarge,
    MsightFastError,
    PublishError,
)
from .base import Capabilities, Outgoing, Source, Start, Transport

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

log = logging.getLogger("msight_fast")
FRAG_SLACK = 512                 # record-batch overhead kept free under the message limit
DEFAULT_MESSAGE_BYTES = 1_000_000   # Kafka's default max.message.bytes, when the broker won't say
STALE_DOWN_S = 2.0               # connect failures reported this soon after a recovery are the old outage's
STALL_S = 15.0                   # an idempotent producer with nothing leaving its queue this long is stuck
MAX_FAILURES_KEPT = 10_000       # delivery failures listed by flush (all of them are counted in lost)
MIN_FRAME = 128                  # the smallest encoded frame: a batch with less room left is full
SPARE_BATCHES = 4                # batch writers kept for reuse, each holding up to 2 x batch_max_bytes
BATCH_RETRY_S = 0.05             # the linger thread's wait for producer room, and between attempts
_DOWN = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)
_TOPIC_GONE = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)


def limit_from_topic_config(entries: Any) -> Optional[int]:
    """The topic's ``max.message.bytes`` from a DescribeConfigs answer (name -> entry with
    ``.value``), or None when it is absent or not a sane number."""
    entry = (entries or {}).get("max.message.bytes")
    raw: Any = getattr(entry, "value", None)           # None or junk: not a limit
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if 1024 <= value <= 1 << 31 else None
_AUTH_CODES = {"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
               "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED"}


def _client_config(cfg: Any) -> Dict[str, Any]:
    c: Dict[str, Any] = {"bootstrap.servers": ",".join(cfg.servers),
                         "logger": logging.getLogger("msight_fast.librdkafka"),
                         "socket.connection.setup.timeout.ms": int(cfg.connect_timeout_s * 1000),
                         "reconnect.backoff.max.ms": cfg.reconnect_backoff_max_ms}
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


def _raise_for(e: Exception, what: str, cfg: Any) -> NoReturn:
    err = _kafka_error(e)
    name = err.name() if err is not None else ""
    where = ", ".join(cfg.servers)
    if name in _AUTH_CODES or "auth" in str(e).lower():
        raise AuthError(f"Kafka at {where} refused {what}: {err.str() if err else e}") from None
    raise BackendUnavailable(f"Kafka at {where}: {what} failed within {cfg.connect_timeout_s} s: "
                             f"{err.str() if err else e}") from None


def _kafka_error(e: BaseException) -> Optional[KafkaError]:
    return e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None


def _ms_up(ns: int) -> int:
    """ns since the epoch as Kafka's ms timestamps, rounded up: the first message at or after
    ``ns`` is the first whose timestamp is at or after this."""
    return -(-ns // 1_000_000)


def _is_fatal(err: Optional[KafkaError]) -> TypeGuard[KafkaError]:
    return err is not None and (err.fatal() or err.code() == KafkaError._FATAL)


def _refuses_default_rf(err: KafkaError) -> bool:
    """The broker refused replication factor -1: librdkafka refuses it locally with
    ``_UNSUPPORTED_FEATURE`` when the broker's CreateTopics predates KIP-464 (v4), as it refuses a
    broker without CreateTopics at all with the same code; only its message tells the two apart."""
    code = err.code()
    if code in (KafkaError.INVALID_REPLICATION_FACTOR, KafkaError.INVALID_REQUEST):
        return True
    return code in (KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION) and \
        "replication" in err.str().lower()


def _not_implemented(err: KafkaError) -> bool:
    """The broker does not implement the request (librdkafka knows from its ApiVersions)."""
    return err.code() in (KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION) and \
        not _refuses_default_rf(err)


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _retire(producer: Producer) -> None:
    """Let go of a replaced producer in a thread of its own: the reports of messages purged late
    still count in ``lost``, and librdkafka's teardown may take a while, never a publish's."""
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(5)
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


def _consumer_config(cfg: Any, base: Dict[str, Any], group_id: str, error_cb: Any) -> Dict[str, Any]:
    """The librdkafka properties of a subscription's consumer; ``consumer_config`` comes last."""
    conf = dict(base)
    conf.update({
        "group.id": group_id,
        "enable.auto.commit": True, "enable.auto.offset.store": False,
        "auto.commit.interval.ms": cfg.auto_commit_interval_ms,
        # where a partition starts is decided in _on_assign; this applies only to a position
        # outside the log: past its end (a broker that lost the log) or before its start
        # (retention); either way the oldest frame still there is the next one to deliver
        "auto.offset.reset": "earliest",
        # the timings are options (KafkaConfig says why each default); consumer_config,
        # applied last, still overrides them
        "session.timeout.ms": cfg.session_timeout_ms, "heartbeat.interval.ms": cfg.heartbeat_interval_ms,
        "fetch.wait.max.ms": cfg.fetch_wait_max_ms,
        "fetch.max.bytes": max(52428800, (cfg.max_message_bytes or 0) * 2),
        "max.partition.fetch.bytes": max(1048576, (cfg.max_message_bytes or 0) + 4096),
        "receive.message.max.bytes": max(100_000_000, (cfg.max_message_bytes or 0) * 2 + 4096),
        "queued.max.messages.kbytes": max(1024, cfg.max_pending_bytes // 1024 // 4),
        "error_cb": error_cb,
    })
    conf.update(cfg.consumer_config)
    return conf


class _Batch(BatchWriter):
    """Frames waiting to go out as one message on ``topic`` (``part``: its partition, chosen here
    with ``partition_key="frame"``; -1: the key's), with its key and when it is due."""

    __slots__ = ("topic", "part", "key", "due")

    def __init__(self, topic: str, part: int, key: Optional[bytes], due: float, shared: bool) -> None:
        super().__init__()
        self.topic, self.part, self.key, self.due = topic, part, key, due
        self.shared = shared


def _frames_skipped(value: Any, max_bytes: int) -> int:
    """How many frames a message skipped unread holds: a batch's frames (checked, as it comes
    from the broker, rebuilding at most ``max_bytes`` of them), else 1."""
    if isinstance(value, bytes) and value[:4] == BATCH_MAGIC:
        try:
            return len(batch_frames(value, max_bytes=max_bytes))   # either layout
        except FrameError:
            pass
    return 1


def _frames_in(value: Any) -> int:
    """How many frames one produced message carried (a batch's count, unchecked: it is ours)."""
    if isinstance(value, bytes) and value[:4] == BATCH_MAGIC and len(value) >= 12:
        return int.from_bytes(value[8:12], "little")
    return 1


class KafkaTransport(Transport):
    name = "kafka"
    # send() looks the topic's limit up anyway: splitting there spares the Bus a call per frame
    FRAGMENTS_ITSELF = True
    CAPABILITIES = Capabilities(delivery="at_least_once", groups="consumer", persistence=True, max_message=None)
    capabilities = CAPABILITIES
    PROBE_INTERVAL_S = 0.5      # how often the watcher asks a broker that went away

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._where = ", ".join(cfg.servers)
        self._base = _client_config(cfg)
        self._errors: List[str] = []
        self._lock = threading.Lock()                   # counters, topic sets, the producer swap
        self._closed = threading.Event()
        self._connected = True
        self._disconnects = 0
        self._reconnects = 0
        self._down_since = 0.0
        self._probe_at = 0.0
        self._up_at = 0.0
        self._last_outage_s: Optional[float] = None
        self._lost = 0
        self._recreated = 0
        self._topics_recreated = 0
        self._state_lost = 0                            # recoveries that found our topics gone
        self._broken: Optional[str] = None              # why the producer must go before the next publish
        self._recheck: Set[str] = set()                 # topics the broker lost: the watcher creates them
        self._failures: List[Tuple[str, str]] = []
        self._gen = 0                                   # the producer's generation (callbacks of old ones)
        self._produced = 0                              # messages handed to this generation's producer
        self._moved = 0                                 # of them, how many had left its queue when last seen
        self._moved_at = time.monotonic()
        # batching of small frames (KafkaConfig says when a batch goes out); _blk guards _batches
        # and _last_out, produces every batch, and is what the linger thread waits on
        self._batch_frame = cfg.batch_max_frame_bytes if cfg.batch_max_bytes and cfg.batch_linger_ms else 0
        self._batch_max: int = cfg.batch_max_bytes
        self._by_publisher = cfg.partition_key == "publisher"
        # partition_key="frame" batches per partition, which send() picks: no shorter path there
        self.small_frame_bytes = self._batch_frame if self._by_publisher else 0
        # the largest frame add_small takes: one the Bus must refuse as too large goes the usual
        # way, where it is refused
        self._small_cap = min(self.small_frame_bytes, cfg.max_frame_bytes)
        self._last_key: Tuple[int, Optional[bytes]] = (0, None)
        self._linger_s = cfg.batch_linger_ms / 1000.0
        self._blk = threading.Condition()
        self._batches: Dict[Tuple[str, int], _Batch] = {}     # (topic, partition or -1) -> pending batch
        self._spare: List[_Batch] = []                  # batches gone out, kept for their buffers
        self.writers_reused = 0
        self._last_out: Dict[str, float] = {}          # topic -> when a message last went out on it
        self._linger: Optional[threading.Thread] = None
        self.batches_sent = 0                           # batch messages produced, and the frames in them
        self.frames_batched = 0
        aconf: Dict[str, Any] = dict(self._base)
        aconf["error_cb"] = self._on_admin_error
        # only asked for one topic's metadata on a broker without CreateTopics (_auto_create_topic)
        aconf["allow.auto.create.topics"] = True
        self._admin = AdminClient(aconf)
        try:
            md = self._admin.list_topics(timeout=cfg.connect_timeout_s)
        except KafkaException as e:
            _raise_for(e, "the metadata request", cfg)
        if self._errors and any("auth" in x.lower() for x in self._errors):
            raise AuthError(f"Kafka at {', '.join(cfg.servers)} refused the credentials: {self._errors[-1]}")
        self._topics: Set[str] = set(md.topics)        # topics the broker has, as far as we know
        self._nparts: Dict[str, int] = {}               # partition_key="frame": topic -> partitions (0: unknown)
        self._used: Set[str] = set()                    # topics this transport publishes or reads
        self._limits: Dict[str, int] = {}               # topic -> largest message we send
        self._replication = cfg.replication_factor      # 1 once a single broker refused -1
        self._auto_create = False                       # the broker implements no CreateTopics
        self._describe = True                           # False: it implements no DescribeConfigs
        self._limit_logged = False
        self._pconf = self._producer_config(cfg)
        self._idempotent = _truthy(self._pconf.get("enable.idempotence", False))
        self.producer = self._new_producer()
        # a metadata round trip makes the producer connect now and, if it is idempotent and its
        # producer-id request has not yet been put off, get its id: then the first frames are
        # not held ~500 ms. It works only some of the time (benchmarks/kafka_probes.py, probe 2):
        # when librdkafka asked before the connection was up it retries on a 500 ms timer
        try:
            self.producer.list_topics(timeout=cfg.connect_timeout_s)
        except KafkaException as e:
            _raise_for(e, "the producer's metadata request", cfg)
        self._watcher = threading.Thread(target=self._watch, name="msight_fast-kafka-watch", daemon=True)
        self._watcher.start()

    def _producer_config(self, cfg: Any) -> Dict[str, Any]:
        pconf = dict(self._base)
        pconf.update({
            # Not idempotent by default. A broker that loses its producer state (tansu with
            # memory storage after a restart; measured) leaves librdkafka's idempotent producer
            # either bumping its epoch forever on UNKNOWN_PRODUCER_ID (nothing delivered until
            # message.timeout.ms) or fatally failed, and every frame it held is lost; without
            # idempotence every frame queued across the same restart was delivered. The price:
            # a batch retried after a fault may be written twice or after the batch behind it;
            # subscribers count duplicates, tolerate reordering, and reassemble fragments in any
            # order. producer_config={"enable.idempotence": True} opts in: a fatal failure then
            # replaces the producer, as does a recovery that finds the broker's state gone.
            "enable.idempotence": False, "acks": "all", "linger.ms": cfg.linger_ms,
            # at idempotence's maximum of 5 requests in flight librdkafka's broker thread spun at
            # ~80% of a core on tansu (2.44 of 3 s, 1080p); at 2 it used 0.3 s and, on this 2-core
            # box, delivered 1080p went from 15.9-17.3 to 18.7-20.9 fps
            "max.in.flight.requests.per.connection": 2,
            # the client-side check only; each topic's own limit decides the fragment size
            "message.max.bytes": max(cfg.max_message_bytes or 0, 64 << 20) + 4096,
            "queue.buffering.max.kbytes": max(1024, cfg.max_in_flight_bytes // 1024),
            "queue.buffering.max.messages": 100_000,
            # topics are created here, with num_partitions; a broker's auto-creation (after it
            # lost them) would pick its own partition count
            "allow.auto.create.topics": False,
            # one callback registered once, called for failures only: a callback per produce()
            # and a report per message cost more than the produce itself for small frames
            "delivery.report.only.error": True,
        })
        pconf.update(cfg.producer_config)
        return pconf

    def _new_producer(self) -> Producer:
        gen = self._gen
        conf = dict(self._pconf)
        conf["on_delivery"] = lambda err, msg: self._delivered(gen, err, msg)
        conf["error_cb"] = lambda err: self._on_producer_error(gen, err)
        return Producer(conf)

    # -- errors and recovery
    def _remember(self, text: str) -> None:
        self._errors.append(text)
        if len(self._errors) > 100:
            del self._errors[:50]

    def _on_admin_error(self, err: KafkaError) -> None:
        self._remember(err.str())
        if err.code() in _DOWN:
            self.mark_down(err.str(), err.code())

    def _on_producer_error(self, gen: int, err: KafkaError) -> None:
        self._remember(err.str())
        if _is_fatal(err):
            with self._lock:
                if gen == self._gen and self._broken is None:
                    self._broken = f"fatal error: {err.str()}"
        elif err.code() in _DOWN:
            self.mark_down(err.str(), err.code())

    def mark_down(self, reason: str, code: int = KafkaError._ALL_BROKERS_DOWN) -> None:
        """librdkafka reported the broker unreachable: count it, and let the watcher probe."""
        now = time.monotonic()
        with self._lock:
            if not self._connected or self._closed.is_set() or now - self._up_at < STALE_DOWN_S:
                return
            self._connected = False
            self._disconnects += 1
            self._down_since = now
            self._probe_at = now + self.PROBE_INTERVAL_S
        log.warning("msight_fast: Kafka at %s unreachable (%s); reconnecting", self._where, reason)

    def topic_missing(self, topic: str) -> None:
        """The broker said ``topic`` does not exist (any more): the watcher creates it again."""
        with self._lock:
            if topic in self._used and topic not in self._recheck:
                self._recheck.add(topic)
                self._topics.discard(topic)

    def _watch(self) -> None:
        next_create = 0.0
        while not self._closed.is_set():
            p = self.producer
            try:
                p.poll(0.2)          # error_cb and delivery reports, also when nobody publishes
            except KafkaException as e:
                err = _kafka_error(e)
                if _is_fatal(err):
                    self._condemn(p, f"fatal error: {err.str()}")
                self._closed.wait(0.2)       # a failed producer raises at once: no spinning
            except Exception as e:  # noqa: BLE001 - the watcher must outlive anything
                log.debug("msight_fast: Kafka producer poll: %r", e)
                self._closed.wait(0.2)
            del p                            # a replaced producer is not kept alive here
            # apart from the poll: a producer that raises on every poll must not stop the probes
            try:
                now = time.monotonic()
                if self._idempotent:
                    self._check_progress(now)
                if not self._connected and now >= self._probe_at:
                    self._probe_at = now + self.PROBE_INTERVAL_S
                    self._probe()
                if self._recheck and self._connected and now >= next_create:
                    next_create = now + 1.0
                    self._create_again()
            except Exception as e:  # noqa: BLE001 - without the watcher the link would stay "down" for good
                log.warning("msight_fast: Kafka watcher of %s: %r", self._where, e)
                self._closed.wait(0.2)

    def _condemn(self, p: Producer, why: str) -> None:
        """Have ``p`` replaced before the next publish, unless it already was: a late error of
        a retired producer must not condemn (and purge) its successor."""
        with self._lock:
            if p is self.producer and self._broken is None:
                self._broken = why

    def _check_progress(self, now: float) -> None:
        """An idempotent producer that the broker's lost state sent into librdkafka's epoch-bump
        loop (UNKNOWN_PRODUCER_ID again and again, measured on tansu) reports nothing: it only
        stops delivering. Nothing leaving its queue for STALL_S while the broker answers marks it
        for replacement. (Non-idempotent producers are never stuck that way.)"""
        p = self.producer
        try:
            queued = len(p)
        except Exception:  # noqa: BLE001
            return
        moved = self._produced - queued
        if queued <= 0 or moved > self._moved or not self._connected:
            self._moved, self._moved_at = moved, now
        elif now - self._moved_at > STALL_S:
            self._condemn(p, f"nothing delivered for {STALL_S:.0f} s with {queued} messages queued (did the broker "
                             "lose the producer's state?)")

    def _probe(self) -> None:
        """Ask the broker for metadata; when it answers, the outage is over: note which of our
        topics it no longer has (it lost its state) and create them again."""
        try:
            md = self._admin.list_topics(timeout=1.0)
        except Exception:  # noqa: BLE001 - still away; the next probe tries again
            return
        now = time.monotonic()
        with self._lock:
            gone = {t for t in self._used if t not in md.topics}
            self._topics = set(md.topics)
            self._recheck |= gone
            if gone:
                self._state_lost += 1
                if self._idempotent and self._broken is None:
                    # librdkafka's idempotent producer would retry into UNKNOWN_PRODUCER_ID forever
                    self._broken = "the broker lost its state (our topics were gone after the outage)"
            recovered = not self._connected
            self._connected = True
            self._up_at = now
            if recovered:
                self._reconnects += 1
                self._last_outage_s = now - self._down_since
        if recovered:
            log.warning("msight_fast: Kafka at %s reachable again after %.1f s%s", self._where, self._last_outage_s,
                        f"; creating lost topics {sorted(gone)}" if gone else "")
        if gone:
            self._create_again()

    def _create_again(self) -> None:
        with self._lock:
            todo = sorted(self._recheck)
        for topic in todo:
            try:
                self._create(topic)
            except MsightFastError as e:
                log.debug("msight_fast: creating %r again: %s", topic, e)
                continue
            with self._lock:
                self._recheck.discard(topic)
                self._topics.add(topic)
                self._topics_recreated += 1

    # -- topics
    def ensure_topic(self, topic: str) -> None:
        """Create the topic on first use where the broker allows it; else an error naming it.

        A topic that later disappears (the broker lost it) is not created here but by the
        watcher, so that a publish never waits on it while the broker is away."""
        if topic in self._limits:
            return
        if topic not in self._topics:
            self._create(topic)
        with self._lock:
            self._topics.add(topic)
            self._used.add(topic)
        if self._batch_frame and not self._by_publisher:
            self._nparts[topic] = self._partition_count(topic)
        self._limits[topic] = self._topic_limit(topic)

    def _partition_count(self, topic: str) -> int:
        """How many partitions ``topic`` has (0 when the broker does not say: no batching there)."""
        try:
            tm = self._admin.list_topics(topic=topic, timeout=self.cfg.connect_timeout_s).topics.get(topic)
        except KafkaException as e:
            log.debug("msight_fast: the partitions of %r: %s", topic, e)
            return 0
        return len(tm.partitions) if tm is not None and tm.error is None and tm.partitions else 0

    def _create(self, topic: str) -> None:
        """Create ``topic`` with ``num_partitions`` and ``replication_factor``, or have the broker
        auto-create it when it implements no CreateTopics; a ``ConfigError`` when neither works."""
        if self._auto_create:
            self._auto_create_topic(topic)
            return
        rf = self._replication
        err = self._create_topic(topic, rf)
        if err is not None and rf == -1 and _refuses_default_rf(err):
            # a broker older than KIP-464: with one broker 1 is all the replication there can
            # be; on a cluster a guess could lose data (or fail acks=all), so the user decides
            n = self._broker_count()
            if n != 1:
                raise ConfigError(
                    f"Kafka at {self._where} ({n} brokers) refused to create topic {topic!r} with its default "
                    f"replication factor: {err.str()}; set MSIGHT_KAFKA_REPLICATION_FACTOR (or replication_factor=, "
                    "e.g. 3) or create the topic beforehand")
            refused, err = err, self._create_topic(topic, 1)
            if err is None:
                self._replication = 1
                log.warning("msight_fast: Kafka at %s refused replication_factor=-1 (%s); it has one broker, so "
                            "topics are created with replication factor 1", self._where, refused.str())
        if err is None:
            return
        if _not_implemented(err):
            self._auto_create = True
            log.warning("msight_fast: Kafka at %s does not implement CreateTopics (%s); topics are created by the "
                        "broker's auto-creation on first use, with its default partitions and replication",
                        self._where, err.str())
            self._auto_create_topic(topic)
            return
        raise ConfigError(f"Kafka topic {topic!r} does not exist and could not be created: {err.str()}")

    def _create_topic(self, topic: str, rf: int) -> Optional[KafkaError]:
        """One CreateTopics request: None when the topic exists now, else the broker's error."""
        new = NewTopic(topic, num_partitions=self.cfg.num_partitions, replication_factor=rf)
        try:
            self._admin.create_topics([new], request_timeout=self.cfg.connect_timeout_s)[topic].result(
                self.cfg.connect_timeout_s)
        except KafkaException as e:
            err = _kafka_error(e)
            if err is None:
                raise BackendUnavailable(f"Kafka: creating topic {topic!r} failed: {e}") from None
            return None if err.code() == KafkaError.TOPIC_ALREADY_EXISTS else err
        except Exception as e:  # noqa: BLE001 - a timeout of the admin future
            raise BackendUnavailable(f"Kafka: creating topic {topic!r} failed: {e!r}") from None
        return None

    def _broker_count(self) -> int:
        try:
            md = self._admin.list_topics(timeout=self.cfg.connect_timeout_s)
        except KafkaException as e:
            _raise_for(e, "the metadata request", self.cfg)
        return len(md.brokers)

    def _auto_create_topic(self, topic: str) -> None:
        """Ask for the topic's metadata with auto-creation allowed until it has partitions (a
        Kafka broker first answers LEADER_NOT_AVAILABLE while it creates the topic)."""
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while True:
            try:
                md = self._admin.list_topics(topic=topic, timeout=max(0.1, deadline - time.monotonic()))
                tm = md.topics.get(topic)
                if tm is not None and tm.error is None and tm.partitions:
                    return
                unknown = tm is None or (tm.error is not None and tm.error.code() in _TOPIC_GONE)
                why = "no such topic" if tm is None else tm.error.str() if tm.error is not None else "no partitions"
            except KafkaException as e:
                err = _kafka_error(e)
                unknown, why = False, err.str() if err is not None else str(e)
            if time.monotonic() >= deadline or self._closed.is_set():
                break
            self._closed.wait(0.1)                  # the broker creates it meanwhile
        if unknown:
            raise ConfigError(f"Kafka topic {topic!r} does not exist: the broker at {self._where} implements no "
                              f"CreateTopics and did not create it on first use ({why}); create it beforehand or "
                              "enable the broker's auto-creation (auto.create.topics.enable)")
        raise BackendUnavailable(f"Kafka at {self._where}: topic {topic!r} was not auto-created within "
                                 f"{self.cfg.connect_timeout_s} s: {why}")

    def _topic_limit(self, topic: str) -> int:
        """The size above which frames on ``topic`` are fragmented (fragment headers included)."""
        if self.cfg.max_message_bytes:
            configured: int = self.cfg.max_message_bytes
            return configured - FRAG_SLACK
        limit = None
        level, why = logging.INFO, "its DescribeConfigs answer has no max.message.bytes"   # tansu's answer is empty
        if self._describe:
            try:
                res = ConfigResource("topic", topic)
                fut = self._admin.describe_configs([res], request_timeout=self.cfg.connect_timeout_s)[res]
                limit = limit_from_topic_config(fut.result(self.cfg.connect_timeout_s))
            except KafkaException as e:
                err = _kafka_error(e)
                level, why = logging.WARNING, f"DescribeConfigs failed: {err.str() if err is not None else e}"
                if err is not None and _not_implemented(err):
                    self._describe = False          # no use asking again
            except Exception as e:  # noqa: BLE001 - a timeout of the admin future
                level, why = logging.WARNING, f"DescribeConfigs failed: {e!r}"
        if limit is None:
            limit = DEFAULT_MESSAGE_BYTES
            if not self._limit_logged:              # one line per transport, not per topic
                self._limit_logged = True
                log.log(level, "msight_fast: Kafka at %s did not tell the max.message.bytes of topic %r (%s); "
                        "frames above %d bytes are fragmented (set max_message_bytes for another limit)",
                        self._where, topic, why, limit)
        return limit - FRAG_SLACK

    # -- publish
    def max_message(self, topic: str) -> Optional[int]:
        limit = self._limits.get(topic)          # known: the common case, a dict lookup per frame
        if limit is None:
            self.ensure_topic(topic)
            limit = self._limits[topic]
        return limit

    def send(self, msg: Outgoing, deadline: float) -> None:
        if self._broken is not None:
            self._replace_producer(msg.topic)
        limit = self._limits.get(msg.topic)     # known: the common case, a dict lookup per frame
        if limit is None:
            self.ensure_topic(msg.topic)
            limit = self._limits[msg.topic]
        if msg.nbytes > limit and msg.fragments is None:
            msg.fragments = fragment(msg.parts, limit)     # one copy, straight from the parts
        # all fragments of a frame share its key, hence one partition; "publisher" keeps a
        # publisher's frames in order, "frame" spreads them for a consumer group to share
        k = msg.publisher_id if self._by_publisher or not msg.frame_id else msg.frame_id
        last = self._last_key                  # with partition_key="publisher", the same for every frame
        if last[0] == k:
            key = last[1]
        else:
            key = k.to_bytes(8, "little") if k else None
            self._last_key = (k, key)
        if msg.nbytes <= self._batch_frame and msg.fragments is None:
            if self._by_publisher:
                self._batch(msg.topic, msg.parts, msg.nbytes, key, -1, deadline, limit)
                return
            n = self._nparts.get(msg.topic, 0)
            if n and msg.frame_id:
                # a batch per partition, each frame in the one its id picks: the frames spread over
                # the partitions as they would alone
                self._batch(msg.topic, msg.parts, msg.nbytes, key, msg.frame_id % n, deadline, limit)
                return
        self._send_plain(msg, key, deadline)

    def send_small(self, topic: str, parts: Sequence[Any], nbytes: int, publisher_id: int, frame_id: int,
                   deadline: float) -> None:
        # send() for a frame that goes into a batch, without the Outgoing that send() takes: a
        # small frame's whole publish is a few µs, and making that object and the extra call were
        # a visible part of it (benchmarks/README.md, "Kafka small frames: a shorter publish")
        limit = self._limits.get(topic)
        # (small_frame_bytes is 0 with partition_key="frame": the key here is always the publisher's)
        if limit is None or nbytes > limit or self._broken is not None:
            # a topic not yet known, a frame the topic's limit splits, a producer to replace
            self.send(Outgoing(topic, publisher_id, frame_id, nbytes, parts), deadline)
            return
        last = self._last_key
        if last[0] == publisher_id:
            key = last[1]
        else:
            key = publisher_id.to_bytes(8, "little") if publisher_id else None
            self._last_key = (publisher_id, key)
        self._batch(topic, parts, nbytes, key, -1, deadline, limit)

    def add_small(self, topic: str, frame: Frame, seq: int, publisher_id: int, checksum: bool,
                  deadline: float) -> bool:
        """The Bus's shortest path for a small frame: stamped and encoded straight into the
        topic's open batch, in one call (``BatchWriter.stamp_add``). False, with nothing sent (the
        frame may be stamped): the frame is not for it (too large, no open batch, a new key or
        topic, a producer to replace), and goes the usual way, which starts the next batch. The
        lock is taken before the frame's size is known: that costs the frame that overflows a
        batch a second encode, once per batch, and spares every other frame a step
        (benchmarks/README.md, "Kafka small frames: stamped into the batch")."""
        limit = self._limits.get(topic)
        last = self._last_key
        if limit is None or last[0] != publisher_id or self._broken is not None:
            return False
        blk = self._blk
        if not blk.acquire(False) and not blk.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(f"Kafka at {self._where}: the batch of {topic!r} was busy going out for "
                                     f"publish_timeout_s={self.cfg.publish_timeout_s} s")
        try:
            b = self._batches.get((topic, -1))
            if b is None or b.key != last[1]:
                return False
            if self._batch_max < limit:
                limit = self._batch_max
            size = b.stamp_add(frame, seq, publisher_id, checksum, self._small_cap, limit)
            if not size:
                return False
            if size + MIN_FRAME > limit or b.count >= MAX_BATCH_COUNT:
                try:                                   # full: out now
                    self._send_batch(b, deadline)
                except BackendUnavailable:
                    pass                               # the frame is in; the batch goes once there is room
            return True
        finally:
            blk.release()

    def small_lane(self, bus: Any) -> Optional[Callable[[str, Any, Dict[str, Any]], Union[Frame, Tuple[Frame], None]]]:
        """``add_small``'s rules, and the Bus's steps before it, in one compiled call per frame
        (``codec.SmallLane``), where the core is built and small frames are batched per publisher
        (benchmarks/README.md, "Kafka small frames: publish and receive in one compiled call")."""
        if SmallLane is None or not self.small_frame_bytes:
            return None
        return SmallLane(bus, self, limits=self._limits, batches=self._batches, blk=self._blk,
                         send=self._send_batch, cap=self._small_cap, batch_max=self._batch_max, min_frame=MIN_FRAME)

    def send_bytes(self, topic: str, data: bytes, deadline: float, key: int = 0) -> None:
        """The caller's bytes as one message, never batched (a subscriber of the MSight drop-in
        reads them as they are)."""
        if self._broken is not None:
            self._replace_producer(topic)
        self.ensure_topic(topic)
        limit = self._limits[topic]
        if len(data) > limit:
            raise FrameTooLarge(f"{len(data)} bytes on {topic!r} exceed the broker's message limit {limit}; "
                                "use framed mode to have them fragmented")
        self._send_plain(Outgoing(topic, key, 0, len(data), parts=[data]), key.to_bytes(8, "little") if key else None,
                         deadline)

    def _send_plain(self, msg: Outgoing, key: Optional[bytes], deadline: float) -> None:
        """One message per frame (or fragment), after what is batched for the topic: order kept."""
        if self._batches:
            self._flush_topic(msg.topic, deadline)
        # bytes (confluent-kafka takes no views): one copy, whole or in fragments
        self._produce(msg.topic, msg.messages(), key, deadline)
        if self._batch_frame:
            self._last_out[msg.topic] = time.monotonic()

    # -- batches of small frames
    def _batch(self, topic: str, parts: Sequence[Any], nbytes: int, key: Optional[bytes], part: int,
               deadline: float, limit: int) -> None:
        """Add a small frame (``parts``, ``nbytes`` in all) to its topic's batch (of ``part``: see
        _Batch; ``limit``: the topic's message limit). The batch goes out when full (here), when
        its linger passes (the linger thread), before a larger frame, on flush() and close()."""
        slot = (topic, part)
        limit = self._batch_max if self._batch_max < limit else limit
        blk = self._blk
        if not blk.acquire(False) and not blk.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(f"Kafka at {self._where}: the batch of {topic!r} was busy going out for "
                                     f"publish_timeout_s={self.cfg.publish_timeout_s} s")
        try:
            b = self._batches.get(slot)
            # with "frame" keys the partition is chosen here: the key is then only the first frame's
            if b is not None and ((b.key != key and part < 0) or b.size_with(nbytes) > limit):
                self._send_batch(b, deadline)          # raises: this frame is refused, the batch stays
                b = None
            if b is None:
                now = time.monotonic()
                if now - self._last_out.get(topic, -1e9) >= self._linger_s or batch_size([nbytes]) > limit:
                    # an idle topic: nothing to wait for, so no linger (a sparse sensor's latency stays
                    # Kafka's own); or a frame no batch under the limit can hold
                    self._produce(topic, [b"".join(parts)], key, deadline)
                    self._last_out[topic] = now
                    return
                if self._spare:                # a writer already grown to a batch's size
                    b = self._spare.pop()
                    self.writers_reused += 1
                    b.topic, b.part, b.key, b.due = topic, part, key, now + self._linger_s
                else:
                    b = _Batch(topic, part, key, now + self._linger_s, self.cfg.batch_shared_header)
                self._batches[slot] = b
                if self._linger is None:
                    self._linger = threading.Thread(target=self._linger_loop, name="msight_fast-kafka-linger",
                                                    daemon=True)
                    self._linger.start()
                blk.notify()
            try:
                size = b.add(parts)
            except ValueError:                         # not a frame (an Outgoing made by hand): alone
                if not b.count:
                    del self._batches[slot]
                self._send_plain(Outgoing(topic, 0, 0, nbytes, parts), key, deadline)   # topic and bytes: all it reads
                return
            if size + MIN_FRAME > limit or b.count >= MAX_BATCH_COUNT:
                try:                                   # full: out now
                    self._send_batch(b, deadline)
                except BackendUnavailable:
                    pass                               # the frame is in; the batch goes once there is room
        finally:
            blk.release()

    def _send_batch(self, b: _Batch, deadline: float) -> None:
        """Produce ``b`` (a lone frame as a plain message), with ``_blk`` held. BackendUnavailable:
        no room by ``deadline``, ``b`` stays pending; PublishError: ``b`` is dropped, its frames
        counted as lost."""
        topic = b.topic
        value = b.first() if b.count == 1 else b.pack()
        try:
            self._produce(topic, [value], b.key, deadline, b.part)
        except PublishError as e:
            del self._batches[(topic, b.part)]
            with self._lock:
                self._lost += b.count
                room = MAX_FAILURES_KEPT - len(self._failures)
                self._failures.extend([(topic, str(e))] * min(room, b.count))
            log.warning("msight_fast: a batch of %d frames on %r could not be produced; counted as lost: %s",
                        b.count, topic, e)
            self._reuse(b)                     # last: it empties the batch, whose count was needed above
            raise
        del self._batches[(topic, b.part)]
        self._last_out[topic] = time.monotonic()
        if b.count > 1:
            self.batches_sent += 1
            self.frames_batched += b.count
        self._reuse(b)

    def _reuse(self, b: _Batch) -> None:
        """Keep a batch that went out (or was dropped) for the next one, with ``_blk`` held: a
        fresh writer grows its buffer frame by frame, at times on fresh pages (benchmarks/README.md,
        "Kafka small frames: batch writers reused"); a kept one has the room already."""
        if len(self._spare) < SPARE_BATCHES:
            b.clear()                          # the twin's writer lets go of its frames here
            self._spare.append(b)

    def _flush_topic(self, topic: str, deadline: float) -> None:
        """Produce ``topic``'s pending batches now (before a larger frame or raw message of it)."""
        if not self._blk.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(f"Kafka at {self._where}: the batch of {topic!r} was busy going out for "
                                     f"publish_timeout_s={self.cfg.publish_timeout_s} s")
        try:
            for b in [b for b in self._batches.values() if b.topic == topic]:
                self._send_batch(b, deadline)
        finally:
            self._blk.release()

    def _linger_loop(self) -> None:
        """Produce each batch once its linger has passed; a batch the producer has no room for
        is tried again every BATCH_RETRY_S, its frames waiting in it (none is dropped for want of room)."""
        with self._blk:
            while not self._closed.is_set():
                now = time.monotonic()
                wait = 1.0
                for b in list(self._batches.values()):
                    if b.due > now:
                        wait = min(wait, b.due - now)
                        continue
                    try:
                        self._send_batch(b, now + BATCH_RETRY_S)
                    except BackendUnavailable:
                        b.due = time.monotonic() + BATCH_RETRY_S
                        wait = min(wait, BATCH_RETRY_S)
                    except PublishError:
                        pass                           # counted in lost; flush() reports it
                    except Exception as e:  # noqa: BLE001 - the thread must outlive anything
                        log.warning("msight_fast: Kafka batch of %r: %r", b.topic, e)
                        b.due = time.monotonic() + BATCH_RETRY_S
                        wait = min(wait, BATCH_RETRY_S)
                self._blk.wait(wait)

    def _drain(self, end: Optional[float]) -> int:
        """Produce every pending batch, waiting for producer room until ``end`` (None: for as
        long as it takes, or until close); returns the frames still pending."""
        while True:
            step = time.monotonic() + 0.5 if end is None else end
            left = 0
            if self._blk.acquire(timeout=max(0.0, step - time.monotonic())):
                try:
                    for b in list(self._batches.values()):
                        try:
                            self._send_batch(b, step)
                        except BackendUnavailable:
                            break
                        except PublishError:
                            pass                       # counted in lost; flush() reports it
                    left = sum(b.count for b in self._batches.values())
                finally:
                    self._blk.release()
            else:
                left = sum(b.count for b in list(self._batches.values()))
            if not left or (end is not None and time.monotonic() >= end) or (end is None and self._closed.is_set()):
                return left

    def _produce(self, topic: str, msgs: List[bytes], key: Optional[bytes], deadline: float,
                 partition: int = -1) -> None:
        p = self.producer
        for m in msgs:
            while True:
                try:
                    p.produce(topic, value=m, key=key, partition=partition)   # -1: the key's partition
                    self._produced += 1
                    break
                except BufferError:                               # bound reached: wait for room
                    left = deadline - time.monotonic()
                    if left <= 0:
                        away = "" if self._connected else "; the broker is unreachable"
                        raise BackendUnavailable(
                            f"Kafka at {self._where}: no room in the producer queue (max_in_flight_bytes="
                            f"{self.cfg.max_in_flight_bytes}) within publish_timeout_s={self.cfg.publish_timeout_s} s"
                            f"{away}") from None
                    try:
                        p.poll(min(0.05, left))
                    except KafkaException as e:
                        err = _kafka_error(e)
                        if _is_fatal(err):
                            self._condemn(p, f"fatal error: {err.str()}")
                    if self._broken is not None:
                        self._replace_producer(topic)
                    p = self.producer
                except KafkaException as e:
                    err = _kafka_error(e)
                    text = err.str() if err is not None else str(e)
                    if _is_fatal(err):
                        self._condemn(p, f"fatal error: {self._fatal_cause(p) or text}")
                    self._replace_producer(topic)
                    if err is not None and err.code() in _TOPIC_GONE:
                        self.topic_missing(topic)
                    raise PublishError(f"Kafka produce to {topic!r} failed: {text}", [(topic, text)]) from None

    @staticmethod
    def _fatal_cause(p: Producer) -> Optional[str]:
        """produce() says only "Local: Fatal error"; poll() raises the error behind it."""
        try:
            p.poll(0)
        except KafkaException as e:
            err = _kafka_error(e)
            return err.str() if err is not None else str(e)
        except Exception:  # noqa: BLE001
            pass
        return None

    def _replace_producer(self, topic: str) -> None:
        """Swap in a new producer for one librdkafka gave up on and raise PublishError; returns
        quietly when another thread (a flush) has just done it."""
        with self._lock:
            if self._broken is None:
                return
            reason, self._broken = self._broken, None
            old = self.producer
            self._gen += 1
            self.producer = self._new_producer()
            self._produced = self._moved = 0
            self._moved_at = time.monotonic()
            self._recreated += 1
            lost_before = self._lost
        # the old one's messages come back as failed delivery reports (counted in lost): purge,
        # then serve them for a bounded moment; librdkafka's teardown goes to a thread
        try:
            old.purge(in_queue=True, in_flight=True, blocking=False)
            old.flush(1.0)
        except Exception:  # noqa: BLE001 - a failed producer may refuse even that
            pass
        with self._lock:
            lost = self._lost - lost_before
        threading.Thread(target=_retire, args=(old,), name="msight_fast-kafka-retire", daemon=True).start()
        del old
        log.warning("msight_fast: Kafka producer replaced (%s); %d queued messages lost", reason, lost)
        raise PublishError(f"Kafka producer at {self._where} failed ({reason}); a new producer takes the next "
                           f"publish; {lost} messages it still held were lost", [(topic, reason)])

    def _delivered(self, gen: int, err: Optional[KafkaError], msg: Any) -> None:
        if err is None:
            return
        topic = msg.topic() if msg is not None else "?"
        n = _frames_in(msg.value()) if msg is not None else 1     # a batch's every frame is lost
        with self._lock:
            self._lost += n
            if gen == self._gen and len(self._failures) < MAX_FAILURES_KEPT:
                self._failures.extend([(topic, err.str())] * min(n, MAX_FAILURES_KEPT - len(self._failures)))
        if err.code() in _TOPIC_GONE:
            self.topic_missing(topic)

    def flush(self, timeout: Optional[float]) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        pending = self._drain(end) if self._batches else 0
        left = 0
        while True:
            p = self.producer
            step = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
            try:
                left = p.flush(step)
            except KafkaException as e:
                err = _kafka_error(e)
                if _is_fatal(err):
                    self._condemn(p, f"fatal error: {err.str()}")
                left = len(p)
            if self._broken is not None:
                self._replace_producer("*")
            if not left or (end is not None and time.monotonic() >= end):
                break
        if left or pending:
            what = f"{left} Kafka messages" + (f" and {pending} batched frames" if pending else "")
            raise PublishError(f"{what} undelivered after {timeout} s", [("?", "timeout")] * (left + pending))
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise PublishError(f"{len(failures)} Kafka deliveries failed: {failures[0][1]}", failures)

    def open(self, topic: str, group_id: Optional[str], from_beginning: bool,
             start: Optional[Start] = None) -> Source:
        self.ensure_topic(topic)
        return KafkaSource(self, topic, group_id, from_beginning, start)

    def link_stats(self) -> Dict[str, Any]:
        with self._lock:
            return {"connected": self._connected, "disconnects": self._disconnects, "reconnects": self._reconnects,
                    "last_outage_s": self._last_outage_s}

    def stats(self) -> Dict[str, Any]:
        """connected, disconnects, reconnects, last_outage_s; lost (messages whose delivery failed
        or that a replaced producer still held, each frame of a batch counted); producer_recreated;
        topics_recreated and broker_state_lost (recoveries that found this transport's topics gone);
        queued (messages in the producer's queue; frames waiting in a batch are not among them)."""
        out = self.link_stats()
        with self._lock:
            out.update({"lost": self._lost, "producer_recreated": self._recreated,
                        "topics_recreated": self._topics_recreated, "broker_state_lost": self._state_lost,
                        "idempotent": self._idempotent})
        try:
            out["queued"] = len(self.producer)
        except Exception:  # noqa: BLE001
            out["queued"] = None
        return out

    def close(self) -> None:
        if self._closed.is_set():
            return
        end = time.monotonic() + 5                 # one bound for the batches and the producer's queue
        if self._batches:
            left = self._drain(end)
            if left:
                with self._blk:                    # counted lost: the linger thread must not send them after all
                    self._batches.clear()
                with self._lock:
                    self._lost += left
                log.warning("msight_fast: Kafka closed with %d batched frames not handed to the producer; "
                            "counted as lost", left)
        try:
            self.producer.flush(max(0.1, end - time.monotonic()))
        except Exception:  # noqa: BLE001
            pass
        self._closed.set()
        with self._blk:
            self._spare.clear()                    # their buffers: a closed Bus keeps none
            self._blk.notify_all()
        for th in (self._watcher, self._linger):
            if th is not None and threading.current_thread() is not th:
                th.join(5)


class _Commit(threading.Event):
    """An ``ack()`` waiting for the poll thread's commit, and the error that commit ended with."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Optional[BaseException] = None


class KafkaSource(Source):
    """A consumer run by a background poll thread, so the member stays live through rebalances
    whatever the application does; offsets follow the frames handed out.

    The thread hands messages over through a queue bounded in bytes; when it is full the thread
    pauses fetching (never drops: Kafka must not lose anything) and resumes below half.

    ``start`` applies to the first assignment this source gets, in each of its partitions:
    ``end``, ``offset`` (clamped to the log) and ``time`` override the group's committed offsets;
    ``beginning`` is ``from_beginning``: only partitions the group never committed start at the
    log's start (the Bus passes it for ``from_beginning=True`` too, and a restarted member of a
    group, as the MSight drop-in's, must resume where the group was). The resolved start is
    committed at once, so a member that dies before its first commit does not lose the position.
    Later assignments (rebalances) resume from the committed offsets.
    """

    ASSIGN_TIMEOUT_S = 60.0
    LOOKUP_TIMEOUT_S = 10.0      # each broker request that resolves where partitions start
    END_PROBE_S = 5.0            # reading the log's end from a Fetch, before falling back to ListOffsets
    LAG_INTERVAL_S = 1.0
    LOG_EVERY_S = 10.0

    def __init__(self, t: KafkaTransport, topic: str, group_id: Optional[str], from_beginning: bool,
                 start: Optional[Start] = None) -> None:
        self.t = t
        self.topic = topic
        self.from_beginning = from_beginning or (start is not None and start.kind == "beginning")
        # a start that overrides committed offsets; "beginning" is from_beginning (see the class doc)
        self._seek = start if start is not None and start.kind != "beginning" else None
        # time start: per partition, the ms below which messages are skipped until the first one
        # at or after it (the poll thread's alone: set on assignment, read while fetching)
        self._floor: Dict[int, int] = {}
        self._skipped_msgs = 0       # frames in messages a time start skipped (poll thread), older than it
        self._skipped_frames = 0     # frames of the batch at a time start skipped (application thread)
        self._warned_skip = False
        cfg = t.cfg
        conf = _consumer_config(cfg, t._base, group_id or f"msight_fast-{uuid.uuid4().hex}", self._handle_error)
        self.c = Consumer(conf)
        self._max_bytes = cfg.max_pending_bytes
        self._mutex = threading.Lock()                  # taken directly on per-message paths
        self._lock = threading.Condition(self._mutex)
        self._stop = threading.Event()
        # fetched batches and their bytes. Messages are Any: a fetched message always has a partition
        # and an offset, which confluent-kafka's stubs (Optional for both) cannot say
        self._q: Deque[Tuple[List[Any], int]] = collections.deque()
        self._q_bytes = 0
        # the batch the application's thread is taking messages from, without the lock; a
        # rebalance bumps _gen and the taker drops what it holds of the revoked partitions
        self._local: List[Any] = []
        self._li = 0
        self._gen = self._local_gen = 0
        self._gone: Set[int] = set()
        # the frames of the batch message being handed out (each copied out, so a frame kept does
        # not pin its whole batch; decoded, or bytes for the Subscription to reject) and the token
        # that goes with the last of them
        self._cur = BatchCursor()                      # .frames and .i, the index of the next
        self._btok: Optional[Tuple[int, int, Deque[int]]] = None   # the batch's (partition, offset, run)
        self._bfloor: Dict[Tuple[int, int], int] = {}   # (partition, offset) of a time start's first batch -> ms
        self.batch_rejected = 0                         # malformed batch messages (also in the Subscription's rejected)
        self._since_store = 0
        self._paused = False
        self._assigned: Optional[List[int]] = None
        self._ever_assigned = False
        self._seeked: Set[int] = set()              # partitions that got ``start`` already
        self._owned_before: Set[int] = set()            # the partitions of the last revoked assignment
        self._seen: Dict[int, Deque[int]] = {}          # partition -> offsets taken, in order
        self._done: Dict[int, Set[int]] = {}            # partition -> offsets whose frame is released
        self._handed: List[Tuple[int, int, Deque[int]]] = []   # released at the next next() / ack()
        self._to_store: List[TopicPartition] = []      # for the poll thread to store
        self._commit_req: List[_Commit] = []            # for the poll thread to commit
        # repeats: the highest offset this member took per partition (kept across assignments),
        # the last one taken in the current assignment, and, for partitions taken over from
        # another member, the end of the log when first fetched (what that member may have had)
        self._high: Dict[int, int] = {}
        self._last: Dict[int, int] = {}
        self._replay_bound: Dict[int, int] = {}
        self._replay_wait: Set[int] = set()             # taken over, bound not known yet (poll thread)
        self.redelivered = 0
        self.replayed = 0
        self.offset_resets = 0
        self.log_lost = 0
        self._unread: Dict[int, int] = {}               # per partition, at the last lag measurement
        self.assignments = 0
        self.errors = 0
        self._lag: Optional[int] = None
        self._logged_at = -1e9
        self._closed = False
        self.c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._run, name=f"msight_fast-kafka-{topic}", daemon=True)
        self._thread.start()
        with self._lock:                                # return only once partitions are ours
            ok = self._lock.wait_for(lambda: self._assigned is not None or self._closed, self.ASSIGN_TIMEOUT_S)
        if not ok:
            self.close()
            raise BackendUnavailable(f"Kafka: no partitions of {topic!r} assigned within {self.ASSIGN_TIMEOUT_S} s")

    @property
    def start_skipped(self) -> int:
        """Frames that a time start skipped (whole messages, and the older frames of the batch at
        the start): older than the start, though the broker's lookup included them."""
        return self._skipped_msgs + self._skipped_frames

    def _run(self) -> None:
        # the only thread that touches the consumer: confluent-kafka calls made from two threads
        # at once were seen to deadlock (store_offsets against consume)
        c = self.c
        next_lag = 0.0
        try:
            while not self._closed:
                try:
                    self._serve_requests()
                    # consume(n, t) waits out all of t unless n messages come (100 ms of latency
                    # per idle frame, measured); poll() returns on the first message, and then
                    # consume(n, 0) takes whatever else is already fetched, without waiting
                    m = c.poll(0.1)
                    self._take([m] + c.consume(255, 0) if m is not None else [])
                    now = time.monotonic()
                    if now >= next_lag:
                        next_lag = now + self.LAG_INTERVAL_S
                        self._measure_lag()
                except Exception as e:  # noqa: BLE001 - the subscription outlives any error
                    self._note_error(f"poll thread: {e!r}")
                    self._stop.wait(0.1)
        finally:
            try:
                self._serve_requests()
            except Exception:  # noqa: BLE001
                pass
            try:
                c.close()                    # commits the stored offsets, leaves the group
            except Exception:  # noqa: BLE001
                pass

    def _note_error(self, text: str) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:
            self._logged_at = now
            log.warning("msight_fast: Kafka consumer of %r: %s (%d errors so far)", self.topic, text, self.errors)

    def _handle_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if code in _DOWN:
            self.t.mark_down(err.str(), code)
            return
        if code in _TOPIC_GONE:
            self.t.topic_missing(self.topic)
        self._note_error(err.str())

    def _serve_requests(self) -> None:
        with self._lock:
            store, self._to_store = self._to_store, []
            commits, self._commit_req = self._commit_req, []
        self._store(store)
        if not commits:
            return
        error: Optional[BackendUnavailable] = None
        if not self.t.link_stats()["connected"]:
            # a synchronous commit would wait out the session timeout for the coordinator
            error = BackendUnavailable(f"Kafka: cannot commit offsets of {self.topic!r}: the broker is unreachable "
                                       "(what was handed stays stored and is committed once it is back)")
        else:
            try:                             # one commit answers every ack() waiting: all was stored above
                self.c.commit(asynchronous=False)
            except KafkaException as e:
                err = _kafka_error(e)
                if err is None or err.code() != KafkaError._NO_OFFSET:
                    error = BackendUnavailable(
                        f"Kafka: committing offsets of {self.topic!r} failed: {err.str() if err else e}")
        for ev in commits:
            ev.error = error
            ev.set()

    def _take(self, msgs: List[Any]) -> None:
        if msgs:
            good = [m for m in msgs if m.error() is None]
            if len(good) != len(msgs):
                for m in msgs:
                    if m.error() is not None:
                        self._handle_error(m.error())
            msgs = good
            if msgs and self._floor:
                msgs = self._skip_before_start(msgs)
            if msgs and self._replay_wait:
                self._bound_replay(msgs)
        if not msgs and not self._paused:
            return
        # handed over a batch at a time: one lock round per consume() call, not per message
        nbytes = sum([len(m) for m in msgs]) if msgs else 0
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

    def _skip_before_start(self, msgs: List[Any]) -> List[Any]:
        """Drop, per partition of a time start, the messages before the first one at or after
        it; from that one on the log is read in full, as Kafka's own seek by time does. The
        skipped offsets are stored (nothing before them awaits the application)."""
        floor = self._floor
        kept: List[Any] = []
        skipped_to: Dict[int, int] = {}
        n = 0
        for m in msgs:
            p = m.partition()
            ms = floor.get(p)
            if ms is not None:
                kind, ts = m.timestamp()
                if kind != TIMESTAMP_NOT_AVAILABLE and ts < ms:
                    skipped_to[p] = m.offset() + 1
                    n += _frames_skipped(m.value(), self.t.cfg.max_frame_bytes)
                    continue
                del floor[p]
                v = m.value()
                if v is not None and v[:4] == BATCH_MAGIC:   # its older frames are skipped by next()
                    self._bfloor[(p, m.offset())] = ms
            kept.append(m)
        if n:
            self._skipped_msgs += n
            if not self._warned_skip:
                self._warned_skip = True
                log.warning("msight_fast: the broker's time lookup for %r included messages older than the start "
                            "(it resolves times per record batch, or found none that recent); skipping them, "
                            "counted in start_skipped", self.topic)
            self._store([TopicPartition(self.topic, p, o) for p, o in skipped_to.items()])
        return kept

    def _bound_replay(self, msgs: List[Any]) -> None:
        """For a partition taken over from another member: the log's end when its first messages
        came (the fetch's high watermark); below it that member may already have handed frames."""
        for m in msgs:
            p = m.partition()
            if p in self._replay_wait:
                self._replay_wait.discard(p)
                try:
                    hi = self.c.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)[1]
                except KafkaException:
                    hi = -1
                with self._mutex:
                    self._replay_bound[p] = max(hi, m.offset() + 1)
                if not self._replay_wait:
                    return

    def _measure_lag(self) -> None:
        """Messages in the log not yet taken by the application, summed over the assigned
        partitions: the high watermark (from the last fetch) minus the next offset to take."""
        with self._lock:
            parts = list(self._assigned or [])
            nxt = {p: o + 1 for p, o in self._last.items()}
        if not parts:
            self._lag = 0 if self._assigned is not None else None
            return
        tps = [TopicPartition(self.topic, p) for p in parts]
        pos = {tp.partition: tp.offset for tp in self.c.position(tps)}
        lag = 0
        for p in parts:
            hi = self.c.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)[1]
            at = nxt.get(p, pos.get(p, -1))
            if hi >= 0 and at >= 0:
                self._unread[p] = max(0, hi - at)
                lag += self._unread[p]
        self._lag = lag

    def _on_assign(self, consumer: Any, parts: List[TopicPartition]) -> None:
        # an empty assignment (more members than partitions) is not this member's first: the
        # first partitions it does get start where a first assignment starts
        first = not self._ever_assigned
        seek = self._seek
        # ``start`` applies to each partition the first time this member gets it; a partition it
        # gets back after a rebalance resumes from the group's committed offset
        new = [tp for tp in parts if tp.partition not in self._seeked] if seek is not None else []
        old = [tp for tp in parts if seek is None or tp.partition in self._seeked]
        if seek is not None and seek.kind == "time":
            for tp in new:                          # kept across revokes: cleared by the first message at or after it
                self._floor[tp.partition] = _ms_up(seek.value)
        try:
            fixed: List[TopicPartition] = []
            anchor: List[TopicPartition] = []
            if new and seek is not None:
                fixed = self._seek_offsets(consumer, new, seek)
                anchor = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in fixed]
            if old:
                more, more_anchor = self._starting_offsets(consumer, old, first and seek is None)
                fixed, anchor = fixed + more, anchor + more_anchor
        except Exception as e:  # noqa: BLE001 - the broker did not answer: let librdkafka decide
            self._note_error(f"resolving where {len(parts)} partitions start: {e!r}")
            fixed = [TopicPartition(tp.topic, tp.partition, self._fallback(True)) for tp in new] + \
                [TopicPartition(tp.topic, tp.partition, self._fallback(first and seek is None, seek_now=False))
                 for tp in old]
            anchor = []
        self._seeked.update(tp.partition for tp in new)
        try:
            consumer.assign(fixed)
        except KafkaException as e:
            self._note_error(f"assign: {e}")
        if anchor:
            try:
                consumer.commit(offsets=anchor, asynchronous=False)
            except KafkaException as e:
                log.warning("msight_fast: could not commit the starting offsets of %r: %s", self.topic, e)
        self._paused = False
        with self._lock:
            self._assigned = [tp.partition for tp in fixed]
            self._ever_assigned = self._ever_assigned or bool(fixed)
            self.assignments += 1
            self._lock.notify_all()

    def _fallback(self, first: bool, seek_now: bool = True) -> int:
        """Where partitions start when the broker did not say: librdkafka resolves a logical
        offset itself once it can. A time start reads from the beginning and skips the older
        messages (exact, only slower); an offset past the log's end goes to its start
        (``auto.offset.reset``). ``seek_now``: the partition is getting its ``start`` now."""
        seek = self._seek if seek_now else None
        if seek is not None:
            return {"end": OFFSET_END, "offset": seek.value}.get(seek.kind, OFFSET_BEGINNING)
        return (OFFSET_BEGINNING if self.from_beginning else OFFSET_END) if first else OFFSET_STORED

    def _seek_offsets(self, consumer: Any, parts: List[TopicPartition], seek: Start) -> List[TopicPartition]:
        """Where each partition starts for an ``end``, ``offset`` or ``time`` start, whatever the
        group committed. Every partition gets a number, within [log start, log end]."""
        marks: Dict[int, Tuple[int, int]] = {}
        for tp in parts:
            marks[tp.partition] = consumer.get_watermark_offsets(TopicPartition(self.topic, tp.partition),
                                                                 timeout=self.LOOKUP_TIMEOUT_S)
        # per partition: the offset to start at, capped at the log's end (None: the end itself)
        want: Dict[int, Optional[int]] = {}
        if seek.kind == "offset":
            want = {p: max(seek.value, lo) for p, (lo, _) in marks.items()}
        elif seek.kind == "time":
            ms = _ms_up(seek.value)
            try:
                found = consumer.offsets_for_times([TopicPartition(self.topic, p, ms) for p in marks],
                                                   timeout=self.LOOKUP_TIMEOUT_S)
            except KafkaException as e:
                log.warning("msight_fast: the broker did not answer a time lookup on %r (%s); reading its "
                            "partitions from the start and skipping messages older than the start", self.topic, e)
                found = [TopicPartition(self.topic, p, lo) for p, (lo, _) in marks.items()]
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                # -1: no message that recent (Kafka's answer); the end
                want[tp.partition] = None if tp.offset < 0 else max(tp.offset, marks[tp.partition][0])
        else:
            want = dict.fromkeys(marks)
        # past what ListOffsets calls the end: ask a Fetch where the end really is
        beyond = {p: marks[p] for p, o in want.items() if o is None or o > marks[p][1]}
        ends = self._log_ends(beyond) if beyond else {}
        fixed = []
        for p, o in want.items():
            end = ends.get(p, marks[p][1])
            fixed.append(TopicPartition(self.topic, p, end if o is None else min(o, end)))
        with self._mutex:
            for tp in fixed:
                self._last.pop(tp.partition, None)
                self._replay_bound.pop(tp.partition, None)
        self._replay_wait = set()                 # a chosen start: what comes is not another member's replay
        return fixed

    def _log_ends(self, marks: Dict[int, Tuple[int, int]]) -> Dict[int, int]:
        """The end of each partition's log (partition -> (low, high) from ListOffsets) as a Fetch
        reports it: its high watermark. ListOffsets "latest" would do on Apache Kafka, but tansu
        0.6 answers it with the last record batch's base offset + 1, and starting there would
        replay the rest of that batch. A short-lived consumer of no group reads from the message
        before that answer; whatever it cannot learn within ``END_PROBE_S`` keeps ListOffsets'
        answer, noted as an error."""
        ends = {p: hi for p, (_, hi) in marks.items()}
        todo = {p: hi for p, (lo, hi) in marks.items() if hi > lo}   # an empty log's end is its start
        if not todo:
            return ends
        conf = _consumer_config(self.t.cfg, self.t._base, f"msight_fast-end-{uuid.uuid4().hex}", lambda err: None)
        conf.update({"enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "latest"})
        probe = Consumer(conf)
        try:
            probe.assign([TopicPartition(self.topic, p, hi - 1) for p, hi in todo.items()])
            deadline = time.monotonic() + self.END_PROBE_S
            while todo and not self._closed and time.monotonic() < deadline:
                m: Any = probe.poll(0.05)       # a fetched message has a partition and an offset
                if m is None or m.partition() not in todo:
                    continue
                p, err = m.partition(), m.error()
                if err is None:
                    hi = probe.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)[1]
                    ends[p] = max(todo.pop(p), hi, m.offset() + 1)
                elif err.code() == KafkaError._PARTITION_EOF:   # its offset is the end
                    ends[p] = max(todo.pop(p), m.offset())
        finally:
            probe.close()
        if todo:
            self._note_error(f"the end of partitions {sorted(todo)} not read within {self.END_PROBE_S} s; "
                             "starting at the broker's ListOffsets answer")
        return ends

    def _starting_offsets(self, consumer: Any, parts: List[TopicPartition],
                          first: bool) -> Tuple[List[TopicPartition], List[TopicPartition]]:
        # Resolve where each partition starts now (frames published right after subscribe()
        # must not be missed) and commit that position for a partition the group has never
        # committed: otherwise a member that dies before its first auto-commit leaves the
        # group with no position, and its successor would start at "latest" and skip
        # everything the dead member had not finished.
        committed = consumer.committed(parts, timeout=self.LOOKUP_TIMEOUT_S)
        fixed, anchored, lost, taken_over = [], [], [], set()
        at_end: Dict[int, Tuple[int, int]] = {}
        for tp in committed:
            p = tp.partition
            if tp.offset >= 0:
                if p not in self._owned_before:
                    taken_over.add(p)
            else:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(tp.topic, p), timeout=self.LOOKUP_TIMEOUT_S)
                if first:
                    tp.offset = lo if self.from_beginning else hi
                    if not self.from_beginning:
                        at_end[p] = (lo, hi)
                else:
                    # every assignment commits a start, so the group had an offset here: the
                    # broker lost it (a restart without its state), and all its log now holds
                    # was written since: start at the beginning
                    tp.offset = lo
                    lost.append(p)
                anchored.append(tp)
            fixed.append(tp)
        if at_end:
            ends = self._log_ends(at_end)
            for tp in fixed:
                tp.offset = ends.get(tp.partition, tp.offset)
        anchor = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in anchored]
        with self._mutex:
            for p in lost:
                self._high.pop(p, None)             # offsets of the old log are not comparable
                self.offset_resets += 1
                self.log_lost += self._unread.pop(p, 0)
            for tp in fixed:
                self._last.pop(tp.partition, None)
                self._replay_bound.pop(tp.partition, None)
        self._replay_wait = taken_over
        if lost:
            log.warning("msight_fast: the broker lost the committed offsets of %r partitions %s; reading them "
                        "from the start of their log", self.topic, lost)
        return fixed, anchor

    def _on_revoke(self, consumer: Any, parts: List[TopicPartition]) -> None:
        gone = {tp.partition for tp in parts}        # runs in the poll thread, inside consume()
        with self._lock:
            store = self._to_store + self._releasable()
            self._to_store = []
        self._store(store)
        with self._lock:
            # what was fetched but not handed out belongs to the partitions' next owner now
            keep: Deque[Tuple[List[Any], int]] = collections.deque()
            for batch, _ in self._q:
                rest = [m for m in batch if m.partition() not in gone]
                if rest:
                    keep.append((rest, sum([len(m) for m in rest])))
            self._q = keep
            self._q_bytes = sum(n for _, n in keep)
            self._gone |= gone
            self._gen += 1
            for key in [k for k in self._bfloor if k[0] in gone]:
                del self._bfloor[key]
            for p in gone:
                self._seen.pop(p, None)
                self._done.pop(p, None)
                self._last.pop(p, None)
                self._replay_bound.pop(p, None)
            self._owned_before = set(self._assigned or []) | gone
            self._assigned = [p for p in (self._assigned or []) if p not in gone]
        self._replay_wait -= gone
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
                    if self._btok is not None and self._btok[0] in gone:
                        self._cur.frames, self._cur.i = [], 0   # the partition's next owner reads the whole batch
            cur = self._cur
            if cur.i < len(cur.frames):
                # no lock per frame: a frame handed just after its partition was revoked is one
                # the next owner delivers again (its batch's offset was not stored): a repeat, not a loss
                f = cur.frames[cur.i]
                cur.i += 1
                # the token goes with the batch's last frame only: the Subscription hands what it
                # takes before it takes more (Source.next), so once that one is handed all are
                return f, (self._btok if cur.i == len(cur.frames) else None)
            if self._li < len(self._local):
                m = self._local[self._li]
                self._li += 1
                p, o = m.partition(), m.offset()
                with self._mutex:
                    if self._local_gen != self._gen:    # revoked since the check above: drop it there
                        self._li -= 1
                        continue
                    self._count_repeats(p, o)
                    seen = self._seen.setdefault(p, collections.deque())
                    seen.append(o)
                    self._since_store += 1
                    if self._since_store >= 64:         # store released offsets now and then
                        self._since_store = 0
                        self._to_store.extend(self._releasable())
                # the token names the run of offsets it belongs to: once a revocation or a log
                # that started over has ended that run, the same offset is another message
                v = m.value()
                if v is not None and v[:4] == BATCH_MAGIC:
                    got = self._unbatch(v, p, o, seen)
                    if got is None:
                        continue
                    return got
                return v, (p, o, seen)
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

    def _unbatch(self, v: bytes, p: int, o: int, seen: Deque[int]) -> Optional[Tuple[Any, Any]]:
        """The first frame of a batch message and its token; the others follow from ``next``.
        A malformed batch goes on whole, for the Subscription to reject (and release)."""
        try:
            # a shared header's frames are rebuilt: a forged count may not make them more than the
            # subscriber would take as one frame (a real batch is batch_max_bytes, 256 KiB, at most)
            frames = batch_frames(v, max_bytes=self.t.cfg.max_frame_bytes)
        except FrameError as e:
            self.batch_rejected += 1
            if self.batch_rejected == 1 or self.batch_rejected % 1000 == 0:
                log.warning("msight_fast: a malformed batch message on %r (partition %d, offset %d; %d so far): %s",
                            self.topic, p, o, self.batch_rejected, e)
            return v, (p, o, seen)
        if self._bfloor:
            ms = self._bfloor.pop((p, o), None)
            if ms is not None:
                # the batch at a time start: its frames older than the start (by their publish
                # time, which the batch's Kafka timestamp follows) are skipped, as older messages are
                floor_ns, skip = ms * 1_000_000, 0
                while skip < len(frames) and int.from_bytes(frames[skip][80:88], "little", signed=True) < floor_ns:
                    skip += 1
                if skip:
                    self._skipped_frames += skip
                    frames = frames[skip:]
        if not frames:
            with self._mutex:
                self._handed.append((p, o, seen))   # nothing in it for the application
            return None
        # decoded here, once for the batch: the Subscription takes a Frame as it is; a frame too
        # large for this subscriber or malformed stays bytes, for the Subscription to reject
        limit = self.t.cfg.max_frame_bytes
        out: List[Any] = []
        for fb in frames:
            if len(fb) <= limit:
                try:
                    out.append(decode(fb))
                    continue
                except Exception:  # noqa: BLE001 - FrameError, or a bug: left to the Subscription,
                    pass               # which rejects it (logging a bug as such) and releases its token
            out.append(fb)
        self._cur.frames = frames = out
        self._cur.i = 1
        self._btok = tok = (p, o, seen)
        return frames[0], (tok if len(frames) == 1 else None)

    def recv_lane(self, sub: Any) -> Optional[Callable[[], Optional[Frame]]]:
        """``sub``'s receive of a batch's next decoded frame in one compiled call
        (``codec.RecvLane``), where the core is built."""
        if RecvLane is None:
            return None
        return RecvLane(sub, self, self._cur)

    def _count_repeats(self, p: int, o: int) -> None:
        """Called with the lock held, for each message taken, in order."""
        last = self._last.get(p)
        high = self._high.get(p, -1)
        if last is not None and o <= last:
            # backwards within one assignment: the position fell outside the log and went to its
            # start (a broker that lost the log): these are new messages, not repeats, and the
            # old log's offsets, released or not, can no longer be stored
            self.offset_resets += 1
            high = -1
            self._seen[p] = collections.deque()
            self._done.pop(p, None)
        elif o <= high:
            self.redelivered += 1                   # this member took it before (a rebalance)
        self._last[p] = o
        self._high[p] = max(high, o)
        bound = self._replay_bound.get(p)
        if bound is not None:
            if o < bound:
                self.replayed += 1
            else:
                del self._replay_bound[p]

    def handed(self, frame: Any, tokens: List[Any]) -> None:
        with self._mutex:
            self._handed.extend(tokens)

    def _releasable(self) -> List[TopicPartition]:
        """Offsets to store: up to the first message whose frame has not been released yet.

        Called with the lock held; the caller stores them after letting go of it, because
        librdkafka may be running a rebalance callback that waits for this lock.
        """
        if not self._handed:
            return []
        for p, o, run in self._handed:
            if self._seen.get(p) is run:             # else an earlier run's: nothing to store
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
        """Commit what was handed so far; after ``close`` (which commits it) a no-op."""
        ev = _Commit()
        with self._lock:
            if self._closed:                 # the poll thread serves no more requests
                return
            self._to_store.extend(self._releasable())
            self._commit_req.append(ev)
        if not ev.wait(30):
            raise BackendUnavailable(f"Kafka: committing offsets of {self.topic!r} did not finish within 30 s")
        if ev.error is not None:
            raise ev.error

    def stats(self) -> Dict[str, Any]:
        """What one member can tell about loss and repeats, which holds in a group too:

        - ``lag``: messages in the log not yet taken, summed over the assigned partitions (the
          high watermark of the last fetch minus the next offset to take; None before the first
          assignment). Frames wait there, they are not lost.
        - ``redelivered``: messages this member took a second time (after a rebalance gave a
          partition back from an older committed offset). Exact.
        - ``replayed``: messages read on partitions taken over from another member (or from an
          earlier process of the group) at offsets below the log's end when first fetched: that
          member may have handed them to its application after its last commit. An upper bound
          on the duplicates no single member can see.
        - ``offset_resets``: partitions that started over because the broker lost their log or
          committed offsets; ``log_lost``: of those partitions' messages, how many were still
          unread at the last lag measurement before (a lower bound: the last second before the
          loss, and other members' partitions, are not seen).
        """
        with self._lock:
            out = {"redelivered": self.redelivered, "replayed": self.replayed, "offset_resets": self.offset_resets,
                   "log_lost": self.log_lost, "lag": self._lag, "assigned_partitions": list(self._assigned or []),
                   "assignments": self.assignments, "consumer_errors": self.errors, "pending_bytes": self._q_bytes,
                   "paused": self._paused, "dropped": 0}
        out.update(self.t.link_stats())
        return out

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._to_store.extend(self._releasable())
            self._lock.notify_all()
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(30)            # the thread stores, commits and closes the consumer
