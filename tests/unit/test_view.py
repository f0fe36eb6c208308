"""``msight_fast.view``: bus topics served live to a Foxglove WebSocket client.

The frames come over the in-process memory backend (no broker needed); the client is the
protocol client in tests/foxglove_ws.py, talking to the real Foxglove SDK server on a free port.
"""
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("foxglove")
pytest.importorskip("websockets")
pytest.importorskip("google.protobuf")

import msight_fast  # noqa: E402
from msight_fast import ConfigError  # noqa: E402
from msight_fast.view import STATS_SCHEMA_NAME, Viewer  # noqa: E402

from ..foxglove_ws import FoxgloveClient  # noqa: E402
from ..helpers import REPO, real_jpeg, real_sweep, wait_for  # noqa: E402

RAW, JPEG, LIDAR = "cam/raw", "cam/jpeg", "lidar/points"
STATS_KEYS = {"rate_hz", "latency_ms", "gaps", "dropped", "received"}


def _raw(seed):
    return np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def _view_threads():
    return [t for t in threading.enumerate() if t.name.startswith("msight-view")]


@pytest.fixture
def bus():
    b = msight_fast.connect("memory", name=f"view-{uuid.uuid4().hex[:8]}")
    yield b
    b.close()


@pytest.fixture
def viewer(bus):
    v = Viewer([RAW, JPEG, LIDAR], bus=bus, port=0)
    v.start()
    yield v
    v.stop()


def _published_all(bus, raw):
    bus.publish(RAW, raw, sensor_name="front", encoding="bgr8")
    bus.publish(JPEG, real_jpeg(), sensor_name="front", encoding="jpeg")
    bus.publish(LIDAR, real_sweep(), sensor_name="roof", encoding="pointcloud")


def test_images_and_clouds_reach_a_foxglove_client(bus, viewer):
    assert viewer.port > 0
    first, newest = _raw(1), _raw(2)
    _published_all(bus, first)
    # and to type each channel by its first frame (a first frame that came while the converter was busy with
    # another topic's was once taken as shown and its channel never opened)
    wait_for(lambda: all(s["received"] >= 1 and s["kind"] is not None for s in viewer.stats().values()),
             "the viewer to receive and open its channels")
    # nothing is converted while no client is subscribed
    assert {t: s["converted"] for t, s in viewer.stats().items()} == {RAW: 0, JPEG: 0, LIDAR: 0}

    with FoxgloveClient(viewer.url) as c:
        assert c.subprotocol in ("foxglove.sdk.v1", "foxglove.websocket.v1")
        chans = {t: c.channel(t) for t in (RAW, JPEG, LIDAR, RAW + "/stats", JPEG + "/stats", LIDAR + "/stats")}
        seen = {t: (ch["schemaName"], ch["encoding"]) for t, ch in chans.items()}
        assert seen == {RAW: ("foxglove.RawImage", "protobuf"), JPEG: ("foxglove.CompressedImage", "protobuf"),
                        LIDAR: ("foxglove.PointCloud", "protobuf"), RAW + "/stats": (STATS_SCHEMA_NAME, "json"),
                        JPEG + "/stats": (STATS_SCHEMA_NAME, "json"), LIDAR + "/stats": (STATS_SCHEMA_NAME, "json")}
        # a client that is connected but not subscribed does not make the viewer convert either
        bus.publish(RAW, newest, sensor_name="front", encoding="bgr8")
        wait_for(lambda: viewer.stats()[RAW]["received"] >= 2, "the second raw frame")
        assert all(s["converted"] == 0 for s in viewer.stats().values())
        assert viewer.stats()[RAW]["skipped"] == 1          # the first raw frame, replaced unseen

        raw_sub, jpeg_sub, lidar_sub, stats_sub = c.subscribe(
            [chans[RAW]["id"], chans[JPEG]["id"], chans[LIDAR]["id"], chans[RAW + "/stats"]["id"]])

        img = c.decode(raw_sub, c.next_message(raw_sub)[1])
        assert (img.width, img.height, img.encoding, img.step) == (640, 480, "bgr8", 640 * 3)
        assert img.data == newest.tobytes()                 # the newest frame: latest wins
        assert img.frame_id == "front"

        jpg = c.decode(jpeg_sub, c.next_message(jpeg_sub)[1])
        assert jpg.format == "jpeg"
        assert jpg.data == real_jpeg()

        sweep = real_sweep()
        cloud = c.decode(lidar_sub, c.next_message(lidar_sub)[1])
        assert cloud.point_stride == sweep.dtype.itemsize
        assert [f.name for f in cloud.fields] == [n for n in sweep.dtype.names]
        assert [f.offset for f in cloud.fields] == [sweep.dtype.fields[n][1] for n in sweep.dtype.names]
        assert cloud.data == sweep.tobytes()

        st = c.decode(stats_sub, c.next_message(stats_sub)[1])
        assert STATS_KEYS <= set(st)
        assert set(st["latency_ms"]) == {"p50", "p99"}
        assert st["topic"] == RAW and st["received"] >= 2 and st["gaps"] == 0

        # frames published now reach the subscribed client too
        later = _raw(3)
        bus.publish(RAW, later, sensor_name="front", encoding="bgr8")
        deadline = time.monotonic() + 30
        while True:
            data = c.decode(raw_sub, c.next_message(raw_sub, timeout=max(0.1, deadline - time.monotonic()))[1]).data
            if data == later.tobytes():
                break
    s = viewer.stats()
    assert s[RAW]["converted"] >= 2 and s[JPEG]["converted"] >= 1 and s[LIDAR]["converted"] >= 1
    assert s[RAW]["logged"] == s[RAW]["converted"]
    assert s[RAW]["received"] == 3 and s[RAW]["gaps"] == 0


def test_a_client_that_never_reads_does_not_slow_the_bus(bus, viewer):
    bus.publish(RAW, _raw(0), encoding="bgr8")
    with FoxgloveClient(viewer.url) as c:
        c.subscribe([c.channel(RAW)["id"]])
    # this client subscribes, then stops reading: once the socket buffers and its one-frame queue
    # are full, only the server's short queue for it stands between the viewer and the socket.
    # It sends no keepalive pings: unread pongs would make it close itself on a slow run, and with
    # no subscriber left the viewer rightly stops converting
    stuck = FoxgloveClient(viewer.url, max_queue=1, close_timeout=1, ping_interval=None)
    try:
        stuck_sub = stuck.subscribe([stuck.channel(RAW)["id"]])[0]
        wait_for(lambda: viewer.stats()[RAW]["clients"] == 1, "the stuck client's subscription")
        n = 40
        base = np.random.default_rng(7).integers(0, 256, (960, 1280, 3), dtype=np.uint8)
        for i in range(n):                      # 40 x 3.7 MB logged to it: far past what it buffers
            frame = base.copy()
            frame[0, 0, 0] = i
            before = viewer.stats()[RAW]
            bus.publish(RAW, frame, encoding="bgr8")
            wait_for(lambda b=before: viewer.stats()[RAW]["received"] > b["received"], f"frame {i} received")
            wait_for(lambda b=before: viewer.stats()[RAW]["converted"] > b["converted"], f"frame {i} converted")
        s = viewer.stats()[RAW]
        assert s["logged"] == s["converted"] >= n
        assert bus.stats()["published"] == n + 1 and bus.stats()["publish_errors"] == 0
        # the server still serves a client that reads: the last frame, sent again when it subscribes
        last = _raw(8)
        bus.publish(RAW, last, encoding="bgr8")
        wait_for(lambda: viewer.stats()[RAW]["received"] == n + 2, "the last frame")
        with FoxgloveClient(viewer.url) as fresh:
            sid = fresh.subscribe([fresh.channel(RAW)["id"]])[0]
            assert fresh.decode(sid, fresh.next_message(sid)[1]).data == last.tobytes()
        # read at last, the stuck client gets the newest frame, with older ones dropped on the way
        got = []
        while True:
            data = stuck.decode(stuck_sub, stuck.next_message(stuck_sub, timeout=60)[1]).data
            if data == last.tobytes():
                break
            got.append(data[0])
        assert len(got) < n + 1                 # its frames of the loop, and the one resent when it subscribed
    finally:
        stuck.close()


def test_a_topic_foxglove_cannot_show_gets_only_its_stats_channel(bus):
    with Viewer(["blobs"], bus=bus, port=0) as v:
        with FoxgloveClient(v.url) as c:
            stats_ch = c.channel("blobs/stats")
            sid = c.subscribe([stats_ch["id"]])[0]
            bus.publish("blobs", b"\x00\x01 not a picture", encoding="bytes")
            wait_for(lambda: v.stats()["blobs"]["kind"] == "frame", "the topic's kind")
            wait_for(lambda: v.stats()["blobs"]["unshown"] == 1, "the frame counted as unshown")
            st = c.decode(sid, c.next_message(sid)[1])
            while st["received"] < 1:           # a stats message from before the frame came
                st = c.decode(sid, c.next_message(sid)[1])
            assert st["kind"] == "frame"
            assert [ch["topic"] for ch in c.channels.values()] == ["blobs/stats"]
        assert v.stats()["blobs"]["converted"] == 0


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return True
    return False


def test_a_viewer_that_connects_its_own_bus_closes_it_and_leaves_no_thread():
    name = f"view-own-{uuid.uuid4().hex[:8]}"
    pub = msight_fast.connect("memory", name=name)
    try:
        v = Viewer([JPEG], backend="memory", port=0, name=name)
        with v:
            assert len(_view_threads()) == 2           # one receiver, the converter
            port = v.port
            pub.publish(JPEG, real_jpeg(), encoding="jpeg")
            wait_for(lambda: v.stats()[JPEG]["received"] == 1, "the frame")
            assert v._bus is not None
        assert v._bus is None                           # closed by stop()
        assert _view_threads() == []
        wait_for(lambda: _refused(port), "the server's port to close")
        v.stop()                                        # twice is harmless
    finally:
        pub.close()


def test_a_port_in_use_is_an_oserror_and_leaves_nothing_running(bus, viewer):
    other = Viewer([RAW], bus=bus, port=viewer.port)
    with pytest.raises(OSError, match="cannot serve"):
        other.start()
    assert len(_view_threads()) == 4                    # the first viewer's, only
    bus.publish(RAW, _raw(0), encoding="bgr8")          # the given bus is left open
    wait_for(lambda: viewer.stats()[RAW]["received"] == 1, "the frame on the first viewer")


def test_bad_arguments_are_config_errors(bus):
    with pytest.raises(ConfigError):
        Viewer([], bus=bus)
    with pytest.raises(ConfigError):
        Viewer([RAW], bus=bus, backend="memory")
    with pytest.raises(ConfigError):
        Viewer([RAW], bus=bus, port=70000)
    with pytest.raises(ConfigError):
        Viewer([RAW, ""], bus=bus)
    assert Viewer(RAW, bus=bus).topics == [RAW]      # one topic as a str, as Recorder and Player take it


def _read_lines(proc, n, deadline):
    """The first ``n`` lines the process prints, waited for until ``deadline``."""
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"the view command printed {buf!r} only"
            if sel.select(timeout=left):
                chunk = os.read(fd, 4096)
                assert chunk, f"the view command ended after printing {buf!r}"
                buf += chunk
    return buf.decode().splitlines()[:n]


def test_run_prints_the_url_serves_and_exits_0_on_sigterm():
    code = ("import argparse, sys\n"
            "from msight_fast import view\n"
            "p = argparse.ArgumentParser()\n"
            "p.add_argument('--backend')\n"
            "view.add_arguments(p)\n"
            "sys.exit(view.run(p.parse_args(sys.argv[1:])))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, "--backend", "memory", "--port", "0", "a/b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first, second = _read_lines(proc, 2, time.monotonic() + 60)
        assert "ws://127.0.0.1:" in first, first
        assert "open it in Foxglove (Open connection...)" in second, second
        url = first[first.index("ws://"):].split()[0]
        with FoxgloveClient(url) as c:
            assert c.channel("a/b/stats")["schemaName"] == STATS_SCHEMA_NAME
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert b"a/b: received 0" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_without_the_foxglove_sdk_start_is_a_config_error(bus, monkeypatch):
    monkeypatch.setitem(sys.modules, "foxglove", None)     # what an environment without it gives
    v = Viewer([RAW], bus=bus, port=0)
    with pytest.raises(ConfigError, match="Foxglove SDK"):
        v.start()
    assert _view_threads() == []
    bus.publish(RAW, _raw(0), encoding="bgr8")              # the given bus is left open
