"""Network faults between each client and its broker, through tests/faultproxy.py.

The publisher's Bus and the subscriber's Bus reach the broker through proxies of their own, so a
fault hits one side only. Under a cut mid-frame, a stall mid-frame, 1-byte writes, a bandwidth
limit and refused connections, on either side, these tests check the contract of
msight_fast/backends/base.py:

- no corrupted frame reaches the application: every frame carries a known pattern and its index
  in ``meta``, is verified byte for byte, and the codec checks its CRC (``checksum=True``); a
  message the codec had to reject counts as a failure too;
- ``recv(timeout)`` returns within its timeout (plus slack) and never raises;
- ``publish`` returns or raises ``BackendUnavailable`` within ``publish_timeout_s`` (plus slack);
- once the fault is gone, frames flow again without help;
- every frame a publish accepted arrives (at-least-once backends) or its loss shows in the
  subscriber's ``gaps`` (best-effort backends).

Recovery times are printed (``pytest -s``), not asserted.

Kafka's broker tells every client to connect to the one address it advertises, so tansu is
started here advertising a router (a FaultProxy with ``dispatch``) that hands each connection to
the publisher's or the subscriber's proxy by the client id in its first request.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import pytest

import msight_fast
from msight_fast import BackendUnavailable, brokers, registry

from ..faultproxy import DOWN, UP, FaultProxy
from .conftest import collect, wait_for

pytestmark = pytest.mark.integration

PUBLISH_TIMEOUT_S = 2.0
RECV_TIMEOUT_S = 1.0
SLACK_S = 3.0                      # what a bounded call may take beyond its timeout
STALL_S = 8.0                      # longer than publish_timeout_s + slack, so a blocked call shows
REFUSE_S = 7.0
RECOVERY_S = 45.0                  # librdkafka's reconnect backoff alone may reach 10 s
BIG = 1920 * 1080 * 3              # a raw 1080p frame
PACE_S = 0.1                       # 10 big frames a second: under every backend's rate here
SIDES = ["pub", "sub"]
CLOSE_TIMEOUT_S = 30.0

_BASE = np.random.default_rng(11).integers(0, 256, BIG + 4096, dtype=np.uint8).tobytes()


def pattern(i: int, size: int) -> bytes:
    """Frame ``i``'s payload: its index, then a window of random bytes that depends on it."""
    off = (i * 61) % 4096
    return i.to_bytes(8, "little") + _BASE[off:off + size - 8]


# -- the proxies in front of each broker


class Rig:
    """One backend's broker behind two proxies, one for publishers, one for subscribers."""

    def __init__(self, kind: str, pub: FaultProxy, sub: FaultProxy, opts: Callable[[str], Dict[str, Any]],
                 closers: List[Callable[[], None]]) -> None:
        self.kind = kind
        self.proxies = {"pub": pub, "sub": sub}
        self._opts = opts
        self._closers = closers
        self._buses: List[Any] = []
        self._traffic: List[Traffic] = []
        self.at_least_once = registry.capabilities(kind).delivery == "at_least_once"

    def proxy(self, side: str) -> FaultProxy:
        return self.proxies[side]

    def bus(self, side: str) -> Any:
        o = self._opts(side)
        o.update(publish_timeout_s=PUBLISH_TIMEOUT_S, checksum=True)
        b = msight_fast.connect(self.kind, **o)
        self._buses.append(b)
        return b

    def pair(self, topic: str) -> Tuple[Any, Any]:
        """A publishing Bus behind the publisher proxy; a Subscription behind the subscriber one."""
        sub = self.bus("sub").subscribe(topic)
        return self.bus("pub"), sub

    def traffic(self, pub: Any, sub: Any, topic: str, size: int = BIG) -> Traffic:
        t = Traffic(pub, sub, topic, size)
        self._traffic.append(t)
        return t

    def reset(self) -> None:
        for p in self.proxies.values():
            p.reset()

    def finish(self, t: Traffic, what: str) -> None:
        """The fault is over: wait for a frame published from now on to arrive, then stop the
        traffic and fail with every contract violation seen."""
        problems = []
        mark, t0 = t.attempted, time.monotonic()
        if t.wait_received(lambda i: i >= mark, RECOVERY_S):
            # for the record (pytest -s shows it); not asserted: speed is not the contract
            print(f"\n{self.kind}: frames flowed again {time.monotonic() - t0:.2f} s after {what}")
        else:
            problems.append(f"no frame published after {what} (#{mark} on) arrived within {RECOVERY_S} s")
        if self.at_least_once:          # kept until handed over: late ones may still come
            t.wait_until(lambda: not t.missing(), 15.0)
        self.reset()                   # a call still blocked on the fault is let go
        problems += t.stop()
        missing = t.missing()
        if self.at_least_once and missing:
            problems.append(f"{len(missing)} frame(s) that publish accepted never arrived, on an at-least-once "
                            f"backend: #{missing[:10]}")
        gaps = t.sub_stats.get("gaps") or 0
        if not self.at_least_once and gaps < len(missing):
            problems.append(f"{len(missing)} frame(s) that publish accepted were lost but only {gaps} counted "
                            f"as gaps: #{missing[:10]}")
        assert not problems, "\n".join(problems) + "\n" + t.summary()

    def end_test(self) -> None:
        """Reset the proxies, stop leftover traffic, close every Bus (each within a bound)."""
        self.reset()
        for t in self._traffic:
            t.stop()
        self._traffic = []
        stuck = [b for b in self._buses if not _close_within(b, CLOSE_TIMEOUT_S)]
        self._buses = []
        assert not stuck, f"Bus.close() did not return within {CLOSE_TIMEOUT_S} s: {stuck}"

    def close(self) -> None:
        for c in reversed(self._closers):
            c()


def _close_within(bus: Any, timeout: float) -> bool:
    t = threading.Thread(target=bus.close, name="close-bus", daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def _proxies(upstream: Tuple[str, int], closers: List[Callable[[], None]]) -> Tuple[FaultProxy, FaultProxy]:
    pub, sub = FaultProxy(upstream), FaultProxy(upstream)
    closers += [pub.close, sub.close]
    return pub, sub


def _redis_rig(info: Any) -> Rig:
    closers: List[Callable[[], None]] = []
    pub, sub = _proxies((info.options.get("host", "127.0.0.1"), info.options["port"]), closers)
    return Rig("redis", pub, sub, lambda side: dict(info.options, host="127.0.0.1", port=_port(pub, sub, side)),
               closers)


def _port(pub: FaultProxy, sub: FaultProxy, side: str) -> int:
    return (pub if side == "pub" else sub).port


def _nats_rig(info: Any) -> Rig:
    closers: List[Callable[[], None]] = []
    u = urlparse(info.options["servers"][0])
    pub, sub = _proxies((u.hostname or "127.0.0.1", u.port or 4222), closers)
    auth = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""

    def opts(side: str) -> Dict[str, Any]:
        return dict(info.options, servers=[f"nats://{auth}127.0.0.1:{_port(pub, sub, side)}"])
    rig = Rig("nats", pub, sub, opts, closers)
    # nats-py adds the servers a server advertises (connect_urls in its INFO) to its pool, and
    # could then reconnect around the proxy; a server outside a cluster advertises none
    with socket.create_connection(pub.address, timeout=10) as s:
        s.settimeout(10)
        info_line = b""
        while not info_line.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            info_line += chunk
    if not info_line.startswith(b"INFO ") or b"connect_urls" in info_line:
        rig.close()
        raise AssertionError(f"the NATS server's INFO names other addresses to connect to: {info_line[:300]!r}")
    return rig


def kafka_client_id(first: bytes) -> str:
    """The client id in a Kafka request: size, api key, api version, correlation id, then an
    int16-length string (in every request header version)."""
    if len(first) < 14:
        return ""
    (n,) = struct.unpack_from(">h", first, 12)
    return first[14:14 + max(0, n)].decode("utf-8", "replace")


def _kafka_rig() -> Rig:
    closers: List[Callable[[], None]] = []
    pub, sub = FaultProxy(None), FaultProxy(None)
    other = FaultProxy(None)           # admin clients: never faulted
    closers += [pub.close, sub.close, other.close]

    def route(first: bytes) -> FaultProxy:
        cid = kafka_client_id(first)
        return pub if cid.startswith("msf-pub") else sub if cid.startswith("msf-sub") else other
    router = FaultProxy(None, dispatch=route)
    closers.append(router.close)
    port = brokers.free_port()
    args = [brokers.binary("kafka"), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{router.port}"]
    fd, log_path = tempfile.mkstemp(prefix="msight_fast-faults-kafka-", suffix=".log")
    proc = subprocess.Popen(args, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(fd)
    b = brokers.Broker("kafka", port, proc, log_path, args=args)
    closers.insert(0, b.stop)
    for p in (pub, sub, other):
        p.upstream = ("127.0.0.1", port)
    rig = Rig("kafka", pub, sub, lambda side: {
        "servers": [f"127.0.0.1:{_port(pub, sub, side)}"],
        "producer_config": {"client.id": f"msf-{side}"}, "consumer_config": {"client.id": f"msf-{side}"}},
        closers)

    def listening() -> bool:
        assert b.alive(), f"tansu exited: {b.log()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    try:
        wait_for(listening, "tansu to listen", timeout=30)
    except BaseException:
        rig.close()
        raise
    return rig


@pytest.fixture(scope="module")
def rigs(broker_pool: Any) -> Iterator[Callable[[str], Rig]]:
    made: Dict[str, Rig] = {}

    def get(kind: str) -> Rig:
        if kind not in made:
            if kind == "kafka":
                made[kind] = _kafka_rig()
            else:
                info = broker_pool(kind)
                made[kind] = _redis_rig(info) if kind == "redis" else _nats_rig(info)
        return made[kind]

    yield get
    for r in made.values():
        r.close()


@pytest.fixture(params=["redis", "nats", "kafka"])
def rig(request: Any, rigs: Callable[[str], Rig]) -> Iterator[Rig]:
    r = rigs(request.param)
    r.reset()
    yield r
    r.end_test()


# -- traffic that checks every frame and times every call


class Traffic:
    """A publisher thread sending frame after frame of ``size`` bytes, and a subscriber thread
    receiving and verifying them; both time every call and note every contract violation."""

    def __init__(self, pub: Any, sub: Any, topic: str, size: int, pace_s: float = PACE_S) -> None:
        self.pub, self.sub, self.topic, self.size, self.pace_s = pub, sub, topic, size, pace_s
        self.attempted = 0                        # the index the next publish gets
        self.published: List[int] = []
        self.failed: List[Tuple[int, str]] = []
        self.received: List[int] = []
        self.max_publish_s = self.max_recv_s = 0.0
        self.sub_stats: Dict[str, Any] = {}
        self._violations: Dict[str, List[str]] = {}
        self._busy: Dict[str, Optional[Tuple[float, str]]] = {"publish": None, "recv": None}
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(self._publish_loop,), daemon=True,
                                          name="faults-publish"),
                         threading.Thread(target=self._guard, args=(self._recv_loop,), daemon=True,
                                          name="faults-recv")]
        for t in self._threads:
            t.start()

    def _violate(self, kind: str, text: str) -> None:
        with self._cv:
            self._violations.setdefault(kind, []).append(text)

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - reported by stop(), not lost in a thread
            self._violate("thread", f"{loop.__name__} died: {e!r}")

    def _publish_loop(self) -> None:
        bound = PUBLISH_TIMEOUT_S + SLACK_S
        while not self._stop.is_set():
            i = self.attempted
            payload = pattern(i, self.size)
            t0 = time.monotonic()
            self._busy["publish"] = (t0, f"publish #{i}")
            try:
                self.pub.publish(self.topic, payload, meta={"i": i})
                self.published.append(i)
            except BackendUnavailable as e:
                self.failed.append((i, str(e)))
            except Exception as e:  # noqa: BLE001 - the contract allows only BackendUnavailable
                self._violate(f"publish raised {type(e).__name__}",
                              f"publish #{i} raised {e!r}, not BackendUnavailable")
            took = time.monotonic() - t0
            self._busy["publish"] = None
            self.max_publish_s = max(self.max_publish_s, took)
            if took > bound:
                self._violate("publish over its timeout",
                              f"publish #{i} took {took:.1f} s (publish_timeout_s={PUBLISH_TIMEOUT_S})")
            self.attempted = i + 1
            self._stop.wait(self.pace_s)           # paced, not a synchronisation

    def _recv_loop(self) -> None:
        bound = RECV_TIMEOUT_S + SLACK_S
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._busy["recv"] = (t0, "recv")
            try:
                f = self.sub.recv(timeout=RECV_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - recv must never raise for what the network does
                self._busy["recv"] = None
                self._violate(f"recv raised {type(e).__name__}", f"recv(timeout={RECV_TIMEOUT_S}) raised {e!r}")
                self._stop.wait(0.2)               # do not spin on a recv that keeps raising
                continue
            took = time.monotonic() - t0
            self._busy["recv"] = None
            self.max_recv_s = max(self.max_recv_s, took)
            if took > bound:
                self._violate("recv over its timeout", f"recv(timeout={RECV_TIMEOUT_S}) took {took:.1f} s")
            if f is not None:
                self._check(f)

    def _check(self, f: Any) -> None:
        i = f.meta.get("i") if isinstance(f.meta, dict) else None
        if not isinstance(i, int):
            self._violate("corrupted frame", f"a frame without its index reached the application: {f!r}")
            return
        want = pattern(i, self.size)
        got = f.data
        if got.nbytes != len(want) or got != want:
            n = min(got.nbytes, len(want))
            a = np.frombuffer(got, dtype=np.uint8, count=n)
            diff = np.flatnonzero(a != np.frombuffer(want, dtype=np.uint8, count=n))
            where = int(diff[0]) if diff.size else n
            self._violate("corrupted frame", f"frame #{i} reached the application with {got.nbytes} bytes, "
                                             f"differing from what was published from byte {where} on")
            return
        with self._cv:
            self.received.append(i)
            self._cv.notify_all()

    def missing(self) -> List[int]:
        """Frames a publish accepted, older than the newest frame received, that never came."""
        with self._cv:
            got = set(self.received)
            newest = max(got, default=-1)
        return [i for i in list(self.published) if i < newest and i not in got]

    def wait_received(self, pred: Callable[[int], bool], timeout: float) -> bool:
        """Wait until a verified frame whose index satisfies ``pred`` has arrived."""
        return self.wait_until(lambda: any(pred(i) for i in self.received), timeout)

    def wait_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Wait, woken by each frame received, until ``cond()`` holds; False after ``timeout``."""
        with self._cv:
            return self._cv.wait_for(cond, timeout)

    def flowing(self, n: int = 2, what: str = "frames to flow") -> None:
        """Wait for ``n`` frames (the path works, through the proxies) or fail."""
        with self._cv:
            ok = self._cv.wait_for(lambda: len(self.received) >= n, RECOVERY_S)
        assert ok, f"timed out after {RECOVERY_S} s waiting for {what}\n{self.summary()}"

    def stop(self) -> List[str]:
        """Stop both threads (each within its bound) and list every violation."""
        self._stop.set()
        for t, bound in zip(self._threads, (PUBLISH_TIMEOUT_S + SLACK_S + 2 * PACE_S, RECV_TIMEOUT_S + SLACK_S)):
            t.join(bound + 2.0)
        for kind, busy in self._busy.items():
            if busy is not None:
                self._violate(f"{kind} blocked", f"{busy[1]} had been blocked for "
                                                 f"{time.monotonic() - busy[0]:.1f} s when the test ended")
        try:
            self.sub_stats = self.sub.stats()
        except Exception as e:  # noqa: BLE001
            self._violate("stats raised", f"Subscription.stats() raised {e!r}")
        rejected = self.sub_stats.get("rejected", 0)
        if rejected:
            self._violate("corrupted message", f"the backend delivered {rejected} malformed message(s) "
                                               "(caught by the codec's checks, so not handed over)")
        with self._cv:
            return [f"{kind}: {len(v)} time(s); first: {v[0]}" for kind, v in self._violations.items()]

    def summary(self) -> str:
        try:
            sst = {k: v for k, v in self.sub.stats().items() if not k.startswith("latency")}
        except Exception as e:  # noqa: BLE001
            sst = {"error": repr(e)}
        try:
            pst = self.pub.stats()
        except Exception as e:  # noqa: BLE001
            pst = {"error": repr(e)}
        first_fail = self.failed[0][1] if self.failed else None
        return (f"  published {len(self.published)} of {self.attempted} ({len(self.failed)} BackendUnavailable; "
                f"first: {first_fail}), received {len(self.received)} "
                f"(last index {self.received[-1] if self.received else None}); longest publish "
                f"{self.max_publish_s:.1f} s, longest recv {self.max_recv_s:.1f} s\n"
                f"  subscriber stats: {sst}\n  publisher stats: {pst}")


def _frame_direction(side: str) -> str:
    """Which way the frames cross that side's proxy."""
    return UP if side == "pub" else DOWN


def _through(proxy: FaultProxy, side: str) -> None:
    st = proxy.stats()
    assert st[_frame_direction(side) + "_bytes"] >= BIG, f"the frames do not pass through {proxy}: {st}"


# -- the faults


@pytest.mark.parametrize("side", SIDES)
def test_cut_mid_frame(rig: Rig, topic: str, side: str) -> None:
    """Every connection on one side is reset half-way through a 6 MB frame."""
    pub, sub = rig.pair(topic)
    proxy = rig.proxy(side)
    t = rig.traffic(pub, sub, topic)
    t.flowing()
    _through(proxy, side)
    cuts = proxy.stats()["cut"]
    proxy.cut_after_bytes(BIG // 2, _frame_direction(side))
    wait_for(lambda: proxy.stats()["cut"] > cuts, "the cut mid-frame", timeout=RECOVERY_S)
    rig.finish(t, f"a cut mid-frame on the {side} side")


@pytest.mark.parametrize("side", SIDES)
def test_stall_mid_frame(rig: Rig, topic: str, side: str) -> None:
    """The link freezes half-way through a 6 MB frame for longer than any call may take."""
    pub, sub = rig.pair(topic)
    proxy = rig.proxy(side)
    t = rig.traffic(pub, sub, topic)
    t.flowing()
    _through(proxy, side)
    proxy.stall_after_bytes(BIG // 2, STALL_S, _frame_direction(side))
    wait_for(lambda: proxy.stats()["stalled"][UP], "the stall", timeout=RECOVERY_S)
    wait_for(lambda: not proxy.stats()["stalled"][UP], "the stall to end", timeout=STALL_S + 30)
    rig.finish(t, f"a {STALL_S} s stall on the {side} side")


@pytest.mark.parametrize("side", SIDES)
def test_bounded_while_refused(rig: Rig, topic: str, side: str) -> None:
    """One side's connections are reset and new ones refused for a while."""
    pub, sub = rig.pair(topic)
    proxy = rig.proxy(side)
    t = rig.traffic(pub, sub, topic)
    t.flowing()
    _through(proxy, side)
    proxy.refuse(REFUSE_S)
    proxy.cut()
    wait_for(lambda: not proxy.stats()["refusing"], "refusing to end", timeout=REFUSE_S + 30)
    rig.finish(t, f"a cut and {REFUSE_S} s of refused connections on the {side} side")


def _publish_and_collect(pub: Any, sub: Any, topic: str, sizes: List[int]) -> None:
    """Publish one frame of each size, in order; every one must arrive, intact and in order."""
    for i, size in enumerate(sizes):
        t0 = time.monotonic()
        pub.publish(topic, pattern(i, size), meta={"i": i})
        took = time.monotonic() - t0
        assert took <= PUBLISH_TIMEOUT_S + SLACK_S, f"publish #{i} took {took:.1f} s"
    pub.flush(60)
    got = collect(sub, len(sizes), timeout=90)
    assert [f.meta["i"] for f in got] == list(range(len(sizes))), f"frames missing or out of order: {sub.stats()}"
    for f in got:
        i = f.meta["i"]
        assert f.data == pattern(i, sizes[i]), f"frame #{i} differs from what was published"
    assert sub.stats()["rejected"] == 0, f"the backend delivered malformed messages: {sub.stats()}"


@pytest.mark.parametrize("side", SIDES)
def test_one_byte_writes(rig: Rig, topic: str, side: str) -> None:
    """Every byte on one side crosses the proxy as a write of its own."""
    pub, sub = rig.pair(topic)
    proxy = rig.proxy(side)
    d = _frame_direction(side)
    proxy.slice(1)
    before = proxy.stats()
    sizes = [3000 + 17 * i for i in range(6)]
    _publish_and_collect(pub, sub, topic, sizes)
    st = proxy.stats()
    writes, nbytes = st[d + "_writes"] - before[d + "_writes"], st[d + "_bytes"] - before[d + "_bytes"]
    assert writes == nbytes >= sum(sizes), (before, st)


@pytest.mark.parametrize("side", SIDES)
def test_bandwidth_limit(rig: Rig, topic: str, side: str) -> None:
    """One side's link carries about 4 MB/s."""
    pub, sub = rig.pair(topic)
    proxy = rig.proxy(side)
    d = _frame_direction(side)
    proxy.throttle(4 << 20)
    before = proxy.stats()
    sizes = [1 << 20] * 4
    _publish_and_collect(pub, sub, topic, sizes)
    st = proxy.stats()
    # the limit is applied as writes of at most 1/20 s worth of bytes
    assert st[d + "_writes"] - before[d + "_writes"] >= sum(sizes) // ((4 << 20) // 20), (before, st)
