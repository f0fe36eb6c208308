"""Pins the public types that contain ``Any`` by design: ndarrays and the stats dicts.

Checked by mypy without ``disallow_any_expr`` (see check_public_api.py); ``assert_type`` with these
precise types still fails if a value regresses to a bare ``Any``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from typing_extensions import assert_type

import msight_fast as mf
from msight_fast import Bus, Frame, Subscription
from msight_fast.stats import BusStats, SubscriptionStats

Image = np.ndarray[tuple[int, int, int], np.dtype[np.uint8]]


def check_arrays(bus: Bus, img: Image, f: Frame) -> None:
    assert_type(f.array, Optional[np.ndarray])
    assert_type(Frame.from_array(img, sensor_name="cam"), Frame)
    assert_type(Frame.from_array(img, sensor_name="cam", encoding="bgr8", meta={"exposure_us": 800}), Frame)
    assert_type(bus.publish("cam", img), Frame)
    assert_type(bus.publish("cam", img, encoding="rgb8", frame_id=7), Frame)
    assert_type(mf.decode(img), Frame)
    assert_type(mf.crc32c(img), int)
    assert_type(mf.fragment(img, 1 << 20), list[bytes | Image])
    assert_type(mf.Reassembler().feed(img), Optional[Frame])
    Frame.from_array(b"raw", sensor_name="cam")  # type: ignore[arg-type]


def check_lazy_names() -> None:
    # bound by msight_fast.__getattr__ at run time (the transport layer loads on first use)
    assert_type(mf.Bus, type[Bus])
    assert_type(mf.Subscription, type[Subscription])


def check_stats(bus: Bus, sub: Subscription) -> None:
    assert_type(bus.stats(), BusStats)
    assert_type(sub.stats(), SubscriptionStats)
    assert_type(sub.stats()["gaps"], Optional[int])          # None for a group member
    assert_type(sub.stats()["received"], int)
    assert_type(sub.stats()["lag"], Optional[int])
    assert_type(bus.stats()["lost"], int)
    assert_type(mf.Reassembler().stats(), Dict[str, int])
