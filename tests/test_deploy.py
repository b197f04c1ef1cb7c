"""Static checks of the deployment files in ``deploy/``.

The systemd unit is verified with ``systemd-analyze verify``, the Prometheus files with
``promtool`` (config, rules and the alert unit tests in ``alerts_test.yml``), and the Grafana
dashboard and alert rules are checked against the metrics the daemon actually registers.
The live checks (a real Prometheus scraping a real daemon) are in ``test_prometheus_live.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge_lstm.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "edge-lstm.service"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "edge-lstm.json"
UNIT_EXEC = "/opt/edge-lstm/venv/bin/edge-lstm"

REQUIRED_ALERTS = {
    "EdgeLstmDown",
    "EdgeLstmMqttDisconnected",
    "EdgeLstmNoForecasts",
    "EdgeLstmHighRejectRate",
    "EdgeLstmForecastErrorDrift",
    "EdgeLstmHighAnomalyRate",
    "EdgeLstmCheckpointStale",
    "EdgeLstmCheckpointFailing",
    "EdgeLstmJournalFailing",
}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert path, f"{name} is not installed (scripts/os-deps.sh test installs it)"
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _unit_directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (keys may repeat in unit files)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


# --- systemd ----------------------------------------------------------------------------------


def test_unit_verifies_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` prints nothing for the unit (with ExecStart at the real binary)."""
    exe = Path(sys.executable).parent / "edge-lstm"
    assert exe.exists(), "the edge-lstm console script is not installed in this environment"
    text = UNIT.read_text()
    assert UNIT_EXEC in text
    copy = tmp_path / "edge-lstm.service"
    copy.write_text(text.replace(UNIT_EXEC, str(exe)))
    result = _run(_tool("systemd-analyze"), "verify", str(copy))
    # verify reports unknown keys and bad values on stderr but still exits 0: both must be clean.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_unit_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above is meaningful: a misspelt directive is reported."""
    exe = Path(sys.executable).parent / "edge-lstm"
    copy = tmp_path / "edge-lstm.service"
    copy.write_text(UNIT.read_text().replace(UNIT_EXEC, str(exe)).replace("ProtectHome=", "ProtectHomes="))
    result = _run(_tool("systemd-analyze"), "verify", str(copy))
    assert "ProtectHomes" in result.stderr


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """``systemd-analyze security`` rates the unit's sandbox at 2.0 or better (0 best, 10 worst)."""
    exe = Path(sys.executable).parent / "edge-lstm"
    copy = tmp_path / "edge-lstm.service"
    copy.write_text(UNIT.read_text().replace(UNIT_EXEC, str(exe)))
    # --threshold is in tenths: the command fails when the exposure is above 2.0.
    result = _run(_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", "--no-pager", str(copy))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for edge-lstm.service" in result.stdout


def test_unit_runs_the_daemon_as_a_hardened_notify_service() -> None:
    d = _unit_directives(UNIT.read_text())
    expect_exact = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.Restart": "on-failure",
        "Service.ExecStart": f"{UNIT_EXEC} run --config /etc/edge-lstm/config.toml",
        "Service.ExecReload": "kill -HUP $MAINPID",
        "Service.StateDirectory": "edge-lstm",
        "Service.ConfigurationDirectory": "edge-lstm",
        "Service.LoadCredential": "mqtt-password:/etc/edge-lstm/mqtt-password",
        "Service.DynamicUser": "yes",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.PrivateDevices": "yes",
        "Service.NoNewPrivileges": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.AmbientCapabilities": "",
        "Service.RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Install.WantedBy": "multi-user.target",
    }
    for key, value in expect_exact.items():
        assert d.get(key) == [value], f"{key}: {d.get(key)}"
    assert "@system-service" in d["Service.SystemCallFilter"]
    for key in ("Service.WatchdogSec", "Service.RestartSec", "Service.MemoryMax", "Unit.StartLimitBurst"):
        assert d.get(key) and d[key][0], f"{key} missing"
    assert int(d["Service.WatchdogSec"][0]) >= 10
    assert int(d["Unit.StartLimitBurst"][0]) >= 1 and int(d["Unit.StartLimitIntervalSec"][0]) > 0


# --- Prometheus -------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    for name in ("prometheus.yml", "dev-prometheus.yml"):
        result = _run(_tool("promtool"), "check", "config", name, cwd=PROM)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = _run(_tool("promtool"), "check", "rules", "alerts.yml", cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    """The alert unit tests pass, and there is a firing and a quiet case for every alert."""
    result = _run(_tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = (PROM / "alerts_test.yml").read_text()
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", (PROM / "alerts.yml").read_text(), re.M))
    assert alerts >= REQUIRED_ALERTS
    # Each "alertname:" block of the test file: firing when followed by exp_labels, quiet when
    # its exp_alerts is empty.
    blocks = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\]|\n\s+- exp_labels:)", tests)
    firing = {name for name, kind in blocks if kind != " []"}
    quiet = {name for name, kind in blocks if kind == " []"}
    assert firing == alerts, f"alerts without a firing test: {alerts - firing}"
    assert quiet == alerts, f"alerts without a quiet test: {alerts - quiet}"


def test_promtool_rule_tests_catch_a_broken_threshold(tmp_path: Path) -> None:
    """The unit tests are sensitive: doubling the reject-rate threshold makes them fail."""
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    text = rules.read_text()
    assert "> 0.1\n" in text
    rules.write_text(text.replace("> 0.1\n", "> 0.3\n"))
    result = _run(_tool("promtool"), "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "EdgeLstmHighRejectRate" in result.stdout + result.stderr


# --- metric names used by the dashboard and the alerts exist ------------------------------------


def _exported_sample_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, max_stream_labels=10)
    names = {"up"}
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


_METRIC = re.compile(r"\b((?:edge_lstm|process|python)_[a-z0-9_]+)\b")


def test_dashboard_and_alerts_use_only_registered_metrics() -> None:
    known = _exported_sample_names()
    # Info metrics are exposed without the _info suffix in the text format Prometheus scrapes.
    known |= {n.removesuffix("_info") for n in known if n.endswith("_info")}
    alerts_text = (PROM / "alerts.yml").read_text()
    alert_exprs = re.findall(r"expr: >-\n((?:\s{10}.*\n)+)|expr: (.+)\n", alerts_text)
    used: set[str] = set()
    for expr in [*_dashboard_exprs(), *(a or b for a, b in alert_exprs)]:
        used |= set(_METRIC.findall(expr))
    unknown = sorted(used - known)
    assert not unknown, f"not exported by edge_lstm.metrics: {unknown}"
    # Both sources were read: a dashboard-only and an alert-only metric.
    assert "edge_lstm_batch_size_bucket" in used and "edge_lstm_model_reloads_total" in used


def test_dashboard_structure() -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["instance"]["query"]["query"] == "label_values(edge_lstm_build_info, instance)"
    assert variables["datasource"]["type"] == "datasource"
    titles = {p["title"] for p in dash["panels"]}
    for wanted in (
        "Throughput",
        "Latency (reading received to forecast published)",
        "Inference time (one batched model step)",
        "Batch size",
        "Queue depth",
        "Streams",
        "Reading outcomes",
        "MQTT status",
        "Forecast error vs trained MAE",
        "Checkpoint age",
        "Model",
    ):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            # Every query is filtered by the device variable.
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    exprs = " ".join(_dashboard_exprs())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    provisioning = (DEPLOY / "grafana" / "provisioning" / "datasources" / "edge-lstm.yml").read_text()
    assert f"uid: {variables['datasource']['current']['value']}" in provisioning


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL (checked by promtool, each query as a recording rule)."""
    rules = [
        {"record": f"panel:query{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(_dashboard_exprs())
    ]
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_tool("promtool"), "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
