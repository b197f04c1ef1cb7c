"""The MQTT link against a real Mosquitto: protocols, persistent session, auth, TCP_NODELAY, status."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edge_lstm.config import MqttConfig, MqttProtocol
from edge_lstm.metrics import Metrics
from edge_lstm.mqtt import MqttLink, filter_pattern
from tests.support.broker import Broker, password_acl_listener
from tests.support.collector import Collector
from tests.support.daemon import DaemonProcess


def link_config(broker: Broker, **kw: object) -> MqttConfig:
    cfg = MqttConfig(host=broker.host, port=broker.port, client_id="link-test", reconnect_min_s=1, reconnect_max_s=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def pub(broker: Broker, topic: str, payload: str, *extra: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic, "-m", payload, *extra],
        check=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_link_routes_messages_and_keeps_its_session_across_reconnects(broker: Broker, protocol: MqttProtocol) -> None:
    got: list[tuple[str, bytes]] = []
    arrived = threading.Condition()

    def handler(topic: str, payload: bytes) -> bool:
        with arrived:
            got.append((topic, payload))
            arrived.notify_all()
        return True

    def wait_count(n: int) -> bool:
        with arrived:
            return arrived.wait_for(lambda: len(got) >= n, timeout=15)

    link = MqttLink(link_config(broker, protocol=protocol), "t/status")
    link.route("in/+/v", handler)
    link.start()
    try:
        assert link.wait_connected(10)
        # TCP_NODELAY is on: no Nagle delay for forecasts published right after a read
        sock = link.client.socket()
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        pub(broker, "in/a/v", "1")
        pub(broker, "other/topic", "x")  # not routed
        assert wait_count(1)
        assert got == [("in/a/v", b"1")]
        link.stop()
        # QoS 1 readings published while away wait in the persistent session
        pub(broker, "in/b/v", "2")
        link2 = MqttLink(link_config(broker, protocol=protocol), "t/status")
        link2.route("in/+/v", handler)
        link2.start()
        try:
            assert wait_count(2)
            assert got[1] == ("in/b/v", b"2")
        finally:
            link2.stop()
    finally:
        link.stop()


def test_unacknowledged_messages_come_back_after_reconnect(broker: Broker) -> None:
    """A handler that refuses a message (the daemon does while stopping) leaves it with the broker."""
    refused: list[bytes] = []
    taken: list[bytes] = []
    event = threading.Event()

    def refuse(_t: str, payload: bytes) -> bool:
        refused.append(payload)
        event.set()
        return False

    def take(_t: str, payload: bytes) -> bool:
        taken.append(payload)
        event.set()
        return True

    link = MqttLink(link_config(broker), "t/status")
    link.route("in/#", refuse)
    link.start()
    assert link.wait_connected(10)
    pub(broker, "in/x", "kept")
    assert event.wait(10)
    link.stop()
    event.clear()
    link2 = MqttLink(link_config(broker), "t/status")
    link2.route("in/#", take)
    link2.start()
    try:
        assert event.wait(15)
        assert refused == [b"kept"] and taken == [b"kept"]
    finally:
        link2.stop()


def test_status_online_when_ready_and_offline_on_stop(broker: Broker) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_collectors=False)
    with Collector(broker.host, broker.port, ["t/status"]) as col:
        link = MqttLink(link_config(broker), "t/status", metrics)
        link.start()
        assert link.wait_connected(10)
        assert registry.get_sample_value("edge_lstm_mqtt_connected") == 1
        assert not col.select("t/status")  # connected is not ready
        link.set_ready()
        assert col.wait_payload("t/status", b"online", timeout=10)
        link.stop()
        assert col.wait_payload("t/status", b"offline", timeout=10)
        assert registry.get_sample_value("edge_lstm_mqtt_connected") == 0
    with Collector(broker.host, broker.port, ["t/status"]) as col:
        msgs = col.wait_for(1, timeout=10)
        assert msgs[0].retain and msgs[0].payload == b"offline"


@pytest.fixture
def password_broker(broker_factory: Callable[..., Broker], tmp_path: Path) -> Broker:
    return broker_factory(listener_config=password_acl_listener(tmp_path, "right-pw")).start()


def test_bad_password_is_reported_clearly_and_never_logged(
    password_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_collectors=False)
    cfg = link_config(password_broker, username="edge", password="wrong-pw")
    with caplog.at_level(logging.INFO):
        link = MqttLink(cfg, "edge-lstm/x/status", metrics)
        link.start()
        try:
            assert not link.wait_connected(3)
            assert "Bad user name or password" in link.last_error or "Not authorized" in link.last_error
        finally:
            link.stop()
    refused = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refused and ("check mqtt.username and the password" in refused[0] or "does not allow" in refused[0])
    assert "wrong-pw" not in caplog.text
    assert registry.get_sample_value("edge_lstm_mqtt_connected") == 0


def test_daemon_with_password_and_acl_forecasts(
    password_broker: Broker, daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    secret = tmp_path / "creds" / "mqtt-password"
    secret.parent.mkdir()
    secret.write_text("right-pw\n")
    secret.chmod(0o600)
    d = daemon_factory(
        password_broker,
        overrides={"mqtt": {"username": "edge", "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}},
        env={"CREDENTIALS_DIRECTORY": str(secret.parent)},
    )
    # no anonymous status watcher on this broker: wait for the metrics instead
    d.start(wait_online=False)
    assert d.wait_metric("edge_lstm_mqtt_connected", 1, timeout=20) == 1, d.log()
    subprocess.run(
        ["mosquitto_pub", "-h", password_broker.host, "-p", str(password_broker.port), "-q", "1",
         "-u", "sensor", "-P", "sensor-pw", "-t", "sensors/acl/value", "-m", "25000"],
        check=True, timeout=30,
    )  # fmt: skip
    assert d.wait_metric("edge_lstm_forecasts_published_total", 1, timeout=20) == 1, d.log()
    assert "right-pw" not in d.log()
    assert d.terminate() == 0


def test_daemon_refused_by_broker_logs_reason_and_stops_on_sigterm(
    password_broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(
        password_broker, overrides={"mqtt": {"username": "edge", "password_env": "PW"}}, env={"PW": "no"}
    )
    d.start(wait_online=False)
    deadline = time.monotonic() + 20
    while "refused the connection" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "refused the connection: Bad user name or password" in d.log() or "Not authorized" in d.log()
    assert d.metric("edge_lstm_mqtt_connected") == 0
    assert d.terminate() == 0  # not ready yet, still stops cleanly


def test_publish_bursts_beyond_pahos_queue_wait_instead_of_dropping(broker: Broker) -> None:
    from edge_lstm.mqtt import MAX_QUEUED_PUBLISHES

    registry = CollectorRegistry()
    metrics = Metrics(registry, process_collectors=False)
    n = MAX_QUEUED_PUBLISHES + 5000
    with Collector(broker.host, broker.port, ["burst/#"]) as col:
        link = MqttLink(link_config(broker), "t/status", metrics)
        link.start()
        try:
            assert link.wait_connected(10)
            ok = sum(link.publish("burst/x", b"%d" % i, qos=1) for i in range(n))
            assert ok == n
            assert len(col.wait_for(n, "burst/#", timeout=60)) == n
        finally:
            link.stop()
    assert registry.get_sample_value("edge_lstm_publish_failures_total") == 0


def _make_pki(d: Path) -> dict[str, Path]:
    """A test CA, a broker certificate for 127.0.0.1 and a client certificate (openssl)."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=edge-lstm test CA")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    for p in d.iterdir():
        p.chmod(0o600)
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_daemon_over_tls_with_client_certificate(
    broker_factory: Callable[..., Broker], daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = _make_pki(pki_dir)
    tls_broker = broker_factory(
        listener_config="listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n"
        "require_certificate true",
    ).start()
    d = daemon_factory(
        tls_broker,
        overrides={
            "mqtt": {
                "tls": True,
                "ca_file": str(pki["ca.crt"]),
                "cert_file": str(pki["client.crt"]),
                "key_file": str(pki["client.key"]),
            }
        },
    )
    d.start(wait_online=False)
    assert d.wait_metric("edge_lstm_mqtt_connected", 1, timeout=20) == 1, d.log()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(tls_broker.port), "-q", "1", "--cafile", str(pki["ca.crt"]),
         "--cert", str(pki["client.crt"]), "--key", str(pki["client.key"]),
         "-t", "sensors/tls/value", "-m", "25000"],
        check=True, timeout=30,
    )  # fmt: skip
    assert d.wait_metric("edge_lstm_forecasts_published_total", 1, timeout=20) == 1, d.log()
    assert d.terminate() == 0


def test_first_matching_route_takes_a_message_and_unmatched_ones_are_acknowledged() -> None:
    # Pure unit test of the routing in on_message (no broker): a stand-in client records acks.
    import paho.mqtt.client as paho

    link = MqttLink(MqttConfig(host="127.0.0.1", port=1), "status")
    got: list[tuple[str, str, bytes]] = []
    link.route("a/+/v", lambda t, p: got.append(("first", t, p)) is None)
    link.route("a/#", lambda t, p: got.append(("second", t, p)) is None)
    link.route("b/#", lambda t, p: False)  # refuses: the message must stay unacknowledged

    class Client:
        def __init__(self) -> None:
            self.acks: list[int] = []

        def ack(self, mid: int, qos: int) -> None:
            self.acks.append(mid)

    client = Client()

    def deliver(mid: int, topic: bytes, payload: bytes = b"1") -> None:
        msg = paho.MQTTMessage(mid, topic)
        msg.qos, msg.payload = 1, payload
        link._on_message(client, None, msg)  # type: ignore[arg-type]

    for _ in range(2):
        deliver(1, b"a/x/v", b"10")
        deliver(2, b"a/x/w", b"20")
        deliver(3, b"old/topic")  # a subscription an earlier configuration left in the session
        deliver(4, b"b/1")
        deliver(5, b"a/\xff/v")  # not UTF-8
    assert got == [("first", "a/x/v", b"10"), ("second", "a/x/w", b"20")] * 2
    assert client.acks == [1, 2, 3, 5] * 2


_level = st.sampled_from(["a", "b", "", "$SYS", "x y", "+", "#"])
_topic_level = _level.filter(lambda v: v not in ("+", "#"))


@settings(max_examples=400, deadline=None)
@given(st.lists(_level, min_size=1, max_size=4), st.lists(_topic_level, min_size=1, max_size=5))
def test_filter_pattern_matches_what_paho_matches(filter_levels: list[str], topic_levels: list[str]) -> None:
    if "#" in filter_levels[:-1]:
        filter_levels = filter_levels[: filter_levels.index("#") + 1]  # '#' only last: a valid filter
    topic_filter, topic = "/".join(filter_levels), "/".join(topic_levels)
    import paho.mqtt.client as paho

    want = paho.topic_matches_sub(topic_filter, topic)
    assert bool(filter_pattern(topic_filter).fullmatch(topic)) == want, (topic_filter, topic)
