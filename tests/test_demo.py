"""``edge-lstm demo``: private broker, replay, live table, summary, clean stop."""

from __future__ import annotations

import datetime as dt
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_lstm import demo
from edge_lstm.cli import main

REPO = Path(__file__).resolve().parents[1]


def _demo_brokers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "mosquitto" in line and "edge-lstm-demo-" in line]


def test_demo_replays_and_summarises() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "demo", "--ticks", "80", "--rate", "200", "--streams", "2"],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", out)
    # live table: both streams, with actual values and forecasts
    rows = [line for line in out.splitlines() if re.match(r"s[01]\s+\w{3} \d\d-\d\d \d\d:\d\d", line)]
    assert len(rows) == 160
    assert "readings published   160" in out and "forecasts received   160" in out
    assert "daemon: received 160, processed 160, published 160" in out
    m = re.search(r"model/persistence = ([0-9.]+)", out)
    assert m is not None and float(m.group(1)) < 1.0  # the model beats persistence after warm-up
    # each reading after warm-up is checked against its 95 % interval, shown in the table
    assert "95 % interval" in out and re.search(r"anomalies flagged\s+\d+ of 64 readings checked", out)
    assert not _demo_brokers()


def test_demo_follows_the_models_ticks_for_readings_off_its_grid(tmp_path: Path) -> None:
    """Readings a minute after the model's half-hour grid: the daemon stamps each forecast with its
    tick's time, not the reading's, and the table still finds every one."""
    src = (REPO / "data" / "taylor.csv").read_text().splitlines()
    shifted = tmp_path / "shifted.csv"
    rows = [src[0]]
    for line in src[1:41]:
        stamp, value = line.split(",", 1)
        t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) + dt.timedelta(minutes=1)
        rows.append(f"{t.strftime('%Y-%m-%dT%H:%M:%SZ')},{value}")
    shifted.write_text("\n".join(rows) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "demo", "--data", str(shifted), "--ticks", "30", "--rate", "50"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "readings published   30" in r.stdout
    assert "forecasts received   30" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("taylor ")]
    assert len(table) == 30
    assert not _demo_brokers()


def test_demo_scores_forecasts_only_after_the_warm_up_that_follows_a_reset(tmp_path: Path) -> None:
    """Five hours missing (longer than the model's gap limit): the daemon resets the stream and flags its
    forecasts warming up again; the summary's 1-step MAE leaves those out, as the interval checks do."""
    src = (REPO / "data" / "taylor.csv").read_text().splitlines()
    holey = tmp_path / "holey.csv"
    holey.write_text("\n".join([src[0], *src[1:101], *src[111:201]]) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "demo", "--data", str(holey), "--rate", "200", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "readings published   190" in r.stdout and "forecasts received   190" in r.stdout
    scored = re.search(r"after warm-up, (\d+) forecasts", r.stdout)
    checked = re.search(r"anomalies flagged\s+\d+ of (\d+) readings checked", r.stdout)
    assert scored is not None and checked is not None
    warm = 48  # the bundled model's warm-up: at the start and again after the reset
    assert int(scored.group(1)) == int(checked.group(1)) == 190 - 2 * warm


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_stops_cleanly_on_ctrl_c(sig: signal.Signals) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "edge_lstm", "demo", "--rate", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 5 and time.monotonic() < deadline:  # wait for a few table rows
            line = p.stdout.readline()
            seen += line.startswith("taylor ")
        assert seen == 5
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "interrupted: stopping" in out and "summary" in out
    assert "Traceback" not in err
    assert not _demo_brokers()


def test_demo_without_mosquitto_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    assert main(["demo", "--ticks", "5"]) == 1
    assert "apt-get install mosquitto" in capsys.readouterr().err


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rate", "0"]) == 2
    assert main(["demo", "--streams", "0"]) == 2


def test_demo_finds_the_bundled_model_and_data_from_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    model = demo.find_bundled("models/taylor")
    data = demo.find_bundled("data/taylor.csv")
    assert model is not None and (model / "manifest.json").is_file()
    assert data is not None and data.is_file()
    cols, ts, rows = demo.load_csv(data)
    assert cols == ["demand_mw"] and len(ts) == len(rows) == 4032
    assert ts[1] - ts[0] == 1800
