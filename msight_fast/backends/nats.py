"""NATS backend through nats-py: broadcast, or a load-balanced queue group with ``group_id``.

One private event-loop thread per Bus runs nats-py. Publishing does not make one cross-thread
round trip per message: the caller appends to a bounded hand-off queue and wakes the loop only
when it is idle, and the loop drains the queue in batches. Frames above the server's
``max_payload`` (read from its INFO at connect) are split with ``codec.fragment`` and put back
together by the subscriber's ``Reassembler``; frames that fit go whole.

Each subscription's messages wait in a queue bounded in bytes (``max_pending_bytes``) with a
drop policy (``drop_oldest`` / ``keep_latest``); drops are counted in ``stats()``.

Queue groups and fragments: NATS load-balances each message independently, so the fragments of
one frame would reach different members. A fragmented frame on a queue group therefore goes as
its first fragment only, carrying a reply subject of the publisher; the member that gets it
asks the publisher (a request to that subject, naming its own inbox) for the rest, which the
publisher sends to that inbox alone. Cost: one extra request message and one round trip of
latency per fragmented frame; the publisher keeps recent fragmented frames (bounded) to answer.
Subscribers without a group get every fragment pushed on the subject and never ask.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import nats.aio.client as _nats_client
import nats.aio.transport as _nats_transport
from nats import errors as nats_errors

from .. import _schema as S
from ..codec import fragment_key
from ..errors import AuthError, BackendUnavailable, PublishError
from .base import BoundedQueue, Capabilities, Outgoing, Source, Transport

log = logging.getLogger("msight_fast")

HANDOFF_MAX_BYTES = 8 << 20           # publisher hand-off bound: publish() blocks beyond it, so
                                      # queueing latency stays ~tens of ms at a few hundred MB/s
PULL_PREFIX = "_MSF.pull."            # + publisher id: where queue members ask for the rest
GROUP_PREFIX = "_MSF.q."              # + topic: first fragments of frames for queue groups
REST_CACHE = 16                       # fragmented frames a publisher keeps for pulls
READ_CHUNK = 4 << 20                  # socket read size of our nats-py connections, see below


class _Client(_nats_client.Client):
    """nats-py's client with larger socket reads, for this library's connections only.

    nats-py reads its socket 32 KB at a time (its module constant DEFAULT_BUFFER_SIZE) and its
    StreamReader stops reading once 64 KB is buffered: a 6 MB frame then costs ~200 event-loop
    turns, and the subscriber falls behind a raw-frame publisher until the server drops it as a
    slow consumer. Measured (transport benchmark, NATS 1080p, default server): 37 -> 70 frames/s
    delivered with 4 MB reads. The read loop below is nats-py's own with the larger read; it
    falls back to nats-py's if the client's internals are not what it expects.
    """

    async def _read_loop(self) -> None:
        if not isinstance(getattr(self, "_transport", None), _nats_transport.TcpTransport) \
                or not hasattr(self, "_ps"):
            return await super()._read_loop()
        while True:
            try:
                t = self._transport
                if self.is_closed or self.is_reconnecting or t is None:
                    break
                reader = getattr(t, "_io_reader", None)       # a new one after reconnect or TLS
                if getattr(reader, "_limit", READ_CHUNK) < READ_CHUNK:
                    reader._limit = READ_CHUNK
                if t.at_eof():
                    err = nats_errors.UnexpectedEOF()
                    await self._error_cb(err)
                    await self._process_op_err(err)
                    break
                b = await t.read(READ_CHUNK)
                await self._ps.parse(b)
            except nats_errors.ProtocolError:
                await self._process_op_err(nats_errors.ProtocolError())
                break
            except OSError as e:
                await self._process_op_err(e)
                break
            except asyncio.CancelledError:
                break
            except Exception as ex:  # noqa: BLE001 - as nats-py: log, end the loop
                log.error("msight_fast: NATS read loop failed", exc_info=ex)
                break


class _Loop:
    """A private asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="msight_fast-nats", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def _auth_error(e: BaseException) -> bool:
    text = str(e).lower()
    return "authorization" in text or "authentication" in text or isinstance(e, nats_errors.AuthorizationError)


async def _connect(cfg: Any, **cbs: Any) -> Any:
    opts: Dict[str, Any] = dict(servers=cfg.servers, connect_timeout=cfg.connect_timeout_s,
                                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, **cbs)
    if cfg.username:
        opts["user"], opts["password"] = cfg.username, cfg.password
    if cfg.token:
        opts["token"] = cfg.token
    if cfg.nkey_seed:
        opts["nkeys_seed_str"] = cfg.nkey_seed
    if cfg.user_jwt:
        opts["user_jwt_cb"] = lambda: cfg.user_jwt.encode()
        if cfg.nkey_seed:
            opts["signature_cb"] = None
    if cfg.user_credentials:
        opts["user_credentials"] = cfg.user_credentials
    if cfg.use_tls or cfg.tls_ca_cert_file or cfg.tls_cert_file:
        import ssl
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_cert_file)
        if cfg.tls_cert_file:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        opts["tls"] = ctx
    # nats-py retries an unreachable server without end at first connect: bound it ourselves
    nc = _Client()
    await asyncio.wait_for(nc.connect(**opts), cfg.connect_timeout_s)
    return nc


class NatsTransport(Transport):
    name = "nats"
    CAPABILITIES = Capabilities(delivery="best_effort", groups="queue", persistence=False, max_message=1 << 20)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._L = _Loop()
        self._errors: List[str] = []
        self._auth_failed = False
        self._closing = False
        self.disconnects = 0
        self.reconnects = 0

        async def error_cb(e: Exception) -> None:
            if _auth_error(e):
                self._auth_failed = True
            self._errors.append(str(e))
            if len(self._errors) > 100:
                del self._errors[:50]

        async def disconnected_cb() -> None:
            self.disconnects += 1
            if self.disconnects == 1 and not self._closing:
                # nats-py reconnects silently; what was in flight meanwhile is lost, so say why
                log.warning("msight_fast: NATS connection lost; reconnecting. The server drops a client that "
                            "falls behind as a slow consumer once its pending data passes the server's "
                            "'max_pending' (64 MB by default): frames lost meanwhile are counted as gaps. "
                            "Raise max_pending on the server for raw-frame topics, or subscribe with fewer "
                            "topics per Bus.")

        async def reconnected_cb() -> None:
            self.reconnects += 1

        self._cbs = dict(error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb)
        try:
            self.nc = self._L.run(_connect(cfg, **self._cbs), cfg.connect_timeout_s + 2)
        except BaseException as e:
            self._L.stop()
            where = ", ".join(cfg.servers)
            if _auth_error(e) or self._auth_failed:
                raise AuthError(f"NATS at {where} refused the credentials: {e}") from None
            raise BackendUnavailable(f"NATS at {where} is unreachable within {cfg.connect_timeout_s} s: "
                                     f"{e!r}") from None
        server_max = self.nc.max_payload
        self.max_payload = min(server_max, cfg.max_payload) if cfg.max_payload else server_max
        self.capabilities = Capabilities(delivery="best_effort", groups="queue", persistence=False,
                                         max_message=self.max_payload)
        self._q: Deque[Tuple[str, Any, Optional[str]]] = collections.deque()
        self._q_bytes = 0
        self._cv = threading.Condition()
        self._scheduled = False
        self._failures: List[Tuple[str, str]] = []
        self._rest: "collections.OrderedDict[Tuple[int, int], Tuple[str, list]]" = collections.OrderedDict()
        self._pull_sub = None
        self._pull_subject = None
        self._lock = threading.Lock()

    # -- publish
    def send(self, msg: Outgoing, deadline: float) -> None:
        topic, nbytes = msg.topic, msg.nbytes
        frags = msg.fragments
        if frags is None:
            self._enqueue([(topic, msg.joined(), None)], nbytes)
            return
        if self._pull_subject is None:
            self._start_pull_service(msg.publisher_id)
        key = (msg.publisher_id, msg.frame_id)
        with self._lock:
            self._rest[key] = (topic, frags[1:])
            while len(self._rest) > REST_CACHE:
                self._rest.popitem(last=False)
        items = [(topic, f, None) for f in frags]                      # broadcast subscribers
        items.append((GROUP_PREFIX + topic, frags[0], self._pull_subject))  # queue groups pull the rest
        self._enqueue(items, nbytes + len(frags[0]))

    def _enqueue(self, items: list, nbytes: int) -> None:
        with self._cv:
            while self._q_bytes > HANDOFF_MAX_BYTES and self._q:      # backpressure, bounded memory
                self._cv.wait(0.1)
            self._q.extend(items)
            self._q_bytes += nbytes
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            self._L.loop.call_soon_threadsafe(self._L.loop.create_task, self._drain())

    async def _drain(self) -> None:
        nc = self.nc
        while True:
            with self._cv:
                if not self._q:
                    self._scheduled = False
                    self._q_bytes = 0
                    self._cv.notify_all()
                    return
                batch = list(self._q)
                self._q.clear()
                self._q_bytes = 0
                self._cv.notify_all()
            for subject, data, reply in batch:
                try:
                    await nc.publish(subject, data, reply=reply or "")
                except Exception as e:  # noqa: BLE001 - every failure is reported by flush()
                    self._failures.append((subject, repr(e)))

    def _start_pull_service(self, publisher_id: int) -> None:
        subject = f"{PULL_PREFIX}{publisher_id:016x}"

        async def serve(msg: Any) -> None:
            # request body: the first fragment's header; reply subject: the member's inbox
            if len(msg.data) < S.FRAG_HEADER_LEN:
                return
            with self._lock:
                entry = self._rest.get(fragment_key(msg.data))
            if entry is None or not msg.reply:
                return
            for f in entry[1]:
                await self.nc.publish(msg.reply, f)

        async def sub() -> Any:
            return await self.nc.subscribe(subject, cb=serve)

        self._pull_sub = self._L.run(sub(), self.cfg.connect_timeout_s)
        self._pull_subject = subject

    def flush(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            ok = self._cv.wait_for(lambda: not self._q and not self._scheduled, timeout)
        if not ok:
            raise PublishError(f"{len(self._q)} messages still queued after {timeout} s", [("?", "timeout")])
        left = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            self._L.run(self.nc.flush(timeout=left or 60), None if left is None else left + 1)
        except Exception as e:  # noqa: BLE001
            raise PublishError(f"NATS flush failed: {e!r}", [("?", repr(e))]) from None
        if self._failures:
            failures, self._failures = self._failures, []
            raise PublishError(f"{len(failures)} publishes failed: {failures[0][1]}", failures)

    # -- subscribe
    def open(self, topic: str, group_id: Optional[str], from_beginning: bool) -> Source:
        return NatsSource(self, topic, group_id)

    def close(self) -> None:
        self._closing = True
        try:
            self.flush(5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self._L.run(self.nc.close(), 5)
        except Exception:  # noqa: BLE001
            pass
        self._L.stop()


class NatsSource(Source):
    def __init__(self, t: NatsTransport, topic: str, group_id: Optional[str]) -> None:
        self.t = t
        self.q = BoundedQueue(t.cfg.max_pending_bytes, t.cfg.drop_policy)
        self._subs: list = []
        cfg = t.cfg
        limit = dict(pending_msgs_limit=1_000_000, pending_bytes_limit=2 * cfg.max_pending_bytes)
        q = self.q

        async def on_msg(msg: Any) -> None:
            q.put(msg.data, len(msg.data))

        async def on_first(msg: Any) -> None:
            data = msg.data
            if data[:4] == S.FRAG_MAGIC and msg.reply:
                # a queue member got the first fragment of a frame: ask its publisher for the rest
                q.put(data, len(data))
                await t.nc.publish(msg.reply, data[:S.FRAG_HEADER_LEN], reply=self.inbox)
            else:
                q.put(data, len(data))

        async def setup() -> None:
            if group_id:
                self.inbox = t.nc.new_inbox()
                self._subs.append(await t.nc.subscribe(self.inbox, cb=on_msg, **limit))
                self._subs.append(await t.nc.subscribe(topic, queue=group_id, cb=self._whole_only(on_msg), **limit))
                self._subs.append(await t.nc.subscribe(GROUP_PREFIX + topic, queue=group_id, cb=on_first, **limit))
            else:
                self._subs.append(await t.nc.subscribe(topic, cb=on_msg, **limit))
            await t.nc.flush()          # the server has the interest before subscribe() returns

        t._L.run(setup(), cfg.connect_timeout_s + 2)

    @staticmethod
    def _whole_only(cb: Any) -> Any:
        async def whole(msg: Any) -> None:
            if msg.data[:4] != S.FRAG_MAGIC:     # fragments on the plain subject are for broadcast
                await cb(msg)
        return whole

    def next(self, timeout: Optional[float]) -> Optional[Tuple[Any, Any]]:
        got = self.q.get(timeout)
        return None if got is None else (got[0], None)

    def stats(self) -> dict:
        return {"dropped": self.q.dropped, "pending_bytes": self.q.nbytes,
                "reconnects": self.t.reconnects, "disconnects": self.t.disconnects}

    def close(self) -> None:
        self.q.close()

        async def unsub() -> None:
            for s in self._subs:
                try:
                    await s.unsubscribe()
                except Exception:  # noqa: BLE001
                    pass
        try:
            self.t._L.run(unsub(), 5)
        except Exception:  # noqa: BLE001
            pass
