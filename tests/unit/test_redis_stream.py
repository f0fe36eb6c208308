"""Our RESP fast path for subscribed connections, fed through a socketpair in ragged pieces."""
import random
import socket
import threading
import time

import numpy as np
import pytest

from msight_fast.backends import redis as R
from msight_fast.config import RedisConfig


def _push(kind: bytes, chan: bytes, tail: bytes) -> bytes:
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(kind), kind, len(chan), chan) + tail


def _message(chan: bytes, payload: bytes) -> bytes:
    return _push(b"message", chan, b"$%d\r\n%s\r\n" % (len(payload), payload))


class _FakeConn:
    def __init__(self, sock):
        self.sock, self.tls = sock, False

    def close(self):
        self.sock.close()


def _source(sock):
    """A RedisSource reading ``sock`` as if it were subscribed to 'cam' (no server involved)."""
    src = R.RedisSource.__new__(R.RedisSource)
    src._init_state(RedisConfig(host="127.0.0.1", port=1), "cam")
    src._conn = _FakeConn(sock)
    return src


@pytest.mark.parametrize("max_piece", [1, 7, 4096, 1 << 20])
def test_messages_of_every_size_survive_any_segmentation(max_piece):
    rng = np.random.default_rng(max_piece)
    sizes = [0, 1, 100, R.SMALL - 1, R.SMALL, R.SMALL + 1, R.STAGE - 50, R.STAGE + 3, 3 * R.STAGE + 17]
    if max_piece == 1:
        sizes = [s for s in sizes if s < 70_000]     # a byte at a time: keep it quick
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    stream = _push(b"subscribe", b"cam", b":1\r\n") + b"".join(_message(b"cam", p) for p in payloads)
    a, b = socket.socketpair()

    def dribble():
        r = random.Random(max_piece)
        i = 0
        while i < len(stream):
            k = r.randint(1, max_piece)
            b.sendall(stream[i:i + k])
            i += k
    t = threading.Thread(target=dribble)
    t.start()
    src = _source(a)
    try:
        assert src._read_push(None)[0] == b"subscribe"
        for p in payloads:
            kind, chan, got = src._read_push(None)
            assert (kind, chan) == (b"message", b"cam")
            assert bytes(got) == p
            if len(p) > R.SMALL:                       # large payloads land 64-byte aligned
                assert np.frombuffer(got, np.uint8).ctypes.data % 64 == 0
    finally:
        t.join()
        a.close()
        b.close()


def test_error_reply_and_garbage_raise_connection_errors():
    for stream, match in ((b"-ERR something bad\r\n", "Redis error"), (b"+OK\r\n", "unexpected reply"),
                          (b"*3\r\n$x\r\n", "bad length"), (b"*4\r\n", "4-element"),
                          (b"*2\r\n$4\r\nping\r\n$0\r\n\r\n", "2-element")):
        a, b = socket.socketpair()
        b.sendall(stream)
        try:
            with pytest.raises(ConnectionError, match=match):
                _source(a)._read_push(None)
        finally:
            a.close()
            b.close()


def test_peer_closing_mid_message_is_a_connection_error():
    a, b = socket.socketpair()

    def send_part_and_hang_up():       # more than the socket buffer: it must run beside the reader
        b.sendall(_message(b"cam", b"x" * 500_000)[:300_000])
        b.close()
    t = threading.Thread(target=send_part_and_hang_up)
    t.start()
    with pytest.raises(ConnectionError):
        _source(a)._read_push(None)
    t.join()
    a.close()


def test_timeout_returns_none_without_losing_partial_input():
    a, b = socket.socketpair()
    msg = _message(b"cam", b"y" * 1000)
    b.sendall(msg[:10])
    src = _source(a)
    assert src._read_push(time.monotonic() + 0.05) is None
    b.sendall(msg[10:])
    assert bytes(src._read_push(None)[2]) == b"y" * 1000
    a.close()
    b.close()


def test_next_returns_on_time_while_a_large_message_stalls_and_then_completes_it():
    payload = np.random.default_rng(5).integers(0, 256, 3 * R.STAGE, dtype=np.uint8).tobytes()
    msg = _message(b"cam", payload)
    a, b = socket.socketpair()
    resume = threading.Event()

    def send_half_then_stall():      # more than the socket buffer: it must run beside the reader
        b.sendall(msg[:len(msg) // 2])
        resume.wait(30)
        b.sendall(msg[len(msg) // 2:])
    t = threading.Thread(target=send_half_then_stall)
    t.start()
    src = _source(a)
    try:
        half = len(msg) // 2 - (len(msg) - len(payload) - 2)     # payload bytes in the first half
        deadline = time.monotonic() + 30
        while src._part is None or src._part.k < half:        # each call ends on time meanwhile
            assert time.monotonic() < deadline, "the first half never arrived"
            t0 = time.monotonic()
            assert src.next(0.2) is None
            assert time.monotonic() - t0 < 0.2 + 2.0
        t0 = time.monotonic()
        assert src.next(0.2) is None                          # stalled mid-payload: on time again
        assert time.monotonic() - t0 < 0.2 + 2.0
        assert src._part.k == half                            # the partial frame is kept
        resume.set()
        got = src.next(30)
        assert got is not None and bytes(got[0]) == payload
        assert np.frombuffer(got[0], np.uint8).ctypes.data % 64 == 0
    finally:
        resume.set()
        t.join()
        a.close()
        b.close()


@pytest.mark.parametrize("size", [5, R.SMALL - 3, R.SMALL + 5])
def test_one_byte_slices_each_next_call_returns_at_once_until_the_frame_is_whole(size):
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    stream = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n" + _message(b"cam", payload) + _message(b"cam", b"next")
    a, b = socket.socketpair()
    src = _source(a)
    got = []
    slowest = 0.0
    try:
        for i in range(len(stream)):
            b.sendall(stream[i:i + 1])
            t0 = time.monotonic()
            r = src.next(0)
            slowest = max(slowest, time.monotonic() - t0)
            if r is not None:
                got.append(bytes(r[0]))
        assert got == [payload, b"next"]           # the pong is no message; nothing lost or doubled
        assert slowest < 2.0                       # next(0) never waited for the rest of a message
    finally:
        a.close()
        b.close()


def test_a_silent_subscription_is_pinged_and_then_given_up():
    a, b = socket.socketpair()
    src = _source(a)
    src.ping_idle_s, src.health_timeout_s = 0.2, 0.5
    try:
        t0 = time.monotonic()
        with pytest.raises(R._Silent):
            src._read_push(time.monotonic() + 30)
        assert time.monotonic() - t0 < 0.7 + 5.0
        b.settimeout(5)
        assert b.recv(64) == b"*1\r\n$4\r\nPING\r\n"     # it asked before giving up
    finally:
        a.close()
        b.close()


def test_an_answered_ping_keeps_the_subscription():
    a, b = socket.socketpair()
    src = _source(a)
    src.ping_idle_s, src.health_timeout_s = 0.1, 5.0     # answers come well within it, even on a busy machine

    def answer():
        b.settimeout(10)
        for _ in range(3):
            if b.recv(64) == b"*1\r\n$4\r\nPING\r\n":
                b.sendall(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        b.sendall(_message(b"cam", b"after"))
    t = threading.Thread(target=answer)
    t.start()
    try:
        got = src.next(30)                          # three idle periods, each answered
        assert got is not None and bytes(got[0]) == b"after"
    finally:
        t.join()
        a.close()
        b.close()



def test_a_message_longer_than_any_accepted_frame_is_never_allocated():
    """A corrupt or hostile length is a broken stream (the source reconnects); nothing that size is allocated."""
    a, b = socket.socketpair()
    src = R.RedisSource.__new__(R.RedisSource)
    src._init_state(RedisConfig(host="127.0.0.1", port=1, max_frame_bytes=1 << 20), "cam")
    src._conn = _FakeConn(a)
    try:
        b.sendall(b"*3\r\n$7\r\nmessage\r\n$3\r\ncam\r\n$%d\r\n" % (3 << 30))
        with pytest.raises(ConnectionError, match="bad message length"):
            src._read_push(time.monotonic() + 5)
    finally:
        a.close()
        b.close()
