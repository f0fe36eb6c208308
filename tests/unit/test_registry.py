"""The registry is the only place that names backends; backends never import the facade."""
import subprocess
import sys

import pytest

from msight_fast import ConfigError, registry
from msight_fast.backends.base import Capabilities, Transport


def test_every_backend_has_a_config_a_transport_and_capabilities():
    assert registry.names()[0] == "redis"                       # the default comes first
    for name in registry.names():
        spec = registry.get(name)
        assert spec.config_cls.BACKEND == name
        cls = registry.transport_class(name)
        assert issubclass(cls, Transport) and cls.name == name
        assert isinstance(registry.capabilities(name), Capabilities)
    assert set(registry.with_broker()) == {"redis", "nats", "kafka"}


def test_declared_semantics_match_the_readme():
    caps = {n: registry.capabilities(n) for n in registry.names()}
    assert (caps["redis"].delivery, caps["redis"].groups, caps["redis"].persistence) == ("best_effort", None, False)
    assert (caps["nats"].delivery, caps["nats"].groups, caps["nats"].persistence) == ("best_effort", "queue", False)
    assert (caps["kafka"].delivery, caps["kafka"].groups, caps["kafka"].persistence) == \
        ("at_least_once", "consumer", True)
    assert (caps["shm"].delivery, caps["shm"].groups, caps["shm"].persistence, caps["shm"].max_message) == \
        ("best_effort", None, False, None)
    assert registry.get("shm").crosses_processes and not registry.get("memory").crosses_processes


def test_unknown_backend_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="redis, nats, kafka, shm, memory"):
        registry.get("zeromq")
    with pytest.raises(ConfigError, match="MSIGHT_PUBSUB_BACKEND"):
        registry.backend_name(None, {"MSIGHT_PUBSUB_BACKEND": "rabbit"})


def test_a_missing_client_library_names_the_package(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_nats(name, *a, **k):
        if name == "nats" or name.startswith("nats."):
            raise ImportError("No module named 'nats'")
        return real(name, *a, **k)

    monkeypatch.delitem(sys.modules, "msight_fast.backends.nats", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_nats)
    with pytest.raises(ConfigError, match="nats-py"):
        registry.transport_class("nats")


@pytest.mark.parametrize("backend,module,package", [
    ("redis", "hiredis", "hiredis"),
    ("nats", "nats", "nats-py"),
    ("kafka", "confluent_kafka", "confluent-kafka"),
])
def test_a_missing_client_names_the_extra_that_installs_it(monkeypatch, backend, module, package):
    # None in sys.modules makes every import of the client (and of its submodules) fail, as when
    # the package is not installed
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"msight_fast.backends.{backend}", raising=False)
    with pytest.raises(ConfigError) as ei:
        registry.transport_class(backend)
    msg = str(ei.value)
    assert f"the {backend} backend needs {package}" in msg
    assert f"pip install 'msight_fast[{backend}]'" in msg


@pytest.mark.parametrize("backend,others", [
    ("redis", ("nats", "confluent_kafka")),
    ("nats", ("hiredis", "confluent_kafka")),
    ("kafka", ("hiredis", "nats")),
    ("memory", ("hiredis", "nats", "confluent_kafka")),
])
def test_a_backend_imports_neither_the_facade_nor_other_clients(backend, others):
    code = (f"import sys, msight_fast.backends.{backend}; "
            f"bad = [m for m in {others!r} + ('msight_fast.bus',) if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
