"""Frame codec: encode/decode sensor frames, split them into fragments and put them back together,
and pack small frames into batch containers (one broker message for many frames) and out again.

The ``Reassembler`` holds a hard memory bound whatever arrives (see its docstring); one daemon
thread per process, started with the first fragmented frame, drops timed-out frames on time.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
    overload,
)

import numpy as np

from . import _schema as S
from ._impl import HAS_EXTENSIONS, impl
from .errors import FrameError

log = logging.getLogger("msight_fast")

if TYPE_CHECKING:
    # The compiled core's stub is the typed surface. At run time the names below are impl's own
    # objects (compiled core or twin), not wrappers: decode is the compiled function itself.
    from typing_extensions import Buffer

    from ._ext._wire import BufferLike, Frame, crc32c, decode, encode, encode_parts, frame_for, stamp_parts
else:
    Frame = impl.Frame
    encode = impl.encode
    encode_parts = impl.encode_parts
    stamp_parts = impl.stamp_parts
    frame_for = impl.frame_for
    decode = impl.decode
    crc32c = impl.crc32c

_B = TypeVar("_B", bound="BufferLike")

__all__ = ["Frame", "encode", "encode_parts", "stamp_parts", "frame_for", "decode", "crc32c", "fragment", "Reassembler",
           "is_fragment", "fragment_key", "frame_key", "HAS_EXTENSIONS", "FrameError",
           "BATCH_MAGIC", "MAX_BATCH_COUNT", "BatchWriter", "BatchCursor", "batch_size", "batch_spans", "batch_frames",
           "is_batch", "pack_batch", "unpack_batch"]


def _head(buf: Any, n: int) -> bytes:
    """The first ``n`` bytes of any buffer, whatever its shape or item format."""
    if type(buf) is bytes:
        return buf[:n]
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        try:
            mv = mv.cast("B")
        except TypeError:                     # not contiguous, or empty with a zero in its shape
            return b""                        # not a fragment: decode says what is wrong with it
    return bytes(mv[:n])


def is_fragment(buf: Any) -> bool:
    """True when ``buf`` starts with the fragment magic (else it should be a whole frame)."""
    if type(buf) is bytes:                    # what every backend hands over: no view needed
        return buf[:4] == S.FRAG_MAGIC
    return _head(buf, 4) == S.FRAG_MAGIC


def fragment_key(buf: Any) -> Tuple[int, int]:
    """(publisher_id, frame_id) of a fragment, unchecked: the ids of the frame it belongs to.

    The fragment header's layout is known here only (see docs/wire-format.md); ``buf`` must be
    at least the 64-byte fragment header long (``is_fragment`` said so, or the caller checked).
    """
    h = _head(buf, S.FRAG_HEADER_LEN)
    return (int.from_bytes(h[16:24], "little"), int.from_bytes(h[8:16], "little"))


def frame_key(buf: Any) -> Tuple[int, int, int, int, int, int]:
    """(publisher_id, frame_id, count, total, chunk_size, sending) of a fragment, unchecked: the
    key under which a Reassembler puts its frame together (two frames may share ids, not the
    whole key; ``sending`` is the frame's header CRC, 0 in fragments before 1.1)."""
    h = _head(buf, S.FRAG_HEADER_LEN)
    return (int.from_bytes(h[16:24], "little"), int.from_bytes(h[8:16], "little"),
            int.from_bytes(h[28:32], "little"), int.from_bytes(h[32:40], "little"),
            int.from_bytes(h[48:52], "little"), int.from_bytes(h[56:60], "little"))


if TYPE_CHECKING:
    def _view(buf: BufferLike) -> memoryview:
        # an ndarray is a buffer on every Python; numpy's stubs say so only from 3.12 on
        return memoryview(cast("Buffer", buf))
else:
    _view = memoryview


def _frame_ids(frame_bytes: memoryview) -> Tuple[int, int, int]:
    # frame_id, publisher_id and the header CRC key the fragments; taken unchecked, decode
    # validates the whole. The CRC covers seq and publish_ts_ns, so each sending of one Frame
    # (published again, or retried after a give-up) is a frame of its own to the receiver
    if len(frame_bytes) >= S.FIXED_LEN and frame_bytes[:4] == S.MAGIC:
        return (int.from_bytes(frame_bytes[40:48], "little"), int.from_bytes(frame_bytes[56:64], "little"),
                int.from_bytes(frame_bytes[12:16], "little"))
    return (S.new_frame_id(), 0, 0)


def fragment_views(frame_bytes: Sequence[BufferLike], max_size: int) -> Tuple[int, Iterator[List[Any]]]:
    """The fragments of an encoded frame of more than ``max_size`` bytes (given as the parts
    ``encode_parts`` returned) without copying it: their count, and an iterator that makes each
    in turn (its CRC is computed then, so the first can go before the last is ready) as a list
    of its 64-byte header (``bytes``) and views of the parts that make its chunk, to be written
    back to back. The views pin the parts, which must not change until the fragments are
    written. Raises FrameError at once where ``max_size`` cannot carry the frame (see ``fragment``)."""
    parts = [_view(p).cast("B") for p in frame_bytes]
    total = sum(len(p) for p in parts)
    chunk = max_size - S.FRAG_HEADER_LEN
    if chunk < 1:
        raise ValueError(f"max_size {max_size} leaves no room after the {S.FRAG_HEADER_LEN}-byte fragment header")
    chunk = min(chunk, 0xFFFFFFFF)
    count = -(-total // chunk)
    if count > S.MAX_FRAGMENT_COUNT:
        # receivers reject more (their per-frame map of received chunks is bounded by it)
        least = -(-total // S.MAX_FRAGMENT_COUNT) + S.FRAG_HEADER_LEN
        raise FrameError(f"a frame of {total} bytes would need {count} fragments of at most {max_size} bytes, "
                         f"over the {S.MAX_FRAGMENT_COUNT} allowed; max_size must be at least {least}")
    frame_id, pub_id, sending = _frame_ids(parts[0] if len(parts[0]) >= S.FIXED_LEN else memoryview(b"".join(parts)))

    def each() -> Iterator[List[Any]]:
        k, pos = 0, 0                   # current part, position in it
        for i in range(count):
            want = min(chunk, total - i * chunk)
            pieces: List[Any] = []
            while want:
                p = parts[k]
                take = min(want, len(p) - pos)
                if take:
                    pieces.append(p[pos:pos + take])
                pos += take
                want -= take
                if pos == len(p):
                    k, pos = k + 1, 0
            yield [impl.pack_fragment_header(frame_id, pub_id, i, count, total, i * chunk, chunk, pieces, sending),
                   *pieces]
    return count, each()


@overload
def fragment(frame_bytes: Sequence[BufferLike], max_size: int) -> List[bytes]: ...
@overload
def fragment(frame_bytes: _B, max_size: int) -> List[Union[bytes, _B]]: ...
def fragment(frame_bytes: Union[BufferLike, Sequence[BufferLike]], max_size: int) -> List[Any]:
    """Split an encoded frame into self-describing fragments of at most ``max_size`` bytes.

    ``frame_bytes`` is the encoded frame, or the list its ``encode_parts`` returned: fragments are
    then gathered from the parts directly, one copy of the frame in all instead of two.
    A frame that already fits is returned whole, as the only element: no fragment overhead.
    Each fragment is a 64-byte header (frame id, publisher id, index, count, total size,
    offset, chunk size, CRC32C) followed by its chunk; see docs/wire-format.md.
    """
    parts = [_view(p).cast("B") for p in frame_bytes] if isinstance(frame_bytes, (list, tuple)) \
        else [_view(cast("BufferLike", frame_bytes)).cast("B")]
    total = sum(len(p) for p in parts)
    if total <= max_size:
        return [frame_bytes if len(parts) == 1 and not isinstance(frame_bytes, (list, tuple))
                else b"".join(parts)]
    return [b"".join(f) for f in fragment_views(parts, max_size)[1]]


# -- batch containers (docs/wire-format.md, sections 2a and 2b)
BATCH_MAGIC = S.BATCH_MAGIC
BATCH_HEADER_LEN = S.BATCH_HEADER_LEN
BATCH_ALIGN = 8              # every frame starts at a multiple of 8 from the container's start
MAX_BATCH_COUNT = S.MAX_BATCH_COUNT
_BATCH_HEAD = struct.Struct("<4sBBHIIQ")
assert _BATCH_HEAD.size == BATCH_HEADER_LEN
_PAD = tuple(b"\0" * i for i in range(BATCH_ALIGN))


def _align8(n: int) -> int:
    return (n + 7) & -8


def batch_size(lengths: Sequence[int]) -> int:
    """The length of the container that holds frames of these lengths (padding included)."""
    return _align8(BATCH_HEADER_LEN + 4 * len(lengths)) + sum(_align8(n) for n in lengths)


def is_batch(buf: Any) -> bool:
    """True when ``buf`` starts with the batch magic."""
    if type(buf) is bytes:
        return buf[:4] == BATCH_MAGIC
    return _head(buf, 4) == BATCH_MAGIC


def _assemble(lengths: List[int], pieces: List[Any], total: int) -> bytes:
    """Header, index and the frames' pieces (their padding included) as one container: the one copy."""
    count = len(lengths)
    if not 1 <= count <= MAX_BATCH_COUNT:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_COUNT} frames, not {count}")
    index = struct.pack(f"<{count}I", *lengths)
    index_end = BATCH_HEADER_LEN + 4 * count
    head = _BATCH_HEAD.pack(BATCH_MAGIC, 1, 0, 0, count, 0, total)
    crc = crc32c(index, crc32c(head[16:], crc32c(head[:12])))
    head = _BATCH_HEAD.pack(BATCH_MAGIC, 1, 0, 0, count, crc, total)
    return b"".join([head, index, _PAD[_align8(index_end) - index_end], *pieces])


def pack_batch(frames: Sequence[Sequence[BufferLike]], *, shared: bool = False) -> bytes:
    """One batch container of whole frames, each given as its ``encode_parts`` list (or a
    one-item list of its encoded bytes). Each frame is copied once, into the container. With
    ``shared``, frames that differ only in their ids, times, lengths and CRCs share frame 0's
    header (docs/wire-format.md 2b), when there are two or more; otherwise each goes whole.

    Raises ValueError for an empty list, more than ``MAX_BATCH_COUNT`` frames, or an item that
    does not start with the frame magic (a fragment or a batch cannot go inside a batch).
    """
    lengths: List[int] = []
    pieces: List[Any] = []
    for parts in frames:
        views = [p if type(p) is bytes else _view(p).cast("B") for p in parts]
        n = sum(len(v) for v in views)
        if n < S.FIXED_LEN or bytes(views[0][:4]) != S.MAGIC:
            raise ValueError(f"item {len(lengths)} is not an encoded frame (a batch holds whole frames only)")
        lengths.append(n)
        pieces.extend(views)
        if n & 7:
            pieces.append(_PAD[8 - (n & 7)])
    if shared and 2 <= len(lengths) <= MAX_BATCH_COUNT:
        whole = [b"".join(p if type(p) is bytes else _view(p).cast("B") for p in parts) for parts in frames]
        t = _template_len(whole[0])
        if t and all(_shares(f, whole[0], t) for f in whole[1:]):
            return _pack_shared(whole, t)
    return _assemble(lengths, pieces, batch_size(lengths))


# ---- shared-header batches (docs/wire-format.md 2b)
_SHARED_HEAD = struct.Struct("<4sBBHIIQHHI")
assert _SHARED_HEAD.size == S.SHARED_HEAD_LEN
_M64 = (1 << 64) - 1
_MIN_ENTRY = 18              # header CRC, frame id and six one-byte varints


def _template_len(frame: bytes) -> int:
    """The shared header's length if ``frame`` can lend its header to a batch, else 0."""
    t = int.from_bytes(frame[24:32], "little")
    ok = 128 <= t <= S.MAX_SHARED_TEMPLATE and not t & 63 and len(frame) >= t
    return t if ok and int.from_bytes(frame[32:40], "little") == len(frame) - t else 0


def _shares(frame: bytes, first: bytes, t: int) -> bool:
    """True when ``frame``'s header is ``first``'s but for the fields a shared batch's entry
    carries: header CRC (12), payload CRC (20), payload length, frame id, seq (32-56), times (64-88);
    and its payload length says what follows its header (the entry's length is what follows)."""
    return (len(frame) >= t and frame[:12] == first[:12] and frame[16:20] == first[16:20]
            and frame[24:32] == first[24:32] and frame[56:64] == first[56:64] and frame[88:t] == first[88:t]
            and int.from_bytes(frame[32:40], "little") == len(frame) - t)


def _uvarint(out: bytearray, v: int) -> None:
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _zigzag(d: int) -> int:
    """The difference ``d`` (mod 2**64), read as a signed 64-bit number, zigzag-coded."""
    d &= _M64
    return ((d << 1) & _M64) if d < 1 << 63 else (((_M64 - d) << 1) | 1)


def _unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else (_M64 - (z >> 1))


def _pack_shared(frames: List[bytes], t: int) -> bytes:
    first = frames[0]
    ent = bytearray()
    prev = struct.unpack_from("<Q8xQQQ", first, 48)          # seq, capture, creation, publish
    for f in frames[1:]:
        ent += f[12:16]
        ent += f[40:48]
        _uvarint(ent, len(f) - t)
        cur = struct.unpack_from("<Q8xQQQ", f, 48)
        for a, b in zip(cur, prev):
            _uvarint(ent, _zigzag(a - b))
        _uvarint(ent, int.from_bytes(f[20:24], "little"))
        prev = cur
    total = S.SHARED_HEAD_LEN + t + len(ent) + sum(len(f) - t for f in frames)
    minor = S.SHARED_VERSION_MINOR
    head = _SHARED_HEAD.pack(BATCH_MAGIC, 1, minor, S.BATCH_SHARED, len(frames), 0, total, t, 0, len(ent))
    crc = crc32c(ent, crc32c(first[:t], crc32c(head[16:], crc32c(head[:12]))))
    head = _SHARED_HEAD.pack(BATCH_MAGIC, 1, minor, S.BATCH_SHARED, len(frames), crc, total, t, 0, len(ent))
    return b"".join([head, first[:t], ent, *(memoryview(f)[t:] for f in frames)])


def _read_uvarint(chk: Any, pos: int, end: int, i: int) -> Tuple[int, int]:
    """(value, position after it); FrameError for one that runs past ``end``, is longer than 10
    bytes, exceeds 64 bits or is not in its shortest form."""
    v, k, p = 0, 0, pos
    while True:
        if p >= end:
            raise FrameError(f"bad varint in batch entry {i} at offset {pos}")
        b = chk[p]
        p += 1
        if k == 9 and b > 1:
            raise FrameError(f"bad varint in batch entry {i} at offset {pos}")
        v |= (b & 0x7F) << (7 * k)
        if not b & 0x80:
            if k and not b:
                raise FrameError(f"bad varint in batch entry {i} at offset {pos}")
            return v, p
        k += 1


def _shared_frames(chk: Any, n: int, count: int, max_bytes: Optional[int] = None) -> List[bytes]:
    """The frames of a shared-header batch whose first 24 bytes ``batch_spans``'s rules passed,
    rebuilt each as its own bytes; every rule of docs/wire-format.md 2b checked first, and their
    total (``count`` x the header plus the payloads) against ``max_bytes``."""
    hl = S.SHARED_HEAD_LEN
    if n < hl:
        raise FrameError(f"truncated shared-header batch: {n} bytes, its header needs {hl} (at offset {n})")
    _m, _a, _b, _f, _c, crc, total, t, _r, e = _SHARED_HEAD.unpack_from(chk, 0)
    if t & 63 or not 128 <= t <= S.MAX_SHARED_TEMPLATE:
        raise FrameError(f"shared header length {t} at offset 24 is not a multiple of 64 in "
                         f"[128, {S.MAX_SHARED_TEMPLATE}]")
    body = hl + t + e
    if body > n:
        raise FrameError(f"shared header and entries ({t} + {e} bytes, at offset 24) run past the {n}-byte message")
    if crc32c(chk[16:body], crc32c(chk[:12])) != crc:
        raise FrameError("batch header CRC32C mismatch at offset 12")
    if total != n:
        raise FrameError(f"batch total {total} at offset 16 differs from the message length {n}")
    if (count - 1) * _MIN_ENTRY > e:
        raise FrameError(f"batch count {count} at offset 8 needs at least {(count - 1) * _MIN_ENTRY} bytes of "
                         f"entries, not {e}")
    if bytes(chk[hl:hl + 4]) != S.MAGIC:
        raise FrameError(f"batch template at offset {hl} is not a frame header (magic {bytes(chk[hl:hl + 4])!r})")
    poff, plen = struct.unpack_from("<QQ", chk, hl + 24)
    if poff != t:
        raise FrameError(f"template payload offset {poff} at offset {hl + 24} differs from the shared header "
                         f"length {t}")
    avail = n - body
    if max_bytes is not None and count * t + avail > max(0, max_bytes):   # exact once the rules below pass
        raise FrameError(f"batch of {count} frames would rebuild to {count * t + avail} bytes, over the "
                         f"limit of {max(0, max_bytes)}")
    if plen > avail:
        raise FrameError(f"frame 0's payload of {plen} bytes (length at offset {hl + 32}) runs past the message")
    used = plen
    entries = []
    pos = hl + t
    seq, cap, cre, pub = struct.unpack_from("<Q8xQQQ", chk, hl + 48)
    for i in range(1, count):
        start = pos
        if pos + 12 > body:
            raise FrameError(f"batch entry {i} at offset {pos} runs past the entries' end {body}")
        hcrc, fid = struct.unpack_from("<IQ", chk, pos)
        pos += 12
        ln, pos = _read_uvarint(chk, pos, body, i)
        z, pos = _read_uvarint(chk, pos, body, i)
        seq = (seq + _unzigzag(z)) & _M64
        z, pos = _read_uvarint(chk, pos, body, i)
        cap = (cap + _unzigzag(z)) & _M64
        z, pos = _read_uvarint(chk, pos, body, i)
        cre = (cre + _unzigzag(z)) & _M64
        z, pos = _read_uvarint(chk, pos, body, i)
        pub = (pub + _unzigzag(z)) & _M64
        at = pos
        pcrc, pos = _read_uvarint(chk, pos, body, i)
        if pcrc > 0xFFFFFFFF:
            raise FrameError(f"payload CRC {pcrc} in batch entry {i} at offset {at} exceeds 32 bits")
        if ln > avail - used:
            raise FrameError(f"batch entry {i}'s payload of {ln} bytes runs past the message (entry at offset {start})")
        used += ln
        entries.append((hcrc, pcrc, ln, fid, seq, cap, cre, pub))
    if pos != body:
        raise FrameError(f"{body - pos} bytes after the last batch entry (at offset {pos})")
    if used != avail:
        raise FrameError(f"{avail - used} bytes after the last payload (at offset {body + used})")
    tmpl = bytes(chk[hl:hl + t])
    out = [tmpl + bytes(chk[body:body + plen])]
    at = body + plen
    head = bytearray(tmpl)
    for hcrc, pcrc, ln, fid, seq, cap, cre, pub in entries:
        struct.pack_into("<I", head, 12, hcrc)
        struct.pack_into("<I", head, 20, pcrc)
        struct.pack_into("<QQQ", head, 32, ln, fid, seq)
        struct.pack_into("<QQQ", head, 64, cap, cre, pub)
        out.append(bytes(head) + bytes(chk[at:at + ln]))
        at += ln
    return out


class _BatchWriter:
    """Frames gathered for one batch container (the twin of the compiled ``BatchWriter``). Each
    frame is copied when added (unless it is ``bytes`` already), so the caller's buffers are free
    again once ``add`` returns; ``pack`` copies them once more, into the container. ``count`` and
    ``size`` (the length of the container ``pack`` would make now) are plain attributes: a
    producer reads them per frame. With ``shared`` set, ``pack`` makes a shared-header batch
    (docs/wire-format.md 2b) when every frame added can share the first one's header; ``size``
    is the whole-frames layout's length either way, which the shared one never exceeds."""

    __slots__ = ("pieces", "lengths", "body", "count", "size", "shared", "_t")

    def __init__(self) -> None:
        self.pieces: List[bytes] = []      # the frames, each followed by its padding
        self.lengths: List[int] = []
        self.body = 0                      # bytes of the frames and their padding
        self.count = 0
        self.size = _align8(BATCH_HEADER_LEN)
        self.shared = False
        self._t = 0                        # the shared header's length while the frames share it, else 0

    def clear(self) -> None:
        """Empty again (the compiled writer keeps its grown buffers for the next batch)."""
        self.pieces = []
        self.lengths = []
        self.body = 0
        self.count = 0
        self.size = _align8(BATCH_HEADER_LEN)
        self._t = 0

    def size_with(self, nbytes: int) -> int:
        """The container's length with one more frame of ``nbytes``."""
        return ((BATCH_HEADER_LEN + 11 + 4 * self.count) & -8) + self.body + ((nbytes + 7) & -8)

    def add(self, parts: Sequence[BufferLike]) -> int:
        """Add one encoded frame (its ``encode_parts`` list, or its bytes as a one-item list);
        returns the container's new ``size``."""
        if self.count >= MAX_BATCH_COUNT:
            raise ValueError(f"a batch holds at most {MAX_BATCH_COUNT} frames")
        if not parts:
            raise ValueError("not an encoded frame (a batch holds whole frames only)")
        first = parts[0]
        # an ndarray part is a buffer; numpy's stubs say so only from Python 3.12 on
        data = first if len(parts) == 1 and type(first) is bytes else b"".join(parts)  # type: ignore[arg-type]
        n = len(data)
        if n < S.FIXED_LEN or data[:4] != S.MAGIC:
            raise ValueError("not an encoded frame (a batch holds whole frames only)")
        if not self.count:
            self._t = _template_len(data)
        elif self._t and not _shares(data, self.pieces[0], self._t):
            self._t = 0
        self.pieces.append(data)
        self.lengths.append(n)
        pad = -n & 7
        if pad:
            self.pieces.append(_PAD[pad])
        self.body += n + pad
        self.count += 1
        self.size = ((BATCH_HEADER_LEN + 7 + 4 * self.count) & -8) + self.body
        return self.size

    def stamp_add(self, frame: Frame, seq: int, publisher_id: int, checksum: bool, cap: int, limit: int) -> int:
        """``add(stamp_parts(frame, seq, publisher_id, checksum))`` in one call, when the encoded
        frame is at most ``cap`` bytes, the container with it at most ``limit`` and the batch not
        full; returns the new ``size``, or 0 with nothing added (the frame is stamped either way)."""
        parts = stamp_parts(frame, seq, publisher_id, checksum)
        n = len(parts[0]) + frame.nbytes
        if n > cap or self.count >= MAX_BATCH_COUNT or self.size_with(n) > limit:
            return 0
        return self.add(parts)

    def frames(self) -> List[bytes]:
        """The frames added, in order, without their padding."""
        return [p for p in self.pieces if len(p) >= S.FIXED_LEN]

    def first(self) -> bytes:
        """The first frame added (a batch of one goes out as that frame alone)."""
        if not self.count:
            raise ValueError("an empty batch has no first frame")
        return self.pieces[0]

    def pack(self) -> bytes:
        """The container: shared-header (2b) when ``shared`` is set and the frames allow it,
        else whole frames (2a)."""
        if self.shared and self._t and self.count > 1:
            return _pack_shared(self.frames(), self._t)
        return _assemble(self.lengths, self.pieces, self.size)


class _BatchCursor:
    """A source's decoded batch, handed on frame by frame (the twin of the compiled
    ``BatchCursor``): ``frames`` and the index ``i`` of the next."""

    __slots__ = ("frames", "i")

    def __init__(self) -> None:
        self.frames: List[Any] = []
        self.i = 0


if TYPE_CHECKING:
    from ._ext._wire import BatchCursor, BatchWriter
    from ._ext._wire import RecvLane as _RecvLane
    from ._ext._wire import SmallLane as _SmallLane
    SmallLane: Optional[Type[_SmallLane]]
    RecvLane: Optional[Type[_RecvLane]]
else:
    # compiled: each frame copied into one growing buffer, no Python work per frame beyond the call
    BatchWriter = impl.BatchWriter if HAS_EXTENSIONS else _BatchWriter
    # Bus.publish's common case on Kafka in one call: compiled only (the twin goes the usual way,
    # which is what the lane is tested against)
    SmallLane = impl.SmallLane if HAS_EXTENSIONS else None
    # and Subscription.recv's: a batch's next frame (the twin's cursor is a plain object)
    RecvLane = impl.RecvLane if HAS_EXTENSIONS else None
    BatchCursor = impl.BatchCursor if HAS_EXTENSIONS else _BatchCursor


def batch_spans(buf: BufferLike) -> List[Tuple[int, int]]:
    """(start, end) of each frame in a batch container, every rule of docs/wire-format.md 2a
    checked first: FrameError (naming the offset) for anything malformed, or for a shared-header
    batch (2b), whose frames are rebuilt by ``batch_frames`` and have no spans. Nothing is
    allocated before the count is known to fit the buffer; the frames' own headers are left to
    ``decode``."""
    chk, n, count, flags = _batch_head(buf)
    if flags & S.BATCH_SHARED:
        raise FrameError("a shared-header batch (flags at offset 6) has no spans: its frames are rebuilt by "
                         "batch_frames")
    return _spans(chk, n, count)


def _batch_head(buf: BufferLike) -> Tuple[Any, int, int, int]:
    """(buffer to read, its length, count, flags) of a batch container whose first 24 bytes
    pass the rules both layouts share."""
    if type(buf) is bytes:
        chk: Any = buf
        n = len(buf)
    else:
        chk = _view(buf)
        if not chk.c_contiguous:               # the compiled batch_frames' check and message
            raise FrameError("the buffer is not C-contiguous")
        if chk.ndim != 1 or chk.format != "B":    # 'b' and 'c' items read as signed or as bytes
            try:
                chk = chk.cast("B")
            except TypeError:
                raise FrameError("a batch must be a contiguous buffer of bytes") from None
        n = chk.nbytes
    if n < BATCH_HEADER_LEN:
        raise FrameError(f"truncated batch: {n} bytes, its header needs {BATCH_HEADER_LEN} (at offset {n})")
    magic, major, _minor, flags, count, _crc, _total = _BATCH_HEAD.unpack_from(chk, 0)
    if magic != BATCH_MAGIC:
        raise FrameError(f"bad batch magic {magic!r} at offset 0 (expected {BATCH_MAGIC!r})")
    if major != 1:
        raise FrameError(f"unsupported batch major version {major} at offset 4 (this reader knows 1)")
    if not 1 <= count <= MAX_BATCH_COUNT:
        raise FrameError(f"batch count {count} at offset 8 out of range [1, {MAX_BATCH_COUNT}]")
    return chk, n, count, flags


def _spans(chk: Any, n: int, count: int) -> List[Tuple[int, int]]:
    crc, total = struct.unpack_from("<IQ", chk, 12)
    index_end = BATCH_HEADER_LEN + 4 * count
    if index_end > n:
        raise FrameError(f"batch index of {count} lengths runs past the {n}-byte message "
                         f"(at offset {BATCH_HEADER_LEN})")
    if crc32c(chk[16:index_end], crc32c(chk[:12])) != crc:
        raise FrameError("batch header CRC32C mismatch at offset 12")
    if total != n:
        raise FrameError(f"batch total {total} at offset 16 differs from the message length {n}")
    lengths = struct.unpack_from(f"<{count}I", chk, BATCH_HEADER_LEN)   # count * 4 <= n: bounded by the buffer
    pos = _align8(index_end)
    if pos > n or (pos != index_end and chk[index_end:pos] != _PAD[pos - index_end]):
        raise FrameError(f"batch padding at offset {index_end} is truncated or not zero")
    spans: List[Tuple[int, int]] = []
    magic4 = S.MAGIC
    for i, ln in enumerate(lengths):
        end = pos + ln
        nxt = (end + 7) & -8
        if ln < S.FIXED_LEN or nxt > n:
            raise FrameError(f"batch frame {i} of {ln} bytes at offset {pos} (length at offset "
                             f"{BATCH_HEADER_LEN + 4 * i}) is shorter than a frame header or runs past the message")
        if chk[pos:pos + 4] != magic4:
            raise FrameError(f"batch frame {i} at offset {pos} is not a frame (magic "
                             f"{bytes(chk[pos:pos + 4])!r}): a batch holds whole frames only")
        if nxt != end and chk[end:nxt] != _PAD[nxt - end]:
            raise FrameError(f"non-zero batch padding after frame {i}, at offset {end}")
        spans.append((pos, end))
        pos = nxt
    if pos != n:
        raise FrameError(f"{n - pos} bytes after the last batch frame (at offset {pos})")
    return spans


def _batch_frames(buf: BufferLike, *, max_bytes: Optional[int] = None) -> List[bytes]:
    """The twin of the compiled ``batch_frames``: ``batch_spans``, then each frame copied (or,
    for a shared-header batch, rebuilt, its frames' total at most ``max_bytes``)."""
    chk, n, count, flags = _batch_head(buf)
    if flags & S.BATCH_SHARED:
        return _shared_frames(chk, n, count, max_bytes)
    spans = _spans(chk, n, count)
    if type(buf) is bytes:
        return [buf[a:b] for a, b in spans]
    mv = _view(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")                      # batch_spans has checked that it casts
    return [bytes(mv[a:b]) for a, b in spans]


if TYPE_CHECKING:
    from ._ext._wire import batch_frames
else:
    # the frames of a batch container, each its own bytes; FrameError as batch_spans raises it
    batch_frames = impl.batch_frames if HAS_EXTENSIONS else _batch_frames


def unpack_batch(buf: BufferLike) -> List[memoryview]:
    """The frames of a batch container as read-only views into it (no copy; for a shared-header
    batch, views of the rebuilt frames); FrameError for a malformed container (see
    ``batch_spans``). Decode each with ``decode``, which checks the frame itself."""
    chk, n, count, flags = _batch_head(buf)
    if flags & S.BATCH_SHARED:
        return [memoryview(f) for f in _shared_frames(chk, n, count)]
    spans = _spans(chk, n, count)
    mv = _view(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    mv = mv.toreadonly()
    return [mv[a:b] for a, b in spans]


_Key = Tuple[int, int, int, int, int, int]   # publisher_id, frame_id, count, total, chunk_size, sending

# Upper bounds used by Reassembler.memory_bound, in bytes. Per pending frame, besides its buffer
# and its map of received chunks: the numpy array and view, the memoryview, the bytearray header,
# the entry and its key (under 2 KiB together), and the page the buffer's allocation may round up to.
_ENTRY_OVERHEAD = 8192
# One key remembered by the LRUs of completed and abandoned frames: tuple, 64-bit ints, the dict's
# slot and its share of the table, the order link (about 530 measured with the largest ids).
_KEY_COST = 1024


class _Pending:
    __slots__ = ("buf", "view", "got", "remaining", "deadline")
    buf: np.ndarray
    view: memoryview
    got: bytearray
    remaining: int
    deadline: float


class Reassembler:
    """Puts fragmented frames back together; whole frames pass straight through to ``decode``.

    Every fragment is checked whole (CRC, then geometry: ``1 <= total <= max_frame_bytes``,
    ``count == ceil(total / chunk_size) <= MAX_FRAGMENT_COUNT``, index, offset and length that
    tile the frame) before anything is allocated; a rejected fragment leaves nothing behind.
    Frames are keyed by ``(publisher_id, frame_id, count, total, chunk_size, sending)``, so a
    forged fragment that reuses a real frame's ids with another geometry gets an entry of its own
    and cannot spoil the real frame. ``sending`` is the frame's header CRC (fragments from 1.1
    on), which a frame made must match: a Frame published again, or retried after a publish gave
    up part way, is a frame of its own, not a duplicate of the last sending or a forged copy.

    Room: at most ``max_pending`` frames are pending, at most ``max_pending_per_publisher`` of
    one publisher. A publisher at its quota, or holding frames when every slot is taken, makes
    room by evicting its own oldest frame (``evicted``); a new frame finding every slot held by
    other publishers is refused
    (``refused``), so no sender can push out another's frames. A frame not complete
    ``timeout_s`` after its first fragment is dropped on the clock by a shared daemon thread,
    even if nothing else arrives (``expired``). Fragments that arrive after their frame was
    refused, evicted or expired are dropped and counted in ``refused``, but its first fragment
    again starts it over (a re-delivery, as a Kafka consumer group makes after a rebalance).
    Two different copies of one fragment drop the frame (``rejected``): one of them is forged,
    and a frame partly made of forged bytes must not be handed over.

    Memory held is at most ``memory_bound`` bytes, whatever arrives::

        max_pending x (max_frame_bytes + 64 + MAX_FRAGMENT_COUNT + 8192)
          + 2 x (4 x max_pending + 64) x 1024

    (per pending frame: its buffer, total + 64 bytes, whose pages are only touched as chunks
    arrive; its map of received chunks, count <= 65536 bytes; 8 KiB of objects and allocation
    rounding. Then the two bounded LRUs of recently completed and abandoned frame keys.) A
    completed frame's buffer belongs to the Frame returned, outside the bound. Each chunk is
    copied once, into a 64-byte-aligned buffer that the decoded frame then views.

    ``feed`` is called by one thread at a time (the Subscription's receiving thread);
    ``expire``, ``stats`` and ``pending_keys`` may be called from any thread.
    """

    def __init__(self, max_frame_bytes: int = 256 << 20, max_pending: int = 8, timeout_s: float = 5.0, *,
                 max_pending_per_publisher: Optional[int] = None) -> None:
        if max_frame_bytes <= 0 or max_pending <= 0 or timeout_s <= 0:
            raise ValueError("max_frame_bytes, max_pending and timeout_s must be positive")
        self.max_frame_bytes = int(max_frame_bytes)
        self.max_pending = int(max_pending)
        self.timeout_s = float(timeout_s)
        per_pub = max(1, self.max_pending // 2) if max_pending_per_publisher is None \
            else int(max_pending_per_publisher)
        if not 1 <= per_pub <= self.max_pending:
            raise ValueError(f"max_pending_per_publisher must be between 1 and max_pending ({self.max_pending})")
        self.max_pending_per_publisher = per_pub
        self._keep = 4 * self.max_pending + 64              # keys each LRU remembers
        # guards _pending, _per_pub, _abandoned, _done, _watched and the counters expire() touches;
        # the whole-frame path of feed() never takes it
        self._lock = threading.Lock()
        self._pending: OrderedDict[_Key, _Pending] = OrderedDict()   # oldest first: deadline order
        self._per_pub: Dict[int, int] = {}
        self._done: OrderedDict[_Key, None] = OrderedDict()        # recently completed
        self._abandoned: OrderedDict[_Key, None] = OrderedDict()   # recently refused, evicted, expired
        self._ref = weakref.ref(self)
        self._watched = False                               # by the reaper thread
        self.completed = 0
        self.expired = 0
        self.evicted = 0
        self.refused = 0
        self.duplicates = 0
        self.rejected = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def memory_bound(self) -> int:
        """The most bytes this reassembler holds, whatever arrives (see the class docstring)."""
        return (self.max_pending * (self.max_frame_bytes + S.ALIGN + S.MAX_FRAGMENT_COUNT + _ENTRY_OVERHEAD)
                + 2 * self._keep * _KEY_COST)

    def pending_keys(self) -> List[Tuple[int, int]]:
        """(publisher_id, frame_id) of every frame still being put together."""
        with self._lock:
            return list(dict.fromkeys(k[:2] for k in self._pending))

    def pending_frames(self) -> List[_Key]:
        """The whole key (``frame_key``) of every frame still being put together."""
        with self._lock:
            return list(self._pending)

    def stats(self) -> Dict[str, int]:
        return {"completed": self.completed, "expired": self.expired, "evicted": self.evicted,
                "refused": self.refused, "duplicates": self.duplicates, "rejected": self.rejected,
                "pending": len(self._pending)}

    def expire(self, now: Optional[float] = None) -> int:
        """Drop the pending frames whose time is up; returns how many."""
        if not self._pending:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._expire_locked(now)

    def feed(self, buf: BufferLike) -> Optional[Frame]:
        """Take one message: returns the decoded Frame once it is whole, else None.

        Raises FrameError for a malformed whole frame or fragment (counted in ``rejected``).
        """
        if not is_fragment(buf):
            n = len(buf) if type(buf) is bytes else _view(buf).nbytes
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
            frame_id, pub_id, index, count, total, offset, chunk_size, sending, chunk = impl.parse_fragment_header(buf)
            self._check_geometry(frame_id, index, count, total, offset, chunk_size, len(chunk))
        except FrameError:
            self.rejected += 1
            raise
        key = (pub_id, frame_id, count, total, chunk_size, sending)
        with self._lock:
            p = self._pending.get(key)
            if p is None:
                p = self._admit(key, index)
                if p is None:
                    return None
            if p.got[index]:
                n = len(chunk)
                if np.array_equal(p.buf[offset:offset + n], np.frombuffer(chunk, np.uint8, n)):
                    self.duplicates += 1
                    return None
                # two different chunks for one place: one is forged, and which cannot be told;
                # drop the frame rather than hand over bytes that may be partly forged
                self._drop(key)
                self._remember(self._abandoned, key)
                self.rejected += 1
                raise FrameError(f"fragment {index}/{count} of frame {frame_id} came twice with different "
                                 "bytes; the frame is dropped")
            p.view[offset:offset + len(chunk)] = chunk
            p.got[index] = 1
            p.remaining -= 1
            if p.remaining:
                return None
            self._drop(key)
            self._remember(self._done, key)
        p.buf.flags.writeable = False          # the frame views it read-only, whatever the codec
        if sending and (total < 16 or int.from_bytes(p.buf[12:16].tobytes(), "little") != sending):
            # the fragments name a sending (the header CRC) that the frame they make does not have
            self.rejected += 1
            raise FrameError(f"fragments of frame {frame_id} name header CRC {sending:#010x} at offset 56, "
                             "which the reassembled frame does not have (offset 12)")
        try:
            f = decode(p.buf)
        except FrameError:
            self.rejected += 1
            raise
        self.completed += 1
        return f

    def _check_geometry(self, frame_id: int, index: int, count: int, total: int, offset: int,
                        chunk_size: int, chunk_len: int) -> None:
        if total > self.max_frame_bytes:
            raise FrameError(f"fragmented frame of {total} bytes (at offset 32) exceeds max_frame_bytes "
                             f"{self.max_frame_bytes}")
        if total < 1 or chunk_size < 1 or count != -(-total // chunk_size):
            raise FrameError(f"fragment geometry count={count} total={total} chunk_size={chunk_size} "
                             "(offsets 28, 32, 48) is inconsistent")
        if count > S.MAX_FRAGMENT_COUNT:
            raise FrameError(f"fragment geometry count={count} exceeds the {S.MAX_FRAGMENT_COUNT} fragments a "
                             f"frame may have (chunk_size {chunk_size} is too small for total {total})")
        if index >= count or offset != index * chunk_size or chunk_len != min(chunk_size, total - offset):
            raise FrameError(f"fragment {index}/{count} of frame {frame_id}: offset {offset} or length "
                             f"{chunk_len} (offsets 24, 40, 52) does not fit chunk size {chunk_size} and total {total}")

    def _admit(self, key: _Key, index: int) -> Optional[_Pending]:
        """A new pending frame for ``key``, room made within the quotas; None when it is not taken."""
        if key in self._done:
            self.duplicates += 1               # a late copy of a frame already handed over
            return None
        if key in self._abandoned:
            if index:
                self._abandoned.move_to_end(key)   # a straggler: the frame's missing part is gone
                self.refused += 1
                return None
            # its first fragment again: the frame is sent anew (a Kafka consumer group re-delivers
            # from the last committed offset after a rebalance), so it may start over
            del self._abandoned[key]
        now = time.monotonic()
        self._expire_locked(now)               # a frame past its time holds no room, reaper or not
        pub = key[0]
        held = self._per_pub.get(pub, 0)
        if held >= self.max_pending_per_publisher or (held and len(self._pending) >= self.max_pending):
            # the publisher's newest frame is worth more than its own stalest one
            oldest = next(k for k in self._pending if k[0] == pub)
            self._drop(oldest)
            self._remember(self._abandoned, oldest)
            self.evicted += 1
        elif len(self._pending) >= self.max_pending:
            self._remember(self._abandoned, key)
            self.refused += 1
            return None
        count, total = key[2], key[3]
        p = _Pending()
        # np.empty leaves the pages untouched until chunks land in them; over-allocate by one
        # alignment unit, then start the frame on a 64-byte boundary
        raw = np.empty(total + S.ALIGN, dtype=np.uint8)
        start = (-raw.ctypes.data) % S.ALIGN
        p.buf = raw[start:start + total]
        p.view = _view(p.buf)
        p.got = bytearray(count)
        p.remaining = count
        p.deadline = now + self.timeout_s
        self._pending[key] = p
        self._per_pub[pub] = self._per_pub.get(pub, 0) + 1
        if not self._watched:
            # watched, this reassembler's earliest deadline is already in the reaper's wait
            self._watched = _REAPER.watch(self, p.deadline)
        return p

    def _drop(self, key: _Key) -> None:
        del self._pending[key]
        n = self._per_pub[key[0]] - 1
        if n:
            self._per_pub[key[0]] = n
        else:
            del self._per_pub[key[0]]

    def _remember(self, lru: OrderedDict[_Key, None], key: _Key) -> None:
        lru[key] = None
        lru.move_to_end(key)
        if len(lru) > self._keep:
            lru.popitem(last=False)

    def _expire_locked(self, now: float) -> int:
        n = 0
        while self._pending:
            key, p = next(iter(self._pending.items()))
            if p.deadline > now:
                break          # insertion order is deadline order
            self._drop(key)
            self._remember(self._abandoned, key)
            n += 1
        self.expired += n
        return n

    def _reap(self, now: float) -> Optional[float]:
        """The reaper's visit: expire, then the next deadline; None once nothing is pending (and
        the reaper stops watching, atomically with the check, so a new frame re-registers)."""
        with self._lock:
            self._expire_locked(now)
            if self._pending:
                return next(iter(self._pending.values())).deadline
            self._watched = False
            _REAPER.unwatch(self)
            return None


class _Reaper:
    """The process's one daemon thread that drops timed-out frames on the clock.

    It holds Reassemblers by weak reference (a dropped one is collected as usual), watches only
    those with frames pending, and sleeps until the earliest deadline, at most ``MAX_WAIT`` s
    at a time. The thread does not survive fork: the child starts its own.
    """

    MAX_WAIT = 1.0

    def __init__(self) -> None:
        self._watched: Dict[int, weakref.ref[Reassembler]] = {}
        self._new_locks()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                                after_in_child=self._after_fork_in_child)

    def _new_locks(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._sweeping = threading.Lock()          # held through a sweep, so a fork never splits one
        self._held_for_fork = False
        self._thread: Optional[threading.Thread] = None
        self._wake = float("inf")                  # when the thread next looks; inf while it looks
        self._kicked = False
        self._failed_at: Optional[float] = None    # when a thread last could not start

    def watch(self, r: Reassembler, deadline: float) -> bool:
        """Expire ``r``'s frames on time from now on (``r._lock`` held); False if no thread could start."""
        with self._cond:
            self._watched[id(r)] = r._ref
            if self._thread is None:
                return self._start()
            if deadline < self._wake:
                self._kicked = True
                self._cond.notify()
        return True

    def unwatch(self, r: Reassembler) -> None:
        with self._cond:
            if self._watched.get(id(r)) is r._ref:
                del self._watched[id(r)]

    def _start(self) -> bool:
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < 60:
            return False                       # tried a moment ago: not on every fragmented frame
        t = threading.Thread(target=self._run, name="msight-fast-reaper", daemon=True)
        try:
            t.start()
        except RuntimeError as e:              # out of threads: frames still expire when fragments arrive
            if self._failed_at is None:
                log.warning("msight_fast: could not start the fragment reaper thread (%s); timed-out frames "
                            "are dropped only when more fragments arrive", e)
            self._failed_at = now
            return False
        self._thread = t
        return True

    def _run(self) -> None:
        while True:
            try:
                nxt = self._sweep()
            except Exception:                  # a bug here must not stop expiry for the whole process
                log.exception("msight_fast: fragment reaper sweep failed")
                nxt = float("inf")
            with self._cond:
                now = time.monotonic()
                self._wake = min(nxt, now + self.MAX_WAIT) if self._watched else float("inf")
                if not self._kicked:           # nothing watched: sleep until watch() kicks
                    self._cond.wait(None if not self._watched else max(0.0, self._wake - now))
                self._kicked = False
                self._wake = float("inf")

    def _sweep(self) -> float:
        """Expire every watched reassembler's due frames; returns the earliest deadline left."""
        nxt = float("inf")
        with self._sweeping:
            with self._cond:
                watched = list(self._watched.items())
            now = time.monotonic()
            for rid, ref in watched:
                r = ref()
                if r is None:
                    with self._cond:
                        if self._watched.get(rid) is ref:
                            del self._watched[rid]
                    continue
                d = r._reap(now)
                if d is not None and d < nxt:
                    nxt = d
        return nxt                             # returning drops the last strong reference taken

    def _before_fork(self) -> None:
        self._held_for_fork = self._sweeping.acquire(timeout=self.MAX_WAIT)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._sweeping.release()

    def _after_fork_in_child(self) -> None:
        self._new_locks()                      # the parent's thread is gone; so may be a lock holder
        for ref in list(self._watched.values()):
            r = ref()
            if r is not None:                  # a parent thread may have held it mid-feed
                r._lock = threading.Lock()
        if self._watched:
            self._start()


_REAPER = _Reaper()
