"""One minimal reproducer per hostile input that once escaped the decoders or split the codecs.

Each was found by the differential fuzzer (tests/fuzzing.py, ci/fuzz.py) or by review. Every
malformed input must be a FrameError in both codecs (the ``wire`` fixture), and the codecs must
agree; exported buffers must refuse to be written through.
"""
from __future__ import annotations

import io
import struct
import tracemalloc
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from msight_fast import FrameError, _impl
from msight_fast import _schema as S

from ..fuzzing import Parts, assemble, classify, implementations


def scalar(bo: str, kind: str, size: int) -> bytes:
    return struct.pack("<BccI", 1, bo.encode(), kind.encode(), size)


def frame(dtype: Optional[bytes], shape: Optional[Tuple[int, ...]], payload: bytes = b"",
          records: Optional[List[Tuple[int, bytes]]] = None) -> bytes:
    """A frame with exactly these records (dtype and shape only when given), sealed and consistent."""
    fixed = bytearray(S.FIXED.pack(S.MAGIC, 1, 0, S.FLAG_NDARRAY if dtype is not None else 0, 0, 0, S.FIXED_LEN,
                                   0, 0, 0, 0, 1, 2, 3, 4, 5, 6))
    recs = [(t, 0, v) for t, v in (records or [])]
    if dtype is not None:
        recs.append((S.TAG_DTYPE, 0, dtype))
    if shape is not None:
        recs.append((S.TAG_SHAPE, 0, struct.pack(f"<{len(shape)}Q", *shape)))
    return bytes(assemble(Parts(fixed, b"", recs, payload)))


def subarray(dims: Tuple[int, ...], base: bytes) -> bytes:
    return struct.pack(f"<BB{len(dims)}I", 3, len(dims), *dims) + base


F4, U1 = scalar("<", "f", 4), scalar("|", "u", 1)

# name -> (bytes, what today's codecs did wrong)
REPRODUCERS: Dict[str, Tuple[bytes, str]] = {
    "shape (0, 2**62) of <f4, 128 bytes": (
        frame(F4, (0, 2**62)), "ValueError 'array is too big' in both codecs"),
    "shape (0, 2**63) of u1": (
        frame(U1, (0, 2**63)), "twin: ValueError 'Maximum allowed dimension exceeded'; compiled: FrameError"),
    "shape (2**64 - 1, 0) of u1": (
        frame(U1, (2**64 - 1, 0)), "a dimension numpy reads as -1"),
    "top-level sub-array (2,) of <f4, shape (1,)": (
        frame(subarray((2,), F4), (1,), bytes(8)),
        "compiled: accepted with shape (1, 2); twin: ValueError 'cannot reshape'"),
    "top-level sub-array (2,) of <f4, shape (0,)": (
        frame(subarray((2,), F4), (0,)), "accepted by both, shape (0, 2) vs (0,)"),
    "top-level sub-array (3, 2) of u1, shape (1, 1)": (
        frame(subarray((3, 2), U1), (1, 1), bytes(6)), "compiled: shape (1, 1, 3, 2); twin: 'cannot reshape'"),
    "meta key of 65 bytes": (
        frame(None, None, b"jpeg", records=[(S.TAG_META, b"\x01\x00" + bytes([65]) + b"k" * 65 + b"\x02"
                                            + struct.pack("<q", 1))]),
        "accepted by both (section 1.3: key_len 1..64), and neither encoder can send it again"),
    "sub-array fields adding 64 dimensions to shape (1,)": (
        frame(struct.pack("<BIH", 2, 4, 1) + struct.pack("<H", 1) + b"a" + struct.pack("<I", 0)
              + subarray((1,) * 32, subarray((1,) * 32, F4)), (1,), bytes(4)),
        "accepted by both; f.array['a'] and repr(f.array) raised ValueError (numpy's dimension limit)"),
    "UCS-4 text unit 0x200000": (
        frame(scalar("<", "U", 4), (1,), struct.pack("<I", 0x200000)),
        "accepted by both; repr(f.array) and f.array[0] raised SystemError (not a code point)"),
    "UCS-4 text unit past U+10FFFF in a struct field": (
        frame(struct.pack("<BIH", 2, 8, 2) + struct.pack("<H", 1) + b"n" + struct.pack("<I", 0) + scalar(">", "U", 4)
              + struct.pack("<H", 1) + b"x" + struct.pack("<I", 4) + scalar("<", "u", 4), (1,),
              struct.pack(">I", 0xFFFFFFFF) + bytes(4)),
        "accepted by both; reading the field raised SystemError"),
    "struct field name of 256 bytes": (
        frame(struct.pack("<BIH", 2, 4, 1) + struct.pack("<H", 256) + b"n" * 256 + struct.pack("<I", 0) + F4,
              (1,), bytes(4)),
        "accepted by both; the twin's encoder could not send it again, the compiled one re-sent it unchecked"),
}


def test_the_128_byte_reproducer_is_128_bytes():
    assert len(REPRODUCERS["shape (0, 2**62) of <f4, 128 bytes"][0]) == 128


@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_reproducer_is_a_frame_error(wire, name):
    buf, was = REPRODUCERS[name]
    with pytest.raises(FrameError):
        wire.decode(buf)


@pytest.mark.skipif(not _impl.HAS_EXTENSIONS, reason="needs the compiled core to compare with the twin")
@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_reproducer_codecs_agree(name):
    buf, was = REPRODUCERS[name]
    v = classify(buf, implementations())
    assert v.agree and set(v.outcomes.values()) == {"FrameError"}, (name, was, v)


def _struct_with_field_name(name: bytes) -> bytes:
    return struct.pack("<BIH", 2, 1, 1) + struct.pack("<H", len(name)) + name + struct.pack("<I", 0) + U1


@pytest.mark.parametrize("buf", [
    frame(_struct_with_field_name(b"a" * 256), (2,), bytes(2)),      # the encoder allows 1..255 bytes
    frame(_struct_with_field_name("名".encode() * 100), (1,), bytes(1)),
], ids=["field name of 256 bytes", "field name of 300 bytes"])
def test_what_a_codec_accepts_it_can_send_again(wire, buf):
    """A receiver that republishes a frame must not fail on it: decoders and encoders share limits.
    (Today the compiled core resends the descriptor it received, and the twin refuses the name.)"""
    try:
        f = wire.decode(buf)
    except FrameError:
        return                                   # rejecting it is the other consistent answer
    g = wire.decode(wire.encode(f))
    assert g.array.dtype == f.array.dtype and g.array.dtype.names == f.array.dtype.names


def test_sub_array_inside_a_struct_is_still_accepted(wire):
    """The top-level rule must not reject what the spec allows: a sub-array as a struct field."""
    field = struct.pack("<H", 1) + b"m" + struct.pack("<I", 0) + subarray((2,), F4)
    f = wire.decode(frame(struct.pack("<BIH", 2, 8, 1) + field, (3,), bytes(24)))
    assert f.array.shape == (3,) and f.array["m"].shape == (3, 2)


# ---------------------------------------------------------------- read-only exports
PAYLOAD = bytes(range(100, 164))


def _bytes_frame(wire: Any) -> bytes:
    return wire.encode(wire.Frame.from_bytes(PAYLOAD, sensor_name="cam", encoding="jpeg"))


def _assert_not_writable(target: Any, owner: bytes) -> None:
    before = bytes(bytearray(owner))       # a real copy: bytes(b) of a bytes is b itself
    with pytest.raises((BufferError, TypeError)):
        io.BytesIO(b"XY").readinto(target)
    assert owner == before


@pytest.mark.parametrize("attr", ["data", "data.obj"])
def test_decoded_bytes_frame_cannot_be_written_through(wire, attr):
    buf = _bytes_frame(wire)
    f = wire.decode(buf)
    target = f.data if attr == "data" else f.data.obj
    _assert_not_writable(target, buf)


@pytest.mark.parametrize("attr", ["array", "array.base", "data.obj"])
def test_decoded_array_frame_cannot_be_written_through(wire, attr):
    buf = wire.encode(wire.Frame.from_array(np.arange(64, dtype=np.uint8), sensor_name="cam"))
    f = wire.decode(buf)
    target = {"array": f.array, "array.base": f.array.base, "data.obj": f.data.obj}[attr]
    _assert_not_writable(target, buf)


def test_encode_parts_of_a_bytes_frame_cannot_be_written_through(wire):
    src = bytes(PAYLOAD)
    frame_ = wire.Frame.from_bytes(src, sensor_name="cam", encoding="jpeg")
    part = wire.encode_parts(frame_)[1]
    _assert_not_writable(part.obj, src)
    _assert_not_writable(part, src)


def test_encode_parts_of_a_read_only_array_cannot_be_written_through(wire):
    arr = np.arange(64, dtype=np.uint8)
    arr.flags.writeable = False
    frame_ = wire.Frame.from_array(arr, sensor_name="cam")
    part = wire.encode_parts(frame_)[1]
    before = arr.copy()
    with pytest.raises((BufferError, TypeError)):
        io.BytesIO(b"XY").readinto(part.obj)
    assert np.array_equal(arr, before)


# ---------------------------------------------------------------- the compiled descriptor cache
def _wide_descriptor(tag: int) -> bytes:
    """A distinct valid descriptor of ~16 KB: a struct of 512 one-byte fields with 18-byte names."""
    return struct.pack("<BIH", 2, 512, 512) + b"".join(
        struct.pack("<H", 18) + f"{tag:06d}f{k:011d}".encode() + struct.pack("<IBBBI", k, 1, ord("|"), ord("u"), 1)
        for k in range(512))


def test_compiled_dtype_cache_is_bounded_in_bytes():
    """Forged distinct descriptors must not pin unbounded memory in the decode-side cache."""
    if not _impl.HAS_EXTENSIONS:
        pytest.skip("the descriptor cache belongs to the compiled core, which is not loaded")
    w = _impl.impl
    if not hasattr(w, "_dtype_cache_bytes") or not hasattr(w, "DTYPE_CACHE_MAX_BYTES"):
        pytest.skip("the compiled core exposes no _dtype_cache_bytes() / DTYPE_CACHE_MAX_BYTES to test")
    limit = int(w.DTYPE_CACHE_MAX_BYTES)
    # a parsed 16 KB descriptor holds ~90 KB more (tracemalloc): 4 MiB of descriptors is ~25 MB
    assert 0 < limit <= 4 << 20, f"DTYPE_CACHE_MAX_BYTES = {limit} lets forged descriptors pin too much"
    size = len(_wide_descriptor(0))
    assert 15_000 < size <= S.MAX_DTYPE_BYTES
    n = min(2 * limit // size + 3, 600)      # enough to overflow the bound twice
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            f = w.decode(frame(_wide_descriptor(10_000 + i), (1,), bytes(512)))
            assert len(f.array.dtype.names) == 512
            del f
            held = w._dtype_cache_bytes()
            assert held <= limit, f"after {i + 1} descriptors the cache holds {held} bytes (limit {limit})"
            assert held >= size or limit < size, "the cache kept nothing: is it still a cache?"
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 32 * limit + (8 << 20), f"{grown} bytes still held after {n} distinct descriptors"


@pytest.mark.parametrize("build", [
    lambda w: w.Frame.from_bytes(b"x", sensor_name="cam\udcff", encoding="jpeg"),
    lambda w: w.Frame.from_bytes(b"x", sensor_name="cam", encoding="jpeg", device_name="\ud800"),
    lambda w: w.Frame.from_bytes(b"x", sensor_name="cam", encoding="jpeg", meta={"k\udcff": 1}),
    lambda w: w.Frame.from_bytes(b"x", sensor_name="cam", encoding="jpeg", meta={"k": "v\udcff"}),
    lambda w: w.Frame.from_array(np.zeros(2, [("x\udcff", "<f4")]), sensor_name="cam"),
], ids=["sensor_name", "device_name", "meta key", "meta value", "field name"])
def test_a_string_with_a_lone_surrogate_is_a_frame_error_not_a_unicode_error(wire, build):
    # was UnicodeEncodeError from both codecs
    with pytest.raises(FrameError, match="surrogate"):
        build(wire)


class _Pretends(str):
    """A str whose encode() lies about its bytes."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"x" * 300


def test_a_str_subclass_is_checked_by_its_characters_not_its_encode(wire):
    # the twin went by the subclass's encode(), the compiled core by the characters it writes
    f = wire.Frame.from_bytes(b"x", sensor_name=_Pretends("cam"), encoding="jpeg")
    assert wire.decode(wire.encode(f)).sensor_name == "cam"
    with pytest.raises(FrameError, match="bytes of UTF-8"):
        wire.Frame.from_bytes(b"x", sensor_name=_Pretends("é" * 128), encoding="jpeg")


def test_a_name_changed_to_a_lone_surrogate_after_building_is_a_frame_error_at_encode(wire):
    f = wire.Frame.from_bytes(b"x", sensor_name="cam", encoding="jpeg")
    f.sensor_name = "cam\udcff"
    with pytest.raises(FrameError, match="surrogate"):
        wire.encode(f)


def test_text_that_is_not_code_points_is_refused_by_the_writer_too(wire):
    bad = np.frombuffer(struct.pack("<2I", 65, 0x110000), "<U1")
    with pytest.raises(FrameError, match="U\\+10FFFF"):
        wire.Frame.from_array(bad, sensor_name="s")
    ok = np.array(["a\U0010ffff"], "<U2")
    assert wire.decode(wire.encode(wire.Frame.from_array(ok, sensor_name="s"))).array[0] == "a\U0010ffff"
