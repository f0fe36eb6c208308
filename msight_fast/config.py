"""Configuration from MSight Core's environment variable names, overridable by keyword options.

Every value is validated here, once, with a ``ConfigError`` that names the variable (or option)
and shows a valid example. Credentials are kept out of ``repr`` and never logged.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional

from .errors import ConfigError

BACKENDS = ("redis", "nats", "kafka")
SECRET_KEYS = frozenset({"password", "token", "nkey_seed", "user_jwt", "sasl_password", "sasl_oauth_token"})


def backend_name(backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get("MSIGHT_PUBSUB_BACKEND", "redis")
    name = (name or "redis").strip().lower()
    if name not in BACKENDS:
        src = "backend argument" if backend is not None else "MSIGHT_PUBSUB_BACKEND"
        raise ConfigError(f"{src}={name!r} is not a backend; use one of {', '.join(BACKENDS)} "
                          f"(e.g. MSIGHT_PUBSUB_BACKEND=nats)")
    return name


def _bool(var: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={value!r} is not a boolean; use true or false (e.g. {var}=true)")


def _int(var: str, value: Any, lo: int, hi: int, example: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{var}={value!r} is not an integer (e.g. {var}={example})") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{var}={n} is out of range [{lo}, {hi}] (e.g. {var}={example})")
    return n


def _float(var: str, value: Any, example: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{var}={value!r} is not a number (e.g. {var}={example})") from None
    if not x > 0:
        raise ConfigError(f"{var}={x} must be positive (e.g. {var}={example})")
    return x


def _servers(var: str, value: Any, example: str) -> List[str]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if text.startswith(("[", "(", "{", "'", "\"")):
            try:
                items = ast.literal_eval(text)      # a Python list literal, never eval()
            except (ValueError, SyntaxError):
                raise ConfigError(f"{var}={value!r} is not a list literal (e.g. {var}=\"{example}\")") from None
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{var}={value!r} is not a list (e.g. {var}=\"{example}\")")
        else:
            items = [s for s in text.split(",")]
    items = [s.strip() if isinstance(s, str) else s for s in items]
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{var}={value!r} must be a non-empty list of server addresses (e.g. {var}=\"{example}\")")
    return items


def _file(var: str, value: Any) -> Optional[str]:
    if value in (None, ""):
        return None
    if not os.path.isfile(value):
        raise ConfigError(f"{var}={value!r}: no such file (e.g. {var}=/etc/msight/tls/ca.pem)")
    return str(value)


@dataclass(repr=False)
class _Base:
    connect_timeout_s: float = 5.0
    max_frame_bytes: int = 256 << 20
    max_pending_bytes: int = 256 << 20      # subscriber-side queue bound (NATS, Kafka)
    drop_policy: str = "drop_oldest"        # or "keep_latest"
    checksum: bool = False

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={'***' if f.name in SECRET_KEYS and getattr(self, f.name) else getattr(self, f.name)!r}"
                          for f in fields(self))
        return f"{type(self).__name__}({shown})"


@dataclass(repr=False)
class RedisConfig(_Base):
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    use_tls: bool = False
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_ca_cert_file: Optional[str] = None
    unix_socket_path: Optional[str] = None


@dataclass(repr=False)
class NatsConfig(_Base):
    servers: List[str] = field(default_factory=lambda: ["nats://localhost:4222"])
    username: Optional[str] = None
    password: Optional[str] = None
    token: Optional[str] = None
    nkey_seed: Optional[str] = None
    user_jwt: Optional[str] = None
    user_credentials: Optional[str] = None
    use_tls: bool = False
    tls_ca_cert_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    max_payload: Optional[int] = None       # default: what the server advertises


@dataclass(repr=False)
class KafkaConfig(_Base):
    servers: List[str] = field(default_factory=lambda: ["localhost:9092"])
    sasl_mechanism: Optional[str] = None
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = None
    sasl_oauth_token: Optional[str] = None
    use_tls: bool = False
    tls_ca_cert_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_verify: bool = True
    tls_check_hostname: bool = True
    max_message_bytes: Optional[int] = None  # frames above it are fragmented; None: the topic's
                                             # max.message.bytes as the broker reports it, else 1,000,000
    num_partitions: int = 4                 # for topics this library creates
    partition_key: str = "publisher"        # "publisher": in order per publisher; "frame": spread over partitions
    linger_ms: int = 5
    max_in_flight_bytes: int = 16 << 20     # producer queue bound: latency stays bounded
    producer_config: Dict[str, Any] = field(default_factory=dict)
    consumer_config: Dict[str, Any] = field(default_factory=dict)


_ENV = {
    "redis": ("MSIGHT_REDIS_MESSAGE_BROKER_", RedisConfig),
    "nats": ("MSIGHT_NATS_", NatsConfig),
    "kafka": ("MSIGHT_KAFKA_", KafkaConfig),
}
_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


def load(backend: str, options: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None):
    """Build the backend's config: defaults, then ``MSIGHT_*`` variables, then keyword options."""
    env = os.environ if environ is None else environ
    prefix, cls = _ENV[backend]
    names = {f.name for f in fields(cls)}
    unknown = set(options) - names
    if unknown:
        raise ConfigError(f"unknown option(s) for the {backend} backend: {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(names))}")
    raw: Dict[str, Any] = {}
    src: Dict[str, str] = {}
    for name in names:
        var = prefix + name.upper()
        if var in env and env[var] != "":
            raw[name], src[name] = env[var], var
    for name, value in options.items():
        raw[name], src[name] = value, name
    cfg = cls()
    for name, value in raw.items():
        var = src[name]
        default = getattr(cls(), name)
        if name in ("port",):
            value = _int(var, value, 1, 65535, "6379")
        elif name == "db":
            value = _int(var, value, 0, 1 << 20, "0")
        elif name in ("max_frame_bytes", "max_pending_bytes", "max_in_flight_bytes"):
            value = _int(var, value, 1024, 1 << 40, str(default))
        elif name == "max_message_bytes" or name == "max_payload":
            value = _int(var, value, 1024, 1 << 31, "1048576")
        elif name in ("num_partitions", "linger_ms"):
            value = _int(var, value, 0 if name == "linger_ms" else 1, 100_000, str(default))
        elif name == "connect_timeout_s":
            value = _float(var, value, "5")
        elif isinstance(default, bool):
            value = _bool(var, value)
        elif name == "servers":
            value = _servers(var, value, "['nats://localhost:4222']" if backend == "nats" else "['localhost:9092']")
        elif name.endswith("_file") or name == "user_credentials":
            value = _file(var, value)
        elif name == "sasl_mechanism":
            value = str(value).upper()
            if value not in _SASL:
                raise ConfigError(f"{var}={value!r} is not supported; use one of {', '.join(_SASL)} (e.g. {var}=SCRAM-SHA-512)")
        elif name == "partition_key":
            if value not in ("publisher", "frame"):
                raise ConfigError(f"{var}={value!r}: use publisher (ordered) or frame (balanced over partitions)")
        elif name == "drop_policy":
            if value not in ("drop_oldest", "keep_latest"):
                raise ConfigError(f"{var}={value!r}: use drop_oldest or keep_latest")
        elif name in ("producer_config", "consumer_config"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{var} must be a dict of librdkafka properties, e.g. {{'linger.ms': 10}}")
            value = dict(value)
        elif name == "unix_socket_path" or isinstance(default, (str, type(None))):
            value = None if value is None else str(value)
        setattr(cfg, name, value)
    if backend == "kafka" and cfg.sasl_mechanism:
        if cfg.sasl_mechanism == "OAUTHBEARER":
            if not cfg.sasl_oauth_token:
                raise ConfigError("MSIGHT_KAFKA_SASL_MECHANISM=OAUTHBEARER needs MSIGHT_KAFKA_SASL_OAUTH_TOKEN")
        elif not (cfg.sasl_username and cfg.sasl_password):
            raise ConfigError(f"MSIGHT_KAFKA_SASL_MECHANISM={cfg.sasl_mechanism} needs MSIGHT_KAFKA_SASL_USERNAME "
                              "and MSIGHT_KAFKA_SASL_PASSWORD")
    if (getattr(cfg, "tls_cert_file", None) is None) != (getattr(cfg, "tls_key_file", None) is None):
        raise ConfigError(f"{prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE go together (a client certificate and its key)")
    return cfg
