import os

import pytest

import msight_fast
from msight_fast import _impl


def pytest_report_header(config):
    return (f"msight_fast {msight_fast.__version__} from {os.path.dirname(msight_fast.__file__)}; "
            f"codec: {_impl.impl.__name__}")


def pytest_sessionstart(session):
    # a silently failed build must not pass as green: the twin is only allowed when asked for
    if not _impl.HAS_EXTENSIONS and os.environ.get("MSIGHT_FAST_NO_EXTENSIONS", "") in ("", "0"):
        raise pytest.UsageError(
            f"the compiled core did not load ({_impl.EXTENSION_ERROR!r}); "
            "set MSIGHT_FAST_NO_EXTENSIONS=1 to test the pure-Python twin on purpose")


def _impls():
    from msight_fast import _pywire
    out = [pytest.param(_pywire, id="python")]
    if _impl.HAS_EXTENSIONS:
        out.insert(0, pytest.param(_impl.impl, id="cython"))
    return out


@pytest.fixture(params=_impls())
def wire(request):
    """Each available codec implementation: every contract test runs against both."""
    return request.param
