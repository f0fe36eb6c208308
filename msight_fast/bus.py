"""The pub/sub facade: ``connect()`` returns a ``Bus`` over Redis, NATS or Kafka.

Every backend carries the same frames (see docs/wire-format.md) and gives the same
``Subscription`` contract; what differs is the delivery guarantee (see the README's table).
"""
from __future__ import annotations

import array
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterator, Optional, Tuple

import numpy as np

from . import _schema as S
from . import config as _config
from .codec import Frame, Reassembler, encode_parts, is_fragment
from .errors import FrameError, FrameTooLarge

log = logging.getLogger("msight_fast")

__all__ = ["connect", "connect_node", "NodeConfig", "Bus", "Subscription"]


# ---------------------------------------------------------------- per-subscription accounting
class SeqTracker:
    """Gaps and duplicates from (publisher_id, seq), tolerant of reordering.

    A skipped sequence number counts as a gap until it arrives late (then it is not a gap); a
    duplicate is a number seen before (within the last ``WINDOW``). A frame older than the first
    one seen from its publisher is neither. Memory is bounded per publisher.
    """
    WINDOW = 65536

    def __init__(self) -> None:
        self._high: Dict[int, int] = {}
        self._holes: Dict[int, "collections.OrderedDict[int, None]"] = {}
        self._seen: Dict[int, "collections.OrderedDict[int, None]"] = {}
        self.gaps = 0
        self.duplicates = 0

    def see(self, pub: int, seq: int) -> None:
        seen = self._seen.get(pub)
        if seen is None:
            self._seen[pub] = collections.OrderedDict({seq: None})
            self._high[pub] = seq
            self._holes[pub] = collections.OrderedDict()
            return
        if seq in seen:
            self.duplicates += 1
            return
        seen[seq] = None
        if len(seen) > self.WINDOW:
            seen.popitem(last=False)
        high, holes = self._high[pub], self._holes[pub]
        if seq > high:
            if seq - high > 1:
                self.gaps += seq - high - 1
                for s in range(max(high + 1, seq - self.WINDOW), seq):
                    holes[s] = None
                while len(holes) > self.WINDOW:
                    holes.popitem(last=False)
            self._high[pub] = seq
        elif seq in holes:
            del holes[seq]
            self.gaps -= 1


class LatencyWindow:
    """The last ``n`` publish-to-receipt latencies, for percentiles."""

    def __init__(self, n: int = 8192) -> None:
        self._a = array.array("q", bytes(8 * n))    # cheaper per message than a numpy setitem
        self._n = n
        self._i = 0

    def add(self, ns: int) -> None:
        self._a[self._i % self._n] = ns
        self._i += 1

    def summary(self) -> Dict[str, Optional[int]]:
        n = min(self._i, self._n)
        if not n:
            return {"latency_p50_ns": None, "latency_p99_ns": None, "latency_max_ns": None}
        a = np.frombuffer(self._a, dtype=np.int64)[:n]
        p50, p99 = np.percentile(a, [50, 99])
        return {"latency_p50_ns": int(p50), "latency_p99_ns": int(p99), "latency_max_ns": int(a.max())}


class BoundedQueue:
    """A thread-safe FIFO bounded in bytes, for messages a backend thread hands to the consumer.

    When full: ``drop_oldest`` discards from the head, ``keep_latest`` keeps only the newest
    message; either way the discarded messages are counted in ``dropped``.
    """

    def __init__(self, max_bytes: int, policy: str = "drop_oldest") -> None:
        self.max_bytes = max_bytes
        self.policy = policy
        self._q: Deque[Tuple[Any, int, Any]] = collections.deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self.dropped = 0
        self.closed = False

    def put(self, item: Any, nbytes: int, token: Any = None) -> None:
        with self._cv:
            if self.policy == "keep_latest" and self._bytes + nbytes > self.max_bytes:
                self.dropped += len(self._q)
                self._q.clear()
                self._bytes = 0
            while self._q and self._bytes + nbytes > self.max_bytes:
                _, n, _ = self._q.popleft()
                self._bytes -= n
                self.dropped += 1
            self._q.append((item, nbytes, token))
            self._bytes += nbytes
            self._cv.notify()

    def get(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        with self._cv:
            if not self._q and not self.closed:
                self._cv.wait_for(lambda: self._q or self.closed, timeout)
            if not self._q:
                return None
            item, n, token = self._q.popleft()
            self._bytes -= n
            return item, token

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    @property
    def nbytes(self) -> int:
        return self._bytes


class Source:
    """What a backend gives a Subscription: raw messages (whole frames or fragments)."""

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        """The next message and an opaque token, or None on timeout."""
        raise NotImplementedError

    def handed(self, frame: Any, tokens: list) -> None:
        """A frame made of the messages with these tokens was handed to the application."""

    def ack(self) -> None:
        """Everything handed so far is done with (Kafka commits it)."""

    def stats(self) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Subscription:
    """An iterator of Frames from one topic. ``recv(timeout)`` returns None on timeout."""

    def __init__(self, bus: "Bus", topic: str, source: Source, cfg: Any, group_id: Optional[str]) -> None:
        self.topic = topic
        self.group_id = group_id
        self._bus = bus
        self._src = source
        self._reasm = Reassembler(max_frame_bytes=cfg.max_frame_bytes, max_pending=8, timeout_s=10.0)
        self._seq = SeqTracker()
        self._lat = LatencyWindow()
        self._tokens: Dict[Tuple[int, int], list] = {}
        self.received = 0
        self.bytes = 0
        self.rejected = 0
        self._closed = False

    def recv(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next whole frame, or None when ``timeout`` seconds pass first (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = self._src.next(left)
            if got is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            buf, token = got
            expired = self._reasm.expired
            frag = is_fragment(buf)
            try:
                frame = self._reasm.feed(buf)
            except FrameError as e:
                self.rejected += 1
                if self.rejected == 1 or self.rejected % 1000 == 0:
                    log.warning("msight_fast: dropped a malformed message on %r (%d so far): %s", self.topic, self.rejected, e)
                if token is not None:          # done with it: it must not hold back the offsets
                    self._src.handed(None, [token])
                continue
            if token is not None and frag:       # held until the whole frame is handed over
                self._tokens.setdefault(_fragment_key(buf), []).append(token)
            if self._reasm.expired != expired and self._tokens:
                self._release_abandoned()
            if frame is None:
                continue
            now = time.time_ns()
            self.received += 1
            self.bytes += frame.nbytes
            if frame.publish_ts_ns:
                self._lat.add(now - frame.publish_ts_ns)
            if frame.publisher_id:
                self._seq.see(frame.publisher_id, frame.seq)
            if frag:
                tokens = self._tokens.pop((frame.publisher_id, frame.frame_id), [])
            else:
                tokens = [] if token is None else [token]
            self._src.handed(frame, tokens)
            return frame
        return None

    def _release_abandoned(self) -> None:
        """Fragments of frames the reassembler gave up on: release their tokens (the frame is lost)."""
        live = set(self._reasm._pending)
        for key in [k for k in self._tokens if k not in live]:
            self._src.handed(None, self._tokens.pop(key))

    def __iter__(self) -> Iterator[Frame]:
        while not self._closed:
            f = self.recv(timeout=0.5)
            if f is not None:
                yield f

    def ack(self) -> None:
        """Mark every frame received so far as processed (Kafka commits its offsets)."""
        self._src.ack()

    def stats(self) -> Dict[str, Any]:
        """received, bytes, gaps, duplicates, dropped, rejected and publish-to-receipt latency percentiles (ns)."""
        out: Dict[str, Any] = {"topic": self.topic, "received": self.received, "bytes": self.bytes,
                               "gaps": self._seq.gaps,
                               "duplicates": self._seq.duplicates + self._reasm.duplicates,
                               "rejected": self.rejected, "dropped": 0,
                               "fragments_expired": self._reasm.expired}
        out.update(self._lat.summary())
        out.update(self._src.stats())
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._src.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fragment_key(buf: Any) -> Tuple[int, int]:
    """(publisher_id, frame_id) of a fragment, as the frame it completes will carry them."""
    mv = memoryview(buf)
    return (int.from_bytes(mv[16:24], "little"), int.from_bytes(mv[8:16], "little"))


# ---------------------------------------------------------------- the bus
class Transport:
    """A backend: sends encoded frames and opens subscription sources."""
    name = "?"

    def send(self, topic: str, frame: Any, parts: list, nbytes: int) -> None:
        raise NotImplementedError

    def open(self, topic: str, group_id: Optional[str], from_beginning: bool) -> Source:
        raise NotImplementedError

    def flush(self, timeout: Optional[float]) -> None:
        pass

    def close(self) -> None:
        pass


class Bus:
    """A connection to one broker: ``publish`` frames, ``subscribe`` to topics."""

    def __init__(self, transport: Transport, cfg: Any) -> None:
        self.backend: str = transport.name
        self.config = cfg
        self.publisher_id: int = S.new_publisher_id()
        self._t = transport
        self._seq: Dict[str, int] = {}
        self._subs: list = []
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, topic: str, obj: Any, **frame_fields: Any) -> Frame:
        """Publish a Frame, an ndarray or bytes; sets seq, publisher_id and publish_ts_ns.

        Returns once the client library has the frame (Kafka's delivery errors come back
        through ``flush``). ``frame_fields`` (sensor_name, encoding, …) build the frame when
        ``obj`` is not one already; sensor_name defaults to the topic.
        """
        if self._closed:
            raise ValueError("publish on a closed Bus")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty str")
        if isinstance(obj, Frame):
            frame = obj
            if frame_fields:
                raise TypeError("frame fields cannot be given with a ready Frame")
        else:
            frame_fields.setdefault("sensor_name", topic)
            if isinstance(obj, np.ndarray):
                frame = Frame.from_array(obj, **frame_fields)
            else:
                frame_fields.setdefault("encoding", "bytes")
                frame = Frame.from_bytes(obj, **frame_fields)
        with self._lock:
            seq = self._seq.get(topic, 0) + 1
            self._seq[topic] = seq
        frame.seq = seq
        frame.publisher_id = self.publisher_id
        frame.publish_ts_ns = time.time_ns()
        parts = encode_parts(frame, checksum=self.config.checksum)
        nbytes = len(parts[0]) + frame.nbytes
        if nbytes > self.config.max_frame_bytes:
            raise FrameTooLarge(f"frame of {nbytes} bytes on {topic!r} exceeds max_frame_bytes "
                                f"{self.config.max_frame_bytes} (raise it with connect(max_frame_bytes=...))")
        self._t.send(topic, frame, parts, nbytes)
        return frame

    def subscribe(self, topic: str, *, group_id: Optional[str] = None, from_beginning: bool = False) -> Subscription:
        """Subscribe to ``topic``. ``group_id``: NATS queue group / Kafka consumer group."""
        if self._closed:
            raise ValueError("subscribe on a closed Bus")
        sub = Subscription(self, topic, self._t.open(topic, group_id, from_beginning), self.config, group_id)
        self._subs.append(sub)
        return sub

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait for every acknowledgement the backend gives; raises PublishError listing failures."""
        self._t.flush(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._subs:
            s.close()
        self._t.close()

    def __enter__(self) -> "Bus":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bus(backend={self.backend!r}, config={self.config!r})"


def connect(backend: Optional[str] = None, **options: Any) -> Bus:
    """Connect to the broker: ``backend`` or ``MSIGHT_PUBSUB_BACKEND`` (default ``redis``).

    Options override the ``MSIGHT_*`` environment variables of that backend (see the README).
    Raises ConfigError, BackendUnavailable (within ``connect_timeout_s``) or AuthError.
    """
    name = _config.backend_name(backend)
    cfg = _config.load(name, options)
    if name == "redis":
        from .backends.redis import RedisTransport as T
    elif name == "nats":
        from .backends.nats import NatsTransport as T  # type: ignore[assignment]
    else:
        from .backends.kafka import KafkaTransport as T  # type: ignore[assignment]
    return Bus(T(cfg), cfg)


@dataclass
class NodeConfig:
    """An MSight node's identity: ``group_id`` picks the NATS queue group / Kafka consumer group."""
    name: Optional[str] = None
    group_id: Optional[str] = None
    backend: Optional[str] = None
    options: Optional[Dict[str, Any]] = None

    def effective_group(self, backend: str) -> Optional[str]:
        if backend == "kafka":
            return self.group_id or (f"{self.name}_group" if self.name else None)
        if backend == "nats":
            return self.group_id
        return None


_warned_redis_group = False


class NodeBus(Bus):
    """A Bus whose subscriptions use the node's group by MSight's rules."""

    node: NodeConfig

    def subscribe(self, topic: str, *, group_id: Optional[str] = None, from_beginning: bool = False) -> Subscription:
        global _warned_redis_group
        gid = group_id if group_id is not None else self.node.effective_group(self.backend)
        if self.backend == "redis" and (group_id or self.node.group_id):
            if not _warned_redis_group:
                log.warning("msight_fast: group_id is ignored on Redis (broadcast only); every subscriber gets every frame")
                _warned_redis_group = True
            gid = None
        return super().subscribe(topic, group_id=gid, from_beginning=from_beginning)


def connect_node(config: NodeConfig) -> Bus:
    """``connect()`` for an MSight node: on NATS ``group_id`` makes a queue group (none:
    broadcast); on Kafka the group is ``group_id``, else ``<name>_group``; on Redis ``group_id``
    is ignored with one logged warning."""
    bus = connect(config.backend, **(config.options or {}))
    bus.__class__ = NodeBus
    bus.node = config  # type: ignore[attr-defined]
    return bus
