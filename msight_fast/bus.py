"""The pub/sub facade: ``connect()`` returns a ``Bus`` over any backend in the registry.

Every backend carries the same frames (see docs/wire-format.md) and gives the same
``Subscription`` contract; what differs is declared by its ``Capabilities`` (see the README's
table). Sequence numbers, encoding, fragmentation, locking and statistics live here, once.
"""
from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union, cast, overload

import numpy as np

from . import _schema as S
from . import config as _config
from . import registry
from .backends.base import Capabilities, Source, Start, Transport
from .codec import BATCH_MAGIC, Frame, Reassembler, frame_for, frame_key, is_fragment, stamp_parts
from .errors import BackendUnavailable, ConfigError, FrameError, FrameTooLarge, MsightFastError
from .stats import BusStats, LatencyWindow, SeqTracker, SubscriptionStats, Tally

if TYPE_CHECKING:
    from ._ext._wire import BufferLike
    from .config import BaseConfig

log = logging.getLogger("msight_fast")

__all__ = ["connect", "connect_node", "NodeConfig", "Bus", "Subscription", "Start"]


def _framed(buf: Any) -> bool:
    head = bytes(memoryview(buf)[:4])
    # a batch container that its backend could not split is malformed: rejected, not passed on as bytes
    return head == S.MAGIC or head == S.FRAG_MAGIC or head == BATCH_MAGIC


def _scrubbed(e: MsightFastError) -> MsightFastError:
    """The same error with every configured secret masked in its message."""
    text = str(e)
    clean = _config.scrub(text)
    if clean == text:
        return e
    e.args = (clean,) + tuple(e.args[1:])
    return e


class Subscription:
    """An iterator of Frames from one topic. ``recv(timeout)`` returns None on timeout.

    Thread-safe: concurrent ``recv`` calls take turns (each frame goes to one of them); ``close``
    may come from any thread and ends a blocked ``recv`` soon after.
    """

    def __init__(self, bus: Bus, topic: str, source: Source, cfg: Any, group_id: Optional[str],
                 whole_stream: bool) -> None:
        self.topic = topic
        self.group_id = group_id
        self._bus = bus
        self._src = source
        self._whole_stream = whole_stream
        self._reasm = Reassembler(max_frame_bytes=cfg.max_frame_bytes, max_pending=8, timeout_s=10.0)
        self._abandoned_seen = 0               # frames the reassembler gave up on, as of the last check
        self._seq = SeqTracker()
        self._lat = LatencyWindow()
        # counts each frame handed over (frames, bytes, latency, sequence) in one call
        self._tally = Tally(self._seq, self._lat, time.time_ns)
        self._tokens: Dict[Tuple[int, int, int, int, int, int], List[Any]] = {}   # frame_key -> tokens held
        self._rlock = threading.Lock()
        self._passthrough = False              # compat: messages that are not frames come as bytes
        self.rejected = 0
        self._closed = False
        # the compiled core's receive of a batch's next frame (Kafka), None where there is none
        self._fast = source.recv_lane(self)

    def recv(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next whole frame, or None when ``timeout`` seconds pass first (None: wait forever).

        Never raises for what the network or the broker does: a lost connection is re-established
        inside, and frames lost meanwhile show up in ``stats()``.
        """
        fast = self._fast
        if fast is not None:
            taken = fast()
            if taken is not None:
                return taken
        lock = self._rlock
        if not lock.acquire(False):
            deadline = None if timeout is None else time.monotonic() + timeout
            if not lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                return None
            try:
                return self._recv(deadline, None)
            finally:
                lock.release()
        try:
            # the turn was free, so nothing of the timeout is spent yet: the first wait is all of it
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._closed:
                return None
            got = self._src.next(None if timeout is None else max(0.0, timeout))
            if got is None:                    # as _recv does after a wait that gave nothing
                if self._tokens:
                    self._check_abandoned()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
            else:
                buf, token = got
                if type(buf) is Frame and not self._tokens:
                    # decoded by the backend with the rest of its batch, the common case for small
                    # frames: _recv's steps, without the ones a whole frame does not need
                    self._tally.took(buf)
                    if token is not None:      # a batch's token comes with its last frame only
                        self._src.handed(buf, [token])
                    return buf
            return self._recv(deadline, got)
        finally:
            lock.release()

    def _recv(self, deadline: Optional[float], got: Optional[Tuple[Any, Any]]) -> Optional[Frame]:
        """``recv`` after its first wait (``got``: what that gave, None for nothing or no wait yet);
        a message already taken is processed even if the subscription closed meanwhile."""
        while got is not None or not self._closed:
            if got is None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                got = self._src.next(left)
                if got is None:
                    if self._tokens:           # the reaper may have expired frames meanwhile
                        self._check_abandoned()
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    continue
            buf, token = got
            got = None
            frame: Optional[Frame]
            if type(buf) is Frame:             # as above, with fragments of other frames held
                frame, frag = buf, False
            else:
                if buf is None:                # a Kafka record with no value (a tombstone)
                    buf = b""
                if self._passthrough and not _framed(buf):
                    passed = Frame.from_bytes(bytes(buf), sensor_name=self.topic, encoding="bytes")
                    self._tally.took_bytes(passed.nbytes)
                    self._src.handed(passed, [] if token is None else [token])
                    return passed
                r = self._reasm
                skipped = r.duplicates + r.refused
                try:
                    frag = is_fragment(buf)
                    frame = r.feed(buf)
                except Exception as e:         # FrameError; anything else is a bug, but no message may end the stream
                    self.rejected += 1
                    if not isinstance(e, FrameError):
                        log.error("msight_fast: a message on %r raised %r; dropped (please report this)",
                                  self.topic, e, exc_info=True)
                    elif self.rejected == 1 or self.rejected % 1000 == 0:
                        log.warning("msight_fast: dropped a malformed message on %r (%d so far): %s", self.topic,
                                    self.rejected, e)
                    if token is not None:      # done with it: it must not hold back the offsets
                        self._src.handed(None, [token])
                    if self._tokens:           # it may have ended a frame whose fragments are held
                        self._check_abandoned()
                    continue
                if token is not None and frag:
                    if frame is None and r.duplicates + r.refused != skipped:
                        self._src.handed(None, [token])   # a copy or a straggler: no frame needs it
                    else:                      # held until the whole frame is handed over
                        self._tokens.setdefault(frame_key(buf), []).append(token)
                if frame is None:
                    if self._tokens:
                        self._check_abandoned()
                    continue
            self._tally.took(frame)
            if frag:
                tokens = self._tokens.pop(frame_key(buf), [])   # the key its fragments were held under
            else:
                tokens = [] if token is None else [token]
            if self._tokens:                   # after taking this frame's own tokens out
                self._check_abandoned()
            self._src.handed(frame, tokens)
            return frame
        return None

    def _check_abandoned(self) -> None:
        """Release the tokens of frames given up on since the last check (expired, also by the
        reaper thread between calls; evicted; refused; late copies of completed frames)."""
        r = self._reasm
        if r.pending:
            r.expire()                         # frames past their time now, not at the reaper's next wake
        n = r.expired + r.evicted + r.refused + r.duplicates + r.rejected
        if n != self._abandoned_seen:
            self._abandoned_seen = n
            self._release_abandoned()

    def _release_abandoned(self) -> None:
        """Fragments of frames the reassembler gave up on: release their tokens (the frame is lost)."""
        live = set(self._reasm.pending_frames())
        for key in [k for k in self._tokens if k not in live]:
            self._src.handed(None, self._tokens.pop(key))

    def __iter__(self) -> Iterator[Frame]:
        while not self._closed:
            f = self.recv(timeout=0.5)
            if f is not None:
                yield f

    @property
    def received(self) -> int:
        """Frames (and, in the MSight drop-in's plain mode, messages) handed over so far."""
        return int(self._tally.received)

    @property
    def bytes(self) -> int:
        """Payload bytes of the frames handed over so far."""
        return int(self._tally.nbytes)

    def ack(self) -> None:
        """Mark every frame received so far as processed (Kafka commits its offsets)."""
        self._src.ack()

    def stats(self) -> SubscriptionStats:
        """received, bytes, gaps, duplicates, dropped, rejected and publish-to-receipt latency (ns).

        ``gaps`` is None where this subscription does not see each publisher's whole stream (a
        member of a group): there a skipped number is another member's frame, not a loss.
        """
        self._tally.sync()
        out: Dict[str, Any] = {"topic": self.topic, "received": self.received, "bytes": self.bytes,
                               "gaps": self._seq.gaps if self._whole_stream else None,
                               "duplicates": self._seq.duplicates + self._reasm.duplicates,
                               "publishers": self._seq.publishers,
                               "rejected": self.rejected, "dropped": 0,
                               "fragments_expired": self._reasm.expired,
                               "fragments_evicted": self._reasm.evicted,
                               "fragments_refused": self._reasm.refused}
        out.update(self._lat.summary())
        out.update(self._src.stats())
        return cast(SubscriptionStats, out)      # the backends' keys are declared there too

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._src.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class NodeConfig:
    """An MSight node's identity: ``group_id`` picks the NATS queue group / Kafka consumer group."""
    name: Optional[str] = None
    group_id: Optional[str] = None
    backend: Optional[str] = None
    options: Optional[Dict[str, Any]] = None

    def effective_group(self, backend: str) -> Optional[str]:
        """MSight's rule: a consumer group defaults to ``<name>_group``; a queue group only when
        asked for; backends without groups ignore it."""
        kind = registry.capabilities(backend).groups
        if kind == "consumer":
            return self.group_id or (f"{self.name}_group" if self.name else None)
        if kind == "queue":
            return self.group_id
        return None


_warned_no_groups = False

StartLike = Union[None, str, int, _dt.datetime, Start]


def _start(start: StartLike, from_beginning: bool) -> Optional[Start]:
    """``start`` as a Start (None: live), or ConfigError for what cannot be one."""
    if start is None:
        return Start.beginning() if from_beginning else None
    if from_beginning:
        raise ConfigError("give start= or from_beginning=True, not both")
    if isinstance(start, Start):
        if start.kind not in ("beginning", "end", "offset", "time"):
            raise ConfigError(f"start kind {start.kind!r} is not one of beginning, end, offset, time")
        where = start
    elif isinstance(start, str):
        if start not in ("beginning", "end"):
            raise ConfigError(f"start={start!r}: a str start is 'beginning' or 'end'")
        where = Start(cast(Any, start))
    elif isinstance(start, _dt.datetime):
        if start.tzinfo is None:
            raise ConfigError("start: give a timezone-aware datetime (a naive one is ambiguous)")
        delta = start - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
        where = Start.time((delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000)
    elif isinstance(start, int) and not isinstance(start, bool):
        where = Start.offset(start)
    else:
        raise ConfigError(f"start={start!r}: expected 'beginning', 'end', an int offset, a datetime or a Start")
    if where.kind in ("offset", "time") and not 0 <= where.value < 1 << 63:
        raise ConfigError(f"start {where.kind} {where.value} is out of range [0, 2^63)")
    return where


class Bus:
    """A connection to one broker: ``publish`` frames, ``subscribe`` to topics.

    Every method is thread-safe. Frames published from one thread reach each subscriber in the
    order that thread published them (per topic); frames from several threads never interleave.
    """

    def __init__(self, transport: Transport, cfg: Any, node: Optional[NodeConfig] = None) -> None:
        self.backend: str = transport.name
        self.config: BaseConfig = cfg
        self.node = node
        self.publisher_id: int = S.new_publisher_id()
        self._t = transport
        # a backend's shortest path for small frames (Transport.add_small), None where it has none
        self._lane = (transport.add_small if transport.small_frame_bytes
                      and type(transport).add_small is not Transport.add_small else None)
        self._small = transport.small_frame_bytes
        self._seq: Dict[str, int] = {}
        self._subs: List[Subscription] = []
        self._lock = threading.Lock()          # one frame handed to the backend at a time, in seq order
        # the turn of long frames (Transport.long_frame_bytes): they go one at a time, each taking
        # the Bus's turn only once the one before is written, so others pass them meanwhile
        self._long = threading.Lock()
        self._resting = 0                      # publishes waiting for their send's rest, out of turn
        self._rested = threading.Condition()
        self._closed = False
        self.published = 0
        self.publish_errors = 0
        # the compiled core's whole publish of a small frame (Kafka), None where there is none; a
        # frame it does not take goes the usual way below
        self._fast = transport.small_lane(self)

    @property
    def capabilities(self) -> Capabilities:
        """What this backend offers (delivery, groups, persistence, largest message)."""
        return self._t.capabilities

    @overload
    def publish(self, topic: str, obj: Frame) -> Frame: ...
    @overload
    def publish(self, topic: str, obj: Union[np.ndarray, BufferLike], *, sensor_name: Optional[str] = None,
                encoding: Optional[str] = None, device_name: Optional[str] = None, frame_id: Optional[int] = None,
                capture_ts_ns: Optional[int] = None,
                meta: Optional[Mapping[str, Union[str, int, float]]] = None) -> Frame: ...
    def publish(self, topic: str, obj: Any, **frame_fields: Any) -> Frame:
        """Publish a Frame, an ndarray or bytes; sets seq, publisher_id and publish_ts_ns.

        Returns once the client library has the frame (delivery errors come back through
        ``flush``). Waits at most ``publish_timeout_s`` for a broker that is away, then raises
        ``BackendUnavailable``; the next publish tries again. ``frame_fields`` (sensor_name,
        encoding, …) build the frame when ``obj`` is not one already; sensor_name defaults to
        the topic.
        """
        fast = self._fast
        if fast is not None:
            taken = fast(topic, obj, frame_fields)
            if taken is not None:
                if not isinstance(taken, tuple):
                    return taken                       # published
                obj, frame_fields = taken[0], {}       # built, not taken: the usual way takes it so
        if self._closed:
            raise ValueError("publish on a closed Bus")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty str")
        if isinstance(obj, Frame):
            frame = obj
            if frame_fields:
                raise TypeError("frame fields cannot be given with a ready Frame")
        else:
            frame = frame_for(obj, topic, frame_fields)
        cfg = self.config
        long = None
        lb = self._t.long_frame_bytes
        if lb and frame.nbytes >= lb:
            long, deadline = self._long, self._take_turn(topic, self._long)
        try:
            if long is not None:
                self._take_turn(topic, self._lock, deadline)
            else:
                # the turn is usually free: take it without _take_turn's call (a small frame's publish
                # is a few µs, and a Python call is a tenth of a µs)
                deadline = (time.monotonic() + cfg.publish_timeout_s if self._lock.acquire(False)
                            else self._take_turn(topic))
            rest = None
            try:
                seq = self._seq.get(topic, 0) + 1
                msg = None
                lane = self._lane
                # (a payload of small_frame_bytes or more is never small, whatever its header)
                if (lane is None or frame.nbytes >= self._small
                        or not lane(topic, frame, seq, self.publisher_id, cfg.checksum, deadline)):
                    parts = stamp_parts(frame, seq, self.publisher_id, cfg.checksum)
                    nbytes = len(parts[0]) + frame.nbytes
                    if nbytes > cfg.max_frame_bytes:
                        raise FrameTooLarge(f"frame of {nbytes} bytes on {topic!r} exceeds max_frame_bytes "
                                            f"{cfg.max_frame_bytes} (raise it with connect(max_frame_bytes=...))")
                    t = self._t
                    if nbytes <= t.small_frame_bytes:
                        t.send_small(topic, parts, nbytes, self.publisher_id, frame.frame_id, deadline)
                    else:
                        msg = t.outgoing(topic, parts, nbytes, self.publisher_id, frame.frame_id)
                        rest = t.send(msg, deadline)
                self._seq[topic] = seq                         # a refused frame leaves no gap behind
                self.published += 1
                if rest is not None:
                    with self._rested:                     # close() waits for it
                        self._resting += 1
            except MsightFastError as e:
                raise self._failed(e) from None
            finally:
                self._lock.release()
            if rest is not None:
                # the wait for the frame to leave the caller's memory, out of turn: the next thread's
                # frame is handed over meanwhile (a 30 Hz JPEG need not wait behind four cameras'
                # writes). A frame that fails here had its turn: its number is gone, and the
                # backend counts it lost
                try:
                    rest()
                except MsightFastError as e:
                    raise self._failed_after_turn(e, deadline) from None
                finally:
                    with self._rested:
                        self._resting -= 1
                        self._rested.notify_all()
        finally:
            if long is not None:
                long.release()
        if msg is not None and getattr(msg, "zero_copy", False):
            # readers may be reading the slot the loan lies in: it is written no more, through the
            # array given or the one a ready Frame wraps
            lent = obj if isinstance(obj, np.ndarray) else frame.array
            if lent is not None:
                lent.flags.writeable = False
        return frame

    def loan(self, topic: str, shape: Union[int, Tuple[int, ...]], dtype: Any = np.uint8) -> np.ndarray:
        """A writable array for the next frame on ``topic``. On shm it lies in a shared slot, and
        ``publish(topic, array)`` copies nothing (the array then turns read-only; write the next
        frame into a new loan). On other backends it is a plain new array, so the same code runs
        everywhere. An array dropped without a publish gives its slot back."""
        if self._closed:
            raise ValueError("loan on a closed Bus")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty str")
        dt = np.dtype(dtype)
        shp = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        if any(d < 0 for d in shp):
            raise ValueError(f"negative dimension in shape {shp}")
        count = 1
        for d in shp:
            count *= d
        nbytes = count * dt.itemsize
        if nbytes > self.config.max_frame_bytes:
            raise FrameTooLarge(f"a loan of {nbytes} bytes on {topic!r} exceeds max_frame_bytes "
                                f"{self.config.max_frame_bytes}")
        lend = getattr(self._t, "loan", None)
        if lend is None:
            return np.empty(shp, dt)
        timeout = self.config.publish_timeout_s
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise BackendUnavailable(f"{self.backend}: loan on {topic!r} waited {timeout} s for the publishes "
                                     "ahead of it")
        try:
            view, loan_id = lend(topic, nbytes, deadline)
        except MsightFastError as e:
            raise _scrubbed(e) from None
        finally:
            self._lock.release()
        if not count:
            return np.empty(shp, dt)
        # the finalizer goes on the array every view of the loan has as its base (numpy gives
        # reshapes and slices the frombuffer array as .base): the slot is freed only when none is left
        base = np.frombuffer(view, dtype=dt, count=count)
        weakref.finalize(base, self._t.unloan, topic, loan_id)   # type: ignore[attr-defined]
        return base.reshape(shp)

    def _send_bytes(self, topic: str, data: bytes) -> None:
        """The caller's bytes as one message, untouched (the MSight drop-in's plain mode)."""
        if self._closed:
            raise ValueError("publish on a closed Bus")
        deadline = self._take_turn(topic)
        try:
            self._t.send_bytes(topic, bytes(data), deadline, key=self.publisher_id)
            self.published += 1
        except MsightFastError as e:
            raise self._failed(e) from None
        finally:
            self._lock.release()

    # The turn of a send, as plain calls around a try block: a context manager per frame cost more
    # than a small frame's whole encode.
    def _take_turn(self, topic: str, lock: Optional[threading.Lock] = None, deadline: float = 0.0) -> float:
        """Wait at most publish_timeout_s (or until ``deadline``, when given) for this thread's
        turn to put a message on the wire: ``lock``, the Bus's by default (it is then held: the
        caller releases it); returns the send's deadline."""
        lock = self._lock if lock is None else lock
        timeout = self.config.publish_timeout_s
        if not deadline:
            deadline = time.monotonic() + timeout
        if not lock.acquire(False) and not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.publish_errors += 1
            raise BackendUnavailable(f"{self.backend}: publish on {topic!r} waited {timeout} s for the "
                                     "publishes ahead of it (is the broker away?)")
        return deadline

    def _failed_after_turn(self, e: MsightFastError, deadline: float) -> MsightFastError:
        """``_failed`` for a frame counted published whose send then failed: counted as a
        failure and not as published, under the lock if it comes by the frame's ``deadline``
        (publish keeps its bound; a count then made without it may race another thread's)."""
        got = self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        try:
            self.published -= 1
            return self._failed(e)
        finally:
            if got:
                self._lock.release()

    def _failed(self, e: MsightFastError) -> MsightFastError:
        """A send's error as the caller sees it: counted (a frame too large is the caller's, not a
        failure of the bus) and with secrets masked."""
        if isinstance(e, FrameTooLarge):
            return e
        self.publish_errors += 1
        return _scrubbed(e)

    def subscribe(self, topic: str, *, group_id: Optional[str] = None, from_beginning: bool = False,
                  start: StartLike = None) -> Subscription:
        """Subscribe to ``topic``. ``group_id``: a NATS queue group / Kafka consumer group (see
        ``capabilities.groups``); on a node Bus the node's group applies unless one is given.

        ``start`` (backends with ``capabilities.persistence`` only) says where to start reading the
        retained log: ``"beginning"``, ``"end"``, an int offset, a ``datetime`` or a
        ``Start.time(ns)``. ``from_beginning=True`` is ``start="beginning"``. A group that has
        committed offsets still starts at ``start`` when this member is first assigned a partition.
        """
        global _warned_no_groups
        if self._closed:
            raise ValueError("subscribe on a closed Bus")
        caps = self._t.capabilities
        if start is not None and from_beginning:
            raise ConfigError("give start= or from_beginning=True, not both")
        where = _start(start, False)          # from_beginning alone stays what it was: ignored without persistence
        if where is not None and where.kind != "end" and not caps.persistence:
            raise ConfigError(f"{self.backend} keeps no messages: start={start!r} needs a backend with "
                              "persistence (kafka, memory)")
        if not self._t.LENIENT:
            if group_id and caps.groups is None:
                raise ConfigError(f"{self.backend} is broadcast only: every subscriber gets every frame; "
                                  f"group_id={group_id!r} needs a backend with groups (nats: queue groups, "
                                  "kafka: consumer groups)")
            if from_beginning and not caps.persistence:
                raise ConfigError(f"{self.backend} keeps no messages: from_beginning=True needs a backend with "
                                  "persistence (kafka, memory)")
        gid = group_id
        if gid is None and self.node is not None:
            gid = self.node.effective_group(self.backend) if caps.groups else self.node.group_id
        if gid and caps.groups is None:
            if not _warned_no_groups:
                log.warning("msight_fast: group_id is ignored on %s (broadcast only); every subscriber "
                            "gets every frame", self.backend.capitalize())
                _warned_no_groups = True
            gid = None
        try:
            if where is None or where.kind == "end" and not caps.persistence:
                src = self._t.open(topic, gid, from_beginning and caps.persistence)
            else:
                src = self._t.open(topic, gid, where.kind == "beginning", where)
        except MsightFastError as e:
            raise _scrubbed(e) from None
        sub = Subscription(self, topic, src, self.config, gid, whole_stream=not gid)
        with self._lock:
            self._subs = [s for s in self._subs if not s._closed] + [sub]
        return sub

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait for every acknowledgement the backend gives; raises PublishError listing failures."""
        try:
            self._t.flush(timeout)
        except MsightFastError as e:
            raise _scrubbed(e) from None

    def stats(self) -> BusStats:
        """Publisher-side counters: published, publish_errors, and the backend's connected,
        disconnects, reconnects and lost (frames a publish accepted that a cut then lost)."""
        out: Dict[str, Any] = {"backend": self.backend, "published": self.published,
                               "publish_errors": self.publish_errors}
        out.update(self._t.stats())
        return cast(BusStats, out)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs, self._subs = self._subs, []
        with self._rested:
            # publishes handed over before, and still waiting for their writes: the backend's
            # close would drop what they have not written (each waits publish_timeout_s at most)
            self._rested.wait_for(lambda: not self._resting, self.config.publish_timeout_s)
        for s in subs:
            s.close()
        self._t.close()

    def __enter__(self) -> Bus:
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
    return _connect(backend, options, None)


def _connect(backend: Optional[str], options: Dict[str, Any], node: Optional[NodeConfig]) -> Bus:
    name = registry.backend_name(backend)
    cfg = registry.load_config(name, options)
    cls = registry.transport_class(name)
    try:
        transport = cls(cfg)  # type: ignore[call-arg]  # every backend takes its config; the ABC has no __init__
    except MsightFastError as e:
        raise _scrubbed(e) from None
    return Bus(transport, cfg, node)


def connect_node(config: NodeConfig) -> Bus:
    """``connect()`` for an MSight node: on NATS ``group_id`` makes a queue group (none:
    broadcast); on Kafka the group is ``group_id``, else ``<name>_group``; on Redis ``group_id``
    is ignored with one logged warning."""
    return _connect(config.backend, dict(config.options or {}), config)
