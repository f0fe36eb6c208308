"""In-process backend: ``connect("memory")``. No broker, no network, no thread.

It models every semantics the real backends offer, so nodes and the conformance suite can be
tested without a broker (as FastStream's test brokers do):

- broadcast: every subscriber without a group gets every message;
- groups (``group_id``): each frame reaches exactly one live member, in turn (a ``queue``
  group, as NATS: what a member had queued when it closed is gone with it);
- a retained log per topic, bounded by ``retain_bytes``: ``from_beginning=True`` replays it,
  and ``start`` picks where to begin: ``end``, an offset (a frame's index among every frame
  ever published on the topic; one before what is retained starts at the oldest retained) or a
  time (the first frame logged at or after it, by ``time.time_ns()`` when it was logged);
- a message limit (``max_message_bytes``, 1 MiB by default, as NATS): larger frames are
  fragmented by the Bus, into the same fragments the brokers' transports make.

Buses connected with the same ``name`` (default ``"default"``) share one broker within the process.
Each subscription's queue is bounded by ``max_pending_bytes`` (``drop_policy``), drops counted.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from typing import Any, Deque, Dict, List, Optional, Tuple

from .base import BoundedQueue, Capabilities, Outgoing, Source, Start, Transport

__all__ = ["MemoryTransport", "MemorySource", "reset"]


class _Group:
    def __init__(self) -> None:
        self.members: List[MemorySource] = []
        self.turn = 0


class _Topic:
    def __init__(self) -> None:
        self.broadcast: List[MemorySource] = []
        self.groups: Dict[str, _Group] = {}
        # the retained frames: (messages, bytes, time.time_ns() when logged); log[0] is the frame
        # with offset ``base`` (frames trimmed from the head move it on)
        self.log: Deque[Tuple[List[bytes], int, int]] = collections.deque()
        self.log_bytes = 0
        self.base = 0

    def retained(self, start: Start) -> List[List[bytes]]:
        """The retained frames from ``start`` on (called with the broker's lock held)."""
        if start.kind == "beginning":
            first = 0
        elif start.kind == "offset":
            first = max(0, start.value - self.base)
        elif start.kind == "time":                 # from the first one on, as Kafka's seek by time
            first = next((i for i, (_, _, ts) in enumerate(self.log) if ts >= start.value), len(self.log))
        else:
            first = len(self.log)
        return [msgs for msgs, _, _ in itertools.islice(self.log, first, None)]


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.topics: Dict[str, _Topic] = {}

    def topic(self, name: str) -> _Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = _Topic()
        return t


_brokers: weakref.WeakValueDictionary[str, _Broker] = weakref.WeakValueDictionary()
_brokers_lock = threading.Lock()


def _broker(name: str) -> _Broker:
    with _brokers_lock:
        b = _brokers.get(name)
        if b is None:
            b = _Broker()
            _brokers[name] = b
        return b


def reset(name: str = "default") -> None:
    """Forget every topic, retained message and subscriber of the named in-process broker."""
    with _brokers_lock:
        _brokers.pop(name, None)


class MemoryTransport(Transport):
    name = "memory"
    CAPABILITIES = Capabilities(delivery="best_effort", groups="queue", persistence=True,
                                max_message=1 << 20)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.capabilities = Capabilities(delivery="best_effort", groups="queue", persistence=True,
                                         max_message=cfg.max_message_bytes)
        self._broker = _broker(cfg.name)       # held: the broker lives while a Bus uses it
        self._sent = 0

    def send(self, msg: Outgoing, deadline: float) -> None:
        msgs = [bytes(m) for m in msg.messages()]
        nbytes = sum(len(m) for m in msgs)
        b = self._broker
        with b.lock:
            t = b.topic(msg.topic)
            t.log.append((msgs, nbytes, time.time_ns()))
            t.log_bytes += nbytes
            while t.log_bytes > self.cfg.retain_bytes and len(t.log) > 1:
                t.log_bytes -= t.log.popleft()[1]
                t.base += 1
            targets = list(t.broadcast)
            for g in t.groups.values():
                if g.members:                   # every message of one frame to the same member
                    targets.append(g.members[g.turn % len(g.members)])
                    g.turn += 1
        for s in targets:
            for m in msgs:
                s.q.put(m, len(m))
        self._sent += 1

    def open(self, topic: str, group_id: Optional[str], from_beginning: bool,
             start: Optional[Start] = None) -> Source:
        if start is None and from_beginning:
            start = Start.beginning()
        return MemorySource(self, topic, group_id, start)

    def stats(self) -> Dict[str, Any]:
        return {"connected": True, "disconnects": 0, "reconnects": 0, "lost": 0}


class MemorySource(Source):
    """A subscription's queue; ``start`` (None: live) replays retained frames into it first."""

    def __init__(self, t: MemoryTransport, topic: str, group_id: Optional[str], start: Optional[Start] = None) -> None:
        self.t = t
        self.topic = topic
        self.group_id = group_id
        self.q = BoundedQueue(t.cfg.max_pending_bytes, t.cfg.drop_policy)
        b = t._broker
        with b.lock:
            tp = b.topic(topic)
            if start is not None:
                for msgs in tp.retained(start):
                    for m in msgs:
                        self.q.put(m, len(m))
            if group_id:
                tp.groups.setdefault(group_id, _Group()).members.append(self)
            else:
                tp.broadcast.append(self)

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        got = self.q.get(timeout)
        return None if got is None else (got[0], None)

    def stats(self) -> Dict[str, Any]:
        return {"dropped": self.q.dropped, "pending_bytes": self.q.nbytes}

    def close(self) -> None:
        b = self.t._broker
        with b.lock:
            tp = b.topic(self.topic)
            if self.group_id:
                g = tp.groups.get(self.group_id)
                if g is not None and self in g.members:
                    g.members.remove(self)
            elif self in tp.broadcast:
                tp.broadcast.remove(self)
        self.q.close()
