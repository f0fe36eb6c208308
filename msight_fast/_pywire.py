"""Pure-Python twin of the wire codec (numpy + struct).

The readable reference for ``docs/wire-format.md``, the oracle of the tests, and the fallback
where the compiled core is absent or ``MSIGHT_FAST_NO_EXTENSIONS=1``. It produces exactly the
same bytes as ``msight_fast._ext._wire`` and accepts and rejects exactly the same inputs.
"""
from __future__ import annotations

import operator
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import _schema as S
from .errors import FrameError

# ---------------------------------------------------------------- CRC32C (Castagnoli), reflected
_POLY = 0x82F63B78


def _make_table() -> List[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (0 to start)."""
    c = crc ^ 0xFFFFFFFF
    t = _TABLE
    for b in memoryview(data).cast("B"):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _as_bytes_view(obj: Any) -> memoryview:
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(obj).__name__}") from None
    if not mv.c_contiguous:
        raise FrameError("the buffer is not C-contiguous")
    if mv.nbytes == 0:
        return memoryview(b"")                 # cast() refuses a shape with a zero in it
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv.toreadonly()


class Frame:
    """One sensor frame: metadata plus an ndarray or opaque bytes payload."""

    __slots__ = ("array", "_payload", "encoding", "sensor_name", "device_name", "frame_id", "seq",
                 "publisher_id", "capture_ts_ns", "creation_ts_ns", "publish_ts_ns", "meta", "_buf")

    def __init__(self) -> None:
        now = S.now_ns()
        self.array: Optional[np.ndarray] = None
        self._payload: memoryview = memoryview(b"")
        self.encoding = ""
        self.sensor_name = ""
        self.device_name = ""
        self.frame_id = 0
        self.seq = 0
        self.publisher_id = 0
        self.capture_ts_ns = now
        self.creation_ts_ns = now
        self.publish_ts_ns = 0
        self.meta: Dict[str, S.MetaValue] = {}
        self._buf: Any = None

    def _init_common(self, sensor_name: Optional[str], encoding: Optional[str], device_name: Optional[str],
                     frame_id: Optional[int], capture_ts_ns: Optional[int],
                     meta: Optional[Mapping[str, S.MetaValue]]) -> None:
        S.encode_str(sensor_name, "sensor_name", S.MAX_NAME_BYTES)
        S.encode_str(device_name, "device_name", S.MAX_NAME_BYTES)
        S.encode_str(encoding, "encoding", S.MAX_ENCODING_BYTES)
        self.sensor_name = sensor_name or ""
        self.device_name = device_name or ""
        self.encoding = encoding or ""
        self.frame_id = S.new_frame_id() if frame_id is None else int(frame_id)
        if capture_ts_ns is not None:
            self.capture_ts_ns = int(capture_ts_ns)
        self.meta = dict(meta) if meta else {}
        S.meta_to_wire(self.meta)          # validate now, not at publish time

    @classmethod
    def from_array(cls, arr: np.ndarray, *, sensor_name: str, encoding: Optional[str] = None,
                   device_name: Optional[str] = None, frame_id: Optional[int] = None,
                   capture_ts_ns: Optional[int] = None, meta: Optional[Mapping[str, S.MetaValue]] = None) -> Frame:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"from_array needs a numpy.ndarray, not {type(arr).__name__}")
        S._check_dtype(arr.dtype)
        S.dtype_to_wire(arr.dtype)
        if arr.ndim > S.MAX_NDIM:
            raise FrameError(f"{arr.ndim} dimensions (limit {S.MAX_NDIM})")
        sub = S.subarray_ndim(arr.dtype)
        if arr.ndim + sub > S.MAX_NDIM:
            raise FrameError(f"{arr.ndim} dimensions plus {sub} from sub-array fields (limit {S.MAX_NDIM})")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).reshape(arr.shape)   # the one copy a strided array needs
        plan = S.ucs4_plan(arr.dtype)
        if plan is not None:              # what a receiver would reject is refused here
            S.check_ucs4(plan, arr, 0)
        f = cls()
        f._init_common(sensor_name, encoding if encoding is not None else S.default_encoding(arr),
                       device_name, frame_id, capture_ts_ns, meta)
        f.array = arr
        f._payload = arr.reshape(-1).view(np.uint8).data.toreadonly()
        return f

    @classmethod
    def from_bytes(cls, data: Any, *, sensor_name: str, encoding: str,
                   device_name: Optional[str] = None, frame_id: Optional[int] = None,
                   capture_ts_ns: Optional[int] = None, meta: Optional[Mapping[str, S.MetaValue]] = None) -> Frame:
        mv = _as_bytes_view(data)
        f = cls()
        f._init_common(sensor_name, encoding, device_name, frame_id, capture_ts_ns, meta)
        f._payload = mv
        return f

    @property
    def data(self) -> memoryview:
        """The payload bytes, read-only."""
        return self._payload

    @property
    def nbytes(self) -> int:
        return self._payload.nbytes

    def release(self) -> None:
        """Give back the shared buffer this frame views, if its backend lends one (shm): the array
        and data must not be used after. Idempotent; a no-op for other frames.

        Only a frame returned by :func:`decode` gives its buffer back: it calls the ``_msf_release``
        of the object it was decoded from (behind a memoryview, its exporter), once per frame."""
        o, self._buf = self._buf, None    # set by decode only; cleared: once, even if release raises
        if o is None:
            return
        if type(o) is memoryview:
            o = o.obj
        r = getattr(o, "_msf_release", None)
        if r is not None:
            r()

    def __enter__(self) -> Frame:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        what = (f"array={self.array.dtype.str if self.array.dtype.names is None else 'struct'}{list(self.array.shape)}"
                if self.array is not None else f"bytes={self.nbytes}")
        return (f"Frame(sensor_name={self.sensor_name!r}, encoding={self.encoding!r}, {what}, "
                f"frame_id={self.frame_id}, seq={self.seq})")


# ---------------------------------------------------------------- encode
def _header(frame: Frame, checksum: bool) -> bytes:
    recs = []

    def rec(tag: int, value: bytes) -> None:
        recs.append(S.RECORD.pack(tag, 0, len(value)))
        recs.append(value)

    if frame.sensor_name:
        rec(S.TAG_SENSOR_NAME, S.encode_str(frame.sensor_name, "sensor_name", S.MAX_NAME_BYTES))
    if frame.device_name:
        rec(S.TAG_DEVICE_NAME, S.encode_str(frame.device_name, "device_name", S.MAX_NAME_BYTES))
    if frame.encoding:
        rec(S.TAG_ENCODING, S.encode_str(frame.encoding, "encoding", S.MAX_ENCODING_BYTES))
    flags = 0
    arr = frame.array
    if arr is not None:
        flags |= S.FLAG_NDARRAY
        rec(S.TAG_DTYPE, S.dtype_to_wire(arr.dtype))
        rec(S.TAG_SHAPE, struct.pack(f"<{arr.ndim}Q", *arr.shape))
    if frame.meta:
        rec(S.TAG_META, S.meta_to_wire(frame.meta))
    body = b"".join(recs)
    header_len = S.FIXED_LEN + len(body)
    if header_len > S.MAX_HEADER_LEN:
        raise FrameError(f"header of {header_len} bytes exceeds {S.MAX_HEADER_LEN}")
    payload = frame._payload
    pcrc = 0
    if checksum:
        flags |= S.FLAG_PAYLOAD_CRC
        pcrc = crc32c(payload)
    offset = S.align_up(header_len)
    fixed = S.FIXED.pack(S.MAGIC, S.VERSION_MAJOR, S.VERSION_MINOR, flags, header_len, 0, S.FIXED_LEN, 0,
                         pcrc, offset, payload.nbytes, frame.frame_id, frame.seq, frame.publisher_id,
                         frame.capture_ts_ns, frame.creation_ts_ns, frame.publish_ts_ns)
    hcrc = crc32c(body, crc32c(fixed[16:], crc32c(fixed[:12])))
    return b"".join((fixed[:12], struct.pack("<I", hcrc), fixed[16:], body, bytes(offset - header_len)))


def encode_parts(frame: Frame, *, checksum: bool = False) -> List[Any]:
    """[header, payload]: the payload is a read-only memoryview of the frame's own buffer (no copy)."""
    return [_header(frame, checksum), frame._payload]


def frame_for(obj: Any, default_name: str, fields: Dict[str, Any]) -> Frame:
    """``Bus.publish``'s frame of ``obj``: ``Frame.from_array`` of an ndarray, else
    ``Frame.from_bytes``, with ``fields`` as their keywords; ``sensor_name`` defaults to
    ``default_name``, and a buffer's ``encoding`` to "bytes". ``fields`` (a dict, not a subclass)
    is not changed."""
    if type(fields) is not dict:               # as the compiled core's typed argument
        raise TypeError(f"fields must be a dict, not {type(fields).__name__}")
    kw = dict(fields)
    kw.setdefault("sensor_name", default_name)
    if isinstance(obj, np.ndarray):
        return Frame.from_array(obj, **kw)
    kw.setdefault("encoding", "bytes")
    return Frame.from_bytes(obj, **kw)


def stamp_parts(frame: Frame, seq: int, publisher_id: int, checksum: bool = False) -> List[Any]:
    """A publisher's step in one call: set ``seq``, ``publisher_id`` and ``publish_ts_ns`` (the wall
    clock now), then return ``encode_parts(frame, checksum=checksum)``."""
    if not isinstance(frame, Frame):
        raise TypeError(f"stamp_parts takes a Frame, not {type(frame).__name__}")
    # seq in full before publisher_id, as the compiled core converts them: the same error first
    seq = operator.index(seq)                  # TypeError for a float, as compiled
    if not 0 <= seq < 1 << 64:
        raise OverflowError("seq is a u64")
    publisher_id = operator.index(publisher_id)
    if not 0 <= publisher_id < 1 << 64:
        raise OverflowError("publisher_id is a u64")
    frame.seq = seq
    frame.publisher_id = publisher_id
    frame.publish_ts_ns = time.time_ns()
    return encode_parts(frame, checksum=checksum)


def encode(frame: Frame, *, checksum: bool = False) -> bytes:
    """One contiguous buffer: the header followed by one copy of the payload."""
    return b"".join(encode_parts(frame, checksum=checksum))


# ---------------------------------------------------------------- decode
def _utf8(mv: memoryview, what: str, limit: int, off: int) -> str:
    if len(mv) > limit:
        raise FrameError(f"{what} of {len(mv)} bytes exceeds {limit} at offset {off}")
    try:
        return bytes(mv).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"{what} is not valid UTF-8 at offset {off}") from None


def decode(buf: Any) -> Frame:
    """Decode one frame. ``frame.array`` (or ``frame.data``) is a read-only view into ``buf``."""
    mv = _as_bytes_view(buf)
    n = len(mv)
    if n < S.FIXED_LEN:
        raise FrameError(f"truncated frame: {n} bytes, a header needs at least {S.FIXED_LEN} (at offset {n})")
    if mv[:4] != S.MAGIC:
        raise FrameError(f"bad magic {bytes(mv[:4])!r} at offset 0 (expected {S.MAGIC!r})")
    (magic, major, minor, flags, header_len, hcrc, fixed_len, _res, pcrc, poff, plen, frame_id, seq,
     pub_id, cap_ts, cre_ts, pub_ts) = S.FIXED.unpack_from(mv, 0)
    if major != S.VERSION_MAJOR:
        raise FrameError(f"unsupported wire format major version {major} at offset 4 "
                         f"(this reader knows {S.VERSION_MAJOR})")
    if not S.FIXED_LEN <= header_len <= min(n, S.MAX_HEADER_LEN):
        raise FrameError(f"header length {header_len} at offset 8 out of range "
                         f"[{S.FIXED_LEN}, {min(n, S.MAX_HEADER_LEN)}]")
    if crc32c(mv[16:header_len], crc32c(mv[:12])) != hcrc:
        raise FrameError("header CRC32C mismatch at offset 12")
    if not S.FIXED_LEN <= fixed_len <= header_len:
        raise FrameError(f"fixed-part length {fixed_len} at offset 16 out of range [{S.FIXED_LEN}, {header_len}]")
    if poff % S.ALIGN or poff < header_len or poff > n:
        raise FrameError(f"payload offset {poff} at offset 24 is not a multiple of {S.ALIGN} in [{header_len}, {n}]")
    if plen != n - poff:
        raise FrameError(f"payload length {plen} at offset 32 does not match the {n - poff} bytes after the header")
    if any(mv[header_len:poff]):
        raise FrameError(f"non-zero padding between offsets {header_len} and {poff}")
    payload = mv[poff:]
    if flags & S.FLAG_PAYLOAD_CRC:
        if crc32c(payload) != pcrc:
            raise FrameError(f"payload CRC32C mismatch (payload at offset {poff})")
    elif pcrc:
        raise FrameError("payload CRC32C set at offset 20 without the checksum flag")

    f = Frame.__new__(Frame)
    f.sensor_name = f.device_name = f.encoding = ""
    f.meta = {}
    dtype_b = shape_b = None
    seen = set()
    pos = fixed_len
    while pos < header_len:
        if pos + 8 > header_len:
            raise FrameError(f"truncated header record at offset {pos}")
        tag, _rflags, rlen = S.RECORD.unpack_from(mv, pos)
        start = pos + 8
        if rlen > header_len - start:
            raise FrameError(f"header record of length {rlen} at offset {pos} runs past the header end {header_len}")
        val = mv[start:start + rlen]
        if tag in S.KNOWN_TAGS:
            if tag in seen:
                raise FrameError(f"duplicate header record {tag} at offset {pos}")
            seen.add(tag)
            if tag == S.TAG_SENSOR_NAME:
                f.sensor_name = _utf8(val, "sensor_name", S.MAX_NAME_BYTES, start)
            elif tag == S.TAG_DEVICE_NAME:
                f.device_name = _utf8(val, "device_name", S.MAX_NAME_BYTES, start)
            elif tag == S.TAG_ENCODING:
                f.encoding = _utf8(val, "encoding", S.MAX_ENCODING_BYTES, start)
            elif tag == S.TAG_DTYPE:
                dtype_b = (bytes(val), start)
            elif tag == S.TAG_SHAPE:
                shape_b = (val, start)
            elif tag == S.TAG_META:
                f.meta = S.meta_from_wire(val, start)
        # unknown tags come from a newer minor version: skipped
        pos = start + rlen

    f.array = None
    if flags & S.FLAG_NDARRAY:
        if dtype_b is None or shape_b is None:
            raise FrameError("ndarray frame (flags at offset 6) without a dtype or shape record")
        dt = S.dtype_from_wire(*dtype_b)
        sv, soff = shape_b
        if len(sv) % 8 or len(sv) // 8 > S.MAX_NDIM:
            raise FrameError(f"shape record of {len(sv)} bytes at offset {soff} (ndim limit {S.MAX_NDIM})")
        sub = S.subarray_ndim(dt)
        if len(sv) // 8 + sub > S.MAX_NDIM:
            raise FrameError(f"shape of {len(sv) // 8} dimensions at offset {soff} plus {sub} from sub-array "
                             f"fields exceeds {S.MAX_NDIM}")
        shape = struct.unpack(f"<{len(sv) // 8}Q", sv)
        count = S.check_shape(shape, dt.itemsize, plen, soff)
        plan = S.ucs4_plan(dt)
        if plan is not None:
            S.check_ucs4(plan, payload, poff)
        f.array = np.frombuffer(payload, dtype=dt, count=count).reshape(shape)
    elif dtype_b is not None or shape_b is not None:
        raise FrameError("dtype or shape record on a bytes frame (flags at offset 6)")
    f._payload = payload
    f._buf = buf
    f.frame_id, f.seq, f.publisher_id = frame_id, seq, pub_id
    f.capture_ts_ns, f.creation_ts_ns, f.publish_ts_ns = cap_ts, cre_ts, pub_ts
    return f


# ---------------------------------------------------------------- fragment header
def pack_fragment_header(frame_id: int, publisher_id: int, index: int, count: int, total: int,
                         offset: int, chunk_size: int, chunk: Any, sending: int = 0) -> bytes:
    """The 64-byte header of one fragment; its CRC32C covers bytes 0..60 and then ``chunk``
    (bytes-like, or a list or tuple of bytes-like pieces that together make the chunk).
    ``sending`` is the frame's header CRC, which tells two sendings of one frame id apart."""
    pieces = chunk if isinstance(chunk, (list, tuple)) else [chunk]
    clen = sum(memoryview(x).nbytes for x in pieces)
    h = S.FRAG.pack(S.FRAG_MAGIC, S.VERSION_MAJOR, S.FRAG_VERSION_MINOR, 0, frame_id, publisher_id, index,
                    count, total, offset, chunk_size, clen, sending, 0)
    c = crc32c(h[:60])
    for x in pieces:
        c = crc32c(x, c)
    return h[:60] + struct.pack("<I", c)


def parse_fragment_header(buf: Any) -> Tuple[int, int, int, int, int, int, int, int, memoryview]:
    """Validate one fragment; returns (frame_id, publisher_id, index, count, total, offset,
    chunk_size, sending, chunk)."""
    mv = _as_bytes_view(buf)
    n = len(mv)
    if n < S.FRAG_HEADER_LEN:
        raise FrameError(f"truncated fragment: {n} bytes, its header needs {S.FRAG_HEADER_LEN} (at offset {n})")
    (magic, major, _minor, _flags, frame_id, pub_id, index, count, total, offset, chunk_size, clen,
     sending, crc) = S.FRAG.unpack_from(mv, 0)
    if magic != S.FRAG_MAGIC:
        raise FrameError(f"bad fragment magic {magic!r} at offset 0")
    if major != S.VERSION_MAJOR:
        raise FrameError(f"unsupported fragment major version {major} at offset 4")
    if clen != n - S.FRAG_HEADER_LEN:
        raise FrameError(f"fragment chunk length {clen} at offset 52 != {n - S.FRAG_HEADER_LEN} bytes present")
    chunk = mv[S.FRAG_HEADER_LEN:]
    if crc32c(chunk, crc32c(mv[:60])) != crc:
        raise FrameError("fragment CRC32C mismatch at offset 60")
    return frame_id, pub_id, index, count, total, offset, chunk_size, sending, chunk
