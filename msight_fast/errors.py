"""The exception hierarchy of msight_fast: every error the library raises is a MsightFastError."""
from __future__ import annotations


class MsightFastError(Exception):
    """Base class of every msight_fast error."""


class FrameError(MsightFastError, ValueError):
    """A frame or fragment is malformed, or an object cannot be encoded as a frame."""


class ConfigError(MsightFastError, ValueError):
    """A configuration value (environment variable or option) is invalid."""


class BackendUnavailable(MsightFastError, ConnectionError):
    """The broker could not be reached within ``connect_timeout_s``, or the connection was lost."""


class AuthError(MsightFastError, PermissionError):
    """The broker rejected the credentials."""


class FrameTooLarge(MsightFastError, ValueError):
    """A frame is larger than the configured ``max_frame_bytes`` or the broker's limit."""


class PublishError(MsightFastError):
    """One or more frames could not be delivered; ``failures`` lists (topic, reason) pairs."""

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.failures: list[tuple[str, str]] = list(failures or [])
