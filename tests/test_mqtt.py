"""The MQTT link against a real Mosquitto: protocols, persistent session, auth, TCP_NODELAY, status."""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.config import MqttConfig, MqttProtocol
from edge_lstm.mqtt import Inbound, MqttLink, filter_pattern, publish_packet_size
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


class Driver:
    """Drives a link as the daemon's loop does: ``poll`` on one thread; other calls go through :meth:`call`."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.got: list[Inbound] = []
        self.published: list[tuple[object, bool]] = []
        self.connections: list[bool] = []
        self._calls: queue.Queue[tuple[Callable[[], object], queue.Queue[object]]] = queue.Queue()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        link.on_message = self._on_message
        link.on_published = self._on_published
        link.on_connection = self.connections.append
        self._thread = threading.Thread(target=self._run, name="serve", daemon=True)

    def _on_message(self, m: Inbound) -> None:
        with self._cond:
            self.got.append(m)
            self._cond.notify_all()

    def _on_published(self, token: object, ok: bool) -> None:
        with self._cond:
            self.published.append((token, ok))
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.link.poll(0.02)
            while not self._calls.empty():
                fn, out = self._calls.get()
                out.put(fn())

    def start(self) -> Driver:
        self.link.begin()
        self._thread.start()
        return self

    def call(self, fn: Callable[[], object]) -> object:
        out: queue.Queue[object] = queue.Queue()
        self._calls.put((fn, out))
        return out.get(timeout=10)

    def wait(self, cond: Callable[[], bool], timeout: float = 15.0) -> bool:
        with self._cond:
            return self._cond.wait_for(cond, timeout=timeout)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.link.connected:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.link.close()


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_link_delivers_messages_and_keeps_its_session_across_reconnects(broker: Broker, protocol: MqttProtocol) -> None:
    link = MqttLink(link_config(broker, protocol=protocol), "t/status")
    link.subscribe("in/+/v")
    d = Driver(link).start()
    try:
        assert d.wait_connected()
        # TCP_NODELAY is on: no Nagle delay for forecasts published right after a read
        sock = link.client.socket()
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        pub(broker, "in/a/v", "1")
        assert d.wait(lambda: len(d.got) >= 1)
        m = d.got[0]
        assert (m.topic, m.payload, m.qos, m.dup, m.retain) == ("in/a/v", b"1", 1, False, False)
        d.call(lambda: link.ack(m.mid, m.qos))
    finally:
        d.stop()
    # QoS 1 readings published while away wait in the persistent session
    pub(broker, "in/b/v", "2")
    d2 = Driver(MqttLink(link_config(broker, protocol=protocol), "t/status")).start()
    d2.link.subscribe("in/+/v")
    try:
        assert d2.wait(lambda: len(d2.got) >= 1)
        assert [(m.topic, m.payload) for m in d2.got] == [("in/b/v", b"2")]  # the acknowledged one is not back
    finally:
        d2.stop()


def test_unacknowledged_messages_come_back_after_reconnect_marked_as_duplicates(broker: Broker) -> None:
    """Acknowledgement is manual: a message not acknowledged stays with the broker, which sends it again (DUP)."""
    link = MqttLink(link_config(broker), "t/status")
    link.subscribe("in/#")
    d = Driver(link).start()
    try:
        assert d.wait_connected()
        pub(broker, "in/x", "kept")
        assert d.wait(lambda: len(d.got) == 1)
    finally:
        d.stop()
    first = d.got[0]
    assert not first.dup
    link2 = MqttLink(link_config(broker), "t/status")
    link2.subscribe("in/#")
    d2 = Driver(link2).start()
    try:
        assert d2.wait(lambda: len(d2.got) == 1)
        again = d2.got[0]
        # the same packet id and content, flagged as sent before: what the pipeline's redelivery check relies on
        assert (again.payload, again.mid, again.dup) == (b"kept", first.mid, True)
        d2.call(lambda: link2.ack(again.mid, again.qos))
    finally:
        d2.stop()
    link3 = MqttLink(link_config(broker), "t/status")
    link3.subscribe("in/#")
    d3 = Driver(link3).start()
    try:
        assert d3.wait_connected()
        time.sleep(0.5)
        assert d3.got == []  # acknowledged: gone from the session
    finally:
        d3.stop()


def test_status_online_when_ready_and_offline_on_stop(broker: Broker) -> None:
    with Collector(broker.host, broker.port, ["t/status"]) as col:
        link = MqttLink(link_config(broker), "t/status")
        d = Driver(link).start()
        assert d.wait_connected()
        assert d.connections == [True]
        assert not col.select("t/status")  # connected is not ready
        d.call(link.set_ready)
        assert col.wait_payload("t/status", b"online", timeout=10)
        d.stop()
        assert col.wait_payload("t/status", b"offline", timeout=10)
        assert d.connections == [True, False]
    with Collector(broker.host, broker.port, ["t/status"]) as col:
        msgs = col.wait_for(1, timeout=10)
        assert msgs[0].retain and msgs[0].payload == b"offline"


def test_reconnects_after_the_broker_restarts_and_resends_unacknowledged_publishes(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_lstm.mqtt")
    link = MqttLink(link_config(broker), "t/status")
    d = Driver(link).start()
    try:
        assert d.wait_connected()
        broker.stop()
        assert d.wait(lambda: d.connections[-1:] == [False], timeout=15)
        # Published while the broker is down: queued, reported only once the broker has them.
        assert d.call(lambda: link.publish("out/x", b"while-down", 1, False, "t1")) is True
        assert d.call(lambda: link.publish("out/q0", b"lost", 0, False, "t0")) is False  # QoS 0 cannot wait
        assert d.published == []
        broker.start()
        assert d.wait(lambda: d.published == [("t1", True)], timeout=30), d.published
        assert link.connects == 2
        # The broker (no persistence) came back without the session: readings it held are gone, and the log says so.
        assert "MQTT broker kept no session for client id 'link-test'" in caplog.text
    finally:
        d.stop()


@pytest.fixture
def password_broker(broker_factory: Callable[..., Broker], tmp_path: Path) -> Broker:
    return broker_factory(listener_config=password_acl_listener(tmp_path, "right-pw")).start()


def test_bad_password_is_reported_clearly_and_never_logged(
    password_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = link_config(password_broker, username="edge", password="wrong-pw", reconnect_max_s=8)
    with caplog.at_level(logging.INFO):
        link = MqttLink(cfg, "edge-lstm/x/status")
        d = Driver(link).start()
        try:
            assert not d.wait_connected(7)
            assert "Bad user name or password" in link.last_error or "Not authorized" in link.last_error
        finally:
            d.stop()
    refused = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refused and ("check mqtt.username and the password" in refused[0] or "does not allow" in refused[0])
    # Refusals back off (1, 2, 4 s apart): not one attempt a second for as long as it lasts.
    assert 2 <= len(refused) <= 4, len(refused)
    assert "wrong-pw" not in caplog.text
    assert True not in d.connections


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


def test_publishing_never_blocks_and_every_publish_is_reported_once_acknowledged(broker: Broker) -> None:
    n = 15_000
    with Collector(broker.host, broker.port, ["burst/#"]) as col:
        link = MqttLink(link_config(broker), "t/status")
        d = Driver(link).start()
        try:
            assert d.wait_connected()
            t0 = time.monotonic()
            ok = d.call(lambda: sum(link.publish("burst/x", b"%d" % i, 1, False, i) for i in range(n)))
            queued_s = time.monotonic() - t0
            assert ok == n
            assert d.wait(lambda: len(d.published) == n, timeout=60)
            assert sorted(t for t, _ in d.published) == list(range(n)) and all(ok for _, ok in d.published)
            assert len(col.wait_for(n, "burst/#", timeout=60)) == n
            assert link.outstanding == 0
        finally:
            d.stop()
    assert queued_s < 30  # queued without waiting for the broker (a generous bound, not a benchmark)


def test_readings_with_and_without_mqtt5_properties_arrive_alike(broker: Broker) -> None:
    """The lean path takes plain PUBLISH packets; one with properties (a publisher's user property, an
    expiry) goes through paho's decoder. Both reach the owner the same way, from a real Mosquitto."""
    from edge_lstm.mqtt import LeanClient

    link = MqttLink(link_config(broker), "t/status")
    link.subscribe("in/+/v")
    d = Driver(link).start()
    try:
        assert d.wait_connected()
        assert isinstance(link.client, LeanClient)
        pub(broker, "in/a/v", "1")
        pub(broker, "in/b/v", "2", "-V", "mqttv5", "-D", "publish", "user-property", "site", "kitchen",
            "-D", "publish", "message-expiry-interval", "60")  # fmt: skip
        pub(broker, "in/c/v", "3", "-q", "0")
        assert d.wait(lambda: len(d.got) >= 3)
        got = sorted((m.topic, m.payload, m.qos) for m in d.got)
        assert got == [("in/a/v", b"1", 1), ("in/b/v", b"2", 1), ("in/c/v", b"3", 0)]
        assert link.client.lean_packets >= 2  # the plain two (and SUBACK/CONNACK went to paho)
        for m in d.got:
            d.call(lambda m=m: link.ack(m.mid, m.qos))  # type: ignore[misc]
    finally:
        d.stop()
    # acknowledged through the write buffer: nothing comes back in the next session
    d2 = Driver(MqttLink(link_config(broker), "t/status"))
    d2.link.subscribe("in/+/v")
    d2.start()
    try:
        assert d2.wait_connected()
        pub(broker, "in/z/v", "9")
        assert d2.wait(lambda: len(d2.got) >= 1)
        assert [(m.topic, m.payload) for m in d2.got] == [("in/z/v", b"9")]
    finally:
        d2.stop()


def test_a_publish_mqtt_cannot_carry_is_refused_and_counted_not_raised(broker: Broker) -> None:
    with Collector(broker.host, broker.port, ["ok/#"]) as col:
        link = MqttLink(link_config(broker), "t/status")
        d = Driver(link).start()
        try:
            assert d.wait_connected()
            too_long = "x/" + "y" * 65_535  # over MQTT's 65,535 bytes: paho raises ValueError before sending
            assert d.call(lambda: link.publish(too_long, b"1", 1, False, "long")) is False
            assert link.unsendable == 1 and link.outstanding == 0
            assert d.call(lambda: link.publish("ok/after", b"2", 1, False, "after")) is True
            assert d.wait(lambda: d.published == [("after", True)])
            assert [m.payload for m in col.wait_for(1, "ok/#")] == [b"2"]
        finally:
            d.stop()


def test_a_publish_over_the_brokers_maximum_packet_size_is_refused_not_sent(
    broker_factory: Callable[..., Broker],
) -> None:
    """MQTT 5 brokers announce their maximum packet size; a larger PUBLISH would make the broker close the
    connection, and paho would send it again on every reconnect, wedging every other publish behind it."""
    broker = broker_factory(extra_config=["max_packet_size 400"]).start()
    with Collector(broker.host, broker.port, ["ok/#"]) as col:
        link = MqttLink(link_config(broker), "t/status")
        d = Driver(link).start()
        try:
            assert d.wait_connected()
            assert link.max_packet == 400
            body = b"x" * 420
            # Exactly at the limit goes out, one byte more does not (fixed header 3, topic 2 + 6, id 2, props 1).
            assert publish_packet_size("ok/big", b"x" * 386, 1) == 400
            assert publish_packet_size("ok/big", body, 1) > 400 >= publish_packet_size("ok/fits", body[:360], 1)
            assert d.call(lambda: link.publish("ok/big", body, 1, False, "big")) is False
            assert link.unsendable == 1 and link.outstanding == 0
            assert d.call(lambda: link.publish("ok/fits", body[:360], 1, False, "fits")) is True
            assert d.call(lambda: link.publish("ok/big", b"x" * 386, 1, False, "edge")) is True  # 400 bytes
            assert d.wait(lambda: d.published == [("fits", True), ("edge", True)])
            assert [m.topic for m in col.wait_for(2, "ok/#")] == ["ok/fits", "ok/big"]
            assert link.connects == 1  # never dropped: the broker took the 400-byte packet
        finally:
            d.stop()


def test_two_clients_with_one_id_back_off_instead_of_fighting_every_second(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker closes the older of two connections with one client id. Each link's backoff starts over only
    after a connection that held, so two daemons configured alike reconnect ever more slowly, not every second."""
    caplog.set_level(logging.WARNING, logger="edge_lstm.mqtt")
    links = [MqttLink(link_config(broker, reconnect_max_s=8), "t/status") for _ in range(2)]
    drivers = [Driver(link) for link in links]
    try:
        for d in drivers:
            d.start()
        time.sleep(14.0)
        connects = sum(link.connects for link in links)
    finally:
        for d in drivers:
            d.stop()
    # Without backoff: a connection every second or so for each link (15 in 14 s here); with it: 1, 2, 4, 8 s apart.
    assert 2 <= connects <= 10, connects
    assert "another client may be using client id 'link-test'" in caplog.text


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


def test_each_topic_goes_to_the_input_filter_it_matches() -> None:
    from edge_lstm.config import parse_config
    from edge_lstm.pipeline import routes_of

    cfg = parse_config({"input": {"topics": ["a/{stream}/v", "c/#", "b/{stream}"], "stream_field": "id"}})
    route = routes_of(cfg)
    assert route("a/x/v").template == "a/{stream}/v"  # type: ignore[union-attr]
    assert route("c/x/w").template == "c/#"  # type: ignore[union-attr]
    assert route("b/1").stream_of("b/1") == "1"  # type: ignore[union-attr]
    assert route("old/topic") is None  # a subscription an earlier configuration left in the session
    assert route(None) is None  # a topic that is not UTF-8


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


def test_shared_property_tables_keep_pahos_mqtt5_properties_working() -> None:
    """The link shares paho's per-packet property tables (a speed-up); properties still pack, unpack,
    clear and refuse what does not apply exactly as paho's own code does."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import MQTTException, Properties

    from edge_lstm.mqtt import share_property_tables

    assert share_property_tables()
    sent = Properties(PacketTypes.PUBLISH)
    sent.MessageExpiryInterval = 60
    sent.ContentType = "application/json"
    sent.UserProperty = ("site", "kitchen")
    sent.UserProperty = ("unit", "C")
    packed = sent.pack()
    got = Properties(PacketTypes.PUBLISH)
    _, used = got.unpack(packed + b"payload")
    assert used == len(packed)
    assert got.json() == {
        "MessageExpiryInterval": 60,
        "ContentType": "application/json",
        "UserProperty": [("site", "kitchen"), ("unit", "C")],
    }
    got.unpack(b"\x00")  # the next packet has none: nothing of the last one stays
    assert got.json() == {} and not hasattr(got, "UserProperty")
    assert Properties(PacketTypes.PUBLISH).json() == {}  # instances share tables, not values
    with pytest.raises(MQTTException):
        Properties(PacketTypes.PUBACK).MessageExpiryInterval = 5  # does not apply to PUBACK
    with pytest.raises(MQTTException):
        Properties(PacketTypes.PUBLISH).NoSuchProperty = 1
