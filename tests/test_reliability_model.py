"""Reliability 8: model trouble at start and on SIGHUP: a clear error or a clean state reset, never a crash loop."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_lstm.modelspec import load_manifest
from tests.support.broker import Broker
from tests.support.collector import Collector, publisher
from tests.support.daemon import REPO, TAYLOR_MODEL, DaemonProcess
from tests.support.faults import record, reliability_report  # noqa: F401

pytestmark = pytest.mark.usefixtures("reliability_report")

TINY_MODEL = REPO / "tests" / "data" / "tiny2x8"
STREAMS = ("m1", "m2", "m3")


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "model.tflite"):
        shutil.copyfile(src / name, dst / name)
    return dst


def _truncate(d: Path) -> None:
    p = d / "model.tflite"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(d: Path) -> None:
    p = d / "model.tflite"
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate_and_rehash(d: Path) -> None:
    """A truncated file whose manifest was updated to match: the hash passes, the runtime must refuse it."""
    _truncate(d)
    m = json.loads((d / "manifest.json").read_text())
    m["sha256"] = hashlib.sha256((d / "model.tflite").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))


def _remove(d: Path) -> None:
    shutil.rmtree(d)


def _garbage_manifest(d: Path) -> None:
    (d / "manifest.json").write_text("{not json")


CASES: dict[str, tuple[Callable[[Path], None], dict[str, str], str]] = {
    # name: (damage, model config overrides, words the error line must contain)
    "missing model directory": (_remove, {}, "model directory not found"),
    "truncated model file": (_truncate, {}, "does not match its manifest"),
    "one byte changed (wrong hash)": (_flip_byte, {}, "does not match its manifest"),
    "truncated, manifest re-hashed": (_truncate_and_rehash, {}, "cannot be loaded"),
    "manifest not JSON": (_garbage_manifest, {}, "not valid JSON"),
    "runtime not installed (tflite-runtime)": (
        lambda _d: None,
        {"runtime": "tflite-runtime"},
        "pip install tflite-runtime",
    ),
}


def test_bad_model_at_start_fails_fast_with_one_clear_line(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    for name, (damage, model_overrides, words) in CASES.items():
        model_dir = _copy_model(TAYLOR_MODEL, tmp_path / f"model-{len(name)}-{abs(hash(name)) % 1000}")
        damage(model_dir)
        d = daemon_factory(broker, overrides={"model": {"path": str(model_dir), **model_overrides}})
        t0 = time.monotonic()
        d.start(wait_online=False)
        code = d.wait(60)
        took = time.monotonic() - t0
        log = d.log()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert code == 1, (name, log)
        assert "Traceback" not in log, (name, log)
        assert len(errors) == 1 and "cannot start" in errors[0] and words in errors[0], (name, log)
        if "loaded" in words or "cannot be loaded" in words:
            assert "ai-edge-litert" in errors[0]  # the runtime and its version are named
        assert "MQTT connected" not in log  # failed before touching the broker
        record("8", f"start with {name}: exit code, seconds to exit", f"{code}, {took:.1f} s",
               f"1, no traceback, one error line with “{words}”")  # fmt: skip


def _publisher(broker: Broker) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _tick(c: paho.Client, ts: float, value: float) -> None:
    for s in STREAMS:
        c.publish(f"sensors/{s}/value", json.dumps({"ts": ts, "demand_mw": value}), qos=1).wait_for_publish(10)


def test_sighup_swap_to_other_layer_sizes_resets_state_and_a_broken_file_keeps_serving(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    taylor_series: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    ts, values = taylor_series
    model_dir = _copy_model(TAYLOR_MODEL, tmp_path / "served")
    old, new = load_manifest(TAYLOR_MODEL), load_manifest(TINY_MODEL)
    assert old.layers != new.layers and old.pipeline.columns == new.pipeline.columns
    d = daemon_factory(broker, overrides={"model": {"path": str(model_dir)}}).start()
    pub = _publisher(broker)
    try:
        with Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            for i in range(3):
                _tick(pub, float(ts[3000 + i]), float(values[3000 + i]))
            assert len(col.wait_for(3 * len(STREAMS), "forecasts/#", timeout=20)) == 3 * len(STREAMS)
            assert d.metric("edge_lstm_streams_active") == len(STREAMS)

            # swap in a model with different layer sizes, then SIGHUP
            _copy_model(TINY_MODEL, model_dir)
            d.signal(signal.SIGHUP)
            assert d.wait_metric("edge_lstm_model_reloads_total", 1, result="ok") == 1, d.log()
            col.clear()
            _tick(pub, float(ts[3003]), float(values[3003]))
            msgs = col.wait_for(len(STREAMS), "forecasts/#", timeout=20)
            docs = [m.json() for m in msgs]
            assert {doc["model"] for doc in docs} == {new.model_id}
            assert all(len(doc["forecasts"]) == new.horizon and doc["warming_up"] for doc in docs)
            resets = d.wait_metric("edge_lstm_state_resets_total", len(STREAMS), reason="model_change")
            assert resets == len(STREAMS)
            assert "layers, columns or tick policy differ" in d.log()

            # a broken file on the next SIGHUP: refused, the running model keeps serving
            _truncate(model_dir)
            d.signal(signal.SIGHUP)
            assert d.wait_metric("edge_lstm_model_reloads_total", 1, result="failed") == 1, d.log()
            col.clear()
            _tick(pub, float(ts[3004]), float(values[3004]))
            docs = [m.json() for m in col.wait_for(len(STREAMS), "forecasts/#", timeout=20)]
            assert {doc["model"] for doc in docs} == {new.model_id}
            assert d.running
    finally:
        pub.disconnect()
        pub.loop_stop()
    assert d.terminate() == 0
    assert "model reload failed, keeping" in d.log()
    record("8", f"SIGHUP swap {old.model_id} (layers {list(old.layers)}) -> {new.model_id} (layers {list(new.layers)})",
           f"reloads ok = 1, resets model_change = {int(resets)}", f"state reset for all {len(STREAMS)} streams, "
           "next forecasts from the new model (horizon 4, warming up)")  # fmt: skip
    record("8", "SIGHUP with a truncated model file", "reloads failed = 1", "old model keeps serving, process alive")


def test_a_seasonally_differenced_model_survives_sigkill_with_its_history_ring(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], tmp_path: Path,
    taylor_series: tuple[np.ndarray, np.ndarray],
) -> None:  # fmt: skip
    """A format-version-2 model whose blend leans on seasonal naive and on the seasonally differenced
    forecast (a ring of 49 targets per stream) and whose network is fed a seasonal input (last
    season's change over the next 3 ticks, in place of the bundled model's day-of-week cosine): the
    daemon is SIGKILLed mid-series and restarted, and every forecast it published, before and after,
    equals one uninterrupted engine's on the same readings, so the ring came back from the checkpoint
    and the journal."""
    from edge_lstm.engine import Engine
    from edge_lstm.forecast import ForecastEncoder
    from edge_lstm.modelspec import load_model
    from edge_lstm.payload import Reading
    from edge_lstm.runtime import load_step_model
    from edge_lstm.state import StateTable

    model_dir = tmp_path / "blended"
    shutil.copytree(TAYLOR_MODEL, model_dir)
    raw = json.loads((model_dir / "manifest.json").read_text())
    k = raw["output"]["horizon"]
    flags = [i % 2 == 0 for i in range(k)]
    raw["output"].update(season_ticks=48, seasonal_weights=[0.3] * k, seasonal_differenced=flags)
    raw["format_version"] = 2
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    blend_only = load_step_model(load_model(model_dir))
    assert raw["features"][-1]["kind"] == "dow_cos"
    raw["features"][-1] = {"name": "demand_mw_season_3", "kind": "seasonal", "column": "demand_mw",
                           "scale": 1500.0, "season": 48, "lead": 3}  # fmt: skip
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    model = load_step_model(load_model(model_dir))
    assert model.manifest.pipeline.output.history_ticks == 49 and model.manifest.pipeline.history_ticks == 49
    ts, values = taylor_series
    n, cut = 160, 110  # more than two seasons before the kill, so the ring is full and has wrapped
    d = daemon_factory(broker, overrides={"model": {"path": str(model_dir)}, "state": {"checkpoint_interval_s": 0.3}})
    with publisher(broker.host, broker.port) as pub, Collector(broker.host, broker.port, ["forecasts/#"]) as col:
        d.start()
        for i in range(n):
            if i == cut:
                col.wait_for(cut, "forecasts/a", timeout=30, retained=False)
                # a checkpoint after the cut: the restart's ring must come from it
                taken = d.metric("edge_lstm_checkpoint_duration_seconds_count")
                deadline = time.monotonic() + 20
                while d.metric("edge_lstm_checkpoint_duration_seconds_count") <= taken:
                    assert time.monotonic() < deadline, d.log()
                    time.sleep(0.05)
                d.kill()
                d.start()
            body = json.dumps({"ts": float(ts[i]), "demand_mw": float(values[i])})
            pub.publish("sensors/a/value", body, qos=1).wait_for_publish(10)
        msgs = col.wait_for(n, "forecasts/a", timeout=30, retained=False)
    log = d.log()
    assert "restored the state of 1 stream(s)" in log, log
    replayed = re.findall(r"(\d+) journaled message\(s\) after the checkpoint", log)
    assert (int(replayed[-1]) if replayed else 0) < 49, log  # fewer than the ring: the checkpoint held it
    engine = Engine(model, StateTable(model.manifest.layers, 1, 10))
    encoder = ForecastEncoder.for_manifest(model.manifest)  # the text the daemon writes: compared exactly
    want, written = {}, {}
    for i in range(n):
        for f in engine.process([Reading("a", (float(values[i]),), float(ts[i]), 0.0)]).forecasts:
            want[f.ts] = f.values
            written[f.ts] = [it["value"] for it in json.loads(encoder.encode(f))["forecasts"]]
    got = {m.json()["ts_epoch"]: [it["value"] for it in m.json()["forecasts"]] for m in msgs}
    assert sorted(got) == sorted(want)
    for t, v in got.items():
        assert v == written[t], t
    # the blend and the seasonal input are live: without either the late forecasts would differ
    for other in (load_step_model(load_model(TAYLOR_MODEL)), blend_only):
        plain = Engine(other, StateTable(model.manifest.layers, 1, 10))
        last = [plain.process([Reading("a", (float(values[i]),), float(ts[i]), 0.0)]).forecasts for i in range(n)]
        assert not np.allclose(last[-1][0].values, want[last[-1][0].ts])
