"""A compiled core that fails to import is never a silent slowdown."""
import subprocess
import sys

# Run in a fresh interpreter with the extension module made unimportable (a None entry in
# sys.modules makes its import raise ImportError), as on a machine where the build failed.
_BREAK = "import sys; sys.modules['msight_fast._ext._wire'] = None; "


def _run(code, **env):
    import os
    e = dict(os.environ, **env)
    e.pop("MSIGHT_FAST_NO_EXTENSIONS", None)
    return subprocess.run([sys.executable, "-c", _BREAK + code], capture_output=True, text=True, timeout=120, env=e)


def test_a_fallback_to_the_twin_logs_one_warning_naming_the_import_error():
    r = _run("import logging; logging.basicConfig(); import msight_fast as m; print(m.HAS_EXTENSIONS)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert r.stderr.count("compiled core did not load") == 1 and "MSIGHT_FAST_REQUIRE_EXTENSIONS" in r.stderr


def test_require_extensions_makes_the_fallback_an_error():
    r = _run("import msight_fast", MSIGHT_FAST_REQUIRE_EXTENSIONS="1")
    assert r.returncode != 0 and "MSIGHT_FAST_REQUIRE_EXTENSIONS is set" in r.stderr
