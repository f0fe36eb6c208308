"""Malformed and forged frames: always FrameError, never a crash or a read outside the buffer.

Run under AddressSanitizer by ci/sanitize.sh, which is what turns "never reads out of bounds"
from a hope into a check.
"""
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msight_fast import FrameError, _pywire
from msight_fast import _schema as S


def _frame(wire, kind="array"):
    if kind == "array":
        f = wire.Frame.from_array(np.arange(60, dtype="<u2").reshape(3, 4, 5), sensor_name="cam",
                                  device_name="dev", meta={"a": 1, "b": "two", "c": 3.0})
    elif kind == "struct":
        f = wire.Frame.from_array(np.zeros(4, dtype=[("x", "<f4"), ("p", [("q", "u1", (2,))])]),
                                  sensor_name="lidar")
    else:
        f = wire.Frame.from_bytes(b"\xff\xd8" + bytes(range(200)), sensor_name="cam", encoding="jpeg")
    return wire.encode(f, checksum=True)


def reseal(buf: bytearray) -> bytes:
    """Recompute the header CRC so that a forged field reaches the semantic checks behind it."""
    hl = min(struct.unpack_from("<I", buf, 8)[0], len(buf))
    if hl >= 16:
        struct.pack_into("<I", buf, 12, _pywire.crc32c(bytes(buf[16:hl]), _pywire.crc32c(bytes(buf[:12]))))
    return bytes(buf)


def header_len(enc):
    return struct.unpack_from("<I", enc, 8)[0]


def records(enc):
    """(tag, offset of the record, offset of its value, length) of each header record."""
    out, pos, hl = [], S.FIXED_LEN, header_len(enc)
    while pos < hl:
        tag, _, n = S.RECORD.unpack_from(enc, pos)
        out.append((tag, pos, pos + 8, n))
        pos += 8 + n
    return out


@pytest.mark.parametrize("kind", ["array", "struct", "bytes"])
def test_every_truncation_is_rejected(wire, kind):
    enc = _frame(wire, kind)
    for n in range(len(enc)):
        with pytest.raises(FrameError):
            wire.decode(enc[:n])


@pytest.mark.parametrize("kind", ["array", "bytes"])
def test_every_single_byte_change_of_the_header_is_rejected(wire, kind):
    enc = _frame(wire, kind)
    step = 1 if wire is not _pywire else 17     # the twin's CRC is slow; a stride keeps it bounded
    for i in range(header_len(enc)):
        for v in range(1, 256, step):
            bad = bytearray(enc)
            bad[i] ^= v
            with pytest.raises(FrameError):
                wire.decode(bytes(bad))


def test_trailing_bytes_and_padding_are_rejected(wire):
    enc = _frame(wire)
    with pytest.raises(FrameError, match="payload length"):
        wire.decode(enc + b"\0")
    bad = bytearray(enc)
    bad[header_len(enc)] = 1
    with pytest.raises(FrameError, match="padding"):
        wire.decode(bytes(bad))


@pytest.mark.parametrize("field,value,match", [
    (0, b"\x93MSX", "magic"), (0, b"MSF\x93", "magic"),
    (4, b"\x02", "major version"), (4, b"\x00", "major version"),
    (8, struct.pack("<I", 87), "header length"), (8, struct.pack("<I", 0xFFFFFFFF), "header length"),
    (16, struct.pack("<H", 87), "fixed-part length"), (16, struct.pack("<H", 0xFFFF), "fixed-part length"),
    (24, struct.pack("<Q", 65), "payload offset"), (24, struct.pack("<Q", 1 << 63), "payload offset"),
    (24, struct.pack("<Q", 0), "payload offset"),
    (32, struct.pack("<Q", 1 << 64 - 1), "payload length"), (32, struct.pack("<Q", 0), "payload length"),
    (20, struct.pack("<I", 0), "payload CRC32C"),
])
def test_forged_fixed_fields(wire, field, value, match):
    bad = bytearray(_frame(wire))
    bad[field:field + len(value)] = value
    with pytest.raises(FrameError, match=match):
        wire.decode(reseal(bad))


def _replace_record(enc, tag, value=None, rlen=None):
    """Rebuild a frame with one record's value (and/or declared length) replaced, all else intact."""
    poff = struct.unpack_from("<Q", enc, 24)[0]
    body = b""
    for t, pos, start, n in records(enc):
        v = enc[start:start + n]
        if t == tag:
            v = value if value is not None else v
            body += S.RECORD.pack(t, 0, len(v) if rlen is None else rlen) + v
        else:
            body += enc[pos:start + n]
    fixed = bytearray(enc[:S.FIXED_LEN])
    new_hl = S.FIXED_LEN + len(body)
    new_off = S.align_up(new_hl)
    struct.pack_into("<I", fixed, 8, new_hl)
    struct.pack_into("<Q", fixed, 24, new_off)
    return reseal(bytearray(bytes(fixed) + body + bytes(new_off - new_hl) + enc[poff:]))


@pytest.mark.parametrize("tag,value,match", [
    (S.TAG_SHAPE, struct.pack("<3Q", 1 << 32, 1 << 32, 1), "too large"),     # product overflows
    (S.TAG_SHAPE, struct.pack("<2Q", 1 << 63, 2), "too large"),
    (S.TAG_SHAPE, struct.pack("<2Q", (1 << 64) - 1, (1 << 64) - 1), "too large"),
    (S.TAG_SHAPE, struct.pack("<3Q", 0, 4, 5), "payload length"),
    (S.TAG_SHAPE, struct.pack("<3Q", 3, 4, 6), "payload length"),
    (S.TAG_SHAPE, struct.pack("<33Q", *([1] * 32 + [60])), "ndim"),
    (S.TAG_SHAPE, b"\x01\x02\x03", "shape record"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"<", b"O", 8), "dtype"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"<", b"u", 3), "dtype"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"<", b"U", 6), "multiple of 4"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"!", b"u", 2), "dtype"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"<", b"u", 0), "dtype"),
    (S.TAG_DTYPE, b"\x09", "unknown dtype descriptor"),
    (S.TAG_DTYPE, b"", "truncated"),
    (S.TAG_DTYPE, struct.pack("<BccI", 1, b"<", b"u", 2) + b"\0", "trailing"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 60000), "fields"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 2) + b"\x01\x00a\0\0\0\0" + struct.pack("<BccI", 1, b"<", b"u", 2),
     "truncated"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 1) + b"\x01\x00a\x01\0\0\0" + struct.pack("<BccI", 1, b"<", b"u", 2),
     "past the itemsize"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 1) + b"\x01\x00\xff\0\0\0\0" + struct.pack("<BccI", 1, b"<", b"u", 2),
     "UTF-8"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 1) + b"\x01\x00a\0\0\0\0" + b"\x03\x01\x01\0\0\0" * 9
     + struct.pack("<BccI", 1, b"<", b"u", 2), "nesting"),
    (S.TAG_DTYPE, struct.pack("<BIH", 2, 2, 1) + b"\x01\x00a\0\0\0\0" + b"\x03\x01\xff\xff\xff\xff"
     + struct.pack("<BccI", 1, b"<", b"u", 2), "sub-array"),
    (S.TAG_DTYPE, b"\x03\x01\x02\0\0\0" + struct.pack("<BccI", 1, b"<", b"u", 2), "only inside a struct"),
    (S.TAG_SENSOR_NAME, b"\xff\xfe", "UTF-8"),
    (S.TAG_SENSOR_NAME, b"a" * 256, "exceeds"),
    (S.TAG_META, b"\xff\xff", "entries"),
    (S.TAG_META, b"\x01\x00\x01k\x09", "meta value type"),
    (S.TAG_META, b"\x01\x00\x01k\x01\xff\xff", "meta string length"),
    (S.TAG_META, b"\x02\x00\x01k\x02" + bytes(8) + b"\x01k\x02" + bytes(8), "duplicate meta key"),
    (S.TAG_META, b"\x01\x00\x01k\x02" + bytes(4), "truncated"),
    (S.TAG_META, b"\x00\x00\x00", "trailing"),
    (S.TAG_META, b"\x01\x00" + b"\x01k\x01" + struct.pack("<H", 4093) + b"v" * 4093, "exceeds"),
])
def test_forged_records(wire, tag, value, match):
    with pytest.raises(FrameError, match=match):
        wire.decode(_replace_record(_frame(wire), tag, value))


def test_record_length_past_header_end(wire):
    with pytest.raises(FrameError, match="runs past"):
        wire.decode(_replace_record(_frame(wire), S.TAG_SENSOR_NAME, rlen=10_000))


def test_duplicate_and_missing_records(wire):
    enc = _frame(wire)
    t, pos, start, n = records(enc)[0]
    dup = enc[pos:start + n]
    hl = header_len(enc)
    poff = struct.unpack_from("<Q", enc, 24)[0]
    body = enc[S.FIXED_LEN:hl] + dup
    fixed = bytearray(enc[:S.FIXED_LEN])
    struct.pack_into("<I", fixed, 8, S.FIXED_LEN + len(body))
    new_off = S.align_up(S.FIXED_LEN + len(body))
    struct.pack_into("<Q", fixed, 24, new_off)
    forged = reseal(bytearray(bytes(fixed) + body + bytes(new_off - S.FIXED_LEN - len(body)) + enc[poff:]))
    with pytest.raises(FrameError, match="duplicate"):
        wire.decode(forged)
    with pytest.raises(FrameError, match="without a dtype"):
        wire.decode(_drop_record(enc, S.TAG_SHAPE))
    bytes_frame = _frame(wire, "bytes")
    flags = bytearray(bytes_frame)
    flags[6] |= S.FLAG_NDARRAY
    with pytest.raises(FrameError, match="without a dtype"):
        wire.decode(reseal(flags))


def _drop_record(enc, tag):
    body = b"".join(enc[pos:start + n] for t, pos, start, n in records(enc) if t != tag)
    poff = struct.unpack_from("<Q", enc, 24)[0]
    fixed = bytearray(enc[:S.FIXED_LEN])
    hl = S.FIXED_LEN + len(body)
    struct.pack_into("<I", fixed, 8, hl)
    struct.pack_into("<Q", fixed, 24, S.align_up(hl))
    return reseal(bytearray(bytes(fixed) + body + bytes(S.align_up(hl) - hl) + enc[poff:]))


def test_newer_minor_with_unknown_records_and_longer_fixed_part_is_accepted(wire):
    enc = _frame(wire)
    hl, poff = header_len(enc), struct.unpack_from("<Q", enc, 24)[0]
    extra_fixed = b"\x07" * 8                                 # a field a v1.1 writer might add
    unknown = S.RECORD.pack(200, 0, 5) + b"hello"              # a record this reader does not know
    body = extra_fixed + enc[S.FIXED_LEN:hl] + unknown
    fixed = bytearray(enc[:S.FIXED_LEN])
    fixed[5] = 3                                               # minor 3
    new_hl = S.FIXED_LEN + len(body)
    struct.pack_into("<I", fixed, 8, new_hl)
    struct.pack_into("<H", fixed, 16, S.FIXED_LEN + 8)
    struct.pack_into("<Q", fixed, 24, S.align_up(new_hl))
    newer = reseal(bytearray(bytes(fixed) + body + bytes(S.align_up(new_hl) - new_hl) + enc[poff:]))
    g, ref = wire.decode(newer), wire.decode(enc)
    assert np.array_equal(g.array, ref.array) and g.meta == ref.meta and g.sensor_name == "cam"


def test_non_buffer_and_non_contiguous_input(wire):
    with pytest.raises(TypeError):
        wire.decode(12345)
    with pytest.raises(FrameError):
        wire.decode(memoryview(bytearray(_frame(wire) * 2))[::2])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 600), kind=st.sampled_from(["array", "struct", "bytes"]), seal=st.booleans())
def test_fuzz_mutations_never_escape_frame_error(wire, edits, cut, kind, seal):
    buf = bytearray(_frame(wire, kind))
    for pos, val in edits:
        if pos < len(buf):
            buf[pos] = val
    buf = buf[:cut] if cut < len(buf) else buf
    data = reseal(buf) if seal and len(buf) >= 16 else bytes(buf)
    try:
        f = wire.decode(data)
    except FrameError:
        return
    if f.array is not None:      # whatever was accepted must be readable in full, in bounds
        f.array.tobytes()
    bytes(f.data)


def _nested_descriptor(outer: int, inner: int) -> bytes:
    f4 = struct.pack("<BccI", 1, b"<", b"f", 4)

    def st(fields, itemsize):
        out = [struct.pack("<BIH", 2, itemsize, len(fields))]
        for i, (desc, off) in enumerate(fields):
            name = str(i).encode()
            out.append(struct.pack("<H", len(name)) + name + struct.pack("<I", off) + desc)
        return b"".join(out)
    sub = st([(f4, 4 * j) for j in range(inner)], 4 * inner)
    return st([(sub, 4 * inner * i) for i in range(outer)], 4 * inner * outer)


def test_a_descriptor_has_at_most_1024_fields_in_all(wire):
    # parse cost grows with the fields; 512 per struct alone allowed 512 x 512 in 16 KiB's worth
    ok = _nested_descriptor(32, 31)                    # 32 + 992 = 1,024
    assert S.dtype_from_wire(ok).itemsize == 32 * 31 * 4
    with pytest.raises(FrameError, match="in all"):
        S.dtype_from_wire(_nested_descriptor(3, 341))  # 3 + 1,023
    enc = _frame(wire)
    with pytest.raises(FrameError, match="in all"):
        wire.decode(_replace_record(enc, S.TAG_DTYPE, _nested_descriptor(3, 341)))
    too_many = np.dtype([(f"s{i}", [(f"f{j}", "<f4") for j in range(341)]) for i in range(3)])
    with pytest.raises(FrameError, match="in all"):
        wire.Frame.from_array(np.zeros(1, too_many), sensor_name="s")
