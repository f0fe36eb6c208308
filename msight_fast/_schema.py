"""Wire-format constants and the cold-path pieces shared by the C core and its Python twin.

The dtype descriptor and the user map are encoded here, in Python, by both implementations:
the extension caches descriptors per dtype (encode) and per descriptor bytes (decode), so this
code runs once per distinct dtype, never per frame.
"""
from __future__ import annotations

import array
import os
import struct
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .errors import FrameError

MAGIC = b"\x93MSF"            # frame
FRAG_MAGIC = b"\x93MSP"       # fragment of a frame
BATCH_MAGIC = b"\x93MSB"      # batch container of small frames (docs/wire-format.md 2a, 2b)
BATCH_HEADER_LEN = 24         # magic, major, minor, flags, count, header CRC, total; the index follows
MAX_BATCH_COUNT = 65536       # most frames one container may hold
BATCH_SHARED = 1              # batch flag bit 0: the frames share frame 0's header (docs/wire-format.md 2b)
SHARED_VERSION_MINOR = 2      # a shared-header batch's minor version (wire format 1.2)
SHARED_HEAD_LEN = 32          # a shared-header batch's header, before the template
MAX_SHARED_TEMPLATE = 512     # longest shared header: bounds what a reader expands a message to
VERSION_MAJOR = 1
VERSION_MINOR = 0
# fragments from 1.1 on say which sending of a frame they carry (offset 56; docs/wire-format.md 2)
FRAG_VERSION_MINOR = 1

FIXED_LEN = 88                # size of the fixed part of a v1.0 frame header
FRAG_HEADER_LEN = 64          # size of a v1.0 fragment header
MAX_FRAGMENT_COUNT = 65536    # most fragments one frame may have: bounds a receiver's per-frame map
ALIGN = 64                    # payload offset alignment
MAX_HEADER_LEN = 65536

FLAG_PAYLOAD_CRC = 0x1
FLAG_NDARRAY = 0x2

TAG_SENSOR_NAME = 1
TAG_DEVICE_NAME = 2
TAG_ENCODING = 3
TAG_DTYPE = 4
TAG_SHAPE = 5
TAG_META = 6
KNOWN_TAGS = (TAG_SENSOR_NAME, TAG_DEVICE_NAME, TAG_ENCODING, TAG_DTYPE, TAG_SHAPE, TAG_META)

MAX_NAME_BYTES = 255          # sensor_name, device_name
MAX_ENCODING_BYTES = 64
MAX_NDIM = 32
MAX_DTYPE_BYTES = 16384
MAX_DTYPE_DEPTH = 8
MAX_DTYPE_FIELDS = 512         # per struct
MAX_FIELD_NAME_BYTES = 255
MAX_DTYPE_FIELDS_TOTAL = 1024  # in the whole descriptor, nested structs included
MAX_ITEMSIZE = 0x7FFFFFFF      # numpy keeps an itemsize in a C int
MAX_ARRAY_BYTES = (1 << 63) - 1   # numpy's limit on any array's size in bytes, even an empty one's
MAX_META_BYTES = 4096
MAX_META_ENTRIES = 64
MAX_META_KEY_BYTES = 64
MAX_META_STR_BYTES = 1024

# struct layouts, little-endian, no padding
FIXED = struct.Struct("<4sBBHIIHHIQQQQQqqq")
assert FIXED.size == FIXED_LEN
RECORD = struct.Struct("<HHI")
# magic, major, minor, flags, frame_id, publisher_id, index, count, total, offset,
# chunk_size, chunk_len, sending (the frame's header CRC; 0 before 1.1), crc32c (of bytes 0..60
# then the chunk)
FRAG = struct.Struct("<4sBBHQQIIQQIIII")
assert FRAG.size == FRAG_HEADER_LEN

_SCALAR_KINDS = frozenset("biufcSUV")
_D_SCALAR, _D_STRUCT, _D_SUBARRAY = 1, 2, 3
_META_STR, _META_INT, _META_FLOAT = 1, 2, 3


def utf8(s: str, what: str) -> bytes:
    """``s`` as UTF-8; a str that has none (a lone surrogate) is a FrameError, not a UnicodeError."""
    try:
        return str.encode(s, "utf-8")      # the characters themselves, whatever a subclass's encode says
    except UnicodeEncodeError:
        raise FrameError(f"{what} is not encodable as UTF-8 (it holds a lone surrogate)") from None


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


# ---------------------------------------------------------------- frame ids
# Frame ids are drawn from the OS's random source, a batch at a time: a receiver keys fragments by
# (publisher_id, frame_id), and an id that an attacker can predict (a base plus a counter) lets a
# fragment forged in advance claim a frame that has not been sent yet.
_ID_BATCH = 512
_id_pool: List[int] = []                  # never rebound: the compiled Frame pops from this very list
_id_lock = threading.Lock()


def _reseed_ids() -> None:
    global _id_lock
    del _id_pool[:]
    _id_lock = threading.Lock()            # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_ids)    # a forked child must not repeat the parent's ids


def new_frame_id() -> int:
    """A random 64-bit id: unpredictable, and distinct from every other with overwhelming probability.

    ``list.pop`` hands each pooled id to exactly one caller, whatever the threads.
    """
    while True:
        try:
            return _id_pool.pop()
        except IndexError:
            with _id_lock:
                if not _id_pool:
                    _id_pool.extend(array.array("Q", os.urandom(8 * _ID_BATCH)))


def new_publisher_id() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


now_ns = time.time_ns


# ---------------------------------------------------------------- dtype descriptor
def _check_dtype(dt: np.dtype) -> None:
    if dt.hasobject:
        raise FrameError(f"dtype {dt!r} holds Python objects and cannot be sent; use fixed-size fields")
    if dt.itemsize == 0:
        raise FrameError(f"dtype {dt!r} has itemsize 0 and cannot be sent")


def _enc_dtype(dt: np.dtype, out: List[bytes], depth: int, fields: List[int]) -> None:
    if depth > MAX_DTYPE_DEPTH:
        raise FrameError(f"dtype nesting deeper than {MAX_DTYPE_DEPTH}")
    if dt.itemsize > MAX_ITEMSIZE:
        raise FrameError(f"dtype {dt!r} has itemsize {dt.itemsize} (limit {MAX_ITEMSIZE})")
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        if not 1 <= len(shape) <= MAX_NDIM:
            raise FrameError(f"sub-array field of {len(shape)} dimensions")
        out.append(struct.pack(f"<BB{len(shape)}I", _D_SUBARRAY, len(shape), *shape))
        _enc_dtype(base, out, depth + 1, fields)
    elif dt.names is not None:
        if len(dt.names) > MAX_DTYPE_FIELDS:
            raise FrameError(f"structured dtype with more than {MAX_DTYPE_FIELDS} fields")
        fields[0] += len(dt.names)
        if fields[0] > MAX_DTYPE_FIELDS_TOTAL:
            raise FrameError(f"dtype with more than {MAX_DTYPE_FIELDS_TOTAL} fields in all")
        out.append(struct.pack("<BIH", _D_STRUCT, dt.itemsize, len(dt.names)))
        by_name: Mapping[str, Tuple[Any, ...]] = dt.fields or {}    # set whenever names is
        for name in dt.names:
            if len(by_name[name]) > 2:
                raise FrameError(f"field {name!r} of {dt!r} has a title; titles are not carried on the wire")
            fdt, off = by_name[name][:2]
            nb = utf8(name, f"field name {name!r}")
            if not nb or len(nb) > MAX_FIELD_NAME_BYTES:
                raise FrameError(f"field name {name!r} must be 1 to {MAX_FIELD_NAME_BYTES} bytes of UTF-8")
            out.append(struct.pack("<H", len(nb)) + nb + struct.pack("<I", off))
            _enc_dtype(fdt, out, depth + 1, fields)
    else:
        s = dt.str
        kind = s[1]
        if kind not in _SCALAR_KINDS:
            raise FrameError(f"dtype {dt!r} (kind {kind!r}) is not supported on the wire")
        out.append(struct.pack("<BccI", _D_SCALAR, s[0].encode(), kind.encode(), dt.itemsize))


def dtype_to_wire(dt: np.dtype) -> bytes:
    """Serialize a numpy dtype into the binary descriptor of docs/wire-format.md."""
    _check_dtype(dt)
    out: List[bytes] = []
    _enc_dtype(dt, out, 0, [0])
    blob = b"".join(out)
    if len(blob) > MAX_DTYPE_BYTES:
        raise FrameError(f"dtype descriptor of {len(blob)} bytes exceeds {MAX_DTYPE_BYTES}")
    return blob


def _dec_dtype(b: bytes, pos: int, depth: int, base: int, fields: List[int]) -> Tuple[np.dtype, int]:
    if depth > MAX_DTYPE_DEPTH:
        raise FrameError(f"dtype nesting deeper than {MAX_DTYPE_DEPTH} at offset {base + pos}")
    if pos >= len(b):
        raise FrameError(f"dtype descriptor truncated at offset {base + pos}")
    code = b[pos]
    try:
        if code == _D_SCALAR:
            _, bo, kind, size = struct.unpack_from("<BccI", b, pos)
            bo_s, kind_s = bo.decode("latin-1"), kind.decode("latin-1")
            if kind_s not in _SCALAR_KINDS or bo_s not in "<>|" or not 0 < size <= MAX_ITEMSIZE:
                raise FrameError(f"bad scalar dtype {bo!r}{kind!r}{size} at offset {base + pos}")
            if kind_s == "U":
                if size % 4:
                    raise FrameError(f"unicode dtype itemsize {size} not a multiple of 4 at offset {base + pos}")
                spec = f"{bo_s}U{size // 4}"
            elif kind_s == "b":
                spec = "?"
            else:
                spec = f"{bo_s}{kind_s}{size}"
            try:
                dt = np.dtype(spec)
            except TypeError as e:
                raise FrameError(f"bad scalar dtype {spec!r} at offset {base + pos}: {e}") from None
            if dt.itemsize != size:
                raise FrameError(f"dtype {spec!r} has itemsize {dt.itemsize}, header says {size}, "
                                 f"at offset {base + pos}")
            return dt, pos + 7
        if code == _D_STRUCT:
            _, itemsize, nfields = struct.unpack_from("<BIH", b, pos)
            pos += 7
            if nfields > MAX_DTYPE_FIELDS:
                raise FrameError(f"{nfields} dtype fields (limit {MAX_DTYPE_FIELDS}) at offset {base + pos}")
            if not 0 < itemsize <= MAX_ITEMSIZE:
                raise FrameError(f"structured dtype itemsize {itemsize} out of range [1, {MAX_ITEMSIZE}] "
                                 f"at offset {base + pos - 6}")
            fields[0] += nfields
            if fields[0] > MAX_DTYPE_FIELDS_TOTAL:
                raise FrameError(f"more than {MAX_DTYPE_FIELDS_TOTAL} dtype fields in all at offset {base + pos}")
            names, formats, offsets = [], [], []
            for _ in range(nfields):
                (nlen,) = struct.unpack_from("<H", b, pos)
                pos += 2
                if not 1 <= nlen <= MAX_FIELD_NAME_BYTES or pos + nlen > len(b):
                    raise FrameError(f"bad dtype field name length {nlen} at offset {base + pos}")
                try:
                    names.append(b[pos:pos + nlen].decode("utf-8"))
                except UnicodeDecodeError:
                    raise FrameError(f"dtype field name is not UTF-8 at offset {base + pos}") from None
                pos += nlen
                (off,) = struct.unpack_from("<I", b, pos)
                pos += 4
                fdt, pos = _dec_dtype(b, pos, depth + 1, base, fields)
                if off + fdt.itemsize > itemsize:
                    raise FrameError(f"dtype field {names[-1]!r} ends past the itemsize {itemsize} "
                                     f"(before offset {base + pos})")
                formats.append(fdt)
                offsets.append(off)
            try:
                dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize})
            except (TypeError, ValueError) as e:
                raise FrameError(f"bad structured dtype at offset {base + pos}: {e}") from None
            if dt.itemsize == 0:
                raise FrameError(f"structured dtype of itemsize 0 at offset {base + pos}")
            return dt, pos
        if code == _D_SUBARRAY:
            _, ndim = struct.unpack_from("<BB", b, pos)
            if not 1 <= ndim <= MAX_NDIM:
                raise FrameError(f"sub-array of {ndim} dimensions at offset {base + pos}")
            dims = struct.unpack_from(f"<{ndim}I", b, pos + 2)
            pos += 2 + 4 * ndim
            sub, pos = _dec_dtype(b, pos, depth + 1, base, fields)
            n = 1
            for d in dims:
                n *= d
            if n == 0 or n * sub.itemsize > MAX_ITEMSIZE:
                raise FrameError(f"sub-array shape {dims} is empty or too large at offset {base + pos}")
            try:
                return np.dtype((sub, dims)), pos
            except (TypeError, ValueError) as e:
                raise FrameError(f"bad sub-array dtype at offset {base + pos}: {e}") from None
    except struct.error:
        raise FrameError(f"dtype descriptor truncated at offset {base + pos}") from None
    raise FrameError(f"unknown dtype descriptor code {code} at offset {base + pos}")


def subarray_ndim(dt: np.dtype) -> int:
    """The most dimensions sub-array fields add along any path through ``dt``: a view of such a
    field has the array's dimensions plus these, and numpy caps the sum (32 before numpy 2)."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return len(shape) + subarray_ndim(base)
    if dt.names is not None and dt.fields is not None:
        return max((subarray_ndim(dt.fields[n][0]) for n in dt.names), default=0)
    return 0


MAX_CODE_POINT = 0x10FFFF
UCS4Plan = Tuple[np.dtype, List[Tuple[str, ...]]]


def _ucs4_shadow(dt: np.dtype, path: Tuple[str, ...], paths: List[Tuple[str, ...]]) -> Any:
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return (_ucs4_shadow(base, path, paths), shape)
    if dt.names is not None and dt.fields is not None:
        return {"names": list(dt.names),
                "formats": [_ucs4_shadow(dt.fields[n][0], path + (n,), paths) for n in dt.names],
                "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": dt.itemsize}
    if dt.kind == "U":
        paths.append(path)
        return np.dtype((np.dtype(dt.byteorder.replace("|", "=") + "u4"), (dt.itemsize // 4,)))
    return np.dtype((np.void, dt.itemsize))


def ucs4_plan(dt: np.dtype) -> Optional[UCS4Plan]:
    """How to check the UCS-4 text in an array of ``dt`` (None: it has none): the same layout with
    each text field seen as 32-bit integers, and the paths to those fields."""
    if not _has_ucs4(dt):
        return None
    paths: List[Tuple[str, ...]] = []
    shadow = np.dtype(_ucs4_shadow(dt, (), paths))
    return shadow, paths


def _has_ucs4(dt: np.dtype) -> bool:
    if dt.subdtype is not None:
        return _has_ucs4(dt.subdtype[0])
    if dt.names is not None and dt.fields is not None:
        return any(_has_ucs4(dt.fields[n][0]) for n in dt.names)
    return dt.kind == "U"


def check_ucs4(plan: UCS4Plan, payload: Any, where: int) -> None:
    """Every UCS-4 unit of the payload is a code point (<= U+10FFFF): numpy cannot even show a
    larger one (SystemError from repr, str or an element), so a frame holding one is malformed."""
    shadow, paths = plan
    arr = np.frombuffer(payload, dtype=shadow)
    for path in paths:
        v = arr
        for name in path:
            v = v[name]
        if v.size and int(v.max()) > MAX_CODE_POINT:
            raise FrameError(f"text field {'.'.join(path) or 'of the array'} holds a value above U+10FFFF "
                             f"(payload at offset {where})")


def dtype_from_wire(b: bytes, base: int = 0) -> np.dtype:
    """Parse a binary dtype descriptor; ``base`` is its offset in the frame, for error messages."""
    if len(b) > MAX_DTYPE_BYTES:
        raise FrameError(f"dtype descriptor of {len(b)} bytes exceeds {MAX_DTYPE_BYTES} at offset {base}")
    b = bytes(b)
    if b[:1] == bytes([_D_SUBARRAY]):
        # numpy folds a top-level sub-array into the array's shape, so the header's shape would lie
        raise FrameError(f"a sub-array dtype is allowed only inside a struct (at offset {base})")
    dt, end = _dec_dtype(b, 0, 0, base, [0])
    if end != len(b):
        raise FrameError(f"{len(b) - end} trailing bytes after the dtype descriptor at offset {base + end}")
    return dt


def check_shape(shape: Tuple[int, ...], itemsize: int, payload_len: int, where: int) -> int:
    """The element count of ``shape``, after the checks numpy would otherwise fail with ValueError.

    The product of the non-zero dimensions times the itemsize must stay within numpy's limit on an
    array's size (even an empty array's), and the product of all of them times the itemsize must
    equal the payload length.
    """
    nonzero = itemsize
    count = 1
    for d in shape:
        count *= d
        if d:
            nonzero *= d
    if nonzero > MAX_ARRAY_BYTES:
        raise FrameError(f"shape {list(shape)} x itemsize {itemsize} is too large for an array "
                         f"(shape at offset {where})")
    if count * itemsize != payload_len:
        raise FrameError(f"shape {list(shape)} x itemsize {itemsize} != payload length {payload_len} "
                         f"(shape at offset {where})")
    return count


# ---------------------------------------------------------------- user map
MetaValue = Union[str, int, float]


def meta_to_wire(meta: Mapping[str, Any]) -> bytes:
    """Serialize the user map (str -> str/int/float), enforcing its bounds."""
    if not meta:
        return b""
    if len(meta) > MAX_META_ENTRIES:
        raise FrameError(f"meta has {len(meta)} entries (limit {MAX_META_ENTRIES})")
    parts = [struct.pack("<H", len(meta))]
    for k, v in meta.items():
        if not isinstance(k, str):
            raise FrameError(f"meta key {k!r} is not a str")
        kb = utf8(k, f"meta key {k!r}")
        if not kb or len(kb) > MAX_META_KEY_BYTES:
            raise FrameError(f"meta key {k!r} must be 1 to {MAX_META_KEY_BYTES} bytes of UTF-8")
        parts.append(struct.pack("<B", len(kb)) + kb)
        if isinstance(v, str):
            vb = utf8(v, f"meta value for {k!r}")
            if len(vb) > MAX_META_STR_BYTES:
                raise FrameError(f"meta value for {k!r} exceeds {MAX_META_STR_BYTES} bytes")
            parts.append(struct.pack("<BH", _META_STR, len(vb)) + vb)
        elif isinstance(v, (int, np.integer)):
            if not -(1 << 63) <= int(v) < (1 << 63):
                raise FrameError(f"meta value for {k!r} does not fit in int64")
            parts.append(struct.pack("<Bq", _META_INT, int(v)))
        elif isinstance(v, (float, np.floating)):
            parts.append(struct.pack("<Bd", _META_FLOAT, float(v)))
        else:
            raise FrameError(f"meta value for {k!r} is {type(v).__name__}; only str, int and float are allowed")
    blob = b"".join(parts)
    if len(blob) > MAX_META_BYTES:
        raise FrameError(f"meta of {len(blob)} bytes exceeds {MAX_META_BYTES}")
    return blob


def meta_from_wire(b: Union[bytes, memoryview], base: int = 0) -> Dict[str, MetaValue]:
    b = bytes(b)
    if len(b) > MAX_META_BYTES:
        raise FrameError(f"meta of {len(b)} bytes exceeds {MAX_META_BYTES} at offset {base}")
    out: Dict[str, MetaValue] = {}
    pos = 0
    try:
        (n,) = struct.unpack_from("<H", b, 0)
        pos = 2
        if n > MAX_META_ENTRIES:
            raise FrameError(f"meta has {n} entries (limit {MAX_META_ENTRIES}) at offset {base}")
        for _ in range(n):
            klen = b[pos]
            pos += 1
            if not 1 <= klen <= MAX_META_KEY_BYTES or pos + klen > len(b):
                raise FrameError(f"bad meta key length {klen} at offset {base + pos - 1}")
            try:
                key = b[pos:pos + klen].decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError(f"meta key is not UTF-8 at offset {base + pos}") from None
            if key in out:
                raise FrameError(f"duplicate meta key {key!r} at offset {base + pos}")
            pos += klen
            t = b[pos]
            pos += 1
            if t == _META_STR:
                (vlen,) = struct.unpack_from("<H", b, pos)
                pos += 2
                if vlen > MAX_META_STR_BYTES or pos + vlen > len(b):
                    raise FrameError(f"bad meta string length {vlen} at offset {base + pos - 2}")
                try:
                    out[key] = b[pos:pos + vlen].decode("utf-8")
                except UnicodeDecodeError:
                    raise FrameError(f"meta value is not UTF-8 at offset {base + pos}") from None
                pos += vlen
            elif t == _META_INT:
                (out[key],) = struct.unpack_from("<q", b, pos)
                pos += 8
            elif t == _META_FLOAT:
                (out[key],) = struct.unpack_from("<d", b, pos)
                pos += 8
            else:
                raise FrameError(f"unknown meta value type {t} at offset {base + pos - 1}")
    except (struct.error, IndexError):
        raise FrameError(f"meta truncated at offset {base + pos}") from None
    if pos != len(b):
        raise FrameError(f"{len(b) - pos} trailing bytes in meta at offset {base + pos}")
    return out


def default_encoding(arr: np.ndarray) -> str:
    if arr.dtype.names is not None:
        return "pointcloud" if {"x", "y", "z"} <= set(arr.dtype.names) else "struct"
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return "bgr8"
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return "mono8"
    if arr.dtype == np.uint16 and arr.ndim == 2:
        return "mono16"
    return "ndarray"


def encode_str(value: Any, what: str, limit: int) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise FrameError(f"{what} must be a str, not {type(value).__name__}")
    b = utf8(value, what)
    if len(b) > limit:
        raise FrameError(f"{what} is {len(b)} bytes of UTF-8 (limit {limit})")
    return b
