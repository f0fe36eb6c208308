"""The one place where the codec implementation is chosen.

The compiled core is used unless ``MSIGHT_FAST_NO_EXTENSIONS=1``. If it fails to import, the pure
Python twin takes over with one logged warning naming the import error (the twin is about 100x
slower on large frames), and ``EXTENSION_ERROR`` keeps the reason; with
``MSIGHT_FAST_REQUIRE_EXTENSIONS=1`` the import error is raised instead.
"""
from __future__ import annotations

import logging
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
    except ImportError as e:  # exercised where the build failed, and by the tests with a broken path
        if os.environ.get("MSIGHT_FAST_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise ImportError(f"msight_fast: the compiled core did not load ({e}) and "
                              "MSIGHT_FAST_REQUIRE_EXTENSIONS is set") from e
        EXTENSION_ERROR = e
        logging.getLogger("msight_fast").warning(
            "msight_fast: the compiled core did not load (%s); using the pure-Python codec, about 100x "
            "slower on large frames. Set MSIGHT_FAST_REQUIRE_EXTENSIONS=1 to make this an error.", e)
        from . import _pywire as impl  # type: ignore[no-redef]

HAS_EXTENSIONS: bool = EXTENSION_ERROR is None
