"""The daemon end to end against a real Mosquitto: forecasts, equality with the offline run, restarts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_lstm import checkpoint as ckpt
from edge_lstm.modelspec import load_manifest
from tests.support.broker import Broker
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_MODEL, DaemonProcess
from tests.support.offline import StreamState, open_model, stream_forecasts

REL_TOL = 1e-5
SERIES_START = 500  # a stretch of taylor away from its first day


def stretch(series: tuple[np.ndarray, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` consecutive ticks (timestamps, values) of a series, from ``SERIES_START``."""
    ts, vs = series
    return ts[SERIES_START : SERIES_START + n], vs[SERIES_START : SERIES_START + n]
MANIFEST = load_manifest(TAYLOR_MODEL)
K = MANIFEST.horizon


def publisher(broker: Broker) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="test-sensor", protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def publish_series(
    client: paho.Client, stream: str, ts: np.ndarray, values: np.ndarray, topic: str = "sensors/{stream}/value"
) -> None:
    infos = [
        client.publish(topic.format(stream=stream), json.dumps({"ts": float(t), "demand_mw": float(v)}), qos=1)
        for t, v in zip(ts, values, strict=True)
    ]
    for info in infos:
        info.wait_for_publish(10)


def forecasts_by_ts(col: Collector, topic: str) -> dict[float, np.ndarray]:
    out = {}
    for m in col.select(topic, retained=False):
        doc = m.json()
        out[doc["ts_epoch"]] = np.array([f["value"] for f in doc["forecasts"]])
    return out


def assert_equal_forecasts(got: dict[float, np.ndarray], ts: np.ndarray, want: np.ndarray) -> None:
    missing = [t for t in ts if float(t) not in got]
    assert not missing, f"{len(missing)} forecasts missing, first at {missing[:3]}"
    daemon = np.stack([got[float(t)] for t in ts])
    np.testing.assert_allclose(daemon, want, rtol=REL_TOL, atol=0)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return open_model(TAYLOR_MODEL)


def test_mosquitto_pub_and_paho_readings_each_give_one_forecast(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(broker).start()
    # a retained marker tells us when mosquitto_sub has subscribed (it is its first line)
    subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-r", "-t", "forecasts/_ready", "-m", "{}"],
        check=True,
    )  # fmt: skip
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", "forecasts/#", "-v", "-q", "1",
         "-C", "3", "-W", "30", "--id", "test-sub"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sub.stdout is not None
        assert sub.stdout.readline().startswith("forecasts/_ready")
        # readings: a bare number from mosquitto_pub, a JSON object from a paho client
        subprocess.run(
            ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
             "-t", "sensors/hall/value", "-m", "30150.5"],
            check=True,
        )  # fmt: skip
        pub = publisher(broker)
        reading = json.dumps({"ts": 959_000_000, "demand_mw": 28000})
        pub.publish("sensors/attic/value", reading, qos=1).wait_for_publish(10)
        pub.disconnect()
        out, _ = sub.communicate(timeout=40)
    finally:
        if sub.poll() is None:
            sub.kill()
    lines = [line for line in out.splitlines() if line]
    assert len(lines) == 2, out
    docs = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in lines}
    assert set(docs) == {"forecasts/hall", "forecasts/attic"}
    for topic, doc in docs.items():
        assert doc["stream"] == topic.split("/")[1]
        assert doc["model"] == MANIFEST.model_id and doc["units"] == "MW"
        assert len(doc["forecasts"]) == K and doc["warming_up"] is True
    assert docs["forecasts/attic"]["ts_epoch"] == 959_000_400  # its tick on the model's 30-minute grid
    assert d.outcomes()["processed"] == 2
    assert d.wait_metric("edge_lstm_forecasts_published_total", 2) == 2  # counted at the PUBACK
    # exactly one forecast each: nothing else arrives
    assert d.metric("edge_lstm_readings_received_total") == 2


def test_replayed_series_equals_offline_streaming_run(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
) -> None:
    ts, vs = stretch(taylor_series, 300)
    want, _ = stream_forecasts(model, ts, vs)
    d = daemon_factory(broker).start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)
    publish_series(pub, "taylor", ts, vs)
    col.wait_for(len(ts), "forecasts/taylor", timeout=60)
    assert_equal_forecasts(forecasts_by_ts(col, "forecasts/taylor"), ts, want)
    docs = [m.json() for m in col.select("forecasts/taylor")]
    warm = [doc["warming_up"] for doc in docs]
    assert warm == [i + 1 < MANIFEST.warmup_ticks for i in range(len(ts))]
    assert d.outcomes()["processed"] == len(ts)
    # the online 1-step error was measured for every reading after warm-up
    n_err = d.metric("edge_lstm_forecast_abs_error_count", model=MANIFEST.model_id)
    assert n_err == len(ts) - MANIFEST.warmup_ticks
    assert d.metric("edge_lstm_stream_abs_error", stream="taylor") > 0
    pub.disconnect()


def test_sigterm_mid_series_then_restart_equals_uninterrupted_run(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
) -> None:
    ts, vs = stretch(taylor_series, 240)
    want, _ = stream_forecasts(model, ts, vs)
    d = daemon_factory(broker)
    d.start()
    col = collector_factory(broker, ["forecasts/#", d.status_topic])
    pub = publisher(broker)
    publish_series(pub, "s1", ts[:100], vs[:100])
    assert len(col.wait_for(100, "forecasts/s1", timeout=60)) == 100
    assert d.terminate() == 0
    assert col.wait_payload(d.status_topic, b"offline", timeout=10)
    # published while the daemon is down: kept by the broker in the daemon's persistent session
    publish_series(pub, "s1", ts[100:160], vs[100:160])
    d.start()
    publish_series(pub, "s1", ts[160:], vs[160:])
    col.wait_for(len(ts), "forecasts/s1", timeout=60)
    assert_equal_forecasts(forecasts_by_ts(col, "forecasts/s1"), ts, want)
    assert d.metric("edge_lstm_state_restores_total", result="restored") == 1
    assert d.terminate() == 0
    pub.disconnect()


def test_sigkill_after_checkpoint_then_restart_equals_run_from_that_checkpoint(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    ts, vs = stretch(taylor_series, 200)
    d = daemon_factory(broker, overrides={"state": {"checkpoint_interval_s": 0.2}})
    d.start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)
    publish_series(pub, "k", ts[:90], vs[:90])
    assert len(col.wait_for(90, "forecasts/k", timeout=60)) == 90
    # wait for a checkpoint written after the last forecast went out
    done_at = col.select("forecasts/k")[-1].at
    wall_done = time.time() - (time.monotonic() - done_at)
    assert d.wait_metric("edge_lstm_checkpoint_last_success_timestamp_seconds", wall_done + 0.5, timeout=15) > wall_done
    d.kill()
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy(Path(d.config["state"]["dir"]) / ckpt.CHECKPOINT_NAME, saved)
    loaded = ckpt.load_checkpoint(saved, MANIFEST.sha256, MANIFEST.layers, 1, 100)
    assert loaded.table is not None and list(loaded.table.streams()) == ["k"]
    arrays = loaded.table.to_arrays()
    start = StreamState(
        [np.asarray(arrays[n], np.float32) for n in ("h_0", "c_0")],
        np.asarray(arrays["prev"], np.float64),
        float(arrays["last_ts"][0]),
    )
    assert start.last_ts == ts[89]
    from_ckpt, _ = stream_forecasts(model, ts[90:], vs[90:], start)
    uninterrupted, _ = stream_forecasts(model, ts, vs)

    col.clear()
    d.start()
    publish_series(pub, "k", ts[90:], vs[90:])
    col.wait_for(len(ts) - 90, "forecasts/k", timeout=60)
    got = forecasts_by_ts(col, "forecasts/k")
    assert_equal_forecasts(got, ts[90:], from_ckpt)
    assert_equal_forecasts(got, ts[90:], uninterrupted[90:])
    pub.disconnect()


def test_bad_payloads_are_counted_and_skipped(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
    model,  # type: ignore[no-untyped-def]
) -> None:
    ts, vs = stretch(taylor_series, 40)
    want, _ = stream_forecasts(model, ts, vs)
    d = daemon_factory(broker).start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)
    bad: list[tuple[bytes, str]] = [
        (b"\xff\xfe\x00garbage", "bad_payload"),
        (b"not a number", "bad_payload"),
        (b'{"ts": 1, "demand_mw": NaN}', "non_finite"),
        (b"NaN", "non_finite"),
        (b'{"ts": 959100000, "temperature": 3.5}', "missing_field"),
        (b'{"ts": 959100000, "demand_mw": 1e300}', "non_finite"),
        (b'{"ts": 959100000, "demand_mw": "12"}', "bad_payload"),
        (b"[" + b"1," * 500_000 + b"1]", "too_large"),  # a 1 MB body
        (b'{"ts": "yesterday", "demand_mw": 1}', "bad_timestamp"),
        (b"", "bad_payload"),
    ]
    expected: dict[str, int] = {}
    infos = []
    for i, (t, v) in enumerate(zip(ts, vs, strict=True)):
        infos.append(pub.publish("sensors/mix/value", json.dumps({"ts": float(t), "demand_mw": float(v)}), qos=1))
        if i < len(bad):
            body, outcome = bad[i]
            infos.append(pub.publish("sensors/mix/value", body, qos=1))
            expected[outcome] = expected.get(outcome, 0) + 1
    for info in infos:
        info.wait_for_publish(10)
    col.wait_for(len(ts), "forecasts/mix", timeout=60)
    assert_equal_forecasts(forecasts_by_ts(col, "forecasts/mix"), ts, want)
    total = len(ts) + len(bad)
    assert d.wait_metric("edge_lstm_readings_received_total", total) == total
    outcomes = d.outcomes()
    assert outcomes["processed"] == len(ts)
    for outcome, n in expected.items():
        assert outcomes[outcome] == n, (outcome, outcomes)
    assert sum(outcomes.values()) == total
    assert len(col.select("forecasts/#")) == len(ts)
    pub.disconnect()


def test_broker_restart_reconnects_and_resubscribes(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(broker).start()
    broker.stop()  # no persistence: the broker forgets the subscription
    broker.start()
    with Collector(broker.host, broker.port, ["forecasts/#", d.status_topic]) as col:
        assert col.wait_payload(d.status_topic, b"online", timeout=30), d.log()
        assert d.wait_metric("edge_lstm_mqtt_reconnects_total", 1, timeout=30) == 1
        assert d.metric("edge_lstm_mqtt_connected") == 1
        pub = publisher(broker)
        # the subscription is back: a reading published now is forecast
        pub.publish("sensors/after/value", b"25000", qos=1).wait_for_publish(10)
        assert len(col.wait_for(1, "forecasts/after", timeout=30)) == 1, d.log()
        pub.disconnect()


def test_status_topic_online_then_offline_on_sigterm_and_on_sigkill(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(broker).start()
    with Collector(broker.host, broker.port, [d.status_topic]) as col:
        retained = col.wait_for(1, timeout=10)
        assert retained[0].retain and retained[0].payload == b"online"
    assert d.terminate() == 0
    with Collector(broker.host, broker.port, [d.status_topic]) as col:
        msgs = col.wait_for(1, timeout=10)
        assert msgs[0].retain and msgs[0].payload == b"offline"
    d.start()
    with Collector(broker.host, broker.port, [d.status_topic]) as col:
        assert col.wait_for(1, timeout=10)[0].payload == b"online"
        d.kill()  # the broker sends the last will
        assert col.wait_payload(d.status_topic, b"offline", timeout=20, retained=False)
    assert "Traceback" not in d.log()


def test_daemon_process_never_loads_tensorflow(broker: Broker, daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(broker).start()
    pub = publisher(broker)
    pub.publish("sensors/x/value", b"25000", qos=1).wait_for_publish(10)
    pub.disconnect()
    assert d.wait_metric("edge_lstm_forecasts_published_total", 1) == 1
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "/site-packages/tensorflow/" not in maps and "_pywrap_tensorflow_internal" not in maps
    assert "ai_edge_litert" in maps  # the runtime is loaded, so the check looks at the right process
    # and the daemon's modules import no tensorflow either
    code = (
        "import sys, edge_lstm.cli, edge_lstm.daemon, edge_lstm.demo;"
        "from edge_lstm.daemon import load_serving_model;"
        "from edge_lstm.config import parse_config;"
        f"load_serving_model(parse_config({{'model': {{'path': {str(TAYLOR_MODEL)!r}}}}}));"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
