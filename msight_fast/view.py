"""``msight-fast view``: bus topics live in Foxglove, through a Foxglove WebSocket server.

Each topic becomes a Foxglove channel of the message ``msight_fast._fox`` maps its frames to
(``foxglove.RawImage``, ``foxglove.CompressedImage`` or ``foxglove.PointCloud``; a topic whose
frames are none of these gets no picture channel), plus a JSON channel ``<topic>/stats`` with its
rate, latency, gaps and drops, logged once a second.

The viewer never slows the bus: a thread per topic receives frames and only keeps the newest in a
slot (latest wins; the frames it replaces are counted as ``skipped``); one converter thread turns
the newest frame of each topic into a Foxglove message, and only while a client is subscribed to
its channel (a client that subscribes gets the topic's last frame again, so a slow topic does not
leave it blank). The SDK's queue per client is short and drops its oldest message when a client
falls behind, so a slow client sees fewer frames and holds up nothing.

Needs the Foxglove SDK (``pip install "msight_fast[viz]"``, Python 3.10 or newer).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import signal
import sys
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence, Union

from . import _fox
from .errors import ConfigError
from .record import _own_subscription

if TYPE_CHECKING:
    import foxglove
    import foxglove.websocket

    from .bus import Bus, Subscription
    from .codec import Frame

__all__ = ["Viewer", "add_arguments", "run", "STATS_SUFFIX", "STATS_SCHEMA_NAME"]

log = logging.getLogger("msight_fast")

STATS_SUFFIX = "/stats"
STATS_SCHEMA_NAME = "msight_fast.TopicStats"
STATS_SCHEMA: Dict[str, Any] = {
    "title": STATS_SCHEMA_NAME,
    "description": "A viewed topic's receive statistics, once a second.",
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "kind": {"type": ["string", "null"], "description": "raw_image, compressed_image, point_cloud or frame"},
        "rate_hz": {"type": "number", "description": "frames received per second, over the last 2 s"},
        "latency_ms": {"type": "object", "description": "publish to receipt, recent frames",
                       "properties": {"p50": {"type": ["number", "null"]}, "p99": {"type": ["number", "null"]}}},
        "gaps": {"type": ["integer", "null"], "description": "frames the publishers sent that never arrived"},
        "dropped": {"type": "integer", "description": "frames the subscription's queue dropped"},
        "received": {"type": "integer"},
        "converted": {"type": "integer", "description": "frames turned into Foxglove messages"},
        "logged": {"type": "integer", "description": "messages handed to the WebSocket server"},
        "skipped": {"type": "integer", "description": "frames replaced by a newer one before conversion"},
        "unshown": {"type": "integer", "description": "frames of no Foxglove type, or of another type "
                                                      "than the topic's first frame"},
        "clients": {"type": "integer", "description": "client subscriptions to the topic's channel"},
    },
}

# Per client, the SDK queues at most this many messages and drops the oldest data message past it:
# a few frames of each topic, so a client that falls behind costs little memory and sees recent frames.
BACKLOG = 8
RATE_WINDOW_S = 2.0
STATS_PERIOD_S = 1.0
RECV_POLL_S = 0.2          # how often a receiving thread looks at the stop flag
JOIN_TIMEOUT_S = 5.0


class _Subscriptions:
    """Client subscriptions per channel, kept by the server's callbacks; a new one calls
    ``on_new(channel id)`` (with the condition held) and wakes the converter."""

    def __init__(self, cv: threading.Condition, on_new: Callable[[int], None]) -> None:
        self._cv = cv
        self._on_new = on_new
        self.count: Dict[int, int] = {}

    def add(self, channel_id: int) -> None:
        with self._cv:
            self.count[channel_id] = self.count.get(channel_id, 0) + 1
            self._on_new(channel_id)
            self._cv.notify_all()

    def remove(self, channel_id: int) -> None:
        with self._cv:
            n = self.count.get(channel_id, 0) - 1
            if n > 0:
                self.count[channel_id] = n
            else:
                self.count.pop(channel_id, None)

    def listener(self) -> foxglove.websocket.ServerListener:
        """The callbacks for the server (the SDK's protocol class gives the others as no-ops)."""
        from foxglove.websocket import ChannelView, Client, ServerListener
        subs = self

        class Listener(ServerListener):
            def on_subscribe(self, client: Client, channel: ChannelView) -> None:
                subs.add(channel.id)

            def on_unsubscribe(self, client: Client, channel: ChannelView) -> None:
                subs.remove(channel.id)

        return Listener()


class _Topic:
    """One viewed topic: its subscription, the newest frame not yet converted, and its counters.
    Every field but ``sub`` and ``thread`` is guarded by the viewer's condition."""

    def __init__(self, name: str, sub: Subscription) -> None:
        self.name = name
        self.sub = sub
        self.thread: Optional[threading.Thread] = None
        self.frame: Optional[Frame] = None
        self.frame_ns = 0                      # time.time_ns() when ``frame`` arrived: its log time
        self.last: Optional[Frame] = None      # the last frame shown, and its log time: for a new client
        self.last_ns = 0
        self.resent = False                    # ``frame`` is ``last`` again: a newer one does not skip it
        self.kind: Optional[str] = None        # of the first frame: the channel's type
        self.channel: Optional[foxglove.Channel] = None
        self.channel_id = -1                   # its id, so no SDK call is made with the condition held
        self.stats_channel: Optional[foxglove.Channel] = None
        self.arrivals: Deque[float] = collections.deque(maxlen=4096)
        self.received = 0
        self.converted = 0
        self.logged = 0
        self.skipped = 0
        self.unshown = 0


class Viewer:
    """A Foxglove WebSocket server showing ``topics`` live (see the module docstring).

    ``bus``: receive from this Bus (the viewer does not close it); otherwise the viewer connects
    with ``connect(backend, **connect_options)`` and closes that connection on ``stop``.
    ``port=0`` picks a free port (``port`` then tells which one).
    """

    def __init__(self, topics: Union[str, Sequence[str]], *, bus: Optional[Bus] = None,
                 backend: Optional[str] = None,
                 host: str = "127.0.0.1", port: int = 8765, message_backlog_size: int = BACKLOG,
                 **connect_options: Any) -> None:
        from .record import _topic_list
        names = _topic_list(topics, "view") or []
        if not names:
            raise ConfigError("view: give one or more non-empty topic names")
        if bus is not None and (backend is not None or connect_options):
            raise ConfigError("view: give a bus, or a backend and its connect options, not both")
        if not 0 <= port <= 65535:
            raise ConfigError(f"view: port {port} is not in [0, 65535]")
        if message_backlog_size < 1:
            raise ConfigError(f"view: message_backlog_size {message_backlog_size} must be at least 1")
        self.topics: List[str] = names
        self.host = host
        self._port = port
        self._backlog = message_backlog_size
        self._bus = bus
        self._own_bus = bus is None
        self._backend = backend
        self._options = connect_options
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._topics: Dict[str, _Topic] = {}
        self._subs = _Subscriptions(self._cv, self._resend)
        self._server: Optional[foxglove.websocket.WebSocketServer] = None
        self._converter: Optional[threading.Thread] = None
        self._started_at = 0.0
        self._bound_port = port
        self._running = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Viewer:
        """Connect (unless given a bus), subscribe, and start the server and the threads.

        Raises ConfigError without the Foxglove SDK, OSError when the port cannot be bound, and
        what ``connect`` raises."""
        if self._running:
            return self
        try:
            import foxglove
        except ImportError:
            raise ConfigError('view needs the Foxglove SDK: pip install "msight_fast[viz]" '
                              "(Python 3.10 or newer)") from None
        self._stop.clear()
        self._topics = {}
        self._subs.count.clear()
        try:
            if self._own_bus:
                from . import connect
                self._bus = connect(self._backend, **self._options)
            assert self._bus is not None
            ctx = foxglove.Context()
            for name in self.topics:
                t = _Topic(name, _own_subscription(self._bus, name, "view"))
                self._topics[name] = t
                t.stats_channel = foxglove.Channel(
                    name + STATS_SUFFIX, context=ctx, message_encoding="json",
                    schema=foxglove.Schema(name=STATS_SCHEMA_NAME, encoding="jsonschema",
                                           data=json.dumps(STATS_SCHEMA).encode()))
            try:
                self._server = foxglove.start_server(
                    name="msight-fast view", host=self.host, port=self._port, context=ctx,
                    server_listener=self._subs.listener(), message_backlog_size=self._backlog)
            except RuntimeError as e:          # the SDK's FoxgloveError: a port in use, an unknown host
                raise OSError(f"view: cannot serve on {self.host}:{self._port}: {e}") from None
            self._bound_port = int(self._server.port)
            self._started_at = time.monotonic()
            self._running = True
            for t in self._topics.values():
                t.thread = threading.Thread(target=self._receive, args=(t,), daemon=True,
                                            name=f"msight-view-recv:{t.name}")
                t.thread.start()
            self._converter = threading.Thread(target=self._convert_loop, args=(foxglove, ctx), daemon=True,
                                               name="msight-view-convert")
            self._converter.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the threads (each joined, at most ``JOIN_TIMEOUT_S``), the server and the channels;
        close the bus if the viewer opened it. Safe to call more than once."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._topics.values():
            t.sub.close()                      # ends a recv that is waiting
        threads = [t.thread for t in self._topics.values()] + [self._converter]
        for th in threads:
            if th is not None and th is not threading.current_thread():
                th.join(JOIN_TIMEOUT_S)
                if th.is_alive():
                    log.warning("msight_fast: view thread %s did not stop within %s s", th.name, JOIN_TIMEOUT_S)
        if self._server is not None:
            self._server.stop()
        for t in self._topics.values():
            for ch in (t.channel, t.stats_channel):
                if ch is not None:
                    ch.close()
            t.thread = None
        self._converter = None
        self._server = None
        if self._own_bus and self._bus is not None:
            self._bus.close()
            self._bus = None
        self._running = False

    def __enter__(self) -> Viewer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on (the one picked when 0 was asked for), once started."""
        return self._bound_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    # ------------------------------------------------------------ statistics
    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per topic: received, converted, logged, skipped, unshown, rate_hz, latency_ms
        (p50, p99), gaps, dropped, clients and kind."""
        return {name: self._topic_stats(t) for name, t in list(self._topics.items())}

    def _topic_stats(self, t: _Topic) -> Dict[str, Any]:
        sub = t.sub.stats()
        now = time.monotonic()
        with self._cv:
            recent = sum(1 for a in t.arrivals if now - a <= RATE_WINDOW_S)
            # the window is shorter in the first seconds; not below 1 s, where one frame would read as a high rate
            span = min(RATE_WINDOW_S, max(1.0, now - self._started_at))
            out: Dict[str, Any] = {
                "topic": t.name, "kind": t.kind, "rate_hz": round(recent / span, 3),
                "received": t.received, "converted": t.converted, "logged": t.logged, "skipped": t.skipped,
                "unshown": t.unshown,
                "clients": self._subs.count.get(t.channel_id, 0)}

        def ms(ns: Optional[int]) -> Optional[float]:
            return None if ns is None else round(ns / 1e6, 3)
        out["latency_ms"] = {"p50": ms(sub.get("latency_p50_ns")), "p99": ms(sub.get("latency_p99_ns"))}
        out["gaps"] = sub.get("gaps")
        out["dropped"] = int(sub.get("dropped") or 0)
        return out

    # ------------------------------------------------------------ threads
    def _receive(self, t: _Topic) -> None:
        """Keeps the newest frame of ``t``; never waits for the converter or the server."""
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                f = t.sub.recv(timeout=RECV_POLL_S)
            except Exception as e:            # recv raises for nothing the network does: a bug, or a closed bus
                log.error("msight_fast: view: receiving %r raised %r", t.name, e)
                f = None
            if f is None:
                # a closed subscription returns at once: wait out the poll so this does not spin
                if time.monotonic() - began < RECV_POLL_S / 2:
                    self._stop.wait(RECV_POLL_S)
                continue
            with self._cv:
                if t.frame is not None and not t.resent:
                    t.skipped += 1
                t.resent = False
                t.frame = f
                t.frame_ns = time.time_ns()
                t.received += 1
                t.arrivals.append(time.monotonic())
                self._cv.notify_all()

    def _resend(self, channel_id: int) -> None:
        """A client subscribed to a channel: show it the topic's last frame again if no newer one
        waits, so a slow or stalled topic does not leave it blank (the others get it twice).
        Called with the condition held."""
        for t in self._topics.values():
            if t.channel_id == channel_id and t.frame is None and t.last is not None:
                t.frame, t.frame_ns, t.resent = t.last, t.last_ns, True

    def _wanted(self, t: _Topic) -> bool:
        """``t`` has a frame the converter should act on now (caller holds the condition)."""
        if t.frame is None:
            return False
        if t.kind is None or t.kind == _fox.FRAME:   # a first frame (its channel to create), or one never shown
            return True
        # the server's count, not Channel.has_sinks(): no call into the SDK while holding the condition, which
        # the SDK's own thread takes in on_subscribe (the SDK counts the sink before it calls on_subscribe)
        return self._subs.count.get(t.channel_id, 0) > 0

    def _convert_loop(self, fg: ModuleType, ctx: foxglove.Context) -> None:
        next_stats = time.monotonic() + STATS_PERIOD_S
        while not self._stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: self._stop.is_set() or any(self._wanted(t) for t in self._topics.values()),
                                  timeout=max(0.0, next_stats - time.monotonic()))
                if self._stop.is_set():
                    return
                first = [(t, t.frame) for t in self._topics.values() if t.kind is None and t.frame is not None]
            for t, f in first:                  # outside the lock, as every call into the SDK
                assert f is not None
                try:
                    self._open_channel(fg, ctx, t, f)
                except Exception as e:         # the SDK refused: no picture for this topic, the others go on
                    log.error("msight_fast: view: cannot open a channel for %r: %r; showing its stats only",
                              t.name, e)
                    with self._cv:
                        t.kind, t.channel, t.channel_id = _fox.FRAME, None, -1
            with self._cv:
                work = []
                for t in self._topics.values():
                    # kind None: a first frame that came after the snapshot above; its channel comes first
                    if t.kind is None or not self._wanted(t):
                        continue
                    work.append((t, t.frame, t.frame_ns))
                    t.last, t.last_ns = t.frame, t.frame_ns
                    t.frame, t.resent = None, False
            for t, frame, frame_ns in work:     # outside the lock: the receivers go on meanwhile
                assert frame is not None
                self._show(t, frame, frame_ns)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_PERIOD_S
                self._log_stats()

    def _open_channel(self, fg: ModuleType, ctx: foxglove.Context, t: _Topic, frame: Frame) -> None:
        """The topic's picture channel, typed by its first frame (none for a FRAME-kind topic)."""
        kind = _fox.classify(frame)
        ch: Optional[foxglove.Channel] = None
        if kind == _fox.FRAME:
            log.info("msight_fast: view: %r carries frames Foxglove has no type for; only %s%s is served",
                     t.name, t.name, STATS_SUFFIX)
        else:
            name, encoding, data = _fox.schema(kind)
            ch = fg.Channel(t.name, context=ctx, message_encoding=_fox.message_encoding(kind),
                            schema=fg.Schema(name=name, encoding=encoding, data=data))
        cid = ch.id() if ch is not None else -1
        with self._cv:
            t.kind, t.channel, t.channel_id = kind, ch, cid

    def _show(self, t: _Topic, frame: Frame, frame_ns: int) -> None:
        kind, ch = t.kind, t.channel
        if ch is None or kind is None or _fox.classify(frame) != kind:
            with self._cv:
                t.unshown += 1
            return
        try:
            msg = _fox.to_message(frame, kind)
        except Exception as e:                 # FrameError; anything else must not end the view either
            with self._cv:
                t.unshown += 1
            log.warning("msight_fast: view: a frame on %r could not be converted: %s", t.name, e)
            return
        with self._cv:
            t.converted += 1
        try:
            ch.log(msg, log_time=frame_ns)
        except Exception as e:                 # a channel closed by stop() meanwhile
            log.debug("msight_fast: view: logging on %r failed: %s", t.name, e)
            return
        with self._cv:
            t.logged += 1

    def _log_stats(self) -> None:
        now = time.time_ns()
        for t in list(self._topics.values()):
            ch = t.stats_channel
            if ch is None:
                continue
            try:
                ch.log(json.dumps(self._topic_stats(t)).encode(), log_time=now)
            except Exception as e:             # a channel closed by stop() meanwhile
                log.debug("msight_fast: view: stats of %r: %s", t.name, e)


# ---------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``view`` subcommand's own arguments (the CLI adds --backend and --timeout)."""
    parser.add_argument("topics", nargs="*", help="topics to show (default: the demo's topics)")
    parser.add_argument("--port", type=int, default=8765, help="WebSocket port (default 8765; 0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM, then exit 0."""
    from .cli import DEMO_TOPICS
    topics = list(args.topics) or list(DEMO_TOPICS)
    options: Dict[str, Any] = {}
    if getattr(args, "timeout", None):
        options["connect_timeout_s"] = args.timeout
    done = threading.Event()                   # never set: waited on in slices, so signals get through
    stopping = [False]

    def on_term(signum: int, frame: Any) -> None:
        # as Ctrl-C does; raised once only, so a second signal cannot break the shutdown
        if not stopping[0]:
            stopping[0] = True
            raise KeyboardInterrupt

    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        previous = signal.signal(signal.SIGTERM, on_term)
    viewer = Viewer(topics, backend=getattr(args, "backend", None), host=args.host, port=args.port, **options)
    try:
        try:
            viewer.start()
            print(f"msight-fast view: {', '.join(topics)} at {viewer.url}", flush=True)
            print("open it in Foxglove (Open connection...); Ctrl-C to stop", flush=True)
            while not done.wait(0.5):          # Ctrl-C and SIGTERM raise here
                pass
        except KeyboardInterrupt:
            stopping[0] = True
        viewer.stop()
        for name, st in viewer.stats().items():
            print(f"{name}: received {st['received']}, shown {st['logged']}, gaps {st['gaps']}, "
                  f"dropped {st['dropped']}", file=sys.stderr)
    finally:
        viewer.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0
