"""Redis backend: our own connection, replies parsed by hiredis, scatter-gather publish.

Broadcast, best effort, nothing persisted. Publishing sends ``PUBLISH topic <frame>`` with one
``sendmsg`` of [command prefix, frame header, payload view, CRLF]: the payload is not copied in
user space. Replies are read without waiting for each (pipelined) and parsed by hiredis.

Receiving uses a fast path for the one reply shape a subscribed connection gets, the
``message`` push: its short RESP prefix is parsed here and the payload is received with
``recv_into`` straight into a 64-byte-aligned buffer that the decoded frame views. hiredis
would need the whole bulk reply in its own buffer and then copy it into a ``bytes`` (two
copies); this path makes at most one user-space copy (only of the bytes that arrived in the
small staging buffer together with the prefix; none for the rest). No thread is started.

Both sides survive the server going away: every socket is non-blocking and every wait is a
``poll`` bounded by the caller's deadline, a lost connection is re-established with backoff
(kept across calls) inside ``send`` and ``next``, frames written but never acknowledged are
counted in the publisher's ``lost``, and a message that has started to arrive is resumed by the
next ``next`` call instead of being waited for. The server's ``run_id`` (``INFO server``) tells
a restart from a server that closed the connection on purpose.
"""
from __future__ import annotations

import logging
import math
import random
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import hiredis
import numpy as np

from ..errors import AuthError, BackendUnavailable, PublishError
from .base import Capabilities, Outgoing, Source, Start, Transport

log = logging.getLogger("msight_fast")

STAGE = 256 * 1024          # staging buffer for RESP prefixes and small messages
SMALL = 64 * 1024           # payloads up to this size are copied out of the staging buffer
OUTSTANDING_HIGH = 4096     # unread PUBLISH replies before the publisher stops to read them
MAX_BULK = 1 << 32          # larger than any bulk string Redis can send: a corrupt stream
DRAIN_EVERY = 64            # replies are read (without blocking) every this many publishes
MAX_FAILURES = 1000         # reasons kept for flush()'s report until it runs (all are counted)
BACKOFF_FIRST_S = 0.05      # reconnect backoff: first delay after a failed attempt ...
BACKOFF_MAX_S = 1.0         # ... doubling up to this, so a restarted server is found within ~1 s
ATTEMPT_FLOOR_S = 0.25      # a subscriber's reconnect attempt gets at least this long ...
ATTEMPT_FLOOR_MAX_S = 1.0   # ... doubled while attempts time out, up to this
PING_IDLE_S = 5.0           # a subscription silent this long is sent a PING ...
HEALTH_TIMEOUT_S = 10.0     # ... and dropped if nothing at all arrives this long after it
USER_TIMEOUT_MS = 15_000    # TCP_USER_TIMEOUT: the kernel drops a link whose sent data stays
                            # unacknowledged this long (a black-holed path), where replies alone
                            # would never tell a publisher of small frames

_PING = b"*1\r\n$4\r\nPING\r\n"
_CRLF = b"\r\n"
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_NET_ERRORS = (OSError, ConnectionError, hiredis.ProtocolError)   # ssl.SSLError is an OSError

_CAUSES = {
    "closed": "the server closed the connection",
    "refused": "connection refused: the server is down or restarting",
    "reset": "connection reset: the server crashed or was restarted, or the network cut the connection",
    "timeout": "no answer in time: the server is stalled or the network is down",
    "auth": "the server refused the credentials",
    "error": "the server or the network failed",
}


def _cmd(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


def _where(cfg: Any) -> str:
    return f"unix:{cfg.unix_socket_path}" if cfg.unix_socket_path else f"{cfg.host}:{cfg.port}"


class _Closed(ConnectionError):
    """The server closed the connection (EOF)."""


class _Silent(ConnectionError):
    """A subscribed connection answered nothing, not even a PING, within the health timeout."""


class _Stalled(Exception):
    """The deadline passed before any byte of the command was written: the connection is intact."""


def _cause(e: BaseException) -> str:
    """A key of ``_CAUSES`` for what was seen."""
    kind = getattr(e, "cause", None)
    if kind:
        return str(kind)
    if isinstance(e, AuthError):
        return "auth"
    if isinstance(e, _Closed):
        return "closed"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError, _Silent)):
        return "timeout"
    return "error"


def _unavailable(text: str, cause: str) -> BackendUnavailable:
    e = BackendUnavailable(text)
    e.cause = cause          # type: ignore[attr-defined]  # read by _cause()
    return e


def _wait(sock: Any, write: bool, timeout: float) -> bool:
    """Wait until ``sock`` is readable (or writable); False when ``timeout`` passes first."""
    try:
        if hasattr(select, "poll"):
            p = select.poll()                           # no FD_SETSIZE limit, unlike select()
            p.register(sock, select.POLLOUT if write else select.POLLIN)
            return bool(p.poll(max(0, math.ceil(timeout * 1000))))
        r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], max(0.0, timeout))
        return bool(r or w)
    except ValueError:                                  # closed by another thread: fd is -1
        raise ConnectionAbortedError("the connection was closed") from None


def _nowait(sock: Any, call: Callable[..., int], *args: Any) -> int:
    """``call(*args)`` without waiting, where the platform has no ``MSG_DONTWAIT`` (Windows): the
    socket's timeout is 0 for the call, as the flag would make it. A subscribed socket is
    non-blocking already (``RedisSource._open``), so there this costs nothing; any other socket
    gets its own timeout back."""
    t = sock.gettimeout()
    if t == 0.0:
        return call(*args)
    sock.settimeout(0.0)
    try:
        return call(*args)
    finally:
        sock.settimeout(t)


class _Conn:
    """A Redis connection with AUTH and SELECT done and the server's ``run_id`` read; request and
    reply through hiredis. Setting it up takes at most ``connect_timeout_s`` and ends by ``deadline``."""

    def __init__(self, cfg: Any, deadline: Optional[float] = None) -> None:
        self.cfg = cfg
        self.run_id: Optional[bytes] = None
        now = time.monotonic()
        end = now + cfg.connect_timeout_s
        if deadline is not None:
            end = min(end, deadline)
        budget = end - now
        if budget <= 0:
            raise _unavailable(f"Redis at {_where(cfg)}: no time left to connect", "timeout")
        self._end = end
        try:
            if cfg.unix_socket_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(budget)
                    s.connect(cfg.unix_socket_path)
                except BaseException:
                    s.close()
                    raise
            else:
                s = socket.create_connection((cfg.host, cfg.port), timeout=budget)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if hasattr(socket, "TCP_USER_TIMEOUT"):     # Linux only
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
            if cfg.use_tls:
                ctx = ssl.create_default_context(cafile=cfg.tls_ca_cert_file)
                if cfg.tls_cert_file:
                    ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
                s.settimeout(max(1e-3, end - time.monotonic()))
                s = ctx.wrap_socket(s, server_hostname=None if cfg.unix_socket_path else cfg.host)
        except (OSError, ssl.SSLError) as e:
            cause = _cause(e)
            if cause == "timeout":
                raise _unavailable(f"Redis at {_where(cfg)} did not accept a connection within {budget:.3g} s",
                                   cause) from None
            raise _unavailable(f"Redis at {_where(cfg)} is unreachable: {e}", cause) from None
        self.sock = s
        self.tls = cfg.use_tls
        self.reader = hiredis.Reader()
        self._rbuf = bytearray(65536)
        try:
            if cfg.password:
                args = [b"AUTH"] + ([cfg.username.encode()] if cfg.username else []) + [cfg.password.encode()]
                self._check(self._step(*args), "AUTH")
            self._check(self._step(b"PING"), "PING")
            if cfg.db:
                self._check(self._step(b"SELECT", str(cfg.db).encode()), "SELECT")
            info = self._step(b"INFO", b"server")        # an error reply (INFO renamed away): no run_id
            if isinstance(info, bytes):
                i = info.find(b"run_id:")
                if i >= 0:
                    self.run_id = info[i + 7:info.find(b"\r\n", i)].strip() or None
            s.settimeout(cfg.connect_timeout_s)          # for plain call()s; owners set their own mode
        except (AuthError, BackendUnavailable):            # from _check, which closed the socket
            raise
        except (socket.timeout, TimeoutError):
            s.close()
            raise _unavailable(f"Redis at {_where(cfg)} did not answer within {budget:.3g} s", "timeout") from None
        except (OSError, ssl.SSLError, hiredis.ProtocolError) as e:
            s.close()
            raise _unavailable(f"Redis at {_where(cfg)}: {e}", _cause(e)) from None

    def _step(self, *args: bytes) -> Any:
        """``call`` within what is left of the set-up time."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(left)
        return self.call(*args)

    def _check(self, reply: Any, what: str) -> None:
        if isinstance(reply, hiredis.ReplyError):
            msg = str(reply)
            self.sock.close()
            if any(k in msg for k in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username", "AUTH")):
                # the server's text, never the credential itself
                raise AuthError(f"Redis at {_where(self.cfg)} refused {what}: {msg}")
            raise _unavailable(f"Redis at {_where(self.cfg)} refused {what}: {msg}", "error")

    def call(self, *args: bytes) -> Any:
        self.sock.sendall(_cmd(*args))
        return self.read_reply()

    def read_reply(self) -> Any:
        while True:
            r = self.reader.gets()
            if r is not False:
                return r
            n = self.sock.recv_into(self._rbuf)
            if n == 0:
                raise _Closed("Redis closed the connection")
            self.reader.feed(self._rbuf, 0, n)  # type: ignore[arg-type]  # takes any buffer

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Link:
    """The state of one logical connection (the publisher's or a subscription's) across real ones:
    counters, the reconnect backoff (kept across calls), and one warning per cause per outage."""

    def __init__(self, cfg: Any, what: str, subscriber: bool) -> None:
        self.cfg = cfg
        self.what = what
        self.subscriber = subscriber
        self.disconnects = 0
        self.reconnects = 0
        self.run_id: Optional[bytes] = None
        self.down_since: Optional[float] = None        # None while connected
        self.cut_cause: Optional[str] = None
        self.cut_note = ""
        self.last_error = ""
        self.delay = 0.0
        self.retry_at = 0.0
        self._said: Set[str] = set()

    def _say(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(msg, *args)

    def cut(self, err: BaseException, note: str) -> None:
        """The connection is gone; the first reconnect attempt may come at once."""
        self.disconnects += 1
        self.down_since = time.monotonic()
        self.cut_cause = _cause(err)
        self.cut_note = note
        self.last_error = str(err)
        self.delay = 0.0
        self.retry_at = 0.0
        if self.cut_cause != "closed":   # for an EOF, whether the server restarted is known only on reconnect
            self._say("cut", "msight_fast: Redis %s at %s lost (%s: %s); %s; reconnecting", self.what,
                      _where(self.cfg), _CAUSES[self.cut_cause], err, note)

    def failed(self, err: BaseException) -> None:
        """A reconnect attempt failed: back off before the next."""
        cause = _cause(err)
        self.last_error = str(err)
        self.delay = BACKOFF_FIRST_S if not self.delay else min(2 * self.delay, BACKOFF_MAX_S)
        self.retry_at = time.monotonic() + self.delay * random.uniform(0.75, 1.0)   # no herd after a restart
        self._say("attempt-" + cause, "msight_fast: cannot reconnect the Redis %s (%s: %s); retrying every "
                  "%.1f s at most", self.what, _CAUSES[cause], err, BACKOFF_MAX_S)

    def up(self, run_id: Optional[bytes]) -> None:
        """Connected again: say what the outage was, now that the server's run_id tells."""
        if self.down_since is not None:
            self.reconnects += 1
            took = time.monotonic() - self.down_since
            where = _where(self.cfg)
            if run_id is not None and self.run_id is not None and run_id != self.run_id:
                log.warning("msight_fast: Redis at %s restarted (its run_id changed); the %s is back after %.2f s; %s",
                            where, self.what, took, self.cut_note)
            elif self.cut_cause == "closed" and self.subscriber:
                log.warning("msight_fast: Redis dropped the %s (%s, and it did not restart). A subscriber that falls "
                            "behind is disconnected by the server's 'client-output-buffer-limit pubsub' setting "
                            "(default 32mb 8mb 60); resubscribed after %.2f s, and lost frames count as gaps. Raise "
                            "that limit for raw-frame topics.", self.what, self.last_error, took)
            elif self.cut_cause == "closed":
                log.warning("msight_fast: Redis at %s closed the %s (it did not restart); reconnected after %.2f s; %s",
                            where, self.what, took, self.cut_note)
            else:
                log.info("msight_fast: the Redis %s at %s is back after %.2f s", self.what, where, took)
        self.run_id = run_id
        self.down_since = None
        self.delay = 0.0
        self.retry_at = 0.0
        self._said.clear()


class RedisTransport(Transport):
    name = "redis"
    CAPABILITIES = Capabilities(delivery="best_effort", groups=None, persistence=False, max_message=None)
    capabilities = CAPABILITIES

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()              # the connection: send, flush and close take turns
        self._wake = threading.Event()             # set by close(): ends a backoff wait
        self._closed = False
        self._link = _Link(cfg, "publisher connection", subscriber=False)
        conn = _Conn(cfg)
        conn.sock.setblocking(False)               # sends and reads never wait without a deadline
        self._pub: Optional[_Conn] = conn
        self._link.run_id = conn.run_id
        self._outstanding = 0                      # PUBLISHes written whose reply is not read yet
        self._count = 0
        self.lost = 0
        self._unreported = 0                       # lost since the last flush
        self._refused = 0                          # error replies since the last flush
        self._failures: List[Tuple[str, str]] = []
        self._prefixes: Dict[str, bytes] = {}

    # -- publish
    def send(self, msg: Outgoing, deadline: float) -> None:
        if msg.fragments is not None:              # only with a max_message, which Redis has not
            items = [(f, b"", len(f)) for f in msg.fragments]
        elif len(msg.parts) == 2:                   # a frame: header and payload view
            items = [(msg.parts[0], msg.parts[1], msg.nbytes)]
        else:                                       # the drop-in's bytes, as one part
            items = [(msg.parts[0], b"", memoryview(msg.parts[0]).nbytes)]
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(f"Redis at {_where(self.cfg)}: the publisher connection stayed busy "
                                     "(a flush or close) until the publish deadline")
        try:
            for head, body, nbytes in items:
                self._publish(msg.topic, head, body, nbytes, deadline)
        finally:
            self._lock.release()

    def _publish(self, topic: str, head: Any, body: Any, nbytes: int, deadline: float) -> None:
        """PUBLISH head+body as one message, scatter-gather, on a live connection by ``deadline``."""
        prefix = self._prefixes.get(topic)
        if prefix is None:
            t = topic.encode()
            prefix = self._prefixes[topic] = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(t), t)
        first = prefix + b"$%d\r\n" % nbytes
        bufs = [first, head, body, _CRLF]
        total = len(first) + nbytes + 2
        while True:
            if self._closed:
                raise BackendUnavailable(f"Redis at {_where(self.cfg)}: publish on a closed connection")
            conn = self._pub if self._pub is not None else self._reconnect(deadline)
            try:
                # replies are read before the write, so a cut they reveal costs a reconnect, not this frame
                self._count += 1
                if self._outstanding >= OUTSTANDING_HIGH:
                    self._drain(OUTSTANDING_HIGH // 2, deadline)
                elif self._count % DRAIN_EVERY == 0:
                    self._drain(None, deadline)        # a recv syscall per publish would halve small-frame rates
                self._write(conn, bufs, total, deadline)
            except _Stalled:
                raise BackendUnavailable(f"Redis at {_where(self.cfg)} did not take a {nbytes}-byte frame on "
                                         f"{topic!r} by the publish deadline (server stalled or network "
                                         "congested)") from None
            except _NET_ERRORS as e:
                self._cut(e)
                if time.monotonic() >= deadline:
                    raise BackendUnavailable(f"Redis at {_where(self.cfg)}: publish on {topic!r} failed: {e}") from None
                continue                               # this frame was not written whole: send it again
            self._outstanding += 1
            return

    def _write(self, conn: _Conn, bufs: List[Any], total: int, deadline: float) -> None:
        """Write one whole command by ``deadline``. ``_Stalled``: nothing of it was written;
        ``TimeoutError``: part of it was, so the command stream is corrupt (the caller drops it)."""
        sock = conn.sock
        if conn.tls:
            self._write_tls(sock, bufs, deadline)
            return
        try:
            sent = sock.sendmsg(bufs)                  # releases the GIL for the syscall
        except BlockingIOError:
            sent = 0
        if sent == total:                              # the usual case: everything went out at once
            return
        done = sent
        views = [memoryview(b).cast("B") for b in bufs]
        while True:
            while views and sent >= len(views[0]):     # skip what went out
                sent -= len(views[0])
                views.pop(0)
            if not views:
                return
            if sent:
                views[0] = views[0][sent:]
                sent = 0
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(sock, True, left):
                if time.monotonic() < deadline:
                    continue
                if done == 0:
                    raise _Stalled()
                raise TimeoutError(f"the publish deadline passed after {done} of {total} bytes of a command")
            try:
                sent = sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            done += sent

    def _write_tls(self, sock: Any, bufs: List[Any], deadline: float) -> None:
        # SSLSocket has no sendmsg; a TLS write cut short may have sent records, so any timeout drops it
        for b in bufs:
            v = memoryview(b).cast("B")
            off = 0
            while off < len(v):
                try:
                    off += sock.send(v[off:off + (1 << 20)])
                    continue
                except ssl.SSLWantReadError:
                    write = False
                except (ssl.SSLWantWriteError, BlockingIOError):
                    write = True
                left = deadline - time.monotonic()
                if left <= 0 or (not _wait(sock, write, left) and time.monotonic() >= deadline):
                    raise TimeoutError("the publish deadline passed in the middle of a TLS write")

    def _drain(self, block_until: Optional[int], deadline: float) -> None:
        """Read PUBLISH replies: all available without blocking, then (``block_until`` not None)
        wait while more than ``block_until`` are unread; ``_Stalled`` when ``deadline`` comes first."""
        conn = self._pub
        assert conn is not None
        while self._outstanding:
            r = conn.reader.gets()
            if r is not False:
                self._outstanding -= 1
                if isinstance(r, hiredis.ReplyError):
                    self._refuse(r)
                continue
            try:
                n = conn.sock.recv_into(conn._rbuf)
            except _WOULD_BLOCK:
                if block_until is None or self._outstanding <= block_until:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Stalled() from None
                _wait(conn.sock, False, left)
                continue
            if n == 0:
                raise _Closed("Redis closed the publisher connection")
            conn.reader.feed(conn._rbuf, 0, n)  # type: ignore[arg-type]  # takes any buffer

    def _refuse(self, r: Any) -> None:
        """An error reply to a PUBLISH: a failure for flush() to report."""
        self._refused += 1
        if len(self._failures) < MAX_FAILURES:
            self._failures.append(("?", str(r)))

    def _cut(self, err: BaseException) -> None:
        """Drop the connection; what was written and never acknowledged is counted as lost."""
        conn, self._pub = self._pub, None
        if conn is None:
            return
        self._salvage(conn)
        lost, self._outstanding = self._outstanding, 0
        self.lost += lost
        self._unreported += lost
        conn.close()
        self._link.cut(err, f"{lost} written but unacknowledged frame(s) counted as lost")

    def _salvage(self, conn: _Conn) -> None:
        """Take the replies the kernel still holds: those frames did reach the server."""
        for _ in range(1024):                          # bounded: only what has already arrived
            try:
                while self._outstanding:
                    r = conn.reader.gets()
                    if r is False:
                        break
                    self._outstanding -= 1
                    if isinstance(r, hiredis.ReplyError):
                        self._refuse(r)
                if not self._outstanding:
                    return
                n = conn.sock.recv_into(conn._rbuf)
            except (OSError, hiredis.ProtocolError):
                return
            if n == 0:
                return
            conn.reader.feed(conn._rbuf, 0, n)  # type: ignore[arg-type]  # takes any buffer

    def _reconnect(self, deadline: float) -> _Conn:
        """A new connection by ``deadline``, attempts spaced by the backoff; else BackendUnavailable."""
        link = self._link
        while True:
            if self._closed:
                raise BackendUnavailable(f"Redis at {_where(self.cfg)}: publish on a closed connection")
            now = time.monotonic()
            if now < link.retry_at:
                if link.retry_at >= deadline:          # the next attempt is due after this publish's deadline
                    raise BackendUnavailable(f"{link.last_error} (publish gave up; next attempt in "
                                             f"{link.retry_at - now:.2f} s)")
                self._wake.wait(link.retry_at - now)
                continue
            if now >= deadline:
                raise BackendUnavailable(f"{link.last_error} (publish gave up at its deadline)")
            try:
                conn = _Conn(self.cfg, deadline)
            except AuthError as e:
                link.failed(e)
                raise
            except BackendUnavailable as e:
                link.failed(e)
                continue
            conn.sock.setblocking(False)
            if self._closed:                           # close() ran meanwhile and saw no connection
                conn.close()
                continue
            self._pub = conn
            link.up(conn.run_id)
            return conn

    def flush(self, timeout: Optional[float]) -> None:
        """Wait (``timeout``, else ``publish_timeout_s``) for every reply; PublishError counts the
        publishes the server refused and those a cut lost since the last flush, and lists them
        (up to ``MAX_FAILURES`` of each)."""
        limit = self.cfg.publish_timeout_s if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + limit
        if not self._lock.acquire(timeout=limit):
            raise PublishError(f"the Redis publisher stayed busy for {limit} s", [("?", "timeout")])
        try:
            if self._pub is not None and self._outstanding:
                try:
                    self._drain(0, deadline)
                except _Stalled:
                    raise PublishError(f"{self._outstanding} publishes unacknowledged after {limit} s",
                                       [("?", "timeout")] * self._outstanding) from None
                except _NET_ERRORS as e:
                    self._cut(e)
            failures, self._failures = self._failures, []
            refused, self._refused = self._refused, 0
            lost, self._unreported = self._unreported, 0
            failures += [("?", "connection lost before the server acknowledged")] * min(lost, MAX_FAILURES)
            if failures:
                raise PublishError(f"{refused + lost} publishes failed: {failures[0][1]}", failures)
        finally:
            self._lock.release()

    def stats(self) -> Dict[str, Any]:
        # no lock: each value is one attribute read, and a publish holding the lock up to its
        # deadline must not hold up a monitoring thread
        link = self._link
        return {"connected": self._pub is not None, "disconnects": link.disconnects,
                "reconnects": link.reconnects, "lost": self.lost}

    # -- subscribe
    def open(self, topic: str, group_id: Optional[str], from_beginning: bool,
             start: Optional[Start] = None) -> Source:
        return RedisSource(self.cfg, topic)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        got = self._lock.acquire(timeout=min(5.0, self.cfg.publish_timeout_s))
        try:
            conn = self._pub
            if conn is None:
                return
            if got:
                try:
                    self._drain(None, time.monotonic())
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
                self._pub = None
            else:                                      # a send is stuck: wake it, it sees _closed
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            conn.close()
        finally:
            if got:
                self._lock.release()


class _Incomplete(Exception):
    pass


class _Part:
    """A message payload that has started to arrive: the destination and how much is in it."""
    __slots__ = ("chan", "dst", "k")

    def __init__(self, chan: bytes, dst: memoryview, k: int) -> None:
        self.chan, self.dst, self.k = chan, dst, k


class RedisSource(Source):
    """One subscribed connection, read in the caller's thread."""

    def __init__(self, cfg: Any, topic: str) -> None:
        self._init_state(cfg, topic)
        self._open(None, confirm=True)
        self._link.run_id = self._conn.run_id if self._conn is not None else None

    def _init_state(self, cfg: Any, topic: str) -> None:
        self.cfg = cfg
        self.topic = topic
        self._buf = bytearray(STAGE)
        self._mv = memoryview(self._buf)
        self._s = self._e = 0
        self._part: Optional[_Part] = None
        self._conn: Any = None                     # a _Conn, or None while reconnecting
        self._closed = False
        self._wake = threading.Event()             # set by close(): ends a backoff wait
        self._link = _Link(cfg, f"subscription to {topic!r}", subscriber=True)
        self._floor = ATTEMPT_FLOOR_S if cfg is None else min(cfg.connect_timeout_s, ATTEMPT_FLOOR_S)
        # a message longer than any frame we would accept is a corrupt stream: never allocate it
        self._max_bulk = MAX_BULK if cfg is None else min(MAX_BULK, cfg.max_frame_bytes + (1 << 20))
        self.ping_idle_s = PING_IDLE_S
        self.health_timeout_s = HEALTH_TIMEOUT_S
        self._rx_at = time.monotonic()             # when a byte last arrived
        self._ping_at: Optional[float] = None      # when an unanswered PING went out

    def _open(self, deadline: Optional[float], confirm: bool) -> None:
        """Connect and SUBSCRIBE; with ``confirm``, wait for the server's confirmation."""
        conn = _Conn(self.cfg, deadline)           # AUTH/SELECT/PING/INFO answered: nothing else pending
        try:
            conn.sock.sendall(_cmd(b"SUBSCRIBE", self.topic.encode()))
            conn.sock.setblocking(False)
        except OSError as e:
            conn.close()
            raise _unavailable(f"Redis at {_where(self.cfg)}: SUBSCRIBE failed: {e}", _cause(e)) from None
        self._conn = conn
        self._s = self._e = 0
        self._part = None
        self._rx_at = time.monotonic()
        self._ping_at = None
        if not confirm:                                # the confirmation is read with the messages
            return
        end = conn._end
        try:
            while True:                                # the confirmation comes before any message
                kind = self._read_push(end)
                if kind is None:
                    raise _unavailable(f"Redis at {_where(self.cfg)} did not confirm SUBSCRIBE {self.topic!r}",
                                       "timeout")
                if kind[0] == b"subscribe":
                    return
        except _NET_ERRORS as e:
            self._conn = None
            conn.close()
            if isinstance(e, BackendUnavailable):
                raise
            raise _unavailable(f"Redis at {_where(self.cfg)}: SUBSCRIBE {self.topic!r} failed: {e}",
                               _cause(e)) from None

    # RESP helpers over the staging buffer; raise _Incomplete when more bytes are needed
    def _line(self, p: int) -> Tuple[bytes, int]:
        i = self._buf.find(b"\r\n", p, self._e)
        if i < 0:
            if self._e - p > 64:
                raise ConnectionError(f"bad reply from Redis: {bytes(self._buf[p:p + 40])!r}")
            raise _Incomplete
        return bytes(self._buf[p:i]), i + 2

    def _int_after(self, p: int, marker: int) -> Tuple[int, int]:
        if p >= self._e:
            raise _Incomplete
        if self._buf[p] != marker:
            if self._buf[p] == 0x2D:   # '-': an error reply
                line, _ = self._line(p)
                raise ConnectionError(f"Redis error: {line.decode(errors='replace')}")
            raise ConnectionError(f"unexpected reply from Redis: {bytes(self._buf[p:p + 40])!r}")
        line, q = self._line(p + 1)
        try:
            return int(line), q
        except ValueError:
            raise ConnectionError(f"bad length in reply from Redis: {line!r}") from None

    def _bulk(self, p: int) -> Tuple[bytes, int]:
        n, q = self._int_after(p, 0x24)   # '$'
        if q + n + 2 > self._e:
            raise _Incomplete
        return bytes(self._buf[q:q + n]), q + n + 2

    def _recv_some(self, view: memoryview, deadline: Optional[float]) -> int:
        """Read into ``view``: the byte count, or 0 once ``deadline`` passes with nothing read.
        Keeps the connection's health: a PING after ``ping_idle_s`` of silence, and ``_Silent``
        when ``health_timeout_s`` more pass without a byte."""
        conn = self._conn
        sock: socket.socket = conn.sock                # an SSLSocket with TLS
        dontwait = getattr(socket, "MSG_DONTWAIT", 0)  # 0 on Windows: _nowait instead
        while True:
            try:                                       # data first: a busy stream needs no poll
                if conn.tls:
                    n = sock.recv_into(view)
                elif dontwait:
                    n = sock.recv_into(view, 0, dontwait)
                else:
                    n = _nowait(sock, sock.recv_into, view)
            except _WOULD_BLOCK:
                n = -1
            if n > 0:
                self._rx_at = time.monotonic()
                self._ping_at = None
                return n
            if n == 0:
                raise _Closed("Redis closed the subscription connection")
            now = time.monotonic()
            due = self._rx_at + self.ping_idle_s if self._ping_at is None else self._ping_at + self.health_timeout_s
            if now >= due:
                if self._ping_at is not None:
                    raise _Silent(f"nothing from Redis for {now - self._rx_at:.1f} s, not even an answer to PING")
                self._ping(now)
                continue
            if deadline is not None and now >= deadline:
                return 0
            _wait(sock, False, (due if deadline is None else min(due, deadline)) - now)

    def _ping(self, now: float) -> None:
        """PING a silent subscription: Redis answers it with a ``pong`` push."""
        conn = self._conn
        try:
            dontwait = getattr(socket, "MSG_DONTWAIT", 0)
            if conn.tls:
                n = conn.sock.send(_PING)
            elif dontwait:
                n = conn.sock.send(_PING, dontwait)
            else:
                n = _nowait(conn.sock, conn.sock.send, _PING)
        except _WOULD_BLOCK:
            n = 0                                      # the health timeout still runs
        if 0 < n < len(_PING):
            raise ConnectionError("a PING was cut short: the command stream is corrupt")
        self._ping_at = now

    def _fill(self, deadline: Optional[float]) -> bool:
        """Read more into the staging buffer; False on timeout."""
        if self._s == self._e:
            self._s = self._e = 0
        elif STAGE - self._e < 4096 and self._s:
            self._buf[:self._e - self._s] = self._mv[self._s:self._e]
            self._e -= self._s
            self._s = 0
        if self._e == STAGE:
            raise ConnectionError("a reply prefix from Redis overflows the staging buffer")
        n = self._recv_some(self._mv[self._e:], deadline)
        if not n:
            return False
        self._e += n
        return True

    def _read_push(self, deadline: Optional[float]) -> Optional[Tuple[bytes, bytes, Any]]:
        """Parse one push: (kind, channel, payload-or-None), or None on timeout. A message cut
        short by the timeout is resumed by the next call."""
        while True:
            if self._part is not None:
                return self._resume(deadline)
            try:
                n, p = self._int_after(self._s, 0x2A)       # '*'
                if n == 3:
                    kind, p = self._bulk(p)
                    chan, p = self._bulk(p)
                    if kind == b"message":
                        size, p = self._int_after(p, 0x24)
                        if not 0 <= size <= self._max_bulk:
                            raise ConnectionError(f"bad message length from Redis: {size}")
                        got = self._payload(chan, p, size)
                        if got is not None:
                            return got
                        continue                            # started: _resume reads the rest
                    _, p = self._int_after(p, 0x3A)         # ':' subscription count
                    self._s = p
                    return (kind, chan, None)
                if n == 2:                                  # the answer to our PING
                    kind, p = self._bulk(p)
                    arg, p = self._bulk(p)
                    if kind == b"pong":
                        self._s = p
                        return (kind, arg, None)
                raise ConnectionError(f"unexpected {n}-element reply on a subscribed connection")
            except _Incomplete:
                if not self._fill(deadline):
                    return None

    def _payload(self, chan: bytes, p: int, size: int) -> Optional[Tuple[bytes, bytes, Any]]:
        """A small message whole from the staging buffer, or None after setting up ``_part``."""
        have = self._e - p
        if size <= SMALL and have >= size + 2:
            if self._buf[p + size:p + size + 2] != b"\r\n":
                raise ConnectionError("bad message terminator from Redis")
            out = bytes(self._mv[p:p + size])              # the one copy (small message)
            self._s = p + size + 2
            return (b"message", chan, out)
        raw = np.empty(size + 64, dtype=np.uint8)          # 64-byte-aligned destination
        a = (-raw.ctypes.data) % 64
        dst = raw[a:a + size].data
        k = min(have, size)
        dst[:k] = self._mv[p:p + k]                        # what came with the prefix: copied once
        self._s = p + k
        if self._s == self._e:
            self._s = self._e = 0
        self._part = _Part(chan, dst, k)
        return None

    def _resume(self, deadline: Optional[float]) -> Optional[Tuple[bytes, bytes, Any]]:
        """Go on with ``_part``: the rest straight from the socket, then its CRLF; None on timeout."""
        part = self._part
        assert part is not None
        dst = part.dst
        size = dst.nbytes
        while part.k < size:
            got = self._recv_some(dst[part.k:], deadline)
            if not got:
                return None
            part.k += got
        while self._e - self._s < 2:
            if not self._fill(deadline):
                return None
        if self._buf[self._s:self._s + 2] != b"\r\n":
            raise ConnectionError("bad message terminator from Redis")
        self._s += 2
        self._part = None
        return (b"message", part.chan, dst)

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self._conn is None:
                if not self._reconnect(deadline):
                    return None
                continue
            try:
                got = self._read_push(deadline)
            except _NET_ERRORS as e:
                if self._closed:
                    return None
                self._drop(e)
                continue
            if got is None:
                return None
            if got[0] == b"message":
                return got[2], None
            if got[0] == b"subscribe" and self._link.down_since is not None:
                self._link.up(self._conn.run_id)
        return None

    def _drop(self, err: BaseException) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._part = None                              # its frame is lost: a gap
        self._s = self._e = 0
        if self._link.down_since is not None:          # SUBSCRIBE never confirmed: an attempt that failed
            self._link.failed(err)
        else:
            self._link.cut(err, "frames published meanwhile are lost and counted as gaps")

    def _reconnect(self, deadline: Optional[float]) -> bool:
        """Connect and send SUBSCRIBE, attempts spaced by the backoff; False once ``deadline``
        passes (or closed). The link is up only when the server confirms (``next`` sees it): a
        server that refuses SUBSCRIBE gets backed-off attempts, not a reconnect storm. An attempt
        may overrun ``deadline`` by at most the attempt floor (grown while attempts time out, up to
        ``ATTEMPT_FLOOR_MAX_S``, so a slow server is still reached by callers with short timeouts)."""
        link = self._link
        while not self._closed:
            now = time.monotonic()
            if now < link.retry_at:
                until = link.retry_at if deadline is None else min(link.retry_at, deadline)
                if until > now:
                    self._wake.wait(until - now)
                t = time.monotonic()
                if self._closed or (deadline is not None and deadline <= t < link.retry_at):
                    return False                       # the deadline (or close) came first
                continue
            end = None if deadline is None else max(deadline, now + self._floor)
            try:
                self._open(end, confirm=False)
            except (BackendUnavailable, AuthError, OSError) as e:
                if _cause(e) == "timeout":
                    self._floor = min(2 * self._floor, self.cfg.connect_timeout_s, ATTEMPT_FLOOR_MAX_S)
                link.failed(e)
                continue
            if self._closed:                           # close() ran meanwhile and saw no connection
                self._conn.close()
                self._conn = None
                return False
            self._floor = min(self.cfg.connect_timeout_s, ATTEMPT_FLOOR_S)
            return True
        return False

    def stats(self) -> Dict[str, Any]:
        link = self._link
        return {"reconnects": link.reconnects, "disconnects": link.disconnects,
                "connected": self._conn is not None and link.down_since is None and not self._closed}

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        conn = self._conn
        if conn is not None:
            try:                                       # wakes a next() polling this socket
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
