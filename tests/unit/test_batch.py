"""Batch containers (docs/wire-format.md 2a): round trips at the edges of the size bounds, the
golden vector, and hostile input (only FrameError, or frames that decode or fail on their own)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msight_fast
from msight_fast import FrameError, _pywire, codec
from msight_fast import _schema as S
from msight_fast.codec import (
    BATCH_MAGIC,
    MAX_BATCH_COUNT,
    BatchWriter,
    Frame,
    batch_size,
    batch_spans,
    decode,
    encode,
    fragment,
    is_batch,
    pack_batch,
    unpack_batch,
)
from msight_fast.errors import ConfigError

try:
    from msight_fast._ext import _wire
except ImportError:                               # the twin alone: it is still checked against batch_spans
    _wire = None  # type: ignore[assignment]

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def frame_of(n: int, tag: int = 0, sensor: str = "s") -> bytes:
    """An encoded frame exactly ``n`` bytes long (n >= its header: 128 with these records)."""
    head = len(encode(Frame.from_bytes(b"", sensor_name=sensor, encoding="bytes")))
    f = Frame.from_bytes(bytes([tag % 256]) * (n - head), sensor_name=sensor, encoding="bytes", frame_id=tag + 1)
    out = encode(f)
    assert len(out) == n
    return out


def reseal(buf: bytearray) -> bytes:
    """Recompute the batch header CRC, so that a forged field reaches the checks behind it."""
    count = struct.unpack_from("<I", buf, 8)[0]
    end = min(len(buf), 24 + 4 * count)
    struct.pack_into("<I", buf, 12, _pywire.crc32c(bytes(buf[16:end]), _pywire.crc32c(bytes(buf[:12]))))
    return bytes(buf)


def frames_back(buf: bytes) -> List[bytes]:
    return [bytes(v) for v in unpack_batch(buf)]


WRITERS = [codec._BatchWriter] + ([_wire.BatchWriter] if _wire is not None else [])


@pytest.fixture(params=WRITERS, ids=lambda w: "compiled" if w is not codec._BatchWriter else "twin")
def Writer(request: Any) -> Any:  # noqa: N802 - it stands for a class
    """Each BatchWriter: the twin, and the compiled one (codec.BatchWriter) where it is built."""
    return request.param


def _agree(buf: Any) -> None:
    """batch_frames, compiled and twin, give unpack_batch's frames, or FrameError with its message."""
    try:
        want: Any = [bytes(v) for v in unpack_batch(buf)]
    except FrameError as e:
        want = str(e)
    impls = [codec._batch_frames] + ([_wire.batch_frames] if _wire is not None else [])
    for fn in impls:
        try:
            got: Any = fn(buf)
            assert all(type(f) is bytes for f in got)
        except FrameError as e:
            got = str(e)
        assert got == want, fn


# -- round trips
@pytest.mark.parametrize("sizes", [[128], [128, 129], [1152] * 5, [133, 200, 4096, 131, 1000, 16384], [16385, 128]])
def test_round_trip_keeps_every_frame_and_its_alignment(sizes: List[int]) -> None:
    frames = [frame_of(n, i) for i, n in enumerate(sizes)]
    c = pack_batch([[f] for f in frames])
    assert is_batch(c) and c[:4] == BATCH_MAGIC
    assert len(c) == batch_size(sizes)
    spans = batch_spans(c)
    assert [b - a for a, b in spans] == sizes
    assert all(a % 8 == 0 for a, _ in spans)                   # every frame 8-byte aligned
    assert frames_back(c) == frames
    for view, f in zip(unpack_batch(c), frames):
        assert view.readonly
        got = decode(view)
        assert bytes(got.data) == bytes(decode(f).data) and got.frame_id == decode(f).frame_id


def test_a_writer_makes_what_pack_batch_makes_and_frees_the_callers_buffers(Writer: Any) -> None:  # noqa: N803
    payload = bytearray(b"a" * 300)
    f = Frame.from_bytes(payload, sensor_name="cam", encoding="bytes")
    parts = msight_fast.codec.encode_parts(f)
    w = Writer()
    predicted = w.size_with(sum(len(memoryview(p)) for p in parts))
    assert w.add(parts) == predicted == w.size
    payload[:] = b"b" * 300                                    # the frame was copied when added
    more = frame_of(200, 3)
    w.add([more])
    c = w.pack()
    assert len(c) == w.size == batch_size(w.lengths)
    first, second = frames_back(c)
    assert bytes(decode(first).data) == b"a" * 300 and second == more
    assert c == pack_batch([[first], [more]])
    assert w.frames() == [first, more] and w.first() == first


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 700), st.booleans()), min_size=1, max_size=40))
def test_the_compiled_writer_packs_what_the_twin_packs(items: List[Any]) -> None:
    """Any frames, given whole or as encode_parts lists: the same container, bit for bit, and
    the same sizes along the way; the container splits back into exactly those frames."""
    writers = [w() for w in WRITERS]
    want: List[bytes] = []
    for n, as_parts in items:
        f = Frame.from_bytes(bytes([n % 251]) * n, sensor_name="s", encoding="bytes", frame_id=n + 1)
        parts = msight_fast.codec.encode_parts(f) if as_parts else [encode(f)]
        want.append(encode(f))
        sizes = {(w.size_with(len(want[-1])), w.add(parts), w.size, w.count, w.body) for w in writers}
        assert len(sizes) == 1
    packs = {w.pack() for w in writers}
    assert len(packs) == 1
    c = packs.pop()
    assert len(c) == batch_size([len(x) for x in want])
    assert frames_back(c) == want and codec.batch_frames(c) == want
    for w in writers:
        assert w.frames() == want and w.first() == want[0] and w.lengths == [len(x) for x in want]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 3000), min_size=1, max_size=12), min_size=1, max_size=5))
def test_a_cleared_writer_packs_what_a_fresh_one_packs(batches: List[List[int]]) -> None:
    """A producer reuses one writer for batch after batch: after ``clear`` nothing of the last
    batch is left in what it packs, whether the next batch is larger or smaller."""
    kept = [w() for w in WRITERS]
    for sizes in batches:
        frames = [frame_of(128 + n, tag=n) for n in sizes]
        for w in kept:
            w.clear()
            assert (w.count, w.body, w.size, w.lengths) == (0, 0, 24, [])
            for f in frames:
                w.add([f])
        fresh = WRITERS[-1]()
        for f in frames:
            fresh.add([f])
        assert {w.pack() for w in kept} == {fresh.pack()} == {pack_batch([[f] for f in frames])}
        assert all(w.frames() == frames and w.first() == frames[0] for w in kept)


def test_an_empty_writer_has_nothing_to_pack(Writer: Any) -> None:  # noqa: N803
    w = Writer()
    assert w.count == 0 and w.size == 24 and w.frames() == [] and w.lengths == []
    with pytest.raises(ValueError):
        w.pack()
    with pytest.raises(ValueError):
        w.first()
    with pytest.raises(ValueError):
        w.add([b"\x93MSF" + bytes(10)])                 # refused: the writer stays empty
    with pytest.raises(ValueError):
        w.add([])
    assert w.count == 0 and w.size == 24 and w.body == 0


def test_a_refused_frame_leaves_a_filled_writer_as_it_was(Writer: Any) -> None:  # noqa: N803
    """Refused after its bytes were copied in (long enough, wrong magic), over frames already added."""
    w = Writer()
    for n in (130, 300):
        w.add([frame_of(n, n)])
    before = (w.pack(), w.count, w.size, w.body, w.frames())
    bad = frame_of(200, 1)
    for parts in ([b"XXXX" + bad[4:]], [b"XXXX", bad[4:]], [bad[:100], bad[100:], "not a buffer"]):
        with pytest.raises((ValueError, TypeError)):
            w.add(parts)
        assert (w.pack(), w.count, w.size, w.body, w.frames()) == before
    w.add([bad])
    assert w.frames() == before[4] + [bad]


@pytest.mark.skipif(_wire is None, reason="the compiled writer")
def test_the_compiled_writers_sizes_cannot_be_forged() -> None:
    """pack trusts count, size and body: Python may read them, never write them."""
    w = _wire.BatchWriter()
    w.add([frame_of(130)])
    for name in ("count", "size", "body"):
        with pytest.raises(AttributeError):
            setattr(w, name, 30)
    assert len(w.pack()) == w.size


def test_a_frame_of_any_length_is_padded_to_eight() -> None:
    for n in range(128, 160):
        c = pack_batch([[frame_of(n)], [frame_of(136)]])
        (a0, b0), (a1, b1) = batch_spans(c)
        assert b0 - a0 == n and a1 == -(-b0 // 8) * 8 and b1 - a1 == 136
        assert set(c[b0:a1]) <= {0}


def test_a_batch_that_reaches_its_byte_bound_exactly(Writer: Any) -> None:  # noqa: N803
    """What the producer does with batch_max_bytes: frames join while they fit; the one that
    fills the bound exactly is taken, and then no frame fits any more."""
    frames = [frame_of(1024, i) for i in range(4)]
    bound = batch_size([1024] * 4)                             # 40 + 4 x 1024
    assert bound == 4136
    w = Writer()
    for f in frames:
        assert w.size_with(len(f)) <= bound
        w.add([f])
    assert w.size == bound and len(w.pack()) == bound
    assert w.size_with(128) > bound                            # full: not even the smallest frame fits
    assert frames_back(w.pack()) == frames


def test_the_count_bound(Writer: Any) -> None:  # noqa: N803
    f = frame_of(128)
    w = Writer()
    for _ in range(MAX_BATCH_COUNT):
        w.add([f])
    with pytest.raises(ValueError):
        w.add([f])
    c = w.pack()
    assert len(batch_spans(c)) == MAX_BATCH_COUNT
    with pytest.raises(ValueError):
        pack_batch([[f]] * (MAX_BATCH_COUNT + 1))
    with pytest.raises(ValueError):
        pack_batch([])
    # a forged count above the bound, in a buffer long enough for its index
    forged = bytearray(c + bytes(8 * 1024))
    struct.pack_into("<I", forged, 8, MAX_BATCH_COUNT + 1)
    struct.pack_into("<Q", forged, 16, len(forged))
    with pytest.raises(FrameError, match="count"):
        batch_spans(reseal(forged))


# -- stamp_add: stamp_parts and add in one call (the Kafka publisher's shortest path)
# the writers whose stamp_add takes this codec's Frame (the compiled one takes the compiled Frame)
STAMPERS = [w for w in WRITERS if w is codec._BatchWriter or (_wire is not None and Frame is _wire.Frame)]


@pytest.fixture(params=STAMPERS, ids=lambda w: "compiled" if w is not codec._BatchWriter else "twin")
def Stamper(request: Any) -> Any:  # noqa: N802 - it stands for a class
    return request.param


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 700), st.booleans(), st.sampled_from(["s", "cam", "lidar/top"])),
                min_size=1, max_size=30), st.booleans())
def test_stamp_add_adds_what_add_of_stamp_parts_adds(items: List[Any], shared: bool) -> None:
    """Each writer, fed by stamp_add, packs what a writer fed the same frames' encode_parts packs
    (a frame is stamped by stamp_add, so its parts are taken after), in either layout."""
    for fast, slow in [(w(), w()) for w in STAMPERS]:
        fast.shared = slow.shared = shared
        for i, (n, checksum, sensor) in enumerate(items):
            f = Frame.from_bytes(bytes([n % 251]) * n, sensor_name=sensor, encoding="bytes")
            size = fast.stamp_add(f, 10 + i, 99, checksum, 1 << 20, 1 << 30)
            assert (f.seq, f.publisher_id) == (10 + i, 99) and f.publish_ts_ns > 0
            assert size == slow.add(msight_fast.codec.encode_parts(f, checksum=checksum)) == fast.size
            assert (fast.count, fast.body) == (slow.count, slow.body)
        assert fast.pack() == slow.pack() and fast.frames() == slow.frames()


def test_stamp_add_takes_a_frame_up_to_its_bounds_exactly(Stamper: Any) -> None:  # noqa: N803
    """``cap`` bounds the encoded frame and ``limit`` the container with it, each inclusive;
    past either nothing is added, though the frame is stamped."""
    w = Stamper()
    w.add([frame_of(300, 1)])
    before = (w.pack(), w.count, w.size, w.body)
    f = Frame.from_bytes(b"x" * 872, sensor_name="s", encoding="bytes")   # 1,000 bytes encoded
    with_it = w.size_with(1000)
    assert w.stamp_add(f, 7, 5, False, 999, 1 << 30) == 0               # one byte over cap
    assert w.stamp_add(f, 8, 5, False, 1000, with_it - 1) == 0          # one byte over limit
    assert (w.pack(), w.count, w.size, w.body) == before
    assert (f.seq, f.publisher_id) == (8, 5)
    assert w.stamp_add(f, 9, 5, False, 1000, with_it) == with_it == w.size
    got = decode(w.frames()[1])
    assert (got.seq, got.publisher_id, got.frame_id, bytes(got.data)) == (9, 5, f.frame_id, b"x" * 872)


def test_stamp_add_refuses_a_frame_past_the_count_bound(Stamper: Any) -> None:  # noqa: N803
    f = frame_of(128)
    w = Stamper()
    for _ in range(MAX_BATCH_COUNT):
        w.add([f])
    size = w.size
    assert w.stamp_add(Frame.from_bytes(b"", sensor_name="s", encoding="bytes"), 1, 1, False, 1 << 20, 1 << 40) == 0
    assert (w.count, w.size) == (MAX_BATCH_COUNT, size)


def test_stamp_add_raises_what_stamp_parts_raises(Stamper: Any) -> None:  # noqa: N803
    w = Stamper()
    f = Frame.from_bytes(b"abc", sensor_name="s", encoding="bytes")
    with pytest.raises(TypeError):
        w.stamp_add(f, 1.5, 1, False, 1 << 20, 1 << 30)                  # a float seq, as stamp_parts
    with pytest.raises(TypeError):
        w.stamp_add(b"not a frame", 1, 1, False, 1 << 20, 1 << 30)
    assert w.count == 0 and w.size == 24


def test_only_whole_frames_go_into_a_batch() -> None:
    big = frame_of(1000)
    frag = fragment(big, 400)[0]
    inner = pack_batch([[frame_of(128)]])
    for bad in (frag, inner, b"\x93MSF" + bytes(10), b"not a frame at all, but long enough" * 4):
        with pytest.raises(ValueError):
            pack_batch([[bad]])
        for writer in WRITERS:
            with pytest.raises(ValueError):
                writer().add([bad])


# -- the golden vector
def test_golden_batch_vector(wire: Any) -> None:
    want = json.loads((GOLDEN / "batch_three.json").read_text())
    raw = bytes.fromhex((GOLDEN / "batch_three.hex").read_text().replace("\n", ""))
    frames = [bytes.fromhex((GOLDEN / f"{n}.hex").read_text().replace("\n", "")) for n in want["frames"]]
    assert len(raw) == want["total"]
    assert [list(s) for s in batch_spans(raw)] == want["spans"]
    assert frames_back(raw) == frames
    assert pack_batch([[f] for f in frames]) == raw                 # bit-exact re-encoding
    vectors = json.loads((GOLDEN / "vectors.json").read_text())
    for name, view in zip(want["frames"], unpack_batch(raw)):
        f = wire.decode(view)
        assert f.sensor_name == vectors[name]["sensor_name"] and bytes(f.data).hex() == vectors[name]["payload_hex"]


# -- hostile input
GOOD = pack_batch([[frame_of(n, i)] for i, n in enumerate([142, 128, 300])])


def test_every_truncation_and_extension_is_rejected() -> None:
    for n in range(len(GOOD)):
        with pytest.raises(FrameError):
            batch_spans(GOOD[:n])
        _agree(GOOD[:n])
    for extra in (b"\0", b"\0" * 8, b"x" * 8):
        with pytest.raises(FrameError):
            batch_spans(GOOD + extra)
        _agree(GOOD + extra)


def test_every_single_byte_change_of_the_header_and_index_is_rejected() -> None:
    index_end = 24 + 4 * 3
    for i in list(range(0, 6)) + list(range(8, index_end)):   # not the minor version or flags
        bad = bytearray(GOOD)
        bad[i] ^= 0x41
        with pytest.raises(FrameError):
            batch_spans(bytes(bad))


def test_minor_version_and_flags_are_ignored() -> None:
    bad = bytearray(GOOD)
    bad[5] = 7
    struct.pack_into("<H", bad, 6, 0xFFFE)         # bit 0 is the shared-header layout's (2b)
    assert frames_back(reseal(bad)) == frames_back(GOOD)


def _forge(**fields: int) -> bytes:
    buf = bytearray(GOOD)
    if "major" in fields:
        buf[4] = fields["major"]
    if "count" in fields:
        struct.pack_into("<I", buf, 8, fields["count"])
    if "total" in fields:
        struct.pack_into("<Q", buf, 16, fields["total"])
    for i in range(3):
        if f"len{i}" in fields:
            struct.pack_into("<I", buf, 24 + 4 * i, fields[f"len{i}"])
    return reseal(buf)


@pytest.mark.parametrize("fields,what", [
    ({"major": 2}, "major"),
    ({"count": 0}, "count"),
    ({"count": 2}, "not a frame"),                  # frame 0 then looked for where the index was
    ({"count": 4}, None),                           # a fourth length read from frame 0's bytes
    ({"count": 0xFFFFFFFF}, "count"),
    ({"count": 1 << 16}, "index"),                  # within the bound, but its index runs past the message
    ({"total": len(GOOD) + 8}, "total"),
    ({"total": 2**64 - 1}, "total"),
    ({"len0": 0}, "shorter"),
    ({"len0": 87}, "shorter"),
    ({"len0": 0xFFFFFFFF}, "runs past"),
    ({"len0": 150}, None),                          # frame 1 then starts inside frame 0
    ({"len2": 305}, "runs past"),
])
def test_forged_counts_lengths_and_totals_are_rejected(fields: dict, what: Any) -> None:
    with pytest.raises(FrameError, match=what):
        batch_spans(_forge(**fields))
    _agree(_forge(**fields))


def test_a_length_that_takes_in_its_padding_leaves_the_frame_to_decode() -> None:
    """The last frame (300 bytes) said to be 304: the container holds, the frame does not."""
    views = unpack_batch(_forge(len2=304))
    assert len(views[2]) == 304
    with pytest.raises(FrameError):
        decode(views[2])


def test_a_fragment_or_a_batch_inside_a_batch_is_refused() -> None:
    frag = fragment(frame_of(1000), 400)[0]
    inner = GOOD
    for bad in (frag, inner):
        n = len(bad)
        head = struct.pack("<4sBBHIIQ", BATCH_MAGIC, 1, 0, 0, 1, 0, 0)
        body = bad + bytes(-n & 7)
        buf = bytearray(head + struct.pack("<I", n) + bytes(4) + body)
        struct.pack_into("<Q", buf, 16, len(buf))
        with pytest.raises(FrameError, match="whole frames only"):
            batch_spans(reseal(buf))
        _agree(reseal(buf))


def test_non_zero_padding_is_rejected() -> None:
    spans = batch_spans(GOOD)
    end0 = spans[0][1]
    assert spans[1][0] > end0                        # a 142-byte frame: 2 bytes of padding
    bad = bytearray(GOOD)
    bad[end0] = 1
    with pytest.raises(FrameError, match="padding"):
        batch_spans(bytes(bad))
    _agree(bytes(bad))
    bad = bytearray(GOOD)
    bad[36] = 1                                      # between the index (ends at 36) and frame 0 (at 40)
    with pytest.raises(FrameError, match="padding"):
        batch_spans(bytes(bad))
    _agree(bytes(bad))


def test_a_non_byte_buffer_is_read_as_its_bytes() -> None:
    import numpy as np
    arr = np.frombuffer(GOOD, dtype="<u8")
    assert batch_spans(arr) == batch_spans(GOOD)
    _agree(arr)
    _agree(memoryview(bytearray(GOOD)))
    # not C-contiguous: one FrameError, the same from both, whatever the shape
    _agree(memoryview(GOOD + GOOD)[::2])
    _agree(memoryview(GOOD[:20])[::2])
    _agree(np.asfortranarray(np.frombuffer(GOOD, dtype=np.uint8).reshape(-1, 8)))
    with pytest.raises(FrameError, match="C-contiguous"):
        batch_spans(memoryview(GOOD + GOOD)[::2])
    assert [bytes(v) for v in unpack_batch(memoryview(bytearray(GOOD)))] == frames_back(GOOD)


def _outcome(buf: bytes) -> None:
    """The only outcomes: FrameError for the container, or frames each decoding or failing alone."""
    _agree(buf)
    try:
        views = unpack_batch(buf)
    except FrameError:
        return
    for v in views:
        assert bytes(v[:4]) == S.MAGIC
        try:
            decode(v)
        except FrameError:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans(), st.integers(0, len(GOOD)))
def test_mutations_give_only_frame_errors_or_frames(edits: List[Any], sealed: bool, cut: int) -> None:
    buf = bytearray(GOOD)
    for pos, value in edits:
        buf[pos] = value
    data = reseal(buf) if sealed else bytes(buf)
    _outcome(data)
    _outcome(data[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40), st.binary(max_size=600))
def test_forged_indexes_give_only_frame_errors(count: int, lengths: List[int], body: bytes) -> None:
    lengths = (lengths * count)[:count]
    head = bytearray(struct.pack("<4sBBHIIQ", BATCH_MAGIC, 1, 0, 0, count, 0, 0) + struct.pack(f"<{count}I", *lengths))
    buf = head + bytes(-len(head) & 7) + body
    struct.pack_into("<Q", buf, 16, len(buf))
    _outcome(reseal(buf))


# -- the producer's options
def test_batch_options_are_validated() -> None:
    from msight_fast import registry
    k = registry.load_config("kafka", {}, {})
    assert (k.batch_max_frame_bytes, k.batch_max_bytes, k.batch_linger_ms) == (16384, 262144, 5)
    k = registry.load_config("kafka", {}, {"MSIGHT_KAFKA_BATCH_MAX_FRAME_BYTES": "0",
                                           "MSIGHT_KAFKA_BATCH_LINGER_MS": "20"})
    assert k.batch_max_frame_bytes == 0 and k.batch_linger_ms == 20
    for opts, name in [({"batch_max_frame_bytes": 100}, "batch_max_frame_bytes"),
                       ({"batch_max_bytes": 512}, "batch_max_bytes"),
                       ({"batch_linger_ms": 60_001}, "batch_linger_ms"),
                       ({"batch_max_frame_bytes": "lots"}, "batch_max_frame_bytes"),
                       ({"batch_max_bytes": 4096, "batch_max_frame_bytes": 4080}, "BATCH_MAX_FRAME_BYTES")]:
        with pytest.raises(ConfigError, match=name):
            registry.load_config("kafka", opts, {})
    with pytest.raises(ConfigError, match="MSIGHT_KAFKA_BATCH_MAX_BYTES"):
        registry.load_config("kafka", {}, {"MSIGHT_KAFKA_BATCH_MAX_BYTES": "-1"})
    assert registry.load_config("kafka", {}, {}).batch_shared_header is True
    assert registry.load_config("kafka", {}, {"MSIGHT_KAFKA_BATCH_SHARED_HEADER": "false"}).batch_shared_header is False
    with pytest.raises(ConfigError, match="MSIGHT_KAFKA_BATCH_SHARED_HEADER"):
        registry.load_config("kafka", {}, {"MSIGHT_KAFKA_BATCH_SHARED_HEADER": "sometimes"})


def test_a_batch_a_backend_could_not_split_is_rejected_not_passed_on_as_bytes() -> None:
    """The MSight drop-in's subscription passes on messages that are not frames as bytes; a
    batch container that reaches it (malformed, so its backend did not split it) is rejected."""
    bus = msight_fast.connect("memory", name="test_batch_passthrough")
    try:
        sub = bus.subscribe("t")
        sub._passthrough = True
        bad = bytearray(GOOD)
        bad[12] ^= 1                                 # its header CRC
        bus._send_bytes("t", bytes(bad))
        bus._send_bytes("t", b"plain bytes")
        got = sub.recv(timeout=5)
        assert got is not None and bytes(got.data) == b"plain bytes"
        assert sub.stats()["rejected"] == 1
    finally:
        bus.close()


def test_the_codec_uses_the_compiled_writer_where_it_is_built() -> None:
    want = _wire.BatchWriter if (_wire is not None and msight_fast.codec.HAS_EXTENSIONS) else codec._BatchWriter
    assert BatchWriter is want
