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
from typing import TYPE_CHECKING, Optional, Tuple

__all__ = ["impl", "HAS_EXTENSIONS", "EXTENSION_ERROR"]


def _choose() -> Tuple[ModuleType, Optional[BaseException]]:
    """The codec module to use, and why it is not the compiled core (None when it is)."""
    if os.environ.get("MSIGHT_FAST_NO_EXTENSIONS", "") not in ("", "0"):
        from . import _pywire
        return _pywire, RuntimeError("disabled by MSIGHT_FAST_NO_EXTENSIONS")
    try:
        from ._ext import _wire
    except ImportError as e:  # exercised where the build failed, and by the tests with a broken path
        if os.environ.get("MSIGHT_FAST_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise ImportError(f"msight_fast: the compiled core did not load ({e}) and "
                              "MSIGHT_FAST_REQUIRE_EXTENSIONS is set") from e
        logging.getLogger("msight_fast").warning(
            "msight_fast: the compiled core did not load (%s); using the pure-Python codec, about 100x "
            "slower on large frames. Set MSIGHT_FAST_REQUIRE_EXTENSIONS=1 to make this an error.", e)
        from . import _pywire
        return _pywire, e
    return _wire, None


_chosen, EXTENSION_ERROR = _choose()
if TYPE_CHECKING:
    # the compiled core's stub (_ext/_wire.pyi) is the typed surface; the twin has the same names
    from ._ext import _wire as impl
else:
    impl = _chosen

HAS_EXTENSIONS: bool = EXTENSION_ERROR is None
