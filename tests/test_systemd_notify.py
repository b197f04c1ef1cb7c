"""The daemon speaks systemd's notify protocol the way ``deploy/systemd/edge-lstm.service`` expects.

The daemon is started like the unit starts it: the ``edge-lstm`` console script with
``run --config FILE``, ``NOTIFY_SOCKET`` pointing at a Unix datagram socket the test listens on,
``WATCHDOG_USEC`` set, and the MQTT password handed over through ``$CREDENTIALS_DIRECTORY``
(``LoadCredential=``) to a broker that checks it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess

WATCHDOG_USEC = 2_000_000  # the daemon must ping at least every second (half of it)
PASSWORD = "s3cret-from-credentials"
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "edge-lstm.service"


class UnitLikeDaemon(DaemonProcess):
    """The daemon run through its console script, as the unit's ``ExecStart=`` does."""

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "edge-lstm"
        assert exe.exists(), "the edge-lstm console script is not installed"
        return [str(exe), "run", "--config", str(self.config_path)]


class NotifyListener:
    """A Unix datagram socket standing in for systemd's notify socket."""

    def __init__(self) -> None:
        # A short directory: socket paths are limited to about 100 bytes.
        self._dir = tempfile.TemporaryDirectory(prefix="notify-")
        self.path = os.path.join(self._dir.name, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive_until(self, done: Callable[[list[dict[str, str]]], bool], timeout: float) -> list[dict[str, str]]:
        """Collect datagrams until ``done(all so far)`` or the timeout; returns all so far."""
        deadline = time.monotonic() + timeout
        while not done([m for _, m in self.messages]):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()
        self._dir.cleanup()


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    yield listener
    listener.close()


def _count(messages: list[dict[str, str]], key: str) -> int:
    return sum(1 for m in messages if m.get(key) == "1")


def test_ready_and_watchdog_like_under_systemd(
    tmp_path: Path, broker_factory: Callable[..., Broker], notify: NotifyListener
) -> None:
    # A broker that checks passwords (anonymous clients allowed too, for the test's own watcher).
    passwd = tmp_path / "passwd"
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is not installed (package mosquitto)"
    subprocess.run([tool, "-b", "-c", str(passwd), "edge-lstm", PASSWORD], check=True, capture_output=True)
    broker = broker_factory(
        listener_config=(
            f"listener {{port}} 127.0.0.1\nallow_anonymous true\npassword_file {passwd}\n"
            # As root Mosquitto switches to its own user, which cannot read the test's files.
            f"user {getpass.getuser()}\n"
        )
    )
    broker.start()

    # LoadCredential=mqtt-password:... puts the secret in a private directory named by
    # $CREDENTIALS_DIRECTORY; the configuration refers to it.
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "mqtt-password").write_text(PASSWORD)
    (creds / "mqtt-password").chmod(0o400)
    assert "LoadCredential=mqtt-password:" in UNIT.read_text()

    daemon = UnitLikeDaemon(
        tmp_path / "daemon",
        broker,
        overrides={"mqtt": {"username": "edge-lstm", "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}},
        env={
            "NOTIFY_SOCKET": notify.path,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "CREDENTIALS_DIRECTORY": str(creds),
        },
    )
    try:
        daemon.start(wait_online=False)
        messages = notify.receive_until(lambda ms: _count(ms, "READY") >= 1, timeout=60)
        assert _count(messages, "READY") == 1, f"no READY=1 from the daemon:\n{daemon.log()}"
        ready_at = next(t for t, m in notify.messages if m.get("READY") == "1")

        # Ready means usable: connected with the password from the credential and serving metrics.
        with urllib.request.urlopen(daemon.metrics_url, timeout=5) as r:
            text = r.read().decode()
        assert "\nedge_lstm_mqtt_connected 1.0\n" in text

        # Repeated watchdog pings after READY, while idle (no traffic at all).
        messages = notify.receive_until(
            lambda _ms: sum(1 for t, m in notify.messages if t > ready_at and m.get("WATCHDOG") == "1") >= 3,
            timeout=10,
        )
        pings = [t for t, m in notify.messages if t > ready_at and m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, f"watchdog pings after READY: {len(pings)}\n{daemon.log()}"
        assert any("STATUS" in m for m in messages), "no STATUS= line for systemctl status"

        # SIGTERM (systemctl stop): STOPPING=1, then a clean exit.
        assert daemon.terminate() == 0
        messages = notify.receive_until(lambda ms: _count(ms, "STOPPING") >= 1, timeout=5)
        assert _count(messages, "STOPPING") == 1
    finally:
        daemon.close()


def test_no_watchdog_pings_without_watchdog_usec(tmp_path: Path, broker: Broker, notify: NotifyListener) -> None:
    """Without WATCHDOG_USEC (no WatchdogSec=) the daemon reports READY but sends no pings."""
    daemon = UnitLikeDaemon(tmp_path / "daemon", broker, env={"NOTIFY_SOCKET": notify.path})
    try:
        daemon.start(wait_online=False)
        messages = notify.receive_until(lambda ms: _count(ms, "READY") >= 1, timeout=60)
        assert _count(messages, "READY") == 1, daemon.log()
        # The worker would have pinged several times in this window were the watchdog enabled.
        messages = notify.receive_until(lambda _ms: False, timeout=2.5)
        assert _count(messages, "WATCHDOG") == 0
    finally:
        daemon.close()
