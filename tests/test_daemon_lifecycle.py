"""Daemon lifecycle: SIGHUP model reload, SIGTERM during a burst, JSON logs."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.support.broker import Broker
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_MODEL, DaemonError, DaemonProcess
from tests.support.offline import open_model, stream_forecasts
from tests.test_daemon import assert_equal_forecasts, forecasts_by_ts, publish_series, publisher, stretch


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return open_model(TAYLOR_MODEL)


def test_sighup_reloads_the_model_keeps_state_and_survives_a_bad_file(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(TAYLOR_MODEL, model_dir)
    ts, vs = stretch(taylor_series, 150)
    want, _ = stream_forecasts(model, ts, vs)
    d = daemon_factory(broker, overrides={"model": {"path": str(model_dir)}}).start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)

    publish_series(pub, "h", ts[:50], vs[:50])
    col.wait_for(50, "forecasts/h", timeout=30)
    d.signal(signal.SIGHUP)  # same file again: state is kept
    assert d.wait_metric("edge_lstm_model_reloads_total", 1, result="ok") == 1
    publish_series(pub, "h", ts[50:100], vs[50:100])
    col.wait_for(100, "forecasts/h", timeout=30)

    (model_dir / "model.tflite").write_bytes(b"not a model")  # a broken update: the old model stays
    d.signal(signal.SIGHUP)
    assert d.wait_metric("edge_lstm_model_reloads_total", 1, result="failed") == 1
    publish_series(pub, "h", ts[100:], vs[100:])
    col.wait_for(len(ts), "forecasts/h", timeout=30)

    assert_equal_forecasts(forecasts_by_ts(col, "forecasts/h"), ts, want)
    assert d.metric("edge_lstm_model_reloads_total", result="ok") == 1
    assert "model reload failed" in d.log()
    assert d.terminate() == 0
    pub.disconnect()


def test_sigterm_during_a_burst_loses_no_reading(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
) -> None:
    """Queued readings are finished before exit; later ones stay unacknowledged with the broker."""
    ts, vs = stretch(taylor_series, 400)
    want, _ = stream_forecasts(model, ts, vs)
    d = daemon_factory(broker).start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)
    infos = [
        pub.publish("sensors/b/value", json.dumps({"ts": float(t), "demand_mw": float(v)}), qos=1)
        for t, v in zip(ts, vs, strict=True)
    ]
    col.wait_for(20, "forecasts/b", timeout=30)
    assert d.terminate() == 0  # mid-burst
    first_run = d.log().count("stopped")
    for info in infos:
        info.wait_for_publish(30)
    d.start()
    col.wait_for(len(ts), "forecasts/b", timeout=60)
    assert_equal_forecasts(forecasts_by_ts(col, "forecasts/b"), ts, want)
    assert first_run == 1
    outcomes = d.outcomes()
    assert 0 < outcomes["processed"] < len(ts)  # the stop really came mid-burst
    assert outcomes["shutdown"] == outcomes["duplicate"] == outcomes["out_of_order"] == 0
    assert len(col.select("forecasts/b")) == len(ts)  # every reading forecast exactly once
    pub.disconnect()


def test_json_logs_one_object_per_line(broker: Broker, daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(broker, overrides={"log": {"json": True}}).start()
    assert d.terminate() == 0
    lines = [line for line in d.log().splitlines() if line and not line.startswith("---- run")]
    # the interpreter's native library prints its own banner line; everything of ours is JSON
    ours = [line for line in lines if not line.startswith("INFO: Created TensorFlow Lite")]
    docs = [json.loads(line) for line in ours]
    assert {"ts", "level", "logger", "msg"} <= set(docs[0])
    messages = [doc["msg"] for doc in docs]
    assert any(m.startswith("ready:") for m in messages) and "stopped" in messages


def test_a_second_daemon_on_the_same_state_directory_is_refused(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Two daemons on one state directory would write one journal and overwrite each other's checkpoints."""
    first = daemon_factory(broker).start()
    second = daemon_factory(broker, overrides={"state": first.config["state"]})
    with pytest.raises(DaemonError):
        second.start(timeout=15)
    assert second.wait(15) == 1
    assert "is in use by another daemon: another process holds" in second.log()
    assert f"(pid {first.pid})" in second.log()
    assert first.running and first.terminate() == 0
    second.start()  # the directory is free again
    assert second.terminate() == 0


def test_two_daemons_with_one_client_id_are_named_in_the_log(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """The broker closes the older of two connections with one client id, without a reason Mosquitto
    tells; the daemon that keeps losing its connection right after connecting says what may cause it."""
    first = daemon_factory(broker).start()
    second = daemon_factory(broker, client_id=first.client_id).start(wait_online=False)
    hint = f"another client may be using client id {first.client_id!r}"
    deadline = time.monotonic() + 20
    while hint not in first.log() + second.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert second.terminate() == 0 and first.terminate() == 0
    assert hint in first.log() + second.log()


def test_sigint_stops_like_sigterm(broker: Broker, daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(broker).start()
    with Collector(broker.host, broker.port, [d.status_topic]) as col:
        d.signal(signal.SIGINT)
        assert d.wait(30) == 0
        assert col.wait_payload(d.status_topic, b"offline", timeout=10, retained=False)
    assert "received SIGINT" in d.log() and "stopped" in d.log()
