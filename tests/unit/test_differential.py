"""Grammar-based differential fuzzing: Hypothesis builds frames and fragments from the grammar of
docs/wire-format.md (not by mutating bytes) and both codecs must give the same answer.

Descriptors (scalar, struct, sub-array, recursive, valid and invalid), shapes (ndim 0..33, boundary
dims), records (known and unknown tags, duplicates, flags, lengths), user maps (valid and invalid),
payloads whose length matches the shape or not, and header CRCs right (usually) or wrong are put
together with struct; tests/fuzzing.py's classifier compares the outcomes and, when both accept,
every decoded field. Derandomized and database-less, so CI runs the same examples every time.
"""
from __future__ import annotations

import math
import struct
from typing import Any, List, Tuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from msight_fast import _impl
from msight_fast import _schema as S

from ..fuzzing import INTERESTING, INTERESTING_DIMS, INTERESTING_U32, classify, crc32c, implementations

pytestmark = pytest.mark.skipif(not _impl.HAS_EXTENSIONS,
                                reason="differential tests compare the compiled core with the twin, and the "
                                       "compiled core is not loaded (MSIGHT_FAST_NO_EXTENSIONS=1 or a failed build)")

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])

_LD = 16    # long double's itemsize on x86-64 Linux; other sizes are simply invalid there
VALID_SIZES = {"b": [1], "i": [1, 2, 4, 8], "u": [1, 2, 4, 8], "f": [2, 4, 8, _LD], "c": [8, 16, 2 * _LD],
               "S": [1, 3, 16], "U": [4, 8], "V": [1, 5, 24]}

u32s = st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1)


def pick(draw: Any, good: Any, bad: Any, one_in: int = 8) -> Any:
    """Mostly ``good``, one time in ``one_in`` ``bad``: most frames get past the early checks
    (shrinking goes towards ``good``, so a failure shrinks to its one bad choice)."""
    return draw(bad) if draw(st.integers(0, one_in - 1)) == one_in - 1 else draw(good)


@st.composite
def scalars(draw: Any) -> Tuple[bytes, int]:
    """scalar: u8 1, u8 byteorder, u8 kind, u32 itemsize; returns (bytes, claimed itemsize)."""
    kind = pick(draw, st.sampled_from("biufcSUV"), st.sampled_from("OMmx?\x00"))
    bo = pick(draw, st.sampled_from("<>|"), st.sampled_from("=!\x00"))
    size = pick(draw, st.sampled_from(VALID_SIZES.get(kind, [1])), u32s)
    code = pick(draw, st.just(1), st.sampled_from((0, 4, 255)), 20)
    return struct.pack("<BBBI", code, ord(bo), ord(kind), size), size


@st.composite
def descriptors(draw: Any, depth: int = 0) -> Tuple[bytes, int]:
    """A descriptor of section 1.2 (depth up to 10: past the limit of 8), valid or not; a
    sub-array at the top level is one of the invalid ones."""
    form = draw(st.sampled_from(("scalar", "scalar", "struct", "subarray")) if depth < 10 else st.just("scalar"))
    if form == "scalar":
        return draw(scalars())
    if form == "subarray":
        ndim = pick(draw, st.sampled_from((1, 1, 2, 3)), st.sampled_from((0, 32, 33, 255)))
        dims = [pick(draw, st.sampled_from((1, 2, 3)), st.sampled_from((0, 2**16, 2**31 - 1, 2**32 - 1)))
                for _ in range(min(ndim, 33))]
        child, csize = draw(descriptors(depth + 1))
        return struct.pack(f"<BB{len(dims)}I", 3, ndim, *dims) + child, math.prod(dims) * csize
    nfields = pick(draw, st.integers(1, 4), st.sampled_from((0, 512, 513, 0xFFFF)))
    present = min(nfields, pick(draw, st.just(nfields), st.integers(0, 4)))
    fields, end = [], 0
    names = set()
    for k in range(present):
        name = pick(draw, st.text(min_size=1, max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass")),
                    st.sampled_from((b"", b"\xff", b"x" * 255)))
        if name in names:                          # duplicates are one of the invalid choices
            name = pick(draw, st.just(name + str(k).encode()), st.just(name))
        names.add(name)
        nlen = pick(draw, st.just(len(name)), st.sampled_from((0, len(name) + 1, 0xFFFF)))
        child, csize = draw(descriptors(depth + 1))
        off = pick(draw, st.just(end) | st.integers(0, 8), u32s)
        end = max(end, off + csize)
        fields.append(struct.pack("<H", nlen & 0xFFFF) + name + struct.pack("<I", off & 0xFFFFFFFF) + child)
    itemsize = pick(draw, st.just(end) | st.just(end + 8), st.just(max(end - 1, 0)) | u32s) & 0xFFFFFFFF
    return struct.pack("<BIH", 2, itemsize, nfields) + b"".join(fields), itemsize


@st.composite
def shapes(draw: Any) -> List[int]:
    """ndim 0..33; small dims mostly, boundary dims (0, 2**62, 2**63, 2**64 - 1, ...) sometimes."""
    ndim = pick(draw, st.integers(0, 4), st.sampled_from((8, 31, 32, 33)))
    return [pick(draw, st.integers(0, 4), st.sampled_from(INTERESTING_DIMS), 4) for _ in range(ndim)]


@st.composite
def metas(draw: Any) -> bytes:
    """A user map of section 1.3: usually from a valid dict, sometimes built field by field and broken."""
    if draw(st.booleans()):
        keys = st.text(min_size=1, max_size=8).filter(lambda k: len(k.encode("utf-8", "surrogatepass")) <= 64)
        values = (st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=True))
        m = draw(st.dictionaries(keys, values, max_size=5))
        try:
            return S.meta_to_wire(m)
        except Exception:                 # e.g. a lone surrogate: not UTF-8, so not a valid map
            return b"\x00\x00"
    n = draw(st.integers(0, 3) | st.sampled_from((64, 65, 0xFFFF)))
    out = [struct.pack("<H", n)]
    for _ in range(min(n, 4)):
        key = draw(st.sampled_from((b"a", b"b", b"\xff", b"k" * 64, b"k" * 65, b"")))
        klen = draw(st.just(len(key)) | st.sampled_from((0, 255)))
        t = draw(st.sampled_from((1, 2, 3)) | st.sampled_from((0, 4, 255)))
        out.append(bytes([min(klen, 255)]) + key + bytes([t]))
        if t == 1:
            v = draw(st.sampled_from((b"", b"v", b"\xff\xfe", b"x" * 1024, b"x" * 1025)))
            out.append(struct.pack("<H", draw(st.just(len(v)) | st.sampled_from((0xFFFF, len(v) + 1)))) + v)
        elif t in (2, 3):
            out.append(draw(st.binary(min_size=8, max_size=8)))
    blob = b"".join(out)
    return draw(st.just(blob) | st.just(blob[:-1]) | st.just(blob + b"\x00"))


@st.composite
def frames(draw: Any) -> bytes:
    """A whole frame: fixed part, records, padding and payload, put together with _schema.FIXED/RECORD."""
    ndarray = draw(st.booleans()) or draw(st.booleans())
    records: List[Tuple[int, int, bytes]] = []
    itemsize = 1
    shape: List[int] = []
    if ndarray or draw(st.integers(0, 9)) == 0:          # now and then dtype/shape on a bytes frame
        blob, itemsize = draw(descriptors())
        shape = draw(shapes())
        if draw(st.integers(0, 4)) > 0:
            records.append((S.TAG_DTYPE, 0, blob))
        if draw(st.integers(0, 4)) > 0:
            shape_b = struct.pack(f"<{len(shape)}Q", *shape)
            records.append((S.TAG_SHAPE, 0, pick(draw, st.just(shape_b), st.binary(max_size=20), 16)))
    for tag, limit in ((S.TAG_SENSOR_NAME, 255), (S.TAG_DEVICE_NAME, 255), (S.TAG_ENCODING, 64)):
        if draw(st.booleans()):
            v = draw(st.text(max_size=8)).encode("utf-8", "surrogatepass")
            records.append((tag, 0, pick(draw, st.just(v) | st.just(b"s" * limit),
                                         st.sampled_from((b"s" * (limit + 1), b"\xc3")))))
    if draw(st.booleans()):
        records.append((S.TAG_META, 0, draw(metas())))
    if draw(st.integers(0, 5)) == 0:
        records.append((draw(st.sampled_from((0, 7, 999, 0xFFFF))), 0, draw(st.binary(max_size=16))))
    if records and draw(st.integers(0, 7)) == 0:
        records.append(draw(st.sampled_from(records)))                     # a duplicate
    records = draw(st.permutations(records))
    records = [(t, draw(st.sampled_from((0, 0, 0, 0, 1, 0xFFFF))), v) for t, _, v in records]

    count = math.prod(shape) if shape else 1
    want = count * itemsize
    if want <= 4096 and draw(st.integers(0, 7)) > 0:
        plen = want
    else:
        plen = draw(st.integers(0, 300))
    payload = draw(st.binary(min_size=plen, max_size=plen)) if plen <= 64 else bytes(plen)
    extra = pick(draw, st.just(b""), st.binary(min_size=1, max_size=16), 6)    # a newer minor's fixed fields

    body = extra + b"".join(S.RECORD.pack(t, rf, len(v)) + v for t, rf, v in records)
    declared_rlen = pick(draw, st.none(), st.sampled_from(INTERESTING_U32), 16)
    if declared_rlen is not None and records:                          # one record lies about its length
        body = extra + S.RECORD.pack(records[0][0], 0, declared_rlen) + body[len(extra) + 8:]
    hl = S.FIXED_LEN + len(body)
    off = S.align_up(hl)
    flags = (S.FLAG_NDARRAY if ndarray else 0) | draw(st.sampled_from((0, S.FLAG_PAYLOAD_CRC)))
    flags |= draw(st.sampled_from((0, 0, 0, 0x8000)))
    pcrc = crc32c(payload) if flags & S.FLAG_PAYLOAD_CRC else 0
    pcrc = draw(st.just(pcrc) | st.just(pcrc ^ 1)) if draw(st.integers(0, 9)) == 0 else pcrc
    u64 = st.sampled_from(INTERESTING)
    i64 = u64.map(lambda v: v - (1 << 64) if v >= 1 << 63 else v)
    fixed = bytearray(S.FIXED.pack(S.MAGIC, 1, draw(st.sampled_from((0, 1, 255))), flags, hl & 0xFFFFFFFF, 0,
                                   (S.FIXED_LEN + len(extra)) & 0xFFFF, 0, pcrc, off, len(payload),
                                   draw(u64), draw(u64), draw(u64), draw(i64), draw(i64), draw(i64)))
    buf = fixed + body + bytes(off - hl) + payload
    if draw(st.integers(0, 9)) == 0:                                   # a lying fixed field
        field_off, size = draw(st.sampled_from(((8, 4), (16, 2), (24, 8), (32, 8))))
        buf[field_off:field_off + size] = (draw(u64) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    hlen = min(struct.unpack_from("<I", buf, 8)[0], len(buf))
    hcrc = crc32c(bytes(buf[16:hlen]), crc32c(bytes(buf[:12]))) if hlen >= 16 else 0
    struct.pack_into("<I", buf, 12, hcrc if draw(st.integers(0, 19)) else hcrc ^ 0x10)
    return bytes(buf)


def _report(v: Any, buf: bytes) -> str:
    return f"{v.outcomes} {v.why} {v.messages}\nhex: {buf.hex()}"


@SETTINGS
@given(buf=frames())
def test_codecs_agree_on_grammar_built_frames(buf):
    v = classify(buf, implementations())
    event(f"outcome: {'/'.join(sorted(set(v.outcomes.values())))}")      # --hypothesis-show-statistics
    assert not v.failed, _report(v, buf)


@st.composite
def fragments(draw: Any) -> bytes:
    """A fragment of section 2 with boundary values in every field, its CRC right or wrong."""
    chunk = draw(st.binary(max_size=64))
    u64 = st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)
    h = bytearray(S.FRAG.pack(pick(draw, st.just(S.FRAG_MAGIC), st.sampled_from((S.MAGIC, b"\x93MSX"))),
                              pick(draw, st.just(1), st.sampled_from((0, 2, 255))), draw(st.sampled_from((0, 9))),
                              draw(st.sampled_from((0, 0xFFFF))), draw(u64), draw(u64), draw(u32s), draw(u32s),
                              draw(u64), draw(u64), draw(u32s), pick(draw, st.just(len(chunk)), u32s),
                              draw(st.sampled_from((0, 1, 0xFFFFFFFF)) | u32s), 0))
    c = crc32c(chunk, crc32c(bytes(h[:60])))
    struct.pack_into("<I", h, 60, pick(draw, st.just(c), st.just(c ^ 1)))
    buf = bytes(h) + chunk
    return pick(draw, st.just(buf), st.integers(0, len(buf)).map(lambda n: buf[:n]))


@SETTINGS
@given(buf=fragments())
def test_codecs_agree_on_grammar_built_fragments(buf):
    v = classify(buf, implementations(), kind="fragment")
    event(f"outcome: {'/'.join(sorted(set(v.outcomes.values())))}")
    assert not v.failed, _report(v, buf)
