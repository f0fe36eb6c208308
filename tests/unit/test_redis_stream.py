"""Our RESP fast path for subscribed connections, fed through a socketpair in ragged pieces."""
import random
import socket
import threading

import numpy as np
import pytest

from msight_fast.backends import redis as R


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
    src = R.RedisSource.__new__(R.RedisSource)
    src._buf = bytearray(R.STAGE)
    src._mv = memoryview(src._buf)
    src._s = src._e = 0
    src._conn = _FakeConn(sock)
    src._closed = False
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
                          (b"*3\r\n$x\r\n", "bad length"), (b"*2\r\n", "2-element")):
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
    import time
    assert src._read_push(time.monotonic() + 0.05) is None
    b.sendall(msg[10:])
    assert bytes(src._read_push(None)[2]) == b"y" * 1000
    a.close()
    b.close()
