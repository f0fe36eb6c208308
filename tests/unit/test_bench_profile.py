"""The sustained benchmark's profiles (msight_fast/bench.py) on the in-process memory backend:
the intersection's thread-per-sensor pacing counts every slot, skips instead of bursting after a
stall, and the rows and totals add up. No timing is asserted."""
from __future__ import annotations

import threading
import time
from typing import Any, List

from msight_fast import bench, connect

SMALL = (("cam/a", "1k", 20.0), ("cam/b", "jpeg", 10.0), ("lidar", "lidar", 5.0))


def test_the_intersection_profile_is_four_cameras_a_lidar_and_a_jpeg_stream() -> None:
    load = bench.PROFILES["intersection"]
    assert sorted(hz for _, p, hz in load if p == "1080p") == [15.0] * 4
    assert [(p, hz) for _, p, hz in load if p != "1080p"] == [("lidar262k", 10.0), ("jpeg", 30.0)]
    assert len({t for t, _, _ in load}) == len(load)
    assert bench.PROFILES["roadside"] is bench.SENSOR_LOAD
    args = bench.profile_broker_args("intersection", "redis")
    assert args[:2] == ["--client-output-buffer-limit", "pubsub"]
    assert all(bench.profile_broker_args(p, b) == [] for p, b in
               (("roadside", "redis"), ("intersection", "nats"), ("intersection", "kafka")))


def test_a_sensor_behind_sends_its_newest_frame_and_skips_the_rest() -> None:
    t0, period = 100.0, 0.1
    assert bench._catch_up(3, t0, period, t0 + 0.30) == 3          # at its deadline
    assert bench._catch_up(3, t0, period, t0 + 0.39) == 3          # late, but still in its slot
    assert bench._catch_up(3, t0, period, t0 + 0.41) == 4          # its slot is over: the next one
    assert bench._catch_up(3, t0, period, t0 + 1.05) == 10         # seven slots over: one frame, not seven


def test_run_profile_counts_every_slot_and_every_frame() -> None:
    r = bench.run_profile("memory", 1.5, "intersection", load=SMALL)
    assert r["publisher_failed"] is None and r["flush_error"] is None
    assert [t["topic"] for t in r["topics"]] == [t for t, _, _ in SMALL]
    for t in r["topics"]:
        assert t["expected"] == round(t["hz"] * 1.5)
        assert t["sent"] + t["skipped"] + t["errors"] == t["expected"], t
        assert 0 <= t["late"] <= t["sent"]
        assert t["errors"] == 0 and t["failed"] is None
        assert t["received"] == t["sent"] and t["lost"] == 0 and t["gaps"] == 0, t
        assert t["delivered"] == t["received"] / t["expected"]
    tot = r["total"]
    for key in ("expected", "sent", "late", "skipped", "received", "lost"):
        assert tot[key] == sum(t[key] for t in r["topics"])
    assert tot["MBps"] > 0 and tot["offered_MBps"] >= tot["MBps"] * 0.999
    assert set(r["payloads"]) == {"1k", "jpeg", "lidar"}
    assert "sample" in r["payloads"]["jpeg"] or "MSIGHT_DATA_DIR" in r["payloads"]["jpeg"]


def test_the_roadside_profile_keeps_its_one_thread_publisher() -> None:
    rows = bench.run_profile("memory", 1.0, load=SMALL)["topics"]
    for t in rows:
        assert t["late"] is None and t["skipped"] is None            # not counted by that publisher
        assert t["sent"] > 0 and t["received"] == t["sent"] and t["gaps"] == 0, t


class _StallingBus:
    """A memory Bus whose first publish takes ``stall`` seconds, as one held up by a slow broker would."""

    def __init__(self, bus: Any, stall: float) -> None:
        self._bus, self._stall, self.config = bus, stall, bus.config
        self.times: List[float] = []
        self._first = True

    def publish(self, topic: str, obj: Any, **kw: Any) -> Any:
        if self._first:
            self._first = False
            threading.Event().wait(self._stall)      # the slow publish being modelled, not a synchronisation
        self.times.append(time.monotonic())
        return self._bus.publish(topic, obj, **kw)


def test_after_a_stall_the_missed_frames_are_skipped_not_burst() -> None:
    bus = connect("memory", name=f"stall-{time.time_ns()}")
    try:
        sub = bus.subscribe("s")
        stalling = _StallingBus(bus, 0.4)
        (row,) = bench.publish_paced(stalling, [("s", b"x" * 100, "bytes", 20.0)], 1.0)
        # frame 0 was handed over 0.4 s after it was due: slots 1-6 were over by then
        assert row["late"] >= 1 and row["skipped"] >= 6, row
        assert row["sent"] + row["skipped"] + row["errors"] == row["expected"] == 20
        assert row["sent"] == len(stalling.times)
        got = 0
        while sub.recv(2.0) is not None:
            got += 1
            if got == row["sent"]:
                break
        assert got == row["sent"] and sub.stats()["gaps"] == 0
    finally:
        bus.close()
