"""Frame codec: encode/decode sensor frames, split them into fragments and put them back together."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, List, Optional

import numpy as np

from . import _schema as S
from ._impl import HAS_EXTENSIONS, impl
from .errors import FrameError

Frame = impl.Frame
encode = impl.encode
encode_parts = impl.encode_parts
decode = impl.decode
crc32c = impl.crc32c

__all__ = ["Frame", "encode", "encode_parts", "decode", "crc32c", "fragment", "Reassembler",
           "is_fragment", "fragment_key", "HAS_EXTENSIONS", "FrameError"]


def is_fragment(buf: Any) -> bool:
    """True when ``buf`` starts with the fragment magic (else it should be a whole frame)."""
    if type(buf) is bytes:                    # what every backend hands over: no view needed
        return buf[:4] == S.FRAG_MAGIC
    return bytes(memoryview(buf)[:4]) == S.FRAG_MAGIC


def fragment_key(buf: Any) -> tuple:
    """(publisher_id, frame_id) of a fragment, unchecked: the key of the frame it belongs to.

    The fragment header's layout is known here only (see docs/wire-format.md); ``buf`` must be
    at least the 64-byte fragment header long (``is_fragment`` said so, or the caller checked).
    """
    mv = memoryview(buf)
    return (int.from_bytes(mv[16:24], "little"), int.from_bytes(mv[8:16], "little"))


def _frame_ids(frame_bytes: memoryview) -> tuple:
    # frame_id and publisher_id key the fragments; taken unchecked, decode validates the whole
    if len(frame_bytes) >= S.FIXED_LEN and frame_bytes[:4] == S.MAGIC:
        return (int.from_bytes(frame_bytes[40:48], "little"), int.from_bytes(frame_bytes[56:64], "little"))
    return (S.new_frame_id(), 0)


def fragment(frame_bytes: Any, max_size: int) -> List[Any]:
    """Split an encoded frame into self-describing fragments of at most ``max_size`` bytes.

    ``frame_bytes`` is the encoded frame, or the list its ``encode_parts`` returned: fragments are
    then gathered from the parts directly, one copy of the frame in all instead of two.
    A frame that already fits is returned whole, as the only element: no fragment overhead.
    Each fragment is a 64-byte header (frame id, publisher id, index, count, total size,
    offset, chunk size, CRC32C) followed by its chunk; see docs/wire-format.md.
    """
    parts = [memoryview(p).cast("B") for p in frame_bytes] if isinstance(frame_bytes, (list, tuple)) \
        else [memoryview(frame_bytes).cast("B")]
    total = sum(len(p) for p in parts)
    if total <= max_size:
        return [frame_bytes if len(parts) == 1 and not isinstance(frame_bytes, (list, tuple))
                else b"".join(parts)]
    chunk = max_size - S.FRAG_HEADER_LEN
    if chunk < 1:
        raise ValueError(f"max_size {max_size} leaves no room after the {S.FRAG_HEADER_LEN}-byte fragment header")
    chunk = min(chunk, 0xFFFFFFFF)
    count = -(-total // chunk)
    if count > 0xFFFFFFFF:
        raise FrameError(f"{count} fragments exceed the 32-bit fragment count")
    frame_id, pub_id = _frame_ids(parts[0] if len(parts[0]) >= S.FIXED_LEN else memoryview(b"".join(parts)))
    out = []
    k, pos = 0, 0                       # current part, position in it
    for i in range(count):
        want = min(chunk, total - i * chunk)
        pieces = []
        while want:
            p = parts[k]
            take = min(want, len(p) - pos)
            if take:
                pieces.append(p[pos:pos + take])
            pos += take
            want -= take
            if pos == len(p):
                k, pos = k + 1, 0
        out.append(b"".join([impl.pack_fragment_header(frame_id, pub_id, i, count, total, i * chunk, chunk,
                                                       pieces)] + pieces))
    return out


class _Pending:
    __slots__ = ("buf", "view", "got", "remaining", "count", "total", "chunk", "deadline")


class Reassembler:
    """Puts fragmented frames back together; whole frames pass straight through to ``decode``.

    Memory is bounded whatever arrives: a frame larger than ``max_frame_bytes`` is rejected at its
    first fragment, at most ``max_pending`` frames are held (the oldest is dropped, and counted as
    expired, to make room), and a frame not complete ``timeout_s`` after its first fragment is
    dropped and counted. Each chunk is copied once, into a 64-byte-aligned buffer that the
    decoded frame then views.
    """

    def __init__(self, max_frame_bytes: int = 256 << 20, max_pending: int = 8, timeout_s: float = 5.0) -> None:
        if max_frame_bytes <= 0 or max_pending <= 0 or timeout_s <= 0:
            raise ValueError("max_frame_bytes, max_pending and timeout_s must be positive")
        self.max_frame_bytes = int(max_frame_bytes)
        self.max_pending = int(max_pending)
        self.timeout_s = float(timeout_s)
        self._pending: "OrderedDict[tuple, _Pending]" = OrderedDict()
        self._done: "OrderedDict[tuple, None]" = OrderedDict()   # recently completed keys
        self.completed = 0
        self.expired = 0
        self.duplicates = 0
        self.rejected = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_keys(self) -> List[tuple]:
        """(publisher_id, frame_id) of every frame still being put together."""
        return list(self._pending)

    def stats(self) -> dict:
        return {"completed": self.completed, "expired": self.expired, "duplicates": self.duplicates,
                "rejected": self.rejected, "pending": len(self._pending)}

    def expire(self, now: Optional[float] = None) -> int:
        """Drop the pending frames whose time is up; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        while self._pending:
            key, p = next(iter(self._pending.items()))
            if p.deadline > now:
                break          # insertion order is deadline order
            del self._pending[key]
            n += 1
        self.expired += n
        return n

    def feed(self, buf: Any) -> Optional[Any]:
        """Take one message: returns the decoded Frame once it is whole, else None.

        Raises FrameError for a malformed whole frame or fragment (counted in ``rejected``).
        """
        if self._pending:
            self.expire()
        if not is_fragment(buf):
            n = len(buf) if type(buf) is bytes else memoryview(buf).nbytes
            if n > self.max_frame_bytes:
                self.rejected += 1
                raise FrameError(f"frame of {n} bytes exceeds max_frame_bytes {self.max_frame_bytes}")
            try:
                f = decode(buf)
            except FrameError:
                self.rejected += 1
                raise
            self.completed += 1
            return f
        try:
            frame_id, pub_id, index, count, total, offset, chunk_size, chunk = impl.parse_fragment_header(buf)
        except FrameError:
            self.rejected += 1
            raise
        key = (pub_id, frame_id)
        p = self._pending.get(key)
        if p is None:
            if key in self._done:
                self.duplicates += 1
                return None
            err = self._check_geometry(count, total, chunk_size)
            if err:
                self.rejected += 1
                raise FrameError(err)
            while len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.expired += 1
            p = _Pending()
            # over-allocate by one alignment unit, then start the frame on a 64-byte boundary
            raw = np.empty(total + S.ALIGN, dtype=np.uint8)
            start = (-raw.ctypes.data) % S.ALIGN
            p.buf = raw[start:start + total]
            p.view = memoryview(p.buf)
            p.got = bytearray(count)
            p.remaining, p.count, p.total, p.chunk = count, count, total, chunk_size
            p.deadline = time.monotonic() + self.timeout_s
            self._pending[key] = p
        elif (count, total, chunk_size) != (p.count, p.total, p.chunk):
            self.rejected += 1
            raise FrameError(f"fragment {index} of frame {frame_id} disagrees with the frame's geometry")
        expect_len = min(chunk_size, total - index * chunk_size) if index < count else -1
        if index >= count or offset != index * chunk_size or len(chunk) != expect_len:
            self.rejected += 1
            raise FrameError(f"fragment {index}/{count} of frame {frame_id}: offset {offset} or length "
                             f"{len(chunk)} does not fit chunk size {chunk_size} and total {total}")
        if p.got[index]:
            self.duplicates += 1
            return None
        p.view[offset:offset + len(chunk)] = chunk
        p.got[index] = 1
        p.remaining -= 1
        if p.remaining:
            return None
        del self._pending[key]
        self._done[key] = None
        if len(self._done) > 4 * self.max_pending + 64:
            self._done.popitem(last=False)
        try:
            f = decode(p.buf)
        except FrameError:
            self.rejected += 1
            raise
        self.completed += 1
        return f

    def _check_geometry(self, count: int, total: int, chunk_size: int) -> str:
        if total > self.max_frame_bytes:
            return f"fragmented frame of {total} bytes exceeds max_frame_bytes {self.max_frame_bytes}"
        if chunk_size == 0 or total == 0 or count != -(-total // chunk_size):
            return f"fragment geometry count={count} total={total} chunk_size={chunk_size} is inconsistent"
        return ""
