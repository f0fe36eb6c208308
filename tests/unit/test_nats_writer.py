"""The NATS writer's wait for the socket (backends/nats.py ``_write_rest``): a large message goes
on being written as the socket takes it, views and all, within its time bound; what is left then
comes back in order, so that joined to what was written it is the message, byte for byte."""
from __future__ import annotations

import socket
import threading
from typing import List

import numpy as np
import pytest

pytest.importorskip("nats")
from msight_fast.backends import nats as N  # noqa: E402


def _message(n: int) -> List[memoryview]:
    payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    line = b"PUB t %d\r\n" % n
    # a frame's header and payload are separate views, as the publisher hands them over
    return [memoryview(line), memoryview(payload)[:64], memoryview(payload)[64:], memoryview(b"\r\n")]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)    # small: the message cannot go at once
    return a, b


def _drain(sock: socket.socket, want: int, into: bytearray) -> None:
    sock.settimeout(10)
    while len(into) < want:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        into.extend(chunk)


@pytest.mark.parametrize("first", [0, 1, 9, 10, 100_000])
def test_a_message_the_reader_takes_is_written_whole_and_in_order(first: int) -> None:
    """``first``: bytes the caller's own writev had already sent (inside the line, at its end,
    inside the header view, inside the payload)."""
    bufs = _message(3 << 20)
    want = b"".join(bytes(v) for v in bufs)
    a, b = _pair()
    got = bytearray()
    try:
        t = threading.Thread(target=_drain, args=(b, len(want), got), daemon=True)
        t.start()
        a.setblocking(True)
        a.sendall(want[:first])
        a.setblocking(False)
        old, N.SYNC_WRITE_S = N.SYNC_WRITE_S, 10.0     # a reader that keeps up: all of it goes here
        try:
            rest = N._write_rest(a.fileno(), bufs, first)
        finally:
            N.SYNC_WRITE_S = old
        t.join(10)
        assert rest == []
        assert bytes(got) == want
    finally:
        a.close()
        b.close()


def test_a_socket_nobody_reads_gives_back_the_rest_once_its_time_is_up() -> None:
    bufs = _message(3 << 20)
    want = b"".join(bytes(v) for v in bufs)
    a, b = _pair()
    try:
        old, N.SYNC_WRITE_S = N.SYNC_WRITE_S, 0.05
        try:
            rest = N._write_rest(a.fileno(), bufs, 0)
        finally:
            N.SYNC_WRITE_S = old
        assert rest and sum(v.nbytes for v in rest) < len(want)     # some went, the rest came back
        written = bytearray()
        b.setblocking(False)
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            written.extend(chunk)
        assert bytes(written) + b"".join(bytes(v) for v in rest) == want
    finally:
        a.close()
        b.close()


def test_a_closed_peer_is_an_error_not_a_wait() -> None:
    a, b = _pair()
    b.close()
    try:
        with pytest.raises(OSError):
            N._write_rest(a.fileno(), _message(1 << 20), 0)
    finally:
        a.close()
