"""The one place where the codec implementation is chosen.

The compiled core is used unless ``MSIGHT_FAST_NO_EXTENSIONS=1``; if it fails to import, the pure
Python twin takes over and ``EXTENSION_ERROR`` keeps the reason (the test suite fails on it
unless the variable is set).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

EXTENSION_ERROR: Optional[BaseException] = None
impl: ModuleType

if os.environ.get("MSIGHT_FAST_NO_EXTENSIONS", "") not in ("", "0"):
    from . import _pywire as impl
    EXTENSION_ERROR = RuntimeError("disabled by MSIGHT_FAST_NO_EXTENSIONS")
else:
    try:
        from ._ext import _wire as impl  # type: ignore[no-redef]
    except ImportError as e:  # pragma: no cover - exercised where the build failed
        EXTENSION_ERROR = e
        from . import _pywire as impl  # type: ignore[no-redef]

HAS_EXTENSIONS: bool = EXTENSION_ERROR is None
