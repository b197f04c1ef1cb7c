"""Run ``edge-lstm run`` as a subprocess against a test broker.

Usage::

    d = DaemonProcess(tmp_path / "d", broker, overrides={"state": {"checkpoint_interval_s": 1}})
    d.start()                      # waits for the status topic to say "online"
    ...                            # publish readings; read forecasts with a Collector
    d.metric("edge_lstm_readings_total", outcome="processed")
    assert d.terminate() == 0      # SIGTERM; or d.kill() for SIGKILL
    d.start()                      # same config, same client id, same state dir

The generated config (``d.config``, a nested dict written as TOML) points at the bundled model,
keeps state in ``WORKDIR/state``, serves metrics on a free loopback port, uses a client id of its
own and switches the clock-skew check off (the bundled series is from the year 2000).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .broker import Broker
from .collector import Collector
from .ports import free_port

REPO = Path(__file__).resolve().parents[2]
TAYLOR_MODEL = REPO / "models" / "taylor"
TAYLOR_CSV = REPO / "data" / "taylor.csv"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """A nested ``{section: {key: value}}`` dict as TOML text."""
    out = []
    for section, values in config.items():
        out.append(f"[{section}]")
        out += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def merge(base: dict[str, dict[str, Any]], overrides: Mapping[str, Mapping[str, Any]] | None) -> dict:
    out = copy.deepcopy(base)
    for section, values in (overrides or {}).items():
        out.setdefault(section, {}).update(values)
    return out


def default_config(workdir: Path, broker: Broker, *, client_id: str, metrics_port: int) -> dict[str, dict[str, Any]]:
    """The default daemon config for tests (see the module docstring)."""
    return {
        "model": {"path": str(TAYLOR_MODEL)},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "client_id": client_id,
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
        },
        "input": {"topics": ["sensors/{stream}/value"], "max_clock_skew_s": 0},
        "output": {"topic": "forecasts/{stream}"},
        "state": {"dir": str(workdir / "state"), "checkpoint_interval_s": 3600},
        "metrics": {"bind": "127.0.0.1", "port": metrics_port},
        "log": {"level": "info"},
    }


class DaemonError(RuntimeError):
    pass


class DaemonProcess:
    """The daemon in a subprocess; start/stop as often as needed with the same config."""

    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        *,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.client_id = client_id or f"edge-lstm-test-{uuid.uuid4().hex[:8]}"
        self.metrics_port = free_port()
        self.config = merge(
            default_config(self.workdir, broker, client_id=self.client_id, metrics_port=self.metrics_port), overrides
        )
        self.config_path = self.workdir / "config.toml"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "daemon.log"
        self.runs = 0

    @property
    def status_topic(self) -> str:
        return str(self.config["mqtt"].get("status_topic", "edge-lstm/{client_id}/status")).replace(
            "{client_id}", self.client_id
        )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metrics']['port']}/metrics"

    def write_config(self) -> Path:
        self.config_path.write_text(to_toml(self.config))
        self.config_path.chmod(0o600)
        return self.config_path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edge_lstm", "run", "--config", str(self.config_path)]

    def start(self, *, wait_online: bool = True, timeout: float = 30.0) -> DaemonProcess:
        """Start the daemon; with ``wait_online``, return once it published ``online`` on its status topic."""
        if self.running:
            raise DaemonError("daemon already running")
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if "NOTIFY_SOCKET" not in self.env:
            env.pop("NOTIFY_SOCKET", None)
        self.runs += 1
        watcher = Collector(self.broker.host, self.broker.port, [self.status_topic]) if wait_online else None
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"---- run {self.runs}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
                )
            if watcher is not None:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if watcher.wait_payload(self.status_topic, b"online", timeout=0.2, retained=False):
                        return self
                    if self.proc.poll() is not None:
                        raise DaemonError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                raise DaemonError(f"daemon not online after {timeout} s:\n{self.log()}")
        finally:
            if watcher is not None:
                watcher.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("not started")
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            raise DaemonError("not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"daemon did not exit within {timeout} s:\n{self.log()}") from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL and wait."""
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def close(self) -> None:
        """Make sure the process is gone (fixtures call this)."""
        if self.running:
            try:
                self.terminate(15)
            except DaemonError:
                self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- metrics --------------------------------------------------------------------------------

    def metrics_text(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """All samples: ``{(name, sorted label pairs): value}``."""
        out = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 when absent)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(self, name: str, value: float, *, timeout: float = 15.0, **labels: str) -> float:
        """Wait until a sample reaches at least ``value``; returns the last value seen."""
        deadline = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < deadline:
            try:
                last = self.metric(name, **labels)
            except OSError:  # not serving yet (URLError is an OSError)
                last = 0.0
            if last >= value:
                return last
            time.sleep(0.05)
        return last

    def outcomes(self) -> dict[str, float]:
        """``edge_lstm_readings_total`` by outcome."""
        return {
            dict(labels)["outcome"]: v
            for (name, labels), v in self.metrics().items()
            if name == "edge_lstm_readings_total"
        }
