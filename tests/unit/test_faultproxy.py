"""The fault-injecting proxy of tests/faultproxy.py, against a local echo server (no broker)."""
from __future__ import annotations

import os
import socket
import socketserver
import threading
from typing import Iterator, List, Tuple

import pytest

from ..faultproxy import BOTH, DOWN, UP, FaultProxy
from ..helpers import wait_for

IO_TIMEOUT_S = 20.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections.append(self.request)          # type: ignore[attr-defined]
        while True:
            try:
                data = self.request.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.connections: List[socket.socket] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        return self.server_address[:2]  # type: ignore[return-value]

    def handle_error(self, request, client_address) -> None:   # a reset peer is what these tests do
        pass

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(IO_TIMEOUT_S)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.address) as p:
        yield p


def _client(p: FaultProxy) -> socket.socket:
    s = socket.create_connection(p.address, timeout=IO_TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _echo_through(s: socket.socket, data: bytes) -> bytes:
    """Send ``data`` from a thread (a large echo would deadlock on full buffers otherwise)."""
    err: List[BaseException] = []

    def send() -> None:
        try:
            s.sendall(data)
        except OSError as e:
            err.append(e)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        return _recv_exactly(s, len(data))
    finally:
        t.join(IO_TIMEOUT_S)
        assert not t.is_alive() and not err, f"sending failed: {err}"


def _ends_with_reset(s: socket.socket) -> bool:
    """Read until the connection ends; True if it ended with a reset, False on an orderly EOF."""
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    return False


def _reset_at_connect_or_read(p: FaultProxy) -> bool:
    """A new connection is reset: at its first read, or already at connect when the reset
    comes before the connecting thread runs again."""
    try:
        with _client(p) as s:
            return _ends_with_reset(s)
    except ConnectionResetError:
        return True


def test_bytes_pass_intact_including_6mb_frames(proxy: FaultProxy) -> None:
    data = os.urandom(6 << 20)
    with _client(proxy) as s:
        assert _echo_through(s, b"hello") == b"hello"
        assert _echo_through(s, data) == data
    st = wait_for(lambda: (lambda x: x if x["active"] == 0 else None)(proxy.stats()), "the connection to end")
    assert st["upstream_bytes"] == st["downstream_bytes"] == len(data) + 5
    assert st["accepted"] == 1 and st["cut"] == 0 and st["refused"] == 0


def test_many_connections_at_once(proxy: FaultProxy) -> None:
    payloads = [os.urandom(200_000 + i) for i in range(8)]
    got: List[bytes] = [b""] * len(payloads)

    def run(i: int) -> None:
        with _client(proxy) as s:
            got[i] = _echo_through(s, payloads[i])
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT_S)
    assert got == payloads
    assert proxy.stats()["accepted"] == len(payloads)


def test_slice_1_makes_one_byte_writes_of_identical_bytes(proxy: FaultProxy) -> None:
    data = os.urandom(20_000)
    with _client(proxy) as s:
        proxy.slice(1)
        assert _echo_through(s, data) == data
    st = proxy.stats()
    assert st["upstream_writes"] == st["upstream_bytes"] == len(data)
    assert st["downstream_writes"] == st["downstream_bytes"] == len(data)


def test_slice_one_direction_only(proxy: FaultProxy) -> None:
    data = os.urandom(5000)
    proxy.slice(7, DOWN)
    with _client(proxy) as s:
        assert _echo_through(s, data) == data
    st = proxy.stats()
    assert st["downstream_writes"] >= len(data) // 7
    assert st["upstream_writes"] < len(data) // 7


def test_cut_resets_every_connection_and_new_ones_work(proxy: FaultProxy, echo: EchoServer) -> None:
    a, b = _client(proxy), _client(proxy)
    with a, b:
        assert _echo_through(a, b"a") == b"a" and _echo_through(b, b"b") == b"b"
        proxy.cut()
        assert _ends_with_reset(a) and _ends_with_reset(b)
    st = proxy.stats()
    assert st["cut"] == 2 and st["active"] == 0
    # the server's side was reset too
    wait_for(lambda: all(c.fileno() == -1 for c in echo.connections), "the echo server to see the reset")
    with _client(proxy) as c:
        assert _echo_through(c, b"again") == b"again"


def test_cut_after_bytes_cuts_mid_stream(proxy: FaultProxy) -> None:
    with _client(proxy) as s:
        proxy.cut_after_bytes(1000, DOWN)
        s.sendall(os.urandom(5000))
        got = 0
        with pytest.raises((ConnectionResetError, ConnectionError)):
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("EOF")
                got += len(chunk)
        assert got <= 1000              # a reset may also discard what the client had not read yet
    st = wait_for(lambda: (lambda x: x if x["cut"] else None)(proxy.stats()), "the cut")
    assert st["downstream_bytes"] == 1000 and st["cut"] == 1


def test_stall_holds_bytes_until_resume(proxy: FaultProxy) -> None:
    data = os.urandom(100_000)
    with _client(proxy) as s:
        assert _echo_through(s, b"x") == b"x"
        proxy.stall()
        s.sendall(data)
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):   # held: nothing comes back while stalled
            s.recv(1)
        st = proxy.stats()
        assert st["upstream_bytes"] == 1 and st["downstream_bytes"] == 1
        assert st["stalled"] == {UP: True, DOWN: True} and st["active"] == 1
        proxy.resume()
        s.settimeout(IO_TIMEOUT_S)
        assert _recv_exactly(s, len(data)) == data


def test_stall_for_seconds_resumes_by_itself(proxy: FaultProxy) -> None:
    with _client(proxy) as s:
        proxy.stall(seconds=0.3, direction=UP)
        s.sendall(b"later")
        assert _recv_exactly(s, 5) == b"later"
    assert proxy.stats()["stalled"] == {UP: False, DOWN: False}


def test_stall_after_bytes_holds_the_rest(proxy: FaultProxy) -> None:
    data = os.urandom(50_000)
    with _client(proxy) as s:
        proxy.stall_after_bytes(1234, direction=DOWN)
        s.sendall(data)
        assert _recv_exactly(s, 1234) == data[:1234]
        # the trigger counts one direction; the whole link freezes
        wait_for(lambda: proxy.stats()["stalled"] == {UP: True, DOWN: True}, "the stall")
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(1)
        proxy.resume()
        s.settimeout(IO_TIMEOUT_S)
        assert _recv_exactly(s, len(data) - 1234) == data[1234:]


def test_refuse_then_accept(proxy: FaultProxy) -> None:
    with _client(proxy) as live:
        assert _echo_through(live, b"up") == b"up"
        proxy.refuse()
        assert _reset_at_connect_or_read(proxy)
        assert _echo_through(live, b"still") == b"still"      # connections made before stay up
        assert proxy.stats()["refused"] == 1
        proxy.accept()
        with _client(proxy) as s:
            assert _echo_through(s, b"back") == b"back"


def test_refuse_for_seconds_accepts_again_by_itself(proxy: FaultProxy) -> None:
    proxy.refuse(seconds=0.3)
    assert proxy.stats()["refusing"]
    wait_for(lambda: not proxy.stats()["refusing"], "refusing to end")
    with _client(proxy) as s:
        assert _echo_through(s, b"ok") == b"ok"


def test_throttle_delivers_every_byte_in_many_writes(proxy: FaultProxy) -> None:
    data = os.urandom(200_000)
    proxy.throttle(1_000_000, UP)
    with _client(proxy) as s:
        assert _echo_through(s, data) == data
    assert proxy.stats()["upstream_writes"] >= 4


def test_reset_makes_it_transparent_again(proxy: FaultProxy) -> None:
    data = os.urandom(300_000)
    with _client(proxy) as s:
        proxy.slice(3)
        proxy.throttle(10_000)
        proxy.cut_after_bytes(10 << 20)
        proxy.stall()
        proxy.refuse()
        proxy.reset()
        assert _echo_through(s, data) == data
        st = proxy.stats()
        assert st["upstream_writes"] < 100 and not st["refusing"] and st["cut"] == 0
    with _client(proxy) as s:
        assert _echo_through(s, b"new") == b"new"


def test_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))        # bound, not listening: connections are refused
        with FaultProxy(hole.getsockname()[:2]) as p:
            assert _reset_at_connect_or_read(p)


def test_dispatch_hands_each_connection_to_the_proxy_its_first_bytes_name(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as a, FaultProxy(echo.address) as b:
        with FaultProxy(None, dispatch=lambda first: a if first.startswith(b"A") else b) as front:
            for tag in (b"A", b"B", b"A"):
                data = tag + os.urandom(100_000)
                with _client(front) as s:
                    assert _echo_through(s, data) == data
            assert (a.stats()["accepted"], b.stats()["accepted"]) == (2, 1)
            assert a.stats()["upstream_bytes"] == 200_002
            b.cut_after_bytes(10, DOWN)    # faults of the proxy it was handed to apply
            with _client(front) as s:
                s.sendall(b"B" + bytes(100))
                assert _ends_with_reset(s)


def test_controls_check_their_arguments_and_close_is_final(echo: EchoServer) -> None:
    p = FaultProxy(echo.address)
    with pytest.raises(ValueError):
        p.slice(0)
    with pytest.raises(ValueError):
        p.throttle(0)
    with pytest.raises(ValueError):
        p.stall(direction="sideways")
    with _client(p) as s:
        assert _echo_through(s, b"1") == b"1"
        p.close()
        assert _ends_with_reset(s)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(p.address, timeout=IO_TIMEOUT_S).close()
    with pytest.raises(RuntimeError):
        p.cut()
    p.close()                               # twice is fine
    assert BOTH == "both"
