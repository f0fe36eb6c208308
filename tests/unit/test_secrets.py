"""Credentials stay out of repr, error messages, log records and the CLI's error line."""
import logging

import pytest

import msight_fast
from msight_fast import BackendUnavailable, config, registry


def test_userinfo_in_server_urls_is_masked():
    assert config.redact_url("nats://alice:s3cr3t-pw@h:4222") == "nats://alice:***@h:4222"
    assert config.redact_url("nats://TOKEN-abc123@h:4222") == "nats://***@h:4222"
    assert config.redact_url("tls://h:4222 and nats://x:y@z") == "tls://h:4222 and nats://x:***@z"
    c = registry.load_config("nats", {"servers": ["nats://alice:s3cr3t-pw@h:4222", "nats://TOKEN-abc123@h2"]})
    assert "s3cr3t-pw" not in repr(c) and "TOKEN-abc123" not in repr(c)


def test_raw_librdkafka_secrets_are_masked():
    c = registry.load_config("kafka", {"producer_config": {"sasl.password": "kpw-9876", "linger.ms": 7},
                                       "consumer_config": {"ssl.key.password": "keypw-5555"}})
    text = repr(c)
    assert "kpw-9876" not in text and "keypw-5555" not in text and "'linger.ms': 7" in text
    assert config.scrub("librdkafka said kpw-9876 was wrong") == "librdkafka said *** was wrong"


def test_secrets_are_masked_in_log_records(caplog):
    registry.load_config("redis", {"password": "redis-pw-4321"})
    with caplog.at_level(logging.WARNING, logger="msight_fast"):
        logging.getLogger("msight_fast").warning("auth with %s failed", "redis-pw-4321")
    assert "redis-pw-4321" not in caplog.text and "***" in caplog.text


def test_connect_errors_carry_no_credentials():
    from msight_fast.brokers import free_port
    port = free_port()
    with pytest.raises(BackendUnavailable) as e:
        msight_fast.connect("nats", servers=[f"nats://bob:nats-pw-2468@127.0.0.1:{port}"], connect_timeout_s=1)
    assert "nats-pw-2468" not in str(e.value)


def test_the_cli_error_line_carries_no_credentials(capsys, monkeypatch):
    from msight_fast.brokers import free_port
    from msight_fast.cli import main
    monkeypatch.setenv("MSIGHT_NATS_SERVERS", f"['nats://carol:cli-pw-1357@127.0.0.1:{free_port()}']")
    rc = main(["hz", "t", "--backend", "nats", "--timeout", "1", "--seconds", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "cli-pw-1357" not in err and "error" in err
