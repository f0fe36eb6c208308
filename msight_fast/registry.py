"""The one place that knows backend names: name -> config class, transport, embedded broker.

Backend modules are imported only when a backend is used, so a missing client library is a
clear error naming the package to install, and importing one backend never imports another's
client. Adding a backend is one module in ``msight_fast/backends/`` and one entry here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Type

from . import config as _config
from .errors import ConfigError

if TYPE_CHECKING:
    from .backends.base import Capabilities, Transport

__all__ = ["BackendSpec", "names", "get", "backend_name", "load_config", "transport_class",
           "with_broker", "DEFAULT"]

DEFAULT = "redis"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    config_cls: Type[_config.BaseConfig]
    transport: str                  # "module:Class" under msight_fast.backends
    client: Tuple[str, ...]         # the PyPI packages the transport imports
    broker: Optional[str] = None    # kind for msight_fast.brokers (an embedded broker), if any
    summary: str = ""
    crosses_processes: bool = True  # False: buses meet only inside one process (memory)


_SPECS: Dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("redis", _config.RedisConfig, "redis:RedisTransport", ("hiredis",), "redis",
                "broadcast, best effort"),
    BackendSpec("nats", _config.NatsConfig, "nats:NatsTransport", ("nats-py",), "nats",
                "broadcast, or a queue group with group_id"),
    BackendSpec("kafka", _config.KafkaConfig, "kafka:KafkaTransport", ("confluent-kafka",), "kafka",
                "at least once, consumer groups, retained"),
    BackendSpec("shm", _config.ShmConfig, "shm:ShmTransport", (), None,
                "same host, shared memory: broadcast, zero copy with loans"),
    BackendSpec("memory", _config.MemoryConfig, "memory:MemoryTransport", (), None,
                "in-process: broadcast, groups, a retained log and a message limit, for tests",
                crosses_processes=False),
)}


def names() -> Tuple[str, ...]:
    """Every backend name, the default first."""
    return tuple(_SPECS)


def with_broker() -> Tuple[str, ...]:
    """Backends that have an embedded broker (``msight-fast broker``, the demo, the tests)."""
    return tuple(n for n, s in _SPECS.items() if s.broker)


def get(name: str) -> BackendSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(f"{name!r} is not a backend; use one of {', '.join(_SPECS)} "
                          f"(e.g. MSIGHT_PUBSUB_BACKEND=nats)") from None


def backend_name(backend: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """``backend``, else ``MSIGHT_PUBSUB_BACKEND``, else redis; validated."""
    env = os.environ if environ is None else environ
    raw = backend if backend is not None else env.get("MSIGHT_PUBSUB_BACKEND", DEFAULT)
    name = str(raw or DEFAULT).strip().lower()
    if name not in _SPECS:
        src = "backend argument" if backend is not None else "MSIGHT_PUBSUB_BACKEND"
        raise ConfigError(f"{src}={name!r} is not a backend; use one of {', '.join(_SPECS)} "
                          f"(e.g. MSIGHT_PUBSUB_BACKEND=nats)")
    return name


def load_config(name: str, options: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> Any:
    """The backend's config: defaults, then its ``MSIGHT_*`` variables, then keyword options."""
    return _config.load(get(name).config_cls, options, environ)


def transport_class(name: str) -> Type[Transport]:
    """Import the backend's module; a missing client library raises ConfigError naming it and its extra."""
    spec = get(name)
    mod, cls = spec.transport.split(":")
    try:
        module = importlib.import_module(f"msight_fast.backends.{mod}")
    except ImportError as e:
        if not spec.client:
            raise
        # each client is an extra named after its backend, so the core install stays numpy only
        raise ConfigError(f"the {name} backend needs {' and '.join(spec.client)}: "
                          f"pip install 'msight_fast[{name}]' ({e})") from None
    transport: Type[Transport] = getattr(module, cls)
    return transport


def capabilities(name: str) -> Capabilities:
    """What a backend offers, without connecting (largest message: as declared statically)."""
    return transport_class(name).CAPABILITIES
