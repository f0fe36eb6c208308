"""The installed ``msight-fast`` console script, run in subprocesses as a user would."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msight_fast import brokers

pytestmark = pytest.mark.integration
EXE = shutil.which("msight-fast") or ""
if not EXE and os.environ.get("MSIGHT_CLI_REQUIRED"):
    raise RuntimeError("MSIGHT_CLI_REQUIRED is set but msight-fast is not on PATH: the wheel's entry point is missing")
needs_exe = pytest.mark.skipif(not EXE, reason="msight-fast is not installed on PATH")


def run(*args, env=None, timeout=180):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([EXE or sys.executable, *args] if EXE else [sys.executable, "-m", "msight_fast.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=e)


def _dead_config(kind):
    port = str(brokers.free_port())
    return {"redis": {"MSIGHT_REDIS_MESSAGE_BROKER_HOST": "127.0.0.1", "MSIGHT_REDIS_MESSAGE_BROKER_PORT": port},
            "nats": {"MSIGHT_NATS_SERVERS": f"['nats://127.0.0.1:{port}']"},
            "kafka": {"MSIGHT_KAFKA_SERVERS": f"['127.0.0.1:{port}']"}}[kind]


@needs_exe
@pytest.mark.parametrize("kind", ["redis", "nats", "kafka"])
def test_demo_with_embedded_broker(kind):
    # the configured address answers nothing, so the demo must start (and stop) its own broker
    r = run("demo", "--backend", kind, "--seconds", "5", env=_dead_config(kind))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded" in r.stdout
    summary = r.stdout.split("summary", 1)[1]
    rows = [line.split() for line in summary.splitlines() if line.startswith("demo/")]
    assert len(rows) == 3
    for _topic, _sent, received, lost, gaps, *_ in rows:
        assert int(received) > 0 and int(gaps) == 0 and int(lost) == 0, summary
    if not os.environ.get("MSIGHT_DATA_DIR"):            # real frames from a plain install, no path
        assert "sample packaged in msight_fast/sample/" in r.stdout.splitlines()[0], r.stdout[:500]


@needs_exe
def test_demo_with_a_data_folder_that_does_not_exist_exits_1_before_any_broker():
    r = run("demo", "--data", "/nonexistent/msight-data", "--seconds", "1")
    assert r.returncode == 1 and "/nonexistent/msight-data" in r.stderr and "Traceback" not in r.stderr
    assert "embedded" not in r.stdout


@needs_exe
def test_bad_arguments_exit_2_with_usage():
    for args in (["demo", "--seconds", "abc"], ["nosuchcommand"], ["hz"], ["broker", "explode"]):
        r = run(*args)
        assert r.returncode == 2 and "usage:" in r.stderr, (args, r.stderr)
    assert run("--help").returncode == 0
    for sub in ("demo", "broker", "pub", "echo", "hz", "bw", "lat", "bench"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout


@needs_exe
def test_unreachable_broker_exits_1_with_one_line():
    env = _dead_config("redis")
    r = run("hz", "some/topic", "--backend", "redis", "--timeout", "2", "--seconds", "1", env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("msight-fast: error:") and "unreachable" in r.stderr


@pytest.fixture(scope="module")
def publisher(tmp_path_factory):
    b = brokers.start("redis")
    d = tmp_path_factory.mktemp("frames")
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    np.save(d / "frame.npy", frame)
    env = dict(os.environ, **b.env())
    cmd = [EXE, "pub", "cam/front", str(d / "frame.npy"), "--rate", "20", "--loop"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield b.env(), frame
    proc.terminate()
    proc.communicate(timeout=10)
    b.stop()


@needs_exe
def test_echo_prints_headers_never_payload(publisher):
    env, frame = publisher
    r = run("echo", "cam/front", "--count", "3", "--seconds", "20", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "shape=[120, 160, 3]" in line and "dtype=|u1" in line and f"size={frame.nbytes}" in line
        assert "seq=" in line and "publish_ts_ns=" in line and len(line) < 400


@needs_exe
def test_hz_bw_lat_print_sane_numbers(publisher):
    env, frame = publisher
    r = run("hz", "cam/front", "--seconds", "4", env=env)
    assert r.returncode == 0, r.stderr
    rates = [float(x) for x in re.findall(r"average rate: ([\d.]+) Hz", r.stdout)]
    assert rates and 5 < rates[-1] < 40            # published at 20 Hz
    r = run("bw", "cam/front", "--seconds", "4", env=env)
    mbs = [float(x) for x in re.findall(r"bandwidth: ([\d.]+) MB/s", r.stdout)]
    assert r.returncode == 0 and mbs and 0.2 < mbs[-1] < 5   # 57.6 kB x 20 Hz = 1.15 MB/s
    r = run("lat", "cam/front", "--seconds", "4", env=env)
    m = re.findall(r"latency p50: ([\d.]+) ms .* gaps: (\d+)", r.stdout)
    assert r.returncode == 0 and m and float(m[-1][0]) >= 0 and int(m[-1][1]) == 0


@needs_exe
def test_broker_start_status_stop(tmp_path):
    env = {"MSIGHT_FAST_STATE_DIR": str(tmp_path)}
    r = run("broker", "start", "nats", env=env)
    assert r.returncode == 0 and "export MSIGHT_NATS_SERVERS=" in r.stdout
    assert "export MSIGHT_PUBSUB_BACKEND=\"nats\"" in r.stdout
    try:
        assert "nats: running" in run("broker", "status", env=env).stdout
        servers = re.search(r'MSIGHT_NATS_SERVERS="(.*)"', r.stdout).group(1)
        r2 = run("pub", "t", _npy(tmp_path), "--count", "2",
                 "--backend", "nats", env={**env, "MSIGHT_NATS_SERVERS": servers})
        assert r2.returncode == 0 and "published 2 frames" in r2.stdout
    finally:
        assert "nats: stopped" in run("broker", "stop", "nats", env=env).stdout
    assert "not running" in run("broker", "status", "nats", env=env).stdout


def _npy(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(10))
    return str(p)
