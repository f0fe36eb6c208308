"""Differential fuzzing engine for the two wire codecs (the compiled core and its pure-Python twin).

Shared by tests/unit/test_mutation_corpus.py, tests/unit/test_differential.py,
tests/unit/test_hostile_regressions.py, tests/unit/test_subscription_hostile.py and ci/fuzz.py
(which loads this file by path, so it imports nothing from the tests package). Three parts:

- seed frames: valid frames from each available encoder, covering every dtype kind, byte order,
  zero-d and zero-size arrays, structured dtypes (the lidar struct, nested structs, sub-array
  fields, overlapping fields), opaque bytes payloads, checksums, meta of every value type, long names;
- structure-aware mutators, driven by a seeded ``random.Random``: a seed is parsed into its fixed
  part, records and payload, mutated at that level (records replaced by grammar-built, often invalid
  descriptors, shapes, maps; dropped, duplicated, reordered, unknown tags, flags), reassembled with
  consistent lengths, then mutated at the byte level (fixed fields set to boundary values, flips,
  truncation, appended bytes) and, most of the time, resealed so the mutation reaches the semantic
  checks behind the header CRC; fragments get the same treatment;
- ``classify``: each implementation's outcome ("ok", "FrameError", "escape:<ExceptionType>", or
  "wrong:<check>" for an accepted frame that breaks an invariant: its payload, shape or byte count
  differ from the header's, its array is writable, or the codec cannot re-encode it to an equal
  frame) and whether the implementations agree (same outcome and, when both accept, equal results
  field by field).
"""
from __future__ import annotations

import math
import random
import re
import struct
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from msight_fast import _impl, _pywire
from msight_fast import _schema as S
from msight_fast.errors import FrameError

U64 = (1 << 64) - 1
# boundary values for the fixed fields (masked to each field's width where used)
INTERESTING = (0, 1, 63, 64, 65, 88, 2**16 - 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_DIMS = (0, 0, 1, 1, 2, 3, 7, 63, 64, 65, 255, 256, 2**16 - 1, 2**31 - 1, 2**32 - 1, 2**32,
                    2**62, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_U32 = (0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
INTERESTING_BYTES = (0, 1, 0x7F, 0x80, 0xFE, 0xFF)

# (offset, size) of each fixed-header field: docs/wire-format.md section 1
FIXED_FIELDS = ((4, 1), (5, 1), (6, 2), (8, 4), (12, 4), (16, 2), (18, 2), (20, 4), (24, 8), (32, 8),
                (40, 8), (48, 8), (56, 8), (64, 8), (72, 8), (80, 8))
# (offset, size) of each fragment-header field: _schema.FRAG
FRAG_FIELDS = ((4, 1), (5, 1), (6, 2), (8, 8), (16, 8), (24, 4), (28, 4), (32, 8), (40, 8), (48, 4),
               (52, 4), (56, 4), (60, 4))


def implementations(which: str = "both") -> Dict[str, ModuleType]:
    """The codecs to compare: "cython" only where the compiled core is in use (not under
    MSIGHT_FAST_NO_EXTENSIONS=1), "python" always."""
    out: Dict[str, ModuleType] = {}
    if which in ("both", "cython") and _impl.HAS_EXTENSIONS:
        out["cython"] = _impl.impl
    if which in ("both", "python"):
        out["python"] = _pywire
    return out


# the active codec's CRC: the compiled one where loaded (fast), else the twin's
crc32c: Callable[..., int] = _impl.impl.crc32c


def reseal(buf: bytearray, payload_crc: bool = False) -> bytes:
    """Recompute the header CRC (and, if asked and flagged, the payload CRC) over what is there."""
    if len(buf) >= 16:
        hl = min(struct.unpack_from("<I", buf, 8)[0], len(buf))
        if payload_crc and len(buf) >= 32 and struct.unpack_from("<H", buf, 6)[0] & S.FLAG_PAYLOAD_CRC:
            poff = struct.unpack_from("<Q", buf, 24)[0]
            if poff <= len(buf):
                struct.pack_into("<I", buf, 20, crc32c(bytes(buf[poff:])))
        if hl >= 16:
            struct.pack_into("<I", buf, 12, crc32c(bytes(buf[16:hl]), crc32c(bytes(buf[:12]))))
    return bytes(buf)


def reseal_fragment(buf: bytearray, fix_len: bool = False) -> bytes:
    """Recompute a fragment's CRC (and optionally its chunk_len) over what is there."""
    if len(buf) >= S.FRAG_HEADER_LEN:
        if fix_len:
            struct.pack_into("<I", buf, 52, (len(buf) - S.FRAG_HEADER_LEN) & 0xFFFFFFFF)
        struct.pack_into("<I", buf, 60, crc32c(bytes(buf[S.FRAG_HEADER_LEN:]), crc32c(bytes(buf[:60]))))
    return bytes(buf)


# ---------------------------------------------------------------- frames as parts
@dataclass
class Parts:
    """A frame taken apart: the 88-byte fixed part, an extension of it (a newer minor's fields),
    the records in order as (tag, record flags, value), and the payload."""
    fixed: bytearray
    extra: bytes
    records: List[Tuple[int, int, bytes]]
    payload: bytes

    def copy(self) -> Parts:
        return Parts(bytearray(self.fixed), self.extra, list(self.records), self.payload)

    @property
    def flags(self) -> int:
        return struct.unpack_from("<H", self.fixed, 6)[0]

    @flags.setter
    def flags(self, v: int) -> None:
        struct.pack_into("<H", self.fixed, 6, v & 0xFFFF)

    def set_record(self, tag: int, value: bytes) -> None:
        """Replace the first record with ``tag`` (appended if absent)."""
        for i, (t, rf, _) in enumerate(self.records):
            if t == tag:
                self.records[i] = (t, rf, value)
                return
        self.records.append((tag, 0, value))


def parse(enc: bytes) -> Parts:
    """Take a valid encoded frame apart (the seeds: no validation here)."""
    hl, fixed_len = struct.unpack_from("<I", enc, 8)[0], struct.unpack_from("<H", enc, 16)[0]
    poff = struct.unpack_from("<Q", enc, 24)[0]
    recs, pos = [], fixed_len
    while pos < hl:
        tag, rf, n = S.RECORD.unpack_from(enc, pos)
        recs.append((tag, rf, bytes(enc[pos + 8:pos + 8 + n])))
        pos += 8 + n
    return Parts(bytearray(enc[:S.FIXED_LEN]), bytes(enc[S.FIXED_LEN:fixed_len]), recs, bytes(enc[poff:]))


def assemble(p: Parts) -> bytearray:
    """Put parts back together with consistent lengths, offsets, padding and CRCs."""
    body = p.extra + b"".join(S.RECORD.pack(t, rf, len(v)) + v for t, rf, v in p.records)
    hl = S.FIXED_LEN + len(body)
    off = S.align_up(hl)
    fixed = bytearray(p.fixed)
    struct.pack_into("<I", fixed, 8, hl & 0xFFFFFFFF)
    struct.pack_into("<H", fixed, 16, (S.FIXED_LEN + len(p.extra)) & 0xFFFF)
    pcrc = crc32c(p.payload) if p.flags & S.FLAG_PAYLOAD_CRC else 0
    struct.pack_into("<IQQ", fixed, 20, pcrc, off, len(p.payload))
    buf = bytearray(bytes(fixed) + body + bytes(off - hl) + p.payload)
    return bytearray(reseal(buf))


# ---------------------------------------------------------------- seed frames
def _lidar_dtype() -> np.dtype:
    return np.dtype({"names": ["x", "y", "z", "intensity", "time", "column", "ring", "return_type"],
                     "formats": ["<f4"] * 5 + ["<u2", "u1", "u1"],
                     "offsets": [0, 4, 8, 12, 16, 20, 22, 23], "itemsize": 24})


def _seed_dtypes() -> List[Tuple[np.dtype, Tuple[int, ...]]]:
    scalars = ["|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8", "<c8", "<c16",
               "|b1", ">u2", ">i4", ">f4", ">f8", ">c16", "|S5", "<U3", ">U2", "|V7"]
    if np.dtype(np.longdouble).itemsize in (12, 16):
        scalars += [np.dtype(np.longdouble).str, np.dtype(np.clongdouble).str]
    out: List[Tuple[np.dtype, Tuple[int, ...]]] = []
    shapes = [(3, 4), (5,), (2, 3, 2)]
    for i, s in enumerate(scalars):
        out.append((np.dtype(s), shapes[i % len(shapes)]))
    out += [(np.dtype("<f4"), ()), (np.dtype("|u1"), ()), (np.dtype(">c16"), ()),
            (np.dtype("<u2"), (0, 3)), (np.dtype("<f4"), (0, 2)), (np.dtype("|u1"), (0,)),
            (np.dtype("|u1"), (1,) * 31 + (2,)), (np.dtype("|u1"), (4, 5, 3))]
    lidar = _lidar_dtype()
    nested = np.dtype([("a", "<u2"), ("b", [("c", "<f4"), ("d", "|u1", (3,))]), ("e", ">i8")])
    subarr = np.dtype([("m", "<f8", (2, 3)), ("n", "|S2", (4,)), ("o", "<u2", (1, 1, 2))])
    overlap = np.dtype({"names": ["lo", "whole"], "formats": ["<u2", "<u4"], "offsets": [0, 0], "itemsize": 8})
    padded = np.dtype({"names": ["a"], "formats": ["u1"], "offsets": [3], "itemsize": 8})
    named = np.dtype([("ñame", "<i2"), ("名", ">u4"), ("x" * 40, "|S3")])
    deep: Any = "<u2"
    for k in range(6):
        deep = [(f"l{k}", deep), (f"p{k}", "|u1")]
    out += [(lidar, (7,)), (lidar, (0,)), (lidar, ()), (nested, (3,)), (subarr, (2,)), (overlap, (4,)),
            (padded, (2, 2)), (named, (2,)), (np.dtype(deep), (2,))]
    return out


def _meta_samples() -> List[Optional[Dict[str, Any]]]:
    return [
        None,
        {"s": "text", "empty": "", "u": "ünï名", "i": 0, "neg": -(2**63), "big": 2**63 - 1, "f": 1.5,
         "nan": float("nan"), "inf": float("-inf"), "nz": -0.0, "flag": True},
        {"k" * 64: "v" * 1024},
        {f"k{i}": i for i in range(64)},
    ]


def seed_specs() -> List[Tuple[str, Any, Dict[str, Any], bool]]:
    """(kind, payload, frame fields, checksum) of every seed frame, deterministic."""
    rng = np.random.default_rng(20240601)
    metas = _meta_samples()
    specs: List[Tuple[str, Any, Dict[str, Any], bool]] = []
    for i, (dt, shape) in enumerate(_seed_dtypes()):
        raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * dt.itemsize, dtype=np.uint8)
        plan = S.ucs4_plan(dt)
        if plan is not None and raw.size:     # text holds code points (the writer refuses others)
            shadow, paths = plan
            for path in paths:
                v = np.ndarray((raw.size // shadow.itemsize,), shadow, raw)
                for name in path:
                    v = v[name]
                v &= 0xFFFF
        arr = np.frombuffer(raw.tobytes(), dtype=dt).reshape(shape)
        fields = {"sensor_name": f"sensor{i}", "meta": metas[i % 2]}
        if i % 5 == 0:
            fields["device_name"] = "dev"
        specs.append(("array", arr, fields, i % 3 == 0))
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)) + b"\xff\xd9"
    png = b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 100, dtype=np.uint8))
    specs += [
        ("bytes", jpeg, {"sensor_name": "cam", "encoding": "jpeg"}, True),
        ("bytes", jpeg, {"sensor_name": "cam", "encoding": "jpeg", "meta": metas[1]}, False),
        ("bytes", png, {"sensor_name": "cam", "encoding": "png", "device_name": "d" * 255}, True),
        ("bytes", b"", {"sensor_name": "", "encoding": ""}, False),
        ("bytes", b"\x00", {"sensor_name": "s" * 255, "encoding": "e" * 64, "meta": metas[2]}, True),
        ("bytes", bytes(64), {"sensor_name": "é" * 127, "encoding": "bytes", "meta": metas[3]}, False),
        ("array", np.arange(12, dtype="<u2").reshape(3, 4), {"sensor_name": "s" * 255, "device_name": "名" * 85,
                                                             "encoding": "x" * 64, "meta": metas[2]}, True),
    ]
    return specs


def _build(wire: ModuleType, spec: Tuple[str, Any, Dict[str, Any], bool], n: int) -> bytes:
    kind, obj, fields, checksum = spec
    if kind == "array":
        ts = -5 if n % 7 == 0 else 1_700_000_000_000_000_000 + n
        f = wire.Frame.from_array(obj, frame_id=1000 + n, capture_ts_ns=ts, **fields)
    else:
        f = wire.Frame.from_bytes(obj, frame_id=(U64 - n) if n % 2 else n, capture_ts_ns=n, **fields)
    f.seq, f.publisher_id = n, (0 if n % 4 == 0 else 0xDEADBEEF00000000 + n)
    f.creation_ts_ns, f.publish_ts_ns = -(2**63) if n % 9 == 0 else n * 3, 2**63 - 1 if n % 6 == 0 else 0
    return wire.encode(f, checksum=checksum)


def seed_frames(impls: Optional[Dict[str, ModuleType]] = None) -> Tuple[List[bytes], List[str]]:
    """Every seed encoded by each implementation; returns (unique encodings, mismatches), where a
    mismatch names a seed the encoders turned into different bytes (they must be bit-identical)."""
    impls = implementations() if impls is None else impls
    out: List[bytes] = []
    seen = set()
    mismatches: List[str] = []
    for n, spec in enumerate(seed_specs()):
        encs = {name: _build(w, spec, n) for name, w in impls.items()}
        if len(set(encs.values())) > 1:
            mismatches.append(f"seed {n} ({spec[0]}, {getattr(spec[1], 'dtype', '')}): encoders differ")
        for e in encs.values():
            if e not in seen:
                seen.add(e)
                out.append(e)
    return out, mismatches


# ---------------------------------------------------------------- grammar-built pieces
def _u32(rng: random.Random) -> int:
    return rng.choice(INTERESTING_U32) if rng.random() < 0.5 else rng.randrange(1 << 32)


def gen_scalar(rng: random.Random, valid: float) -> Tuple[bytes, int]:
    """A scalar descriptor and the itemsize it claims."""
    ok = rng.random() < valid
    kind = rng.choice("biufcSUV") if ok or rng.random() < 0.5 else rng.choice("OMmxz?\x00\xff")
    if ok or rng.random() < 0.6:
        bo = "|" if kind in "bSUV" and rng.random() < 0.7 else rng.choice("<>")
    else:
        bo = rng.choice("=!\x00|<>")
    sizes = {"b": [1], "i": [1, 2, 4, 8], "u": [1, 2, 4, 8], "f": [2, 4, 8, np.dtype(np.longdouble).itemsize],
             "c": [8, 16, 2 * np.dtype(np.longdouble).itemsize], "S": [1, 2, 5, 16], "U": [4, 8, 12],
             "V": [1, 3, 7, 24]}
    if ok and kind in sizes:
        size = rng.choice(sizes[kind])
    else:
        size = rng.choice((0, 3, 5, 6, 12, 32, 2**31 - 1, 2**31, 2**32 - 1, rng.randrange(1, 64)))
    code = 1 if ok or rng.random() < 0.9 else rng.choice((0, 4, 255))
    blob = struct.pack("<BBBI", code, ord(bo) & 0xFF, ord(kind) & 0xFF, size)
    return blob, size


def gen_descriptor(rng: random.Random, depth: int = 0, top: bool = True, valid: float = 0.8,
                   max_depth: int = 10) -> Tuple[bytes, int]:
    """A dtype descriptor built from the grammar of docs/wire-format.md section 1.2, often invalid
    (bad kinds, sizes, offsets, name lengths, nesting past the limit, top-level sub-arrays, huge
    dims); returns the bytes and the itemsize it claims."""
    r = rng.random()
    if depth >= max_depth or r < 0.5:
        return gen_scalar(rng, valid)
    ok = rng.random() < valid
    if r < 0.85 or (top and rng.random() < valid):      # a top-level sub-array is invalid (section 1.2)
        nf = rng.choice((1, 1, 2, 3, 4)) if ok else rng.choice((0, 1, 2, 5, 513, 60000))
        parts, end = [], 0
        names = set()
        for k in range(min(nf, 6)):
            name = rng.choice(("x", "y", f"f{k}", "ñ", "名" * 3, "a" * 255))
            if name in names and ok:
                name = f"{name}{k}"
            names.add(name)
            nb = name.encode("utf-8")
            nlen = len(nb)
            if not ok and rng.random() < 0.3:
                nb = rng.choice((b"", b"\xff\xfe", b"\xe5\x90", nb))
                nlen = rng.choice((0, len(nb), len(nb) + 1, 0xFFFF))
            child, csize = gen_descriptor(rng, depth + 1, False, valid, max_depth)
            if ok or rng.random() < 0.5:
                off = end if rng.random() < 0.8 else max(0, end - rng.randrange(1, 4))   # overlap sometimes
            else:
                off = rng.choice((1, 2**31, 2**32 - 1, rng.randrange(64)))
            end = max(end, (off + csize) & 0xFFFFFFFF)
            parts.append(struct.pack("<H", nlen & 0xFFFF) + nb + struct.pack("<I", off & 0xFFFFFFFF) + child)
        itemsize = end + (rng.choice((0, 0, 1, 8)) if ok else rng.choice((-1, 0, 2**31)))
        itemsize = max(0, itemsize) & 0xFFFFFFFF
        return struct.pack("<BIH", 2, itemsize, nf & 0xFFFF) + b"".join(parts), itemsize
    ok = rng.random() < valid
    ndim = rng.choice((1, 1, 2, 3)) if ok else rng.choice((0, 4, 32, 33, 255))
    dims = [rng.choice((1, 2, 3, 4)) if ok else rng.choice((0, 1, 2, 2**16, 2**31 - 1, 2**32 - 1))
            for _ in range(min(ndim, 40))]
    child, csize = gen_descriptor(rng, depth + 1, False, valid, max_depth)
    return struct.pack(f"<BB{len(dims)}I", 3, ndim, *dims) + child, math.prod(dims) * csize


_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _field_name(k: int, name_len: int) -> bytes:
    """Distinct for k < 3844 when name_len >= 2 (62 x 62); name_len 1 repeats (an invalid struct)."""
    s = _ALNUM[(k // 62) % 62] + _ALNUM[k % 62]
    return (s[-name_len:] if name_len < 2 else s.ljust(name_len, "n")).encode()


def gen_wide_struct(rng: random.Random) -> Tuple[bytes, int]:
    """A struct at or past the field limits (512 per struct, 1,024 in all) and near the 16 KB
    descriptor limit: the costliest descriptors to parse."""
    def one(nf: int, name_len: int) -> bytes:
        return struct.pack("<BIH", 2, nf, nf) + b"".join(
            struct.pack("<H", name_len) + _field_name(k, name_len) + struct.pack("<IBBBI", k, 1, ord("|"), ord("u"), 1)
            for k in range(nf))
    if rng.random() < 0.7:
        nf = rng.choice((511, 512, 513))
        return one(nf, rng.choice((1, 2, 4, 16))), nf
    per = rng.choice((340, 341))                # 1,023 or 1,026 fields in all, the outer 3 included
    inner = [one(per, 2) for _ in range(3)]
    return struct.pack("<BIH", 2, 3 * per, 3) + b"".join(
        struct.pack("<H", 1) + b"abc"[i:i + 1] + struct.pack("<I", i * per) + d for i, d in enumerate(inner)), 3 * per


def gen_shape(rng: random.Random, payload_len: int, itemsize: int) -> bytes:
    """A shape record: ndim 0..33, dims from boundary values, or a shape that fits the payload."""
    r = rng.random()
    if r < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30)))   # any length, maybe not 8k
    if r < 0.4 and itemsize and payload_len % itemsize == 0:
        n = payload_len // itemsize
        dims = [n] if rng.random() < 0.5 else [1] * rng.randrange(0, 4) + [n] + [1] * rng.randrange(0, 3)
        if rng.random() < 0.2:
            dims = [0, rng.choice(INTERESTING_DIMS)] if n == 0 else dims
        return struct.pack(f"<{len(dims)}Q", *dims)
    ndim = rng.choice((0, 1, 1, 2, 2, 3, 4, 8, 31, 32, 33))
    dims = [rng.choice(INTERESTING_DIMS) if rng.random() < 0.7 else rng.randrange(0, 10) for _ in range(ndim)]
    return struct.pack(f"<{ndim}Q", *dims)


def gen_meta(rng: random.Random, valid: float = 0.6) -> bytes:
    """A user map (docs/wire-format.md section 1.3), often invalid: counts, key lengths, types,
    string lengths, duplicate keys, non-UTF-8, trailing or missing bytes, NaN payloads."""
    ok = rng.random() < valid
    n = rng.choice((0, 1, 2, 3, 5)) if ok or rng.random() < 0.5 else rng.choice((64, 65, 0xFFFF))
    out = [struct.pack("<H", n)]
    keys = set()
    for k in range(min(n, 8) if not ok else n):
        key = rng.choice(("a", "b", "名", "k" * 64, f"k{k}")).encode()
        if ok:
            while key in keys:
                key += b"_"
        keys.add(key)
        klen = len(key)
        if not ok and rng.random() < 0.3:
            key = rng.choice((b"", b"\xff", b"k" * 65, key))
            klen = rng.choice((0, len(key), len(key) + 1, 255))
        out.append(struct.pack("<B", min(klen, 255)) + key)
        t = rng.choice((1, 2, 3)) if ok or rng.random() < 0.8 else rng.choice((0, 4, 255))
        out.append(struct.pack("<B", t))
        if t == 1:
            v = rng.choice(("", "v", "ünï", "x" * 1024)).encode()
            vlen = len(v)
            if not ok and rng.random() < 0.3:
                v = rng.choice((b"\xff\xfe", b"x" * 1025, v))
                vlen = rng.choice((len(v), len(v) + 1, 0xFFFF))
            out.append(struct.pack("<H", vlen) + v)
        elif t == 2:
            out.append(struct.pack("<q", rng.choice((0, -1, 2**63 - 1, -(2**63), rng.randrange(-2**40, 2**40)))))
        else:
            out.append(struct.pack("<Q", rng.choice((0x7FF8000000000001, 0xFFF0000000000000, 0x8000000000000000,
                                                     rng.randrange(1 << 64)))))
    blob = b"".join(out)
    if not ok and rng.random() < 0.3:
        blob = blob[:rng.randrange(len(blob) + 1)] if rng.random() < 0.5 else blob + b"\0" * rng.randrange(1, 4)
    return blob


# ---------------------------------------------------------------- structure-level mutators
def _m_shape(rng: random.Random, p: Parts) -> None:
    p.set_record(S.TAG_SHAPE, gen_shape(rng, len(p.payload), rng.choice((1, 2, 4, 8, 24))))


def _m_dtype(rng: random.Random, p: Parts) -> None:
    r = rng.random()
    if r < 0.02:
        blob, _ = gen_wide_struct(rng)
    elif r < 0.8:
        blob, _ = gen_descriptor(rng, valid=rng.choice((0.5, 0.9)))
    elif r < 0.9:
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    else:
        old = next((v for t, _, v in p.records if t == S.TAG_DTYPE), b"\x01<u\x02\0\0\0")
        b = bytearray(old)
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        blob = bytes(b)
    p.set_record(S.TAG_DTYPE, blob)


def _m_coherent(rng: random.Random, p: Parts) -> None:
    """A grammar-built descriptor and a shape whose product times the claimed itemsize is the
    payload length: the frames that get furthest, often accepted."""
    blob, itemsize = gen_descriptor(rng, valid=0.95, max_depth=rng.choice((3, 10)))
    ndim = rng.choice((0, 1, 1, 2, 3, 32))
    dims = [rng.choice((1, 1, 2, 3)) for _ in range(ndim)]
    if rng.random() < 0.2 and ndim:
        dims[rng.randrange(ndim)] = 0
        if rng.random() < 0.5:                      # a zero dim makes every other dim legal
            dims[rng.randrange(ndim)] = rng.choice(INTERESTING_DIMS)
    count = 1
    for d in dims:
        count *= d
    nbytes = count * itemsize
    if nbytes > 4096:
        dims, nbytes = [0] + dims[1:] if dims else [0], 0
    p.payload = bytes(rng.randrange(256) for _ in range(nbytes)) if nbytes < 256 else bytes(nbytes)
    p.set_record(S.TAG_DTYPE, blob)
    p.set_record(S.TAG_SHAPE, struct.pack(f"<{len(dims)}Q", *dims))
    p.flags = p.flags | S.FLAG_NDARRAY


def _m_dup(rng: random.Random, p: Parts) -> None:
    if p.records:
        r = rng.choice(p.records)
        p.records.insert(rng.randrange(len(p.records) + 1), r)


def _m_drop(rng: random.Random, p: Parts) -> None:
    if p.records:
        del p.records[rng.randrange(len(p.records))]


def _m_shuffle(rng: random.Random, p: Parts) -> None:
    rng.shuffle(p.records)


def _m_unknown(rng: random.Random, p: Parts) -> None:
    tag = rng.choice((0, 7, 8, 200, 0x7FFF, 0xFFFF))
    val = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 5, 40))))
    p.records.insert(rng.randrange(len(p.records) + 1), (tag, rng.choice((0, 0, 1, 0xFFFF)), val))


def _m_rflags(rng: random.Random, p: Parts) -> None:
    if p.records:
        i = rng.randrange(len(p.records))
        t, _, v = p.records[i]
        p.records[i] = (t, rng.choice((1, 0x8000, 0xFFFF)), v)


def _m_flags(rng: random.Random, p: Parts) -> None:
    p.flags = rng.choice((p.flags ^ S.FLAG_NDARRAY, p.flags ^ S.FLAG_PAYLOAD_CRC, p.flags | 0xFFFC,
                          0, 3, rng.randrange(1 << 16)))


def _m_meta(rng: random.Random, p: Parts) -> None:
    p.set_record(S.TAG_META, gen_meta(rng))


def _m_string(rng: random.Random, p: Parts) -> None:
    tag = rng.choice((S.TAG_SENSOR_NAME, S.TAG_DEVICE_NAME, S.TAG_ENCODING))
    p.set_record(tag, rng.choice((b"", b"\xff\xfe", b"\xe5\x90", "名".encode() * 85, b"s" * 255, b"s" * 256,
                                  b"e" * 64, b"e" * 65, b"\x00", b"ok")))


def _m_payload(rng: random.Random, p: Parts) -> None:
    r = rng.random()
    if r < 0.3:
        p.payload = p.payload[:rng.randrange(len(p.payload) + 1)]
    elif r < 0.6:
        p.payload += bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 7, 64))))
    elif r < 0.8:
        p.payload = b""
    elif p.payload:
        b = bytearray(p.payload)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        p.payload = bytes(b)


def _m_extra(rng: random.Random, p: Parts) -> None:
    p.extra = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 8, 24))))
    if rng.random() < 0.5:
        p.fixed[5] = rng.choice((1, 3, 255))        # a newer minor


def _m_ids(rng: random.Random, p: Parts) -> None:
    off = rng.choice((40, 48, 56, 64, 72, 80))
    struct.pack_into("<Q", p.fixed, off, rng.choice(INTERESTING))


STRUCT_MUTATORS: Sequence[Callable[[random.Random, Parts], None]] = (
    _m_shape, _m_shape, _m_dtype, _m_dtype, _m_dtype, _m_coherent, _m_coherent, _m_coherent, _m_dup, _m_drop,
    _m_shuffle, _m_unknown, _m_rflags, _m_flags, _m_meta, _m_meta, _m_string, _m_payload, _m_extra, _m_ids)


# ---------------------------------------------------------------- byte-level mutators
def _pos(rng: random.Random, buf: bytearray) -> int:
    hl = min(struct.unpack_from("<I", buf, 8)[0], len(buf)) if len(buf) >= 12 else len(buf)
    if rng.random() < 0.75 and hl:
        return rng.randrange(hl)
    return rng.randrange(len(buf))


def _b_flip(rng: random.Random, buf: bytearray) -> None:
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        if buf:
            buf[_pos(rng, buf)] ^= 1 << rng.randrange(8)


def _b_set(rng: random.Random, buf: bytearray) -> None:
    for _ in range(rng.choice((1, 2, 3))):
        if buf:
            buf[_pos(rng, buf)] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)


def interesting_for(rng: random.Random, size: int, n: int) -> int:
    """A boundary value for a field of ``size`` bytes in a message of ``n`` bytes."""
    v = rng.choice(INTERESTING + (n - 1, n + 1, n, S.align_up(n), n - 64))
    return v & ((1 << (8 * size)) - 1)


def _b_field(rng: random.Random, buf: bytearray) -> None:
    off, size = rng.choice(FIXED_FIELDS)
    if off + size <= len(buf):
        buf[off:off + size] = interesting_for(rng, size, len(buf)).to_bytes(size, "little")


def _record_offsets(buf: bytes) -> List[int]:
    if len(buf) < S.FIXED_LEN:
        return []
    hl = min(struct.unpack_from("<I", buf, 8)[0], len(buf))
    pos: int = struct.unpack_from("<H", buf, 16)[0]
    out: List[int] = []
    while pos + 8 <= hl and len(out) < 64:
        out.append(pos)
        pos += 8 + struct.unpack_from("<I", buf, pos + 4)[0]
    return out


def _b_record_header(rng: random.Random, buf: bytearray) -> None:
    recs = _record_offsets(bytes(buf))
    if recs:
        pos = rng.choice(recs)
        if rng.random() < 0.7:
            n = (interesting_for(rng, 4, len(buf)) if rng.random() < 0.5
                 else struct.unpack_from("<I", buf, pos + 4)[0] + rng.choice((-8, -1, 1, 8)))
            struct.pack_into("<I", buf, pos + 4, n & 0xFFFFFFFF)
        else:
            struct.pack_into("<H", buf, pos, rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 0xFFFF)))


def _b_truncate(rng: random.Random, buf: bytearray) -> None:
    if buf:
        del buf[rng.choice((rng.randrange(len(buf)), len(buf) - 1, S.FIXED_LEN, _pos(rng, buf))):]


def _b_append(rng: random.Random, buf: bytearray) -> None:
    buf += bytes(rng.randrange(256) if rng.random() < 0.5 else 0 for _ in range(rng.choice((1, 8, 63, 64, 128))))


def _b_splice(rng: random.Random, buf: bytearray) -> None:
    if len(buf) > 1:
        i = _pos(rng, buf)
        if rng.random() < 0.5:
            del buf[i:i + rng.choice((1, 4, 8))]
        else:
            buf[i:i] = bytes(rng.choice((1, 4, 8)))


def _b_padding(rng: random.Random, buf: bytearray) -> None:
    if len(buf) >= 32:
        hl, poff = struct.unpack_from("<I", buf, 8)[0], struct.unpack_from("<Q", buf, 24)[0]
        if hl < poff <= len(buf):
            buf[rng.randrange(hl, poff)] = rng.randrange(1, 256)


BYTE_MUTATORS: Sequence[Callable[[random.Random, bytearray], None]] = (
    _b_flip, _b_set, _b_field, _b_field, _b_field, _b_record_header, _b_record_header, _b_truncate,
    _b_append, _b_splice, _b_padding)


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    kind: str          # "frame" or "fragment"
    buf: bytes
    ops: List[str] = field(default_factory=list)


class Mutator:
    """Turns (seed, case index) into one mutated message; the same pair always gives the same bytes."""

    def __init__(self, seeds: Optional[List[bytes]] = None, fragment_share: float = 0.15) -> None:
        if seeds is None:
            seeds, _ = seed_frames()
        self.seeds = seeds
        self.parts = [parse(s) for s in seeds]
        self.fragment_share = fragment_share

    def case(self, seed: int, index: int) -> Case:
        rng = random.Random(seed * 1_000_003 + index)
        if rng.random() < self.fragment_share:
            return self.fragment_case(rng)
        return self.frame_case(rng)

    def frame_case(self, rng: random.Random) -> Case:
        p = rng.choice(self.parts).copy()
        ops: List[str] = []
        n_struct = rng.choice((0, 1, 1, 1, 2, 3))
        for _ in range(n_struct):
            ms = rng.choice(STRUCT_MUTATORS)
            ms(rng, p)
            ops.append(ms.__name__)
        buf = assemble(p)
        n_bytes = rng.choice((0, 0, 1, 1, 2, 3)) if n_struct else rng.choice((1, 1, 2, 3, 5))
        for _ in range(n_bytes):
            mb = rng.choice(BYTE_MUTATORS)
            mb(rng, buf)
            ops.append(mb.__name__)
        if rng.random() < 0.85:
            ops.append("reseal")
            return Case("frame", reseal(buf, payload_crc=rng.random() < 0.5), ops)
        return Case("frame", bytes(buf), ops)

    def fragments_of(self, rng: random.Random, enc: bytes) -> List[bytes]:
        """Valid fragments of ``enc`` with a random chunk size (packed here, not by the codec)."""
        chunk = rng.choice((1, 7, 64, 100, max(1, len(enc) // 2), max(1, len(enc) - 1)))
        count = -(-len(enc) // chunk)
        fid, pid = rng.randrange(1 << 64), rng.randrange(1 << 64)
        return [pack_fragment(fid, pid, i, count, len(enc), i * chunk, chunk, enc[i * chunk:(i + 1) * chunk])
                for i in range(count)]

    def fragment_case(self, rng: random.Random) -> Case:
        enc = rng.choice(self.seeds)
        frags = self.fragments_of(rng, enc)
        buf = bytearray(rng.choice(frags))
        ops: List[str] = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            r = rng.random()
            if r < 0.5:
                off, size = rng.choice(FRAG_FIELDS)
                buf[off:off + size] = interesting_for(rng, size, len(buf)).to_bytes(size, "little")
                ops.append(f"field@{off}")
            elif r < 0.7:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                ops.append("flip")
            elif r < 0.85:
                del buf[rng.randrange(len(buf)):]
                ops.append("truncate")
            else:
                buf += bytes(rng.choice((1, 8, 64)))
                ops.append("append")
            if not buf:
                break
        if rng.random() < 0.85:
            ops.append("reseal")
            return Case("fragment", reseal_fragment(buf, fix_len=rng.random() < 0.5), ops)
        return Case("fragment", bytes(buf), ops)


def pack_fragment(frame_id: int, publisher_id: int, index: int, count: int, total: int, offset: int,
                  chunk_size: int, chunk: bytes, chunk_len: Optional[int] = None, crc_ok: bool = True) -> bytes:
    """One fragment, packed from docs/wire-format.md section 2 (independently of the codec)."""
    h = bytearray(S.FRAG.pack(S.FRAG_MAGIC, S.VERSION_MAJOR, S.VERSION_MINOR, 0, frame_id & U64,
                              publisher_id & U64, index & 0xFFFFFFFF, count & 0xFFFFFFFF, total & U64,
                              offset & U64, chunk_size & 0xFFFFFFFF,
                              (len(chunk) if chunk_len is None else chunk_len) & 0xFFFFFFFF, 0, 0))
    c = crc32c(chunk, crc32c(bytes(h[:60])))
    struct.pack_into("<I", h, 60, c if crc_ok else c ^ 1)
    return bytes(h) + chunk


# ---------------------------------------------------------------- classification
def _meta_key(meta: Dict[str, Any]) -> Tuple[Any, ...]:
    out = []
    for k in sorted(meta):
        v = meta[k]
        if isinstance(v, float):
            out.append((k, "f", struct.pack("<d", v)))       # bitwise: NaN equals NaN, -0.0 is not 0.0
        else:
            out.append((k, type(v).__name__, v))
    return tuple(out)


def dtype_key(dt: np.dtype) -> Tuple[Any, ...]:
    """Everything that makes a dtype what it is, comparable with == (NumPy's own == ignores some)."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return ("sub", shape, dtype_key(base))
    if dt.names is not None and dt.fields is not None:
        return ("struct", dt.itemsize, tuple((n, dt.fields[n][1], dtype_key(dt.fields[n][0])) for n in dt.names))
    return ("scalar", dt.str)


def _declared(buf: bytes) -> Tuple[int, int, Optional[Tuple[int, ...]]]:
    """(flags, payload offset, declared shape) of a frame a decoder accepted (so well formed)."""
    flags, hl = struct.unpack_from("<H", buf, 6)[0], struct.unpack_from("<I", buf, 8)[0]
    poff = struct.unpack_from("<Q", buf, 24)[0]
    pos = struct.unpack_from("<H", buf, 16)[0]
    shape = None
    while pos + 8 <= hl:
        tag, _, n = S.RECORD.unpack_from(buf, pos)
        if tag == S.TAG_SHAPE:
            shape = struct.unpack_from(f"<{n // 8}Q", buf, pos + 8)
        pos += 8 + n
    return flags, poff, shape


SUMMARY_FIELDS = ("array is None", "dtype ==", "dtype.descr", "dtype structure", "shape", "payload",
                  "array bytes", "sensor_name", "device_name", "encoding", "meta", "frame_id", "seq",
                  "publisher_id", "capture_ts_ns", "creation_ts_ns", "publish_ts_ns")


def summarize(f: Any) -> Tuple[Any, ...]:
    """Every observable of a decoded frame, in SUMMARY_FIELDS order; reads the whole payload."""
    arr = f.array
    if arr is None:
        dt_cmp, descr, dkey, shape, abytes = None, None, None, None, None
    else:
        dt = arr.dtype
        dt_cmp = dt
        try:
            descr = repr(dt.descr)
        except ValueError:              # NumPy has no descr for overlapping or out-of-order fields
            descr = "undefined"
        dkey, shape, abytes = dtype_key(dt), tuple(arr.shape), arr.tobytes()
    return (arr is None, dt_cmp, descr, dkey, shape, bytes(f.data), abytes, f.sensor_name, f.device_name,
            f.encoding, _meta_key(f.meta), f.frame_id, f.seq, f.publisher_id, f.capture_ts_ns, f.creation_ts_ns,
            f.publish_ts_ns)


def _invariant(f: Any, buf: bytes) -> str:
    """The first rule of docs/wire-format.md an accepted frame breaks, or ""."""
    flags, poff, shape = _declared(buf)
    if bytes(f.data) != bytes(buf[poff:]):
        return "payload"
    if (f.array is None) != (not flags & S.FLAG_NDARRAY):
        return "ndarray-flag"
    if f.array is not None:
        if tuple(f.array.shape) != shape:
            return "shape"
        if f.array.nbytes != len(buf) - poff:
            return "nbytes"
        if f.array.flags.writeable:
            return "writeable"
        _every_field(f.array)           # a view of each field, and repr: numpy must accept them all
        repr(f.array[:2] if f.array.ndim else f.array)
    return ""


def _every_field(a: np.ndarray) -> None:
    if a.dtype.names is not None:
        for name in a.dtype.names:
            _every_field(a[name])


Outcome = Tuple[str, Any, str]     # (outcome, summary or None, message)


def decode_outcome(wire: ModuleType, buf: bytes) -> Outcome:
    try:
        f = wire.decode(buf)
    except FrameError:
        return "FrameError", None, ""
    except Exception as e:            # an escape: anything but FrameError is a bug
        return f"escape:{type(e).__name__}", None, str(e)[:300]
    try:
        summary = summarize(f)
        bad = _invariant(f, buf)
    except Exception as e:
        return f"escape:{type(e).__name__}", None, f"reading the accepted frame: {str(e)[:300]}"
    if bad:
        return f"wrong:{bad}", summary, f"accepted, but {bad} breaks docs/wire-format.md"
    # what a codec accepts, it must also send: re-encoded, the frame decodes to the same frame
    # (a receiver that republishes, or a decoder laxer than the grammar's limits, fails here)
    try:
        again = summarize(wire.decode(wire.encode(f)))
    except Exception as e:
        return "wrong:reencode", summary, f"re-encoding the accepted frame: {type(e).__name__}: {str(e)[:300]}"
    diff = [name for name, x, y in zip(SUMMARY_FIELDS, summary, again) if not _same(x, y)]
    if diff:
        return "wrong:reencode", summary, f"re-encoded, the frame differs in {diff}"
    return "ok", summary, ""


def fragment_outcome(wire: ModuleType, buf: bytes) -> Outcome:
    try:
        r = wire.parse_fragment_header(buf)
    except FrameError:
        return "FrameError", None, ""
    except Exception as e:
        return f"escape:{type(e).__name__}", None, str(e)[:300]
    try:
        summary = tuple(int(x) for x in r[:8]) + (bytes(r[8]),)
    except Exception as e:
        return f"escape:{type(e).__name__}", None, f"reading the fragment: {str(e)[:300]}"
    if summary[8] != bytes(buf[S.FRAG_HEADER_LEN:]):
        return "wrong:chunk", summary, "the chunk is not the bytes after the header"
    return "ok", summary, ""


@dataclass
class Verdict:
    outcomes: Dict[str, str]
    messages: Dict[str, str]
    agree: bool
    why: str = ""

    @property
    def failed(self) -> bool:
        """An escape, a broken invariant, or a disagreement."""
        return not self.agree or any(o not in ("ok", "FrameError") for o in self.outcomes.values())

    def signature(self) -> Tuple[Any, ...]:
        """What makes two failures the same bug, roughly (numbers stripped from the messages)."""
        msgs = tuple(sorted((k, "".join(c for c in re.split("['\"]", m[:60])[0] if not c.isdigit()))
                            for k, m in self.messages.items()))      # quoted names and numbers vary
        return tuple(sorted(self.outcomes.items())), msgs, self.why


def classify(buf: bytes, impls: Dict[str, ModuleType], kind: str = "frame") -> Verdict:
    """Each implementation's outcome for ``buf`` and whether they agree (see the module docstring)."""
    run = decode_outcome if kind == "frame" else fragment_outcome
    res = {name: run(w, buf) for name, w in impls.items()}
    outcomes = {k: v[0] for k, v in res.items()}
    messages = {k: v[2] for k, v in res.items() if v[2]}
    why = []
    if len(set(outcomes.values())) > 1:
        why.append("outcome: " + " vs ".join(f"{k}={v}" for k, v in outcomes.items()))
    names = list(res)
    if len(names) > 1 and all(v[1] is not None for v in res.values()):      # all accepted: compare
        a = res[names[0]][1]
        for other in names[1:]:
            b = res[other][1]
            diff = [name for name, x, y in zip(SUMMARY_FIELDS if kind == "frame" else FRAGMENT_FIELDS, a, b)
                    if not _same(x, y)]
            if diff:
                detail = "; ".join(f"{d}: {_short(a, d, kind)} vs {_short(b, d, kind)}" for d in diff[:3])
                why.append(f"results differ ({names[0]} vs {other}) in {detail}")
    return Verdict(outcomes, messages, not why, "; ".join(why))


FRAGMENT_FIELDS = ("frame_id", "publisher_id", "index", "count", "total", "offset", "chunk_size", "sending",
                   "chunk")


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, np.dtype) or isinstance(y, np.dtype):
        return isinstance(x, np.dtype) and isinstance(y, np.dtype) and bool(x == y)
    return type(x) is type(y) and x == y


def _short(summary: Tuple[Any, ...], name: str, kind: str) -> str:
    names = SUMMARY_FIELDS if kind == "frame" else FRAGMENT_FIELDS
    s = repr(summary[names.index(name)])
    return s if len(s) < 80 else s[:77] + "..."


def hexdump(buf: bytes, limit: int = 4096) -> str:
    h = buf[:limit].hex()
    return h if len(buf) <= limit else f"{h}... ({len(buf)} bytes, first {limit} shown)"
