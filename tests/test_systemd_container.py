"""The systemd unit under a real systemd: Debian 12 booted in a ``systemd-nspawn`` container.

The project is installed in the container exactly as docs/deploy.md ("Install on a Raspberry
Pi: the tested path") says: the shell blocks marked ``<!-- tested: pi-install -->`` are taken
from that file and run as they are, in a copy of the checkout with the wheel in ``dist/``.
The container has no network; pip finds the dependencies in a local wheelhouse through
``PIP_NO_INDEX``/``PIP_FIND_LINKS``. The daemon is a black box here: its config file, its unit,
its MQTT topics and its metrics endpoint.

The tests share one booted container and run in file order (each leaves the unit active).
They are skipped only on a machine that cannot run ``systemd-nspawn`` at all. The Debian tree
is built on first use (about 2 minutes) and cached (``tests/support/container.py``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.container import BootedContainer, debian_rootfs, nspawn_unavailable, probe_nspawn
from tests.support.wheels import ROOT, build_wheel, wheelhouse

DOC = ROOT / "docs" / "deploy.md"
UNIT = "edge-lstm"
METRICS_URL = "http://127.0.0.1:9745/metrics"
SENSOR_PW = "sensor-secret"
VIEWER_PW = "viewer-secret"
CADENCE_S = 1800  # the bundled model's tick


def doc_blocks(tag: str = "pi-install") -> list[str]:
    """The ``sh`` blocks of docs/deploy.md that follow a ``<!-- tested: TAG -->`` line, in order."""
    text = DOC.read_text()
    return re.findall(rf"<!-- tested: {re.escape(tag)} -->\n```sh\n(.*?)```", text, flags=re.S)


def test_the_doc_has_the_tested_install_path() -> None:
    """The blocks the container test runs exist and cover the whole install (also where nspawn cannot run)."""
    script = "\n".join(doc_blocks())
    for step in ("pip install dist/edge_lstm-", "mosquitto_passwd", "edge-lstm.service", "enable --now edge-lstm"):
        assert step in script, step


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedContainer]:
    reason = nspawn_unavailable()
    if reason:
        pytest.skip(reason)
    rootfs = debian_rootfs("amd64")
    reason = probe_nspawn(rootfs)
    if reason:
        pytest.skip(f"this machine cannot run systemd-nspawn: {reason}")
    work = tmp_path_factory.mktemp("nspawn")
    checkout = work / "edge-lstm"
    for part in ("deploy", "models"):
        shutil.copytree(ROOT / part, checkout / part)
    build_wheel(checkout / "dist")
    wheels = wheelhouse("3.11", "x86_64")
    c = BootedContainer(rootfs, {checkout: "/srv/edge-lstm", wheels: "/srv/wheels"}, work / "console.log").start()
    try:
        # What an installed Raspberry Pi OS has and a debootstrap tree lacks: /etc/hosts with
        # localhost and the host name. And the container is offline: pip takes the wheels from
        # the wheelhouse (a global pip.conf, since sudo does not pass PIP_* variables on).
        c.run('printf "127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n'
              '127.0.1.1\\t%s\\n" "$(hostname)" > /etc/hosts && '
              'printf "[global]\\nno-index = true\\nfind-links = /srv/wheels\\n" > /etc/pip.conf')  # fmt: skip
        script = "set -euxo pipefail\ncd /srv/edge-lstm\n" + "\n".join(doc_blocks())
        c.run(script, timeout=600)
        # The broker users, with the passwords typed in as the doc's commands ask for them (one
        # command at a time: mosquitto_passwd reads ahead whatever its input holds).
        passwords = {"sensor": SENSOR_PW, "viewer": VIEWER_PW}
        for line in doc_blocks("pi-users")[0].splitlines():
            user = line.split()[-1] if "mosquitto_passwd" in line else ""
            c.run(line, stdin=f"{passwords[user]}\n{passwords[user]}\n" if user else "")
        wait_for(lambda: state(c) == ("active", "running"), 60, "the unit to become active after the install")
        yield c
    finally:
        journal = c.run(f"journalctl -u {UNIT} --no-pager -n 200", check=False).stdout if c.leader else ""
        c.stop()
        print(journal)  # shown by pytest when a test failed


# --- helpers ------------------------------------------------------------------------------------


def wait_for(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def show(c: BootedContainer, *props: str) -> dict[str, str]:
    out = c.run(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state(c: BootedContainer) -> tuple[str, str]:
    s = show(c, "ActiveState", "SubState")
    return s["ActiveState"], s["SubState"]


def metrics(c: BootedContainer) -> dict[str, float]:
    """``name{labels}`` -> value from the daemon's endpoint, fetched inside the container."""
    fetch = f"import urllib.request; print(urllib.request.urlopen('{METRICS_URL}').read().decode())"
    text = c.run(f'python3 -c "{fetch}"').stdout
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def series() -> list[float]:
    with open(ROOT / "data" / "taylor.csv", newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("demand_mw")
    return [float(r[col]) for r in rows[1:60]]


class Forecasts:
    """``mosquitto_sub`` as ``viewer`` in the container, collecting ``count`` forecasts."""

    def __init__(self, c: BootedContainer, count: int) -> None:
        cmd = (f"mosquitto_sub -h localhost -u viewer -P {VIEWER_PW} -q 1 -t 'forecasts/#' "
               f"-C {count} -W 60")  # fmt: skip
        self.proc = subprocess.Popen(c.command(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # let it subscribe before anything is published

    def collect(self) -> list[dict[str, object]]:
        out, err = self.proc.communicate(timeout=90)
        assert self.proc.returncode == 0, f"mosquitto_sub: {err}"
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def publish(c: BootedContainer, stream: str, points: list[tuple[float, float]]) -> None:
    """Readings ``(epoch, value)`` as ``sensor``, one message each, in order, QoS 1."""
    lines = "\n".join(json.dumps({"ts": ts, "value": v}) for ts, v in points)
    pub = f"mosquitto_pub -h localhost -u sensor -P {SENSOR_PW} -q 1 -t sensors/{stream}/value -l"
    c.run(f"{pub} <<'EOF'\n{lines}\nEOF")


def first_value(forecast: dict[str, object]) -> float:
    items = forecast["forecasts"]
    assert isinstance(items, list)
    return float(items[0]["value"])


# --- the unit's behaviour -------------------------------------------------------------------------


def test_ready_only_once_the_broker_is_reachable(box: BootedContainer) -> None:
    box.run("systemctl stop mosquitto")
    box.run(f"systemctl restart --no-block {UNIT}")
    time.sleep(8)  # model loaded, metrics up, broker refused: the unit must still be starting
    assert state(box) == ("activating", "start")
    assert "connecting" in show(box, "StatusText")["StatusText"].lower()
    box.run("systemctl start mosquitto")
    wait_for(lambda: state(box) == ("active", "running"), 60, "READY after the broker came up")
    assert "serving" in show(box, "StatusText")["StatusText"]


def test_forecasts_under_the_full_sandbox(box: BootedContainer) -> None:
    values = series()[:10]
    now = time.time()
    points = [(now - (len(values) - k) * CADENCE_S, v) for k, v in enumerate(values)]
    sub = Forecasts(box, len(points))
    publish(box, "boiler", points)
    got = sub.collect()
    assert [f["stream"] for f in got] == ["boiler"] * len(points)
    assert all(isinstance(first_value(f), float) for f in got)
    # The process that made them: a dynamic user, no capabilities, no new privileges.
    pid = show(box, "MainPID")["MainPID"]
    status = box.run(f"cat /proc/{pid}/status").stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    assert uid >= 61184  # systemd's DynamicUser= range is 61184..65519
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    # The state directory is the service's own, and nobody else's.
    assert box.run("stat -c '%a %u' /var/lib/private/edge-lstm").stdout.split() == ["700", str(uid)]


def test_state_survives_a_restart(box: BootedContainer) -> None:
    values = series()[:25]
    now = time.time()
    points = [(now - (len(values) - k) * CADENCE_S, v) for k, v in enumerate(values)]
    before, last = points[:-1], points[-1]
    sub = Forecasts(box, len(before))
    publish(box, "kept", before)
    sub.collect()
    pid = show(box, "MainPID")["MainPID"]
    box.run(f"systemctl restart {UNIT}")
    assert show(box, "MainPID")["MainPID"] != pid
    assert metrics(box)["edge_lstm_streams_active"] >= 1  # restored before any new reading
    # The restarted daemon continues "kept" where it was: its forecast for the last point equals
    # that of "fresh", which gets the whole series in one go.
    sub = Forecasts(box, 1 + len(points))
    publish(box, "kept", [last])
    publish(box, "fresh", points)
    got = sub.collect()
    kept = [f for f in got if f["stream"] == "kept"]
    fresh = [f for f in got if f["stream"] == "fresh"]
    assert len(kept) == 1 and len(fresh) == len(points)
    assert kept[0]["warming_up"] == fresh[-1]["warming_up"]
    assert first_value(kept[0]) == pytest.approx(first_value(fresh[-1]), rel=1e-6)
    # ...and a stream that lost its state would not: the same last point on a new stream differs.
    sub = Forecasts(box, 1)
    publish(box, "amnesic", [last])
    assert first_value(sub.collect()[0]) != pytest.approx(first_value(fresh[-1]), rel=1e-3)


def test_reload_swaps_the_model_in_the_same_process(box: BootedContainer) -> None:
    pid = show(box, "MainPID")["MainPID"]
    ok = 'edge_lstm_model_reloads_total{result="ok"}'
    before = metrics(box).get(ok, 0.0)
    box.run(f"systemctl reload {UNIT}")
    wait_for(lambda: metrics(box).get(ok, 0.0) == before + 1, 30, "the reload to be counted")
    assert show(box, "MainPID")["MainPID"] == pid and state(box) == ("active", "running")


def test_watchdog_kills_and_restarts_a_frozen_daemon(box: BootedContainer) -> None:
    dropin = f"/etc/systemd/system/{UNIT}.service.d/test-watchdog.conf"
    box.run(f"mkdir -p $(dirname {dropin}) && printf '[Service]\\nWatchdogSec=8\\n' > {dropin}")
    box.run(f"systemctl daemon-reload && systemctl restart {UNIT}")
    try:
        info = show(box, "MainPID", "NRestarts", "WatchdogUSec")
        assert info["WatchdogUSec"] == "8s"
        box.run(f"kill -STOP {info['MainPID']}")
        wait_for(lambda: show(box, "NRestarts")["NRestarts"] != info["NRestarts"], 60, "the watchdog's restart")
        wait_for(lambda: state(box) == ("active", "running"), 60, "the restarted daemon")
        assert show(box, "MainPID")["MainPID"] != info["MainPID"]
        log = box.run(f"journalctl -u {UNIT} --no-pager -n 50").stdout
        assert "Watchdog timeout" in log
    finally:
        box.run(f"rm -f {dropin} && systemctl daemon-reload && systemctl restart {UNIT}")


def test_stop_is_clean(box: BootedContainer) -> None:
    status_topic = f"edge-lstm/edge-lstm-{box.run('hostname').stdout.strip()}/status"  # client_id edge-lstm-{hostname}
    sub = subprocess.Popen(
        box.command(f"mosquitto_sub -h localhost -u viewer -P {VIEWER_PW} -t {status_topic} -C 2 -W 60"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    started = time.monotonic()
    box.run(f"systemctl stop {UNIT}")
    took = time.monotonic() - started
    out, err = sub.communicate(timeout=90)
    try:
        assert out.split() == ["online", "offline"], err  # the retained online, then the clean offline
        info = show(box, "Result", "ExecMainStatus", "ActiveState")
        assert info == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
        log = box.run(f"journalctl -u {UNIT} --no-pager -n 30").stdout
        assert "SIGKILL" not in log and "timed out" not in log
        print(f"systemctl stop took {took:.2f} s")
    finally:
        box.run(f"systemctl start {UNIT}")


def test_security_exposure_of_the_live_unit(box: BootedContainer) -> None:
    out = box.run(f"systemd-analyze security --no-pager {UNIT}").stdout
    m = re.search(r"Overall exposure level for edge-lstm\.service: (\d+\.\d+)", out)
    assert m, out[-2000:]
    print(f"systemd-analyze security: {m.group(1)}")
    assert float(m.group(1)) <= 2.0, out
