"""The NATS writer's wait for the socket (backends/nats.py ``_write_rest``): a large message goes
on being written as the socket takes it, views and all, until its time is up; what is left then
comes back in order, so that joined to what was written it is the message, byte for byte."""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Tuple

import numpy as np
import pytest

pytest.importorskip("nats")
from msight_fast.backends import nats as N  # noqa: E402

SLACK = 2.0        # a busy machine's scheduling; the bounds asserted are about not waiting on and on


def _message(n: int) -> List[memoryview]:
    payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    line = b"PUB t %d\r\n" % n
    # a frame's header and payload are separate views, as the publisher hands them over
    return [memoryview(line), memoryview(payload)[:64], memoryview(payload)[64:], memoryview(b"\r\n")]


def _pair() -> Tuple[socket.socket, socket.socket]:
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


def _read_what_is_there(sock: socket.socket) -> bytes:
    got = bytearray()
    sock.setblocking(False)
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        got.extend(chunk)


# the line "PUB t 3145728\r\n" is 15 bytes, the header view the next 64
@pytest.mark.parametrize("first", [0, 9, 15, 40, 79, 100_000])
def test_a_message_the_reader_takes_is_written_whole_and_in_order(first: int) -> None:
    """``first``: bytes the caller's own writev had already sent (inside the line, at its end,
    inside the header view, at its end, inside the payload)."""
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
        rest = N._write_rest(a.fileno(), bufs, first, time.monotonic() + 30)    # a reader that keeps up
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
        t = time.monotonic()
        rest = N._write_rest(a.fileno(), bufs, 0, t + 0.05)
        assert time.monotonic() - t < 0.05 + SLACK
        assert rest and sum(v.nbytes for v in rest) < len(want)     # some went, the rest came back
        assert _read_what_is_there(b) + b"".join(bytes(v) for v in rest) == want
    finally:
        a.close()
        b.close()


def test_a_spent_budget_writes_nothing_more_and_returns_at_once() -> None:
    """The loop thread's budget for one turn is shared by its messages: once it is spent, the
    next large message goes to asyncio's buffer without waiting."""
    bufs = _message(3 << 20)
    want = b"".join(bytes(v) for v in bufs)
    a, b = _pair()
    try:
        t = time.monotonic()
        rest = N._write_rest(a.fileno(), bufs, 20, t - 1.0)
        assert time.monotonic() - t < SLACK
        assert b"".join(bytes(v) for v in rest) == want[20:]
        assert _read_what_is_there(b) == b""
    finally:
        a.close()
        b.close()


def test_a_closed_peer_is_an_error_not_a_wait() -> None:
    a, b = _pair()
    b.close()
    try:
        t = time.monotonic()
        with pytest.raises(OSError):
            N._write_rest(a.fileno(), _message(1 << 20), 0, t + 30)
        assert time.monotonic() - t < SLACK
    finally:
        a.close()
