"""NATS backend through nats-py: broadcast, or a load-balanced queue group with ``group_id``.

One private event-loop thread per Bus runs nats-py. Publishing does not make one cross-thread
round trip per message: the caller appends to a bounded hand-off queue and wakes the loop only
when it is idle, and the loop drains the queue in batches. Frames above the server's
``max_payload`` (read from its INFO at connect, again after each reconnect) are split with
``codec.fragment_views`` and put back together by the subscriber's ``Reassembler``; frames that fit
go whole.

Each subscription's messages wait in a queue bounded in bytes (``max_pending_bytes``) with a
drop policy (``drop_oldest`` / ``keep_latest``); drops are counted in ``stats()``.

Queue groups and fragments: NATS load-balances each message independently, so the fragments of
one frame would reach different members. A fragmented frame is therefore announced to queue
groups by its first fragment's 64-byte header alone, on ``_MSF.q.<topic>``, carrying a reply
subject of the publisher; the member that gets it asks the publisher (a request to that subject,
naming its own inbox) for the frame, whose fragments the publisher sends to that inbox alone.
Cost per fragmented frame of N fragments: with no queue group listening, nothing (nothing is
sent twice, nor kept); with one, N + 2 messages for the member (announcement, request,
fragments) and one round trip between member and publisher before the fragments go. The
publisher keeps a copy of its last ``REST_CACHE`` fragmented frames to answer, made once their
broadcast fragments are written and before the announcement goes. Whether any group listens it
asks the server at most once a second per topic (``_probe_groups``: a request on the group
subject, which the server refuses at once when no one subscribes), in the background, first as
a topic's first fragmented frame is handed over. An answer holds for ``GROUP_PROBE_S``, and for
``GROUP_STALE_S`` more while the server is asked again; without one the publisher assumes a
group listens. A member
that joins, or reconnects, says hello on ``_MSF.hello.<topic>`` (after its subscriptions; the
server has passed it on when ``subscribe`` returns), and a publisher that hears it takes "a group
listens" at once, whatever its last answer, or a probe then in flight, said. So a member misses
only frames published before its hello reaches the publisher. Where a hello cannot be sent or
heard (permissions), or names no topic a publisher sends on (a wildcard), the answer's life,
a second and a half at most, is the bound. A "no" drops the topic's cached frames: a member whose connection
broke between an announcement and its pull then finds nothing to pull. Any subscriber on the group
subject counts as a group (a monitor on ``>`` too), and the probe's reply inbox needs the
publisher's permission to subscribe to ``_INBOX.>``: without it, groups are assumed to listen.
Subscribers without a group get every fragment pushed on the subject and never ask. (A member
still accepts a whole first fragment on the group subject, as publishers before the
announcement sent it.)

The data path is partly hand-written (see ``_FastReader`` and ``_direct_write``): on a plain TCP
connection, this library writes PUBs with one ``writev`` of the command line and the frame's parts
(a fragment's: its header and views of the parts that make its chunk, so a fragmented frame is
not gathered before it goes), and reads the socket itself, MSG payloads of its subscriptions going
straight into 64-byte-aligned buffers; nats-py keeps connecting, auth, TLS (whose connections it
reads and writes itself), cluster discovery, reconnection, pings and every other operation.

Recovery. nats-py reconnects by itself, to any server of the pool (the configured ones and those
a cluster announces), every ``RECONNECT_WAIT_S`` without end, and subscribes again. Meanwhile:

- ``send`` accepts a frame while it fits in nats-py's reconnect buffer (``RECONNECT_BUFFER``
  bytes, written to the server when the connection is back); a frame that does not fit waits
  for the connection until the publish deadline, then raises ``BackendUnavailable``. A server
  that takes nothing (stalled) makes ``send`` wait on the bounded hand-off, to the same deadline.
- A message nats-py refuses (its buffer is full, the connection is closed) makes its frame
  ``lost`` in ``stats()`` at once; ``flush`` then reports it. Frames still in the reconnect
  buffer or the hand-off when the transport is closed are lost too, and counted. Frames already
  written to a connection that then died cannot be known here: subscribers count them as gaps.
- ``open`` and ``flush`` wait for the connection at most ``connect_timeout_s`` / their timeout,
  then raise ``BackendUnavailable`` / ``PublishError``; ``Source.next`` only ever waits on its
  queue.
- One warning when a connection is lost, and one naming the cause when it is back: the same
  server closed it (as a slow consumer, or the link was cut), the server restarted (a new
  ``server_id``), or another server of the cluster took over (another URL).
"""
from __future__ import annotations

import asyncio
import asyncio.selector_events
import collections
import concurrent.futures
import functools
import logging
import os
import select
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import nats.aio.client as _nats_client
import nats.aio.transport as _nats_transport
import numpy as np
from nats import errors as nats_errors

from .. import _schema as S
from ..codec import fragment_views, frame_key
from ..errors import AuthError, BackendUnavailable, FrameError, FrameTooLarge, MsightFastError, PublishError
from .base import BoundedQueue, Capabilities, Outgoing, Source, Start, Transport

log = logging.getLogger("msight_fast")

HANDOFF_MAX_BYTES = 8 << 20           # publisher hand-off bound: publish() blocks beyond it, so
                                      # queueing latency stays ~tens of ms at a few hundred MB/s
PULL_PREFIX = "_MSF.pull."            # + publisher id: where queue members ask for the rest
GROUP_PREFIX = "_MSF.q."              # + topic: first fragments of frames for queue groups
HELLO_PREFIX = "_MSF.hello."          # + topic: a queue member that joins or reconnects says so
REST_CACHE = 4                        # fragmented frames a publisher keeps for pulls (a member pulls within
                                      # a round trip); their buffers are then reused, warm
GROUP_PROBE_S = 1.0                   # how long the server's answer to "does a queue group listen?" holds
GROUP_STALE_S = 0.5                   # and how long past that it still holds while the server is asked again
PROBE_WAIT_S = 0.25                   # members take a probe and say nothing; with none, the server answers at once
SPARE_BUFFERS = 2                     # fragment buffers kept for reuse beyond those in the pull cache
READ_CHUNK = 4 << 20                  # socket read size of our nats-py connections, see below
RECONNECT_WAIT_S = 0.5                # between two attempts at the same server
RECONNECT_BUFFER = 2 << 20            # nats-py's default, named so that send() knows what fits
PING_INTERVAL_S = 10.0                # a server that stops answering (stalled, or a link gone
MAX_OUTSTANDING_PINGS = 3             # without a reset) is left after 30-40 s without a PONG, not
                                      # nats-py's 4-6 minutes; a PONG queued behind 30 s of data
                                      # for a slow subscriber still arrives in time
FLUSH_DEFAULT_S = 60.0                # flush(None): waits at most this
CLOSE_FLUSH_S = 5.0                   # close() gives queued frames this long to leave
CLOSE_WAIT_S = 3.0                    # and nats-py this long to close (a stalled server never lets it)
GIVE_UP_WAIT_S = 30.0                 # bound on the wait for one message's write, for a caller that gives up
PUB_OVERHEAD = 160                    # bytes nats-py adds to a message in its buffer (PUB line)
MAX_FAILURES = 1000                   # failures kept for flush()'s report (all are counted)
SLOW_CONSUMER_ADVICE = ("the server drops a client that falls behind once its pending data passes the "
                        "server's 'max_pending' (64 MB by default); frames lost meanwhile are counted as "
                        "gaps. Raise max_pending on the server for raw-frame topics, or subscribe with "
                        "fewer topics per Bus.")


class _Client(_nats_client.Client):
    """nats-py's client with larger socket reads, for this library's connections only.

    nats-py reads its socket 32 KB at a time (its module constant DEFAULT_BUFFER_SIZE) and its
    StreamReader stops reading once 64 KB is buffered: a 6 MB frame then costs ~200 event-loop
    turns, and the subscriber falls behind a raw-frame publisher until the server drops it as a
    slow consumer. Measured (transport benchmark, NATS 1080p, default server): 37 -> 70 frames/s
    delivered with 4 MB reads. The read loop below is nats-py's own with the larger read; it
    falls back to nats-py's if the client's internals are not what it expects.

    It also remembers what ended the last connection (``msf_cause``), for the warning that names
    the cause, reconnects after a server's "-ERR 'Slow Consumer'", which nats-py would otherwise
    take as the end of the client, and drops a connection it leaves instead of closing it
    gracefully (see ``_process_op_err``).
    """

    msf_cause: Optional[BaseException] = None

    async def _process_op_err(self, e: Exception) -> None:
        if not (self.is_closed or self.is_reconnecting):
            self.msf_cause = e
            # nats-py closes the old connection gracefully and waits for that before it reconnects:
            # a server that reads nothing (stalled, or a link gone without a reset) never takes
            # the frames in the write buffer, so no reconnect or failover would come until it
            # reads again. The connection is being replaced: drop it with what it holds.
            _abort(self)
        await super()._process_op_err(e)

    async def _connect_to_server(self, s: Any) -> None:
        # nats-py reuses its transport object: an attempt that connected and then failed (a stalled
        # server sends no INFO) would leave its socket open, unreferenced, for this one to replace
        _abort(self)
        await super()._connect_to_server(s)

    async def _process_err(self, err_msg: str) -> None:
        if "slow consumer" in err_msg.lower():
            err = nats_errors.Error("nats: " + err_msg.strip().strip("'"))
            self._err = err
            await self._error_cb(err)
            await self._process_op_err(err)
            return
        await super()._process_err(err_msg)

    msf_routes: Dict[int, Callable[[Any], None]]
    msf_fast = True                    # False: nats-py reads and writes, as it would without this library

    def _take_socket(self) -> Optional[_FastReader]:
        """Replace nats-py's StreamReader protocol with a _FastReader on a plain TCP connection
        (not TLS, whose transport this does not touch); None where it cannot."""
        t = getattr(self, "_transport", None)
        if not self.msf_fast or not isinstance(t, _nats_transport.TcpTransport):
            return None
        w, r = getattr(t, "_io_writer", None), getattr(t, "_io_reader", None)
        tr = getattr(w, "transport", None)
        if r is None or tr is None or not isinstance(tr, _SELECTOR_TRANSPORT) \
                or tr.get_extra_info("sslcontext") is not None or not isinstance(getattr(r, "_buffer", None),
                                                                                bytearray):
            return None
        if not hasattr(self, "msf_routes"):
            self.msf_routes = {}
        fr = _FastReader(tr.get_protocol(), self.msf_routes)
        left = bytes(r._buffer)                 # read by the StreamReader already: parsed first
        r._buffer.clear()
        tr.set_protocol(fr)
        if left:
            fr.feed(left)
        if tr.is_closing() or r.at_eof() or r.exception() is not None:
            fr.closed = True                    # it ended before the takeover: the read loop says so now
            fr.error = r.exception()
            fr.wake.set()
        elif not tr.is_reading():               # the StreamReader may have paused it when full
            tr.resume_reading()
        return fr

    async def _read_loop(self) -> None:
        if not isinstance(getattr(self, "_transport", None), _nats_transport.TcpTransport) \
                or not hasattr(self, "_ps"):
            return await super()._read_loop()
        fr = None if self.is_closed or self.is_reconnecting else self._take_socket()
        if fr is not None:
            return await self._fast_read_loop(fr)
        while True:
            try:
                t = self._transport
                if self.is_closed or self.is_reconnecting or t is None:
                    break
                reader = getattr(t, "_io_reader", None)       # a new one after reconnect or TLS
                if reader is not None and getattr(reader, "_limit", READ_CHUNK) < READ_CHUNK:
                    reader._limit = READ_CHUNK
                if t.at_eof():
                    err = nats_errors.UnexpectedEOF()
                    await self._error_cb(err)
                    await self._process_op_err(err)
                    break
                b = await t.read(READ_CHUNK)
                await self._ps.parse(b)
            except nats_errors.ProtocolError:
                await self._process_op_err(nats_errors.ProtocolError())
                break
            except OSError as e:
                await self._process_op_err(e)
                break
            except asyncio.CancelledError:
                break
            except Exception as ex:  # noqa: BLE001 - as nats-py: log, end the loop
                log.error("msight_fast: NATS read loop failed", exc_info=ex)
                break

    async def _fast_read_loop(self, fr: _FastReader) -> None:
        """Hands nats-py's parser what the _FastReader leaves to it; ends the connection as nats-py's
        own loop would when the socket closes or the stream is malformed."""
        while True:
            try:
                if self.is_closed or self.is_reconnecting:
                    break
                await fr.wake.wait()
                fr.wake.clear()
                while fr.control:
                    await self._ps.parse(fr.control.popleft())
                if fr.closed:
                    if isinstance(fr.error, nats_errors.ProtocolError):
                        raise fr.error
                    err = fr.error if isinstance(fr.error, OSError) else nats_errors.UnexpectedEOF()
                    if not isinstance(err, OSError):
                        await self._error_cb(err)
                    await self._process_op_err(err)
                    break
            except nats_errors.ProtocolError:
                await self._process_op_err(nats_errors.ProtocolError())
                break
            except OSError as e:
                await self._process_op_err(e)
                break
            except asyncio.CancelledError:
                break
            except Exception as ex:  # noqa: BLE001 - as nats-py: log, end the loop
                log.error("msight_fast: NATS read loop failed", exc_info=ex)
                break


# the one asyncio transport whose protocol may become a BufferedProtocol (recv_into); private in asyncio
_SELECTOR_TRANSPORT: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport", ())
SMALL = 64 << 10                  # a routed message up to this is copied whole out of the staging buffer
STAGE = 1 << 20                   # the staging buffer: control lines, small and foreign messages
MAX_LINE = 4096                   # nats-py's MAX_CONTROL_LINE_SIZE
MAX_FOREIGN = 64 << 20            # NATS's own max_payload ceiling: a foreign message larger is a protocol error


class _FastReader(asyncio.BufferedProtocol):
    """Reads a nats-py connection's socket in its place (hand-written: nats-py copies a payload
    four to five times on its way in).

    A MSG for one of this library's subscriptions (``routes``: sid -> callback) is handed over
    without nats-py: its payload is read with ``recv_into`` straight into a 64-byte-aligned buffer
    that the decoded frame views (small ones are copied once out of the staging buffer). Every
    other operation (INFO, PING, PONG, +OK, -ERR, HMSG, MSG of nats-py's own subscriptions) goes,
    byte for byte and in order, to nats-py's parser through ``control``, so nats-py still answers
    pings, learns cluster servers and sees errors. Flow control and the end of the connection go
    to the StreamReader protocol it replaced, which nats-py's writer still waits on.
    """

    def __init__(self, old: Any, routes: Dict[int, Callable[[Any], None]]) -> None:
        self.old = old
        self.routes = routes
        self.buf = bytearray(STAGE)
        self.mv = memoryview(self.buf)
        self.s = 0                                  # unparsed bytes are buf[s:e]
        self.e = 0
        self.part: Optional[List[Any]] = None      # [destination, bytes got, size, callback]: a payload in flight
        self.crlf = 0                               # bytes of a finished payload's CRLF still to come
        self.control: Deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.error: Optional[BaseException] = None

    # -- asyncio's side
    def get_buffer(self, sizehint: int) -> memoryview:
        part = self.part
        if part is not None:
            rest: memoryview = part[0][part[1]:]   # the rest of the payload, straight into its buffer
            return rest
        if self.s == self.e:
            self.s = self.e = 0
            if len(self.buf) > STAGE:          # grown for one large message: back to its size
                self.buf = bytearray(STAGE)
                self.mv = memoryview(self.buf)
        elif self.e == len(self.buf):
            self._reserve(1)                   # moves what is unparsed to the front; grows only when full of it
        return self.mv[self.e:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            part = self.part
            if part is not None:
                part[1] += nbytes
                if part[1] == part[2]:
                    self.part = None
                    self.crlf = 2
                    part[3](part[0])
                return
            self.e += nbytes
            self._parse()
        except Exception as e:  # noqa: BLE001 - a protocol error ends the connection, as nats-py's would
            self.error = e
            self.closed = True
            self.wake.set()

    def eof_received(self) -> Optional[bool]:
        self.closed = True
        self.wake.set()
        return bool(self.old.eof_received())

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self.error = self.error or exc
        self.wake.set()
        self.old.connection_lost(exc)

    def pause_writing(self) -> None:
        self.old.pause_writing()

    def resume_writing(self) -> None:
        self.old.resume_writing()

    # -- parsing
    def feed(self, data: bytes) -> None:
        """Bytes nats-py's StreamReader had already read when this reader took over."""
        self._reserve(len(data))
        self.mv[self.e:self.e + len(data)] = data
        self.e += len(data)
        self._parse()

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more bytes after buf[s:e] (moved to the front; a larger buffer if need be)."""
        have = self.e - self.s
        if self.s:
            self.mv[:have] = self.mv[self.s:self.e]
            self.s, self.e = 0, have
        if have + n > len(self.buf):
            grown = bytearray(max(have + n, 2 * len(self.buf)))
            grown[:have] = self.mv[:have]
            self.buf, self.mv = grown, memoryview(grown)

    def _parse(self) -> None:
        buf, mv = self.buf, self.mv
        s, e = self.s, self.e
        while s < e:
            if self.crlf:
                k = min(self.crlf, e - s)
                if bytes(mv[s:s + k]) != b"\r\n"[2 - self.crlf:2 - self.crlf + k]:
                    raise nats_errors.ProtocolError()
                self.crlf -= k
                s += k
                continue
            i = buf.find(b"\r\n", s, e)
            if i < 0:
                # a MSG line is short; any other (an INFO naming a large cluster) only bounded
                msg = buf.startswith(b"MSG ", s) or buf.startswith(b"HMSG ", s)
                if e - s > (MAX_LINE if msg else MAX_FOREIGN):
                    raise nats_errors.ProtocolError()
                break
            if buf.startswith(b"MSG ", s) or buf.startswith(b"HMSG ", s):
                head = bytes(mv[s:i]).split()
                routed = head[0] == b"MSG" and len(head) in (4, 5)
                cb = self.routes.get(int(head[2])) if routed else None
                size = int(head[-1])
                if cb is None or size <= SMALL:
                    total = i + 2 - s + size + 2
                    if size > MAX_FOREIGN:
                        raise nats_errors.ProtocolError()
                    if e - s < total:              # the rest of it: wait, with room for it
                        self.s = s
                        if len(buf) - s < total:
                            self._reserve(total - (e - s))
                        if self.control:           # what came before it need not wait for it
                            self.wake.set()
                        return
                    end = s + total
                    if bytes(mv[end - 2:end]) != b"\r\n":
                        raise nats_errors.ProtocolError()
                    if cb is None:
                        self.control.append(bytes(mv[s:end]))
                    else:
                        cb(bytes(mv[i + 2:end - 2]))      # the one copy of a small message
                    s = end
                    continue
                raw = np.empty(size + 64, dtype=np.uint8)  # 64-byte-aligned destination
                a = (-raw.ctypes.data) % 64
                dst = raw[a:a + size].data
                p = i + 2
                k = min(e - p, size)
                dst[:k] = mv[p:p + k]                      # what came with the line: copied once
                s = p + k
                if k == size:
                    self.crlf = 2
                    cb(dst)
                    continue
                self.part = [dst, k, size, cb]
                break
            self.control.append(bytes(mv[s:i + 2]))
            s = i + 2
        self.s, self.e = (0, 0) if s >= e else (s, e)
        if self.control:
            self.wake.set()


_WRITE_COPIES = sys.version_info < (3, 12)   # asyncio's selector transport copies what write() buffers
ZERO_COPY_MIN = 256 << 10         # whole frames from this size go as views (the caller waits for the write)
DIRECT_HIGH_WATER = 8 << 20       # bytes asyncio may hold for the socket before the loop waits for it
SYNC_WRITE_MIN = 256 << 10        # a message from this size waits for the socket rather than be copied
SYNC_WRITE_S = 0.02               # ... within this much of each turn the loop thread takes at the hand-off


def _direct_write(nc: Any, subject: str, data: Any, reply: Optional[str], sync_end: float = 0.0) -> Any:
    """Write one PUB (or several, in order) on nats-py's connection without nats-py's copies
    (hand-written: nats-py builds each PUB as one bytes, then joins its queue, then asyncio copies
    what the socket does not take: four copies of a 6 MB frame). Here the command line, the frame's
    parts and the CRLF go to the socket in one ``writev``; a large message's rest is written as the
    socket takes it until ``sync_end`` (monotonic; ``_write_rest``), and only what is left then is
    copied, once, into asyncio's buffer. nats-py's own queued commands are written first, so the
    order on the wire is the order they were made. Returns the StreamWriter, or None where this
    cannot write (TLS, no connection, disabled): the caller then publishes through nats-py."""
    if not getattr(nc, "msf_fast", False):
        return None
    w = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    tr = getattr(w, "transport", None)
    if tr is None or not isinstance(tr, _SELECTOR_TRANSPORT) or tr.is_closing() \
            or tr.get_extra_info("sslcontext") is not None:
        return None
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    views = []
    for b in parts:
        mv = memoryview(b)
        views.append(mv if mv.ndim == 1 and mv.format in ("B", "b", "c") else mv.cast("B"))
    n = sum(v.nbytes for v in views)
    if n > nc.max_payload:              # a server failed over to may take less: refuse, do not break the link
        raise nats_errors.MaxPayloadError
    line = (f"PUB {subject} {reply} {n}\r\n" if reply else f"PUB {subject} {n}\r\n").encode()
    bufs = [memoryview(line), *views, memoryview(b"\r\n")]
    if nc._pending_data_size:           # nats-py's queued commands first, as its flusher would write them
        tr.writelines(nc._pending)
        nc._pending = []
        nc._pending_data_size = 0
    sent = 0
    if not tr.get_write_buffer_size():
        fd = tr.get_extra_info("socket").fileno()
        try:
            sent = os.writev(fd, bufs)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(line) + n + 2 and n >= SYNC_WRITE_MIN:
            try:
                bufs, sent = _write_rest(fd, bufs, sent, sync_end), 0
            except OSError:
                # part of the message may be on the wire: nothing may follow it on this socket
                tr.abort()
                raise
    for v in bufs:                      # what the socket did not take: asyncio's buffer, in order
        if sent >= v.nbytes:
            sent -= v.nbytes
            continue
        # asyncio 3.11 copies what it buffers; from 3.12 it keeps the view: copy it here, since the
        # caller's array (or a fragment buffer) may change once the frame counts as written
        tr.write(v[sent:] if _WRITE_COPIES else bytes(v[sent:]))
        sent = 0
    return w


def _write_rest(fd: int, bufs: List[memoryview], sent: int, end: float) -> List[memoryview]:
    """Go on writing a large message (``sent`` bytes of ``bufs`` are out) as the socket takes it,
    until ``end`` (monotonic); what is left then is returned, in order, for asyncio's buffer.
    Waiting here blocks the loop thread, but the rest of the frame is not copied: asyncio would
    copy it whole into its buffer first, up to the socket's send buffer per frame, a copy made
    while the server needs the core."""
    p = select.poll()
    p.register(fd, select.POLLOUT)
    while True:
        while bufs and sent >= bufs[0].nbytes:
            sent -= bufs[0].nbytes
            bufs = bufs[1:]
        if not bufs:
            return bufs
        if sent:
            bufs = [bufs[0][sent:], *bufs[1:]]
            sent = 0
        left = end - time.monotonic()
        if left <= 0 or not p.poll(left * 1e3):
            return bufs
        try:
            sent = os.writev(fd, bufs)
        except (BlockingIOError, InterruptedError):
            sent = 0


def _abort(nc: Any) -> None:
    """Drop ``nc``'s socket at once with what it has not sent (a graceful close waits for the server)."""
    w = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    if w is not None:
        w.transport.abort()


class _Loop:
    """A private asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="msight_fast-nats", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the loop; past ``timeout`` cancel it and raise TimeoutError."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None

    def stop(self) -> None:
        async def cancel_all() -> None:
            # nats-py's tasks would otherwise be destroyed pending when the loop closes
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
        if self.loop.is_running():
            try:
                self.run(cancel_all(), 2.0)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class _Sent:
    """A frame in the hand-off: counted lost at most once, however many of its messages fail.

    ``done`` and ``lock`` (frames handed over as views of the caller's memory): ``done`` is set
    once the loop thread has written the frame or given up on it, so ``send`` returns only when
    the caller may change the array again; the loop thread holds ``lock`` while it writes one of
    its messages, so a caller that gives up cannot return in the middle of one."""
    __slots__ = ("lost", "done", "lock", "written", "left", "share", "thread")

    def __init__(self, wait: bool = False, items: int = 1) -> None:
        self.lost = False
        self.thread = threading.get_ident()     # the publishing thread's: its frames keep their order
        self.written = False            # every message of it written or copied (or given up on)
        self.left = items
        self.share = 0                  # bytes each of its queued messages holds, for the hand-off's count
        self.done: Optional[threading.Event] = threading.Event() if wait else None
        self.lock: Optional[threading.Lock] = threading.Lock() if wait else None

    def finish(self) -> None:
        """One of its messages is out of the caller's and this transport's buffers' way."""
        self.left -= 1
        if self.left <= 0:
            self.written = True
            if self.done is not None:
                self.done.set()


def _long_from(max_payload: int) -> int:
    """``Transport.long_frame_bytes`` under ``max_payload``: every payload that can go as fragments
    (no frame header is longer than ``MAX_HEADER_LEN``); a frame just under the line that goes
    whole takes the long frames' turn for nothing, and is written as quickly."""
    return max(1, max_payload - S.MAX_HEADER_LEN)


_Item = Tuple[str, Any, Optional[str], _Sent]   # a message in the hand-off: subject, data, reply, its frame


def _split(q: Iterable[_Item], ahead: List[_Item]) -> Tuple[List[_Item], List[_Item]]:
    """``q``'s messages that may go before ``ahead`` (the rest of the batch being written), and
    those that may not, each in its order: a frame of one message passes fragmented frames, but
    nothing passes what was handed over before it on its subject or by its thread."""
    subjects = {it[0] for it in ahead}
    threads = {it[3].thread for it in ahead}
    first: List[_Item] = []
    last: List[_Item] = []
    for it in q:
        if type(it[1]) is _Pieces or it[0] in subjects or it[3].thread in threads:
            subjects.add(it[0])
            threads.add(it[3].thread)
            last.append(it)
        else:
            first.append(it)
    return first, last


def _whole_first(q: Iterable[_Item], ahead: List[_Item]) -> List[_Item]:
    """The hand-off's next batch: what of ``q`` may pass ``ahead`` (``_split``), then ``ahead``,
    then the rest of ``q``.

    A frame of one message waits for no fragmented frame of another subject and thread, only for
    the fragment being written: a 30 Hz JPEG handed over while a raw camera's 6 MB frame goes out
    in 7 fragments is written next (benchmarks/README.md, "NATS: other frames pass a long frame").
    A Bus hands over one fragmented frame at a time (``Transport.long_frame_bytes``), and its
    thread waits until it is written. Each topic's frames, and each thread's, keep their order."""
    first, last = _split(q, ahead)
    return first + ahead + last


class _Pieces:
    """A fragmented frame in the hand-off: its fragments, made one at a time by the loop thread as
    it comes to each (a frame's ``count`` items all hold this one object, in order)."""
    __slots__ = ("it", "made")

    def __init__(self, it: Iterator[List[Any]]) -> None:
        self.it = it
        self.made: List[List[Any]] = []

    def next(self) -> List[Any]:
        f = next(self.it)
        self.made.append(f)
        return f

    def drop(self) -> None:
        """Let go of the caller's memory (its views pin it: a bytearray could not be resized)."""
        self.it = iter(())
        self.made = []


def _auth_error(e: BaseException) -> bool:
    text = str(e).lower()
    if "permissions violation" in text:         # a subject refused (its name may say anything): not the login
        return False
    return "authorization" in text or "authentication" in text or isinstance(e, nats_errors.AuthorizationError)


async def _say_hello(nc: Any, topic: str) -> None:
    """A queue member's hello on ``topic`` (see the module docstring); a failure (no permission,
    the connection away with a full reconnect buffer) leaves the answer's life as the bound."""
    try:
        await nc.publish(HELLO_PREFIX + topic, b"")
    except Exception as e:  # noqa: BLE001
        log.debug("msight_fast: NATS could not say hello on %r: %r", topic, e)


def _where(url: Any) -> str:
    """host:port of a server URL, without credentials."""
    if url is None:
        return "?"
    try:
        return f"{url.hostname}:{url.port}"
    except (AttributeError, ValueError):
        return "?"


async def _connect(cfg: Any, **cbs: Any) -> Any:
    opts: Dict[str, Any] = dict(servers=cfg.servers, connect_timeout=cfg.connect_timeout_s,
                                allow_reconnect=True, max_reconnect_attempts=-1,
                                reconnect_time_wait=RECONNECT_WAIT_S, pending_size=RECONNECT_BUFFER,
                                ping_interval=PING_INTERVAL_S, max_outstanding_pings=MAX_OUTSTANDING_PINGS, **cbs)
    if cfg.username:
        opts["user"], opts["password"] = cfg.username, cfg.password
    if cfg.token:
        opts["token"] = cfg.token
    if cfg.nkey_seed:
        opts["nkeys_seed_str"] = cfg.nkey_seed
    if cfg.user_jwt:
        opts["user_jwt_cb"] = lambda: cfg.user_jwt.encode()
        if cfg.nkey_seed:
            opts["signature_cb"] = None
    if cfg.user_credentials:
        opts["user_credentials"] = cfg.user_credentials
    if cfg.use_tls or cfg.tls_ca_cert_file or cfg.tls_cert_file:
        import ssl
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_cert_file)
        if cfg.tls_cert_file:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        opts["tls"] = ctx
    # nats-py retries an unreachable server without end at first connect: bound it ourselves
    nc = _Client()
    nc.msf_routes = {}
    try:
        await asyncio.wait_for(nc.connect(**opts), cfg.connect_timeout_s)
    except BaseException:
        try:
            await asyncio.wait_for(nc.close(), 1.0)     # stop its reconnect and read tasks
        except BaseException:  # noqa: BLE001 - the connect error is the one to report
            pass
        raise
    return nc


class NatsTransport(Transport):
    name = "nats"
    FRAGMENTS_ITSELF = True
    CAPABILITIES = Capabilities(delivery="best_effort", groups="queue", persistence=False, max_message=1 << 20)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._auth_failed = False
        self._closing = False
        self.disconnects = 0
        self.reconnects = 0
        self.lost = 0
        self.last_outage_s: Optional[float] = None
        self._outage_since: Optional[float] = None
        self._last_error: Optional[BaseException] = None
        self._server_said: Optional[str] = None      # a server -ERR naming a slow consumer
        self._server_id: Optional[str] = None
        self._server_url: Any = None
        self._sources: Dict[int, NatsSource] = {}   # sid -> source, for nats-py's own drops
        # publish hand-off; every field the callbacks touch exists before the first connect
        self._q: Deque[_Item] = collections.deque()
        self._q_bytes = 0
        # whether _q may hold a fragmented frame's messages: with none, a batch needs no reordering
        # (_whole_first takes a Python step per message; a copy of the deque is one C loop)
        self._q_pieces = False
        self._cv = threading.Condition()
        self._scheduled = False
        self._inflight: List[_Item] = []   # the batch _drain is on
        self._inflight_i = -1
        self._inflight_bytes = 0        # of the batch's messages not yet handed on: counted by the away check
        self._buffered: Deque[_Sent] = collections.deque()   # frames put in the reconnect buffer
        self._failures: List[Tuple[str, str]] = []
        self._failed = 0
        # fragmented frames kept for queue members' pulls: topic, fragments, their buffer
        self._rest: collections.OrderedDict[Tuple[int, ...], Tuple[str, List[Any], Optional[np.ndarray]]] = \
            collections.OrderedDict()
        self._spare: List[np.ndarray] = []          # fragment buffers to reuse
        self._groups: Dict[str, Tuple[float, bool]] = {}   # topic -> (answer good until, a queue group listens)
        self._hello: Dict[str, float] = {}    # topic -> when a member last said hello (topics probed only)
        self._probing: Set[str] = set()
        self._probes: Set[Any] = set()               # probe tasks under way
        self._pull_sub = None
        self._pull_subject: Optional[str] = None
        self._lock = threading.Lock()
        self._L = _Loop()
        self._cbs: Dict[str, Callable[..., Any]] = dict(
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
        try:
            self.nc = self._L.run(_connect(cfg, **self._cbs), cfg.connect_timeout_s + 2)
        except BaseException as e:
            self._L.stop()
            where = ", ".join(cfg.servers)
            if _auth_error(e) or self._auth_failed:
                raise AuthError(f"NATS at {where} refused the credentials: {e}") from None
            why = self._last_error if isinstance(e, (TimeoutError, asyncio.TimeoutError)) and self._last_error else e
            raise BackendUnavailable(f"NATS at {where} is unreachable within {cfg.connect_timeout_s} s: "
                                     f"{why!r}") from None
        self._note_server()
        server_max = self.nc.max_payload
        self.max_payload = min(server_max, cfg.max_payload) if cfg.max_payload else server_max
        self.long_frame_bytes = _long_from(self.max_payload)
        self.capabilities = Capabilities(delivery="best_effort", groups="queue", persistence=False,
                                         max_message=self.max_payload)

    # -- connection events (on the loop thread)
    async def _on_error(self, e: Exception) -> None:
        if isinstance(e, nats_errors.SlowConsumerError):
            # nats-py's own per-subscription limit, not the server's: count the message as dropped
            src = self._sources.get(getattr(e, "sid", -1))
            if src is not None:
                src.client_dropped += 1
            return
        if _auth_error(e):
            self._auth_failed = True
        text = str(e).lower()
        if "permissions violation" in text and HELLO_PREFIX.lower() in text:
            # hellos are optional: a refusal must not stand in later messages for what went wrong
            log.debug("msight_fast: NATS refused a queue member's hello: %r", e)
            return
        if "slow consumer" in text:
            self._server_said = str(e)
        self._last_error = e
        log.debug("msight_fast: NATS error: %r", e)

    async def _on_disconnected(self) -> None:
        if self._closing or not hasattr(self, "nc"):     # closing, or a first connect that failed
            return
        self.disconnects += 1
        self._outage_since = time.monotonic()
        nc = getattr(self, "nc", None)
        cause = getattr(nc, "msf_cause", None) or self._last_error
        log.warning("msight_fast: NATS connection lost to %s (%s); reconnecting every %.1f s. Meanwhile a publish "
                    "goes to nats-py's %d MB reconnect buffer, or waits up to publish_timeout_s for the "
                    "connection; frames lost are counted ('lost' in Bus.stats(), 'gaps' in Subscription.stats()).",
                    _where(self._server_url), _describe(cause), RECONNECT_WAIT_S, RECONNECT_BUFFER >> 20)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        since = self._outage_since
        self.last_outage_s = None if since is None else time.monotonic() - since
        old_id, old_url = self._server_id, self._server_url
        self._note_server()
        nc = self.nc
        cause = getattr(nc, "msf_cause", None)
        if self._server_said:
            why = f"the server closed this connection as a slow consumer ({self._server_said}): {SLOW_CONSUMER_ADVICE}"
        elif self._server_id is not None and self._server_id == old_id:
            if isinstance(cause, nats_errors.StaleConnectionError) and not isinstance(cause, nats_errors.UnexpectedEOF):
                why = "the same server stopped answering pings (stalled or overloaded) and answers again"
            elif self._sources:
                why = ("the same server (same server_id) closed this connection, most likely as a slow consumer: "
                       + SLOW_CONSUMER_ADVICE)
            else:
                why = "the connection was cut and the same server (same server_id) took it back"
        elif _where(self._server_url) != _where(old_url):
            why = f"failed over from {_where(old_url)}, which went away, to another server of the cluster"
        else:
            why = "the server restarted (it has a new server_id)"
        log.warning("msight_fast: NATS reconnected to %s after %s: %s", _where(self._server_url),
                    "?" if self.last_outage_s is None else f"{self.last_outage_s:.2f} s", why)
        self._server_said = None
        self._outage_since = None
        nc.msf_cause = None
        self._refresh_max_payload()
        with self._cv:
            self._buffered.clear()       # nats-py wrote its reconnect buffer to the new connection
            self._cv.notify_all()
        # nats-py has subscribed again: a queue member says hello anew (publishers may have heard
        # "no group" while it was away). A copy: close() may drop sources from another thread
        members = {src.topic for src in list(self._sources.values()) if src.group_id and not src._closed}
        for topic in members:
            await _say_hello(nc, topic)

    async def _on_closed(self) -> None:
        if not self._closing and hasattr(self, "nc"):
            log.error("msight_fast: NATS closed the connection for good (%s); publishes now fail",
                      _describe(self._last_error))
        with self._cv:
            self._cv.notify_all()

    def _note_server(self) -> None:
        nc = self.nc
        self._server_id = (getattr(nc, "_server_info", None) or {}).get("server_id")
        self._server_url = nc.connected_url

    def _refresh_max_payload(self) -> None:
        """Another server may take a different max_payload: fragment for the one connected now."""
        server_max = self.nc.max_payload
        mp = min(server_max, self.cfg.max_payload) if self.cfg.max_payload else server_max
        if mp != self.max_payload:
            log.warning("msight_fast: NATS max_payload is now %d bytes (was %d)", mp, self.max_payload)
            self.max_payload = mp
            self.long_frame_bytes = _long_from(mp)
            self.capabilities = Capabilities(delivery="best_effort", groups="queue", persistence=False,
                                             max_message=mp)

    def _state(self) -> str:
        """Why the server is not taking frames, for error messages."""
        nc = self.nc
        if nc.is_closed:
            return f"the connection is closed ({_describe(self._last_error)})"
        if not nc.is_connected:
            since = self._outage_since
            away = "" if since is None else f" for {time.monotonic() - since:.1f} s"
            return f"the server is away{away}, reconnecting (last error: {_describe(self._last_error)})"
        return f"{_where(self._server_url)} takes no data (stalled or overloaded?)"

    # -- publish
    def send(self, msg: Outgoing, deadline: float) -> Optional[Callable[[], None]]:
        topic, nbytes = msg.topic, msg.nbytes
        if msg.fragments is not None:       # fragmented by the caller already: bytes, written as they are
            return self._send_fragments(msg, len(msg.fragments), iter([[f] for f in msg.fragments]), deadline)
        if nbytes > self.max_payload:
            return self._send_fragments(msg, *self._fragment(msg), deadline)
        if nbytes < ZERO_COPY_MIN:         # copied now: the hand-off batches small frames
            self._enqueue([(topic, msg.joined(), None, _Sent())], nbytes, nbytes, deadline)
            return None
        # a large frame goes as views of the caller's parts, written by the loop thread without
        # joining them; the caller waits for that (the array may change once publish returns)
        rec = _Sent(wait=True)
        self._enqueue([(topic, list(msg.parts), None, rec)], nbytes, nbytes, deadline)
        return functools.partial(self._await_written, rec, topic, nbytes, deadline)

    def _send_fragments(self, msg: Outgoing, count: int, frags: Iterator[List[Any]],
                        deadline: float) -> Callable[[], None]:
        """Broadcast the fragments, made by the loop thread one at a time as it writes them (views
        of the caller's parts: nothing is gathered first, and the first fragment is on the wire
        once its own CRC is computed); the rest of the send (``_fragments_written``) waits until
        all are written.

        The loop thread makes them, not this one: two threads taking turns at work that releases
        the GIL hand it over late (an ad-hoc trace, not a benchmark of this repository: fragments
        made here, each handed over as soon as it was made, still went out only once the last was
        made, 0.8-1.9 ms after publish; benchmarks/README.md has the figures of this design)."""
        if self._pull_subject is None:
            self._start_pull_service(msg.publisher_id, deadline)
        if msg.topic not in self._groups:
            # ask now: the answer is likely in before the fragments are written, and the first
            # frame need not be copied and announced on the assumption that a group listens
            self._groups_listen(msg.topic)
        rec = _Sent(wait=True, items=count)
        pieces = _Pieces(frags)
        self._enqueue([(msg.topic, pieces, None, rec)] * count, msg.nbytes + S.FRAG_HEADER_LEN * count,
                      msg.nbytes, deadline)
        return functools.partial(self._fragments_written, msg, rec, pieces, deadline)

    def _fragments_written(self, msg: Outgoing, rec: _Sent, pieces: _Pieces, deadline: float) -> None:
        """The rest of ``_send_fragments``: wait until every fragment is written. Then keep a copy
        of them for queue members' pulls, and announce the frame to queue groups: the first
        fragment's header alone, so nothing is sent twice when no group listens."""
        topic, nbytes = msg.topic, msg.nbytes
        try:
            self._await_written(rec, topic, nbytes, deadline)
            if rec.lost:                   # counted, and reported by flush(); a pull could not complete it either
                return
            if not self._groups_listen(topic):
                return                     # nothing to keep a copy for, or to announce
            cached, buf = self._keep_for_pulls(pieces.made, nbytes, msg.fragments is None)
            head = bytes(memoryview(pieces.made[0][0])[:S.FRAG_HEADER_LEN])
        finally:
            pieces.drop()                  # every item of it is done with, or skipped (lost)
        with self._lock:
            got = self._groups.get(topic)
            if got is not None and not got[1] and time.monotonic() < got[0]:
                # "no group" came meanwhile (and _forget_pulls ran with it): nothing to cache
                return
            # keyed as the member's reassembler keys the frame: a Frame sent again has its own entry
            self._rest[frame_key(head)] = (topic, cached, buf)
            while len(self._rest) > REST_CACHE:
                _, (_, _, old_buf) = self._rest.popitem(last=False)
                # pulls copy out of the cache under the lock: its buffer is free for a later frame
                if old_buf is not None and len(self._spare) < SPARE_BUFFERS:
                    self._spare.append(old_buf)
        # the announcement is one more message of the frame (a failure counts the frame lost, once);
        # its fragments are out, so publish does not fail here: a refusal is counted and reported
        with self._cv:
            rec.left += 1
        try:
            self._enqueue([(GROUP_PREFIX + topic, head, self._pull_subject, rec)], S.FRAG_HEADER_LEN, nbytes, deadline)
        except MsightFastError as e:
            self._lose(rec, GROUP_PREFIX + topic, repr(e))

    def _groups_listen(self, topic: str) -> bool:
        """Whether a queue group may listen on ``topic``: the server's last answer while it is
        under ``GROUP_PROBE_S`` old, and ``GROUP_STALE_S`` more while the server is asked again
        in the background; else True (a copy and an announcement made for nothing cost less than
        a frame a member misses). A member's hello (``_on_hello``) makes the answer "yes" at once."""
        got = self._groups.get(topic)
        now = time.monotonic()
        if got is not None and now < got[0]:
            return got[1]
        with self._lock:
            ask = topic not in self._probing
            self._probing.add(topic)
        if ask:
            try:
                self._L.loop.call_soon_threadsafe(self._ask_groups, topic)
            except RuntimeError:                  # the loop is closed: the transport is closing
                with self._lock:
                    self._probing.discard(topic)
                return True
        # the answer just expired holds while the server is asked again (a round trip): else every
        # topic's frame after each expiry is copied and announced for nothing, all in one burst on
        # a Bus whose sensors share a rate (benchmarks/README.md, the intersection load)
        return got[1] if got is not None and now < got[0] + GROUP_STALE_S else True

    def _ask_groups(self, topic: str) -> None:
        task = self._L.loop.create_task(self._probe_groups(topic))
        self._probes.add(task)                    # the loop keeps only a weak reference to a task
        task.add_done_callback(self._probes.discard)

    async def _probe_groups(self, topic: str) -> None:
        """A request on the group subject that nobody answers: with no subscriber the server
        refuses it at once ("no responders"); a member takes it, sees no frame in it, and stays
        silent, so the request times out. Anything else (server away, no headers support, no
        permission for the reply inbox) counts as a group listening."""
        listens = True
        asked = time.monotonic()
        try:
            if self.nc.is_connected:              # away: it would only take room in the reconnect buffer
                await self.nc.request(GROUP_PREFIX + topic, b"", timeout=PROBE_WAIT_S)
        except nats_errors.NoRespondersError:
            listens = False
        except Exception:  # noqa: BLE001 - a timeout (a member took it), or no answer to be had
            pass
        finally:
            now = time.monotonic()
            # one lock with the answer: _send_fragments checks it under this lock before caching
            with self._lock:
                for t in [t for t, (until, _) in self._groups.items() if until < now - 60]:
                    del self._groups[t]           # topics no longer published, and their frames
                    self._hello.pop(t, None)
                    self._forget_pulls(t)
                if self._hello.get(topic, -1.0) >= asked:
                    listens = True                # a member said hello after the server's "no" was given
                self._groups[topic] = (now + GROUP_PROBE_S, listens)
                if not listens:
                    self._forget_pulls(topic)
                self._probing.discard(topic)

    async def _on_hello(self, msg: Any) -> None:
        """A queue member joined or reconnected on a topic: a group listens from now on. Only
        topics this publisher asked about are noted, so hellos cannot grow its state; a hello
        has no payload (one with a payload is not ours)."""
        if msg.data:
            return
        topic = msg.subject[len(HELLO_PREFIX):]
        now = time.monotonic()
        with self._lock:
            if topic in self._groups or topic in self._probing:
                self._hello[topic] = now
                self._groups[topic] = (now + GROUP_PROBE_S, True)

    def _forget_pulls(self, topic: str) -> None:
        """Nobody is to pull ``topic``'s cached frames: let their buffers go (and the spare ones,
        once no topic keeps any). The caller holds ``self._lock``."""
        for k in [k for k, v in self._rest.items() if v[0] == topic]:
            del self._rest[k]
        if not self._rest:
            self._spare.clear()

    def _keep_for_pulls(self, made: List[List[Any]], nbytes: int,
                        views: bool) -> Tuple[List[Any], Optional[np.ndarray]]:
        """A copy of the fragments that outlives the caller's memory (``views``: else they are
        bytes of the caller's own fragmenting, copies already)."""
        if not views:
            return [f[0] for f in made], None
        buf = self._buffer(nbytes)
        cached: List[Any] = []
        pos = 0
        for f in made:
            start = pos
            for p in f[1:]:
                n = memoryview(p).nbytes
                buf[pos:pos + n] = np.frombuffer(p, dtype=np.uint8)
                pos += n
            cached.append([f[0], buf.data[start:pos]])
        return cached, buf

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A buffer for a fragmented frame's copy: one of this transport's, reused once its frame
        left the pull cache, so the copy goes to memory already mapped (a fresh 6 MB buffer costs
        more in page faults than the copy itself)."""
        with self._lock:
            # by position: list.remove would compare arrays with ==, element by element
            i = next((k for k, b in enumerate(self._spare) if nbytes <= b.nbytes <= 2 * nbytes), -1)
            spare = self._spare.pop(i) if i >= 0 else None
        return spare if spare is not None else np.empty(nbytes, dtype=np.uint8)

    def _fragment(self, msg: Outgoing) -> Tuple[int, Iterator[List[Any]]]:
        """The frame's fragments (docs/wire-format.md), each [64-byte header, views of its chunk]."""
        try:
            return fragment_views(msg.parts, self.max_payload)
        except (FrameError, ValueError) as e:     # more fragments than allowed, or no room for one
            raise FrameTooLarge(f"NATS max_payload {self.max_payload}: {e}") from None

    def _enqueue(self, items: List[_Item], nbytes: int, frame_bytes: int,
                 deadline: float) -> None:
        with self._cv:
            while True:
                nc = self.nc
                if self._closing or nc.is_closed:
                    if self._auth_failed:
                        raise AuthError(f"NATS refused the credentials on reconnect: {_describe(self._last_error)}")
                    raise BackendUnavailable(f"NATS: {'the transport is closed' if self._closing else self._state()}")
                if nc.is_connected:
                    if self._q_bytes <= HANDOFF_MAX_BYTES or not self._q:   # backpressure, bounded memory
                        break
                elif (self._q_bytes + self._inflight_bytes + nc.pending_data_size + nbytes
                      + PUB_OVERHEAD * (len(self._q) + len(self._inflight) - self._inflight_i - 1 + len(items))
                      <= RECONNECT_BUFFER):
                    # into nats-py's reconnect buffer: delivered once back, or counted lost. What the
                    # loop thread took and has not handed on yet is counted too, or this admits more
                    # than the buffer holds and nats-py refuses the rest
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailable(f"NATS: a frame of {frame_bytes} bytes waited the whole publish timeout: "
                                             f"{self._state()}")
                self._cv.wait(min(left, 0.05))     # woken by _drain and reconnects; the poll sees state flips
            items[0][3].share = nbytes // len(items)     # every item of one call is one frame's
            if type(items[0][1]) is _Pieces:
                self._q_pieces = True
            self._q.extend(items)
            self._q_bytes += nbytes
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            self._L.loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        """The loop thread's turn at the hand-off, as a plain callback: a Task would take one
        more trip round the loop before its first step (``benchmarks/nats_publish_trace.py``, an
        idle 6 MB frame as one message: its first write began 0.23-0.24 ms after the stamp with
        a Task, 0.17-0.18 ms with this)."""
        pending = self._drain_sync()
        if pending is not None:
            self._L.loop.create_task(self._drain_async(pending))

    async def _drain_async(self, pending: Optional[Tuple[Any, _Sent, str, bool]]) -> None:
        """Waits on what a message needs (nats-py's publish, the socket's backpressure), then goes on."""
        while pending is not None:
            aw, rec, subject, away = pending
            try:
                await aw
            except Exception as e:  # noqa: BLE001 - counted now, reported by flush()
                self._lose(rec, subject, repr(e), True)
            else:
                if away and (not self._buffered or self._buffered[-1] is not rec):
                    self._buffered.append(rec)
            pending = self._drain_sync()

    def _drain_sync(self) -> Optional[Tuple[Any, _Sent, str, bool]]:
        """Write from the hand-off until it is empty (None), or until a message needs the loop:
        then (what to await, its frame, its subject, whether it went to the reconnect buffer)."""
        nc = self.nc
        # one budget for waiting on the socket per turn: past it, messages are copied into
        # asyncio's buffer instead, whose high water hands the loop back (reads, pings, pulls)
        sync_end = time.monotonic() + SYNC_WRITE_S
        while True:
            if self._inflight_i + 1 >= len(self._inflight):
                with self._cv:
                    if not self._q:
                        self._scheduled = False
                        self._q_bytes = 0
                        self._inflight = []
                        self._inflight_i = -1
                        self._inflight_bytes = 0
                        self._cv.notify_all()
                        return None
                    self._inflight = _whole_first(self._q, []) if self._q_pieces else list(self._q)
                    self._inflight_i = -1
                    self._inflight_bytes = self._q_bytes
                    self._q.clear()
                    self._q_pieces = False
                    self._q_bytes = 0
                    self._cv.notify_all()
            elif self._q and type(self._inflight[self._inflight_i + 1][1]) is _Pieces:
                # between two fragments: what may pass them goes first; the rest stays handed over,
                # and counted, so that the hand-off's bound still holds
                with self._cv:
                    ahead = self._inflight[self._inflight_i + 1:]
                    first, last = _split(self._q, ahead)
                    if first:
                        moved = sum(it[3].share for it in first)
                        self._inflight = first + ahead
                        self._inflight_i = -1
                        self._inflight_bytes += moved
                        self._q.clear()
                        self._q.extend(last)      # a part of _q: _q_pieces still holds for it
                        self._q_bytes -= moved
                        self._cv.notify_all()
            self._inflight_i += 1
            subject, data, reply, rec = self._inflight[self._inflight_i]
            self._inflight_bytes -= rec.share      # only this thread writes it outside the take above
            lk = rec.lock                          # the caller's memory: it may give up on the frame meanwhile
            if lk is not None:
                lk.acquire()
            try:
                with self._cv:
                    if rec.lost:                   # an earlier fragment failed, or the caller gave up: gone
                        rec.finish()
                        continue
                away = not nc.is_connected
                finished = False
                try:
                    if type(data) is _Pieces:
                        data = data.next()
                    w = None if away else _direct_write(nc, subject, data, reply, sync_end)
                    if w is None:
                        data = data if isinstance(data, bytes) else b"".join(data)
                    finished = True
                    rec.finish()                   # written, or copied: no view of it is needed any more
                    if w is None:
                        return nc.publish(subject, data, reply=reply or ""), rec, subject, away
                    if w.transport.get_write_buffer_size() > DIRECT_HIGH_WATER:
                        # backpressure: what the socket has not taken stays bounded
                        return w.drain(), rec, subject, False
                except Exception as e:  # noqa: BLE001 - counted now, reported by flush()
                    self._lose(rec, subject, repr(e), finished)
            finally:
                if lk is not None:
                    lk.release()

    def _await_written(self, rec: _Sent, topic: str, nbytes: int, deadline: float) -> None:
        """Wait until the loop thread wrote every message of ``rec`` (or gave up on it). Past the
        deadline the rest of the frame is dropped (see ``_give_up``) and BackendUnavailable raised."""
        assert rec.done is not None
        try:
            if rec.done.wait(max(0.0, deadline - time.monotonic())):
                return
        except BaseException:
            # an interrupt: the caller's memory is no longer waited for, so nothing more of it is written
            self._give_up(rec)
            raise
        if self._give_up(rec):
            return
        raise BackendUnavailable(f"NATS: a frame of {nbytes} bytes on {topic!r} was not written within "
                                 f"the publish timeout: {self._state()}")

    def _give_up(self, rec: _Sent) -> bool:
        """Stop the loop thread from writing any more of ``rec`` from the caller's memory: after
        this, nothing of it is. True if it was all written meanwhile; else it is counted lost
        (once). The message being written, if any, is waited for: at most SYNC_WRITE_S."""
        assert rec.lock is not None
        # held by the loop thread only while it makes and writes one message (see _write_rest)
        got = rec.lock.acquire(timeout=GIVE_UP_WAIT_S)
        if not got:
            log.error("msight_fast: NATS: the loop thread held a frame's lock for %.0f s", GIVE_UP_WAIT_S)
        try:
            with self._cv:
                if rec.written and not rec.lost:
                    return True
                first = not rec.lost
                rec.lost = True                # _drain skips what is left of it
                if first:
                    self.lost += 1
                return False
        finally:
            if got:
                rec.lock.release()

    def _lose(self, rec: _Sent, subject: str, reason: str, finished: bool = False) -> None:
        """One message of ``rec`` failed (``finished``: and was already counted out of the buffers'
        way); the frame is lost, counted once."""
        if not finished:
            rec.finish()
        with self._cv:                  # _give_up may mark it from the caller's thread meanwhile
            if rec.lost:
                return
            rec.lost = True
            self.lost += 1
            self._failed += 1
            if len(self._failures) < MAX_FAILURES:
                self._failures.append((subject, reason))

    def _start_pull_service(self, publisher_id: int, deadline: float) -> None:
        subject = f"{PULL_PREFIX}{publisher_id:016x}"

        async def serve(msg: Any) -> None:
            # request body: the first fragment's header; reply subject: the member's inbox
            if len(msg.data) < S.FRAG_HEADER_LEN:
                return
            with self._lock:
                entry = self._rest.get(frame_key(msg.data))
                # copied now: once the frame leaves the cache, its buffer serves a later frame
                datas = [] if entry is None else [b"".join(f) if isinstance(f, list) else bytes(f) for f in entry[1]]
            if entry is None or not msg.reply:
                return
            try:
                for f in datas:
                    await self.nc.publish(msg.reply, f)
            except Exception as e:  # noqa: BLE001 - the member's reassembler expires the frame
                log.debug("msight_fast: NATS could not answer a pull: %r", e)

        async def sub() -> Any:
            got = await self.nc.subscribe(subject, cb=serve)
            try:
                # hellos are empty and rare: past 1,024 messages or 64 KiB waiting for this
                # callback, nats-py drops what comes (counted by no one: a hello lost costs the
                # answer's life at most), so nobody can fill this publisher's memory with them
                await self.nc.subscribe(HELLO_PREFIX + ">", cb=self._on_hello, pending_msgs_limit=1024,
                                        pending_bytes_limit=64 << 10)
            except Exception as e:  # noqa: BLE001 - without hellos, the answer's life is the bound
                log.debug("msight_fast: NATS could not listen for queue members' hellos: %r", e)
            return got

        try:
            # while the server is away nats-py keeps the subscription and sends it on reconnect
            self._pull_sub = self._L.run(sub(), max(0.1, deadline - time.monotonic()))
        except (TimeoutError, nats_errors.Error) as e:
            raise BackendUnavailable(f"NATS: could not set up the fragment service: {e!r}; {self._state()}") from None
        self._pull_subject = subject

    def flush(self, timeout: Optional[float]) -> None:
        """Wait (at most ``timeout`` s; None: ``FLUSH_DEFAULT_S``) until nats-py has every queued
        frame and the server has answered a PING sent after them. While the server is away this
        waits for it at most ``timeout`` (None: ``connect_timeout_s``)."""
        if self._closing and not self._L.loop.is_running():
            return
        bound = FLUSH_DEFAULT_S if timeout is None else max(0.0, timeout)
        start = time.monotonic()
        deadline = start + bound
        away_deadline = deadline if timeout is not None else min(deadline, start + self.cfg.connect_timeout_s)
        nc = self.nc
        problem: Optional[str] = None
        with self._cv:
            while self._q or self._scheduled:
                now = time.monotonic()
                limit = deadline if nc.is_connected else away_deadline
                if now >= limit:
                    unsent = len(self._q) + max(0, len(self._inflight) - self._inflight_i - 1)
                    problem = (f"{unsent} messages still queued after "
                               f"{now - start:.1f} s: {self._state()}")
                    break
                self._cv.wait(min(limit - now, 0.1))      # woken by _drain; the poll sees the connection go
            if problem is None and not self._cv.wait_for(lambda: nc.is_connected or nc.is_closed,
                                                         max(0.0, away_deadline - time.monotonic())):
                problem = (f"{len(self._buffered)} frames wait in the reconnect buffer after "
                           f"{time.monotonic() - start:.1f} s: {self._state()}")
        if problem is None and nc.is_closed:
            problem = self._state()
        if problem is None:
            left = max(0.05, deadline - time.monotonic())
            try:
                self._L.run(nc.flush(timeout=left), left + 1)
            except Exception as e:  # noqa: BLE001 - timeout, or the connection went meanwhile
                problem = f"flush failed: {e!r}; {self._state() if not nc.is_connected else 'no PONG'}"
        with self._cv:
            failures, self._failures = self._failures, []
            failed, self._failed = self._failed, 0
        if problem is not None:
            raise PublishError(f"NATS: {problem}" + (f"; and {failed} frames failed" if failed else ""),
                               failures + [("?", problem)])
        if failed:
            raise PublishError(f"{failed} frames failed: {failures[0][1]}", failures)

    # -- subscribe
    def open(self, topic: str, group_id: Optional[str], from_beginning: bool,
             start: Optional[Start] = None) -> Source:
        if self._closing:
            raise BackendUnavailable("NATS: the transport is closed")
        return NatsSource(self, topic, group_id)

    def stats(self) -> Dict[str, Any]:
        nc = getattr(self, "nc", None)
        return {"connected": bool(nc is not None and nc.is_connected and not self._closing),
                "disconnects": self.disconnects, "reconnects": self.reconnects, "lost": self.lost,
                "last_outage_s": self.last_outage_s}

    def close(self) -> None:
        if self._closing:
            return
        nc = self.nc
        if nc.is_connected or self._q or self._scheduled or self._buffered:
            try:
                self.flush(CLOSE_FLUSH_S)
            except Exception:  # noqa: BLE001 - closing anyway; what did not leave is counted below
                pass
        with self._cv:
            self._closing = True
            self._cv.notify_all()

        async def shut() -> None:
            if not nc.is_connected:      # nats-py drops its reconnect buffer with the client
                for rec in list(self._buffered):
                    self._lose(rec, "?", "closed while the server was away")
            await nc.close()
        try:
            self._L.run(shut(), CLOSE_WAIT_S)
        except Exception:  # noqa: BLE001 - a stalled server: drop the socket instead
            try:
                self._L.loop.call_soon_threadsafe(_abort, nc)
            except RuntimeError:
                pass
        self._L.stop()
        with self._cv:
            left = self._inflight[self._inflight_i + 1:] + list(self._q)
            self._q.clear()
            self._q_pieces = False
            self._inflight = []
            self._inflight_bytes = 0
        for subject, _, _, rec in left:
            self._lose(rec, subject, "closed before it was sent")


def _describe(e: Optional[BaseException]) -> str:
    if e is None:
        return "connection closed"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class NatsSource(Source):
    def __init__(self, t: NatsTransport, topic: str, group_id: Optional[str]) -> None:
        self.t = t
        self.topic = topic
        self.q = BoundedQueue(t.cfg.max_pending_bytes, t.cfg.drop_policy)
        self.client_dropped = 0          # messages nats-py dropped above its per-subscription limit
        self.group_id = group_id
        self.inbox = ""
        self._subs: List[Any] = []        # nats-py Subscriptions
        self._closed = False
        cfg = t.cfg
        limit = dict(pending_msgs_limit=1_000_000, pending_bytes_limit=2 * cfg.max_pending_bytes)
        q = self.q
        deadline = time.monotonic() + cfg.connect_timeout_s

        async def on_msg(msg: Any) -> None:
            q.put(msg.data, len(msg.data))

        async def on_first(msg: Any) -> None:
            data = msg.data
            if len(data) > S.FRAG_HEADER_LEN:       # a whole first fragment (publishers before the announcement)
                q.put(data, len(data))
            if data[:4] == S.FRAG_MAGIC and msg.reply:
                # a queue member got the first fragment of a frame: ask its publisher for the rest
                try:
                    await t.nc.publish(msg.reply, data[:S.FRAG_HEADER_LEN], reply=self.inbox)
                except Exception as e:  # noqa: BLE001 - the reassembler expires the frame
                    log.debug("msight_fast: NATS could not ask for the rest of a frame: %r", e)

        def take(buf: Any) -> None:
            q.put(buf, len(buf))

        def take_whole(buf: Any) -> None:
            if bytes(buf[:4]) != S.FRAG_MAGIC:    # fragments on the plain subject are for broadcast
                q.put(buf, len(buf))

        async def add(subject: str, cb: Any, queue: str = "", route: Optional[Callable[[Any], None]] = None) -> None:
            s = await t.nc.subscribe(subject, queue=queue, cb=cb, **limit)
            self._subs.append(s)
            t._sources[s._id] = self
            if route is not None:                 # its MSGs skip nats-py where the connection's reader is ours
                t.nc.msf_routes[s._id] = route

        async def setup() -> None:
            if group_id:
                self.inbox = t.nc.new_inbox()
                await add(self.inbox, on_msg, route=take)
                await add(topic, self._whole_only(on_msg), group_id, route=take_whole)
                await add(GROUP_PREFIX + topic, on_first, group_id)
                # publishers that last heard "no group" announce again from this hello on; the
                # flush below returns once the server has passed it on
                await _say_hello(t.nc, topic)
            else:
                await add(topic, on_msg, route=take)
            # the server has the interest before subscribe() returns: wait (bounded) for the
            # connection if it is away, then for a PING's answer
            while not t.nc.is_connected:
                if t.nc.is_closed or time.monotonic() >= deadline:
                    raise TimeoutError
                await asyncio.sleep(0.02)
            await t.nc.flush(timeout=max(0.05, deadline - time.monotonic()))

        try:
            t._L.run(setup(), cfg.connect_timeout_s + 2)
        except Exception as e:  # noqa: BLE001 - every failure here means: no subscription
            self.close()
            if t._auth_failed:
                raise AuthError(f"NATS refused the credentials: {_describe(t._last_error)}") from None
            raise BackendUnavailable(f"NATS: could not subscribe to {topic!r} within {cfg.connect_timeout_s} s "
                                     f"({_describe(e) if not isinstance(e, TimeoutError) else 'timeout'}): "
                                     f"{t._state()}") from None

    @staticmethod
    def _whole_only(cb: Any) -> Any:
        async def whole(msg: Any) -> None:
            if msg.data[:4] != S.FRAG_MAGIC:     # fragments on the plain subject are for broadcast
                await cb(msg)
        return whole

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        got = self.q.get(timeout)
        return None if got is None else (got[0], None)

    def stats(self) -> Dict[str, Any]:
        return {"dropped": self.q.dropped + self.client_dropped, "pending_bytes": self.q.nbytes,
                "reconnects": self.t.reconnects, "disconnects": self.t.disconnects}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.q.close()
        subs, self._subs = self._subs, []
        routes = getattr(self.t.nc, "msf_routes", {})
        for s in subs:
            self.t._sources.pop(getattr(s, "_id", -1), None)
            routes.pop(getattr(s, "_id", -1), None)

        async def unsub() -> None:
            for s in subs:
                try:
                    await s.unsubscribe()
                except Exception:  # noqa: BLE001 - the connection may be gone: nothing to undo
                    pass
        if subs and self.t._L.loop.is_running():
            try:
                self.t._L.run(unsub(), 2)
            except Exception:  # noqa: BLE001
                pass
