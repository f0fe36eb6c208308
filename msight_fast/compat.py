"""Drop-in replacements for MSight Core's pub/sub classes: change one import, keep the node.

    # from msight_core.pubsub import RedisPubSub, NATSPubSub, KafkaPubSub
    from msight_fast.compat import RedisPubSub, NATSPubSub, KafkaPubSub

Same constructor arguments (``RedisPubSub(redis_client)``, ``NATSPubSub(get_nats_config(group))``,
``KafkaPubSub(get_kafka_config(group))``), same ``subscribe(topic)``, ``publish(topic,
serialized_data)`` and ``listen()``, on a msight_fast ``Bus`` underneath: no thread per publish,
no flush per Kafka message, reconnection after broker restarts, TLS/SASL settings applied.
``publish`` is safe from any number of threads at once, including a new thread per message as
MSight Core's ``Node.publish`` makes.

Two wire modes:
- plain (the default): the caller's bytes go out untouched, exactly as MSight Core sends them,
  so MSight Core subscribers read them. Payloads above a broker's limit (NATS ``max_payload``,
  Kafka's message size) raise ``FrameTooLarge``, as they fail in MSight Core.
- framed (``framed=True``, or ``MSIGHT_FAST_COMPAT_FRAMED=1``): each payload is wrapped in a
  msight_fast frame, so large payloads are fragmented and subscribers count gaps and latency.
  Only msight_fast subscribers (compat or not) read framed payloads.

``listen()`` accepts both: a framed message yields its payload, anything else its bytes as they
came, so a deployment that mixes MSight Core's classes and these keeps working.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

from . import config as _config
from . import registry
from .bus import Bus, _connect

__all__ = ["RedisPubSub", "NATSPubSub", "KafkaPubSub", "get_nats_config", "get_kafka_config"]


def _name(topic: Any) -> str:
    name = getattr(topic, "name", topic)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a topic is a str or an object with a .name str, not {topic!r}")
    return name


def _framed(arg: Optional[bool]) -> bool:
    if arg is not None:
        return bool(arg)
    return _config._bool("MSIGHT_FAST_COMPAT_FRAMED", os.environ.get("MSIGHT_FAST_COMPAT_FRAMED", ""))


class _Compat:
    BACKEND = "?"
    FROM_BEGINNING = False

    def __init__(self, options: Dict[str, Any], group: Optional[str], framed: Optional[bool]) -> None:
        self.framed = _framed(framed)
        self._group = group
        self._bus: Bus = _connect(self.BACKEND, options, None)
        self._sub: Any = None
        self.subscribed = False

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Publish the caller's bytes to ``topic`` (framed mode: wrapped in a frame)."""
        if self.framed:
            self._bus.publish(_name(topic), serialized_data, encoding="bytes")
        else:
            self._bus._send_bytes(_name(topic), serialized_data)

    def subscribe(self, topic: Any) -> None:
        """Subscribe to ``topic`` (an object with ``.name``, or a str)."""
        self._sub = self._bus.subscribe(_name(topic), group_id=self._group, from_beginning=self.FROM_BEGINNING)
        self._sub._passthrough = True
        self.subscribed = True

    def listen(self) -> Iterator[bytes]:
        """Yield each message's bytes, as published; ends after ``close()``."""
        if not self.subscribed:
            raise RuntimeError("Must call subscribe(topic) before listen()")
        for f in self._sub:
            yield bytes(f.data)

    def stats(self) -> Dict[str, Any]:
        """The Bus's publisher counters, and the subscription's (framed messages: gaps, latency)."""
        out = {"publisher": self._bus.stats()}
        if self._sub is not None:
            out["subscription"] = self._sub.stats()
        return out

    def flush(self, timeout: Optional[float] = None) -> None:
        self._bus.flush(timeout)

    def close(self) -> None:
        self._bus.close()


class RedisPubSub(_Compat):
    """``RedisPubSub(redis_client)``: connection settings are taken from the redis-py client
    (host, port, db, username, password, unix socket, TLS); with ``None``, from the
    ``MSIGHT_REDIS_MESSAGE_BROKER_*`` variables."""

    BACKEND = "redis"

    def __init__(self, redis_client: Any = None, framed: Optional[bool] = None) -> None:
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
        super().__init__(opts, None, framed)


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

    BACKEND = "nats"

    def __init__(self, config: Optional[Dict[str, Any]] = None, framed: Optional[bool] = None) -> None:
        config = get_nats_config(None) if config is None else config
        super().__init__(_nats_options(config), config.get("group_id"), framed)


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
    """``KafkaPubSub(config)`` with the dict of :func:`get_kafka_config`; the group is its
    ``group_id``. A group new to the topic starts at the earliest offset, as MSight Core's does."""

    BACKEND = "kafka"
    FROM_BEGINNING = True

    def __init__(self, config: Optional[Dict[str, Any]] = None, framed: Optional[bool] = None) -> None:
        config = get_kafka_config(None) if config is None else config
        super().__init__(_kafka_options(config), config.get("group_id"), framed)


def get_nats_config(group_id: Optional[str]) -> Dict[str, Any]:
    """MSight Core's NATS config dict, from the same ``MSIGHT_NATS_*`` variables (validated)."""
    c = registry.load_config("nats", {})
    out: Dict[str, Any] = {"servers": c.servers}
    if group_id is not None:
        out["group_id"] = group_id
    for ours, theirs in (("username", "user"), ("password", "password"), ("token", "token"),
                         ("nkey_seed", "nkeys_seed"), ("user_jwt", "user_jwt"),
                         ("user_credentials", "user_credentials")):
        if getattr(c, ours):
            out[theirs] = getattr(c, ours)
    if c.use_tls:
        out["tls"] = True
        for ours, theirs in (("tls_ca_cert_file", "tls_ca_cert"), ("tls_cert_file", "tls_cert"),
                             ("tls_key_file", "tls_key")):
            if getattr(c, ours):
                out[theirs] = getattr(c, ours)
    return out


def get_kafka_config(group_id: Optional[str]) -> Dict[str, Any]:
    """MSight Core's Kafka config dict, from the same ``MSIGHT_KAFKA_*`` variables (validated)."""
    c = registry.load_config("kafka", {})
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
        for ours, theirs in (("tls_ca_cert_file", "ssl_cafile"), ("tls_cert_file", "ssl_certfile"),
                             ("tls_key_file", "ssl_keyfile")):
            if getattr(c, ours):
                out[theirs] = getattr(c, ours)
    return out
