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
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from typing import Any, List, Optional, Tuple

import hiredis
import numpy as np

from .base import Capabilities, Outgoing, Source, Transport
from ..errors import AuthError, BackendUnavailable, PublishError

log = logging.getLogger("msight_fast")

STAGE = 256 * 1024          # staging buffer for RESP prefixes and small messages
SMALL = 64 * 1024           # payloads up to this size are copied out of the staging buffer
OUTSTANDING_HIGH = 4096     # unread PUBLISH replies before the publisher stops to read them
DRAIN_EVERY = 64            # replies are read (without blocking) every this many publishes


def _cmd(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


def _where(cfg: Any) -> str:
    return f"unix:{cfg.unix_socket_path}" if cfg.unix_socket_path else f"{cfg.host}:{cfg.port}"


class _Conn:
    """A Redis connection with AUTH and SELECT done; request/reply through hiredis."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        timeout = cfg.connect_timeout_s
        try:
            if cfg.unix_socket_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                s.connect(cfg.unix_socket_path)
            else:
                s = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if cfg.use_tls:
                ctx = ssl.create_default_context(cafile=cfg.tls_ca_cert_file)
                if cfg.tls_cert_file:
                    ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
                s = ctx.wrap_socket(s, server_hostname=None if cfg.unix_socket_path else cfg.host)
        except (OSError, ssl.SSLError) as e:
            raise BackendUnavailable(f"Redis at {_where(cfg)} is unreachable within {timeout} s: {e}") from None
        self.sock = s
        self.tls = cfg.use_tls
        self.reader = hiredis.Reader()
        self._rbuf = bytearray(65536)
        try:
            if cfg.password:
                args = [b"AUTH"] + ([cfg.username.encode()] if cfg.username else []) + [cfg.password.encode()]
                self._check(self.call(*args), "AUTH")
            reply = self.call(b"PING")
            self._check(reply, "PING")
            if cfg.db:
                self._check(self.call(b"SELECT", str(cfg.db).encode()), "SELECT")
        except AuthError:
            raise
        except socket.timeout:
            s.close()
            raise BackendUnavailable(f"Redis at {_where(cfg)} did not answer within {timeout} s") from None
        except (OSError, ssl.SSLError) as e:
            s.close()
            raise BackendUnavailable(f"Redis at {_where(cfg)}: {e}") from None

    def _check(self, reply: Any, what: str) -> None:
        if isinstance(reply, hiredis.ReplyError):
            msg = str(reply)
            self.sock.close()
            if any(k in msg for k in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username", "AUTH")):
                # the server's text, never the credential itself
                raise AuthError(f"Redis at {_where(self.cfg)} refused {what}: {msg}")
            raise BackendUnavailable(f"Redis at {_where(self.cfg)} refused {what}: {msg}")

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
                raise ConnectionResetError("Redis closed the connection")
            self.reader.feed(self._rbuf, 0, n)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RedisTransport(Transport):
    name = "redis"
    CAPABILITIES = Capabilities(delivery="best_effort", groups=None, persistence=False, max_message=None)
    capabilities = CAPABILITIES

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._pub = _Conn(cfg)
        self._pub.sock.settimeout(None)            # blocking: MSG_DONTWAIT below still works
        self._outstanding = 0
        self._failures: List[Tuple[str, str]] = []
        self._prefixes: dict = {}

    # -- publish
    def send(self, msg: Outgoing, deadline: float) -> None:
        if msg.fragments is not None:          # only with a max_message, which Redis has not
            for f in msg.fragments:
                self._publish(msg.topic, f, b"", len(f))
        elif len(msg.parts) == 2:
            self._publish(msg.topic, msg.parts[0], msg.parts[1], msg.nbytes)
        else:
            data = msg.joined()
            self._publish(msg.topic, data, b"", len(data))

    def _publish(self, topic: str, head: Any, body: Any, nbytes: Optional[int] = None) -> None:
        """PUBLISH head+body as one message, scatter-gather."""
        prefix = self._prefixes.get(topic)
        if prefix is None:
            t = topic.encode()
            prefix = self._prefixes[topic] = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(t), t)
        if nbytes is None:
            nbytes = memoryview(head).nbytes + memoryview(body).nbytes
        first = prefix + b"$%d\r\n" % nbytes
        try:
            self._sendmsg([first, head, body, b"\r\n"], len(first) + nbytes + 2)
        except OSError as e:
            raise BackendUnavailable(f"Redis at {_where(self.cfg)}: publish failed: {e}") from None
        self._outstanding += 1
        if self._outstanding >= OUTSTANDING_HIGH:
            self._drain(block_until=OUTSTANDING_HIGH // 2)
        elif self._outstanding % DRAIN_EVERY == 0:
            self._drain(block_until=None)        # a recv syscall per publish would halve small-frame rates

    def _sendmsg(self, bufs: list, total: int) -> None:
        sock = self._pub.sock
        if self._pub.tls:                         # SSLSocket has no sendmsg
            for b in bufs:
                sock.sendall(b)
            return
        sent = sock.sendmsg(bufs)                 # releases the GIL for the syscall
        if sent == total:                         # the usual case: everything went out at once
            return
        views = [memoryview(b).cast("B") for b in bufs]
        while sent and views:                     # partial write: skip what went out, send the rest
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views:
            sent = sock.sendmsg(views)            # releases the GIL for the syscall
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _drain(self, block_until: Optional[int]) -> None:
        """Read PUBLISH replies: all available without blocking, then block while over ``block_until``."""
        conn = self._pub
        while self._outstanding:
            r = conn.reader.gets()
            if r is not False:
                self._outstanding -= 1
                if isinstance(r, hiredis.ReplyError):
                    self._failures.append(("?", str(r)))
                continue
            if block_until is None or self._outstanding <= block_until:
                if conn.tls:
                    if not conn.sock.pending() and not select.select([conn.sock], [], [], 0)[0]:
                        return
                    n = conn.sock.recv_into(conn._rbuf)
                else:
                    try:
                        n = conn.sock.recv_into(conn._rbuf, 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        return
            else:
                n = conn.sock.recv_into(conn._rbuf)
            if n == 0:
                raise BackendUnavailable(f"Redis at {_where(self.cfg)} closed the publisher connection")
            conn.reader.feed(conn._rbuf, 0, n)

    def flush(self, timeout: Optional[float]) -> None:
        sock = self._pub.sock
        sock.settimeout(timeout)
        try:
            self._drain(block_until=0)
        except socket.timeout:
            raise PublishError(f"{self._outstanding} publishes unacknowledged after {timeout} s",
                               [("?", "timeout")] * self._outstanding) from None
        finally:
            sock.settimeout(None)
        if self._failures:
            failures, self._failures = self._failures, []
            raise PublishError(f"{len(failures)} publishes failed: {failures[0][1]}", failures)

    # -- subscribe
    def open(self, topic: str, group_id: Optional[str], from_beginning: bool) -> Source:
        return RedisSource(self.cfg, topic)

    def close(self) -> None:
        try:
            self._drain(block_until=None)
        except Exception:
            pass
        self._pub.close()


class _Incomplete(Exception):
    pass


class RedisSource(Source):
    """One subscribed connection, read in the caller's thread."""

    def __init__(self, cfg: Any, topic: str) -> None:
        self.cfg = cfg
        self.topic = topic
        self.reconnects = 0
        self._warned = False
        self._buf = bytearray(STAGE)
        self._mv = memoryview(self._buf)
        self._s = self._e = 0
        self._conn: Optional[_Conn] = None
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        conn = _Conn(self.cfg)                     # AUTH/SELECT/PING answered: nothing else pending
        t = self.topic.encode()
        conn.sock.sendall(_cmd(b"SUBSCRIBE", t))
        self._conn = conn
        self._s = self._e = 0
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while True:                                # the confirmation comes before any message
            kind = self._read_push(deadline)
            if kind is None:
                conn.close()
                raise BackendUnavailable(f"Redis at {_where(self.cfg)} did not confirm SUBSCRIBE {self.topic!r}")
            if kind[0] == b"subscribe":
                break
        conn.sock.settimeout(None)

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

    def _fill(self, deadline: Optional[float]) -> bool:
        """Read more into the staging buffer; False on timeout."""
        if self._s == self._e:
            self._s = self._e = 0
        elif self._e == STAGE:
            self._buf[:self._e - self._s] = self._mv[self._s:self._e]
            self._e -= self._s
            self._s = 0
        sock = self._conn.sock
        if not (self._conn.tls and sock.pending()):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([sock], [], [], wait)[0]:
                return False
        n = sock.recv_into(self._mv[self._e:])
        if n == 0:
            raise ConnectionResetError("Redis closed the subscription connection")
        self._e += n
        return True

    def _read_push(self, deadline: Optional[float]):
        """Parse one push: (kind, channel, payload-or-None), or None on timeout."""
        while True:
            try:
                n, p = self._int_after(self._s, 0x2A)       # '*'
                if n != 3:
                    raise ConnectionError(f"unexpected {n}-element reply on a subscribed connection")
                kind, p = self._bulk(p)
                chan, p = self._bulk(p)
                if kind == b"message":
                    size, p = self._int_after(p, 0x24)
                    return (kind, chan, self._payload(p, size, deadline))
                _, p = self._int_after(p, 0x3A)             # ':' subscription count
                self._s = p
                return (kind, chan, None)
            except _Incomplete:
                if not self._fill(deadline):
                    return None

    def _payload(self, p: int, size: int, deadline: Optional[float]) -> Any:
        have = self._e - p
        if size <= SMALL and have >= size + 2:
            if self._buf[p + size:p + size + 2] != b"\r\n":
                raise ConnectionError("bad message terminator from Redis")
            out = bytes(self._mv[p:p + size])              # the one copy (small message)
            self._s = p + size + 2
            return out
        raw = np.empty(size + 64, dtype=np.uint8)          # 64-byte-aligned destination
        a = (-raw.ctypes.data) % 64
        dst = memoryview(raw[a:a + size])
        k = min(have, size)
        dst[:k] = self._mv[p:p + k]                        # what came with the prefix: copied once
        self._s = p + k
        if k < size:
            self._s = self._e = 0
        sock = self._conn.sock
        while k < size:                                    # the rest: straight from the socket
            got = sock.recv_into(dst[k:])
            if got == 0:
                raise ConnectionResetError("Redis closed the subscription connection mid-message")
            k += got
        while self._e - self._s < 2:
            if not self._fill(None):
                pass
        if self._buf[self._s:self._s + 2] != b"\r\n":
            raise ConnectionError("bad message terminator from Redis")
        self._s += 2
        return dst

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            try:
                got = self._read_push(deadline)
            except (ConnectionError, OSError) as e:
                if self._closed:
                    return None
                self._reconnect(e, deadline)
                continue
            if got is None:
                return None
            if got[0] == b"message":
                return got[2], None
        return None

    def _reconnect(self, err: Exception, deadline: Optional[float]) -> None:
        if not self._warned:
            log.warning("msight_fast: Redis dropped the subscription to %r (%s). A subscriber that falls behind is "
                        "disconnected by the server's 'client-output-buffer-limit pubsub' setting (default 32mb 8mb 60); "
                        "reconnecting, and counting lost frames as gaps. Raise that limit for raw-frame topics.",
                        self.topic, err)
            self._warned = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        delay = 0.05
        while not self._closed:
            try:
                self._connect()
                self.reconnects += 1
                return
            except (BackendUnavailable, OSError) as e:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise BackendUnavailable(f"Redis at {_where(self.cfg)}: resubscribing failed: {e}") from None
                time.sleep(delay)                          # backoff between reconnect attempts
                delay = min(delay * 2, 2.0)

    def stats(self) -> dict:
        return {"reconnects": self.reconnects}

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
