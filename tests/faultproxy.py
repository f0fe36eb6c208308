"""A fault-injecting TCP proxy for tests, in the spirit of toxiproxy's toxics.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port unless one is given) and forwards
every connection to ``upstream``. Its own asyncio loop runs in a daemon thread; every control is
thread-safe, returns once it is in force, and applies to current and new connections alike, in
one direction ("upstream": client to server, "downstream": server to client) or both:

- ``cut()``: close every current connection abruptly (RST: SO_LINGER 0);
  ``cut_after_bytes(n)``: the same once ``n`` more bytes have passed (a cut mid-frame);
- ``stall(seconds)``: forward nothing and read nothing (the sender meets TCP backpressure) until
  ``resume()`` or for ``seconds``; ``stall_after_bytes(n, seconds)``: the whole link (both
  directions) freezes once ``n`` more bytes have passed (a stall mid-frame);
- ``slice(n)``: forward in writes of at most ``n`` bytes (TCP_NODELAY: one segment each);
- ``throttle(bytes_per_s)``: a bandwidth limit (per connection and direction);
- ``refuse(seconds)``: new connections are reset on accept until ``accept()`` (or for ``seconds``);
- ``reset()``: a transparent proxy again; ``stats()``: bytes and writes each way, connections
  accepted, active, cut and refused; ``close()`` (or use it as a context manager).

The ``n``-byte triggers count the bytes of every connection in that direction: with one
connection the trigger fires after exactly ``n`` bytes, with several after at least ``n``.

``dispatch`` makes a proxy a router for protocols where the client speaks first: it reads a
connection's first bytes, and ``dispatch(first_bytes)`` names the proxy that takes the
connection over (for Kafka, whose broker advertises one address to every client, this puts
each client's connections behind its own proxy, told apart by the client id).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from typing import Any, Callable, Coroutine, Dict, Optional, Set, Tuple

__all__ = ["FaultProxy", "UP", "DOWN", "BOTH"]

UP, DOWN, BOTH = "upstream", "downstream", "both"
CHUNK = 256 * 1024               # read size: a 6 MB frame passes in ~24 reads
_RST = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST and drops unsent data
_CONTROL_TIMEOUT_S = 30.0


def _dirs(direction: str) -> Tuple[str, ...]:
    if direction == BOTH:
        return (UP, DOWN)
    if direction in (UP, DOWN):
        return (direction,)
    raise ValueError(f"direction must be {UP!r}, {DOWN!r} or {BOTH!r}, not {direction!r}")


def _close(sock: socket.socket, rst: bool) -> None:
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
    sock.close()


class _Faults:
    """What one direction does to the bytes that pass. Touched only in the loop thread."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.resume_timer: Optional[asyncio.TimerHandle] = None
        self.slice: Optional[int] = None
        self.rate: Optional[float] = None
        self.cut_after: Optional[int] = None
        self.stall_after: Optional[int] = None



def _close_accepted(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _close(fut.result()[0], rst=True)

class _Conn:
    def __init__(self, client: socket.socket) -> None:
        self.client: Optional[socket.socket] = client
        self.server: Optional[socket.socket] = None
        self.task: Optional[asyncio.Task[None]] = None
        self.rst = False


class FaultProxy:
    """A TCP proxy from ``(host, port)`` to ``upstream`` that injects faults on demand."""

    def __init__(self, upstream: Optional[Tuple[str, int]], *, port: int = 0, host: str = "127.0.0.1",
                 dispatch: Optional[Callable[[bytes], FaultProxy]] = None) -> None:
        # ``upstream`` may be set later, before the first connection (a broker started after
        # its proxy, to advertise the proxy's port)
        self.upstream = upstream
        self._dispatch = dispatch
        self._conns: Set[_Conn] = set()
        self._refusing = False
        self._accept_timer: Optional[asyncio.TimerHandle] = None
        self._stall_seconds: Optional[float] = None
        self._stats: Dict[str, int] = dict.fromkeys(
            ("upstream_bytes", "downstream_bytes", "upstream_writes", "downstream_writes",
             "accepted", "cut", "refused"), 0)
        self._closed = False
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._lsock.bind((host, port))
            self._lsock.listen(128)
            self._lsock.setblocking(False)
        except OSError:
            self._lsock.close()
            raise
        self.host: str = host
        self.port: int = self._lsock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"faultproxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        # asyncio objects are made in the loop's own thread (Python 3.9 binds them at creation)
        self._faults: Dict[str, _Faults] = self._call(lambda: {UP: _Faults(), DOWN: _Faults()})
        self._acceptor = self._call(lambda: self._loop.create_task(self._accept_loop()))

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    # -- controls (any thread)
    def cut(self) -> None:
        """Reset every current connection now; returns once their sockets are closed."""
        if self._closed:
            raise RuntimeError("the proxy is closed")

        async def go() -> None:
            await self._wait(self._cut_now())
        self._run(go())

    def cut_after_bytes(self, n: int, direction: str = BOTH) -> None:
        """Reset every connection once ``n`` more bytes have passed in ``direction``."""
        if n <= 0:
            return self.cut()

        def go() -> None:
            for d in _dirs(direction):
                self._faults[d].cut_after = n
        self._call(go)

    def stall(self, seconds: Optional[float] = None, direction: str = BOTH) -> None:
        """Forward nothing in ``direction`` until ``resume()``, or for ``seconds``."""
        self._call(lambda: [self._stall(d, seconds) for d in _dirs(direction)])

    def stall_after_bytes(self, n: int, seconds: Optional[float] = None, direction: str = BOTH) -> None:
        """Stall both directions (for ``seconds``, or until ``resume()``) once ``n`` more bytes
        have passed in ``direction``: the link freezes in the middle of what it carries."""
        if n <= 0:
            return self.stall(seconds)

        def go() -> None:
            self._stall_seconds = seconds
            for d in _dirs(direction):
                self._faults[d].stall_after = n
        self._call(go)

    def resume(self, direction: str = BOTH) -> None:
        """End a stall."""
        self._call(lambda: [self._resume(d) for d in _dirs(direction)])

    def slice(self, n: int = 1, direction: str = BOTH) -> None:
        """Forward in writes of at most ``n`` bytes."""
        if n < 1:
            raise ValueError("slice needs n >= 1")

        def go() -> None:
            for d in _dirs(direction):
                self._faults[d].slice = n
        self._call(go)

    def throttle(self, bytes_per_s: float, direction: str = BOTH) -> None:
        """Forward at most about ``bytes_per_s`` bytes a second (per connection)."""
        if bytes_per_s <= 0:
            raise ValueError("throttle needs bytes_per_s > 0")

        def go() -> None:
            for d in _dirs(direction):
                self._faults[d].rate = float(bytes_per_s)
        self._call(go)

    def refuse(self, seconds: Optional[float] = None) -> None:
        """Reset new connections on accept until ``accept()``, or for ``seconds``."""
        def go() -> None:
            self._refusing = True
            if self._accept_timer is not None:
                self._accept_timer.cancel()
            self._accept_timer = None if seconds is None else self._loop.call_later(seconds, self._accept)
        self._call(go)

    def accept(self) -> None:
        """Take new connections again."""
        self._call(self._accept)

    def reset(self) -> None:
        """A transparent proxy again: no stall, slice, throttle, pending trigger or refusal.
        Current connections stay up."""
        def go() -> None:
            self._accept()
            for d, f in self._faults.items():
                self._resume(d)
                f.slice = f.rate = f.cut_after = f.stall_after = None
        self._call(go)

    def stats(self) -> Dict[str, Any]:
        """Bytes and writes forwarded each way; connections accepted, active, cut and refused;
        whether it stalls or refuses now."""
        def go() -> Dict[str, Any]:
            out: Dict[str, Any] = dict(self._stats)
            out["active"] = len(self._conns)
            out["stalled"] = {d: not f.flowing.is_set() for d, f in self._faults.items()}
            out["refusing"] = self._refusing
            return out
        return self._call(go)  # type: ignore[no-any-return]

    def adopt(self, sock: socket.socket, first: bytes = b"") -> None:
        """Take over an accepted connection whose ``first`` bytes were already read."""
        try:
            self._loop.call_soon_threadsafe(self._start, sock, first)
        except RuntimeError:            # this proxy's loop is closed
            _close(sock, rst=True)

    def close(self) -> None:
        """Reset every connection, stop listening and end the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def go() -> None:
            self._acceptor.cancel()
            await self._wait(self._cut_now(count=False) + [self._acceptor])
            self._lsock.close()
        try:
            self._run(go())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CONTROL_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.host}:{self.port} -> {self.upstream})"

    # -- loop-thread plumbing
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the loop thread and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        if self._closed:
            raise RuntimeError("the proxy is closed")
        self._loop.call_soon_threadsafe(run)
        return fut.result(_CONTROL_TIMEOUT_S)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:            # the loop is closed
            coro.close()
            raise RuntimeError("the proxy is closed") from None
        return fut.result(_CONTROL_TIMEOUT_S)

    @staticmethod
    async def _wait(tasks: list) -> None:
        if tasks:
            await asyncio.wait(tasks)

    def _stall(self, d: str, seconds: Optional[float]) -> None:
        f = self._faults[d]
        f.flowing.clear()
        if f.resume_timer is not None:
            f.resume_timer.cancel()
        f.resume_timer = None if seconds is None else self._loop.call_later(seconds, self._resume, d)

    def _resume(self, d: str) -> None:
        f = self._faults[d]
        if f.resume_timer is not None:
            f.resume_timer.cancel()
            f.resume_timer = None
        f.flowing.set()

    def _accept(self) -> None:
        self._refusing = False
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None

    def _cut_now(self, count: bool = True) -> list:
        """Mark every connection for a reset and cancel it; returns the tasks to wait for."""
        for f in self._faults.values():
            f.cut_after = None
        tasks = []
        for conn in list(self._conns):
            conn.rst = True
            if conn.task is not None:
                conn.task.cancel()
                tasks.append(conn.task)
            if count:
                self._stats["cut"] += 1
        return tasks

    async def _accept_loop(self) -> None:
        while True:
            accepting = asyncio.ensure_future(self._loop.sock_accept(self._lsock))
            try:
                sock, _ = await asyncio.shield(accepting)
            except asyncio.CancelledError:
                # cancelled (by close) just as a connection was accepted: close it, not leak it
                accepting.cancel()
                accepting.add_done_callback(_close_accepted)
                raise
            except OSError:             # e.g. too many open files: keep listening
                await asyncio.sleep(0.05)
                continue
            self._start(sock, b"")

    def _start(self, sock: socket.socket, first: bytes) -> None:
        if self._closed:
            _close(sock, rst=True)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._refusing:
            self._stats["refused"] += 1
            _close(sock, rst=True)
            return
        self._stats["accepted"] += 1
        conn = _Conn(sock)
        self._conns.add(conn)
        conn.task = self._loop.create_task(self._serve(conn, first))
        # closed by a callback, not in _serve: a task cancelled before it ran never enters it
        conn.task.add_done_callback(lambda _: self._finished(conn))

    def _finished(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for s in (conn.client, conn.server):
            if s is not None:
                _close(s, conn.rst)

    async def _serve(self, conn: _Conn, first: bytes) -> None:
        loop = self._loop
        try:
            assert conn.client is not None
            if self._dispatch is not None and not first:
                first = await asyncio.wait_for(loop.sock_recv(conn.client, CHUNK), _CONTROL_TIMEOUT_S)
                target = self._dispatch(first) if first else self
                if target is not self:
                    sock, conn.client = conn.client, None
                    target.adopt(sock, first)
                    return
            if self.upstream is None:
                raise ConnectionRefusedError("no upstream set")
            conn.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.server.setblocking(False)
            conn.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(conn.server, self.upstream), _CONTROL_TIMEOUT_S)
            pumps = [loop.create_task(self._pump(conn.client, conn.server, UP, first)),
                     loop.create_task(self._pump(conn.server, conn.client, DOWN, b""))]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                # a reset on one side is passed on as a reset; an orderly close as a close
                conn.rst = conn.rst or any(not t.cancelled() and t.exception() is not None for t in done)
            finally:
                for t in pumps:
                    t.cancel()
                await asyncio.wait(pumps)
                for t in pumps:             # retrieved, so asyncio does not log them as lost
                    if not t.cancelled():
                        t.exception()
        except (OSError, asyncio.TimeoutError):
            conn.rst = True             # upstream unreachable: the client sees a refusal

    async def _pump(self, src: socket.socket, dst: socket.socket, d: str, data: bytes) -> None:
        """Forward ``src`` to ``dst`` through direction ``d``'s faults; returns at EOF."""
        f, loop, stats = self._faults[d], self._loop, self._stats
        while True:
            if not data:
                await f.flowing.wait()           # a stall reads nothing
                data = await loop.sock_recv(src, CHUNK)
                if not data:
                    return
            view = memoryview(data)
            while view:
                await f.flowing.wait()           # bytes read before a stall are held too
                n = len(view)
                if f.slice:
                    n = min(n, f.slice)
                if f.rate:
                    n = min(n, max(1, int(f.rate / 20)))     # ~20 writes a second: a smooth rate
                if f.cut_after is not None:
                    n = min(n, f.cut_after)
                if f.stall_after is not None:
                    n = min(n, f.stall_after)
                await loop.sock_sendall(dst, view[:n])
                view = view[n:]
                stats[d + "_bytes"] += n
                stats[d + "_writes"] += 1
                if f.stall_after is not None:
                    f.stall_after -= n
                    if f.stall_after <= 0:
                        for dd in (UP, DOWN):
                            self._faults[dd].stall_after = None
                            self._stall(dd, self._stall_seconds)
                if f.cut_after is not None:
                    f.cut_after -= n
                    if f.cut_after <= 0:
                        self._cut_now()          # cancels this connection too
                        return
                if f.rate:
                    await asyncio.sleep(n / f.rate)
            data = b""
