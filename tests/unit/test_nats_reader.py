"""The NATS socket reader (backends/nats.py ``_FastReader``), fed as asyncio feeds a BufferedProtocol:
whatever the split of the stream into reads, routed MSG payloads come out whole and in order, and
every other operation reaches nats-py's parser byte for byte and in order."""
from __future__ import annotations

import random
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest

pytest.importorskip("nats")
from nats import errors as nats_errors  # noqa: E402

from msight_fast.backends.nats import SMALL, STAGE, _FastReader  # noqa: E402


class _Old:
    """What the reader forwards to: the StreamReader protocol it replaced (flow control, the end)."""

    def __init__(self) -> None:
        self.events: List[Any] = []

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def _stream(rng: random.Random) -> Tuple[bytes, List[bytes], bytes]:
    """A server's byte stream: (stream, payloads of routed sid 1 in order, what nats-py must get)."""
    ops: List[Tuple[bytes, Optional[bytes]]] = []       # (bytes on the wire, routed payload or None)
    ops.append((b'INFO {"server_id":"x","max_payload":1048576}\r\n', None))
    for _ in range(60):
        kind = rng.choice(["small", "large", "huge", "empty", "foreign", "hmsg", "ping", "pong", "ok", "err"])
        if kind in ("small", "large", "huge", "empty"):
            n = {"small": rng.randint(1, SMALL), "large": rng.randint(SMALL + 1, 300_000),
                 "huge": rng.randint(STAGE, 3 * STAGE), "empty": 0}[kind]
            body = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
            body = body[:n]
            reply = rng.choice([b"", b" _INBOX.abc"])
            ops.append((b"MSG cam/raw 1" + reply + b" %d\r\n" % n + body + b"\r\n", body))
        elif kind == "foreign":
            body = b"r" * rng.randint(0, 200_000)
            ops.append((b"MSG _INBOX.x.y 7 %d\r\n" % len(body) + body + b"\r\n", None))
        elif kind == "hmsg":
            hdr = b"NATS/1.0\r\nk: v\r\n\r\n"
            body = b"h" * rng.randint(0, 5000)
            ops.append((b"HMSG cam/raw 1 %d %d\r\n" % (len(hdr), len(hdr) + len(body)) + hdr + body + b"\r\n", None))
        else:
            ops.append(({"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n",
                         "err": b"-ERR 'Slow Consumer'\r\n"}[kind], None))
    stream = b"".join(o for o, _ in ops)
    routed = [p for _, p in ops if p is not None]
    control = b"".join(o for o, p in ops if p is None)
    return stream, routed, control


def _run(reader: _FastReader, data: bytes, rng: random.Random, lead: int = 0) -> None:
    """Feed ``data`` as asyncio would: get_buffer, recv_into at most the buffer, buffer_updated."""
    pos = 0
    if lead:
        reader.feed(data[:lead])                        # what the StreamReader had read already
        pos = lead
    while pos < len(data):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos, rng.choice([1, 2, 7, 100, 4096, 65536, 1 << 20, 8 << 20]))
        buf[:n] = data[pos:pos + n]
        pos += n
        reader.buffer_updated(n)
        assert reader.error is None, reader.error


@pytest.mark.parametrize("seed", range(8))
def test_any_split_of_the_stream_gives_the_same_messages_and_control_bytes(seed: int) -> None:
    rng = random.Random(seed)
    stream, routed, control = _stream(rng)
    got: List[Any] = []
    reader = _FastReader(_Old(), {1: got.append})
    _run(reader, stream, rng, lead=rng.choice([0, 0, 5, 300]))
    assert [bytes(g) for g in got] == routed
    assert b"".join(reader.control) == control
    for g in got:                                        # large payloads land in 64-byte-aligned buffers
        if len(g) > SMALL:
            assert isinstance(g, memoryview) and np.frombuffer(g, np.uint8).ctypes.data % 64 == 0


def test_a_large_payload_is_read_straight_into_its_buffer() -> None:
    body = bytes(range(256)) * 4096                      # 1 MiB
    got: List[Any] = []
    reader = _FastReader(_Old(), {3: got.append})
    line = b"MSG t 3 %d\r\n" % len(body)
    reader.feed(line + body[:100])
    view = reader.get_buffer(-1)                         # the rest of the payload: its own buffer, not the stage
    assert len(view) == len(body) - 100
    view[:] = body[100:]
    reader.buffer_updated(len(view))
    assert bytes(got[0]) == body
    reader.feed(b"\r\nPING\r\n")
    assert list(reader.control) == [b"PING\r\n"]


@pytest.mark.parametrize("bad", [
    b"MSG t 1 5\r\nhelloXY",                             # no CRLF after a small payload
    b"MSG t 1 5\r\nhello\r\nMSG t 1 70000\r\n" + b"a" * 70000 + b"XY",   # nor after a large one
    b"MSG " + b"X" * 5000,                               # a MSG line with no end
    b"MSG t 9 %d\r\n" % ((64 << 20) + 1),                # a foreign message over NATS's own ceiling
])
def test_a_malformed_stream_ends_the_connection_as_a_protocol_error(bad: bytes) -> None:
    reader = _FastReader(_Old(), {1: lambda b: None})
    _run_tolerant(reader, bad)
    assert reader.closed and isinstance(reader.error, nats_errors.ProtocolError)
    assert reader.wake.is_set()


def _run_tolerant(reader: _FastReader, data: bytes) -> None:
    pos = 0
    while pos < len(data) and not reader.closed:
        buf = reader.get_buffer(-1)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        reader.buffer_updated(n)


def test_flow_control_and_the_end_go_to_the_protocol_it_replaced() -> None:
    old = _Old()
    reader = _FastReader(old, {})
    reader.pause_writing()
    reader.resume_writing()
    reader.eof_received()
    err = ConnectionResetError()
    reader.connection_lost(err)
    assert old.events == ["pause", "resume", "eof", ("lost", err)]
    assert reader.closed and reader.error is err and reader.wake.is_set()


def test_a_long_info_line_split_over_reads_is_not_an_error() -> None:
    """nats-py's parser waits for the rest of a long INFO (a cluster with many connect_urls)."""
    info = b'INFO {"connect_urls":[' + b",".join(b'"10.0.%d.%d:4222"' % (i // 250, i % 250) for i in range(400)) \
        + b"]}\r\n"
    assert len(info) > 4096
    reader = _FastReader(_Old(), {})
    reader.feed(info[:4500])
    assert reader.error is None and not reader.control
    reader.feed(info[4500:] + b"PING\r\n")
    assert list(reader.control) == [info, b"PING\r\n"]


def test_control_lines_do_not_wait_behind_a_partial_foreign_message() -> None:
    reader = _FastReader(_Old(), {1: lambda b: None})
    reader.feed(b"PONG\r\nMSG _INBOX.a 7 200000\r\n" + b"x" * 1000)
    assert list(reader.control) == [b"PONG\r\n"] and reader.wake.is_set()


def test_the_staging_buffer_grows_only_as_needed_and_shrinks_back() -> None:
    rng = random.Random(1)
    reader = _FastReader(_Old(), {})
    line = b"+OK\r\n"
    data = line * 2_000_000                               # 10 MB of short lines, read in full buffers
    _run(reader, data, rng)
    assert len(reader.buf) <= 2 * STAGE
    big = b"MSG _INBOX.a 7 %d\r\n" % (5 * STAGE) + b"y" * (5 * STAGE) + b"\r\n"
    _run(reader, big, rng)                                # a foreign message larger than the stage
    assert reader.control[-1] == big
    reader.get_buffer(-1)                                 # all parsed: back to the stage's size
    assert len(reader.buf) == STAGE
