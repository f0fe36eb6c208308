"""Frames as Foxglove messages, and back: the layout shared by recordings (MCAP) and the live view.

A frame that Foxglove can show travels as two messages on its topic, paired by the MCAP
``sequence`` they share:

- on ``<topic>``, a Foxglove message (protobuf): ``foxglove.RawImage`` for raw images,
  ``foxglove.CompressedImage`` for JPEG/PNG/WebP bytes, ``foxglove.PointCloud`` for structured
  arrays with numeric ``x``, ``y`` and ``z`` fields. Its ``data`` field holds the frame's payload
  bytes, untouched: the only copy of them in the file.
- on ``<topic>/frame_info``, a JSON ``msight_fast.FrameInfo`` with everything else the frame carries
  (seq, publisher, every timestamp, names, the meta map, dtype and shape), so a replay rebuilds the
  frame bit for bit.

Any other frame goes whole on ``<topic>``, in the wire format (message encoding ``msight_fast``,
see docs/wire-format.md), with no ``frame_info``.

Hand-written: the Foxglove SDK encodes each message with its ``data`` empty, and the payload is
appended as the ``data`` field (protobuf fields may come in any order). That saves the SDK's copy of
a 6 MB payload into its own buffer; reading walks the protobuf fields to find ``data`` and returns
a view of it.
"""
from __future__ import annotations

import base64
import json
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _schema as S
from .codec import Frame, decode, encode
from .errors import FrameError

__all__ = ["RAW_IMAGE", "COMPRESSED_IMAGE", "POINT_CLOUD", "FRAME", "KINDS", "INFO_SUFFIX", "INFO_SCHEMA_NAME",
           "INFO_SCHEMA", "FRAME_ENCODING", "classify", "schema", "message_encoding", "to_message", "info",
           "info_bytes", "info_schema", "parse_info", "from_message", "payload_of"]

RAW_IMAGE = "raw_image"
COMPRESSED_IMAGE = "compressed_image"
POINT_CLOUD = "point_cloud"
FRAME = "frame"                     # not a Foxglove type: the whole frame, wire format
KINDS = (RAW_IMAGE, COMPRESSED_IMAGE, POINT_CLOUD, FRAME)

INFO_SUFFIX = "/frame_info"
INFO_SCHEMA_NAME = "msight_fast.FrameInfo"
FRAME_ENCODING = "msight_fast"      # message encoding of whole frames
MAX_INFO_BYTES = 1 << 20            # a frame_info larger than this is not one this library wrote

# Foxglove's RawImage encodings (https://docs.foxglove.dev/docs/visualization/message-schemas/raw-image)
# that an array can carry as is: (numpy dtype, channels)
RAW_ENCODINGS: Dict[str, Tuple[str, int]] = {
    "mono8": ("u1", 1), "8UC1": ("u1", 1), "rgb8": ("u1", 3), "bgr8": ("u1", 3), "8UC3": ("u1", 3),
    "rgba8": ("u1", 4), "bgra8": ("u1", 4), "mono16": ("<u2", 1), "16UC1": ("<u2", 1),
    "32FC1": ("<f4", 1),
}
COMPRESSED_FORMATS = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png", "webp": "webp", "avif": "avif"}
_MAGIC_FORMATS = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"))

INFO_SCHEMA: Dict[str, Any] = {
    "title": INFO_SCHEMA_NAME,
    "description": "Everything an msight_fast frame carries besides its payload (which is the data field "
                   "of the message with the same sequence on the parent topic).",
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": list(KINDS)},
        "seq": {"type": "integer"}, "publisher_id": {"type": "integer"}, "frame_id": {"type": "integer"},
        "capture_ts_ns": {"type": "integer"}, "creation_ts_ns": {"type": "integer"},
        "publish_ts_ns": {"type": "integer"}, "sensor_name": {"type": "string"},
        "device_name": {"type": "string"}, "encoding": {"type": "string"},
        "meta": {"type": "object"}, "dtype": {"type": ["string", "null"], "description": "base64 wire dtype"},
        "shape": {"type": ["array", "null"], "items": {"type": "integer"}}, "nbytes": {"type": "integer"},
        "gap": {"type": "integer", "description": "frames of this publisher missed just before this one"},
    },
}


_NUMERIC_KEYS = frozenset(("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<f4", "<f8"))


def _numeric_types() -> Dict[str, Any]:
    from foxglove.messages import PackedElementFieldNumericType as T
    return {"u1": T.Uint8, "i1": T.Int8, "<u2": T.Uint16, "<i2": T.Int16, "<u4": T.Uint32, "<i4": T.Int32,
            "<f4": T.Float32, "<f8": T.Float64}


def _dtype_key(dt: np.dtype) -> str:
    """'u1', '<f4'...: numpy's str without the byte order for single bytes."""
    s: str = dt.str
    return s[1:] if dt.itemsize == 1 else s


def _cloud_fields(dt: np.dtype) -> Optional[List[Tuple[str, int, str]]]:
    """(name, offset, dtype key) of each field Foxglove can read, if x, y and z are among them."""
    fields = dt.fields
    if dt.names is None or fields is None:
        return None
    out = []
    for name in dt.names:
        fdt, off = fields[name][0], fields[name][1]
        key = _dtype_key(fdt) if fdt.shape == () and fdt.names is None else ""
        if key in _NUMERIC_KEYS:
            out.append((name, off, key))
    names = {n for n, _, _ in out}
    return out if {"x", "y", "z"} <= names else None


def classify(frame: Frame) -> str:
    """Which message a frame becomes: RAW_IMAGE, COMPRESSED_IMAGE, POINT_CLOUD or FRAME."""
    arr = frame.array
    if arr is None:
        enc = frame.encoding.lower()
        if enc in COMPRESSED_FORMATS:
            return COMPRESSED_IMAGE
        head = bytes(frame.data[:8])
        if any(head.startswith(m) for m, _ in _MAGIC_FORMATS) and enc in ("", "bytes"):
            return COMPRESSED_IMAGE
        return FRAME
    if arr.dtype.names is not None:
        return POINT_CLOUD if arr.size and _cloud_fields(arr.dtype) is not None else FRAME
    return RAW_IMAGE if _raw_encoding(frame) is not None else FRAME


def _raw_encoding(frame: Frame) -> Optional[str]:
    """The Foxglove encoding of an image array: the frame's own if Foxglove knows it and it fits
    the array, else one guessed from dtype and shape; None if it is not an image."""
    arr = frame.array
    if arr is None or arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    key = _dtype_key(arr.dtype)
    want = RAW_ENCODINGS.get(frame.encoding)
    if want is not None and want == (key, channels):
        return frame.encoding
    guess = {("u1", 1): "mono8", ("u1", 3): "bgr8", ("u1", 4): "bgra8", ("<u2", 1): "mono16",
             ("<f4", 1): "32FC1"}
    return guess.get((key, channels))


def schema(kind: str) -> Tuple[str, str, bytes]:
    """(name, encoding, data) of the MCAP schema of ``kind``'s messages; ("", "", b"") for FRAME."""
    from foxglove import messages as m
    cls: Any = {RAW_IMAGE: m.RawImage, COMPRESSED_IMAGE: m.CompressedImage, POINT_CLOUD: m.PointCloud}.get(kind)
    if cls is None:
        return "", "", b""
    s = cls.get_schema()
    return s.name, s.encoding, bytes(s.data)


def info_schema() -> Tuple[str, str, bytes]:
    return INFO_SCHEMA_NAME, "jsonschema", json.dumps(INFO_SCHEMA).encode()


def message_encoding(kind: str) -> str:
    return FRAME_ENCODING if kind == FRAME else "protobuf"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# protobuf tag of each message's ``data`` field (field number << 3 | length-delimited)
_DATA_FIELD = {RAW_IMAGE: 6, COMPRESSED_IMAGE: 2, POINT_CLOUD: 6}


def _timestamp(ns: int) -> Any:
    from foxglove.messages import Timestamp
    sec, nsec = divmod(max(0, ns), 1_000_000_000)
    return Timestamp(sec=min(sec, 0xFFFFFFFF), nsec=nsec)


def to_message(frame: Frame, kind: str, frame_id: str = "") -> bytes:
    """The message that carries ``frame`` as ``kind`` (the payload is copied once, into it).

    ``frame_id`` is Foxglove's coordinate frame (default: the frame's sensor name)."""
    if kind == FRAME:
        return encode(frame)
    from foxglove import messages as m
    fid = frame_id or frame.sensor_name
    ts = _timestamp(frame.capture_ts_ns)
    if kind == RAW_IMAGE:
        arr = frame.array
        enc = _raw_encoding(frame)
        if arr is None or enc is None:
            raise FrameError("not an image array")
        h, w = arr.shape[0], arr.shape[1]
        head = m.RawImage(timestamp=ts, frame_id=fid, width=w, height=h, encoding=enc,
                          step=w * (1 if arr.ndim == 2 else arr.shape[2]) * arr.dtype.itemsize).encode()
    elif kind == COMPRESSED_IMAGE:
        enc = frame.encoding.lower()
        fmt = COMPRESSED_FORMATS.get(enc)
        if fmt is None:
            head8 = bytes(frame.data[:8])
            fmt = next((f for mg, f in _MAGIC_FORMATS if head8.startswith(mg)), enc or "jpeg")
        head = m.CompressedImage(timestamp=ts, frame_id=fid, format=fmt).encode()
    elif kind == POINT_CLOUD:
        arr = frame.array
        fields = None if arr is None else _cloud_fields(arr.dtype)
        if arr is None or fields is None:
            raise FrameError("not a point cloud")
        types = _numeric_types()
        pose = m.Pose(position=m.Vector3(x=0.0, y=0.0, z=0.0), orientation=m.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0))
        head = m.PointCloud(timestamp=ts, frame_id=fid, pose=pose, point_stride=arr.dtype.itemsize,
                            fields=[m.PackedElementField(name=n, offset=o, type=types[k]) for n, o, k in fields]
                            ).encode()
    else:
        raise ValueError(f"unknown kind {kind!r}")
    payload = frame.data
    return b"".join((head, _varint(_DATA_FIELD[kind] << 3 | 2), _varint(payload.nbytes), payload))


def info(frame: Frame, kind: str, gap: int = 0) -> Dict[str, Any]:
    """The frame_info of ``frame`` (JSON-able)."""
    arr = frame.array
    return {"kind": kind, "seq": frame.seq, "publisher_id": frame.publisher_id, "frame_id": frame.frame_id,
            "capture_ts_ns": frame.capture_ts_ns, "creation_ts_ns": frame.creation_ts_ns,
            "publish_ts_ns": frame.publish_ts_ns, "sensor_name": frame.sensor_name,
            "device_name": frame.device_name, "encoding": frame.encoding, "meta": dict(frame.meta),
            "dtype": None if arr is None else base64.b64encode(S.dtype_to_wire(arr.dtype)).decode(),
            "shape": None if arr is None else list(arr.shape), "nbytes": frame.nbytes, "gap": gap}


def _json_value(v: Any) -> Any:
    # JSON has no NaN or infinity: such meta floats go as tagged strings, so viewers can parse the line
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    return v


def info_bytes(frame_info: Dict[str, Any]) -> bytes:
    d = dict(frame_info)
    d["meta"] = {k: _json_value(v) for k, v in frame_info["meta"].items()}
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()


def _walk(msg: memoryview) -> Dict[int, memoryview]:
    """The length-delimited fields of a protobuf message (last one wins), by field number."""
    out: Dict[int, memoryview] = {}
    pos, end = 0, len(msg)
    while pos < end:
        tag, pos = _read_varint(msg, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(msg, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(msg, pos)
            if n > end - pos:
                raise FrameError(f"protobuf field {field} runs {n - (end - pos)} bytes past the message")
            out[field] = msg[pos:pos + n]
            pos += n
        else:
            raise FrameError(f"protobuf wire type {wire} at byte {pos} is not supported")
        if pos > end:
            raise FrameError("protobuf message is truncated")
    return out


def _read_varint(msg: memoryview, pos: int) -> Tuple[int, int]:
    n, shift = 0, 0
    while True:
        if pos >= len(msg) or shift > 63:
            raise FrameError("protobuf varint is truncated or too long")
        b = msg[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def payload_of(kind: str, data: Any) -> memoryview:
    """The ``data`` field of a Foxglove message, as a view of ``data``."""
    mv = memoryview(data).cast("B")
    got = _walk(mv).get(_DATA_FIELD[kind])
    return got if got is not None else mv[:0]


def _int(d: Dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key, 0)
    if type(v) is not int or not lo <= v <= hi:
        raise FrameError(f"frame_info {key}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def _str(d: Dict[str, Any], key: str, limit: int) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise FrameError(f"frame_info {key} is not a string")
    S.encode_str(v, key, limit)
    return v


def parse_info(raw: Any) -> Dict[str, Any]:
    """A frame_info message, checked for shape (the values are checked by ``from_message``)."""
    if len(raw) > MAX_INFO_BYTES:
        raise FrameError(f"frame_info of {len(raw)} bytes (limit {MAX_INFO_BYTES})")
    try:
        d = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError(f"frame_info is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise FrameError("frame_info is not a JSON object")
    return d


def from_message(kind: str, data: Any, frame_info: Optional[Dict[str, Any]]) -> Frame:
    """The frame a message and its frame_info carry; the array or bytes view ``data`` (no copy).

    Raises FrameError for anything this library would not have written."""
    if kind == FRAME:
        return decode(data)
    if frame_info is None:
        raise FrameError(f"a {kind} message without its frame_info")
    payload = payload_of(kind, data)
    d = frame_info
    i64, u64 = (-(1 << 63), (1 << 63) - 1), (0, (1 << 64) - 1)
    meta_in = d.get("meta", {})
    if not isinstance(meta_in, dict):
        raise FrameError("frame_info meta is not an object")
    meta: Dict[str, Any] = {}
    for k, v in meta_in.items():
        if isinstance(v, dict) and set(v) == {"float"} and v["float"] in ("nan", "inf", "-inf"):
            v = float(v["float"])
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise FrameError(f"frame_info meta {k!r} is not a str, int or float")
        meta[k] = v
    common: Dict[str, Any] = dict(sensor_name=_str(d, "sensor_name", S.MAX_NAME_BYTES),
                                  device_name=_str(d, "device_name", S.MAX_NAME_BYTES),
                                  frame_id=_int(d, "frame_id", *u64),
                                  capture_ts_ns=_int(d, "capture_ts_ns", *i64), meta=meta)
    encoding = _str(d, "encoding", S.MAX_ENCODING_BYTES)
    if d.get("dtype") is None:
        f = Frame.from_bytes(payload, encoding=encoding, **common)
    else:
        try:
            wire = base64.b64decode(d["dtype"], validate=True)
        except (ValueError, TypeError):
            raise FrameError("frame_info dtype is not base64") from None
        dt = S.dtype_from_wire(wire)
        shape = d.get("shape")
        if not isinstance(shape, list) or len(shape) > S.MAX_NDIM or \
                not all(type(n) is int and n >= 0 for n in shape):
            raise FrameError(f"frame_info shape {shape!r} is not a list of at most {S.MAX_NDIM} sizes")
        S.check_shape(tuple(shape), dt.itemsize, payload.nbytes, 0)
        arr = np.frombuffer(payload, dtype=dt) if payload.nbytes else np.empty(0, dt)
        f = Frame.from_array(arr.reshape(shape), encoding=encoding, **common)
    f.seq = _int(d, "seq", *u64)
    f.publisher_id = _int(d, "publisher_id", *u64)
    f.creation_ts_ns = _int(d, "creation_ts_ns", *i64)
    f.publish_ts_ns = _int(d, "publish_ts_ns", *i64)
    return f
