"""Record topics to an MCAP file, read it back, and play it back onto a bus.

The file's layout is the one of ``msight_fast/_fox.py``: raw images, compressed images and point
clouds as Foxglove messages (each with a ``<topic>/frame_info`` JSON message carrying everything
else, paired by the MCAP ``sequence`` both share), any other frame whole in the wire format. The
MCAP log time of a message is when the recorder received the frame, its publish time the frame's
``publish_ts_ns``. A metadata record ``msight_fast.recording`` closes the file with what the
recording saw (frames, bytes, gaps, drops per topic).

Needs the ``viz`` extra (``pip install "msight_fast[viz]"``): ``mcap`` to read and write files,
the Foxglove SDK (Python >= 3.10) to record. Both are imported when first used.
"""
from __future__ import annotations

import atexit
import collections
import heapq
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Deque,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

import numpy as np

from . import _fox
from .codec import Frame, encode
from .errors import ConfigError, FrameError, MsightFastError

if TYPE_CHECKING:
    from .bus import Bus, Subscription

__all__ = ["Recorder", "Player", "Recorded", "read_mcap", "messages", "RECORDING_METADATA", "KIND_KEY"]

log = logging.getLogger("msight_fast")

RECORDING_METADATA = "msight_fast.recording"   # name of the MCAP metadata record written at stop
KIND_KEY = "msight_fast.kind"                  # channel metadata: which _fox kind its messages are
VIZ_HINT = 'pip install "msight_fast[viz]"'

_RECV_TIMEOUT_S = 0.2          # how often a recording thread looks at the stop flag
_JOIN_TIMEOUT_S = 5.0          # what stop() gives the recording threads, all together
_FINISH_TIMEOUT_S = 30.0       # what stop() gives the file to be finished (a slow disk)
_MAX_PUBLISHERS = 4096         # publishers per topic whose last seq is kept (the oldest is forgotten)
_MAX_PENDING_INFO = 64         # frame_info messages read ahead of their frames (ours are adjacent)
_DRIFT_WINDOW = 100_000        # frames whose drift the player keeps for the percentiles
_COMPRESSION = ("none", "zstd", "lz4")

PathLike = Union[str, "os.PathLike[str]"]


def _require(*modules: str) -> None:
    """ImportError naming the viz extra when one of ``modules`` is missing."""
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{name} is not installed; MCAP recording and playback need the viz extra: "
                              f"{VIZ_HINT}") from e


def _topic_list(topics: Union[str, Iterable[str], None], what: str) -> Optional[List[str]]:
    if topics is None:
        return None
    items = [topics] if isinstance(topics, str) else list(topics)
    for t in items:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"{what}: a topic is a non-empty str, not {t!r}")
    return list(dict.fromkeys(items))          # each once, in the order given


def _own_subscription(bus: Bus, topic: str, what: str) -> Subscription:
    """Every frame of ``topic``, never a share of them: a node Bus would subscribe in the node's
    group (a Kafka consumer group, a NATS queue group) and take frames away from its members."""
    if bus.node is None:
        return bus.subscribe(topic)
    return bus.subscribe(topic, group_id=f"msight_fast-{what}-{uuid.uuid4().hex}")


# ---------------------------------------------------------------- recording
class _Topic:
    """One recorded topic: its subscription, thread, counters and MCAP channels."""

    def __init__(self, name: str, sub: Subscription) -> None:
        self.name = name
        self.sub = sub
        self.thread: Optional[threading.Thread] = None
        self.seq = 0                                       # MCAP sequence, shared by info and data
        self.last: collections.OrderedDict[int, int] = collections.OrderedDict()   # publisher -> seq
        self.frames = 0
        self.bytes = 0
        self.gaps = 0                                      # the sum of the frame_info gaps
        self.errors = 0
        self.channels: Dict[str, int] = {}                 # kind -> channel id (under the writer lock)
        self.info_channel = 0
        self.final: Optional[Dict[str, Any]] = None        # Subscription.stats() as the recording ended

    def gap(self, frame: Frame) -> int:
        """Frames of this frame's publisher missed just before it (0 for its first one)."""
        pub = frame.publisher_id
        if not pub:
            return 0
        last = self.last.get(pub)
        self.last[pub] = frame.seq if last is None else max(last, frame.seq)
        self.last.move_to_end(pub)
        if len(self.last) > _MAX_PUBLISHERS:
            self.last.popitem(last=False)
        if last is None or frame.seq <= last + 1:
            return 0
        return frame.seq - last - 1


class Recorder:
    """Records ``topics`` into the MCAP file ``path`` until ``stop()`` (or ``duration`` seconds,
    or ``max_bytes`` of messages written).

    One subscription and one thread per topic; frames are converted in their topic's thread and
    written by one MCAP writer under a lock. With ``bus=None`` the recorder connects with
    ``msight_fast.connect(backend, **connect_options)`` and closes that bus at stop; a given bus
    is left open (only the recorder's subscriptions are closed). A broker that goes away is
    reconnected to by the subscriptions themselves; what was lost meanwhile shows in the gaps.

    ``stop()`` finishes the file (also from a signal handler, an exception in a ``with`` block
    or interpreter exit) and returns a summary; ``wait()`` returns once a stop condition ended
    the recording. ``compression`` is ``"none"``, ``"zstd"`` or ``"lz4"`` (MCAP chunks).
    ``progress`` shows frames, MB and MB/s on stderr when it is a terminal.
    """

    def __init__(self, topics: Union[str, Iterable[str]], path: PathLike, *, bus: Optional[Bus] = None,
                 backend: Optional[str] = None, duration: Optional[float] = None, max_bytes: Optional[int] = None,
                 progress: bool = False, compression: str = "none", **connect_options: Any) -> None:
        names = _topic_list(topics, "Recorder")
        if not names:
            raise ConfigError("Recorder: give at least one topic")
        for t in names:
            if t.endswith(_fox.INFO_SUFFIX):
                raise ConfigError(f"Recorder: topic {t!r}: names ending in {_fox.INFO_SUFFIX!r} are the "
                                  "recording's own frame_info channels")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not math.isfinite(duration) or duration <= 0):
            raise ConfigError(f"Recorder: duration={duration!r} must be a positive number of seconds")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes <= 0):
            raise ConfigError(f"Recorder: max_bytes={max_bytes!r} must be a positive int")
        if compression not in _COMPRESSION:
            raise ConfigError(f"Recorder: compression={compression!r} is not one of {', '.join(_COMPRESSION)}")
        if bus is not None and (backend is not None or connect_options):
            raise ConfigError("Recorder: give a bus, or a backend and connect options, not both")
        self.topics = names
        self.path = os.fspath(path)
        self.duration = None if duration is None else float(duration)
        self.max_bytes = max_bytes
        self.progress = progress
        self.compression = compression
        self._bus = bus
        self._own_bus = bus is None
        self._backend = backend
        self._options = connect_options
        self._topics: List[_Topic] = []
        self._lock = threading.Lock()              # the MCAP writer, the channel maps and the counters
        self._done = threading.Event()             # the recording is over: threads stop reading
        self._finished = threading.Event()         # the file is finished (or could not be)
        self._finish_lock = threading.Lock()
        self._writer: Any = None
        self._file: Optional[BinaryIO] = None
        self._schemas: Dict[str, int] = {}
        self._closed = False                       # under _lock: nothing more is written
        self._monitor: Optional[threading.Thread] = None
        self._started = False
        self._start_ns = 0
        self._end_ns = 0
        self._t0 = 0.0
        self._t_end = 0.0
        self._frames = 0
        self._bytes = 0
        self._stopped_by = ""
        self._error: Optional[BaseException] = None
        self._summary: Optional[Dict[str, Any]] = None

    # -- life cycle
    def start(self) -> Recorder:
        """Subscribe to every topic, open the file and start recording; returns self."""
        if self._started:
            raise RuntimeError("Recorder.start() was called already")
        _require("mcap", "foxglove")
        from mcap.writer import CompressionType, Writer
        self._started = True
        try:
            if self._bus is None:
                from . import connect
                self._bus = connect(self._backend, **self._options)
            for name in self.topics:
                self._topics.append(_Topic(name, _own_subscription(self._bus, name, "record")))
            self._file = open(self.path, "wb")
            comp = {"none": CompressionType.NONE, "zstd": CompressionType.ZSTD,
                    "lz4": CompressionType.LZ4}[self.compression]
            self._writer = Writer(self._file, compression=comp, chunk_size=4 << 20)
            from . import __version__
            self._writer.start(profile="", library=f"msight_fast {__version__}")
            self._start_ns = time.time_ns()
            self._t0 = time.monotonic()
            self._t_end = math.inf if self.duration is None else self._t0 + self.duration
            for t in self._topics:
                t.thread = threading.Thread(target=self._record, args=(t,), daemon=True,
                                            name=f"msight-fast-record {t.name}")
                t.thread.start()
            self._monitor = threading.Thread(target=self._watch, daemon=True, name="msight-fast-record")
            self._monitor.start()
            atexit.register(self._at_exit)
        except BaseException:              # KeyboardInterrupt too: nothing may be left open
            self._stopped_by = self._stopped_by or "error"
            self._done.set()
            self._finish()
            raise
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the recording has ended (a stop condition, ``stop()`` or a write error). The
    file may still be being finished: call ``stop()`` before reading it."""
        return self._done.wait(timeout)

    def stop(self) -> Dict[str, Any]:
        """End the recording, finish the file and return the summary (see ``summary()``).

        Bounded: the recording threads get a few seconds, the file's end ``_FINISH_TIMEOUT_S``.
        Raises the OSError that stopped the writing, if one did (the file is then incomplete)."""
        if not self._started:
            return self.summary()
        if not self._stopped_by:
            self._stopped_by = "stop"
        self._done.set()
        m = self._monitor
        if m is not None and m is not threading.current_thread():
            m.join(_JOIN_TIMEOUT_S + _FINISH_TIMEOUT_S)
        if not self._finished.is_set():            # the monitor is gone or stuck: finish here
            self._finish()
        err = self._error
        if err is not None:
            raise err
        return self.summary()

    def __enter__(self) -> Recorder:
        return self.start() if not self._started else self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.stop()
        else:                                       # the block's exception is the one to see
            try:
                self.stop()
            except Exception as e:  # noqa: BLE001 - reported, not raised over the block's
                log.error("msight_fast: recording to %s failed: %s", self.path, e)

    def _at_exit(self) -> None:
        if not self._finished.is_set():
            try:
                self.stop()
            except Exception as e:  # noqa: BLE001 - at exit there is no one to raise to
                log.error("msight_fast: recording to %s failed: %s", self.path, e)

    # -- the threads
    def _record(self, t: _Topic) -> None:
        while not self._done.is_set():
            try:
                frame = t.sub.recv(timeout=_RECV_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - recv raises for nothing the network does; a bug must not end it
                t.errors += 1
                log.error("msight_fast: receiving %r for the recording failed: %r", t.name, e)
                self._done.wait(_RECV_TIMEOUT_S)
                continue
            if frame is None:
                continue
            log_ns = time.time_ns()
            try:
                self._write(t, frame, log_ns)
            except OSError as e:               # the disk: the recording cannot go on
                self._fail(e)
                return
            except Exception as e:  # noqa: BLE001 - one frame must not end the recording
                t.errors += 1
                if t.errors == 1 or t.errors % 1000 == 0:
                    log.warning("msight_fast: could not record a frame of %r (%d so far): %s", t.name,
                                t.errors, e)

    def _watch(self) -> None:
        """Ends the recording at ``duration``, shows the progress, and finishes the file."""
        bar = _progress_bar(self.progress, "recording")
        try:
            while True:
                left = self._t_end - time.monotonic()
                if left <= 0:
                    if not self._stopped_by:
                        self._stopped_by = "duration"
                    self._done.set()
                if self._done.wait(min(0.5, max(0.0, left))):
                    break
                if bar is not None:
                    self._show(bar)
        finally:
            if bar is not None:
                self._show(bar)
                bar.close()
            self._finish()

    def _show(self, bar: Any) -> None:
        el = max(1e-9, time.monotonic() - self._t0)
        bar.n = self._frames
        bar.set_postfix_str(f"{self._bytes / 1e6:.1f} MB, {self._bytes / 1e6 / el:.1f} MB/s", refresh=True)

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
            log.error("msight_fast: recording to %s stopped: %s", self.path, e)
        if not self._stopped_by:
            self._stopped_by = "error"
        self._done.set()

    # -- writing
    def _write(self, t: _Topic, frame: Frame, log_ns: int) -> None:
        try:
            kind = _fox.classify(frame)
            data = _fox.to_message(frame, kind)
        except Exception:  # noqa: BLE001 - a frame Foxglove cannot show is still kept, whole
            kind = _fox.FRAME
            data = encode(frame)
        gap = t.gap(frame)
        info = b"" if kind == _fox.FRAME else _fox.info_bytes(_fox.info(frame, kind, gap))
        t.seq = (t.seq + 1) & 0xFFFFFFFF                  # MCAP sequences are u32
        pub_ns = frame.publish_ts_ns if frame.publish_ts_ns > 0 else log_ns
        with self._lock:
            if self._closed or self._done.is_set():    # over: max_bytes holds, stop() means now
                return
            w = self._writer
            ch = t.channels.get(kind)
            if ch is None:
                ch = t.channels[kind] = self._channel(t.name, kind)
            if info:
                if not t.info_channel:
                    t.info_channel = self._channel(t.name + _fox.INFO_SUFFIX, "")
                w.add_message(t.info_channel, log_ns, info, pub_ns, t.seq)
            w.add_message(ch, log_ns, data, pub_ns, t.seq)
            n = len(info) + len(data)
            t.frames += 1
            t.bytes += n
            t.gaps += gap
            self._frames += 1
            self._bytes += n
            full = self.max_bytes is not None and self._bytes >= self.max_bytes
        if full:
            if not self._stopped_by:
                self._stopped_by = "max_bytes"
            self._done.set()

    def _channel(self, topic: str, kind: str) -> int:
        """A new channel (``kind`` "" for a frame_info one), its schema registered once (lock held)."""
        w = self._writer
        if not kind:
            sid = self._schemas.get("")
            if sid is None:
                sid = self._schemas[""] = w.register_schema(*_fox.info_schema())
            return int(w.register_channel(topic, "json", sid))
        sid = self._schemas.get(kind)
        if sid is None:
            name, enc, data = _fox.schema(kind)
            sid = self._schemas[kind] = w.register_schema(name, enc, data) if enc else 0
        return int(w.register_channel(topic, _fox.message_encoding(kind), sid, {KIND_KEY: kind}))

    def _finish(self) -> None:
        """Join the threads, write the metadata record, finish the file, close what was opened.
        Once; every step bounded; the file is finished whatever failed before."""
        if not self._finish_lock.acquire(timeout=_JOIN_TIMEOUT_S + _FINISH_TIMEOUT_S):
            return
        try:
            if self._finished.is_set():
                return
            self._done.set()
            atexit.unregister(self._at_exit)
            end = time.monotonic() + _JOIN_TIMEOUT_S
            for t in self._topics:
                th = t.thread
                if th is not None and th is not threading.current_thread():
                    th.join(max(0.0, end - time.monotonic()))
            for t in self._topics:
                try:
                    t.final = dict(t.sub.stats())
                except Exception:  # noqa: BLE001 - the counters of a broken source are not worth a file
                    t.final = None
            self._end_ns = time.time_ns() if self._start_ns else 0
            if self._lock.acquire(timeout=_FINISH_TIMEOUT_S):
                try:
                    self._closed = True
                    self._close_file()
                finally:
                    self._lock.release()
            else:
                self._fail(OSError(f"{self.path}: a write did not return in {_FINISH_TIMEOUT_S} s; "
                                   "the file is not finished"))
        finally:
            try:
                for t in self._topics:
                    t.sub.close()
                if self._own_bus and self._bus is not None:
                    self._bus.close()
            except Exception as e:  # noqa: BLE001 - closing: the file is what matters
                log.warning("msight_fast: closing the recorder's connection failed: %s", e)
            finally:
                self._summary = self.summary()
                self._finished.set()
                self._finish_lock.release()

    def _close_file(self) -> None:
        f = self._file
        if f is None:
            return
        try:
            if self._writer is not None:
                try:
                    self._writer.add_metadata(RECORDING_METADATA, self._metadata())
                finally:
                    self._writer.finish()
        except Exception as e:  # noqa: BLE001 - the disk or the writer: reported by stop()
            self._fail(e if isinstance(e, OSError) else OSError(f"{self.path}: finishing the file failed: {e}"))
        finally:
            self._file = None
            try:
                f.close()
            except OSError as e:
                self._fail(e)

    def _metadata(self) -> Dict[str, str]:
        from . import __version__
        s = self.summary()
        return {"backend": str(s["backend"]), "topics": json.dumps(self.topics),
                "start_ns": str(s["start_ns"]), "end_ns": str(s["end_ns"]),
                "frames": str(s["frames"]), "bytes": str(s["bytes"]),
                "stopped_by": s["stopped_by"], "stats": json.dumps(s["topics"]),
                "library": f"msight_fast {__version__}"}

    # -- numbers
    def stats(self) -> Dict[str, Any]:
        """Live counters: frames and message bytes written, elapsed_s, mb_per_s, and per topic:
        ``frames`` and ``bytes`` written, ``recorded_gaps`` (the sum of the frame_info gaps),
        ``errors`` (frames that could not be written), and the subscription's ``received``,
        ``received_bytes``, ``gaps``, ``dropped`` and ``rejected`` (``Subscription.stats()``)."""
        el = (time.monotonic() - self._t0) if self._t0 and not self._finished.is_set() else \
            ((self._end_ns - self._start_ns) / 1e9 if self._end_ns else 0.0)
        per: Dict[str, Dict[str, Any]] = {}
        for t in self._topics:
            st = t.final
            if st is None:
                try:
                    st = dict(t.sub.stats())
                except Exception:  # noqa: BLE001 - counters only
                    st = {}
            per[t.name] = {"frames": t.frames, "bytes": t.bytes, "recorded_gaps": t.gaps, "errors": t.errors,
                           "received": st.get("received"), "received_bytes": st.get("bytes"),
                           "gaps": st.get("gaps"), "dropped": st.get("dropped"), "rejected": st.get("rejected")}
        return {"path": self.path, "frames": self._frames, "bytes": self._bytes, "elapsed_s": el,
                "mb_per_s": self._bytes / 1e6 / el if el > 0 else 0.0, "topics": per}

    def summary(self) -> Dict[str, Any]:
        """What ``stop()`` returns: path, backend, start_ns, end_ns, duration_s, frames, bytes,
        mb_per_s, stopped_by ("stop", "duration", "max_bytes" or "error") and per topic the
        counters of ``stats()``."""
        if self._summary is not None:
            return self._summary
        st = self.stats()
        st.pop("elapsed_s")
        st.update(backend=self._bus.backend if self._bus is not None else (self._backend or ""),
                  start_ns=self._start_ns, end_ns=self._end_ns,
                  duration_s=(self._end_ns - self._start_ns) / 1e9 if self._end_ns else 0.0,
                  stopped_by=self._stopped_by or ("" if not self._started else "running"))
        return st


def _progress_bar(wanted: bool, what: str) -> Any:
    """A tqdm bar on stderr when asked for and stderr is a terminal (else None)."""
    if not wanted or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc=what, unit=" frames", file=sys.stderr, dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------- reading
class Recorded(NamedTuple):
    """One recorded frame: its topic, MCAP log time (receipt) and publish time, and the frame."""
    topic: str
    log_time_ns: int
    publish_time_ns: int
    frame: Frame


MAX_CHUNK_BYTES = 1 << 30          # a chunk that claims to decompress to more is not one this library wrote


def _unpacked(chunk: Any) -> Any:
    """``chunk`` with its records decompressed, never past MAX_CHUNK_BYTES or its declared size:
    mcap's own reader trusts the sizes in the file, and a small hostile file could claim gigabytes."""
    import dataclasses
    if chunk.compression == "":
        return chunk
    size = chunk.uncompressed_size
    if size > MAX_CHUNK_BYTES:
        raise FrameError(f"a chunk claims {size} bytes uncompressed (limit {MAX_CHUNK_BYTES})")
    if chunk.compression == "zstd":
        import io

        import zstandard
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(chunk.data)) as r:
            data = r.read(size + 1)
    elif chunk.compression == "lz4":
        import lz4.frame
        data = lz4.frame.LZ4FrameDecompressor().decompress(chunk.data, max_length=size + 1)
    else:
        raise FrameError(f"unknown chunk compression {chunk.compression!r}")
    if len(data) != size:
        raise FrameError(f"a chunk decompresses to {'more than' if len(data) > size else len(data)} "
                         f"bytes, not the {size} it declares")
    return dataclasses.replace(chunk, compression="", data=data)


def _mcap_records(fh: BinaryIO, want: Optional[List[str]], where: str) -> Iterator[Tuple[Any, Any, Any]]:
    """(schema, channel, message) in file order; any failure of the file is a FrameError."""
    from mcap.records import Channel, Chunk, Message, Schema
    from mcap.stream_reader import StreamReader, breakup_chunk
    wanted = None if want is None else set(want)
    schemas: Dict[int, Any] = {}
    channels: Dict[int, Any] = {}
    records = StreamReader(fh, emit_chunks=True, validate_crcs=True, record_size_limit=2 * MAX_CHUNK_BYTES).records
    while True:
        try:
            rec = next(records)
            batch = breakup_chunk(_unpacked(rec), validate_crc=True) if isinstance(rec, Chunk) else [rec]
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - mcap raises many types for a broken file; one for callers
            text = "the file ends early (truncated?)" if type(e).__name__ == "EndOfFile" else \
                f"{type(e).__name__}: {e}"
            raise FrameError(f"{where}: not a readable MCAP file: {text}") from e
        for r in batch:
            if isinstance(r, Schema):
                schemas[r.id] = r
            elif isinstance(r, Channel):
                channels[r.id] = r
            elif isinstance(r, Message):
                ch = channels.get(r.channel_id)
                if ch is None:
                    raise FrameError(f"{where}: a message on channel {r.channel_id}, which the file never declared")
                if wanted is None or ch.topic in wanted:
                    yield schemas.get(ch.schema_id), ch, r


def messages(path: PathLike, topics: Union[str, Iterable[str], None] = None) -> Generator[Recorded, None, None]:
    """Every frame of a recording, in file order, with its MCAP times (``Recorded`` tuples).

    ``topics`` keeps those only. Channels that this library did not write are skipped. A
    message whose pair is missing, and anything malformed, raises FrameError naming the topic
    and sequence (after the frames before it were yielded)."""
    _require("mcap")
    names = _topic_list(topics, "messages")
    want = None if names is None else names + [t + _fox.INFO_SUFFIX for t in names]
    where = os.fspath(path)
    pending: Dict[Tuple[str, int], bytes] = {}       # (topic, sequence) -> its frame_info
    with open(where, "rb") as fh:
        for schema, ch, msg in _mcap_records(fh, want, where):
            topic: str = ch.topic
            seq: int = msg.sequence
            kind = ch.metadata.get(KIND_KEY) if isinstance(ch.metadata, dict) else None
            try:
                if kind is None:
                    if not (topic.endswith(_fox.INFO_SUFFIX) and schema is not None
                            and schema.name == _fox.INFO_SCHEMA_NAME):
                        continue                   # not ours
                    key = (topic[:-len(_fox.INFO_SUFFIX)], seq)
                    if key in pending:
                        raise FrameError("a second frame_info with this sequence")
                    if len(pending) >= _MAX_PENDING_INFO:
                        raise FrameError(f"over {_MAX_PENDING_INFO} frame_info messages without their frames")
                    if len(msg.data) > _fox.MAX_INFO_BYTES:
                        raise FrameError(f"frame_info of {len(msg.data)} bytes (limit {_fox.MAX_INFO_BYTES})")
                    pending[key] = msg.data        # parsed once paired: what waits stays small
                    continue
                if kind not in _fox.KINDS:
                    raise FrameError(f"unknown kind {kind!r} in the channel's metadata")
                raw = pending.pop((topic, seq), None)
                if kind == _fox.FRAME:
                    if raw is not None:
                        raise FrameError("a frame_info for a whole frame")
                    frame = _fox.from_message(kind, msg.data, None)
                else:
                    if raw is None:
                        raise FrameError(f"a {kind} message without its frame_info")
                    info = _fox.parse_info(raw)
                    if info.get("kind") != kind:
                        raise FrameError(f"frame_info kind {info.get('kind')!r} on a {kind} channel")
                    frame = _fox.from_message(kind, msg.data, info)
            except Exception as e:  # noqa: BLE001 - whatever a hostile message trips, it is a FrameError
                raise FrameError(f"{where}: topic {topic!r} sequence {seq}: {e}") from e
            yield Recorded(topic, msg.log_time, msg.publish_time, frame)
    if pending:
        (topic, seq) = next(iter(pending))
        raise FrameError(f"{where}: topic {topic!r} sequence {seq}: a frame_info without its frame")


def read_mcap(path: PathLike, topics: Union[str, Iterable[str], None] = None) -> Iterator[Frame]:
    """The frames of a recording as they were recorded (seq, publisher, every timestamp), in
    file order; payloads view the file's message bytes. FrameError for a malformed file."""
    for r in messages(path, topics):
        yield r.frame


# ---------------------------------------------------------------- playing
REORDER_WINDOW_NS = 200_000_000     # frames are in the file by receipt: a big frame received after a
REORDER_MAX_BYTES = 64 << 20        # small one published later goes back ahead of it, within this window


def _in_publish_order(records: Iterator[Recorded]) -> Iterator[Recorded]:
    """``records`` by publish time, re-sorted within a bounded window (the file holds them in the
    order they were received, which a large frame's transfer time can swap with a small frame's)."""
    heap: List[Tuple[int, int, Recorded]] = []
    newest = -(1 << 63)
    held = 0
    for i, r in enumerate(records):
        heapq.heappush(heap, (r.publish_time_ns, i, r))
        held += r.frame.nbytes
        newest = max(newest, r.publish_time_ns)
        while heap and (held > REORDER_MAX_BYTES or heap[0][0] < newest - REORDER_WINDOW_NS):
            out = heapq.heappop(heap)[2]
            held -= out.frame.nbytes
            yield out
    while heap:
        yield heapq.heappop(heap)[2]


class _Prefetch:
    """Records read ahead by a thread of their own, so reading the file (a copy of each payload out
    of it) overlaps the waits between frames instead of delaying the frame that is due. Bounded:
    at most PREFETCH records, or PREFETCH_BYTES, ahead. Errors of the reader come out of ``__next__``."""

    def __init__(self, records: Iterator[Recorded], stop: threading.Event) -> None:
        self._it = records
        self._stop = stop
        self._q: Deque[Tuple[Optional[Recorded], Optional[BaseException]]] = collections.deque()
        self._held = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, daemon=True, name="msight-fast-play-read")
        self._thread.start()

    def _fill(self) -> None:
        item: Tuple[Optional[Recorded], Optional[BaseException]] = (None, None)   # the end
        try:
            for r in self._it:
                with self._cv:
                    while not self._closed and (len(self._q) >= PREFETCH or self._held > PREFETCH_BYTES):
                        self._cv.wait(0.1)
                    if self._closed:
                        return
                    self._q.append((r, None))
                    self._held += r.frame.nbytes
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the player's thread
            item = (None, e)
        finally:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        with self._cv:
            self._q.append(item)
            self._cv.notify_all()

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> Recorded:
        with self._cv:
            while not self._q:
                if self._stop.is_set() or self._closed:
                    raise StopIteration
                self._cv.wait(0.1)
            r, err = self._q.popleft()
            if r is None:
                self._q.appendleft((None, err))          # stays at the end
                if err is not None:
                    raise err
                raise StopIteration
            self._held -= r.frame.nbytes
            self._cv.notify_all()
            return r

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(5)


PREFETCH = 64
PREFETCH_BYTES = 64 << 20


class Player:
    """Publishes a recording's frames at their recorded timing, ``rate`` times as fast.

    Each frame goes out with ``bus.publish(topic, frame)`` (new seq, publisher id and publish
    time; payload, names, meta, frame_id and the capture and creation times bit for bit) at
    ``t0 + (publish_time - first publish_time) / rate`` (absolute deadlines: no drift adds up).
    Frames go out by recorded publish time: the file holds them in the order they were received,
    so they are re-sorted within a 200 ms window, read ahead by a thread of their own. ``loop``
    repeats, each pass one mean frame interval after the last frame. A frame that cannot be
    published is counted in ``errors`` and the playback goes on.

    ``run()`` plays in the calling thread; ``start()`` in a thread, ``stop()`` ends it and
    ``join()`` waits (raising what ended it, such as a FrameError for a malformed file).
    """

    def __init__(self, path: PathLike, *, bus: Optional[Bus] = None, backend: Optional[str] = None,
                 rate: float = 1.0, loop: bool = False, topics: Union[str, Iterable[str], None] = None,
                 progress: bool = False, **connect_options: Any) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"Player: rate={rate!r} must be a positive number")
        if bus is not None and (backend is not None or connect_options):
            raise ConfigError("Player: give a bus, or a backend and connect options, not both")
        self.path = os.fspath(path)
        self.rate = float(rate)
        self.loop = bool(loop)
        self.topics = _topic_list(topics, "Player")
        self.progress = progress
        self._bus = bus
        self._backend = backend
        self._options = connect_options
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._ran = False
        self.frames = 0
        self.bytes = 0
        self.loops = 0
        self.errors = 0
        self._drift: Deque[float] = collections.deque(maxlen=_DRIFT_WINDOW)
        self._drift_max: Optional[float] = None
        self._elapsed = 0.0
        self._t_start = 0.0                # while playing

    def run(self) -> Dict[str, Any]:
        """Play to the end (every pass when looping: until ``stop()``); returns ``stats()``."""
        if self._ran:
            raise RuntimeError("a Player plays once; make another")
        self._ran = True
        _require("mcap")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        bus = self._bus
        own = bus is None
        if bus is None:
            from . import connect
            bus = connect(self._backend, **self._options)
        bar = _progress_bar(self.progress, "playing")
        self._t_start = time.monotonic()
        try:
            self._play(bus, bar)
        finally:
            self._elapsed = time.monotonic() - self._t_start
            self._t_start = 0.0
            if bar is not None:
                bar.close()
            try:
                bus.flush(30.0)
            except MsightFastError as e:
                self.errors += len(getattr(e, "failures", ())) or 1
                log.warning("msight_fast: playback of %s: %s", self.path, e)
            finally:
                if own:
                    bus.close()
        return self.stats()

    def _play(self, bus: Bus, bar: Any) -> None:
        t0 = time.monotonic()
        shift = 0.0                        # seconds added to the timeline by the passes before
        first: Optional[int] = None        # publish time of the first frame of the file
        last = 0                           # the latest publish time in it
        count = 0                          # frames in one pass
        while not self._stop.is_set():
            n = 0
            frames = _Prefetch(_in_publish_order(messages(self.path, self.topics)), self._stop)
            try:
                for r in frames:
                    if first is None:
                        first = last = r.publish_time_ns
                        t0 = time.monotonic()  # after the read-ahead: the first frame is due now
                    due = t0 + shift + (r.publish_time_ns - first) / 1e9 / self.rate
                    wait = due - time.monotonic()
                    if (wait > 0 and self._stop.wait(wait)) or self._stop.is_set():
                        return
                    began = time.monotonic()
                    try:
                        bus.publish(r.topic, r.frame)
                    except MsightFastError as e:
                        self.errors += 1
                        if self.errors == 1 or self.errors % 1000 == 0:
                            log.warning("msight_fast: playback could not publish on %r (%d so far): %s",
                                        r.topic, self.errors, e)
                    drift = (began - due) * 1e3
                    self._drift.append(drift)
                    self._drift_max = drift if self._drift_max is None else max(self._drift_max, drift)
                    self.frames += 1
                    self.bytes += r.frame.nbytes
                    if bar is not None:
                        bar.update(1)
                    if not self.loops:
                        last = max(last, r.publish_time_ns)
                        count += 1
                    n += 1
            finally:
                frames.close()             # the file, now rather than when collected
            if not n:
                return                     # nothing to play
            self.loops += 1
            if not self.loop:
                return
            span = (last - (first or 0)) / 1e9
            step = span / (count - 1) if count > 1 else 1.0
            shift += (span + step) / self.rate

    def start(self) -> Player:
        """Play in a thread of its own; returns self."""
        if self._thread is not None:
            raise RuntimeError("Player.start() was called already")

        def body() -> None:
            try:
                self.run()
            except BaseException as e:  # noqa: BLE001 - handed to join()
                self._error = e

        self._thread = threading.Thread(target=body, daemon=True, name="msight-fast-play")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the playback (a wait for the next frame ends at once); waits up to ``timeout`` s."""
        self._stop.set()
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(timeout)

    def join(self, timeout: Optional[float] = None) -> bool:
        """True once the playback thread has ended; raises the error that ended it, if any."""
        th = self._thread
        if th is None:
            return self._ran
        th.join(timeout)
        if th.is_alive():
            return False
        if self._error is not None:
            raise self._error
        return True

    def stats(self) -> Dict[str, Any]:
        """frames, bytes, loops (passes completed), errors, elapsed_s, and drift_ms (p50, p99,
        max) of when each publish began against its schedule, over the last frames played."""
        d = np.asarray(self._drift, dtype=np.float64)
        drift: Dict[str, Optional[float]] = {"p50": None, "p99": None, "max": self._drift_max}
        if d.size:
            drift["p50"] = float(np.percentile(d, 50))
            drift["p99"] = float(np.percentile(d, 99))
        el = time.monotonic() - self._t_start if self._t_start else self._elapsed
        return {"path": self.path, "frames": self.frames, "bytes": self.bytes, "loops": self.loops,
                "errors": self.errors, "elapsed_s": el, "drift_ms": drift}

    def __enter__(self) -> Player:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
