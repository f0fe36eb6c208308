"""The NATS wire stays standard: a plain nats-py client receives what a Bus publishes (whole frames
and fragments, written by this library's own socket writer), and a Bus receives what a plain
nats-py client publishes (with and without headers, through this library's own socket reader)."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, List

import numpy as np
import pytest

import msight_fast
from msight_fast import Frame, Reassembler, decode, encode, fragment

from ..helpers import wait_for
from .conftest import collect

nats = pytest.importorskip("nats")

pytestmark = [pytest.mark.integration]


@pytest.fixture
def nats_opts(broker_pool: Any) -> Any:
    return broker_pool("nats").options


def _until_quiet(sub: Any) -> List[Any]:
    """Every frame ``sub`` gets until 5 s pass without one (a queue member: how many is not known)."""
    out = []
    while True:
        f = sub.recv(timeout=5)
        if f is None:
            return out
        out.append(f)


def _frames() -> List[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),          # whole
            rng.integers(0, 256, (700, 800, 3), dtype=np.uint8),      # 1.7 MB: fragmented at 1 MB
            rng.integers(0, 256, (200, 200), dtype=np.uint8)]         # 40 KB: whole


def test_a_plain_nats_py_subscriber_gets_what_a_bus_publishes(nats_opts: Any) -> None:
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    sent = _frames()

    async def run() -> List[bytes]:
        nc = await nats.connect(servers=nats_opts["servers"])
        got: List[bytes] = []
        sub = await nc.subscribe(topic)
        await nc.flush()
        loop = asyncio.get_running_loop()
        with msight_fast.connect("nats", **nats_opts) as bus:
            assert type(bus._t.nc._transport._io_writer.transport.get_protocol()).__name__ == "_FastReader"
            for a in sent:
                await loop.run_in_executor(None, bus.publish, topic, a)
            await loop.run_in_executor(None, bus.flush, 30)
        want = 1 + len(fragment([encode(Frame.from_array(sent[1], sensor_name="x"))], 1 << 20)) + 1
        while len(got) < want:
            msg = await sub.next_msg(timeout=30)
            got.append(msg.data)
        await nc.close()
        return got

    msgs = asyncio.run(run())
    r = Reassembler()
    frames = [f for f in (r.feed(m) for m in msgs) if f is not None]
    assert [f.seq for f in frames] == [1, 2, 3]
    for f, a in zip(frames, sent):
        assert np.array_equal(f.array, a)


def test_a_bus_gets_what_a_plain_nats_py_client_publishes(nats_opts: Any) -> None:
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    sent = _frames()
    wire = [encode(Frame.from_array(a, sensor_name="plain")) for a in sent]
    with msight_fast.connect("nats", **nats_opts) as bus, bus.subscribe(topic) as sub:
        async def publish() -> None:
            nc = await nats.connect(servers=nats_opts["servers"])
            await nc.publish(topic, wire[0])
            for frag in fragment(wire[1], 1 << 20):      # a frame over max_payload: fragments
                await nc.publish(topic, frag)
            await nc.publish(topic, wire[2], headers={"x-from": "nats-py"})   # HMSG: through nats-py's parser
            await nc.flush()
            await nc.close()
        asyncio.run(publish())
        got = collect(sub, 3, timeout=30)
    assert [f.sensor_name for f in got] == ["plain"] * 3
    for f, a in zip(got, sent):
        assert np.array_equal(f.array, a)
    assert decode(wire[0]).frame_id == got[0].frame_id


def test_queue_groups_get_an_announcement_not_a_second_copy_of_the_first_fragment(nats_opts: Any) -> None:
    """A fragmented frame goes once on the topic; queue groups get its first fragment's 64-byte
    header alone, and a member pulls the fragments from the publisher."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    big = np.random.default_rng(2).integers(0, 256, (700, 800, 3), dtype=np.uint8)

    async def watch_group_subject() -> List[bytes]:
        nc = await nats.connect(servers=nats_opts["servers"])
        sub = await nc.subscribe("_MSF.q." + topic)
        await nc.flush()
        loop = asyncio.get_running_loop()
        with msight_fast.connect("nats", **nats_opts) as pub, \
                msight_fast.connect("nats", **nats_opts) as member_bus, \
                member_bus.subscribe(topic, group_id="workers") as member:
            await loop.run_in_executor(None, pub.publish, topic, big)
            got = await loop.run_in_executor(None, member.recv, 30)
            assert got is not None and np.array_equal(got.array, big)
        msgs = []
        while not msgs or not msgs[-1][0]:   # first the publisher's empty probes: does a group listen?
            m = await sub.next_msg(timeout=30)
            msgs.append((m.data, m.reply))
        await nc.close()
        return msgs

    *probes, (announcement, _) = asyncio.run(watch_group_subject())
    assert len(announcement) == 64 and announcement[:4] == b"\x93MSP"
    assert len(probes) <= 2 and all(reply for _, reply in probes)    # a request: it names a reply inbox


def test_an_array_changed_right_after_publish_returns_arrives_as_it_was(nats_opts: Any) -> None:
    """Large whole frames go to the socket as views of the caller's array: publish returns only
    once they are written (or copied), so a camera driver may reuse its buffer at once."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.zeros((400, 600, 3), np.uint8)               # 720 KB: whole under the 1 MB max_payload
    with msight_fast.connect("nats", **nats_opts) as bus, bus.subscribe(topic) as sub:
        for i in range(1, 21):
            a[:] = i
            bus.publish(topic, a)
        a[:] = 255
        got = collect(sub, 20, timeout=30)
    assert [int(f.array[0, 0, 0]) for f in got] == list(range(1, 21))
    assert all(bool((f.array == f.array[0, 0, 0]).all()) for f in got)


def test_a_fragmented_array_changed_right_after_publish_returns_arrives_as_it_was(nats_opts: Any) -> None:
    """Fragments too are written as views of the caller's array, and the copy kept for queue
    members' pulls is made before publish returns: a reused buffer arrives as it was published,
    to a broadcast subscriber and to a member that pulls the frame."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.zeros((700, 800, 3), np.uint8)               # 1.7 MB: two fragments at 1 MB
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus, \
            sub_bus.subscribe(topic) as everyone, sub_bus.subscribe(topic, group_id="g") as member:
        for i in range(1, 13):
            a[:] = i
            pub.publish(topic, a)
        a[:] = 255
        got = collect(everyone, 12, timeout=60)
        pulled = _until_quiet(member)
        rejected = everyone.stats()["rejected"] + member.stats()["rejected"]
    assert [int(f.array[0, 0, 0]) for f in got] == list(range(1, 13))
    for f in got + pulled:
        assert bool((f.array == f.seq).all()), f.seq
    assert pulled, "the group member got no frame at all"
    assert rejected == 0 and pub.stats()["lost"] == 0


def test_fragment_buffers_are_reused_without_mixing_frames(nats_opts: Any) -> None:
    """Fragments are copied for queue members' pulls into buffers of the transport's own, reused
    once a frame is out of the pull cache: 30 back-to-back frames of different content all arrive
    intact, to a broadcast subscriber and (pulled from the publisher) to a queue group's member."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    base = np.random.default_rng(3).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus, \
            sub_bus.subscribe(topic) as everyone, sub_bus.subscribe(topic, group_id="g") as member:
        for i in range(30):
            pub.publish(topic, base + np.uint8(i))
        got = collect(everyone, 30, timeout=60)
        pulled = _until_quiet(member)
    assert [f.seq for f in got] == list(range(1, 31))
    for f in got + pulled:
        assert np.array_equal(f.array, base + np.uint8(f.seq - 1)), f.seq
    assert pulled, "the group member got no frame at all"


def test_frames_of_different_sizes_take_turns_with_the_fragment_buffers(nats_opts: Any) -> None:
    """Reused fragment buffers of one size must not be offered to, or compared with, a frame of
    another (two sensors on one Bus: 1080p images and a larger lidar sweep)."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(4)
    cam = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    cloud = rng.integers(0, 256, 6_291_456, dtype=np.uint8)
    # a queue member: the publisher keeps copies (in its buffers) only while a group listens
    with msight_fast.connect("nats", **nats_opts) as bus, bus.subscribe(topic) as sub, \
            bus.subscribe(topic, group_id="g") as member:
        for _ in range(12):
            bus.publish(topic, cam)
            bus.publish(topic, cloud)
        got = collect(sub, 24, timeout=60)
        pulled = _until_quiet(member)
    for i, f in enumerate(got):
        assert np.array_equal(f.array, cam if i % 2 == 0 else cloud), i
    assert pulled, "the group member got no frame at all"
    for f in pulled:
        assert np.array_equal(f.array, cam if f.seq % 2 == 1 else cloud), f.seq


def _publish_until(bus: Any, topic: str, a: np.ndarray, cond: Any, what: str) -> int:
    """Publish ``a`` every 20 ms until ``cond()``; how many were published."""
    n = 0

    def step() -> bool:
        nonlocal n
        bus.publish(topic, a)
        n += 1
        return bool(cond())
    wait_for(step, what, timeout=30)
    return n


def _cached(t: Any, topic: str) -> List[Any]:
    """The frames of ``topic`` the publisher keeps for queue members' pulls."""
    with t._lock:
        return [k for k, v in t._rest.items() if v[0] == topic]


def test_with_no_queue_group_a_fragmented_frame_is_neither_kept_nor_announced(
        nats_opts: Any, monkeypatch: Any) -> None:
    """The copy for pulls (a whole frame's worth) and the announcement are for queue groups: with
    none listening, once the server has said so, a publisher makes neither, lets go of what it
    kept, and broadcast subscribers still get every frame whole."""
    from msight_fast.backends import nats as nats_backend
    monkeypatch.setattr(nats_backend, "GROUP_PROBE_S", 1e6)     # the first answer holds all along
    copies = []
    real = nats_backend.NatsTransport._keep_for_pulls

    def counted(self: Any, *args: Any) -> Any:
        copies.append(1)
        return real(self, *args)
    monkeypatch.setattr(nats_backend.NatsTransport, "_keep_for_pulls", counted)
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(6).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus, \
            sub_bus.subscribe(topic) as everyone:
        t = pub._t
        held: List[str] = []
        monkeypatch.setattr(t, "_ask_groups", held.append)     # the first question waits here
        pub.publish(topic, a)
        assert held == [topic]                     # asked once, and no answer has come
        assert copies == [1]                       # before any answer, a group is assumed to listen
        monkeypatch.delattr(t, "_ask_groups")
        t._L.loop.call_soon_threadsafe(t._ask_groups, topic)    # now the question goes out
        n = 1 + _publish_until(pub, topic, a, lambda: t._groups.get(topic, (0, True))[1] is False,
                               "the server to answer that no queue group listens")
        assert _cached(t, topic) == []             # let go: nobody is there to pull them
        made = len(copies)
        for _ in range(5):
            pub.publish(topic, a)
        assert len(copies) == made                 # no copy made: no announcement could be answered
        assert _cached(t, topic) == []
        got = collect(everyone, n + 5, timeout=60)
    assert [f.seq for f in got] == list(range(1, n + 6))
    assert all(np.array_equal(f.array, a) for f in got)
    assert pub.stats()["lost"] == 0


def _told_no_group(pub: Any, topic: str, a: np.ndarray) -> Any:
    """Publish ``a`` until the server has answered ``pub`` that no queue group listens on ``topic``;
    the publisher's transport."""
    t = pub._t
    _publish_until(pub, topic, a, lambda: t._groups.get(topic, (0, True))[1] is False,
                   "the server to answer that no queue group listens")
    return t


def _first_frame_while_publishing(pub: Any, member: Any, topic: str, a: np.ndarray) -> Any:
    """Publish ``a`` every 20 ms until ``member`` receives a frame; that frame."""
    got: List[Any] = []
    _publish_until(pub, topic, a, lambda: got.append(member.recv(0.05)) or got[-1] is not None,
                   "the late member's first frame")
    return got[-1]


def test_a_member_that_joins_later_is_announced_frames_again(nats_opts: Any) -> None:
    """After the server said no queue group listens, a member that joins starts getting frames once
    the publisher asks again (about a second), intact."""
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(7).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus:
        t = _told_no_group(pub, topic, a)
        with sub_bus.subscribe(topic, group_id="late") as member:
            assert np.array_equal(_first_frame_while_publishing(pub, member, topic, a).array, a)
            # and the server's next answer names the member's group
            _publish_until(pub, topic, a, lambda: t._groups[topic][1] is True, "an answer that a group listens")


def test_a_member_that_joins_after_a_no_says_hello_and_gets_the_next_frame(nats_opts: Any, monkeypatch: Any) -> None:
    """A member says hello as it joins: a publisher told "no group" announces its very next frame,
    without waiting for that answer to expire (here it would hold all along)."""
    from msight_fast.backends import nats as nats_backend
    monkeypatch.setattr(nats_backend, "GROUP_PROBE_S", 1e6)
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(9).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus:
        t = _told_no_group(pub, topic, a)
        with sub_bus.subscribe(topic, group_id="late") as member:
            wait_for(lambda: t._groups[topic][1] is True, "the member's hello to reach the publisher", timeout=10)
            sent = pub.publish(topic, a)
            got = member.recv(30)
        assert got is not None and got.seq == sent.seq and np.array_equal(got.array, a)


def test_a_hello_that_comes_while_a_probe_waits_outweighs_its_no(nats_opts: Any) -> None:
    """The server's "no" may be given before a member joined and reach the publisher after the
    member's hello: the hello wins. (The client's request is replaced to fix that order.)"""
    import types

    from msight_fast.backends import nats as nats_backend
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(11).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub:
        t = _told_no_group(pub, topic, a)

        async def request(subject: str, payload: bytes, timeout: float) -> Any:
            await t._on_hello(types.SimpleNamespace(subject=nats_backend.HELLO_PREFIX + topic, data=b""))
            raise nats.errors.NoRespondersError
        t.nc.request = request
        t._L.run(t._probe_groups(topic), 10)
        assert t._groups[topic][1] is True


def test_a_member_that_reconnects_after_a_no_says_hello_again(nats_opts: Any, monkeypatch: Any) -> None:
    """A member whose connection is cut while the publisher hears "no group" says hello once
    nats-py has subscribed it again, and gets the publisher's next frame."""
    from msight_fast.backends import nats as nats_backend

    from ..faultproxy import FaultProxy
    monkeypatch.setattr(nats_backend, "GROUP_PROBE_S", 1e6)
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(10).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    host, port = nats_opts["servers"][0].rsplit("/", 1)[1].split(":")
    with FaultProxy((host, int(port))) as proxy, msight_fast.connect("nats", **nats_opts) as pub, \
            msight_fast.connect("nats", servers=[f"nats://{proxy.host}:{proxy.port}"]) as sub_bus, \
            sub_bus.subscribe(topic, group_id="back") as member:
        t = pub._t
        pub.publish(topic, a)
        wait_for(lambda: t._groups.get(topic, (0, False))[1] is True, "an answer that a group listens", timeout=10)
        assert member.recv(30) is not None
        proxy.refuse()                             # the member stays away until accept() below
        proxy.cut()                                # its connection, and its subscriptions with it

        def told_no() -> bool:
            # until the server has dropped the member's subscriptions its answer is "yes": expire
            # each such answer, so that the next frame asks again
            with t._lock:
                if t._groups[topic][1]:
                    t._groups[topic] = (0.0, True)
                    return False
            return True
        _publish_until(pub, topic, a, told_no, "the server to answer that no queue group listens")
        proxy.accept()
        wait_for(lambda: t._groups[topic][1] is True, "the reconnected member's hello", timeout=30)
        sent = pub.publish(topic, a)
        got = None
        deadline = time.monotonic() + 30
        while (got is None or got.seq != sent.seq) and time.monotonic() < deadline:
            got = member.recv(1)
        assert got is not None and got.seq == sent.seq and np.array_equal(got.array, a)


def test_hellos_refused_by_permissions_leave_the_answers_life_as_the_bound(own_broker: Any, tmp_path: Any) -> None:
    """A publisher that may not subscribe to the hello subject, and a member that may not publish
    on it: nothing fails, neither refusal is taken for a login failure (the topic's name says
    "authorization"), and a member that joins after a "no" gets frames once the answer expires."""
    conf = tmp_path / "permissions.conf"
    conf.write_text("authorization { users = [\n"
                    '  {user: pub, password: pw, permissions: {subscribe: {deny: ["_MSF.hello.>"]}}}\n'
                    '  {user: sub, password: pw, permissions: {publish: {deny: ["_MSF.hello.>"]}}}\n] }\n')
    b = own_broker("nats", extra_args=["-c", str(conf)])
    servers = [f"nats://127.0.0.1:{b.port}"]
    topic = f"authorization/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(12).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", servers=servers, username="pub", password="pw") as pub, \
            msight_fast.connect("nats", servers=servers, username="sub", password="pw") as sub_bus:
        t = _told_no_group(pub, topic, a)
        with sub_bus.subscribe(topic, group_id="late") as member:
            first = _first_frame_while_publishing(pub, member, topic, a)
        assert np.array_equal(first.array, a)
        assert not t._hello                        # no hello was heard: the permissions held
        assert not t._auth_failed and not sub_bus._t._auth_failed
        assert pub.stats()["publish_errors"] == 0 and pub.stats()["lost"] == 0


def test_a_slow_publishers_next_frame_after_the_answer_expired_reaches_a_new_member(
        nats_opts: Any, monkeypatch: Any) -> None:
    """A publisher that sends a frame now and then: an answer of "no group" older than its life
    and its grace counts for nothing, so the first frame after a member joined is announced, not
    only the one after the publisher asked again. No hello is heard here, as where permissions
    keep it out."""
    from msight_fast.backends import nats as nats_backend

    async def deaf(self: Any, msg: Any) -> None:
        return None
    monkeypatch.setattr(nats_backend.NatsTransport, "_on_hello", deaf)
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(8).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub, msight_fast.connect("nats", **nats_opts) as sub_bus:
        t = _told_no_group(pub, topic, a)
        with sub_bus.subscribe(topic, group_id="late") as member:
            wait_for(lambda: time.monotonic() >= t._groups[topic][0] + nats_backend.GROUP_STALE_S,
                     "the answer and its grace to expire")
            assert t._groups[topic][1] is False and not t._hello    # no hello was heard
            pub.publish(topic, a)
            got = member.recv(30)
        assert got is not None and np.array_equal(got.array, a)


def test_an_answer_just_expired_holds_while_the_server_is_asked_again(nats_opts: Any, monkeypatch: Any) -> None:
    """Once an answer of "no group" expires, the frames published while the server is asked again
    are neither copied nor announced, for GROUP_STALE_S at most: sensors that share a rate would
    otherwise each copy a frame for nothing in one burst, once a second. Past that, with no answer,
    a group is assumed."""
    from msight_fast.backends import nats as nats_backend
    topic = f"interop/{uuid.uuid4().hex[:8]}"
    a = np.random.default_rng(13).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    with msight_fast.connect("nats", **nats_opts) as pub:
        t = _told_no_group(pub, topic, a)
        asked: List[str] = []
        monkeypatch.setattr(t, "_ask_groups", asked.append)     # the question goes out, and no answer comes
        with t._lock:
            t._groups[topic] = (time.monotonic() - 0.01, False)
        monkeypatch.setattr(nats_backend, "GROUP_STALE_S", 1e6)    # within the grace, however slow this machine
        assert t._groups_listen(topic) is False
        wait_for(lambda: asked == [topic], "the server to be asked again")
        monkeypatch.setattr(nats_backend, "GROUP_STALE_S", 0.0)    # past it
        assert t._groups_listen(topic) is True
        assert asked == [topic]                                  # one question out at a time
