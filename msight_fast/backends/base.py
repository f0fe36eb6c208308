"""The backend contract: what a transport must do, and what it declares it can do.

A backend is one module in this package with a ``Transport`` subclass and an entry in
``msight_fast.registry``. The Bus above it adds everything backend-independent: sequence numbers,
encoding, fragmentation (decided once, from ``Transport.max_message``), statistics and locking.
"""
from __future__ import annotations

import abc
import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Deque, Dict, List, Literal, Optional, Sequence, Tuple, Union

from ..codec import Frame, fragment

__all__ = ["Capabilities", "Outgoing", "Transport", "Source", "BoundedQueue", "Token",
           "Delivery", "GroupKind", "Start"]

Delivery = Literal["best_effort", "at_least_once"]
GroupKind = Literal["queue", "consumer"]
Token = Any


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers; the Bus, the CLI, the conformance suite and the README's table ask it.

    - ``delivery``: ``best_effort`` (a frame may be lost, and the loss is counted) or
      ``at_least_once`` (kept until a subscriber has handed it to the application; may repeat).
    - ``groups``: None (``group_id`` is ignored: every subscriber gets every frame), ``queue``
      (each frame reaches one live member; nothing is kept for a member that is away) or
      ``consumer`` (each frame reaches one member; a dead member's frames go to the others).
    - ``persistence``: frames are retained and ``from_beginning=True`` replays them.
    - ``max_message``: the largest message the broker takes, when it is the same for every topic
      (None: no limit, or per topic: see ``Transport.max_message``).
    """
    delivery: Delivery
    groups: Optional[GroupKind]
    persistence: bool
    max_message: Optional[int] = None


@dataclass(frozen=True)
class Start:
    """Where a new subscription starts reading a retained log.

    ``kind`` is ``"beginning"``, ``"end"`` (only what is published from now on), ``"offset"``
    (``value`` is the offset of the first message, in every partition) or ``"time"`` (``value``
    is ns since the epoch: the first message at or after it, by the broker's timestamps).
    Build one with the classmethods, or pass ``start=`` to ``Bus.subscribe`` as a str, an int
    offset or a ``datetime``.
    """
    kind: Literal["beginning", "end", "offset", "time"]
    value: int = 0

    @classmethod
    def beginning(cls) -> Start:
        return cls("beginning")

    @classmethod
    def end(cls) -> Start:
        return cls("end")

    @classmethod
    def offset(cls, offset: int) -> Start:
        return cls("offset", int(offset))

    @classmethod
    def time(cls, ns: int) -> Start:
        """The first message at or after ``ns`` nanoseconds since the epoch."""
        return cls("time", int(ns))


@dataclass
class Outgoing:
    """One frame on its way out: either whole (``parts``, written back to back as one message)
    or split into ``fragments`` (each one message, all with the same key)."""
    topic: str
    publisher_id: int
    frame_id: int
    nbytes: int
    parts: Sequence[Any] = ()
    fragments: Optional[List[bytes]] = None

    def joined(self) -> bytes:
        """The whole message as one ``bytes`` (for clients that take nothing else)."""
        return b"".join(self.parts)

    def messages(self) -> List[bytes]:
        """What goes on the wire, one item per broker message."""
        return self.fragments if self.fragments is not None else [self.joined()]


class Source(abc.ABC):
    """What a backend gives a Subscription: raw messages (whole frames or fragments).

    One thread at a time calls ``next``; ``close`` may come from any thread.
    """

    @abc.abstractmethod
    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Token]]:
        """The next message and an opaque token (None if the backend keeps no offsets), or None
        once ``timeout`` seconds pass. Must return within the timeout plus a small slack, whatever
        the network does; a lost connection is re-established here, not raised. The message may
        be a whole frame already decoded (a ``Frame``, no larger than ``max_frame_bytes``): a
        backend that unpacks many frames from one broker message decodes them together, and may
        give that message's token with its last frame only (None with the others). So the caller
        hands (``handed``) or holds what it took before it calls ``next`` again."""

    def handed(self, frame: Any, tokens: List[Token]) -> None:
        """A frame made of the messages with these tokens was handed to the application (or
        dropped, ``frame`` None): at-least-once backends may release them."""

    def recv_lane(self, sub: Any) -> Optional[Callable[[], Optional[Frame]]]:
        """``sub``'s receive of a ready frame in one compiled call (``codec.RecvLane``), where the
        source has one: it returns the frame, counted and handed, or None with nothing taken, and
        ``Subscription.recv`` goes the usual way. None here."""
        return None

    def ack(self) -> None:
        """Everything handed so far is done with (Kafka commits it); after ``close`` a no-op."""

    def stats(self) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        """Stop; a ``next`` blocked in another thread returns None soon after."""


def _finish(rest: Optional[Callable[[], None]]) -> None:
    """The rest of a send (``Transport.send``), where there is one."""
    if rest is not None:
        rest()


class Transport(abc.ABC):
    """A connection to one broker: sends messages and opens subscription sources.

    ``send``, ``send_small`` and ``add_small`` are called by one thread at a time (the Bus
    serialises publishers); ``open``, ``flush``, ``stats`` and ``close`` may come from any thread.
    """

    name: ClassVar[str] = "?"
    # what the backend declares before connecting (registry.capabilities); ``capabilities`` may
    # refine it once connected (a broker's own message limit)
    CAPABILITIES: ClassVar[Capabilities]
    capabilities: Capabilities
    # True: ``send`` gets frames over ``max_message`` whole (``fragments`` None) and splits them itself
    # (into buffers of its own, in the wire format's fragments), instead of the Bus doing it
    FRAGMENTS_ITSELF: ClassVar[bool] = False
    # True: ``group_id`` and ``from_beginning`` on a backend without groups or persistence are
    # ignored with a warning, as MSight Core's clients do (Redis); False: a ConfigError (shm, which
    # has no MSight Core counterpart whose callers to keep working)
    LENIENT: ClassVar[bool] = True

    def max_message(self, topic: str) -> Optional[int]:
        """The largest message for ``topic``; frames above it are fragmented, by the Bus or, where
        ``FRAGMENTS_ITSELF``, by ``send``."""
        return self.capabilities.max_message

    @abc.abstractmethod
    def send(self, msg: Outgoing, deadline: float) -> Optional[Callable[[], None]]:
        """Hand one frame to the broker (or the client library's queue), by ``deadline``
        (``time.monotonic()``): past it raise ``BackendUnavailable``; never block without bound.
        A lost connection is re-established here, within the deadline.

        Returns None, or the rest of the send: a call that waits, by ``deadline`` too, until the
        frame needs the caller's memory no more, and raises as ``send`` does. The Bus makes that
        call after the next frame's ``send`` may begin, so that one thread's large frame does not
        hold back another's. Each topic's frames, and each thread's, go in the order of their
        ``send`` calls; frames of other topics and threads may pass a long one."""

    # payloads from this many bytes are long: sent in many writes that the caller waits for (the
    # rest of ``send``). A Bus sends them one at a time, each taking its turn once the one before
    # is written, and lets other frames pass them meanwhile; 0: none are
    long_frame_bytes: int = 0

    # frames of at most this many bytes (header included) go through ``send_small``; 0: none do.
    # A backend that lends its buffers (``Outgoing.zero_copy``) keeps it 0: send_small reports no loan
    small_frame_bytes: int = 0

    def send_small(self, topic: str, parts: Sequence[Any], nbytes: int, publisher_id: int, frame_id: int,
                   deadline: float) -> None:
        """``send`` of a frame of at most ``small_frame_bytes``, given by its fields instead of an
        ``Outgoing`` (a backend that batches small frames spares itself one per frame). Still
        fragmented above ``max_message``, as what goes to ``send``."""
        _finish(self.send(self.outgoing(topic, parts, nbytes, publisher_id, frame_id), deadline))

    def add_small(self, topic: str, frame: Frame, seq: int, publisher_id: int, checksum: bool,
                  deadline: float) -> bool:
        """Stamp and take a small ``frame`` in one call, where the backend can (a batch open for
        ``topic``); False, with nothing taken or sent (the frame may be stamped), and the Bus goes
        the usual way. Only called where a transport overrides it and ``small_frame_bytes`` is set."""
        return False

    def small_lane(self, bus: Any) -> Optional[Callable[[str, Any, Dict[str, Any]], Union[Frame, Tuple[Frame], None]]]:
        """``bus``'s whole publish of a small frame in one compiled call (``codec.SmallLane``), where
        the backend has one: called as ``lane(topic, obj, frame_fields)``, it returns the frame it
        published, or else, with nothing done, None or ``(frame,)`` (built, not published), and
        ``Bus.publish`` goes the usual way. None here."""
        return None

    def outgoing(self, topic: str, parts: Sequence[Any], nbytes: int, publisher_id: int, frame_id: int) -> Outgoing:
        """The ``Outgoing`` that ``send`` takes for a frame: in fragments above ``max_message``,
        unless the backend ``FRAGMENTS_ITSELF``."""
        msg = Outgoing(topic, publisher_id, frame_id, nbytes, parts)
        if not self.FRAGMENTS_ITSELF:
            limit = self.max_message(topic)
            if limit is not None and nbytes > limit:
                msg.fragments = fragment(parts, limit)     # one copy, straight from the parts
        return msg

    def send_bytes(self, topic: str, data: bytes, deadline: float, key: int = 0) -> None:
        """Send the caller's bytes as one message, untouched (the MSight drop-in); ``key`` stands
        in for the publisher id where the backend partitions by it."""
        limit = self.max_message(topic)
        if limit is not None and len(data) > limit:
            from ..errors import FrameTooLarge
            raise FrameTooLarge(f"{len(data)} bytes on {topic!r} exceed the broker's message limit {limit}; "
                                "use framed mode to have them fragmented")
        _finish(self.send(Outgoing(topic, key, 0, len(data), parts=[data]), deadline))

    @abc.abstractmethod
    def open(self, topic: str, group_id: Optional[str], from_beginning: bool, start: Optional[Start] = None) -> Source:
        """A source of ``topic``'s messages (``group_id``: shared by a group; see Capabilities).

        ``start`` (None: live, or the beginning when ``from_beginning``) is only passed to a backend
        with ``persistence``; the Bus refuses it for the others."""

    def flush(self, timeout: Optional[float]) -> None:
        """Wait for the acknowledgements the backend gives; ``PublishError`` lists failures."""

    def stats(self) -> Dict[str, Any]:
        """Publisher-side counters: ``connected``, ``disconnects``, ``reconnects`` and ``lost``
        (messages a publish accepted that a cut or a failure then lost: a frame, or a fragment
        where the backend cannot tell which frame a message belonged to)."""
        return {}

    def close(self) -> None:
        pass


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
