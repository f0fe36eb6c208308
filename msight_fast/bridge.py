"""Forward frames from one bus to another: ``Bridge(topics, src=bus_a, dst=bus_b)``.

Any pair of backends in the registry works, e.g. a same-host fast path next to remote
subscribers (``msight-fast bridge --from shm --to nats cam/front``). Each topic gets a
subscription on ``src`` and a thread that republishes every frame it receives on ``dst`` under
the same topic name.

What carries over and what does not: the payload, encoding, sensor and device names, meta,
frame_id, capture and creation times are the source frame's. ``dst`` gives each frame a new
seq, publisher id and publish time (the bridge is the publisher there), so a subscriber of
``dst`` measures its latency from the bridge and sees gaps only for what was lost after it.
What was lost before it is in the bridge's own ``stats()``: the source subscription's gaps and
drops, and ``failed``: frames received that ``dst`` refused or could not take (a publish error:
the frame is dropped, counted, logged at most every few seconds, and the next frame tries again).

Never point a bridge at its own source (the same broker, the same topics): every frame it
publishes would come back to it and be published again, without end. ``Bridge`` refuses the
same Bus object for both sides; the CLI refuses the same backend name unless ``--allow-same``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Union

from .errors import ConfigError, MsightFastError, PublishError

if TYPE_CHECKING:
    from .bus import Bus, Subscription
    from .codec import Frame

__all__ = ["Bridge"]

log = logging.getLogger("msight_fast")

_RECV_TIMEOUT_S = 0.2          # how often a forwarding thread looks at the stop flag
_LOG_EVERY_S = 5.0             # publish failures of one topic are logged at most this often
_STOP_TIMEOUT_S = 10.0         # what stop() gives the threads (one may be in a publish of up to
                               # publish_timeout_s) and then the flush of dst, all together
_FLUSH_TIMEOUT_S = 5.0         # the most of that spent flushing dst


class _Topic:
    """One forwarded topic: its subscription, thread and counters (under the Bridge's lock)."""

    def __init__(self, name: str, sub: Subscription) -> None:
        self.name = name
        self.sub = sub
        self.thread: Optional[threading.Thread] = None
        self.forwarded = 0
        self.failed = 0
        self.failed_by: Dict[str, int] = {}           # error type name -> count
        self.undelivered = 0                           # forwarded, then reported failed by dst's flush
        self.recv_errors = 0
        self.last_error: Optional[str] = None
        self.unlogged = 0                              # failures since the last log line
        self.last_log = -float("inf")
        self.final: Optional[Dict[str, Any]] = None    # the subscription's stats as the bridge stopped


class Bridge:
    """Forwards ``topics`` from the Bus ``src`` to the Bus ``dst`` until ``stop()``.

    ``group_id`` subscribes in that group on ``src`` (several bridges then share the frames, on a
    backend with groups). The Buses stay the caller's: ``stop()`` closes only the bridge's
    subscriptions. Thread-safe; a context manager (starts on enter, stops on exit).
    """

    def __init__(self, topics: Union[str, Iterable[str]], *, src: Bus, dst: Bus,
                 group_id: Optional[str] = None) -> None:
        items = [topics] if isinstance(topics, str) else list(topics)
        for t in items:
            if not isinstance(t, str) or not t:
                raise ConfigError(f"Bridge: a topic is a non-empty str, not {t!r}")
        if not items:
            raise ConfigError("Bridge: give at least one topic")
        if src is dst:
            raise ConfigError("Bridge: src and dst are the same Bus: every frame forwarded would be "
                              "received again and forwarded again, without end")
        self.topics: List[str] = list(dict.fromkeys(items))     # each once, in the order given
        self.src = src
        self.dst = dst
        self.group_id = group_id
        self.undelivered = 0             # failures dst's flush reported without naming a topic
        self._topics: List[_Topic] = []
        self._lock = threading.Lock()    # the counters
        self._stop = threading.Event()
        self._started = False
        self._stopped = False

    # -- life cycle
    def start(self) -> Bridge:
        """Subscribe to every topic on ``src`` and start forwarding; returns self.

        Frames published on ``src`` after this returns are forwarded. Raises what ``subscribe``
        raises (nothing is left open then)."""
        if self._started:
            raise RuntimeError("Bridge.start() was called already")
        self._started = True
        try:
            for name in self.topics:
                self._topics.append(_Topic(name, self.src.subscribe(name, group_id=self.group_id)))
        except BaseException:
            self._stopped = True
            self._stop.set()
            for t in self._topics:
                t.sub.close()
            raise
        for t in self._topics:
            t.thread = threading.Thread(target=self._run, args=(t,), daemon=True,
                                        name=f"msight-fast-bridge {t.name}")
            t.thread.start()
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> Dict[str, Dict[str, Any]]:
        """Stop forwarding and return ``stats()``. Bounded by ``timeout`` seconds: the threads
        are joined (a publish under way may take up to dst's ``publish_timeout_s``), then dst is
        flushed with what is left (at most a few seconds), its delivery failures counted."""
        end = time.monotonic() + timeout
        with self._lock:
            first = not self._stopped
            self._stopped = True
        self._stop.set()
        if first and self._started:
            for t in self._topics:            # a recv blocked in another thread returns soon after
                t.sub.close()
            for t in self._topics:
                th = t.thread
                if th is not None and th is not threading.current_thread():
                    th.join(max(0.0, end - time.monotonic()))
                    if th.is_alive():
                        log.warning("msight_fast: the bridge thread of %r did not stop within %.1f s "
                                    "(a publish to %s is still under way)", t.name, timeout, self.dst.backend)
            for t in self._topics:
                t.final = self._source_stats(t)
            self._flush(max(0.0, min(_FLUSH_TIMEOUT_S, end - time.monotonic())))
        return self.stats()

    def _flush(self, timeout: float) -> None:
        """Push out what dst still holds (Kafka batches), counting the deliveries it reports failed."""
        if timeout <= 0:
            return
        try:
            self.dst.flush(timeout)
        except PublishError as e:
            named = {t.name: t for t in self._topics}
            with self._lock:
                for topic, reason in e.failures or [("?", str(e))]:
                    t = named.get(topic)
                    if t is None:
                        self.undelivered += 1
                    else:
                        t.undelivered += 1
                        t.last_error = f"PublishError: {reason}"
            log.warning("msight_fast: the bridge's last frames to %s were not all delivered: %s",
                        self.dst.backend, e)
        except (MsightFastError, ValueError) as e:     # ValueError: the caller closed dst already
            log.warning("msight_fast: flushing the bridge's frames to %s failed: %s", self.dst.backend, e)

    def __enter__(self) -> Bridge:
        return self.start() if not self._started else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()`` while a forwarding thread is alive."""
        return self._started and not self._stop.is_set() and \
            any(t.thread is not None and t.thread.is_alive() for t in self._topics)

    # -- the threads
    def _run(self, t: _Topic) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                f = t.sub.recv(timeout=_RECV_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - recv raises for nothing the network does; a bug must not end it
                with self._lock:
                    t.recv_errors += 1
                log.error("msight_fast: the bridge could not receive on %r: %r", t.name, e)
                self._stop.wait(_RECV_TIMEOUT_S)
                continue
            if f is None:
                if time.monotonic() - began < _RECV_TIMEOUT_S / 2:
                    # recv returns None before its timeout only once the subscription is closed
                    # (its Bus was closed under the bridge): wait for stop() rather than spin
                    self._stop.wait(_RECV_TIMEOUT_S)
                continue
            try:
                self._forward(t, f)
            finally:
                release = getattr(f, "release", None)    # a frame lent by its backend (shm) goes back now
                if release is not None:
                    try:
                        release()
                    except Exception as e:  # noqa: BLE001 - giving a buffer back must not end forwarding
                        log.error("msight_fast: releasing a frame of %r failed: %r", t.name, e)

    def _forward(self, t: _Topic, f: Frame) -> None:
        try:
            self.dst.publish(t.name, f)
        except MsightFastError as e:           # BackendUnavailable, FrameTooLarge, PublishError, AuthError
            self._failed(t, e)
            return
        except ValueError as e:                # "publish on a closed Bus": the caller closed dst
            if self._stop.is_set():
                return
            self._failed(t, e)
            self._stop.wait(_RECV_TIMEOUT_S)   # every frame will fail alike: do not spin on them
            return
        with self._lock:
            t.forwarded += 1

    def _failed(self, t: _Topic, e: Exception) -> None:
        kind = type(e).__name__
        now = time.monotonic()
        with self._lock:
            t.failed += 1
            t.failed_by[kind] = t.failed_by.get(kind, 0) + 1
            t.last_error = f"{kind}: {e}"
            t.unlogged += 1
            due = now - t.last_log >= _LOG_EVERY_S
            if due:
                n, t.unlogged, t.last_log = t.unlogged, 0, now
        if due:
            log.warning("msight_fast: bridge %s -> %s: %d frame(s) of %r not forwarded since the last report "
                        "(%d in all): %s: %s", self.src.backend, self.dst.backend, n, t.name, t.failed, kind, e)

    # -- numbers
    @staticmethod
    def _source_stats(t: _Topic) -> Dict[str, Any]:
        try:
            return dict(t.sub.stats())
        except Exception as e:  # noqa: BLE001 - the counters of a broken source are not worth an exception
            return {"error": repr(e)}

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per topic: ``forwarded``; ``failed`` (frames received but not published on dst: the
        publish raised) with ``failed_by`` (error type -> count) and ``last_error``;
        ``undelivered`` (forwarded, then reported failed by dst's flush at ``stop()``); the
        source subscription's ``received``, ``gaps``, ``dropped``, ``duplicates`` and
        ``rejected`` (all of its stats under ``source``); and ``dst_publish_errors``,
        ``dst_lost`` and ``dst_connected``: dst's own, for every topic it publishes.

        Every frame the bridge received is forwarded or failed (``received == forwarded +
        failed`` once stopped); what never reached it is in ``gaps`` and ``dropped``; what dst
        lost after taking it is in ``dst_lost`` and in the gaps dst's subscribers count."""
        try:
            d: Dict[str, Any] = dict(self.dst.stats())
        except Exception as e:  # noqa: BLE001 - as above
            d = {"error": repr(e)}
        out: Dict[str, Dict[str, Any]] = {}
        for t in self._topics:
            s = t.final if t.final is not None else self._source_stats(t)
            with self._lock:
                row: Dict[str, Any] = {"forwarded": t.forwarded, "failed": t.failed, "failed_by": dict(t.failed_by),
                                       "undelivered": t.undelivered, "last_error": t.last_error,
                                       "recv_errors": t.recv_errors}
            row.update({k: s.get(k) for k in ("received", "gaps", "dropped", "duplicates", "rejected")})
            row["source"] = s
            row["dst_publish_errors"] = d.get("publish_errors")
            row["dst_lost"] = d.get("lost")
            row["dst_connected"] = d.get("connected")
            out[t.name] = row
        return out

    def __repr__(self) -> str:
        return f"Bridge({self.topics!r}, src={self.src.backend!r}, dst={self.dst.backend!r})"
