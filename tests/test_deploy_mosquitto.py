"""The example broker configuration in ``deploy/mosquitto/`` works as documented.

A real Mosquitto runs ``mosquitto.conf`` and ``acl`` (paths and ports rewritten for the test,
certificates made with ``openssl``, passwords with ``mosquitto_passwd``); clients then check
password authentication on both listeners, TLS on the TLS listener, and that the ACL confines
the daemon's user to its topics.
"""

from __future__ import annotations

import getpass
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.ports import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "mosquitto"
PASSWORDS = {"edge-lstm": "daemon-secret", "sensor": "sensor-secret", "viewer": "viewer-secret"}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    assert path, f"{name} is not installed (scripts/os-deps.sh test installs it)"
    return path


def _run(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _make_certificates(d: Path) -> None:
    openssl = _tool("openssl")
    subj_ca = "/CN=edge-lstm test CA"

    def ok(*args: str) -> None:
        result = _run(openssl, *args)
        assert result.returncode == 0, result.stderr

    ok("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subj_ca,
       "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
    ok("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
       "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ok("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
       "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))  # fmt: skip


@dataclass
class ExampleBroker:
    broker: Broker
    tls_port: int
    ca: Path

    @property
    def port(self) -> int:
        return self.broker.port


@pytest.fixture
def example_broker(tmp_path: Path) -> Iterator[ExampleBroker]:
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certificates(certs)
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        flags = ["-c"] if i == 0 else []
        result = _run(_tool("mosquitto_passwd"), "-b", *flags, str(passwd), user, password)
        assert result.returncode == 0, result.stderr
    acl = tmp_path / "acl"
    shutil.copy(EXAMPLE / "acl", acl)
    tls_port = free_port()
    conf = (EXAMPLE / "mosquitto.conf").read_text()
    for old, new in {
        "/etc/mosquitto/certs/": f"{certs}/",
        "/etc/mosquitto/ca_certificates/": f"{certs}/",
        "/etc/mosquitto/passwd": str(passwd),
        "/etc/mosquitto/acl": str(acl),
        "listener 1883 127.0.0.1": "listener {port} 127.0.0.1",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
    }.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    # Run as the current user (as root Mosquitto would switch to the "mosquitto" user, which
    # cannot read the test's private directory).
    broker = Broker(tmp_path / "broker", listener_config=conf + f"\nuser {getpass.getuser()}\n")
    broker.start()
    try:
        assert wait_listening("127.0.0.1", tls_port), broker.log()
        yield ExampleBroker(broker, tls_port, certs / "ca.crt")
    finally:
        broker.close()


def _client_args(b: ExampleBroker, user: str | None, *, tls: bool, password: str | None = None) -> list[str]:
    args = ["-h", "127.0.0.1", "-V", "5"]
    if tls:
        args += ["-p", str(b.tls_port), "--cafile", str(b.ca)]
    else:
        args += ["-p", str(b.port)]
    if user is not None:
        args += ["-u", user, "-P", password if password is not None else PASSWORDS[user]]
    return args


def _pub(b: ExampleBroker, user: str | None, topic: str, *, tls: bool, password: str | None = None):
    return _run(_tool("mosquitto_pub"), *_client_args(b, user, tls=tls, password=password),
                "-q", "1", "-t", topic, "-m", "21.5")  # fmt: skip


def test_sensor_reading_reaches_the_daemon_user_over_tls(example_broker: ExampleBroker) -> None:
    b = example_broker
    sub = subprocess.Popen(
        [
            _tool("mosquitto_sub"),
            *_client_args(b, "edge-lstm", tls=False),
            "-q",
            "1",
            "-t",
            "sensors/+/value",
            "-C",
            "1",
            "-W",
            "15",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The subscription must be in place before the reading is published: retry the publish
        # until the subscriber has it (QoS 1, so no reading is half-delivered).
        out = ""
        for _ in range(50):
            result = _pub(b, "sensor", "sensors/boiler/value", tls=True)
            assert result.returncode == 0, result.stderr
            try:
                out, _ = sub.communicate(timeout=0.3)
                break
            except subprocess.TimeoutExpired:
                continue
        assert out.strip() == "sensors/boiler/value 21.5"
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def test_no_access_without_the_right_password(example_broker: ExampleBroker) -> None:
    b = example_broker
    for tls in (False, True):
        assert _pub(b, None, "sensors/boiler/value", tls=tls).returncode != 0
        assert _pub(b, "sensor", "sensors/boiler/value", tls=tls, password="wrong").returncode != 0
        assert _pub(b, "sensor", "sensors/boiler/value", tls=tls).returncode == 0


def test_tls_listener_requires_tls(example_broker: ExampleBroker) -> None:
    b = example_broker
    result = _run(_tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(b.tls_port), "-V", "5",
                  "-u", "sensor", "-P", PASSWORDS["sensor"], "-t", "sensors/x/value", "-m", "1")  # fmt: skip
    assert result.returncode != 0


class _Subscriber:
    """A password-authenticated MQTT v5 client subscribed to ``#``: the ACL decides what it sees."""

    def __init__(self, b: ExampleBroker, user: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=paho.MQTTv5)
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", b.port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription not acknowledged"

    def next_topic(self) -> str:
        return self.messages.get(timeout=10)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _delivered(b: ExampleBroker, subscriber: str, publisher: str, topic: str, marker: tuple[str, str]) -> bool:
    """Does ``subscriber`` receive what ``publisher`` publishes on ``topic``?

    ``topic`` is published first and then ``marker`` (a (user, topic) the ACL lets through). Each
    publish is QoS 1 and completes before the next starts, and the broker delivers in order, so
    the first message the subscriber sees tells whether ``topic`` got through.
    """
    sub = _Subscriber(b, subscriber)
    try:
        assert _pub(b, publisher, topic, tls=False).returncode == 0
        assert _pub(b, marker[0], marker[1], tls=False).returncode == 0
        return sub.next_topic() == topic
    finally:
        sub.close()


def test_acl_confines_users_to_their_topics(example_broker: ExampleBroker) -> None:
    b = example_broker
    sensor_marker = ("sensor", "sensors/marker/value")
    daemon_marker = ("edge-lstm", "forecasts/marker")
    # The daemon reads sensor readings ...
    assert _delivered(b, "edge-lstm", "sensor", "sensors/boiler/value", sensor_marker)
    # ... but may not publish anywhere else than its forecasts and status ...
    assert _delivered(b, "viewer", "edge-lstm", "forecasts/boiler", daemon_marker)
    assert _delivered(b, "viewer", "edge-lstm", "edge-lstm/edge-lstm-pi/status", daemon_marker)
    assert not _delivered(b, "edge-lstm", "edge-lstm", "sensors/fake/value", sensor_marker)
    # ... nor read what it publishes itself.
    assert not _delivered(b, "edge-lstm", "edge-lstm", "forecasts/boiler", sensor_marker)
    # Sensors cannot publish forecasts; viewers see forecasts but no raw readings.
    assert not _delivered(b, "viewer", "sensor", "forecasts/boiler", daemon_marker)
    assert not _delivered(b, "viewer", "sensor", "sensors/boiler/value", daemon_marker)
