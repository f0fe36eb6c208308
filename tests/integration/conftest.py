"""Real brokers for the integration suite.

Each backend's broker is started once per session on a free loopback port and stopped after,
unless an environment variable names an external one, so the same suite runs against a real
deployment:
  MSIGHT_TEST_REDIS_URL=redis://host:6379/0
  MSIGHT_TEST_NATS_SERVERS="['nats://host:4222']"
  MSIGHT_TEST_KAFKA_SERVERS="['host:9092']"
"""
import ast
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

import msight_fast
from msight_fast import brokers, registry

from ..contract import collect  # noqa: F401 - the integration tests import it from here
from ..helpers import wait_for  # noqa: F401 - likewise

BACKENDS = list(registry.with_broker())


class BrokerInfo:
    def __init__(self, kind, options, local=None):
        self.kind, self.options, self.local = kind, options, local


def _external(kind):
    if kind == "redis" and os.environ.get("MSIGHT_TEST_REDIS_URL"):
        u = urlparse(os.environ["MSIGHT_TEST_REDIS_URL"])
        opts = {"host": u.hostname or "localhost", "port": u.port or 6379}
        if u.path.strip("/"):
            opts["db"] = int(u.path.strip("/"))
        if u.password:
            opts["password"] = u.password
        if u.username:
            opts["username"] = u.username
        return opts
    var = {"nats": "MSIGHT_TEST_NATS_SERVERS", "kafka": "MSIGHT_TEST_KAFKA_SERVERS"}.get(kind)
    if var and os.environ.get(var):
        return {"servers": ast.literal_eval(os.environ[var])}
    return None


def _nats_raw_frame_args():
    import tempfile
    fd, path = tempfile.mkstemp(prefix="msight_fast-nats-", suffix=".conf")
    os.write(fd, b"max_pending: 536870912\n")
    os.close(fd)
    return ["-c", path]


# The session brokers are set up as the README advises for raw-frame topics: slow-consumer limits
# raised (the tests of those limits start brokers of their own with the defaults).
_RAW_FRAME_ARGS = {
    "redis": lambda: ["--client-output-buffer-limit", "pubsub", "512mb", "256mb", "60"],
    "nats": _nats_raw_frame_args,
}


@pytest.fixture(scope="session")
def broker_pool():
    started = {}

    def get(kind):
        if kind not in started:
            ext = _external(kind)
            if ext is not None:
                started[kind] = BrokerInfo(kind, ext)
            else:
                b = brokers.start(kind, extra_args=_RAW_FRAME_ARGS.get(kind, lambda: [])())
                started[kind] = BrokerInfo(kind, b.options(), b)
        return started[kind]

    yield get
    for info in started.values():
        if info.local is not None:
            info.local.stop()


@pytest.fixture(params=BACKENDS)
def backend(request, broker_pool):
    return broker_pool(request.param)


@pytest.fixture
def make_bus(backend):
    """connect() to the backend's broker; every Bus made is closed after the test."""
    made = []

    def make(**opts):
        o = dict(backend.options)
        o.update(opts)
        bus = msight_fast.connect(backend.kind, **o)
        made.append(bus)
        return bus

    yield make
    for b in made:
        b.close()


@pytest.fixture
def kafka(broker_pool):
    """connect("kafka", **extra options) to the session's broker; every Bus made is closed after the test
    (``kafka.options``: the broker's own options)."""
    info = broker_pool("kafka")
    made = []

    def make(**opts):
        bus = msight_fast.connect("kafka", **{**info.options, **opts})
        made.append(bus)
        return bus

    make.options = info.options
    yield make
    for b in made:
        b.close()


@pytest.fixture
def topic():
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_broker():
    """A broker of the test's own, on a free loopback port, for tests that kill and restart it
    (``b.kill()``, ``b.restart()``: same port, same arguments). Stopped after the test."""
    made = []

    def start(kind, **kw):
        b = brokers.start(kind, **kw)
        made.append(b)
        return b

    yield start
    for b in made:
        b.stop()


ROOT = Path(__file__).resolve().parents[2]


def spawn_member(backend, opts, topic, out, group="", sleep_s=0.0, max_pending=0, seconds=60.0):
    """A subscriber in a process of its own (tests/integration/stress_child.py), which writes the
    seqs it gets to ``out``; returns once it has subscribed."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.stress_child", backend, json.dumps(opts), topic,
                             group, str(out), str(sleep_s), str(max_pending), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    ready = Path(str(out) + ".ready")
    wait_for(lambda: ready.exists() or proc.poll() is not None, "the child to subscribe", timeout=90)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc
