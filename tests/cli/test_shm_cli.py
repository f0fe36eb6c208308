"""The CLI on the shared-memory backend: the demo, pub with echo/hz/bw/lat, and a bridge to Redis."""
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from msight_fast import brokers
from msight_fast.backends import shm

from .test_cli import EXE, needs_exe, run

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sys.platform.startswith("linux") or shm._shm is None,
                                 reason="the shm backend needs Linux and its compiled module")]


@pytest.fixture
def shm_env():
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="msf-cli-")
    yield {"MSIGHT_PUBSUB_BACKEND": "shm", "MSIGHT_SHM_DIR": d}
    left = [n for n in os.listdir(d) if n.startswith("msf-")]
    for n in os.listdir(d):
        os.unlink(os.path.join(d, n))
    os.rmdir(d)
    assert not left, f"shm files left behind: {left}"


@needs_exe
def test_demo_on_shm_needs_no_broker(shm_env):
    r = run("demo", "--backend", "shm", "--seconds", "4", env={"MSIGHT_SHM_DIR": shm_env["MSIGHT_SHM_DIR"]})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shared memory (no broker)" in r.stdout
    summary = r.stdout.split("summary", 1)[1]
    rows = [ln.split() for ln in summary.strip().splitlines()[2:]]
    assert len(rows) == 3 and all(int(row[2]) > 0 for row in rows)     # every topic received frames


@needs_exe
def test_pub_then_echo_hz_bw_lat_on_shm(shm_env, tmp_path):
    frame = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    np.save(tmp_path / "f.npy", frame)
    env = dict(os.environ, **shm_env)
    proc = subprocess.Popen([EXE, "pub", "cam/front", str(tmp_path / "f.npy"), "--rate", "20", "--loop"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        r = run("echo", "cam/front", "--backend", "shm", "--count", "3", "--seconds", "20",
                env={"MSIGHT_SHM_DIR": shm_env["MSIGHT_SHM_DIR"]})
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 3 and "shape=[120, 160, 3]" in r.stdout
        r = run("hz", "cam/front", "--seconds", "3", env=shm_env)
        rates = [float(x) for x in re.findall(r"average rate: ([\d.]+) Hz", r.stdout)]
        assert r.returncode == 0 and rates and 5 < rates[-1] < 40, r.stdout + r.stderr
        r = run("bw", "cam/front", "--seconds", "3", env=shm_env)
        assert r.returncode == 0 and re.search(r"bandwidth: [\d.]+ MB/s", r.stdout), r.stdout + r.stderr
        r = run("lat", "cam/front", "--seconds", "3", env=shm_env)
        m = re.findall(r"latency p50: ([\d.]+) ms .* gaps: (\d+)", r.stdout)
        assert r.returncode == 0 and m and int(m[-1][1]) == 0, r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@needs_exe
def test_bridge_from_shm_to_redis(shm_env, tmp_path):
    b = brokers.start("redis")
    try:
        env = {**os.environ, **b.env(), **shm_env}
        frame = np.arange(120 * 160 * 3, dtype=np.uint8).reshape(120, 160, 3)
        np.save(tmp_path / "f.npy", frame)
        import msight_fast
        dst = msight_fast.connect("redis", **b.options())
        sub = dst.subscribe("cam/front")
        bridge = subprocess.Popen([EXE, "bridge", "--from", "shm", "--to", "redis", "cam/front"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pub = subprocess.Popen([EXE, "pub", "cam/front", str(tmp_path / "f.npy"), "--rate", "20", "--loop"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            got = None
            for _ in range(150):                      # 30 s at most
                got = sub.recv(timeout=0.2)
                if got is not None:
                    break
            assert got is not None, "nothing crossed the bridge"
            assert np.array_equal(got.array, frame)
        finally:
            pub.terminate()
            pub.communicate(timeout=10)
            bridge.terminate()
            out, err = bridge.communicate(timeout=20)
            dst.close()
        assert bridge.returncode == 0, err[-2000:]
        assert "forwarded" in out
    finally:
        b.stop()
