"""Code paths that must not depend on what only some platforms have.

``socket.MSG_DONTWAIT`` does not exist on Windows: with it removed, the Redis subscriber must
still get every frame, return from ``recv(timeout)`` on time and keep its PING health check.
Signal numbers differ between platforms (19 is SIGSTOP on Linux, SIGCONT on macOS): the embedded
brokers must be paused and resumed by signal name, and say so clearly where there is none.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import msight_fast
from msight_fast import brokers
from msight_fast.config import RedisConfig

from ..helpers import wait_for

# the Redis backend needs hiredis (the redis extra, in test): without it there is nothing to test
R = pytest.importorskip("msight_fast.backends.redis",
                        reason="hiredis is not installed (pip install 'msight_fast[redis]')")

posix_signals = pytest.mark.skipif(
    not all(hasattr(signal, n) for n in ("SIGSTOP", "SIGCONT", "SIGUSR1", "SIGUSR2")),
    reason="needs POSIX job-control and user signals")


@pytest.fixture
def no_dontwait(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    """Remove ``socket.MSG_DONTWAIT`` as on Windows; the list collects the calls ``_nowait`` made."""
    monkeypatch.delattr(socket, "MSG_DONTWAIT", raising=False)
    assert not hasattr(socket, "MSG_DONTWAIT")
    calls: List[Any] = []
    real = R._nowait

    def counting(sock: Any, call: Callable[..., int], *args: Any) -> int:
        calls.append(call.__name__)
        return real(sock, call, *args)
    monkeypatch.setattr(R, "_nowait", counting)
    return calls


@pytest.fixture(scope="module")
def redis_broker() -> Iterator[brokers.Broker]:
    b = brokers.start("redis")
    yield b
    b.stop()


def _source(sock: socket.socket) -> R.RedisSource:
    """A RedisSource reading ``sock`` as if subscribed to 'cam' (the socket stays blocking)."""
    class _Conn:
        tls = False

        def __init__(self, s: socket.socket) -> None:
            self.sock = s

        def close(self) -> None:
            self.sock.close()
    src = R.RedisSource.__new__(R.RedisSource)
    src._init_state(RedisConfig(host="127.0.0.1", port=1), "cam")
    src._conn = _Conn(sock)
    return src


def _bounded(fn: Callable[[], Any], limit: float, unblock: Callable[[], None]) -> Any:
    """``fn()`` in a thread; fails (after ``unblock``) if it has not returned within ``limit`` s."""
    out: List[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        unblock()
        t.join(10)
        pytest.fail(f"still blocked after {limit} s")
    assert out, "the call raised (see the thread's traceback above)"
    return out[0]


@pytest.mark.integration
def test_frames_flow_and_waits_stay_bounded_without_msg_dontwait(redis_broker: brokers.Broker,
                                                                 no_dontwait: List[Any]) -> None:
    bus = msight_fast.connect("redis", **redis_broker.options())
    try:
        sub = bus.subscribe("portable")
        src = sub._src
        assert isinstance(src, R.RedisSource)
        assert src._conn.sock.gettimeout() == 0.0          # what makes _nowait free on this socket
        rng = np.random.default_rng(11)
        sent = [rng.integers(0, 256, n, dtype=np.uint8) for n in (10, 70_000, 3 * R.STAGE + 5, 3_000_000)]
        for a in sent:
            bus.publish("portable", a)
        got: List[Any] = []
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            f = sub.recv(timeout=5)
            if f is not None:
                got.append(f)
        assert [np.asarray(f.array).tobytes() for f in got] == [a.tobytes() for a in sent]
        assert "recv_into" in no_dontwait                  # the frames came through the fallback

        t0 = time.monotonic()
        assert sub.recv(timeout=0.5) is None               # nothing published: a timeout, on time
        assert time.monotonic() - t0 < 0.5 + 4.0

        # PINGs go out through the fallback and are answered: only an answered PING lets the next
        # one go out, so three sent (with a health timeout far away) means the link stays healthy
        src.ping_idle_s, src.health_timeout_s = 0.1, 60.0
        wait_for(lambda: sub.recv(timeout=0.2) is None and no_dontwait.count("send") >= 3,
                 "three answered PINGs")
        st = sub.stats()
        assert st["connected"] and st["disconnects"] == 0

        bus.publish("portable", sent[0])                   # and frames still flow after them
        f = sub.recv(timeout=30)
        assert f is not None and np.asarray(f.array).tobytes() == sent[0].tobytes()
    finally:
        bus.close()


def test_a_blocking_socket_is_read_without_waiting_and_keeps_its_mode(no_dontwait: List[Any]) -> None:
    a, b = socket.socketpair()
    try:
        assert a.gettimeout() is None                      # blocking: only the fallback keeps next() bounded
        src = _source(a)
        t0 = time.monotonic()
        assert _bounded(lambda: src.next(0.3), 0.3 + 10.0, lambda: a.shutdown(socket.SHUT_RDWR)) is None
        assert time.monotonic() - t0 < 0.3 + 4.0
        assert a.gettimeout() is None                      # the socket's own mode is back
        assert "recv_into" in no_dontwait
        b.sendall(b"*3\r\n$9\r\nsubscribe\r\n$3\r\ncam\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$3\r\ncam\r\n$5\r\nhello\r\n")
        got = src.next(30)
        assert got is not None and bytes(got[0]) == b"hello"
    finally:
        a.close()
        b.close()


def test_a_ping_into_a_full_socket_does_not_block_without_msg_dontwait(no_dontwait: List[Any]) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        while True:                                        # fill the way to the peer, which never reads
            try:
                a.send(b"x" * 65536)
            except BlockingIOError:
                break
        while True:
            try:
                a.send(b"x")
            except BlockingIOError:
                break
        a.setblocking(True)
        src = _source(a)
        now = time.monotonic()
        _bounded(lambda: src._ping(now), 10.0, lambda: b.close())
        assert src._ping_at == now                         # the health timeout runs from the unsent PING
        assert no_dontwait == ["send"]
        assert a.gettimeout() is None
    finally:
        a.close()
        b.close()


def _signal_recorder(tmp_path: Path) -> Tuple[subprocess.Popen[bytes], Path]:
    """A child process that writes the number of every SIGUSR1/SIGUSR2 it gets to a file."""
    out = tmp_path / "signals"
    code = ("import signal, sys, time\n"
            "def on(n, _):\n"
            "    with open(sys.argv[1], 'a') as f: f.write(f'{n}\\n')\n"
            "signal.signal(signal.SIGUSR1, on)\n"
            "signal.signal(signal.SIGUSR2, on)\n"
            "open(sys.argv[1], 'a').write('ready\\n')\n"
            "time.sleep(120)\n")
    with open(tmp_path / "stderr", "wb") as err:     # a failing handler's traceback, for the failure message
        proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=err)
    try:
        wait_for(lambda: out.exists() and "ready" in out.read_text(), "the child to install its handlers")
    except AssertionError:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the signal recorder never got ready; its stderr: {_stderr(tmp_path)!r}") from None
    return proc, out


def _stderr(tmp_path: Path) -> str:
    return (tmp_path / "stderr").read_bytes().decode(errors="replace")


def _wait_signals(proc: subprocess.Popen[bytes], out: Path, want: List[str], what: str) -> None:
    """Wait for the child's file to read ``want``; on a timeout, say what it read instead, whether
    the child still runs and what it printed."""
    deadline = time.monotonic() + 30
    while out.read_text().split() != want:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after 30 s waiting for {what}: the file reads {out.read_text()!r}, "
                        f"the child's exit status is {proc.poll()}, its stderr {_stderr(out.parent)!r}")
        time.sleep(0.02)                 # polling a file another process writes


@posix_signals
def test_pause_and_resume_send_the_signals_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, out = _signal_recorder(tmp_path)
    try:
        b = brokers.Broker("redis", 0, proc, str(tmp_path / "log"))
        # stand-ins the child survives: a number hard-coded in brokers.py would not be affected
        monkeypatch.setattr(signal, "SIGSTOP", signal.SIGUSR1)
        monkeypatch.setattr(signal, "SIGCONT", signal.SIGUSR2)
        b.pause()
        _wait_signals(proc, out, ["ready", str(int(signal.SIGUSR1))], "SIGUSR1 for pause()")
        b.resume()
        _wait_signals(proc, out, ["ready", str(int(signal.SIGUSR1)), str(int(signal.SIGUSR2))], "SIGUSR2 for resume()")
    finally:
        proc.kill()
        proc.wait(10)


@posix_signals
def test_without_the_signal_pause_raises_a_clear_error_and_sends_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    proc, out = _signal_recorder(tmp_path)
    try:
        b = brokers.Broker("redis", 0, proc, str(tmp_path / "log"))
        monkeypatch.delattr(signal, "SIGSTOP")             # as on Windows
        monkeypatch.delattr(signal, "SIGCONT")
        with pytest.raises(NotImplementedError, match="SIGSTOP does not exist"):
            b.pause()
        with pytest.raises(NotImplementedError, match="SIGCONT does not exist"):
            b.resume()
        monkeypatch.undo()
        assert proc.poll() is None                          # not signalled: still running
        proc.send_signal(signal.SIGUSR1)                   # a marker: anything sent before it would show first
        wait_for(lambda: len(out.read_text().split()) > 1, "the marker signal")
        assert out.read_text().split() == ["ready", str(int(signal.SIGUSR1))]
    finally:
        proc.kill()
        proc.wait(10)


@posix_signals
@pytest.mark.integration
def test_a_paused_broker_stops_answering_and_a_resumed_one_answers_again() -> None:
    psutil = pytest.importorskip("psutil")
    b = brokers.start("redis")
    c: Optional[socket.socket] = None
    try:
        b.pause()
        p = psutil.Process(b.proc.pid)
        wait_for(lambda: p.status() == psutil.STATUS_STOPPED, "the broker to stop")
        c = socket.create_connection(("127.0.0.1", b.port), timeout=10)   # the kernel still accepts
        c.sendall(b"*1\r\n$4\r\nPING\r\n")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(64)                                     # ... but nobody answers
        b.resume()
        wait_for(lambda: p.status() != psutil.STATUS_STOPPED, "the broker to run again")
        c.settimeout(30)
        assert c.recv(64) == b"+PONG\r\n"
    finally:
        if c is not None:
            c.close()
        b.resume()
        b.stop()
