"""Fragmentation and reassembly: shuffled, duplicated, missing, forged and expired fragments."""
import random
import struct
import time

import numpy as np
import pytest

from msight_fast import Frame, FrameError, Reassembler, codec, decode, encode, encode_parts, fragment
from msight_fast import _schema as S


def _enc(n_bytes=300_000, seed=0, **kw):
    arr = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)
    return arr, encode(Frame.from_array(arr, sensor_name="cam", **kw))


def test_small_frame_is_sent_whole_with_no_overhead():
    _, enc = _enc(1000)
    parts = fragment(enc, 64 * 1024)
    assert parts == [enc] and parts[0] is enc


@pytest.mark.parametrize("max_size", [65, 100, 4096, 64 * 1024, 1 << 20])
def test_fragments_fit_and_reassemble_in_any_order(max_size):
    arr, enc = _enc(50_000 if max_size < 1000 else 3 * max_size)
    frags = fragment(enc, max_size)
    assert all(len(f) <= max_size for f in frags) and len(frags) > 1
    random.Random(max_size).shuffle(frags)
    r = Reassembler()
    out = [r.feed(f) for f in frags]
    assert all(o is None for o in out[:-1])
    g = out[-1]
    assert np.array_equal(g.array, arr)
    assert g.array.ctypes.data % 64 == 0            # payload lands 64-byte aligned
    assert r.stats() == {"completed": 1, "expired": 0, "evicted": 0, "refused": 0, "duplicates": 0,
                         "rejected": 0, "pending": 0}


@pytest.mark.parametrize("max_size", [65, 97, 300, 4096, 64 * 1024])
@pytest.mark.parametrize("n_bytes", [0, 1, 63, 5000, 200_001])
def test_fragments_gathered_from_parts_equal_those_of_the_joined_frame(max_size, n_bytes):
    # publishers fragment straight from encode_parts (one copy); the bytes must be identical
    arr = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8)
    frame = Frame.from_array(arr, sensor_name="cam")
    parts = encode_parts(frame)
    whole = encode(frame)
    if -(-len(whole) // (max_size - S.FRAG_HEADER_LEN)) > S.MAX_FRAGMENT_COUNT:
        for src in (parts, whole):             # too many fragments: refused the same way
            with pytest.raises(FrameError, match="max_size must be at least"):
                fragment(src, max_size)
        return
    assert [bytes(f) for f in fragment(parts, max_size)] == [bytes(f) for f in fragment(whole, max_size)]
    # the parts split at arbitrary points (a header in pieces, empty pieces) give the same too
    cut = [whole[:7], b"", whole[7:200], memoryview(whole)[200:]]
    assert [bytes(f) for f in fragment(cut, max_size)] == [bytes(f) for f in fragment(whole, max_size)]


@pytest.mark.parametrize("max_size", [65, 300, 4096, 64 * 1024])
@pytest.mark.parametrize("n_bytes", [1, 5000, 200_001])
def test_fragment_views_copy_nothing_and_make_the_same_fragments(max_size, n_bytes):
    # the NATS publisher writes these views straight to the socket: each must be fragment()'s
    # bytes, and its chunk must lie in the caller's memory, not in a copy
    arr = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8)
    parts = encode_parts(Frame.from_array(arr, sensor_name="cam"))
    if -(-sum(len(memoryview(p).cast("B")) for p in parts) // (max_size - S.FRAG_HEADER_LEN)) \
            > S.MAX_FRAGMENT_COUNT:
        with pytest.raises(FrameError, match="max_size must be at least"):
            codec.fragment_views(parts, max_size)          # refused before anything is made
        return
    count, views = codec.fragment_views(parts, max_size)
    made = list(views)
    assert count == len(made)
    if sum(len(memoryview(p).cast("B")) for p in parts) > max_size:
        assert count > 1 and all(len(f[0]) + sum(v.nbytes for v in f[1:]) <= max_size for f in made)
        r = Reassembler()
        out = [r.feed(b"".join(f)) for f in reversed(made)]
        assert all(o is None for o in out[:-1]) and np.array_equal(out[-1].array, arr)
    else:                                # fits: fragment() sends it whole; views still make one fragment
        assert count == 1 and Reassembler().feed(b"".join(made[0])).nbytes == n_bytes
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    in_arr = [v for f in made for v in f[1:] if lo <= np.frombuffer(v, np.uint8).ctypes.data < hi]
    assert sum(v.nbytes for v in in_arr) == arr.nbytes         # every payload byte is a view of arr
    assert all(len(f[0]) == S.FRAG_HEADER_LEN for f in made)


def test_fragment_header_crc_over_pieces_equals_crc_over_the_joined_chunk():
    chunk = bytes(range(256)) * 9
    one = codec.impl.pack_fragment_header(7, 9, 1, 3, 10_000, 2304, 2304, chunk)
    pieces = [chunk[:1], memoryview(chunk)[1:1000], b"", bytearray(chunk[1000:])]
    assert codec.impl.pack_fragment_header(7, 9, 1, 3, 10_000, 2304, 2304, pieces) == one
    assert codec.impl.pack_fragment_header(7, 9, 1, 3, 10_000, 2304, 2304, tuple(pieces)) == one


def test_fragment_headers_are_self_describing():
    _, enc = _enc(10_000)
    frags = fragment(enc, 4096)
    fid = decode(enc).frame_id
    for i, fr in enumerate(frags):
        frame_id, pub, index, count, total, offset, chunk_size, sending, chunk = codec.impl.parse_fragment_header(fr)
        assert (frame_id, index, count, total) == (fid, i, len(frags), len(enc))
        assert offset == i * chunk_size and bytes(chunk) == enc[offset:offset + len(chunk)]
        assert sending == int.from_bytes(enc[12:16], "little") and fr[5] == 1    # header CRC, minor 1


def _sendings(frame, seqs, max_size=64 * 1024):
    """The fragments of ``frame`` stamped and sent once per seq in ``seqs`` (a publisher's step)."""
    out = []
    for seq in seqs:
        stamp = frame.publish_ts_ns
        parts = codec.stamp_parts(frame, seq, 0xFEED, False)
        while frame.publish_ts_ns == stamp:     # a coarse clock: each sending has a stamp of its own
            parts = codec.stamp_parts(frame, seq, 0xFEED, False)
        out.append(fragment(b"".join(bytes(p) for p in parts), max_size))
    return out


def test_a_frame_sent_again_with_its_id_is_a_frame_of_its_own():
    # the same Frame published three times: one frame id, three frames (under the 1.0 key, the
    # second and third passed for late copies of the first)
    arr = np.arange(300_000, dtype=np.uint32).view(np.uint8)
    frame = Frame.from_array(arr, sensor_name="cam")
    r = Reassembler()
    got = [g for frags in _sendings(frame, [1, 2, 3]) for g in map(r.feed, frags) if g is not None]
    assert [(g.seq, g.frame_id) for g in got] == [(1, frame.frame_id), (2, frame.frame_id), (3, frame.frame_id)]
    assert all(np.array_equal(g.array, arr) for g in got)
    assert r.stats()["completed"] == 3 and r.duplicates == 0 and r.rejected == 0


def test_a_retry_after_a_give_up_part_way_arrives():
    # a publish gave up after two fragments; the retry has the same seq (a refusal leaves no gap)
    # and a new publish_ts_ns: it completes, and the first attempt's part expires on its own
    arr = np.arange(300_000, dtype=np.uint32).view(np.uint8)
    frame = Frame.from_array(arr, sensor_name="cam")
    first, retry = _sendings(frame, [9, 9])
    r = Reassembler(timeout_s=3600)              # expired below by hand, not by the clock
    assert [r.feed(f) for f in first[:2]] == [None, None]
    got = [g for g in map(r.feed, retry) if g is not None]
    assert len(got) == 1 and got[0].seq == 9 and np.array_equal(got[0].array, arr)
    assert r.rejected == 0 and r.pending == 1
    assert r.expire(now=time.monotonic() + 7200) == 1 and r.expired == 1


def test_fragments_naming_another_header_crc_are_rejected():
    arr = np.arange(300_000, dtype=np.uint32).view(np.uint8)
    [frags] = _sendings(Frame.from_array(arr, sensor_name="cam"), [1])
    relabelled = []
    for fr in frags:
        fid, pub, index, count, total, offset, chunk_size, sending, chunk = codec.impl.parse_fragment_header(fr)
        relabelled.append(codec.impl.pack_fragment_header(fid, pub, index, count, total, offset, chunk_size,
                                                          chunk, sending ^ 1) + bytes(chunk))
    r = Reassembler()
    assert [r.feed(f) for f in relabelled[:-1]] == [None] * (len(frags) - 1)
    with pytest.raises(FrameError, match="header CRC"):
        r.feed(relabelled[-1])
    assert r.rejected == 1 and r.completed == 0 and r.pending == 0


def test_fragments_with_sending_0_are_keyed_by_ids_and_geometry_alone():
    # sending 0, as 1.0 writers wrote it (their minor 0 is in the 1.0 golden fragments): a second
    # sending passes for a late copy, as before; nothing is checked against the header CRC
    arr = np.arange(300_000, dtype=np.uint32).view(np.uint8)
    one, two = _sendings(Frame.from_array(arr, sensor_name="cam"), [1, 2])

    def without_sending(fr):
        fid, pub, index, count, total, offset, chunk_size, _, chunk = codec.impl.parse_fragment_header(fr)
        return codec.impl.pack_fragment_header(fid, pub, index, count, total, offset, chunk_size, chunk) + bytes(chunk)

    r = Reassembler()
    got = [g for g in map(r.feed, [without_sending(f) for f in one + two]) if g is not None]
    assert [g.seq for g in got] == [1]
    assert r.duplicates == len(two) and r.rejected == 0


def test_duplicates_are_counted_and_ignored_including_after_completion():
    arr, enc = _enc()
    frags = fragment(enc, 64 * 1024)
    r = Reassembler()
    got = [r.feed(f) for f in frags + frags[:3]]
    assert sum(g is not None for g in got) == 1
    r.feed(frags[0])
    assert r.duplicates == 4 and r.completed == 1 and r.pending == 0


def test_interleaved_frames_from_two_publishers():
    a1, e1 = _enc(seed=1)
    a2, e2 = _enc(seed=2)
    f1, f2 = fragment(e1, 30_000), fragment(e2, 30_000)
    mixed = [x for pair in zip(f1, f2) for x in pair]
    r = Reassembler()
    frames = [g for g in map(r.feed, mixed) if g is not None]
    assert sorted(bytes(f.data) for f in frames) == sorted([a1.tobytes(), a2.tobytes()])


def test_missing_fragment_expires_and_is_counted():
    _, enc = _enc()
    frags = fragment(enc, 64 * 1024)
    r = Reassembler(timeout_s=0.5)
    for f in frags[:-1]:
        assert r.feed(f) is None
    assert r.pending == 1
    assert r.expire(now=time.monotonic() + 1.0) == 1
    assert r.pending == 0 and r.expired == 1


def test_pending_frames_are_bounded():
    r = Reassembler(max_pending=3, max_pending_per_publisher=3)
    for seed in range(10):
        _, enc = _enc(seed=seed)
        r.feed(fragment(enc, 64 * 1024)[0])
    # one publisher (id 0): it makes room by evicting its own oldest, not counted as timed out
    assert r.pending == 3 and r.evicted == 7 and r.expired == 0


def test_a_frame_needing_more_than_the_most_fragments_is_refused_naming_the_least_max_size():
    _, enc = _enc(70_000)
    least = -(-len(enc) // S.MAX_FRAGMENT_COUNT) + S.FRAG_HEADER_LEN
    with pytest.raises(FrameError, match=f"max_size must be at least {least}"):
        fragment(enc, least - 1)
    frags = fragment(enc, least)
    assert len(frags) <= S.MAX_FRAGMENT_COUNT
    r = Reassembler()
    assert [g for g in map(r.feed, frags) if g is not None][0].nbytes == 70_000


def test_forged_total_cannot_allocate_past_the_limit():
    _, enc = _enc()
    first = bytearray(fragment(enc, 64 * 1024)[0])
    struct.pack_into("<Q", first, 32, 1 << 62)      # claim an exabyte-sized frame
    struct.pack_into("<I", first, 28, -(-(1 << 62) // struct.unpack_from("<I", first, 48)[0]) & 0xFFFFFFFF)
    struct.pack_into("<I", first, 60, codec.crc32c(bytes(first[64:]), codec.crc32c(bytes(first[:60]))))
    r = Reassembler(max_frame_bytes=1 << 20)
    with pytest.raises(FrameError, match="max_frame_bytes|geometry"):
        r.feed(bytes(first))
    assert r.rejected == 1 and r.pending == 0


def _resign(frag: bytearray) -> bytes:
    struct.pack_into("<I", frag, 60, codec.crc32c(bytes(frag[64:]), codec.crc32c(bytes(frag[:60]))))
    return bytes(frag)


@pytest.mark.parametrize("field,fmt,value,match", [
    (24, "<I", 10_000, "does not fit"),           # index past count
    (40, "<Q", 7, "does not fit"),                # offset that is not index * chunk_size
    (28, "<I", 99, "geometry|inconsistent"),      # count disagrees with total / chunk
    (48, "<I", 0, "geometry"),                    # chunk size zero
])
def test_forged_fragment_geometry(field, fmt, value, match):
    _, enc = _enc()
    frags = fragment(enc, 64 * 1024)
    r = Reassembler()
    r.feed(frags[0])
    bad = bytearray(frags[1])
    struct.pack_into(fmt, bad, field, value)
    with pytest.raises(FrameError, match=match):
        r.feed(_resign(bad))
    assert r.rejected == 1


def test_corrupt_or_truncated_fragments_are_rejected():
    _, enc = _enc()
    frag = fragment(enc, 64 * 1024)[1]
    r = Reassembler()
    bad = bytearray(frag)
    bad[1000] ^= 1
    with pytest.raises(FrameError, match="CRC32C"):
        r.feed(bytes(bad))
    for n in (4, 63, 64, len(frag) - 1):
        with pytest.raises(FrameError):
            r.feed(frag[:n])
    with pytest.raises(FrameError, match="version"):
        r.feed(_resign(bytearray(frag[:4] + b"\x02" + frag[5:])))
    assert r.rejected == 6


def test_whole_frame_passes_through_without_copy():
    arr, enc = _enc(10_000)
    r = Reassembler()
    g = r.feed(enc)
    assert np.shares_memory(g.array, np.frombuffer(enc, np.uint8)) and r.completed == 1


def test_whole_frame_over_the_limit_and_garbage_are_rejected():
    _, enc = _enc(10_000)
    r = Reassembler(max_frame_bytes=1000)
    with pytest.raises(FrameError, match="max_frame_bytes"):
        r.feed(enc)
    with pytest.raises(FrameError):
        Reassembler().feed(b"\x00" * 100)


def test_fragment_of_garbage_bytes_still_round_trips_as_a_decode_error():
    frags = fragment(b"\x01" * 10_000, 1000)       # not a frame: fragments fine, decode refuses
    r = Reassembler()
    with pytest.raises(FrameError):
        for f in frags:
            r.feed(f)


def test_bad_arguments():
    with pytest.raises(ValueError):
        fragment(b"x" * 100, 64)
    with pytest.raises(ValueError):
        Reassembler(max_pending=0)
    assert S.FRAG_HEADER_LEN == 64
