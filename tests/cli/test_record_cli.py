"""``msight-fast record`` and ``msight-fast play``, run in subprocesses as a user would."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import msight_fast
from msight_fast import brokers

pytest.importorskip("mcap")
pytest.importorskip("foxglove")

from msight_fast.record import RECORDING_METADATA, messages, read_mcap  # noqa: E402

from ..helpers import wait_for  # noqa: E402

pytestmark = pytest.mark.integration

# the console script on PATH, else the one installed next to this interpreter, else the module
_SIBLING = Path(sys.executable).with_name("msight-fast")
EXE = shutil.which("msight-fast") or (str(_SIBLING) if _SIBLING.is_file() else "")
CMD = [EXE] if EXE else [sys.executable, "-m", "msight_fast.cli"]


def run(*args, env=None, timeout=180):
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _one_line_error(r):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("msight-fast: error:")


def test_help_and_bad_arguments():
    for sub in ("record", "play"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout
    for args in (["record"], ["record", "t"], ["record", "t", "-o", "x.mcap", "--duration", "abc"],
                 ["record", "t", "-o", "x.mcap", "--duration", "-1"],
                 ["record", "t", "-o", "x.mcap", "--max-bytes", "12Q"],
                 ["record", "t", "-o", "x.mcap", "--compression", "gzip"],
                 ["play"], ["play", "x.mcap", "--rate", "0"], ["play", "x.mcap", "--rate", "fast"]):
        r = run(*args)
        assert r.returncode == 2 and "usage:" in r.stderr, (args, r.stderr)


def test_play_of_a_missing_or_broken_file_exits_1_with_one_line(tmp_path):
    r = run("play", str(tmp_path / "missing.mcap"), "--backend", "memory")
    _one_line_error(r)
    assert "missing.mcap" in r.stderr
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(b"not an mcap file")
    r = run("play", str(bad), "--backend", "memory")
    _one_line_error(r)
    assert "MCAP" in r.stderr


def test_record_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "run.mcap"
    out.write_bytes(b"precious")
    r = run("record", "t", "-o", str(out), "--backend", "memory", "--duration", "1")
    _one_line_error(r)
    assert "--force" in r.stderr and out.read_bytes() == b"precious"


@pytest.mark.parametrize("command", [["record", "t", "-o", "{out}", "--backend", "memory", "--duration", "1"],
                                     ["play", "{out}", "--backend", "memory"]])
def test_a_missing_viz_dependency_is_one_line_naming_the_extra(tmp_path, command):
    out = tmp_path / "x.mcap"
    out.write_bytes(b"")
    args = [a.replace("{out}", str(out)) for a in command]
    # the interpreter as it would be without mcap installed: importing it fails
    code = ("import sys; sys.modules['mcap'] = None; from msight_fast.cli import main; "
            f"sys.exit(main({args!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _one_line_error(r)
    assert 'pip install "msight_fast[viz]"' in r.stderr and "mcap" in r.stderr


@pytest.fixture(scope="module")
def redis_broker():
    b = brokers.start("redis")
    yield b
    b.stop()


def _frames():
    rng = np.random.default_rng(9)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(4)]


class _Publisher:
    """Publishes camera frames on two topics until stopped (the recorder decides when it has enough)."""

    def __init__(self, broker, topics):
        self.bus = msight_fast.connect("redis", **broker.options())
        self.topics = topics
        self.sent = {t: [] for t in topics}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        frames = _frames()
        i = 0
        while not self.stop.is_set():
            for t in self.topics:
                f = self.bus.publish(t, frames[i % len(frames)], sensor_name=t, encoding="bgr8", meta={"i": i})
                self.sent[t].append(f)
            i += 1
            self.stop.wait(0.02)                  # about 50 frames per second and topic

    def close(self):
        self.stop.set()
        self.thread.join(30)
        self.bus.close()


def _start_record(args, env):
    p = subprocess.Popen([*CMD, "record", *args], env=dict(os.environ, **env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen = []
    for _ in range(50):                           # "recording ..." is printed once every topic is subscribed
        line = p.stderr.readline()
        seen.append(line)
        if not line or line.startswith("recording "):
            break
    assert seen[-1].startswith("recording "), "".join(seen) + p.stderr.read()
    return p


def _same(got, want):
    assert (got.sensor_name, got.encoding, got.frame_id, got.capture_ts_ns, got.meta) == \
        (want.sensor_name, want.encoding, want.frame_id, want.capture_ts_ns, want.meta)
    assert got.array.shape == want.array.shape and got.array.tobytes() == want.array.tobytes()


def test_record_until_max_bytes_then_play_back_on_redis(redis_broker, tmp_path):
    topics = ["cli/cam/front", "cli/cam/rear"]
    out = tmp_path / "run.mcap"
    env = redis_broker.env()
    proc = _start_record([*topics, "-o", str(out), "--max-bytes", "1M", "--timeout", "10"], env)
    pub = _Publisher(redis_broker, topics)
    pub.thread.start()
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        pub.close()
    assert proc.returncode == 0, stderr[-3000:]
    assert "recorded" in stdout and "MB/s" in stdout and all(t in stdout for t in topics), stdout
    recorded = {t: [] for t in topics}
    for r in messages(out):
        recorded[r.topic].append(r.frame)
    n = sum(len(v) for v in recorded.values())
    assert f"recorded {n} frames" in stdout
    assert n * 57_600 >= 0.9 * (1 << 20)            # it ran until the limit
    for t in topics:                               # what was published from the start, in order
        assert recorded[t], t
        for got, want in zip(recorded[t], pub.sent[t]):
            _same(got, want)
            assert (got.seq, got.publisher_id, got.publish_ts_ns) == (want.seq, want.publisher_id, want.publish_ts_ns)
    with open(out, "rb") as fh:
        from mcap.reader import make_reader
        [meta] = [m for m in make_reader(fh).iter_metadata() if m.name == RECORDING_METADATA]
    assert meta.metadata["stopped_by"] == "max_bytes" and meta.metadata["backend"] == "redis"

    sub_bus = msight_fast.connect("redis", **redis_broker.options())
    subs = {t: sub_bus.subscribe(t) for t in topics}
    r = run("play", str(out), "--rate", "4", "--topics", topics[0], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"played {len(recorded[topics[0]])} frames" in r.stdout and "drift p50" in r.stdout, r.stdout
    got = []
    deadline = time.monotonic() + 60
    while len(got) < len(recorded[topics[0]]) and time.monotonic() < deadline:
        f = subs[topics[0]].recv(timeout=1)
        if f is not None:
            got.append(f)
    assert len(got) == len(recorded[topics[0]])
    for g, want in zip(got, recorded[topics[0]]):
        _same(g, want)
    assert [g.seq for g in got] == list(range(1, len(got) + 1))
    assert subs[topics[1]].recv(timeout=0.5) is None       # --topics played the first one only
    sub_bus.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_recording_is_a_finished_file_and_exit_0(redis_broker, tmp_path, sig):
    topic = f"cli/interrupted/{sig.name}"
    out = tmp_path / "int.mcap"
    proc = _start_record([topic, "-o", str(out)], redis_broker.env())
    pub = _Publisher(redis_broker, [topic])
    pub.thread.start()
    try:
        wait_for(lambda: len(pub.sent[topic]) >= 10, "10 frames published")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        pub.close()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    frames = list(read_mcap(out))
    assert f"recorded {len(frames)} frames" in stdout, stdout
    for got, want in zip(frames, pub.sent[topic]):
        _same(got, want)
    with open(out, "rb") as fh:
        from mcap.reader import make_reader
        [meta] = [m for m in make_reader(fh).iter_metadata() if m.name == RECORDING_METADATA]
    assert meta.metadata["stopped_by"] == "stop"


def test_view_help_bad_arguments_and_a_busy_port():
    r = run("view", "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "--port" in r.stdout
    r = run("view", "--port", "http")
    assert r.returncode == 2 and "usage:" in r.stderr
    import socket
    with socket.socket() as s:                    # a port that is taken: one line, exit 1
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("view", "t", "--backend", "memory", "--port", str(s.getsockname()[1]))
    _one_line_error(r)


def test_view_serves_a_foxglove_client_and_exits_0_on_sigterm(redis_broker):
    pytest.importorskip("websockets")
    pytest.importorskip("google.protobuf")
    from ..foxglove_ws import FoxgloveClient

    topic = "cli/view/cam"
    p = subprocess.Popen([*CMD, "view", topic, "--port", "0"], env=dict(os.environ, **redis_broker.env()),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = _Publisher(redis_broker, [topic])
    try:
        line = p.stdout.readline()
        assert " at ws://" in line, line + p.stderr.read()
        url = line.split(" at ", 1)[1].strip()
        pub.thread.start()
        with FoxgloveClient(url) as client:
            chan = client.channel(topic, timeout=60)
            assert chan["schemaName"] == "foxglove.RawImage"
            [sid] = client.subscribe([chan["id"]])
            _, data = client.next_message(sid, timeout=60)
            img = client.decode(sid, data)
            assert (img.width, img.height, img.encoding) == (160, 120, "bgr8")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        pub.close()
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0
