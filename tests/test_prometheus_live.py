"""The Grafana dashboard and the alert rules, run for real.

A real daemon serves real MQTT traffic (the bundled series on several streams, plus deliberately
bad readings of every kind) to a real Mosquitto; a real Prometheus scrapes it every second and
evaluates ``deploy/prometheus/alerts.yml``. Then every dashboard panel query (variables filled in
the way Grafana does) and every alert expression goes through the Prometheus HTTP API, and each
must return data of the expected shape. Finally the outcome counters must add up exactly to the
readings sent.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "edge-lstm.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval: at least 4 scrapes
MAX_PAYLOAD = 2048
STREAMS = ("north", "south", "east", "west")
SPIKE_MW = 3000.0  # added to one reading of "west" after its warm-up: outside the 95 % interval (~1100 MW wide)


# --- Prometheus -------------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server in a subprocess with a small HTTP API client."""

    def __init__(self, workdir: Path, targets: list[str], rule_file: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (scripts/os-deps.sh test installs it)"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": "edge-lstm", "static_configs": [{"targets": targets}]}],
        }
        # JSON is YAML.
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> dict[str, Any]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float, timeout: float = 20.0) -> float | None:
        """Wait until the single-series ``expr`` equals ``expected``; returns the last value seen."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last == expected:
                return last
            time.sleep(0.25)
        return last

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- traffic ----------------------------------------------------------------------------------


class Publisher:
    """One MQTT client publishing QoS 1 messages in order, waiting for each acknowledgement."""

    def __init__(self, broker: Broker) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="live-test-sensors", protocol=paho.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Traffic:
    """What was sent: readings by the outcome the daemon must give them."""

    sent: Counter[str]
    start: float
    end: float

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _reading(ts: float, value: float) -> dict[str, float]:
    return {"ts": ts, "demand_mw": value}


def send_traffic(broker: Broker, series: tuple[np.ndarray, np.ndarray], rounds: int, per_round: int) -> Traffic:
    """Real readings on every stream over a few seconds, with every kind of bad reading mixed in.

    Each stream gets ``rounds * per_round`` consecutive readings of the series: more than the
    model's warm-up, so that its forecasts are scored (the online error metrics) and its readings
    checked against their intervals; one reading of "west" near the end is a spike (an anomaly).
    """
    ts, values = series
    sent: Counter[str] = Counter()
    pub = Publisher(broker)
    start = time.time()
    try:
        for r in range(rounds):
            for k in range(per_round):
                i = r * per_round + k
                spike = i == rounds * per_round - 3
                for stream in STREAMS:
                    v = values[i] + (SPIKE_MW if spike and stream == "west" else 0.0)
                    pub.send(f"sensors/{stream}/value", json.dumps(_reading(ts[i], v)))
                    sent["processed"] += 1
            last = (r + 1) * per_round - 1
            # One of each rejection per round, on the stream "north" (its last reading is ts[last]).
            bad: list[tuple[str, bytes | str, str]] = [
                ("sensors/north/value", "not json {", "bad_payload"),
                ("sensors/north/value", b"\xff\xfe\x00", "bad_payload"),
                ("sensors/north/value", json.dumps({"ts": ts[last] + 60, "other": 1.0}), "missing_field"),
                ("sensors/north/value", json.dumps(_reading(ts[last] + 60, 1e15)), "non_finite"),
                ("sensors/north/value", json.dumps({"ts": "not a time", "demand_mw": 1.0}), "bad_timestamp"),
                ("sensors/north/value", json.dumps(_reading(ts[last] - 3600, values[0])), "late"),
                ("sensors/north/value", json.dumps(_reading(ts[last], values[last])), "duplicate"),
                ("sensors/north/value", json.dumps({"pad": "x" * MAX_PAYLOAD}), "too_large"),
            ]
            for topic, payload, outcome in bad:
                pub.send(topic, payload)
                sent[outcome] += 1
            time.sleep(1.0)  # spread the traffic over several scrapes
        # An array body: two good readings and a bad one (counts as three readings).
        i = rounds * per_round
        body = [
            _reading(ts[i], values[i]),
            {"ts": ts[i] + 1800, "demand_mw": "high"},
            _reading(ts[i + 1], values[i + 1]),
        ]
        pub.send("sensors/south/value", json.dumps(body))
        sent["processed"] += 2
        sent["bad_payload"] += 1
        # A gap much longer than the model's max_gap_ticks: the stream's state is reset.
        pub.send("sensors/east/value", json.dumps(_reading(ts[i] + 30 * 86400, values[i])))
        sent["processed"] += 1
    finally:
        pub.close()
    return Traffic(sent, start, time.time())


# --- the scenario (shared by the tests of this module) ----------------------------------------


@dataclass
class Scenario:
    prom: Prometheus
    daemon: DaemonProcess
    instance: str
    dead_instance: str
    traffic: Traffic


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory, taylor_series: tuple[np.ndarray, np.ndarray]
) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("live")
    broker = Broker(workdir / "broker")
    broker.start()
    daemon = DaemonProcess(
        workdir / "daemon",
        broker,
        overrides={
            "state": {"checkpoint_interval_s": 1},
            "input": {"max_payload_bytes": MAX_PAYLOAD},
        },
    )
    prom: Prometheus | None = None
    try:
        daemon.start()
        instance = f"127.0.0.1:{daemon.metrics_port}"
        dead_instance = f"127.0.0.1:{free_port()}"  # nothing listens there: up == 0
        prom = Prometheus(workdir / "prometheus", [instance, dead_instance], ALERTS)
        assert prom.wait_for(f'up{{instance="{instance}"}}', 1.0) == 1.0, prom.log()
        manifest = json.loads((Path(daemon.config["model"]["path"]) / "manifest.json").read_text())
        rounds = 5
        per_round = -(-(int(manifest["warmup_ticks"]) + 8) // rounds)  # past the warm-up on every stream
        traffic = send_traffic(broker, taylor_series, rounds, per_round)
        # The daemon has handled every reading, and Prometheus has scraped the final counts.
        total = float(traffic.total)
        assert daemon.wait_metric("edge_lstm_readings_received_total", total) == total, daemon.log()
        got = prom.wait_for(f'sum(edge_lstm_readings_total{{instance="{instance}"}})', total)
        assert got == total, f"outcomes sum to {got}, {total} readings sent: {daemon.outcomes()}"
        prom.wait_for(f'edge_lstm_readings_received_total{{instance="{instance}"}}', total)
        time.sleep(2)  # a few more scrapes and rule evaluations after the traffic
        yield Scenario(prom, daemon, instance, dead_instance, traffic)
    finally:
        if prom is not None:
            prom.close()
        daemon.close()
        broker.close()


# --- the outcome invariant -------------------------------------------------------------------


def test_outcomes_add_up_to_the_readings_sent(scenario: Scenario) -> None:
    p, inst, sent = scenario.prom, scenario.instance, scenario.traffic.sent
    received = p.value(f'edge_lstm_readings_received_total{{instance="{inst}"}}')
    assert received == scenario.traffic.total
    by_outcome = {
        s["metric"]["outcome"]: float(s["value"][1])
        for s in p.query(f'edge_lstm_readings_total{{instance="{inst}"}}')["result"]
    }
    assert sum(by_outcome.values()) == received
    # Every outcome is exported (zeros included), and each matches what was sent.
    assert set(by_outcome) >= set(sent)
    assert {k: v for k, v in by_outcome.items() if v} == {k: float(v) for k, v in sent.items()}
    assert p.value(f'edge_lstm_forecasts_published_total{{instance="{inst}"}}') == sent["processed"]


# --- the dashboard ----------------------------------------------------------------------------


def _grafana_expr(expr: str, instance: str) -> str:
    """Fill in the variables as Grafana would for a single selected device."""
    return expr.replace("$instance", instance.replace(".", "\\\\.")).replace("$__rate_interval", RATE_INTERVAL)


def _finite_values(data: dict[str, Any]) -> list[float]:
    if data["resultType"] == "matrix":
        raw = [v for series in data["result"] for _, v in series["values"]]
    elif data["resultType"] == "vector":
        raw = [s["value"][1] for s in data["result"]]
    else:
        raw = [data["result"][1]]
    return [float(v) for v in raw if math.isfinite(float(v))]


def _panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_instance_variable_lists_the_daemon(scenario: Scenario) -> None:
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "instance")
    assert variable["query"]["query"] == "label_values(edge_lstm_build_info, instance)"
    values = scenario.prom.api("label/instance/values", **{"match[]": "edge_lstm_build_info"})
    assert values == [scenario.instance]


def test_every_dashboard_query_returns_data(scenario: Scenario) -> None:
    p = scenario.prom
    start, end = scenario.traffic.start - 1, time.time()
    checked = 0
    empty: list[str] = []
    for panel in _panels():
        for target in panel["targets"]:
            expr = _grafana_expr(target["expr"], scenario.instance)
            if target.get("instant"):
                data = p.query(expr)
                assert data["resultType"] == "vector", (panel["title"], expr)
            else:
                data = p.query_range(expr, start, end)
                assert data["resultType"] == "matrix", (panel["title"], expr)
            if not data["result"] or not _finite_values(data):
                empty.append(f"{panel['title']}: {expr}")
            for series in data["result"]:
                # Every series belongs to the selected device (no other instance leaks in).
                assert series["metric"].get("instance", scenario.instance) == scenario.instance, expr
            checked += 1
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert checked == sum(len(p["targets"]) for p in _panels()) >= 30


def test_model_table_shows_the_served_model(scenario: Scenario) -> None:
    manifest = json.loads((ROOT / "models" / "taylor" / "manifest.json").read_text())
    panel = next(p for p in _panels() if p["title"] == "Model")
    rows = []
    for target in panel["targets"]:
        assert target["format"] == "table" and target["instant"]
        rows += scenario.prom.query(_grafana_expr(target["expr"], scenario.instance))["result"]
    model = next(r["metric"] for r in rows if r["metric"]["__name__"] == "edge_lstm_model_info")
    assert model["model"] == f"{manifest['name']}@{manifest['sha256'][:12]}"
    assert model["sha256"] == manifest["sha256"]
    assert model["quantization"] == manifest["quantization"]
    assert model["horizon"] == str(manifest["output"]["horizon"])
    assert model["runtime"] in ("ai-edge-litert", "tflite-runtime") and model["runtime_version"]
    build = next(r["metric"] for r in rows if r["metric"]["__name__"] == "edge_lstm_build_info")
    assert build["version"] and build["python"]


# --- the alerts -------------------------------------------------------------------------------

# For each alert: does its expression hold in this scenario, and a query that must return data
# (the signal the alert watches), so a quiet alert is quiet because all is well, not because its
# metrics are missing.
ALERT_EXPECTATIONS: dict[str, tuple[bool, str]] = {
    "EdgeLstmDown": (True, 'up{job="edge-lstm"}'),
    "EdgeLstmMqttDisconnected": (False, "edge_lstm_mqtt_connected == 1"),
    "EdgeLstmNoForecasts": (False, "rate(edge_lstm_forecasts_published_total[5m]) > 0"),
    "EdgeLstmHighRejectRate": (True, 'edge_lstm_readings_total{outcome="bad_payload"} > 0'),
    "EdgeLstmForecastErrorDrift": (
        False,
        "rate(edge_lstm_forecast_abs_error_sum[5m]) / rate(edge_lstm_forecast_abs_error_count[5m]) > 0"
        " and on (instance, model) edge_lstm_forecast_trained_mae > 0",
    ),
    "EdgeLstmHighAnomalyRate": (False, "edge_lstm_anomaly_checks_total > 0"),
    "EdgeLstmCheckpointStale": (False, "time() - edge_lstm_checkpoint_last_success_timestamp_seconds < 60"),
    "EdgeLstmCheckpointFailing": (False, "edge_lstm_checkpoint_failures_total == 0"),
    "EdgeLstmModelReloadFailed": (False, 'edge_lstm_model_reloads_total{result="failed"} == 0'),
    "EdgeLstmJournalDamaged": (False, "edge_lstm_journal_dropped_bytes_total == 0"),
    "EdgeLstmJournalFailing": (False, "edge_lstm_journal_failures_total == 0"),
}


def _alert_rules(p: Prometheus) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for g in p.api("rules")["groups"] for r in g["rules"] if r["type"] == "alerting"}


def test_alert_rules_load_and_evaluate(scenario: Scenario) -> None:
    rules = _alert_rules(scenario.prom)
    assert set(rules) == set(ALERT_EXPECTATIONS), "alerts.yml and this test disagree on the alerts"
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))


def test_every_alert_expression_returns_the_expected_shape(scenario: Scenario) -> None:
    p = scenario.prom
    rules = _alert_rules(p)
    for name, (holds, signal) in ALERT_EXPECTATIONS.items():
        data = p.query(rules[name]["query"])
        assert data["resultType"] == "vector", name
        instances = {s["metric"].get("instance") for s in data["result"]}
        if name == "EdgeLstmDown":
            # (Not "== {dead}": on a loaded machine one scrape of the daemon may time out.)
            assert scenario.dead_instance in instances, name
        elif holds:
            assert instances == {scenario.instance}, (name, data["result"])
        else:
            assert instances == set(), (name, data["result"])
        signal_result = p.query(signal)["result"]
        assert signal_result, f"{name}: no data for {signal}"
        assert {s["metric"]["instance"] for s in signal_result} >= (
            {scenario.instance} if name != "EdgeLstmDown" else {scenario.instance, scenario.dead_instance}
        )


def test_reject_rate_alert_sees_the_share_of_bad_readings(scenario: Scenario) -> None:
    """The alert's ratio is the share of non-processed readings sent (the series all start at 0)."""
    rule = _alert_rules(scenario.prom)["EdgeLstmHighRejectRate"]
    ratio_expr = rule["query"].rsplit(">", 1)[0]
    value = scenario.prom.value(ratio_expr)
    sent = scenario.traffic.sent
    expected = (scenario.traffic.total - sent["processed"]) / scenario.traffic.total
    assert value is not None and value == pytest.approx(expected, rel=0.02)


def test_firing_alerts_are_pending_in_prometheus(scenario: Scenario) -> None:
    """Prometheus's own rule evaluation has picked up the down target and the reject rate."""
    deadline = time.monotonic() + 10
    active: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        alerts = scenario.prom.api("alerts")["alerts"]
        active = {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts}
        if {("EdgeLstmDown", scenario.dead_instance), ("EdgeLstmHighRejectRate", scenario.instance)} <= active:
            break
        time.sleep(0.5)
    assert ("EdgeLstmDown", scenario.dead_instance) in active
    assert ("EdgeLstmHighRejectRate", scenario.instance) in active
    # Nothing else: the healthy daemon raises no other alert.
    assert {name for name, _ in active} <= {"EdgeLstmDown", "EdgeLstmHighRejectRate", "EdgeLstmForecastErrorDrift"}


def test_stream_state_reset_and_error_series(scenario: Scenario) -> None:
    """The gap sent on one stream shows as a state reset; per-stream errors are exported."""
    p, inst = scenario.prom, scenario.instance
    assert p.value(f'edge_lstm_state_resets_total{{instance="{inst}", reason="gap"}}') == 1.0
    streams = {s["metric"]["stream"] for s in p.query(f'edge_lstm_stream_abs_error{{instance="{inst}"}}')["result"]}
    assert streams == set(STREAMS)


def test_anomaly_panel_and_alert_see_the_spike(scenario: Scenario) -> None:
    """The spike on "west" is counted; the alert's ratio is the share of flagged readings, below its threshold."""
    p, inst = scenario.prom, scenario.instance
    checks = p.value(f'edge_lstm_anomaly_checks_total{{instance="{inst}"}}')
    high = p.value(f'edge_lstm_anomalies_total{{instance="{inst}", direction="high"}}')
    low = p.value(f'edge_lstm_anomalies_total{{instance="{inst}", direction="low"}}')
    assert checks is not None and checks >= 4 * 8  # every stream past its warm-up
    assert high is not None and high >= 1 and low is not None
    # The panel's ratio over the whole run equals the counters' ratio.
    panel = next(p_ for p_ in _panels() if p_["title"] == "Anomaly rate")
    ratio_expr = panel["targets"][0]["expr"].replace('"$instance"', f'"{inst}"')
    ratio = p.value(ratio_expr.replace("[$__rate_interval]", "[10m]"))
    assert ratio == pytest.approx((high + low) / checks, rel=0.05)
    rule = _alert_rules(p)["EdgeLstmHighAnomalyRate"]
    assert 0 < ratio < 0.15 and "0.15" in rule["query"]

