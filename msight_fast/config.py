"""Configuration from MSight Core's environment variable names, overridable by keyword options.

Every value is validated here, once, with a ``ConfigError`` that names the variable (or option)
and shows a valid example. Credentials are kept out of ``repr`` and never logged.
"""
from __future__ import annotations

import ast
import logging
import os
import re
import threading
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Type, TypeVar

from .errors import ConfigError

SECRET_KEYS = frozenset({"password", "token", "nkey_seed", "user_jwt", "sasl_password", "sasl_oauth_token"})
# librdkafka properties whose values are secrets (matched as substrings of the property name)
_SECRET_PROPS = ("password", "secret", "token", "sasl.oauthbearer.config", "sasl.jaas", "ssl.key.pem",
                 "ssl_key", "private")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"]+)@")

# Every secret value a config was loaded with: masked in error messages and log records, so a
# password written into a server URL or a raw librdkafka property never reaches a log or a CLI line.
_secrets: Dict[str, None] = {}
_secrets_lock = threading.Lock()


def _remember(value: Any) -> None:
    if isinstance(value, str) and len(value) >= 3:
        with _secrets_lock:
            _secrets[value] = None
            if len(_secrets) > 4096:
                del _secrets[next(iter(_secrets))]


def _mask_userinfo(m: re.Match[str]) -> str:
    info = m.group("info")
    user = info.split(":", 1)[0] if ":" in info else "***"
    return f"{m.group('scheme')}{user}:***@" if ":" in info else f"{m.group('scheme')}***@"


def redact_url(url: str) -> str:
    """``nats://user:pw@host`` -> ``nats://user:***@host``; ``nats://TOKEN@host`` -> ``nats://***@host``."""
    return _URL_USERINFO.sub(_mask_userinfo, url)


def scrub(text: str) -> str:
    """``text`` with every known secret and every URL's credentials masked."""
    text = redact_url(text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _secret_prop(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in _SECRET_PROPS)


def redact_props(props: Mapping[str, Any]) -> Dict[str, Any]:
    """A librdkafka property dict with its secret values shown as ``***``."""
    return {k: ("***" if _secret_prop(str(k)) and v not in (None, "") else v) for k, v in props.items()}


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's business
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


for _name in ("msight_fast", "msight_fast.librdkafka"):
    logging.getLogger(_name).addFilter(_ScrubFilter())


def _bool(var: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={_short(value)} is not a boolean; use true or false (e.g. {var}=true)")


MAX_TEXT = 64 << 10        # longest variable or option text parsed (literal_eval's cost grows with it)


def _int(var: str, value: Any, lo: int, hi: int, example: str) -> int:
    # strict: 6379.5, True and b"6379" are mistakes, not 6379, 1 and an error deep in a socket call
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 64):
        raise ConfigError(f"{var}={_short(value)} is not an integer (e.g. {var}={example})")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{var}={_short(value)} is not an integer (e.g. {var}={example})") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{var}={n} is out of range [{lo}, {hi}] (e.g. {var}={example})")
    return n


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _float(var: str, value: Any, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or \
            (isinstance(value, str) and len(value) > 64):
        raise ConfigError(f"{var}={_short(value)} is not a number (e.g. {var}={example})")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{var}={_short(value)} is not a number (e.g. {var}={example})") from None
    if not 0 < x <= 86400:                 # also refuses nan and inf
        raise ConfigError(f"{var}={x} must be a positive number of seconds up to 86400 (e.g. {var}={example})")
    return x


def _servers(var: str, value: Any, example: str) -> List[str]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ConfigError(f"{var}={_short(value)} must be a list literal of at most {MAX_TEXT} characters "
                              f"(e.g. {var}=\"{example}\")")
        text = value.strip()
        if text.startswith(("[", "(", "{", "'", "\"")):
            try:
                items = ast.literal_eval(text)      # a Python list literal, never eval()
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ConfigError(f"{var}={_short(value)} is not a list literal (e.g. {var}=\"{example}\")") from None
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{var}={_short(value)} is not a list (e.g. {var}=\"{example}\")")
        else:
            items = [s for s in text.split(",")]
    items = [s.strip() if isinstance(s, str) else s for s in items]
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{var}={_short(value)} must be a non-empty list of server addresses "
                          f"(e.g. {var}=\"{example}\")")
    return items


def _text(var: str, value: Any, secret: bool) -> str:
    """A str that can go on the wire (UTF-8), never echoing a secret in the error."""
    shown = "(hidden)" if secret else _short(value)
    if not isinstance(value, str):
        raise ConfigError(f"{var}={shown} must be a str, not {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ConfigError(f"{var} is longer than {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeError:
        raise ConfigError(f"{var}={shown} is not valid UTF-8") from None
    return value


def _file(var: str, value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    value = _text(var, value, secret=False)          # an int would be taken as a file descriptor
    if not os.path.isfile(value):
        raise ConfigError(f"{var}={_short(value)}: no such file (e.g. {var}=/etc/msight/tls/ca.pem)")
    return str(value)


@dataclass(repr=False)
class BaseConfig:
    """Options every backend has. Subclasses name their variables' prefix in ``ENV_PREFIX``."""
    ENV_PREFIX: ClassVar[str] = "MSIGHT_"
    BACKEND: ClassVar[str] = "?"
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 5.0          # a publish waits at most this for a broker that is away
    max_frame_bytes: int = 256 << 20
    max_pending_bytes: int = 256 << 20      # subscriber-side queue bound (NATS, Kafka)
    drop_policy: str = "drop_oldest"        # or "keep_latest"
    checksum: bool = False

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={_shown(f.name, getattr(self, f.name))}" for f in fields(self))
        return f"{type(self).__name__}({shown})"


def _shown(name: str, value: Any) -> str:
    if name in SECRET_KEYS and value:
        return "'***'"
    if name == "servers":
        return repr([redact_url(v) for v in value])
    if isinstance(value, Mapping):
        return repr(redact_props(value))
    return repr(value)


@dataclass(repr=False)
class RedisConfig(BaseConfig):
    ENV_PREFIX: ClassVar[str] = "MSIGHT_REDIS_MESSAGE_BROKER_"
    BACKEND: ClassVar[str] = "redis"
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
class NatsConfig(BaseConfig):
    ENV_PREFIX: ClassVar[str] = "MSIGHT_NATS_"
    BACKEND: ClassVar[str] = "nats"
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
class KafkaConfig(BaseConfig):
    ENV_PREFIX: ClassVar[str] = "MSIGHT_KAFKA_"
    BACKEND: ClassVar[str] = "kafka"
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
    # -1: the broker's default.replication.factor (KIP-464); a fixed 1 loses data on a real
    # cluster and makes acks=all fail where min.insync.replicas >= 2
    replication_factor: int = -1
    partition_key: str = "publisher"        # "publisher": in order per publisher; "frame": spread over partitions
    linger_ms: int = 5
    max_in_flight_bytes: int = 16 << 20     # producer queue bound: latency stays bounded
    # The longest a fetch waits at the broker for data. Apache Kafka answers as soon as data
    # comes, whatever this is; tansu (memory) waits most of it out (median latency measured
    # 10 ms at 10, 33 ms at 100, 153 ms at 500), and tansu on object storage delivered nothing
    # at 10 (its storage reads take longer than the wait) but everything at 50 and more. 100
    # keeps both working; raise it (250-500) on a broker whose storage is slow.
    fetch_wait_max_ms: int = 100
    session_timeout_ms: int = 6000          # measured good on tansu and small clusters: fast group joins
    heartbeat_interval_ms: int = 500        # must stay below session_timeout_ms
    auto_commit_interval_ms: int = 1000     # offsets of released frames are committed this often
    # librdkafka's default of 10 s between reconnection attempts would add up to 10 s to every recovery
    reconnect_backoff_max_ms: int = 1000
    # Frames up to batch_max_frame_bytes are coalesced, per topic, into one Kafka message (a batch
    # container, docs/wire-format.md 2a): Kafka's cost per message (client, broker, consumer) is
    # then paid per batch. A batch goes out at batch_max_bytes, batch_linger_ms after its first
    # frame, before a larger frame of its topic, and on flush() and close(); a frame that finds its
    # topic idle goes out at once. Any of the three 0: no batching (one message per frame).
    batch_max_frame_bytes: int = 16 << 10
    batch_max_bytes: int = 256 << 10
    batch_linger_ms: int = 5
    # A batch whose frames differ only in ids, times, lengths and CRCs (one sensor's stream) sends
    # the header once and a short entry per frame (docs/wire-format.md 2b): a 1 KB frame's 128-192
    # header bytes become 22-35. Readers before wire format 1.2 reject such a batch: set false
    # while any subscriber is older.
    batch_shared_header: bool = True
    producer_config: Dict[str, Any] = field(default_factory=dict)
    consumer_config: Dict[str, Any] = field(default_factory=dict)


@dataclass(repr=False)
class MemoryConfig(BaseConfig):
    ENV_PREFIX: ClassVar[str] = "MSIGHT_MEMORY_"
    BACKEND: ClassVar[str] = "memory"
    name: str = "default"                   # buses with the same name share one in-process broker
    max_message_bytes: Optional[int] = 1 << 20   # frames above it are fragmented, as on NATS
    retain_bytes: int = 64 << 20            # the retained log per topic (from_beginning replays it)


@dataclass(repr=False)
class ShmConfig(BaseConfig):
    ENV_PREFIX: ClassVar[str] = "MSIGHT_SHM_"
    BACKEND: ClassVar[str] = "shm"
    dir: str = "/dev/shm"                   # where the segments live (a tmpfs: files there are memory)
    slots: int = 8                          # per publisher and topic: frames in flight and held
    slot_bytes: int = 0                     # payload bytes per slot; 0: sized to the frames, growing
    full_policy: str = "drop"               # every slot held by readers: "drop" the new frame, or "block"
    zero_copy: bool = True                  # False: a subscriber copies each frame out and lets the slot go


_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
# Kafka timings in ms: librdkafka's own ranges, except auto-commit (0 would turn the periodic
# commit off) and the reconnect backoff (librdkafka refuses less than reconnect.backoff.ms, 100)
_KAFKA_MS = {"fetch_wait_max_ms": (0, 300_000), "session_timeout_ms": (1, 3_600_000),
             "heartbeat_interval_ms": (1, 3_600_000), "auto_commit_interval_ms": (1, 86_400_000),
             "reconnect_backoff_max_ms": (100, 3_600_000)}

# Kafka batching: 0 turns it off, else at least the smallest frame (128 bytes) / a useful batch
_KAFKA_BATCH = {"batch_max_frame_bytes": (128, 64 << 20), "batch_max_bytes": (1024, 1 << 31),
                "batch_linger_ms": (1, 60_000)}
BATCH_OVERHEAD = 32        # a batch container's header and index for one frame (docs/wire-format.md 2a)


C = TypeVar("C", bound=BaseConfig)


def load(cls: Type[C], options: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> C:
    """Build a backend's config: defaults, then ``MSIGHT_*`` variables, then keyword options."""
    env = os.environ if environ is None else environ
    prefix, backend = cls.ENV_PREFIX, cls.BACKEND
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
        elif name in ("max_frame_bytes", "max_pending_bytes", "max_in_flight_bytes", "retain_bytes"):
            value = _int(var, value, 1024, 1 << 40, str(default))
        elif name in ("max_message_bytes", "max_payload"):
            value = None if value is None else _int(var, value, 1024, 1 << 31, "1048576")
        elif name in ("num_partitions", "linger_ms"):
            value = _int(var, value, 0 if name == "linger_ms" else 1, 100_000, str(default))
        elif name in _KAFKA_BATCH:
            lo, hi = _KAFKA_BATCH[name]
            value = _int(var, value, 0, hi, str(default))
            if 0 < value < lo:
                raise ConfigError(f"{var}={value}: use 0 (no batching) or at least {lo} (e.g. {var}={default})")
        elif name in _KAFKA_MS:
            lo, hi = _KAFKA_MS[name]
            value = _int(var, value, lo, hi, str(default))
        elif name == "replication_factor":
            value = _int(var, value, -1, 32767, "3")
            if value == 0:
                raise ConfigError(f"{var}=0: use -1 (the broker's default replication) or a number of replicas "
                                  f"(e.g. {var}=3)")
        elif name in ("connect_timeout_s", "publish_timeout_s"):
            value = _float(var, value, "5")
        elif isinstance(default, bool):
            value = _bool(var, value)
        elif name == "servers":
            value = _servers(var, value, repr(default))
        elif name.endswith("_file") or name == "user_credentials":
            value = _file(var, value)
        elif name == "sasl_mechanism":
            value = str(value).upper()
            if value not in _SASL:
                raise ConfigError(f"{var}={_short(value)} is not supported; use one of {', '.join(_SASL)} "
                                  f"(e.g. {var}=SCRAM-SHA-512)")
        elif name == "partition_key":
            if value not in ("publisher", "frame"):
                raise ConfigError(f"{var}={_short(value)}: use publisher (ordered) or frame (balanced over partitions)")
        elif name == "slots":
            value = _int(var, value, 2, 64, "8")
        elif name == "slot_bytes":
            value = _int(var, value, 0, 1 << 34, "0")      # what a reader accepts (backends/shm.py)
            if 0 < value < 4096:
                raise ConfigError(f"{var}={value}: use 0 (sized to the frames) or at least 4096 (e.g. {var}=8388608)")
        elif name == "full_policy":
            if value not in ("drop", "block"):
                raise ConfigError(f"{var}={_short(value)}: use drop or block")
        elif name == "drop_policy":
            if value not in ("drop_oldest", "keep_latest"):
                raise ConfigError(f"{var}={_short(value)}: use drop_oldest or keep_latest")
        elif name in ("producer_config", "consumer_config"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{var} must be a dict of librdkafka properties, e.g. {{'linger.ms': 10}}")
            value = dict(value)
        elif name == "unix_socket_path" or isinstance(default, (str, type(None))):
            value = None if value is None else _text(var, value, secret=name in SECRET_KEYS)
            if name == "host":
                if value is None:
                    raise ConfigError(f"{var} must name a host (e.g. {var}=localhost)")
                try:
                    value.encode("idna")
                except UnicodeError:
                    raise ConfigError(f"{var}={_short(value)} is not a host name (e.g. {var}=localhost)") from None
        setattr(cfg, name, value)
    if isinstance(cfg, KafkaConfig) and cfg.sasl_mechanism:
        if cfg.sasl_mechanism == "OAUTHBEARER":
            if not cfg.sasl_oauth_token:
                raise ConfigError("MSIGHT_KAFKA_SASL_MECHANISM=OAUTHBEARER needs MSIGHT_KAFKA_SASL_OAUTH_TOKEN")
        elif not (cfg.sasl_username and cfg.sasl_password):
            raise ConfigError(f"MSIGHT_KAFKA_SASL_MECHANISM={cfg.sasl_mechanism} needs MSIGHT_KAFKA_SASL_USERNAME "
                              "and MSIGHT_KAFKA_SASL_PASSWORD")
    for name in SECRET_KEYS & names:
        _remember(getattr(cfg, name))
    for url in getattr(cfg, "servers", ()):
        for m in _URL_USERINFO.finditer(url):
            info = m.group("info")
            _remember(info.split(":", 1)[1] if ":" in info else info)
    for props in (getattr(cfg, "producer_config", {}), getattr(cfg, "consumer_config", {})):
        for k, v in props.items():
            if _secret_prop(str(k)):
                _remember(str(v))
    if isinstance(cfg, KafkaConfig) and cfg.heartbeat_interval_ms >= cfg.session_timeout_ms:
        raise ConfigError(f"{prefix}HEARTBEAT_INTERVAL_MS={cfg.heartbeat_interval_ms} must be below "
                          f"{prefix}SESSION_TIMEOUT_MS={cfg.session_timeout_ms} (e.g. 500 and 6000)")
    if isinstance(cfg, KafkaConfig) and cfg.batch_max_frame_bytes and cfg.batch_max_bytes and \
            cfg.batch_max_frame_bytes + BATCH_OVERHEAD > cfg.batch_max_bytes:
        raise ConfigError(f"{prefix}BATCH_MAX_FRAME_BYTES={cfg.batch_max_frame_bytes} must leave room for the batch "
                          f"header under {prefix}BATCH_MAX_BYTES={cfg.batch_max_bytes}: at most "
                          f"{cfg.batch_max_bytes - BATCH_OVERHEAD} (e.g. 16384 and 262144)")
    if (getattr(cfg, "tls_cert_file", None) is None) != (getattr(cfg, "tls_key_file", None) is None):
        raise ConfigError(f"{prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE go together "
                          "(a client certificate and its key)")
    return cfg
