"""Drop-in replacements for MSight Core's pub/sub classes: change one import, keep the node.

    # from msight_core.pubsub import RedisPubSub, NATSPubSub, KafkaPubSub
    from msight_fast.compat import RedisPubSub, NATSPubSub, KafkaPubSub

Same constructor arguments (``RedisPubSub(redis_client)``, ``NATSPubSub(get_nats_config(group))``,
``KafkaPubSub(get_kafka_config(group))``), same ``subscribe(topic)``, ``publish(topic,
serialized_data)`` and ``listen()``. Payloads are the caller's bytes, passed through untouched;
what changes is the transport underneath (no thread per publish, no flush per Kafka message,
no silent redis-py reconnects, TLS/SASL settings really applied).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

from . import config as _config

__all__ = ["RedisPubSub", "NATSPubSub", "KafkaPubSub", "get_nats_config", "get_kafka_config"]


def _name(topic: Any) -> str:
    name = getattr(topic, "name", topic)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a topic is a str or an object with a .name str, not {topic!r}")
    return name


class _Compat:
    _transport: Any

    def __init__(self) -> None:
        self._source: Any = None
        self.subscribed = False
        self._send_kw: Dict[str, Any] = {}

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Publish the caller's bytes, untouched, to ``topic``."""
        self._transport.send_raw(_name(topic), serialized_data, **self._send_kw)

    def subscribe(self, topic: Any) -> None:
        """Subscribe to ``topic`` (an object with ``.name``, or a str)."""
        self._source = self._transport.open(_name(topic), self._group, False)
        self.subscribed = True

    def listen(self) -> Iterator[bytes]:
        """Yield each message's bytes, as published."""
        if not self.subscribed:
            raise RuntimeError("Must call subscribe(topic) before listen()")
        while True:
            got = self._source.next(0.5)
            if got is None:
                continue
            data, token = got
            yield bytes(data)
            if token is not None:
                self._source.handed(None, [token])   # processed once the caller asks for the next

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
        self._transport.close()


class RedisPubSub(_Compat):
    """``RedisPubSub(redis_client)``: connection settings are taken from the redis-py client
    (host, port, db, username, password, unix socket, TLS); with ``None``, from the
    ``MSIGHT_REDIS_MESSAGE_BROKER_*`` variables."""

    def __init__(self, redis_client: Any = None) -> None:
        super().__init__()
        opts: Dict[str, Any] = {}
        kw = getattr(getattr(redis_client, "connection_pool", None), "connection_kwargs", None)
        if kw:
            for ours, theirs in (("host", "host"), ("port", "port"), ("db", "db"), ("username", "username"),
                                 ("password", "password"), ("unix_socket_path", "path"),
                                 ("tls_ca_cert_file", "ssl_ca_certs"), ("tls_cert_file", "ssl_certfile"),
                                 ("tls_key_file", "ssl_keyfile")):
                if kw.get(theirs) not in (None, ""):
                    opts[ours] = kw[theirs]
            conn_cls = getattr(redis_client.connection_pool, "connection_class", None)
            if "ssl_cert_reqs" in kw or getattr(conn_cls, "__name__", "") == "SSLConnection":
                opts["use_tls"] = True
        from .backends.redis import RedisTransport
        self._group = None
        self._transport = RedisTransport(_config.load("redis", opts))


def _nats_options(cfg: Dict[str, Any]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"servers": cfg.get("servers", ["nats://localhost:4222"])}
    for theirs, ours in (("user", "username"), ("password", "password"), ("token", "token"),
                         ("nkeys_seed", "nkey_seed"), ("user_jwt", "user_jwt"),
                         ("user_credentials", "user_credentials"), ("tls_cert", "tls_cert_file"),
                         ("tls_key", "tls_key_file"), ("tls_ca_cert", "tls_ca_cert_file")):
        if cfg.get(theirs):
            opts[ours] = cfg[theirs]
    if cfg.get("tls"):
        opts["use_tls"] = True
        ca = os.environ.get("MSIGHT_NATS_TLS_CA_CERT_FILE")
        if ca and "tls_ca_cert_file" not in opts:
            opts["tls_ca_cert_file"] = ca
    return opts


class NATSPubSub(_Compat):
    """``NATSPubSub(config)`` with the dict of :func:`get_nats_config`; ``group_id`` in it makes a queue group."""

    def __init__(self, config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        config = get_nats_config(None) if config is None else config
        from .backends.nats import NatsTransport
        self._group = config.get("group_id")
        self._transport = NatsTransport(_config.load("nats", _nats_options(config)))


def _kafka_options(cfg: Dict[str, Any]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"servers": cfg.get("servers", ["localhost:9092"])}
    for theirs, ours in (("sasl_mechanism", "sasl_mechanism"), ("sasl_plain_username", "sasl_username"),
                         ("sasl_plain_password", "sasl_password"), ("sasl_oauth_token", "sasl_oauth_token"),
                         ("ssl_cafile", "tls_ca_cert_file"), ("ssl_certfile", "tls_cert_file"),
                         ("ssl_keyfile", "tls_key_file")):
        if cfg.get(theirs):
            opts[ours] = cfg[theirs]
    if "ssl_verify" in cfg:
        opts["tls_verify"] = cfg["ssl_verify"]
    if "ssl_check_hostname" in cfg:
        opts["tls_check_hostname"] = cfg["ssl_check_hostname"]
    if str(cfg.get("security_protocol", "")).upper() in ("SSL", "SASL_SSL"):
        opts["use_tls"] = True
    return opts


class KafkaPubSub(_Compat):
    """``KafkaPubSub(config)`` with the dict of :func:`get_kafka_config`; the group is its ``group_id``."""

    def __init__(self, config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        config = get_kafka_config(None) if config is None else config
        from .backends.kafka import KafkaTransport
        self._group = config.get("group_id")
        self._transport = KafkaTransport(_config.load("kafka", _kafka_options(config)))
        # one key per publisher: its messages share a partition and stay in order, as they do
        # on the single-partition topics Kafka auto-creates for MSight Core
        self._send_kw = {"key": os.urandom(8)}

    def flush(self, timeout: Optional[float] = None) -> None:
        self._transport.flush(timeout)


def get_nats_config(group_id: Optional[str]) -> Dict[str, Any]:
    """MSight Core's NATS config dict, from the same ``MSIGHT_NATS_*`` variables (validated)."""
    c = _config.load("nats", {})
    out: Dict[str, Any] = {"servers": c.servers}
    if group_id is not None:
        out["group_id"] = group_id
    for ours, theirs in (("username", "user"), ("password", "password"), ("token", "token"),
                         ("nkey_seed", "nkeys_seed"), ("user_jwt", "user_jwt"), ("user_credentials", "user_credentials")):
        if getattr(c, ours):
            out[theirs] = getattr(c, ours)
    if c.use_tls:
        out["tls"] = True
        for ours, theirs in (("tls_ca_cert_file", "tls_ca_cert"), ("tls_cert_file", "tls_cert"), ("tls_key_file", "tls_key")):
            if getattr(c, ours):
                out[theirs] = getattr(c, ours)
    return out


def get_kafka_config(group_id: Optional[str]) -> Dict[str, Any]:
    """MSight Core's Kafka config dict, from the same ``MSIGHT_KAFKA_*`` variables (validated)."""
    c = _config.load("kafka", {})
    out: Dict[str, Any] = {"servers": c.servers, "group_id": group_id}
    if c.sasl_mechanism:
        out["sasl_mechanism"] = c.sasl_mechanism
        if c.sasl_mechanism == "OAUTHBEARER":
            out["sasl_oauth_token"] = c.sasl_oauth_token
        else:
            out["sasl_plain_username"], out["sasl_plain_password"] = c.sasl_username, c.sasl_password
    tls = c.use_tls or bool(c.tls_ca_cert_file)
    out["security_protocol"] = ("SASL_" if c.sasl_mechanism else "") + ("SSL" if tls else "PLAINTEXT")
    if tls:
        out.update(ssl_check_hostname=c.tls_check_hostname, ssl_verify=c.tls_verify)
        for ours, theirs in (("tls_ca_cert_file", "ssl_cafile"), ("tls_cert_file", "ssl_certfile"), ("tls_key_file", "ssl_keyfile")):
            if getattr(c, ours):
                out[theirs] = getattr(c, ours)
    return out
