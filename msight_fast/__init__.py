"""msight_fast: fast, safe transport of camera and lidar frames over Redis, NATS and Kafka."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._impl import EXTENSION_ERROR, HAS_EXTENSIONS
from .backends.base import Start
from .codec import Frame, Reassembler, crc32c, decode, encode, encode_parts, fragment
from .errors import (
    AuthError,
    BackendUnavailable,
    ConfigError,
    FrameError,
    FrameTooLarge,
    MsightFastError,
    PublishError,
)

if TYPE_CHECKING:
    # what __getattr__ below returns, so type checkers see the real signatures
    from .bus import Bus, NodeConfig, Subscription, connect, connect_node
    from .record import read_mcap

__version__ = "0.1.0"

__all__ = [
    "Frame", "encode", "encode_parts", "decode", "fragment", "Reassembler", "crc32c",
    "MsightFastError", "FrameError", "ConfigError", "BackendUnavailable", "AuthError",
    "FrameTooLarge", "PublishError", "HAS_EXTENSIONS", "EXTENSION_ERROR",
    "connect", "connect_node", "NodeConfig", "Bus", "Subscription", "Start", "read_mcap",
]


def __getattr__(name: str) -> Any:
    # the transport layer imports the broker clients: load it only when asked for
    if name in ("connect", "connect_node", "NodeConfig", "Bus", "Subscription"):
        from . import bus
        return getattr(bus, name)
    if name == "read_mcap":           # MCAP needs the viz extra: imported when first used
        from .record import read_mcap
        return read_mcap
    raise AttributeError(f"module 'msight_fast' has no attribute {name!r}")
