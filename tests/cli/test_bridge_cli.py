"""``msight-fast bridge``, run in a subprocess as a user would (msight_fast/cli.py, msight_fast/bridge.py)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import msight_fast
from msight_fast import brokers

from ..contract import collect

pytestmark = pytest.mark.integration

# the console script on PATH, else the one installed next to this interpreter, else the module
_SIBLING = Path(sys.executable).with_name("msight-fast")
EXE = shutil.which("msight-fast") or (str(_SIBLING) if _SIBLING.is_file() else "")
CMD = [EXE] if EXE else [sys.executable, "-m", "msight_fast.cli"]


def run(*args, env=None, timeout=120):
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("msight-fast: error:")


@pytest.fixture(scope="module")
def redis_and_nats():
    r = brokers.start("redis")
    try:
        n = brokers.start("nats")
    except BaseException:
        r.stop()
        raise
    yield r, n
    n.stop()
    r.stop()


def _start_bridge(args, env=None):
    p = subprocess.Popen([*CMD, "bridge", *args], env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()                 # printed once every topic is subscribed on the source
    if not line.startswith("bridging "):
        p.kill()
        out, err = p.communicate(timeout=30)
        pytest.fail(f"the bridge did not start: {line}{err}{out}")
    return p


def test_redis_to_nats_and_sigterm_ends_it_with_exit_0_and_a_summary(redis_and_nats):
    r, n = redis_and_nats
    topic = "cli/bridge/cam"
    rx = msight_fast.connect("nats", **n.options())
    pub = msight_fast.connect("redis", **r.options())
    # the source by options (typed: the port is an int), the destination by its MSIGHT_* variables
    p = _start_bridge(["--from", "redis", "--to", "nats", topic, "--from-opt", "host=127.0.0.1",
                       "--from-opt", f"port={r.port}", "--to-opt", "publish_timeout_s=2"],
                      env={"MSIGHT_NATS_SERVERS": repr([n.address])})
    try:
        sub = rx.subscribe(topic)
        frames = [np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8) for i in range(5)]
        sent = [pub.publish(topic, a, sensor_name="cam", encoding="bgr8", meta={"i": i}) for i, a in enumerate(frames)]
        got = collect(sub, 5, timeout=60)
        assert [f.meta["i"] for f in got] == list(range(5))
        for f, s, a in zip(got, sent, frames):
            assert (f.sensor_name, f.encoding, f.frame_id, f.capture_ts_ns) == \
                (s.sensor_name, s.encoding, s.frame_id, s.capture_ts_ns)
            assert f.array.tobytes() == a.tobytes()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        rx.close()
        pub.close()
    assert p.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert took < 10.0 + 4.0, took                    # stop() is bounded by 10 s; 4 s of slack
    m = re.search(r"bridged redis -> nats for [\d.]+ s: (\S+) (\d+) forwarded, (\d+) failed, (\d+) gaps", stdout)
    assert m and m.groups() == (topic, "5", "0", "0"), stdout


def test_duration_ends_it_with_exit_0(redis_and_nats):
    r, n = redis_and_nats
    p = _start_bridge(["--from", "nats", "--to", "redis", "a", "b", "--duration", "1",
                       "--from-opt", f"servers={n.address}", "--to-opt", f"port={r.port}",
                       "--to-opt", "host=127.0.0.1"])
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr[-3000:]
    assert re.search(r"bridged nats -> redis for [\d.]+ s: a 0 forwarded, 0 failed, 0 gaps, 0 dropped; "
                     r"b 0 forwarded", stdout), stdout


def test_config_errors_exit_2_and_an_unreachable_broker_exits_1():
    # the same backend on both sides: it would forward its own output back to itself
    r = run("bridge", "--from", "redis", "--to", "redis", "t")
    _one_line_error(r, 2)
    assert "--allow-same" in r.stderr
    r = run("bridge", "--from", "memory", "--to", "memory", "t", "--allow-same")
    _one_line_error(r, 2)
    assert "same memory broker" in r.stderr
    r = run("bridge", "--from", "memory", "--to", "redis", "t", "--to-opt", "nosuch=1")
    _one_line_error(r, 2)
    assert "nosuch" in r.stderr and "--to redis" in r.stderr
    r = run("bridge", "--from", "memory", "--to", "nats", "t", "--to-opt", "use_tls=maybe")
    _one_line_error(r, 2)
    port = brokers.free_port()
    r = run("bridge", "--from", "memory", "--to", "redis", "t", "--to-opt", "host=127.0.0.1",
            "--to-opt", f"port={port}", "--timeout", "2")
    _one_line_error(r, 1)
    assert "--to redis" in r.stderr and "unreachable" in r.stderr


def test_usage_errors_exit_2():
    r = run("bridge", "--help")
    assert r.returncode == 0 and "--from" in r.stdout and "--allow-same" in r.stdout
    for args in (["bridge", "t"], ["bridge", "--from", "redis", "t"], ["bridge", "--from", "redis", "--to", "nats"],
                 ["bridge", "--from", "nosuch", "--to", "nats", "t"],
                 ["bridge", "--from", "redis", "--to", "nats", "t", "--from-opt", "port"],
                 ["bridge", "--from", "redis", "--to", "nats", "t", "--duration", "0"]):
        r = run(*args)
        assert r.returncode == 2 and "usage:" in r.stderr, (args, r.stderr)
