"""Per-subscription accounting: sequence gaps and duplicates, and latency percentiles."""
from __future__ import annotations

import array
import collections
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypedDict

import numpy as np

from ._impl import HAS_EXTENSIONS, impl

__all__ = ["SeqTracker", "LatencyWindow", "Tally", "PyTally", "SubscriptionStats", "BusStats"]


class SubscriptionStats(TypedDict, total=False):
    """What ``Subscription.stats()`` returns. The first group is there on every backend; the
    rest where the backend counts it (see the README's "Threads, faults and what is counted")."""

    topic: str
    received: int
    bytes: int
    gaps: Optional[int]                    # None for a group member: it does not see whole streams
    duplicates: int
    publishers: int
    rejected: int
    dropped: int
    fragments_expired: int
    fragments_evicted: int
    fragments_refused: int
    latency_p50_ns: Optional[int]          # None before the first frame
    latency_p99_ns: Optional[int]
    latency_max_ns: Optional[int]
    # the connection (Redis, NATS, Kafka) and the receive queue (NATS, Kafka, memory)
    connected: bool
    disconnects: int
    reconnects: int
    last_outage_s: Optional[float]
    pending_bytes: int
    # a Kafka consumer group member
    lag: Optional[int]
    redelivered: int
    replayed: int
    offset_resets: int
    log_lost: int
    assigned_partitions: List[int]
    assignments: int
    consumer_errors: int
    paused: bool
    # shm
    segments: int                          # publisher segments this subscription reads
    segments_refused: int                  # segments it could not join (malformed, or every reader row taken)


class BusStats(TypedDict, total=False):
    """What ``Bus.stats()`` returns: the first group on every backend, the rest where counted."""

    backend: str
    published: int
    publish_errors: int
    connected: bool
    disconnects: int
    reconnects: int
    lost: int
    last_outage_s: Optional[float]         # NATS, Kafka
    # Kafka's producer
    producer_recreated: int
    topics_recreated: int
    broker_state_lost: int
    idempotent: bool
    queued: Optional[int]
    # shm
    dropped: int                           # frames not published: readers held every slot (full_policy=drop)
    overrun: int                           # frames overwritten before a reader that wanted them took them
    readers_reaped: int                    # dead readers' rows (and held slots) freed
    zero_copy: int                         # publishes of loaned arrays
    blocked: int                           # publishes that waited for a slot (full_policy=block)


class _Pub:
    __slots__ = ("high", "low", "holes")

    def __init__(self, seq: int) -> None:
        self.high = seq                  # highest seq seen
        self.low = seq                   # below this nothing is known: neither gap nor duplicate
        self.holes: collections.OrderedDict[int, None] = collections.OrderedDict()


class SeqTracker:
    """Gaps and duplicates from (publisher_id, seq), tolerant of reordering, in bounded memory.

    A skipped sequence number counts as a gap until it arrives late (then it is not a gap); a
    number at or below the highest seen that is not an outstanding hole is a duplicate. At most
    ``max_holes`` holes are remembered per publisher and ``max_publishers`` publishers (the least
    recently seen are forgotten), so a long run or many restarted publishers cost a fixed amount.
    """

    def __init__(self, max_publishers: int = 1024, max_holes: int = 4096) -> None:
        self.max_publishers = max_publishers
        self.max_holes = max_holes
        self._pubs: collections.OrderedDict[int, _Pub] = collections.OrderedDict()
        self.gaps = 0
        self.duplicates = 0
        self.forgotten = 0
        # the publisher seen last, always the last in _pubs: its next number in order is the
        # common case, and needs neither the lookup nor the move
        self._hot_pub: Optional[int] = None
        self._hot: Optional[_Pub] = None

    def see(self, pub: int, seq: int) -> None:
        st = self._hot
        if pub == self._hot_pub and st is not None and seq == st.high + 1:
            st.high = seq
            return
        st = self._pubs.get(pub)
        if st is None:
            st = self._pubs[pub] = _Pub(seq)
            self._hot_pub, self._hot = pub, st
            if len(self._pubs) > self.max_publishers:
                gone, _ = self._pubs.popitem(last=False)
                self.forgotten += 1
                if gone == pub:                # max_publishers 0: nothing is kept
                    self._hot_pub = self._hot = None
            return
        self._hot_pub, self._hot = pub, st
        self._pubs.move_to_end(pub)
        if seq > st.high:
            if seq - st.high > 1:
                self.gaps += seq - st.high - 1
                holes = st.holes
                start = max(st.high + 1, seq - self.max_holes)
                if start > st.high + 1:          # a jump too long to remember hole by hole
                    holes.clear()
                    st.low = start
                for s in range(start, seq):
                    holes[s] = None
                while len(holes) > self.max_holes:
                    s, _ = holes.popitem(last=False)
                    st.low = s + 1
            st.high = seq
        elif seq in st.holes:
            del st.holes[seq]
            self.gaps -= 1
        elif seq >= st.low:
            self.duplicates += 1

    @property
    def publishers(self) -> int:
        return len(self._pubs)

    def publisher_ids(self) -> List[int]:
        return list(self._pubs)


class LatencyWindow:
    """The last ``n`` publish-to-receipt latencies, for percentiles. A compiled ``Tally`` writes
    into ``_a`` directly: the ring is made once and never replaced."""

    def __init__(self, n: int = 8192) -> None:
        self._a = array.array("q", bytes(8 * n))    # cheaper per message than a numpy setitem
        self._n = n
        self._i = 0

    def add(self, ns: int) -> None:
        if -(1 << 63) <= ns < (1 << 63):          # a forged timestamp must not raise here
            self._a[self._i % self._n] = ns
            self._i += 1

    def summary(self) -> Dict[str, Optional[int]]:
        n = min(self._i, self._n)
        if not n:
            return {"latency_p50_ns": None, "latency_p99_ns": None, "latency_max_ns": None}
        a = np.frombuffer(self._a, dtype=np.int64)[:n]
        p50, p99 = np.percentile(a, [50, 99])
        return {"latency_p50_ns": int(p50), "latency_p99_ns": int(p99), "latency_max_ns": int(a.max())}


class PyTally:
    """What a Subscription counts of each frame it hands over, in one call: ``received``,
    ``nbytes``, the publish-to-receipt latency (into ``window``, by ``clock``) and the sequence
    (into ``tracker``). The twin of the compiled ``Tally``, which keeps the common case (the same
    publisher's next number) to itself and writes it back on ``sync``: call ``sync`` before
    reading ``tracker`` or ``window``, and feed ``tracker`` only through ``took``."""

    __slots__ = ("received", "nbytes", "tracker", "window", "_clock")

    def __init__(self, tracker: SeqTracker, window: LatencyWindow, clock: Callable[[], int]) -> None:
        self.received = 0
        self.nbytes = 0
        self.tracker = tracker
        self.window = window
        self._clock = clock

    def took(self, frame: Any) -> None:
        """Count ``frame``, a whole frame handed over now."""
        self.received += 1
        self.nbytes += frame.nbytes
        ts = frame.publish_ts_ns
        if ts:                                  # any i64 from the wire: the window drops the absurd
            self.window.add(self._clock() - ts)
        pid = frame.publisher_id
        if pid:
            self.tracker.see(pid, frame.seq)

    def took_bytes(self, nbytes: int) -> None:
        """Count a message handed over as it came (not a frame: no latency, no sequence)."""
        self.received += 1
        self.nbytes += nbytes

    def sync(self) -> None:
        """Bring ``tracker`` and ``window`` up to date (nothing to do here)."""


if TYPE_CHECKING:
    Tally = PyTally
else:
    # the compiled one where the core is built (benchmarks/README.md, "Kafka small frames: stamped
    # into the batch")
    Tally = impl.Tally if HAS_EXTENSIONS else PyTally
