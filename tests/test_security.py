"""Security: TLS with client certificates, password + ACL, hostile stream ids, secrets, metrics bind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_lstm import checkpoint as ckpt
from edge_lstm.config import Config
from edge_lstm.journal import JOURNAL_NAME
from edge_lstm.payload import sanitise_stream_id
from tests.support.broker import Broker, password_acl_listener
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_MODEL, DaemonProcess, to_toml
from tests.support.faults import record, reliability_report  # noqa: F401
from tests.support.syscalls import tcp_sockets

from .support.certs import Pki, make_pki, tls_listener

pytestmark = pytest.mark.usefixtures("reliability_report")

SAFE_TOPIC = re.compile(r"forecasts/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
PASSWORD = "s3cr3t-Pa55-w0rd"


def _wait_log(d: DaemonProcess, words: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if words in d.log():
            return True
        time.sleep(0.1)
    return False


# -- S1: TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_client_certificate_works_and_bad_certificates_fail_clearly(
    pki: Pki, broker_factory: Callable[..., Broker], daemon_factory: Callable[..., DaemonProcess]
) -> None:
    good = broker_factory(listener_config=tls_listener(pki)).start()
    expired_broker = broker_factory(listener_config=tls_listener(pki, expired_server=True)).start()

    def tls(ca: Path, cert: Path, key: Path) -> dict[str, object]:
        return {"mqtt": {"tls": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}}

    ok = daemon_factory(good, overrides=tls(pki.ca, pki.client_cert, pki.client_key))
    cases = {
        # name: (daemon, words in its log)
        "wrong CA (broker's certificate from another CA)": (
            daemon_factory(good, overrides=tls(pki.rogue_ca, pki.client_cert, pki.client_key)),
            "TLS: the broker's certificate was not accepted: self-signed certificate in certificate chain",
        ),
        "expired broker certificate": (
            daemon_factory(expired_broker, overrides=tls(pki.ca, pki.client_cert, pki.client_key)),
            "TLS: the broker's certificate was not accepted: certificate has expired",
        ),
        "expired client certificate": (
            daemon_factory(good, overrides=tls(pki.ca, pki.expired_client_cert, pki.expired_client_key)),
            "certificate expired",
        ),
        "client certificate from another CA": (
            daemon_factory(good, overrides=tls(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)),
            "unknown ca",
        ),
    }
    for d, _w in cases.values():
        d.start(wait_online=False)
    ok.start(wait_online=False)
    assert ok.wait_metric("edge_lstm_mqtt_connected", 1, timeout=20) == 1, ok.log()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(good.port), "-q", "1", "--cafile", str(pki.ca),
         "--cert", str(pki.client_cert), "--key", str(pki.client_key), "-t", "sensors/tls/value", "-m", "25000"],
        check=True, timeout=30,
    )  # fmt: skip
    assert ok.wait_metric("edge_lstm_forecasts_published_total", 1, timeout=20) == 1, ok.log()
    record("S1", "client certificate signed by the test CA, require_certificate true", "connected, 1 forecast",
           "forecast published over TLS")  # fmt: skip
    for name, (d, words) in cases.items():
        assert _wait_log(d, words), (name, d.log())
        assert d.metric("edge_lstm_mqtt_connected") == 0
        assert d.running, name  # keeps retrying with backoff; never crashes
        assert d.terminate() == 0
        record("S1", name, "not connected; logged", f"log says “{words}”; process alive, exits 0 on SIGTERM")
    assert ok.terminate() == 0


# -- S2: password and ACL --------------------------------------------------------------------------------


@pytest.fixture
def acl_broker(broker_factory: Callable[..., Broker], tmp_path: Path) -> Broker:
    return broker_factory(listener_config=password_acl_listener(tmp_path, PASSWORD)).start()


def _sensor_pub(broker: Broker, topic: str, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-u", "sensor", "-P", "sensor-pw",
         "-t", topic, "-m", payload],
        check=True, timeout=30,
    )  # fmt: skip


def test_password_and_acl_confine_the_daemon_and_refusals_are_reported(
    acl_broker: Broker, daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(PASSWORD + "\n")
    (creds / "mqtt-password").chmod(0o600)
    auth = {"username": "edge", "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    inside = daemon_factory(acl_broker, overrides={"mqtt": auth, "log": {"level": "debug"}}, env=env)
    outside = daemon_factory(acl_broker, overrides={"mqtt": auth, "output": {"topic": "elsewhere/{stream}"}}, env=env)
    wrong = daemon_factory(acl_broker, overrides={"mqtt": {"username": "edge", "password_env": "PW"}},
                           env={"PW": "not-the-password"})  # fmt: skip
    for d in (inside, outside, wrong):
        d.start(wait_online=False)
    assert inside.wait_metric("edge_lstm_mqtt_connected", 1) == 1, inside.log()
    assert outside.wait_metric("edge_lstm_mqtt_connected", 1) == 1, outside.log()
    _sensor_pub(acl_broker, "sensors/acl/value", "25000")
    assert inside.wait_metric("edge_lstm_forecasts_published_total", 1) == 1, inside.log()
    assert outside.wait_metric("edge_lstm_publish_failures_total", 1) == 1, outside.log()
    assert inside.metric("edge_lstm_publish_failures_total") == 0
    assert _wait_log(outside, "MQTT broker refused a publish: Not authorized")
    # Mosquitto 2.0 answers a wrong password to an MQTT 5 client with reason 0x87 Not authorized
    assert _wait_log(wrong, "refused the connection: Not authorized (the broker does not allow this user, password")
    assert wrong.metric("edge_lstm_mqtt_connected") == 0 and wrong.running
    for d in (inside, outside, wrong):
        assert d.terminate() == 0
        assert PASSWORD not in d.log() and "not-the-password" not in d.log()
    assert "DEBUG" in inside.log()
    record("S2", "daemon inside its ACL (password from $CREDENTIALS_DIRECTORY)", "1 forecast, 0 refusals",
           "forecast published")  # fmt: skip
    record("S2", "daemon publishing outside its ACL (MQTT 5)", "publish_failures = 1",
           "PUBACK reason “Not authorized” logged and counted")  # fmt: skip
    record("S2", "wrong password", "not connected", "CONNACK reason “Not authorized” logged with a hint")
    record("S2", "password in the logs of all three (one at debug level)", 0, "0 occurrences")


# -- S3: hostile stream ids --------------------------------------------------------------------------------

HOSTILE_IDS = [
    "a+b", "a#b", "a/b/c", "+", "#", "/", "..", "../../etc/passwd", ".hidden", "...", "a\x00b", "\x00",
    "$SYS", "{stream}", "ünï cødé", "x" * 65536, "x" * 65535 + "y", " ", "a\nb", "\u202eevil",
]  # fmt: skip
WARM_TICKS = 52  # beyond the model's 48 warm-up ticks, so 1-step errors (labelled by stream) are exported
MAX_STREAM_LABELS = 5


def test_hostile_stream_ids_cannot_inject_topics_escape_the_state_dir_or_grow_labels(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(
        broker,
        overrides={
            "input": {"topics": ["sensors/{stream}/value"], "stream_field": "id", "max_payload_bytes": 4_000_000},
            "metrics": {"max_stream_labels": MAX_STREAM_LABELS},
        },
    ).start()
    state_dir = Path(d.config["state"]["dir"])
    topic_ids = ["..", "." * 3, "y" * 60_000]  # ids from the topic level itself
    # Should two raw ids ever sanitise alike they would share one stream: within a tick the
    # first is processed and the others are duplicates of it.
    per_tick = [sanitise_stream_id(s) for s in HOSTILE_IDS + topic_ids]
    expected = set(per_tick)
    want_processed = WARM_TICKS * len(expected)
    want_duplicates = WARM_TICKS * (len(per_tick) - len(expected))
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    with Collector(broker.host, broker.port, ["#"]) as col:
        infos = []
        for k in range(WARM_TICKS):
            body = [
                {"id": s, "ts": 1_000_000_000 + 1800 * k, "demand_mw": 25000.0 + 100 * (k % 7)} for s in HOSTILE_IDS
            ]
            infos.append(c.publish("sensors/x/value", json.dumps(body), qos=1))
            for s in topic_ids:
                infos.append(c.publish(f"sensors/{s}/value", json.dumps({"ts": 1_000_000_000 + 1800 * k,
                                                                          "demand_mw": 25000.0}), qos=1))  # fmt: skip
        for info in infos:
            info.wait_for_publish(30)
        n_streams = len(expected)
        total = WARM_TICKS * (len(HOSTILE_IDS) + len(topic_ids))
        assert d.wait_metric("edge_lstm_readings_received_total", total, timeout=60) == total
        processed = d.wait_metric("edge_lstm_readings_total", want_processed, outcome="processed", timeout=60)
        duplicates = d.wait_metric("edge_lstm_readings_total", want_duplicates, outcome="duplicate", timeout=10)
        col.wait_for(WARM_TICKS * n_streams, "forecasts/#", timeout=30)
        forecast_topics = {m.topic for m in col.select("forecasts/#")}
        other_topics = {
            m.topic for m in col.select() if not m.topic.startswith(("forecasts/", "sensors/", "edge-lstm/"))
        }
    c.disconnect()
    c.loop_stop()
    metrics = d.metrics()
    outcome_sum = sum(d.outcomes().values())
    labels = {dict(lab)["stream"] for (name, lab) in metrics if name == "edge_lstm_stream_abs_error"}
    assert d.terminate() == 0
    assert (processed, duplicates) == (want_processed, want_duplicates)
    assert outcome_sum == total
    assert forecast_topics == {f"forecasts/{s}" for s in expected}
    assert all(SAFE_TOPIC.fullmatch(t) and ".." not in t for t in forecast_topics), forecast_topics
    assert not other_topics, other_topics
    assert max(len(t) for t in forecast_topics) <= len("forecasts/") + 64
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([JOURNAL_NAME, ckpt.CHECKPOINT_NAME, ckpt.LOCK_NAME])
    assert not list(state_dir.parent.parent.glob("etc*")) and not Path("/etc/passwd.ckpt").exists()
    arrays = ckpt.decode_checkpoint((state_dir / ckpt.CHECKPOINT_NAME).read_bytes(), _sha())
    assert {str(s) for s in arrays["streams"].tolist()} == expected
    assert 0 < len(labels) <= MAX_STREAM_LABELS and labels <= expected
    record("S3", "raw stream ids (payload field and topic level), incl. + # / .. NUL 64 KB",
           len(HOSTILE_IDS) + len(topic_ids), "-")  # fmt: skip
    record("S3", "distinct sanitised streams forecast", n_streams, "= sanitise_stream_id() of each")
    record("S3", "readings of raw ids that sanitise alike (counted duplicate within a tick)", int(duplicates),
           "exact")  # fmt: skip
    record("S3", "forecast topics outside forecasts/[A-Za-z0-9_.-]{1,64} (no .., no leading dot)", 0, "0")
    record("S3", "messages on unexpected topics", 0, "0")
    record("S3", "longest forecast topic", max(len(t) for t in forecast_topics), "<= 74 characters")
    record("S3", "files in the state dir after the run", len(list(state_dir.iterdir())),
           f"only {ckpt.CHECKPOINT_NAME}, {JOURNAL_NAME} and {ckpt.LOCK_NAME}")  # fmt: skip
    record("S3", "per-stream metric labels", len(labels), f"<= metrics.max_stream_labels = {MAX_STREAM_LABELS}")


def _sha() -> str:
    from edge_lstm.modelspec import load_manifest

    return load_manifest(TAYLOR_MODEL).sha256


# -- S4: secrets, metrics bind, config permissions, tampered model --------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "edge_lstm", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_secrets_never_shown_world_readable_config_warned_tampered_model_refused(tmp_path: Path) -> None:
    base = {"model": {"path": str(TAYLOR_MODEL)}, "state": {"dir": str(tmp_path / "state")}}
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n")
    pwfile.chmod(0o600)
    variants = {
        "password in the file": {"username": "edge", "password": PASSWORD},
        "password_env": {"username": "edge", "password_env": "EDGE_PW"},
        "password_file": {"username": "edge", "password_file": str(pwfile)},
    }
    for name, mqtt in variants.items():
        cfg = tmp_path / f"{name.replace(' ', '_')}.toml"
        cfg.write_text(to_toml({**base, "mqtt": mqtt}))
        cfg.chmod(0o600)
        r = _cli("check-config", str(cfg), env={"EDGE_PW": PASSWORD})
        assert r.returncode == 0, r.stderr
        assert PASSWORD not in r.stdout + r.stderr, name
        assert 'password = "***"' in r.stdout, name
        assert "readable by everyone" not in r.stderr
    record("S4", "check-config output with the password in the file / env / file", "0, 0, 0 occurrences",
           "password shown as ***")  # fmt: skip

    cfg = tmp_path / "world.toml"
    cfg.write_text(to_toml({**base, "mqtt": variants["password in the file"]}))
    cfg.chmod(0o644)
    r = _cli("check-config", str(cfg))
    assert r.returncode == 0 and "holds a password and is readable by everyone" in r.stderr, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    record("S4", "config with a password, mode 0644", "warning", "“holds a password and is readable by everyone”")

    tampered = tmp_path / "tampered"
    shutil.copytree(TAYLOR_MODEL, tampered)
    blob = bytearray((tampered / "model.tflite").read_bytes())
    blob[-100] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(blob))
    cfg = tmp_path / "tampered.toml"
    cfg.write_text(to_toml({**base, "model": {"path": str(tampered)}}))
    r = _cli("check-config", str(cfg))
    assert r.returncode == 1 and "does not match its manifest" in r.stderr and "refusing" in r.stderr, r.stderr
    record("S4", "model file with one byte changed (check-config; run: see 8)", "exit 1",
           "“does not match its manifest … refusing a modified or truncated file”")  # fmt: skip


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = []
    for fields in tcp_sockets():
        addr, hexport = fields[1].rsplit(":", 1)
        if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
            found.append(addr)
    return found


def test_metrics_bind_loopback_by_default(broker: Broker, daemon_factory: Callable[..., DaemonProcess]) -> None:
    assert Config().metrics.bind == "127.0.0.1"
    d = daemon_factory(broker)
    del d.config["metrics"]["bind"]  # the default applies
    d.start()
    listeners = _listeners(d.metrics_port)
    assert d.terminate() == 0
    assert listeners == ["0100007F"], listeners  # 127.0.0.1 only, nothing on 0.0.0.0 or ::
    record("S4", "metrics endpoint listening addresses with the default config", "127.0.0.1 only",
           "no 0.0.0.0 or :: listener (/proc/net/tcp, tcp6)")  # fmt: skip
