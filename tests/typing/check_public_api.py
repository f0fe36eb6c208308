"""Pins the static types of msight_fast's public API: checked by mypy, never run.

``mypy`` (configured in pyproject.toml; ci/test.sh and tests/unit/test_typing.py run it) checks this
module with ``disallow_any_expr``: a public name whose type regresses to ``Any`` fails here, as does
any ``assert_type`` that no longer holds. Each ``# type: ignore[code]`` marks a call the API must
reject; with ``warn_unused_ignores`` (part of ``--strict``) an API that starts accepting it fails too.
Values whose precise type contains ``Any`` by design (ndarrays, stats dicts) are pinned in
check_public_api_dicts_arrays.py.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Literal, Optional, Tuple, Union

from typing_extensions import assert_type

import msight_fast as mf
from msight_fast import Bus, Frame, NodeConfig, Reassembler, Subscription, codec
from msight_fast.backends.base import Capabilities


def check_connect() -> None:
    assert_type(mf.connect(), Bus)
    assert_type(mf.connect("memory", publish_timeout_s=1.0), Bus)
    assert_type(mf.connect_node(NodeConfig(name="node", group_id="g", backend="memory")), Bus)
    mf.connect_node("memory")  # type: ignore[arg-type]


def check_bus(bus: Bus, frame: Frame, payload: bytes) -> None:
    assert_type(bus.publish("cam", frame), Frame)
    assert_type(bus.publish("cam", payload, sensor_name="front", encoding="jpeg"), Frame)
    assert_type(bus.subscribe("cam"), Subscription)
    assert_type(bus.subscribe("cam", group_id="g", from_beginning=True), Subscription)
    assert_type(bus.flush(1.0), None)
    assert_type(bus.backend, str)
    assert_type(bus.publisher_id, int)
    assert_type(bus.published, int)
    assert_type(bus.capabilities, Capabilities)
    assert_type(bus.capabilities.groups, Optional[Literal["queue", "consumer"]])
    with mf.connect("memory") as b:
        assert_type(b, Bus)
    bus.publish(frame)  # type: ignore[call-overload]
    bus.publish("cam", frame, sensor_name="x")  # type: ignore[call-overload]
    bus.publish("cam", payload, sensor_nam="x")  # type: ignore[call-overload]
    bus.publish("cam", "text")  # type: ignore[call-overload]
    bus.subscribe("cam", "g")  # type: ignore[call-arg]


def check_subscription(sub: Subscription) -> None:
    assert_type(sub.recv(), Optional[Frame])
    assert_type(sub.recv(timeout=0.5), Optional[Frame])
    assert_type(iter(sub), Iterator[Frame])
    for f in sub:
        assert_type(f, Frame)
    with sub as s:
        assert_type(s, Subscription)
    assert_type(sub.topic, str)
    assert_type(sub.group_id, Optional[str])
    assert_type(sub.received, int)
    assert_type(sub.ack(), None)
    assert_type(sub.close(), None)
    sub.recv("1")  # type: ignore[arg-type]


def check_frame(f: Frame, payload: bytes) -> None:
    assert_type(Frame.from_bytes(payload, sensor_name="s", encoding="jpeg"), Frame)
    assert_type(Frame.from_bytes(bytearray(payload), sensor_name="s", encoding="jpeg", device_name="d",
                                 frame_id=1, capture_ts_ns=2, meta={"exposure": 0.5, "gain": 2, "lens": "w"}),
                Frame)
    assert_type(f.data, memoryview)
    assert_type(f.nbytes, int)
    assert_type(f.encoding, str)
    assert_type(f.sensor_name, str)
    assert_type(f.device_name, str)
    assert_type(f.frame_id, int)
    assert_type(f.seq, int)
    assert_type(f.publisher_id, int)
    assert_type(f.capture_ts_ns, int)
    assert_type(f.creation_ts_ns, int)
    assert_type(f.publish_ts_ns, int)
    assert_type(f.meta, Dict[str, Union[str, int, float]])
    f.frame_id = 3
    f.sensor_name = "rear"
    f.frame_id = "3"  # type: ignore[assignment]
    f.data = memoryview(b"")  # type: ignore[misc]
    Frame.from_bytes(payload, sensor_name="s")  # type: ignore[call-arg]
    Frame.from_bytes(payload, sensor_name="s", encoding="raw", meta={"k": b"v"})  # type: ignore[dict-item]


def check_codec(f: Frame, payload: bytes, mv: memoryview) -> None:
    assert_type(mf.encode(f), bytes)
    assert_type(mf.encode(f, checksum=True), bytes)
    assert_type(mf.encode_parts(f), List[Union[bytes, memoryview]])
    assert_type(mf.decode(payload), Frame)
    assert_type(mf.decode(bytearray(payload)), Frame)
    assert_type(mf.decode(mv), Frame)
    assert_type(mf.crc32c(payload), int)
    assert_type(mf.crc32c(payload, 7), int)
    assert_type(mf.fragment(payload, 1 << 20), List[bytes])
    assert_type(mf.fragment(mf.encode_parts(f), 1 << 20), List[bytes])
    assert_type(mf.fragment(bytearray(payload), 1 << 20), List[Union[bytes, bytearray]])
    assert_type(codec.decode(payload), Frame)
    assert_type(codec.Frame.from_bytes(payload, sensor_name="s", encoding="raw"), Frame)
    mf.decode("text")  # type: ignore[arg-type]
    mf.encode(payload)  # type: ignore[arg-type]
    mf.fragment(payload)  # type: ignore[call-overload]


def check_reassembler(payload: bytes, mv: memoryview) -> None:
    r = Reassembler(max_frame_bytes=1 << 20, max_pending=4, timeout_s=1.0, max_pending_per_publisher=2)
    assert_type(r.feed(payload), Optional[Frame])
    assert_type(r.feed(mv), Optional[Frame])
    assert_type(r.pending, int)
    assert_type(r.memory_bound, int)
    assert_type(r.expire(), int)
    assert_type(r.pending_keys(), List[Tuple[int, int]])
    r.feed(1)  # type: ignore[arg-type]


def check_module_constants(caps: Capabilities) -> None:
    assert_type(mf.HAS_EXTENSIONS, bool)
    assert_type(mf.EXTENSION_ERROR, Optional[BaseException])
    assert_type(mf.__version__, str)
    assert_type(caps.persistence, bool)
    assert_type(caps.max_message, Optional[int])


def check_errors(e: mf.PublishError) -> None:
    assert_type(e.failures, List[Tuple[str, str]])
    assert issubclass(mf.FrameError, mf.MsightFastError)
    assert issubclass(mf.BackendUnavailable, ConnectionError)
