"""Shared-header batches (docs/wire-format.md 2b): both codecs make the same bytes and rebuild the
very frames they were given; frames that cannot share a header go whole (2a); hostile input gets
FrameError, with the same message from both codecs, and is never expanded past its bound."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msight_fast import FrameError, _pywire, codec
from msight_fast import _schema as S
from msight_fast.codec import Frame, batch_frames, batch_spans, pack_batch, stamp_parts, unpack_batch

from .test_batch import WRITERS, _agree

try:
    from msight_fast._ext import _wire
except ImportError:
    _wire = None  # type: ignore[assignment]

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
READERS = [codec._batch_frames] + ([_wire.batch_frames] if _wire is not None else [])
U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-2**63, 2**63 - 1)


def stamped(payload: bytes, seq: int = 1, *, sensor: str = "camera_0", checksum: bool = False,
            frame_id: Optional[int] = None, publisher_id: int = 7, meta: Optional[dict] = None,
            ts: Optional[tuple] = None) -> bytes:
    """One frame as ``Bus.publish`` encodes it."""
    f = Frame.from_bytes(payload, sensor_name=sensor, encoding="bytes", frame_id=frame_id, meta=meta)
    if ts is not None:
        f.capture_ts_ns, f.creation_ts_ns = ts[0], ts[1]
    out = b"".join(bytes(p) for p in stamp_parts(f, seq, publisher_id, checksum))
    if ts is not None:                          # stamp_parts set publish_ts_ns: put the given one, resealed
        buf = bytearray(out)
        struct.pack_into("<q", buf, 80, ts[2])
        struct.pack_into("<I", buf, 12, _pywire.crc32c(bytes(buf[16:int.from_bytes(buf[8:12], "little")]),
                                                       _pywire.crc32c(bytes(buf[:12]))))
        out = bytes(buf)
    return out


def written(frames: List[bytes], writer: Any) -> bytes:
    w = writer()
    w.shared = True
    for f in frames:
        w.add([f])
    out = w.pack()
    assert len(out) <= w.size                  # size, the whole-frames length, bounds the shared one
    return bytes(out)


def reseal(buf: bytearray) -> bytes:
    """Recompute the header CRC over what the (forged) header says it covers."""
    t, e = struct.unpack_from("<HxxI", buf, 24)
    end = min(len(buf), 32 + t + e)
    struct.pack_into("<I", buf, 12, _pywire.crc32c(bytes(buf[16:end]), _pywire.crc32c(bytes(buf[:12]))))
    return bytes(buf)


STREAM = [stamped(bytes([i]) * (100 + 37 * i), 10 + i) for i in range(4)]
GOOD = pack_batch([[f] for f in STREAM], shared=True)


# -- what a writer makes
def test_the_golden_vector_is_made_and_read_bit_exactly(wire: Any) -> None:
    raw = bytes.fromhex((GOLDEN / "batch_shared.hex").read_text().replace("\n", ""))
    frames = [bytes.fromhex(h) for h in json.loads((GOLDEN / "batch_shared.json").read_text())["frames_hex"]]
    assert raw[4:8] == b"\x01\x02\x01\x00"      # major 1, minor 2, flags SHARED
    for read in READERS:
        assert read(raw) == frames
    assert pack_batch([[f] for f in frames], shared=True) == raw
    for writer in WRITERS:
        assert written(frames, writer) == raw
    got = [wire.decode(f) for f in frames]
    assert [f.seq for f in got] == [41, 42, 45]
    assert got[2].capture_ts_ns < got[1].capture_ts_ns     # a step back, coded as a negative difference


def test_one_sensors_frames_share_a_header_and_come_back_as_they_were() -> None:
    classic = pack_batch([[f] for f in STREAM])
    assert GOOD[6] == S.BATCH_SHARED and classic[6] == 0
    # the header (here 128 bytes) once, then about 25 bytes a frame instead of 128 + 4
    assert len(classic) - len(GOOD) > 3 * (128 + 4 - 30)
    for read in READERS:
        assert read(GOOD) == STREAM
    assert [bytes(v) for v in unpack_batch(GOOD)] == STREAM
    assert [codec.decode(v).seq for v in unpack_batch(GOOD)] == [10, 11, 12, 13]
    with pytest.raises(FrameError, match="no spans"):
        batch_spans(GOOD)


def test_a_skipped_shared_batch_counts_its_frames() -> None:
    pytest.importorskip("confluent_kafka")
    from msight_fast.backends.kafka import _frames_skipped
    assert _frames_skipped(GOOD, 1 << 20) == 4
    assert _frames_skipped(GOOD, 100) == 1           # over the bound: counted as one malformed message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2000), U64, U64, I64, I64, I64), min_size=1, max_size=30), st.booleans())
def test_both_codecs_make_and_rebuild_any_stream_bit_exactly(items: List[Any], checksum: bool) -> None:
    """Any lengths, seqs, ids and times (differences of any sign and size): the same container
    from pack_batch and both writers, and both readers give back every frame's bytes."""
    frames = [stamped(bytes([n % 251]) * n, seq, frame_id=fid, checksum=checksum, ts=(a, b, c))
              for n, seq, fid, a, b, c in items]
    want = pack_batch([[f] for f in frames], shared=True)
    assert want[6] == (S.BATCH_SHARED if len(frames) > 1 else 0)
    for writer in WRITERS:
        assert written(frames, writer) == want
    for read in READERS:
        assert read(want) == frames


@pytest.mark.parametrize("odd", ["sensor", "checksum", "publisher", "meta", "array"])
def test_a_frame_with_another_header_makes_the_batch_go_whole(odd: str) -> None:
    frames = list(STREAM)
    if odd == "array":
        other = b"".join(bytes(p) for p in stamp_parts(Frame.from_array(np.zeros(4, np.uint8), sensor_name="camera_0"),
                                                        14, 7, False))
    else:
        other = stamped(b"x" * 100, 14, **_odd_kwargs(odd))
    frames.insert(2, other)
    want = pack_batch([[f] for f in frames])                      # whole frames (2a)
    assert pack_batch([[f] for f in frames], shared=True) == want
    for writer in WRITERS:
        assert written(frames, writer) == want
        w = writer()                       # cleared, the same writer shares a header again
        w.shared = True
        for f in frames:
            w.add([f])
        w.clear()
        for f in STREAM:
            w.add([f])
        assert w.pack() == GOOD


def _odd_kwargs(odd: str) -> dict:
    return {"sensor": {"sensor": "camera_1"}, "checksum": {"checksum": True}, "publisher": {"publisher_id": 8},
            "meta": {"meta": {"k": 1}}}[odd]


ENTRY_FIELDS = set(range(12, 16)) | set(range(20, 24)) | set(range(40, 56)) | set(range(64, 88))


def test_a_frame_shares_the_header_only_where_it_differs_in_an_entrys_fields() -> None:
    """Each byte of frame 1's header and padding changed in turn (its header CRC made right
    again): the batch shares a header exactly when the byte is one an entry carries, and either
    way every frame comes back as it was given."""
    first, second = STREAM[0], STREAM[1]
    t = int.from_bytes(first[24:32], "little")
    hl = int.from_bytes(first[8:12], "little")
    for i in range(4, t):
        f = bytearray(second)
        f[i] ^= 0x5A
        if not 12 <= i < 16:
            struct.pack_into("<I", f, 12, _pywire.crc32c(bytes(f[16:hl]), _pywire.crc32c(bytes(f[:12]))))
        frames = [first, bytes(f), STREAM[2]]
        want = pack_batch([[x] for x in frames], shared=True)
        assert (want[6] == S.BATCH_SHARED) == (i in ENTRY_FIELDS), i
        for writer in WRITERS:
            assert written(frames, writer) == want, i
        for read in READERS:
            assert read(want) == frames, i


def test_a_first_frame_whose_length_field_lies_makes_the_batch_go_whole() -> None:
    # the entries' lengths are what follows each header: a header saying otherwise cannot be rebuilt
    for i in range(32, 40):
        f = bytearray(STREAM[0])
        f[i] ^= 1
        frames = [bytes(f)] + STREAM[1:]
        want = pack_batch([[x] for x in frames], shared=True)
        assert want[6] == 0 and want == pack_batch([[x] for x in frames])
        for writer in WRITERS:
            assert written(frames, writer) == want


@pytest.mark.parametrize("fmt", ["b", "c", "B"])
def test_a_buffer_of_any_byte_format_is_read_as_its_bytes(fmt: str) -> None:
    for buf in (GOOD, pack_batch([[f] for f in STREAM])):
        view = memoryview(buf).cast(fmt)
        for read in READERS:
            assert read(view) == STREAM
        views = unpack_batch(view)
        assert views == STREAM and all(v.format == "B" and v.readonly for v in views)


def test_a_header_past_the_shared_bound_goes_whole() -> None:
    # meta grows the header past 512 bytes: a reader would expand each entry too far
    big = [stamped(b"p" * 10, i, meta={"note": "n" * 500}) for i in range(3)]
    assert int.from_bytes(big[0][24:32], "little") > S.MAX_SHARED_TEMPLATE
    assert pack_batch([[f] for f in big], shared=True)[6] == 0
    for writer in WRITERS:
        assert written(big, writer)[6] == 0
    at = [stamped(b"p" * 10, i, meta={"note": "n" * 340}) for i in range(3)]
    assert int.from_bytes(at[0][24:32], "little") == S.MAX_SHARED_TEMPLATE
    for writer in WRITERS:
        assert written(at, writer)[6] == S.BATCH_SHARED
        assert batch_frames(written(at, writer)) == at


def test_one_frame_and_a_writer_without_shared_go_whole() -> None:
    for writer in WRITERS:
        assert written(STREAM[:1], writer) == pack_batch([[STREAM[0]]])
        w = writer()
        assert w.shared is False
        for f in STREAM:
            w.add([f])
        assert w.pack() == pack_batch([[f] for f in STREAM])


# -- hostile input
def test_every_truncation_and_extension_is_rejected_alike() -> None:
    for n in range(len(GOOD)):
        for read in READERS:
            with pytest.raises(FrameError):
                read(GOOD[:n])
        _agree(GOOD[:n])
    for extra in (b"\0", b"x" * 9):
        _agree(GOOD + extra)
        with pytest.raises(FrameError):
            batch_frames(GOOD + extra)


def test_every_byte_change_of_header_template_and_entries_is_rejected() -> None:
    t, e = struct.unpack_from("<HxxI", GOOD, 24)
    for i in range(32 + t + e):                # the minor version and reserved bytes too: under the CRC
        bad = bytearray(GOOD)
        bad[i] ^= 0x41
        with pytest.raises(FrameError):
            batch_frames(bytes(bad))
        _agree(bytes(bad))


def _entry_at(buf: bytes) -> int:
    return 32 + struct.unpack_from("<H", buf, 24)[0]


def _with_entries(entries: bytes, payload: bytes = b"", count: int = 2) -> bytes:
    """GOOD's first frame as template, these bytes as entries, then frame 0's payload and ``payload``."""
    t = _entry_at(GOOD) - 32
    p0 = STREAM[0][t:]
    buf = bytearray(GOOD[:32 + t]) + entries + p0 + payload
    struct.pack_into("<I", buf, 8, count)
    struct.pack_into("<Q", buf, 16, len(buf))
    struct.pack_into("<I", buf, 28, len(entries))
    return reseal(buf)


def _forged(field: str) -> bytes:
    buf = bytearray(GOOD)
    t = struct.unpack_from("<H", buf, 24)[0]
    if field == "t_odd":
        struct.pack_into("<H", buf, 24, 129)
    elif field == "t_small":
        struct.pack_into("<H", buf, 24, 64)
    elif field == "t_large":
        struct.pack_into("<H", buf, 24, 576)
    elif field == "entries_past":
        struct.pack_into("<I", buf, 28, len(buf))
    elif field == "count":
        struct.pack_into("<I", buf, 8, 65536)
    elif field == "template_magic":
        buf[32:36] = S.FRAG_MAGIC
    elif field == "template_offset":
        struct.pack_into("<Q", buf, 32 + 24, t + 64)
    elif field == "payload0":
        struct.pack_into("<Q", buf, 32 + 32, len(buf))
    elif field == "total":
        struct.pack_into("<Q", buf, 16, len(buf) + 1)
    return reseal(buf)


ENTRY = struct.pack("<IQ", 0, 5)


@pytest.mark.parametrize("buf,what", [
    (_forged("t_odd"), "shared header length 129"),
    (_forged("t_small"), "shared header length 64"),
    (_forged("t_large"), "shared header length 576"),
    (_forged("entries_past"), "run past the"),
    (_forged("count"), "needs at least"),
    (_forged("template_magic"), "not a frame header"),
    (_forged("template_offset"), "template payload offset"),
    (_forged("payload0"), "frame 0's payload"),
    (_forged("total"), "batch total"),
    (_with_entries(ENTRY + b"\x80" * 10 + b"\x00" * 15), "bad varint"),            # more than 10 bytes
    (_with_entries(ENTRY + b"\xff" * 9 + b"\x02" + b"\x00" * 5), "bad varint"),     # past 64 bits
    (_with_entries(ENTRY + b"\x81\x00" + b"\x00" * 5), "bad varint"),              # not the shortest form
    (_with_entries(ENTRY + b"\x00" * 5 + b"\x80"), "bad varint"),                    # runs past the entries
    (_with_entries(ENTRY + b"\x00" * 4), "needs at least"),                         # shorter than any entry
    (_with_entries(ENTRY + b"\x00" * 5 + b"\x80\x80\x80\x80\x10"), "exceeds 32 bits"),
    (_with_entries(ENTRY + b"\x05" + b"\x00" * 5, b"abcd"), "runs past the message"),
    (_with_entries(ENTRY + b"\x00" * 6 + b"\x00"), "after the last batch entry"),
    (_with_entries(ENTRY + b"\x00" * 6, b"zz"), "after the last payload"),
    (_with_entries(ENTRY + b"\x00" + b"\xff" * 9 + b"\x01" + b"\x00" * 4 + b"\x00" * 9, count=3),
     "runs past the entries' end"),
])
def test_forged_fields_are_rejected_alike(buf: bytes, what: str) -> None:
    for read in READERS:
        with pytest.raises(FrameError, match=what.replace("(", r"\(")):
            read(buf)
    _agree(buf)


def test_a_well_formed_forgery_rebuilds_frames_that_decode_or_fail_alone() -> None:
    # an entry naming the wrong header CRC: the container is sound, the rebuilt frame is not
    buf = _with_entries(ENTRY + b"\x00" * 6)
    frames = batch_frames(buf)
    assert len(frames) == 2 and codec.decode(frames[0]).seq == 10
    with pytest.raises(FrameError, match="header CRC32C"):
        codec.decode(frames[1])


def test_what_a_message_expands_to_is_bounded() -> None:
    """The worst a sender can make a reader rebuild: the longest shared header, entries of 18
    bytes (the least), no payloads. Within the spec's bound of 512 / 18 per message byte, and
    one byte of entries short of it is refused before anything is made."""
    first = stamped(b"", 1, meta={"note": "n" * 340})
    t = int.from_bytes(first[24:32], "little")
    assert t == S.MAX_SHARED_TEMPLATE
    count = 20_000
    entries = (struct.pack("<IQ", 0, 9) + bytes(6)) * (count - 1)
    buf = bytearray(struct.pack("<4sBBHIIQHHI", S.BATCH_MAGIC, 1, 2, 1, count, 0, 0, t, 0, len(entries)))
    buf += first[:t] + entries
    struct.pack_into("<Q", buf, 16, len(buf))
    good = reseal(buf)
    for read in READERS:
        frames = read(good)
        assert len(frames) == count and all(len(f) == t for f in frames)
        # a subscriber's bound on what it rebuilds: exactly the frames' total passes, a byte less not
        assert len(read(good, max_bytes=count * t)) == count
        with pytest.raises(FrameError, match=f"rebuild to {count * t} bytes, over the limit of {count * t - 1}"):
            read(good, max_bytes=count * t - 1)
    rebuilt = count * t
    assert 28 * len(good) < rebuilt <= (S.MAX_SHARED_TEMPLATE / 18 + 1) * len(good)
    short = bytearray(good[:-1])
    struct.pack_into("<I", short, 28, len(entries) - 1)
    struct.pack_into("<Q", short, 16, len(short))
    for read in READERS:
        with pytest.raises(FrameError, match="needs at least"):
            read(reseal(short))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans(), st.integers(0, len(GOOD)))
def test_mutations_give_only_frame_errors_or_frames_alike(edits: List[Any], sealed: bool, cut: int) -> None:
    buf = bytearray(GOOD)
    for pos, value in edits:
        buf[pos] = value
    data = reseal(buf) if sealed else bytes(buf)
    for d in (data, data[:cut]):
        _agree(d)
        try:
            frames = batch_frames(d)
        except FrameError:
            continue
        for f in frames:
            try:
                codec.decode(f)
            except FrameError:
                pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.binary(max_size=400), st.binary(max_size=300))
def test_forged_entries_give_only_frame_errors_or_frames(count: int, entries: bytes, payload: bytes) -> None:
    t = _entry_at(GOOD) - 32
    buf = bytearray(GOOD[:32 + t]) + entries + STREAM[0][t:] + payload
    struct.pack_into("<I", buf, 8, count)
    struct.pack_into("<Q", buf, 16, len(buf))
    struct.pack_into("<I", buf, 28, len(entries))
    _agree(reseal(buf))
