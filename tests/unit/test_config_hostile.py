"""Hostile configuration values: always a ConfigError naming the variable, never another exception."""
import pytest

from msight_fast import ConfigError, registry


@pytest.mark.parametrize("backend,env", [
    ("nats", {"MSIGHT_NATS_SERVERS": "{[]: 1}"}),
    ("nats", {"MSIGHT_NATS_SERVERS": "[" + "-" * 100_000 + "1]"}),
    ("nats", {"MSIGHT_NATS_SERVERS": "[" * 5000 + "]" * 5000}),
    ("kafka", {"MSIGHT_KAFKA_SERVERS": "(" * 200 + ")" * 200}),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_HOST": "a" * 64 + ".example"}),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_CONNECT_TIMEOUT_S": "inf"}),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_CONNECT_TIMEOUT_S": "nan"}),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_PORT": "9" * 5000}),
])
def test_hostile_variables_are_config_errors_naming_the_variable(backend, env):
    with pytest.raises(ConfigError) as e:
        registry.load_config(backend, {}, env)
    assert next(iter(env)) in str(e.value)
    assert len(str(e.value)) < 500


@pytest.mark.parametrize("options", [
    {"port": 6379.5}, {"port": True}, {"port": b"6379"}, {"password": b"secret-bytes"},
    {"connect_timeout_s": True}, {"host": ["localhost"]},
])
def test_wrong_types_are_refused_not_coerced(options):
    with pytest.raises(ConfigError):
        registry.load_config("redis", options, {})


def test_a_password_that_is_not_utf8_is_refused_without_echoing_it():
    pw = "pw-\udcff-secret"             # what os.environ holds for undecodable bytes
    with pytest.raises(ConfigError) as e:
        registry.load_config("redis", {"password": pw}, {})
    assert "secret" not in str(e.value) and "UTF-8" in str(e.value)


def test_a_file_option_must_be_a_path_not_a_descriptor_number():
    with pytest.raises(ConfigError, match="must be a str"):
        registry.load_config("redis", {"tls_ca_cert_file": 0}, {})
