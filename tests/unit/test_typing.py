"""The public API's static types (tests/typing/) hold under ``mypy --strict``, against the package
that is imported here (installed or editable): its py.typed marker and _ext/_wire.pyi stub included."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List

import pytest

import msight_fast

pytest.importorskip("mypy", reason="mypy is not installed (pip install 'msight_fast[lint]')")
pytest.importorskip("typing_extensions", reason="typing_extensions is not installed")
if os.environ.get("MSIGHT_FAST_NO_EXTENSIONS", "") not in ("", "0"):
    # static types do not depend on which codec loads: checked once, in the compiled-core pass
    pytest.skip("the public types are checked in the compiled-core pass", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]          # holds tests/ and the pyproject.toml with [tool.mypy]
TYPING = ROOT / "tests" / "typing"


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    where = Path(msight_fast.__file__).resolve().parents[1]
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if where not in installed:
        # an editable install is found through an import hook, which mypy does not run
        env["MYPYPATH"] = str(where)
    return env


def _mypy(*paths: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    # errors inside msight_fast are the static-checks step's (ci/test.sh); here only the pins count
    args: List[str] = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir",
                       str(cache), "--no-error-summary", "--hide-error-context"]
    if (ROOT / "pyproject.toml").is_file():
        args += ["--config-file", str(ROOT / "pyproject.toml")]
    # the module names the config's overrides use (tests.typing.*) follow from the working directory
    return subprocess.run(args + [str(p) for p in paths], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)


def test_the_public_api_types_are_pinned(tmp_path: Path) -> None:
    files = [p.relative_to(ROOT) for p in sorted(TYPING.glob("check_*.py"))]
    assert len(files) >= 2, files
    r = _mypy(*files, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_public_name_that_regresses_to_any_fails_the_check(tmp_path: Path) -> None:
    # the same pinning, on a name whose type is Any: the check must catch it, not pass vacuously
    probe = tmp_path / "probe_any.py"
    probe.write_text("from typing import Any\n"
                     "from typing_extensions import assert_type\n"
                     "import msight_fast as mf\n"
                     "def untyped_decode(buf: bytes) -> Any:\n"
                     "    return mf.decode(buf)\n"
                     "def check(payload: bytes) -> None:\n"
                     "    assert_type(untyped_decode(payload), mf.Frame)\n"
                     "    assert_type(mf.decode(payload), mf.Frame)\n")
    r = _mypy(probe, cache=tmp_path / "cache")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and ':7: error: Expression is of type "Any", not "Frame"' in errors[0], r.stdout
