"""record / read_mcap / play over the in-process backend: bit-exact frames, the MCAP layout of
msight_fast/_fox.py checked with the mcap reader and protobuf, stop conditions, hostile files."""
import json
import math
import random
import signal
import threading
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("mcap")
pytest.importorskip("foxglove")
pytest.importorskip("google.protobuf")

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402
from mcap.reader import make_reader  # noqa: E402
from mcap.writer import Writer  # noqa: E402

import msight_fast  # noqa: E402
from msight_fast import ConfigError, Frame, FrameError, _fox, encode  # noqa: E402
from msight_fast.record import RECORDING_METADATA, Player, Recorder, messages, read_mcap  # noqa: E402

from ..helpers import real_jpeg, real_sweep, wait_for  # noqa: E402


def _name():
    return f"rec_{uuid.uuid4().hex[:10]}"


def _bus():
    # one in-process broker per test: nothing of another test's topics is seen
    return msight_fast.connect("memory", name=_BROKER)


_BROKER = "test_record"


@pytest.fixture(autouse=True)
def _fresh_broker():
    global _BROKER
    _BROKER = _name()
    yield


META = {"cam": "front", "exposure_us": 1250, "gain": 1.5, "bad": float("nan"), "neg": -7}


def _payloads():
    rng = np.random.default_rng(7)
    return {
        "bgr8": (rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8), "bgr8"),   # > 1 MiB: fragmented
        "mono8": (rng.integers(0, 256, (48, 64), dtype=np.uint8), "mono8"),
        "mono16": (rng.integers(0, 65536, (48, 64), dtype=np.uint16), "mono16"),
        "jpeg": (real_jpeg(), "jpeg"),
        "lidar": (real_sweep(), "pointcloud"),
        "ndarray": (rng.standard_normal((3, 4, 5)), None),
        "bytes": (b"\x00plain bytes\xff" * 50, "bytes"),
    }


KINDS = {"bgr8": _fox.RAW_IMAGE, "mono8": _fox.RAW_IMAGE, "mono16": _fox.RAW_IMAGE, "jpeg": _fox.COMPRESSED_IMAGE,
         "lidar": _fox.POINT_CLOUD, "ndarray": _fox.FRAME, "bytes": _fox.FRAME}


def _publish_all(bus, prefix, payloads, n=2):
    """Publish n frames of every payload on f"{prefix}/{name}"; returns {topic: [sent Frame]}."""
    sent = {}
    for i in range(n):
        for name, (obj, enc) in payloads.items():
            topic = f"{prefix}/{name}"
            kw = {"encoding": enc} if enc else {}
            f = bus.publish(topic, obj, sensor_name=f"sensor_{name}", device_name="rsu-7", meta={**META, "i": i}, **kw)
            sent.setdefault(topic, []).append(f)
    return sent


def _record(tmp_path, payloads, n=2, **kw):
    prefix = _name()
    topics = [f"{prefix}/{name}" for name in payloads]
    path = tmp_path / "run.mcap"
    pub = _bus()
    rec = Recorder(topics, path, backend="memory", name=_BROKER, **kw).start()
    sent = _publish_all(pub, prefix, payloads, n)
    total = n * len(payloads)
    wait_for(lambda: rec.stats()["frames"] >= total, f"{total} frames recorded", timeout=60)
    summary = rec.stop()
    pub.close()
    return path, sent, summary


def _same(got: Frame, want: Frame, *, transport_fields=True):
    assert (got.sensor_name, got.device_name, got.encoding, got.frame_id) == \
        (want.sensor_name, want.device_name, want.encoding, want.frame_id)
    assert (got.capture_ts_ns, got.creation_ts_ns) == (want.capture_ts_ns, want.creation_ts_ns)
    if transport_fields:
        assert (got.seq, got.publisher_id, got.publish_ts_ns) == (want.seq, want.publisher_id, want.publish_ts_ns)
    assert set(got.meta) == set(want.meta)
    for k, v in want.meta.items():
        g = got.meta[k]
        assert type(g) is type(v), k
        assert (math.isnan(g) and math.isnan(v)) if isinstance(v, float) and math.isnan(v) else g == v, k
    assert got.nbytes == want.nbytes and bytes(got.data) == bytes(want.data)
    if want.array is None:
        assert got.array is None
    else:
        assert got.array.dtype == want.array.dtype and got.array.shape == want.array.shape
        assert got.array.tobytes() == want.array.tobytes()


def test_record_then_read_mcap_is_bit_exact_for_every_kind_of_frame(tmp_path):
    payloads = _payloads()
    path, sent, summary = _record(tmp_path, payloads)
    got = {}
    for r in messages(path):
        got.setdefault(r.topic, []).append(r)
    assert set(got) == set(sent)
    for topic, frames in sent.items():
        assert len(got[topic]) == len(frames)
        for r, want in zip(got[topic], frames):
            _same(r.frame, want)
            # MCAP times: publish time is the frame's, log time its receipt (after it was published)
            assert r.publish_time_ns == want.publish_ts_ns
            assert want.publish_ts_ns <= r.log_time_ns <= summary["end_ns"]
    # read_mcap gives the same frames, in the same order
    flat = [f for f in read_mcap(path)]
    assert [(f.sensor_name, f.seq) for f in flat] == [(r.frame.sensor_name, r.frame.seq)
                                                       for r in messages(path)]
    assert summary["frames"] == sum(len(v) for v in sent.values()) and summary["stopped_by"] == "stop"
    assert set(summary["topics"]) == set(sent)
    for v in summary["topics"].values():
        assert v["frames"] == v["received"] == 2 and v["gaps"] == 0 and v["dropped"] == 0 and v["rejected"] == 0


def test_read_mcap_is_exported_lazily_and_filters_topics(tmp_path):
    payloads = {k: v for k, v in _payloads().items() if k in ("mono8", "bytes", "jpeg")}
    path, sent, _ = _record(tmp_path, payloads, n=3)
    assert msight_fast.read_mcap is read_mcap
    want = [t for t in sent if t.endswith("/mono8") or t.endswith("/bytes")]
    frames = list(msight_fast.read_mcap(path, topics=want))
    assert sorted(f.sensor_name for f in frames) == sorted(["sensor_mono8"] * 3 + ["sensor_bytes"] * 3)
    assert [f.seq for f in frames if f.sensor_name == "sensor_mono8"] == [1, 2, 3]
    assert list(read_mcap(path, topics="no/such/topic")) == []


def _protobuf_class(schema):
    fds = descriptor_pb2.FileDescriptorSet.FromString(schema.data)
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))


def test_the_file_is_valid_mcap_with_foxglove_messages_that_protobuf_decodes(tmp_path):
    payloads = _payloads()
    path, sent, summary = _record(tmp_path, payloads)
    with open(path, "rb") as fh:
        reader = make_reader(fh, validate_crcs=True)
        s = reader.get_summary()
        assert s is not None and s.statistics is not None
        names = {sc.name: sc.encoding for sc in s.schemas.values()}
        assert names == {"foxglove.RawImage": "protobuf", "foxglove.CompressedImage": "protobuf",
                         "foxglove.PointCloud": "protobuf", _fox.INFO_SCHEMA_NAME: "jsonschema"}
        by_topic = {c.topic: c for c in s.channels.values()}
        for topic in sent:
            kind = KINDS[topic.rsplit("/", 1)[1]]
            ch = by_topic[topic]
            assert ch.metadata == {"msight_fast.kind": kind}
            assert ch.message_encoding == ("msight_fast" if kind == _fox.FRAME else "protobuf")
            info = by_topic.get(topic + _fox.INFO_SUFFIX)
            assert (info is None) == (kind == _fox.FRAME)
            assert s.statistics.channel_message_counts[ch.id] == 2
            if info is not None:
                assert info.message_encoding == "json" and s.statistics.channel_message_counts[info.id] == 2
        n_info = sum(2 for t in sent if KINDS[t.rsplit("/", 1)[1]] != _fox.FRAME)
        assert s.statistics.message_count == 2 * len(sent) + n_info
        assert s.statistics.message_start_time >= summary["start_ns"]
        assert s.statistics.message_end_time <= summary["end_ns"]
        [meta] = [m for m in reader.iter_metadata() if m.name == RECORDING_METADATA]
        assert meta.metadata["backend"] == "memory" and json.loads(meta.metadata["topics"]) == list(sent)
        assert int(meta.metadata["start_ns"]) == summary["start_ns"]
        stats = json.loads(meta.metadata["stats"])
        assert {t: v["received"] for t, v in stats.items()} == {t: 2 for t in sent}
        assert all(v["gaps"] == 0 and v["dropped"] == 0 and v["rejected"] == 0 for v in stats.values())
        assert meta.metadata["library"].startswith("msight_fast ")

        checked = set()
        fh.seek(0)
        for schema, channel, message in make_reader(fh).iter_messages(log_time_order=False):
            if schema is None or schema.encoding != "protobuf":
                continue
            msg = _protobuf_class(schema).FromString(message.data)
            name = channel.topic.rsplit("/", 1)[1]
            want = sent[channel.topic][message.sequence - 1] if channel.topic in sent else None
            assert want is not None
            assert msg.data == bytes(want.data)
            assert msg.frame_id == want.sensor_name
            assert msg.timestamp.seconds * 10**9 + msg.timestamp.nanos == want.capture_ts_ns
            if schema.name == "foxglove.RawImage":
                a = want.array
                assert (msg.height, msg.width, msg.encoding) == (a.shape[0], a.shape[1], name)
                assert msg.step == a.shape[1] * (a.shape[2] if a.ndim == 3 else 1) * a.dtype.itemsize
            elif schema.name == "foxglove.CompressedImage":
                assert msg.format == "jpeg"
            else:
                a = want.array
                assert msg.point_stride == a.dtype.itemsize
                fields = {f.name: f.offset for f in msg.fields}
                assert {"x", "y", "z", "intensity"} <= set(fields)
                assert all(fields[n] == a.dtype.fields[n][1] for n in fields)
            checked.add(name)
    assert checked == {"bgr8", "mono8", "mono16", "jpeg", "lidar"}


def test_gaps_are_recorded_per_frame_and_in_the_summary(tmp_path):
    """A publisher's frames 3 and 4 lost upstream: the subscriber sees 1, 2, 5. The frames go on
    the wire as that publisher encoded them (a Bus sends the bytes untouched, as the compat
    layer's plain mode does), so the recorder meets them exactly as after a real loss."""
    topic = _name()
    path = tmp_path / "gaps.mcap"
    pub = _bus()
    rec = Recorder([topic], path, bus=_bus()).start()
    pid = 0xC0FFEE
    sent = []
    for seq in (1, 2, 5, 6):
        f = Frame.from_array(np.full((8, 8), seq, np.uint8), sensor_name="cam", encoding="mono8")
        f.seq, f.publisher_id, f.publish_ts_ns = seq, pid, time.time_ns()
        pub._send_bytes(topic, encode(f))
        sent.append(f)
    wait_for(lambda: rec.stats()["frames"] >= 4, "4 frames recorded")
    summary = rec.stop()
    assert summary["topics"][topic]["gaps"] == summary["topics"][topic]["recorded_gaps"] == 2
    got = list(messages(path))
    assert [r.frame.seq for r in got] == [1, 2, 5, 6]
    assert all(r.frame.publisher_id == pid for r in got)
    with open(path, "rb") as fh:
        gaps = [json.loads(m.data)["gap"] for _, c, m in make_reader(fh).iter_messages(log_time_order=False)
                if c.topic.endswith(_fox.INFO_SUFFIX)]
        fh.seek(0)
        meta = next(m for m in make_reader(fh).iter_metadata() if m.name == RECORDING_METADATA)
    assert gaps == [0, 0, 2, 0]
    assert json.loads(meta.metadata["stats"])[topic]["gaps"] == 2
    assert json.loads(meta.metadata["stats"])[topic]["received"] == 4
    pub.close()


def test_play_publishes_bit_exact_frames_with_new_seq_and_publisher(tmp_path):
    payloads = _payloads()
    path, sent, _ = _record(tmp_path, payloads)
    sub_bus, play_bus = _bus(), _bus()
    subs = {t: sub_bus.subscribe(t) for t in sent}
    player = Player(path, bus=play_bus, rate=50.0)
    st = player.run()
    n = sum(len(v) for v in sent.values())
    assert st["frames"] == n and st["loops"] == 1 and st["errors"] == 0
    assert st["bytes"] == sum(f.nbytes for v in sent.values() for f in v)
    d = st["drift_ms"]
    assert d["p50"] is not None and d["p99"] is not None and d["max"] is not None
    for topic, frames in sent.items():
        got = [subs[topic].recv(timeout=30) for _ in frames]
        assert all(g is not None for g in got), topic
        for g, want in zip(got, frames):
            _same(g, want, transport_fields=False)
            assert g.publisher_id == play_bus.publisher_id != want.publisher_id
            assert g.publish_ts_ns >= want.publish_ts_ns
        assert [g.seq for g in got] == list(range(1, len(frames) + 1))
    sub_bus.close()
    play_bus.close()


def test_play_loops_with_the_timeline_shifted_until_stopped(tmp_path):
    payloads = {"mono8": _payloads()["mono8"]}
    path, sent, _ = _record(tmp_path, payloads, n=3)
    [(topic, frames)] = sent.items()
    sub_bus = _bus()
    sub = sub_bus.subscribe(topic)
    player = Player(path, backend="memory", name=_BROKER, rate=100.0, loop=True).start()
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 7 and time.monotonic() < deadline:
        f = sub.recv(timeout=1)
        if f is not None:
            got.append(f)
    player.stop()
    assert player.join(timeout=10)
    assert len(got) == 7
    for i, g in enumerate(got):
        _same(g, frames[i % 3], transport_fields=False)
    assert [g.seq for g in got] == list(range(1, 8))            # one publisher, one stream
    assert player.stats()["loops"] >= 2
    sub_bus.close()


def test_player_and_recorder_refuse_bad_options(tmp_path):
    for rate in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigError):
            Player(tmp_path / "x.mcap", backend="memory", rate=rate)
    with pytest.raises(ConfigError):
        Player(tmp_path / "x.mcap", bus=_bus(), backend="memory")
    for kw in ({"duration": 0}, {"duration": -1}, {"max_bytes": 0}, {"max_bytes": 1.5}, {"compression": "gzip"}):
        with pytest.raises(ConfigError):
            Recorder(["t"], tmp_path / "x.mcap", backend="memory", **kw)
    for topics in ([], [""], ["a/frame_info"], [3]):
        with pytest.raises(ConfigError):
            Recorder(topics, tmp_path / "x.mcap", backend="memory")
    assert not (tmp_path / "x.mcap").exists()


def test_max_bytes_stops_the_recording(tmp_path):
    topic = _name()
    pub = _bus()
    frame = np.random.default_rng(3).integers(0, 256, (100, 100), dtype=np.uint8)    # 10 kB
    limit = 55_000
    rec = Recorder(topic, tmp_path / "m.mcap", backend="memory", name=_BROKER, max_bytes=limit).start()
    deadline = time.monotonic() + 60
    published = 0
    while not rec.wait(0.05) and time.monotonic() < deadline:
        pub.publish(topic, frame, encoding="mono8")
        published += 1
    assert rec.wait(0)
    s = rec.stop()
    assert s["stopped_by"] == "max_bytes"
    per_frame = s["bytes"] / s["frames"]
    assert s["bytes"] >= limit > s["bytes"] - per_frame            # stopped at the frame that reached it
    assert len(list(read_mcap(tmp_path / "m.mcap"))) == s["frames"] < published + 1
    pub.close()


def test_duration_stops_the_recording_and_finishes_the_file(tmp_path):
    topic = _name()
    pub = _bus()
    rec = Recorder([topic], tmp_path / "d.mcap", backend="memory", name=_BROKER, duration=2.0).start()
    pub.publish(topic, b"one")
    wait_for(lambda: rec.stats()["frames"] == 1 or rec.wait(0), "the frame recorded")
    assert rec.wait(timeout=2.0 + 30)
    t = time.monotonic()
    s = rec.stop()
    assert time.monotonic() - t < 30                                # stop() does not hang
    assert s["stopped_by"] == "duration" and s["duration_s"] >= 2.0
    assert [bytes(f.data) for f in read_mcap(tmp_path / "d.mcap")] == [b"one"]
    pub.close()


def test_a_given_bus_stays_open_and_stats_are_live(tmp_path):
    topic = _name()
    bus = _bus()
    rec = Recorder([topic], tmp_path / "b.mcap", bus=bus).start()
    bus.publish(topic, b"x" * 100)
    wait_for(lambda: rec.stats()["topics"][topic]["frames"] == 1, "the frame recorded")
    st = rec.stats()
    assert st["frames"] == 1 and st["bytes"] > 100 and st["topics"][topic]["received"] == 1
    rec.stop()
    bus.publish(topic, b"still open")                               # the recorder did not close it
    bus.close()


def test_the_file_is_finished_when_the_with_block_raises(tmp_path):
    topic = _name()
    pub = _bus()
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder([topic], tmp_path / "e.mcap", backend="memory", name=_BROKER) as rec:
            pub.publish(topic, b"kept")
            wait_for(lambda: rec.stats()["frames"] == 1, "the frame recorded")
            raise RuntimeError("boom")
    assert [bytes(f.data) for f in read_mcap(tmp_path / "e.mcap")] == [b"kept"]
    with open(tmp_path / "e.mcap", "rb") as fh:
        assert any(m.name == RECORDING_METADATA for m in make_reader(fh).iter_metadata())
    pub.close()


def test_stop_from_a_signal_handler_finishes_the_file(tmp_path):
    topic = _name()
    pub = _bus()
    rec = Recorder([topic], tmp_path / "s.mcap", backend="memory", name=_BROKER).start()
    pub.publish(topic, b"before the signal")
    wait_for(lambda: rec.stats()["frames"] == 1, "the frame recorded")
    out = []
    old = signal.signal(signal.SIGUSR1, lambda *a: out.append(rec.stop()))
    try:
        signal.raise_signal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert out and out[0]["frames"] == 1 and out[0]["stopped_by"] == "stop"
    assert [bytes(f.data) for f in read_mcap(tmp_path / "s.mcap")] == [b"before the signal"]
    pub.close()


def test_compressed_chunks_read_back(tmp_path):
    payloads = {k: v for k, v in _payloads().items() if k in ("mono16", "lidar")}
    for comp in ("zstd", "lz4"):
        pytest.importorskip({"zstd": "zstandard", "lz4": "lz4"}[comp])
        d = tmp_path / comp
        d.mkdir()
        path, sent, _ = _record(d, payloads, compression=comp)
        got = {}
        for r in messages(path):
            got.setdefault(r.topic, []).append(r.frame)
        for topic, frames in sent.items():
            for g, want in zip(got[topic], frames):
                _same(g, want)


# ---------------------------------------------------------------- hostile files
def _small_recording(tmp_path):
    payloads = {"mono8": _payloads()["mono8"], "bytes": _payloads()["bytes"]}
    path, _, _ = _record(tmp_path, payloads, n=2)
    return path.read_bytes()


def _read_all(path):
    return list(read_mcap(path))


def test_garbage_and_truncated_files_raise_frame_error(tmp_path):
    good = _small_recording(tmp_path)
    p = tmp_path / "bad.mcap"
    cases = [b"", b"not an mcap file at all", b"\x89MCAP0\r\n", good[:8], good[:len(good) // 2], good[:-1],
             good[:-9], bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))]
    for data in cases:
        p.write_bytes(data)
        with pytest.raises(FrameError):
            _read_all(p)
    with pytest.raises(FileNotFoundError):
        _read_all(tmp_path / "missing.mcap")


@pytest.mark.parametrize("comp,claim", [("zstd", None), ("zstd", 64 << 20), ("lz4", None), ("lz4", 64 << 20)])
def test_a_compression_bomb_is_a_frame_error_not_an_allocation(tmp_path, comp, claim):
    """A chunk of a few KB that inflates to 2 GiB: refused on its declared size, or (when it declares a
    small one) when decompression passes it, without ever holding the whole output."""
    zstandard = pytest.importorskip("zstandard")
    lz4_frame = pytest.importorskip("lz4.frame")
    from mcap.records import Chunk
    from mcap.writer import CompressionType
    huge = 2 << 30
    zeros = bytes(1 << 20)
    if comp == "zstd":
        c = zstandard.ZstdCompressor().compressobj(size=huge)
        blob = b"".join(c.compress(zeros) for _ in range(huge >> 20)) + c.flush()
    else:
        c = lz4_frame.LZ4FrameCompressor()
        blob = c.begin() + b"".join(c.compress(zeros) for _ in range(huge >> 20)) + c.flush()
    assert len(blob) < 16 << 20
    path = tmp_path / "bomb.mcap"
    with open(path, "wb") as fh:
        w = Writer(fh, compression=CompressionType.NONE, use_chunking=False)
        w.start()
        w.finish()
    # a file of one forged chunk: header magic, the Header record, the chunk, then the rest of the file
    data = path.read_bytes()
    from mcap.data_stream import RecordBuilder
    b = RecordBuilder()
    Chunk(compression=comp, data=blob, message_start_time=0, message_end_time=0, uncompressed_crc=0,
          uncompressed_size=huge if claim is None else claim).write(b)
    import struct
    head_end = 8 + 9 + struct.unpack_from("<Q", data, 9)[0]    # magic, then the Header record (opcode, length)
    path.write_bytes(data[:head_end] + b.end() + data[head_end:])
    with pytest.raises(FrameError, match="chunk"):
        _read_all(path)


def test_flipped_bytes_give_frames_or_frame_error_never_another_exception(tmp_path):
    good = _small_recording(tmp_path)
    p = tmp_path / "flip.mcap"
    rng = random.Random(11)
    errors = 0
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        p.write_bytes(bytes(data))
        try:
            _read_all(p)
        except FrameError:
            errors += 1
    assert errors > 0


def _hand_written(path, records):
    """An MCAP file with our channels and the given (topic kind, sequence, data) messages."""
    with open(path, "wb") as fh:
        w = Writer(fh)
        w.start()
        info_sid = w.register_schema(*_fox.info_schema())
        name, enc, data = _fox.schema(_fox.RAW_IMAGE)
        raw_sid = w.register_schema(name, enc, data)
        chans = {"info": w.register_channel("cam" + _fox.INFO_SUFFIX, "json", info_sid),
                 "raw": w.register_channel("cam", "protobuf", raw_sid, {"msight_fast.kind": _fox.RAW_IMAGE}),
                 "odd": w.register_channel("cam", "protobuf", raw_sid, {"msight_fast.kind": "hologram"}),
                 "foreign": w.register_channel("/tf", "json", 0)}
        for ch, seq, payload in records:
            w.add_message(chans[ch], 1, payload, 1, seq)
        w.finish()


def _image_pair():
    f = Frame.from_array(np.arange(12, dtype=np.uint8).reshape(3, 4), sensor_name="cam", encoding="mono8")
    return _fox.info_bytes(_fox.info(f, _fox.RAW_IMAGE)), _fox.to_message(f, _fox.RAW_IMAGE)


def test_unpaired_or_malformed_messages_name_topic_and_sequence(tmp_path):
    info, raw = _image_pair()
    p = tmp_path / "h.mcap"
    _hand_written(p, [("foreign", 1, b"{}"), ("info", 1, info), ("raw", 1, raw)])
    [f] = _read_all(p)                                  # a foreign channel is skipped
    assert f.array.tobytes() == bytes(range(12))
    bad_info = json.loads(info)
    bad_info["shape"] = [5, 5]
    for records, needle in (
            ([("raw", 4, raw)], "without its frame_info"),
            ([("info", 4, info)], "frame_info without its frame"),
            ([("info", 4, info), ("info", 4, info), ("raw", 4, raw)], "second frame_info"),
            ([("info", 4, b"{not json"), ("raw", 4, raw)], "not JSON"),
            ([("info", 4, b"[1, 2]"), ("raw", 4, raw)], "not a JSON object"),
            ([("info", 4, json.dumps(bad_info).encode()), ("raw", 4, raw)], "sequence 4"),
            ([("info", 4, info), ("raw", 4, raw[:-3])], "sequence 4"),
            ([("info", 4, info), ("odd", 4, raw)], "hologram")):
        _hand_written(p, records)
        with pytest.raises(FrameError, match=needle) as e:
            _read_all(p)
        assert "topic 'cam" in str(e.value) and "sequence 4" in str(e.value)
    # frame_info messages piling up without their frames: refused at a bound, not held
    _hand_written(p, [("info", i, info) for i in range(1, 200)])
    with pytest.raises(FrameError, match="without their frames") as e:
        _read_all(p)
    assert "sequence 65" in str(e.value)


def test_a_cloud_with_a_field_foxglove_cannot_read_keeps_it_in_the_payload(tmp_path):
    # Foxglove is told of x, y and z only; the label is still in every point, bit for bit
    topic = _name()
    pub = _bus()
    dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("label", "S4")])
    arr = np.zeros(5, dt)
    arr["label"] = b"car"
    rec = Recorder([topic], tmp_path / "c.mcap", bus=_bus()).start()
    sent = pub.publish(topic, arr, encoding="pointcloud")
    wait_for(lambda: rec.stats()["frames"] == 1, "the frame recorded")
    rec.stop()
    [r] = list(messages(tmp_path / "c.mcap"))
    _same(r.frame, sent)
    assert r.frame.array["label"].tolist() == [b"car"] * 5
    pub.close()


def test_many_threads_publishing_many_topics_keep_each_topics_order(tmp_path):
    topics = [_name() for _ in range(4)]
    pub = _bus()
    rec = Recorder(topics, tmp_path / "t.mcap", backend="memory", name=_BROKER).start()

    def run(t):
        for i in range(50):
            pub.publish(t, np.full((16, 16), i, np.uint8), encoding="mono8", meta={"i": i})
    threads = [threading.Thread(target=run, args=(t,)) for t in topics]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    wait_for(lambda: rec.stats()["frames"] >= 200, "200 frames recorded", timeout=60)
    rec.stop()
    got = {}
    for r in messages(tmp_path / "t.mcap"):
        got.setdefault(r.topic, []).append(r.frame.meta["i"])
    assert got == {t: list(range(50)) for t in topics}
    pub.close()


def test_a_recorder_on_a_node_bus_takes_no_frames_from_the_nodes_group(tmp_path):
    """A node Bus subscribes in the node's group by default: the recorder must not become one more
    member of it (it would take every other frame away from the application)."""
    node = msight_fast.connect_node(msight_fast.NodeConfig(name="det", backend="memory", group_id="g",
                                                           options={"name": _BROKER}))
    topic = f"{_name()}/cam"
    app = node.subscribe(topic)
    assert app.group_id == "g"
    rec = Recorder(topic, tmp_path / "node.mcap", bus=node).start()
    pub = _bus()
    for i in range(10):
        pub.publish(topic, b"x%d" % i, encoding="bytes")
    got = [app.recv(timeout=10) for _ in range(10)]
    assert all(f is not None for f in got)
    wait_for(lambda: rec.stats()["frames"] >= 10, "10 frames recorded")
    rec.stop()
    assert sorted(bytes(f.data) for f in got) == [b"x%d" % i for i in range(10)]
    assert len(list(read_mcap(tmp_path / "node.mcap"))) == 10
    pub.close()
    node.close()
