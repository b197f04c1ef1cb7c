"""The systems under test: the ceiling republisher, the naive script and the daemon, each in its own process.

The broker and the daemon process reuse the test suite's helpers (``tests/support``): a private
Mosquitto on a free loopback port and ``edge-lstm run`` with a generated configuration.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import ceiling, naive
from bench.mqttload import IN_ROOT
from edge_lstm.config import MqttProtocol
from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess

_LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BENCH_CAPACITY = 20_000  # room for the streams of every stream count in one daemon run


_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(p(\d+),")
# Mosquitto's protocol numbers in that log line (its enum mosquitto__protocol)
_BROKER_PROTOCOLS = {"1": "3.1", "2": "3.1.1", "5": "5"}


def client_protocols(broker: Broker, roles: Mapping[str, str]) -> dict[str, list[str]]:
    """The MQTT versions the broker says each kind of client connected with, from its log.

    ``roles`` maps a client id prefix to a role name (e.g. ``{"bench-gen-": "generator"}``);
    clients matching none are left out.  What the broker saw, not what the clients were told.
    """
    seen: dict[str, set[str]] = {}
    for client_id, level in _CONNECTED.findall(broker.log()):
        for prefix, role in roles.items():
            if client_id.startswith(prefix):
                seen.setdefault(role, set()).add(_BROKER_PROTOCOLS.get(level, f"p{level}"))
    return {role: sorted(v) for role, v in sorted(seen.items())}


def start_broker(workdir: Path) -> Broker:
    """A private Mosquitto for the whole run (loopback only, no persistence)."""
    return Broker(
        workdir / "broker",
        extra_config=["max_inflight_messages 100", "max_queued_messages 1000000", "set_tcp_nodelay true"],
    ).start()


class Script:
    """A one-file MQTT client run as ``python -m MODULE HOST PORT QOS PROTOCOL IN_ROOT`` in a subprocess."""

    module = ""
    out_filter = ""
    in_root = ""
    name = ""

    def __init__(self, broker: Broker, qos: int, protocol: MqttProtocol = MqttProtocol.V5) -> None:
        self.protocol = protocol
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                broker.host,
                str(broker.port),
                str(qos),
                protocol.value,
                self.in_root,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"{self.name} ({self.module}) did not start (said {line!r})")
        self._pid = self.proc.pid

    @property
    def pid(self) -> int:
        return self._pid

    def drops(self) -> int:
        return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Ceiling(Script):
    """``python -m bench.ceiling``: the paho echo, no model."""

    module = "bench.ceiling"
    out_filter = ceiling.OUT_FILTER
    in_root = ceiling.IN_ROOT
    name = "ceiling"


class Naive(Script):
    """``python -m bench.naive``: one LiteRT invoke per message, the script a user would write."""

    module = "bench.naive"
    out_filter = naive.OUT_FILTER
    in_root = naive.IN_ROOT
    name = "naive"


def daemon_overrides(
    qos: int,
    capacity: int = BENCH_CAPACITY,
    protocol: MqttProtocol = MqttProtocol.V5,
    **extra: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "mqtt": {"protocol": protocol.value},
        "input": {"topics": [f"{Daemon.in_root}/{{stream}}/value"]},
        "output": {"qos": qos},
        "state": {"capacity": capacity, "checkpoint_interval_s": 3600},
        "log": {"level": "warning"},
    }
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


class Daemon:
    """``edge-lstm run`` on the bundled model, configured for the benchmark."""

    out_filter = "forecasts/+"
    in_root = IN_ROOT
    name = "daemon"

    def __init__(
        self,
        broker: Broker,
        workdir: Path,
        qos: int,
        *,
        capacity: int = BENCH_CAPACITY,
        protocol: MqttProtocol = MqttProtocol.V5,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``settings``: more configuration, ``{section: {key: value}}`` (``python -m bench --set``)."""
        self.protocol = protocol
        overrides = daemon_overrides(qos, capacity, protocol, **(settings or {}))
        self.process = DaemonProcess(workdir, broker, overrides=overrides, env=env)
        if start:
            self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        for attempt in range(3):
            try:
                return self.process.metrics()
            except OSError:
                if attempt == 2:
                    raise
                time.sleep(0.2)
        return {}

    def drops(self) -> int:
        """Readings not processed (internal errors, stopped) plus forecasts not published."""
        m = self.metrics()
        total = m.get(("edge_lstm_publish_failures_total", ()), 0.0)
        for outcome in ("internal_error", "shutdown"):
            total += m.get(("edge_lstm_readings_total", (("outcome", outcome),)), 0.0)
        return int(total)

    def close(self) -> None:
        self.process.close()
