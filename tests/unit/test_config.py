"""Configuration from MSight Core's environment names: parsed, validated, never leaked."""

import pytest

import msight_fast
from msight_fast import ConfigError, registry
from msight_fast.backends.base import BoundedQueue
from msight_fast.stats import SeqTracker


@pytest.mark.parametrize("backend,env,var", [
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_PORT": "sixty"}, "MSIGHT_REDIS_MESSAGE_BROKER_PORT"),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_PORT": "70000"}, "MSIGHT_REDIS_MESSAGE_BROKER_PORT"),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_DB": "-1"}, "MSIGHT_REDIS_MESSAGE_BROKER_DB"),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS": "maybe"}, "MSIGHT_REDIS_MESSAGE_BROKER_USE_TLS"),
    ("redis", {"MSIGHT_REDIS_MESSAGE_BROKER_TLS_CA_CERT_FILE": "/no/such/ca.pem"},
     "MSIGHT_REDIS_MESSAGE_BROKER_TLS_CA_CERT_FILE"),
    ("nats", {"MSIGHT_NATS_SERVERS": "['nats://a:4222'"}, "MSIGHT_NATS_SERVERS"),
    ("nats", {"MSIGHT_NATS_SERVERS": "[1, 2]"}, "MSIGHT_NATS_SERVERS"),
    ("nats", {"MSIGHT_NATS_SERVERS": "[__import__('os').system('true')]"}, "MSIGHT_NATS_SERVERS"),
    ("nats", {"MSIGHT_NATS_USE_TLS": "2"}, "MSIGHT_NATS_USE_TLS"),
    ("kafka", {"MSIGHT_KAFKA_SERVERS": "{'a': 1}"}, "MSIGHT_KAFKA_SERVERS"),
    ("kafka", {"MSIGHT_KAFKA_SASL_MECHANISM": "GSSAPI"}, "MSIGHT_KAFKA_SASL_MECHANISM"),
    ("kafka", {"MSIGHT_KAFKA_SASL_MECHANISM": "PLAIN"}, "MSIGHT_KAFKA_SASL_USERNAME"),
    ("kafka", {"MSIGHT_KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "MSIGHT_KAFKA_SASL_OAUTH_TOKEN"),
    ("kafka", {"MSIGHT_KAFKA_TLS_VERIFY": "sometimes"}, "MSIGHT_KAFKA_TLS_VERIFY"),
])
def test_bad_environment_values_name_the_variable(backend, env, var):
    with pytest.raises(ConfigError, match=var):
        registry.load_config(backend, {}, env)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("MSIGHT_PUBSUB_BACKEND", raising=False)
    assert registry.backend_name(None) == "redis"
    monkeypatch.setenv("MSIGHT_PUBSUB_BACKEND", "NATS")
    assert registry.backend_name(None) == "nats"
    assert registry.backend_name("Kafka") == "kafka"
    monkeypatch.setenv("MSIGHT_PUBSUB_BACKEND", "zeromq")
    with pytest.raises(ConfigError, match="MSIGHT_PUBSUB_BACKEND"):
        msight_fast.connect()


def test_environment_is_read_and_options_override_it():
    env = {"MSIGHT_NATS_SERVERS": "['nats://10.0.0.1:4222', 'nats://10.0.0.2:4222']",
           "MSIGHT_NATS_USERNAME": "alice", "MSIGHT_NATS_PASSWORD": "s3cr3t", "MSIGHT_NATS_USE_TLS": "yes"}
    c = registry.load_config("nats", {}, env)
    assert c.servers == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"] and c.username == "alice"
    assert c.password == "s3cr3t" and c.use_tls is True
    c = registry.load_config("nats", {"servers": ["nats://x:1"], "use_tls": False}, env)
    assert c.servers == ["nats://x:1"] and c.use_tls is False
    r = registry.load_config("redis", {}, {"MSIGHT_REDIS_MESSAGE_BROKER_PORT": "6380",
                                           "MSIGHT_REDIS_MESSAGE_BROKER_DB": "2"})
    assert (r.host, r.port, r.db) == ("localhost", 6380, 2)
    k = registry.load_config("kafka", {}, {"MSIGHT_KAFKA_SERVERS": "['b1:9092']",
                                           "MSIGHT_KAFKA_SASL_MECHANISM": "scram-sha-512",
                                           "MSIGHT_KAFKA_SASL_USERNAME": "u", "MSIGHT_KAFKA_SASL_PASSWORD": "p"})
    assert k.servers == ["b1:9092"] and k.sasl_mechanism == "SCRAM-SHA-512"


def test_kafka_settings_reach_librdkafka():
    from msight_fast.backends.kafka import _client_config
    k = registry.load_config("kafka", {}, {"MSIGHT_KAFKA_SERVERS": "['b1:9093','b2:9093']",
                                  "MSIGHT_KAFKA_SASL_MECHANISM": "PLAIN", "MSIGHT_KAFKA_SASL_USERNAME": "u",
                                  "MSIGHT_KAFKA_SASL_PASSWORD": "p",
                                  "MSIGHT_KAFKA_USE_TLS": "true", "MSIGHT_KAFKA_TLS_VERIFY": "false",
                                  "MSIGHT_KAFKA_TLS_CHECK_HOSTNAME": "false"})
    c = _client_config(k)
    assert c["bootstrap.servers"] == "b1:9093,b2:9093" and c["security.protocol"] == "SASL_SSL"
    assert (c["sasl.mechanism"], c["sasl.username"], c["sasl.password"]) == ("PLAIN", "u", "p")
    assert c["enable.ssl.certificate.verification"] is False and c["ssl.endpoint.identification.algorithm"] == "none"


def test_secrets_are_never_shown(caplog):
    c = registry.load_config("kafka", {"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "hunter2"})
    assert "hunter2" not in repr(c) and "***" in repr(c)
    n = registry.load_config("nats", {"token": "tok-123", "password": "pw-456"})
    assert "tok-123" not in repr(n) and "pw-456" not in repr(n)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown option"):
        registry.load_config("redis", {"hots": "x"})


def test_compat_config_dicts_match_msight_core(monkeypatch):
    from msight_fast import compat
    monkeypatch.setenv("MSIGHT_NATS_SERVERS", "['nats://s1:4222']")
    monkeypatch.setenv("MSIGHT_NATS_USERNAME", "u")
    monkeypatch.setenv("MSIGHT_NATS_PASSWORD", "p")
    assert compat.get_nats_config("workers") == {"servers": ["nats://s1:4222"], "group_id": "workers",
                                                 "user": "u", "password": "p"}
    assert compat._nats_options(compat.get_nats_config("w")) == {"servers": ["nats://s1:4222"],
                                                                 "username": "u", "password": "p"}
    monkeypatch.setenv("MSIGHT_KAFKA_SERVERS", "['b:9092']")
    k = compat.get_kafka_config("g")
    assert k == {"servers": ["b:9092"], "group_id": "g", "security_protocol": "PLAINTEXT"}


def test_seq_tracker_gaps_duplicates_and_reordering():
    t = SeqTracker()
    for s in [5, 1, 6, 8, 7, 7, 10, 3]:
        t.see(1, s)
    assert (t.gaps, t.duplicates) == (1, 1)       # 9 missing; 7 twice; 1 and 3 predate the first seen
    t.see(2, 100)
    t.see(2, 104)
    assert t.gaps == 4


def test_bounded_queue_policies():
    q = BoundedQueue(100, "drop_oldest")
    for i in range(10):
        q.put(i, 30)
    assert q.dropped == 7 and [q.get(0)[0] for _ in range(3)] == [7, 8, 9] and q.get(0) is None
    k = BoundedQueue(100, "keep_latest")
    for i in range(10):
        k.put(i, 30)
    assert k.nbytes <= 100 and k.get(0)[0] in (9, 6, 7, 8) and k.dropped >= 6


def test_kafka_topic_limit_is_read_from_a_describe_configs_answer():
    from types import SimpleNamespace as E

    from msight_fast.backends.kafka import limit_from_topic_config
    assert limit_from_topic_config({"max.message.bytes": E(value="10485760")}) == 10485760
    assert limit_from_topic_config({}) is None
    assert limit_from_topic_config(None) is None
    assert limit_from_topic_config({"max.message.bytes": E(value=None)}) is None
    assert limit_from_topic_config({"max.message.bytes": E(value="lots")}) is None
    assert limit_from_topic_config({"max.message.bytes": E(value="12")}) is None       # absurd: ignored
    assert limit_from_topic_config({"max.message.bytes": E(value=str(1 << 40))}) is None


KAFKA_TIMINGS = ("fetch_wait_max_ms", "session_timeout_ms", "heartbeat_interval_ms", "auto_commit_interval_ms",
                 "reconnect_backoff_max_ms")


def test_kafka_topic_and_timing_defaults_reach_librdkafka():
    from msight_fast.backends.kafka import _client_config, _consumer_config
    k = registry.load_config("kafka", {}, {})
    assert k.replication_factor == -1 and k.num_partitions == 4
    assert [getattr(k, n) for n in KAFKA_TIMINGS] == [100, 6000, 500, 1000, 1000]
    base = _client_config(k)
    assert base["reconnect.backoff.max.ms"] == 1000
    c = _consumer_config(k, base, "g", None)
    assert (c["fetch.wait.max.ms"], c["session.timeout.ms"], c["heartbeat.interval.ms"],
            c["auto.commit.interval.ms"]) == (100, 6000, 500, 1000)


def test_kafka_options_from_the_environment_and_keywords_and_raw_properties_win():
    from msight_fast.backends.kafka import _client_config, _consumer_config
    env = {"MSIGHT_KAFKA_REPLICATION_FACTOR": "3", "MSIGHT_KAFKA_FETCH_WAIT_MAX_MS": "500",
           "MSIGHT_KAFKA_SESSION_TIMEOUT_MS": "10000", "MSIGHT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
           "MSIGHT_KAFKA_AUTO_COMMIT_INTERVAL_MS": "2000", "MSIGHT_KAFKA_RECONNECT_BACKOFF_MAX_MS": "5000"}
    k = registry.load_config("kafka", {}, env)
    assert k.replication_factor == 3
    assert [getattr(k, n) for n in KAFKA_TIMINGS] == [500, 10000, 1000, 2000, 5000]
    c = _consumer_config(k, _client_config(k), "g", None)
    assert (c["fetch.wait.max.ms"], c["session.timeout.ms"], c["heartbeat.interval.ms"],
            c["auto.commit.interval.ms"], c["reconnect.backoff.max.ms"]) == (500, 10000, 1000, 2000, 5000)
    k = registry.load_config("kafka", {"fetch_wait_max_ms": 0, "replication_factor": -1,
                                       "consumer_config": {"fetch.wait.max.ms": 250, "session.timeout.ms": 45000}}, env)
    assert (k.fetch_wait_max_ms, k.replication_factor) == (0, -1)
    c = _consumer_config(k, _client_config(k), "g", None)
    assert (c["fetch.wait.max.ms"], c["session.timeout.ms"]) == (250, 45000)     # the raw properties win


@pytest.mark.parametrize("var,value", [
    ("MSIGHT_KAFKA_REPLICATION_FACTOR", "0"),
    ("MSIGHT_KAFKA_REPLICATION_FACTOR", "-2"),
    ("MSIGHT_KAFKA_REPLICATION_FACTOR", "32768"),
    ("MSIGHT_KAFKA_REPLICATION_FACTOR", "3.0"),
    ("MSIGHT_KAFKA_REPLICATION_FACTOR", "three"),
    ("MSIGHT_KAFKA_FETCH_WAIT_MAX_MS", "-1"),
    ("MSIGHT_KAFKA_FETCH_WAIT_MAX_MS", "300001"),
    ("MSIGHT_KAFKA_FETCH_WAIT_MAX_MS", "100ms"),
    ("MSIGHT_KAFKA_FETCH_WAIT_MAX_MS", "1e2"),
    ("MSIGHT_KAFKA_SESSION_TIMEOUT_MS", "0"),
    ("MSIGHT_KAFKA_SESSION_TIMEOUT_MS", "3600001"),
    ("MSIGHT_KAFKA_HEARTBEAT_INTERVAL_MS", "0"),
    ("MSIGHT_KAFKA_HEARTBEAT_INTERVAL_MS", "6000"),          # not below the session timeout
    ("MSIGHT_KAFKA_AUTO_COMMIT_INTERVAL_MS", "0"),           # would turn the periodic commit off
    ("MSIGHT_KAFKA_RECONNECT_BACKOFF_MAX_MS", "99"),         # librdkafka refuses it below reconnect.backoff.ms
    ("MSIGHT_KAFKA_RECONNECT_BACKOFF_MAX_MS", "3600001"),
])
def test_bad_kafka_option_values_name_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        registry.load_config("kafka", {}, {var: value})


@pytest.mark.parametrize("name,value", [
    ("fetch_wait_max_ms", 100.0), ("fetch_wait_max_ms", True), ("replication_factor", b"3"),
    ("session_timeout_ms", None), ("auto_commit_interval_ms", [1000]), ("heartbeat_interval_ms", 6000),
])
def test_bad_kafka_option_types_name_the_option(name, value):
    with pytest.raises(ConfigError, match=f"(?i){name}"):
        registry.load_config("kafka", {name: value}, {})


def test_kafka_refusals_of_the_default_replication_are_told_from_a_missing_create_topics():
    from confluent_kafka import KafkaError

    from msight_fast.backends.kafka import _not_implemented, _refuses_default_rf

    # librdkafka's own refusals: one code, told apart by the message only
    old = KafkaError(KafkaError._UNSUPPORTED_FEATURE, "Default replication factor (KIP-464) not supported by broker")
    none = KafkaError(KafkaError._UNSUPPORTED_FEATURE, "Topic Admin API (KIP-4) not supported by broker")
    assert _refuses_default_rf(old) and not _not_implemented(old)
    assert _not_implemented(none) and not _refuses_default_rf(none)
    bad = KafkaError(KafkaError.INVALID_REPLICATION_FACTOR, "Replication factor: -1 larger than available brokers")
    assert _refuses_default_rf(bad) and not _not_implemented(bad)
    denied = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")
    assert not _refuses_default_rf(denied) and not _not_implemented(denied)
