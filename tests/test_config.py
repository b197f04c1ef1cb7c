"""The configuration schema: strictness, types, cross-field rules, secrets, generated docs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_lstm.config import (
    Config,
    ConfigError,
    MqttProtocol,
    TopicFilter,
    load_config,
    parse_config,
    reference_markdown,
    to_toml,
)
from edge_lstm.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, ""))
    assert c.mqtt.port == 1883
    assert c.mqtt.protocol is MqttProtocol.V5
    assert c.model.runtime is Runtime.AUTO
    assert c.input.topics == ["sensors/{stream}/value"]
    assert c.output.topic == "forecasts/{stream}"
    assert (c.metrics.bind, c.metrics.port) == ("127.0.0.1", 9745)
    assert c.engine.queue_size == 10000 and c.state.capacity == 10000
    assert c.mqtt.client_id.startswith("edge-lstm-") and "{hostname}" not in c.mqtt.client_id
    assert c.status_topic == f"edge-lstm/{c.mqtt.client_id}/status"
    # relative paths are relative to the config file's directory
    assert c.model.path == str(tmp_path / "models" / "taylor")


def test_example_config_in_deploy_is_valid_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_config(REPO / "deploy" / "edge-lstm.example.toml")
    assert c.model.path == "/opt/edge-lstm/models/taylor"
    # the example lists every key of the schema, so it documents them all
    text = (REPO / "deploy" / "edge-lstm.example.toml").read_text()
    for line in to_toml(Config()).splitlines():
        if " = " in line:
            key = line.split(" = ")[0]
            if key != "password":  # deliberately not offered in the example
                assert f"\n{key} = " in text, key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mqtt]\nhots = 'x'\n", "unknown key 'hots' in section [mqtt]"),
        ("[mqttt]\nhost = 'x'\n", "unknown section [mqttt]"),
        ("[mqtt]\nport = '1883'\n", "mqtt.port: expected an integer"),
        ("[mqtt]\nport = 70000\n", "mqtt.port must be 1..65535"),
        ("[mqtt]\ntls = 1\n", "mqtt.tls: expected true or false"),
        ("[mqtt]\nprotocol = '4'\n", "mqtt.protocol: expected one of '5', '3.1.1'"),
        ("[mqtt]\nreconnect_min_s = 10\nreconnect_max_s = 5\n", "reconnect_min_s <= reconnect_max_s"),
        ("[mqtt]\nca_file = 'ca.pem'\n", "mqtt.ca_file is set but mqtt.tls is false"),
        ("[mqtt]\ntls = true\ncert_file = 'c.pem'\n", "cert_file and key_file go together"),
        ("[mqtt]\npassword = 'x'\n", "mqtt.username is empty"),
        ("[mqtt]\nusername = 'u'\npassword = 'x'\npassword_env = 'P'\n", "set only one of"),
        ("[input]\ntopics = []\n", "input.topics must list at least one topic"),
        ("[input]\ntopics = ['sensors/+/value']\n", "has no {stream} level"),
        ("[input]\ntopics = ['a/{stream}/{stream}']\n", "more than one {stream}"),
        ("[input]\ntopics = ['a/x{stream}']\n", "must be a whole topic level"),
        ("[input]\ntopics = ['a/#/{stream}']\n", "'#' must be the last level"),
        ("[output]\ntopic = 'f/#'\n", "must not contain wildcards"),
        ("[output]\nqos = 3\n", "output.qos must be 0, 1 or 2"),
        ("[engine]\nmax_batch = 512\nqueue_size = 100\n", "queue_size must be >= engine.max_batch"),
        ("[state]\ncapacity = 0\n", "state.capacity must be >= 1"),
        ("[log]\nlevel = 'verbose'\n", "log.level: expected one of"),
        ("[model]\nruntime = 'tensorflow'\n", "model.runtime: expected one of"),
        ("mqtt = 3\n", "[mqtt] must be a table"),
        ("[input]\ntimestamp_fields = ['ts', '']\n", "input.timestamp_fields must not hold an empty name"),
        ("[input]\ntimestamp_field = 'ts'\ntimestamp_fields = ['t']\n", "sets both 'timestamp_field'"),
        # Values the broker, the MQTT encoding or the machine cannot take: refused here, not at run time.
        ("[mqtt]\nsession_expiry_s = 1099511627776\n", "mqtt.session_expiry_s must be 0..4294967295"),
        ("[engine]\ndrain_timeout_s = 1e300\n", "engine.drain_timeout_s must be 0..86400"),
        ("[model]\nthreads = 100000\n", "model.threads must be 1..256"),
        ("[state]\nmax_gap_ticks = 200000\n", "state.max_gap_ticks must be 0..10000"),
        ("[mqtt]\nreconnect_max_s = 4611686018427387904\n", "reconnect_min_s <= reconnect_max_s <= 3600"),
        ("[input]\ntopics = ['']\nstream_field = 'id'\n", "input.topics: '' is empty"),
        ("[input]\ntopics = [\"sensors/\\u0000/{stream}\"]\n", "contains U+0000"),
        ("[input]\ntopics = [\"sensors/\\u0085/{stream}\"]\n", "contains U+0085"),
        ("[input]\ntopics = ['s/" + "x" * 70_000 + "/{stream}']\n", "bytes long in UTF-8; MQTT allows 65,535"),
        ("[output]\ntopic = '" + "f" * 65_500 + "/{stream}'\n", "(with a stream id of 64 characters) is 65,565"),
        ("[mqtt]\nstatus_topic = \"st\\u0001\"\n", "mqtt.status_topic 'st\\x01' contains U+0001"),
        ("[mqtt]\nclient_id = \"a\\ufdd0\"\n", "mqtt.client_id 'a\\ufdd0' contains U+FDD0"),
        ("[homeassistant]\ndiscovery_prefix = \"ha\\u0000x\"\n", "homeassistant.discovery_prefix 'ha\\x00x'"),
        ("[mqtt]\ntls = true\nca_file = 'config.toml'\n", "mqtt: the TLS files cannot be loaded (ca_file = "),
        # Filters a message can match twice, or that catch the daemon's own messages.
        ("[input]\ntopics = ['sensors/{stream}/value', 'sensors/{stream}/#']\n", "overlap: the broker delivers"),
        ("[input]\ntopics = ['s/{stream}', '+/{stream}']\n", "'s/{stream}' and '+/{stream}' overlap"),
        ("[input]\ntopics = ['#']\nstream_field = 'id'\n", "matches the daemon's own output.topic"),
        ("[input]\ntopics = ['forecasts/{stream}']\n", "matches the daemon's own output.topic 'forecasts/{stream}'"),
        ("[input]\ntopics = ['edge-lstm/{stream}/status']\n", "matches the daemon's own mqtt.status_topic"),
        ("[input]\ntopics = ['homeassistant/{stream}/#']\n[homeassistant]\nenabled = true\n",
         "matches the daemon's own homeassistant.discovery_prefix"),
    ],
)
def test_bad_configs_name_the_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[mqtt\nhost = 1"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[mqtt]\nhost = 'caf\xe9'\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)


def test_password_from_env_is_resolved_and_never_shown(tmp_path: Path) -> None:
    p = write(tmp_path, "[mqtt]\nusername = 'dev'\npassword_env = 'MQTT_PW'\n")
    c = load_config(p, environ={"MQTT_PW": "s3cret-env"})
    assert c.mqtt.password == "s3cret-env"
    shown = to_toml(c)
    assert "s3cret-env" not in shown and 'password = "***"' in shown
    with pytest.raises(ConfigError, match="'MQTT_PW' is not set"):
        load_config(p, environ={})


def test_password_file_with_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret-file\n")
    (creds / "mqtt-password").chmod(0o600)
    p = write(tmp_path, "[mqtt]\nusername = 'dev'\npassword_file = '$CREDENTIALS_DIRECTORY/mqtt-password'\n")
    c = load_config(p, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert c.mqtt.password == "s3cret-file"
    assert c.mqtt.password_file == str(creds / "mqtt-password")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY, which is not set"):
        load_config(p, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(p, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "elsewhere")})


def test_world_readable_config_with_password_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "[mqtt]\nusername = 'dev'\npassword = 'inline-secret'\n"
    with caplog.at_level(logging.WARNING, logger="edge_lstm.config"):
        load_config(write(tmp_path, text, mode=0o644))
    assert any("readable by everyone" in r.getMessage() for r in caplog.records)
    assert "inline-secret" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_lstm.config"):
        load_config(write(tmp_path, text, mode=0o600))
    assert not caplog.records


def test_filters_that_share_no_topic_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[input]\ntopics = ['sensors/{stream}/value', 'sensors/{stream}/temp', "
                                      "'plant/+/{stream}']\n"))  # fmt: skip
    assert [f.filter for f in cfg.subscriptions()] == ["sensors/+/value", "sensors/+/temp", "plant/+/+"]
    # A filter that starts with a wildcard matches no "$" topic.
    load_config(write(tmp_path, "[input]\ntopics = ['#']\nstream_field = 'id'\n[output]\ntopic = '$fc/{stream}'\n"
                                "[mqtt]\nstatus_topic = '$st'\n"))  # fmt: skip
    # Forecasts of a stream named "reading" would match this filter, but no other stream's would: accepted.
    load_config(write(tmp_path, "[input]\ntopics = ['home/{stream}/reading']\n"
                                "[output]\ntopic = 'home/forecasts/{stream}'\n"))  # fmt: skip


def test_topic_filters_and_stream_level() -> None:
    f = TopicFilter.parse("site/+/{stream}/temp")
    assert f.filter == "site/+/+/temp" and f.stream_level == 2
    assert f.stream_of("site/a/kitchen/temp") == "kitchen"
    g = TopicFilter.parse("bulk/#")
    assert g.stream_level is None and g.stream_of("bulk/x") is None
    c = parse_config({"input": {"topics": ["bulk/#"], "stream_field": "id"}})
    assert [s.filter for s in c.subscriptions()] == ["bulk/#"]
    assert c.output_topic("kitchen") == "forecasts/kitchen"


def test_generated_reference_is_committed_and_current() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "run: edge-lstm config-docs -o docs/configuration.md"


def test_reference_documents_every_field() -> None:
    doc = reference_markdown()
    for line in to_toml(Config()).splitlines():
        if " = " in line:
            assert f"| `{line.split(' = ')[0]}` |" in doc


def test_timestamp_fields_default_and_the_older_single_key(tmp_path: Path) -> None:
    """docs/formats.md: the first of ts, timestamp, time; the older `timestamp_field` still reads."""
    assert load_config(write(tmp_path, "")).input.timestamp_fields == ["ts", "timestamp", "time"]
    assert load_config(write(tmp_path, "[input]\ntimestamp_field = 'when'\n")).input.timestamp_fields == ["when"]
    assert load_config(write(tmp_path, "[input]\ntimestamp_field = ''\n")).input.timestamp_fields == []
    c = load_config(write(tmp_path, "[input]\ntimestamp_fields = ['t', 'time']\n"))
    assert c.input.timestamp_fields == ["t", "time"] and c.input.timestamp_field == "t"


def test_a_missing_or_mistyped_model_directory_is_named_as_written(tmp_path: Path) -> None:
    from edge_lstm.modelspec import ModelError, load_model

    model = REPO / "models" / "taylor"
    for wrong in (tmp_path / "taylr", model / "typo", model / "model.tflite"):
        with pytest.raises(ModelError) as e:
            load_model(wrong)
        assert str(wrong) in str(e.value)  # never its parent, never the parent's manifest
    assert load_model(model / "manifest.json").manifest.name == "taylor"
