"""A minimal Foxglove WebSocket protocol client, for tests of ``msight_fast.view``.

What the Foxglove app does on a live connection, and no more: open the WebSocket with the
protocol's subprotocol, read ``serverInfo`` and the ``advertise`` messages, ``subscribe`` to
channels by id, and receive binary MessageData frames (opcode 0x01, subscription id u32 LE, log
time u64 LE, then the message). Protobuf messages are decoded with google.protobuf from the
schema the channel advertises (a FileDescriptorSet, base64); JSON ones with json.
"""
from __future__ import annotations

import base64
import collections
import json
import socket
import struct
import time
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlparse

# the SDK's own subprotocol first, then the one of the published protocol spec
SUBPROTOCOLS = ["foxglove.sdk.v1", "foxglove.websocket.v1"]
OP_MESSAGE_DATA = 0x01


class FoxgloveClient:
    """One connection. Use as a context manager, or call ``close``.

    ``max_queue``: frames the websockets library buffers before it stops reading the socket (a
    client that never calls ``recv`` then leaves the server's queue for it to fill up; its ``close``
    then waits ``close_timeout`` for a closing handshake it does not read).
    ``ping_interval``: seconds between the library's keepalive pings; None sends none. A client
    that stops reading cannot see the pong, so its own keepalive would close it after
    ``ping_interval`` plus the ping timeout: on a slow machine, in the middle of a test."""

    def __init__(self, url: str, timeout: float = 10.0, max_queue: Optional[int] = 16,
                 close_timeout: float = 10.0, ping_interval: Optional[float] = 20.0) -> None:
        from websockets.sync.client import connect
        from websockets.typing import Subprotocol
        u = urlparse(url)
        # a socket of our own: no proxy from the environment between the test and the server
        sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 8765), timeout=timeout)
        conn = connect(url, sock=sock, subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS], compression=None,
                       max_size=None, open_timeout=timeout, max_queue=max_queue, close_timeout=close_timeout,
                       ping_interval=ping_interval)
        # entered as a context manager: the form websockets 17 wants, and older versions take
        self.ws: Any = conn.__enter__()
        self.timeout = timeout
        self.subprotocol: Optional[str] = self.ws.subprotocol
        self.server_info: Dict[str, Any] = {}
        self.channels: Dict[int, Dict[str, Any]] = {}          # advertised, by channel id
        self.removed: List[int] = []
        self.other: List[Dict[str, Any]] = []                  # status and the like
        self._subs: Dict[int, int] = {}                        # subscription id -> channel id
        self._next_sub = 1
        self._messages: Dict[int, Deque[Tuple[int, bytes]]] = collections.defaultdict(collections.deque)
        self._decoders: Dict[int, Any] = {}
        self.pump_until(lambda: bool(self.server_info), "serverInfo")

    # ------------------------------------------------------------ receiving
    def pump(self, timeout: float) -> bool:
        """Read and file one server message; False when none came within ``timeout``."""
        try:
            m = self.ws.recv(timeout=max(0.0, timeout))
        except TimeoutError:
            return False
        if isinstance(m, str):
            d = json.loads(m)
            op = d.get("op")
            if op == "serverInfo":
                self.server_info = d
            elif op == "advertise":
                for ch in d["channels"]:
                    self.channels[ch["id"]] = ch
            elif op == "unadvertise":
                for cid in d["channelIds"]:
                    self.channels.pop(cid, None)
                    self.removed.append(cid)
            else:
                self.other.append(d)
        else:
            data = bytes(m)
            if data and data[0] == OP_MESSAGE_DATA:
                sub_id, log_time = struct.unpack_from("<IQ", data, 1)
                self._messages[sub_id].append((log_time, data[13:]))
        return True

    def pump_until(self, cond: Any, what: str, timeout: Optional[float] = None) -> None:
        """Read messages until ``cond()`` holds; AssertionError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"Foxglove client: no {what} within the timeout")
            self.pump(min(left, 0.5))

    def channel(self, topic: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The advertised channel of ``topic``, waited for."""
        self.pump_until(lambda: self._find(topic) is not None, f"advertisement of {topic!r}", timeout)
        ch = self._find(topic)
        assert ch is not None
        return ch

    def _find(self, topic: str) -> Optional[Dict[str, Any]]:
        return next((c for c in self.channels.values() if c["topic"] == topic), None)

    # ------------------------------------------------------------ subscriptions
    def subscribe(self, channel_ids: Iterable[int]) -> List[int]:
        """Subscribe to each channel; the subscription ids, in the same order."""
        subs = []
        for cid in channel_ids:
            sid = self._next_sub
            self._next_sub += 1
            self._subs[sid] = cid
            subs.append({"id": sid, "channelId": cid})
        self.ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))
        return [s["id"] for s in subs]

    def unsubscribe(self, sub_ids: Iterable[int]) -> None:
        ids = list(sub_ids)
        for sid in ids:
            self._subs.pop(sid, None)
        self.ws.send(json.dumps({"op": "unsubscribe", "subscriptionIds": ids}))

    def next_message(self, sub_id: int, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        """(log time ns, message bytes): the oldest message of the subscription not yet taken."""
        q = self._messages[sub_id]
        self.pump_until(lambda: bool(q), f"message on subscription {sub_id}", timeout)
        return q.popleft()

    def decode(self, sub_id: int, data: bytes) -> Any:
        """The message as its advertised schema describes it: a protobuf message or parsed JSON."""
        ch = self.channels[self._subs[sub_id]]
        if ch["encoding"] == "json":
            return json.loads(data)
        if ch["encoding"] != "protobuf":
            raise ValueError(f"cannot decode encoding {ch['encoding']!r}")
        cls = self._decoders.get(ch["id"])
        if cls is None:
            cls = self._decoders[ch["id"]] = message_class(ch["schemaName"], base64.b64decode(ch["schema"]))
        return cls.FromString(data)

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> FoxgloveClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def message_class(name: str, descriptor_set: bytes) -> Any:
    """The protobuf message class ``name`` from a serialized FileDescriptorSet."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:          # dependencies come first in a FileDescriptorSet the SDK writes
        pool.Add(f)
    desc = pool.FindMessageTypeByName(name)
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)     # protobuf < 4.22
