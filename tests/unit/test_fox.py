"""Frames as Foxglove messages and back (msight_fast._fox): the layout of recordings and the live view."""
from __future__ import annotations

import base64
import json
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

pytest.importorskip("foxglove")
descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")
from google.protobuf import descriptor_pb2, message_factory  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msight_fast import Frame, FrameError  # noqa: E402
from msight_fast import _fox as F  # noqa: E402
from msight_fast import _schema as S  # noqa: E402

LIDAR = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("t", "<f8"),
                  ("ring", "u1"), ("ts64", "<u8"), ("tag", "S4")])


def _lidar(n: int = 100) -> np.ndarray:
    a = np.zeros(n, LIDAR)
    a["x"], a["y"], a["z"] = np.arange(n), -np.arange(n), 0.5
    a["ts64"] = 2**60 + np.arange(n)
    a["tag"] = b"ab"
    return a


def _stamp(f: Frame) -> Frame:
    f.seq, f.publisher_id, f.publish_ts_ns = 41, 2**64 - 3, 1_700_000_000_123_456_789
    return f


def _cases() -> List[Tuple[str, Frame]]:
    rng = np.random.default_rng(1)
    jpeg = b"\xff\xd8\xff\xe0" + bytes(200)
    png = b"\x89PNG\r\n\x1a\n" + bytes(50)
    return [
        (F.RAW_IMAGE, Frame.from_array(rng.integers(0, 255, (48, 64, 3), np.uint8), sensor_name="cam",
                                       meta={"exposure_us": 800, "gain": 1.5, "lens": "wide", "nan": math.nan})),
        (F.RAW_IMAGE, Frame.from_array(rng.integers(0, 255, (48, 64), np.uint8), sensor_name="ir")),
        (F.RAW_IMAGE, Frame.from_array(rng.integers(0, 65535, (8, 4), np.uint16), sensor_name="depth")),
        (F.RAW_IMAGE, Frame.from_array(rng.integers(0, 255, (8, 4, 4), np.uint8), sensor_name="c", encoding="rgba8")),
        (F.RAW_IMAGE, Frame.from_array(rng.random((8, 4), np.float32), sensor_name="range")),
        (F.COMPRESSED_IMAGE, Frame.from_bytes(jpeg, sensor_name="cam", encoding="jpeg", device_name="pole3")),
        (F.COMPRESSED_IMAGE, Frame.from_bytes(png, sensor_name="cam", encoding="bytes")),
        (F.POINT_CLOUD, Frame.from_array(_lidar(), sensor_name="lidar", capture_ts_ns=5)),
        (F.FRAME, Frame.from_array(np.arange(12.0).reshape(3, 4), sensor_name="m")),
        (F.FRAME, Frame.from_array(rng.integers(0, 255, (4, 4, 3), np.int16), sensor_name="odd")),
        (F.FRAME, Frame.from_array(np.zeros(3, [("a", "<f4"), ("b", "<f4")]), sensor_name="no_xyz")),
        (F.FRAME, Frame.from_bytes(b"opaque", sensor_name="s", encoding="bytes")),
    ]


def _same(a: Frame, b: Frame) -> None:
    assert bytes(a.data) == bytes(b.data)
    for k in ("seq", "publisher_id", "frame_id", "capture_ts_ns", "creation_ts_ns", "publish_ts_ns",
              "sensor_name", "device_name", "encoding"):
        assert getattr(a, k) == getattr(b, k), k
    assert a.meta.keys() == b.meta.keys()
    for k, v in a.meta.items():
        w = b.meta[k]
        assert type(v) is type(w) and (v == w or (isinstance(v, float) and math.isnan(v) and math.isnan(w)))
    if a.array is None:
        assert b.array is None
    else:
        assert b.array is not None and a.array.dtype == b.array.dtype and a.array.shape == b.array.shape


def _roundtrip(kind: str, f: Frame) -> Frame:
    msg = F.to_message(f, kind)
    info = None if kind == F.FRAME else F.parse_info(F.info_bytes(F.info(f, kind)))
    return F.from_message(kind, msg, info)


@pytest.mark.parametrize("kind,frame", _cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_classify_and_bit_exact_round_trip(kind: str, frame: Frame) -> None:
    _stamp(frame)
    assert F.classify(frame) == kind
    back = _roundtrip(kind, frame)
    _same(frame, back)


def test_the_payload_is_a_view_of_the_message_not_a_copy() -> None:
    f = _stamp(Frame.from_array(np.arange(4096, dtype=np.uint8).reshape(64, 64), sensor_name="cam"))
    msg = F.to_message(f, F.RAW_IMAGE)
    back = F.from_message(F.RAW_IMAGE, msg, F.info(f, F.RAW_IMAGE))
    assert back.array is not None and not back.array.flags.writeable
    assert np.shares_memory(back.array, np.frombuffer(msg, np.uint8))


def _message_class(kind: str) -> Any:
    name, encoding, data = F.schema(kind)
    assert encoding == "protobuf"
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_foxglove_messages_decode_with_their_own_schemas() -> None:
    cam = _stamp(Frame.from_array(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3) % 251, sensor_name="cam"))
    m = _message_class(F.RAW_IMAGE).FromString(F.to_message(cam, F.RAW_IMAGE))
    assert (m.width, m.height, m.encoding, m.step, m.frame_id) == (64, 48, "bgr8", 64 * 3, "cam")
    assert m.data == bytes(cam.data)
    assert m.timestamp.seconds * 10**9 + m.timestamp.nanos == cam.capture_ts_ns

    depth = Frame.from_array(np.arange(12, dtype=np.uint16).reshape(3, 4), sensor_name="d")
    m = _message_class(F.RAW_IMAGE).FromString(F.to_message(depth, F.RAW_IMAGE))
    assert (m.width, m.height, m.encoding, m.step) == (4, 3, "mono16", 8)

    jpg = Frame.from_bytes(b"\xff\xd8\xff" + bytes(10), sensor_name="cam", encoding="jpeg")
    m = _message_class(F.COMPRESSED_IMAGE).FromString(F.to_message(jpg, F.COMPRESSED_IMAGE))
    assert (m.format, m.data) == ("jpeg", bytes(jpg.data))

    cloud = Frame.from_array(_lidar(), sensor_name="lidar")
    m = _message_class(F.POINT_CLOUD).FromString(F.to_message(cloud, F.POINT_CLOUD))
    assert m.point_stride == LIDAR.itemsize and m.data == bytes(cloud.data)
    got = {(fl.name, fl.offset, fl.type) for fl in m.fields}
    # u8 and S4 have no Foxglove numeric type: they stay in the bytes, out of the field list
    assert got == {("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 7), ("t", 16, 8), ("ring", 24, 1)}
    assert m.pose.orientation.w == 1.0


def test_frame_info_is_json_that_viewers_can_parse() -> None:
    f = _stamp(Frame.from_bytes(b"\xff\xd8\xff", sensor_name="cam", encoding="jpeg",
                                meta={"inf": math.inf, "n": -1}))
    raw = F.info_bytes(F.info(f, F.COMPRESSED_IMAGE, gap=3))
    d = json.loads(raw)                  # strict JSON: no NaN or Infinity tokens
    assert d["gap"] == 3 and d["meta"] == {"inf": {"float": "inf"}, "n": -1}
    assert d["publisher_id"] == 2**64 - 3 and d["dtype"] is None
    name, enc, schema = F.info_schema()
    assert name == F.INFO_SCHEMA_NAME and enc == "jsonschema"
    assert set(json.loads(schema)["properties"]) >= set(d)


# ---------------------------------------------------------------- hostile input: FrameError, nothing else

def _valid_pair() -> Tuple[bytes, Dict[str, Any]]:
    # fixed ids and times: Hypothesis needs the same bytes on every run to replay its draws
    f = _stamp(Frame.from_array(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), sensor_name="cam", meta={"k": 1},
                                frame_id=7, capture_ts_ns=1_700_000_000_000_000_000))
    f.creation_ts_ns = 1_700_000_000_000_000_001
    return F.to_message(f, F.RAW_IMAGE), F.info(f, F.RAW_IMAGE)


def _dtype_b64(dt: Any) -> str:
    return base64.b64encode(S.dtype_to_wire(np.dtype(dt))).decode()


@pytest.mark.parametrize("change", [
    {"seq": -1}, {"seq": 2**64}, {"seq": "1"}, {"seq": True}, {"publisher_id": 1.5},
    {"capture_ts_ns": 2**63}, {"sensor_name": 5}, {"sensor_name": "x" * 300}, {"encoding": "e" * 65},
    {"sensor_name": "\ud800"}, {"meta": []}, {"meta": {"k": [1]}}, {"meta": {"k": None}}, {"meta": {"k": True}},
    {"meta": {"k" * 100: 1}}, {"dtype": "not base64!"}, {"dtype": 5}, {"dtype": base64.b64encode(b"\xff\xff").decode()},
    {"shape": [4, 4, 4]}, {"shape": [2**62, 2**62]}, {"shape": "4,4,3"}, {"shape": [4, -4, -3]},
    {"shape": [1] * 40}, {"dtype": _dtype_b64("<f8")},
])
def test_a_forged_frame_info_is_a_frame_error(change: Dict[str, Any]) -> None:
    msg, info = _valid_pair()
    info.update(change)
    with pytest.raises(FrameError):
        F.from_message(F.RAW_IMAGE, msg, info)


@pytest.mark.parametrize("raw", [b"", b"[1]", b"{", b"\xff\xfe", b"1" * ((1 << 20) + 1), b'"s"'])
def test_parse_info_refuses_what_is_not_a_frame_info(raw: bytes) -> None:
    with pytest.raises(FrameError):
        F.parse_info(raw)


@pytest.mark.parametrize("msg", [
    b"\x32\x05ab",                        # data runs past the end
    b"\x32",                              # truncated length
    b"\x32" + b"\xff" * 11,               # varint too long
    b"\x33\x00",                          # wire type 3 (groups): not written by the SDK
    b"\x15\x01",                          # a fixed32 cut short
    b"\x09" + b"\x00" * 3,                # a fixed64 cut short
])
def test_a_malformed_protobuf_is_a_frame_error(msg: bytes) -> None:
    _, info = _valid_pair()
    with pytest.raises(FrameError):
        F.from_message(F.RAW_IMAGE, msg, info)


def test_a_message_without_its_frame_info_is_a_frame_error() -> None:
    msg, _ = _valid_pair()
    with pytest.raises(FrameError):
        F.from_message(F.RAW_IMAGE, msg, None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_messages_and_infos_give_a_frame_or_a_frame_error(data: st.DataObject) -> None:
    msg, info = _valid_pair()
    raw_info = bytearray(F.info_bytes(info))
    buf = bytearray(msg)
    for target in (buf, raw_info):
        for _ in range(data.draw(st.integers(0, 4))):
            if not target:
                break
            i = data.draw(st.integers(0, len(target) - 1))
            op = data.draw(st.sampled_from(["flip", "cut", "dup"]))
            if op == "flip":
                target[i] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "cut":
                del target[i:]
            else:
                target[i:i] = target[i:i + 8]
    got: Optional[Frame] = None
    try:
        got = F.from_message(F.RAW_IMAGE, bytes(buf), F.parse_info(bytes(raw_info)))
    except FrameError:
        return
    assert got is not None and got.nbytes == (got.array.nbytes if got.array is not None else got.nbytes)
