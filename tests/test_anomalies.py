"""Forecast bounds and the anomaly check: payload, engine, metrics, equality with the offline run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_lstm.engine import Engine, Forecast
from edge_lstm.forecast import BOUND_DIGITS, ForecastEncoder
from edge_lstm.intervals import Intervals
from edge_lstm.metrics import Metrics
from edge_lstm.modelspec import load_model
from edge_lstm.payload import Reading
from edge_lstm.runtime import load_step_model
from edge_lstm.state import StateTable
from tests.conftest import load_series
from tests.support.offline import offline_intervals, open_model, stream_forecasts

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "taylor"
IV = Intervals((0.8, 0.95), [[-1.0, -2.0], [-2.5, -4.0]], [[1.5, 2.0], [3.0, 4.5]])


def _forecast(values: list[float], score: float | None) -> Forecast:
    return Forecast("kitchen", 1716998400.0, np.asarray(values), False, 1.0, "m@0123456789ab", score)


def test_payload_with_bounds_and_anomaly_fields_exactly() -> None:
    enc = ForecastEncoder(1800.0, "MW", intervals=IV)
    body = enc.encode(_forecast([100.0, 110.5], 1.25))
    assert body == (
        b'{"stream":"kitchen","model":"m@0123456789ab","ts":"2024-05-29T16:00:00Z","ts_epoch":1716998400.0,'
        b'"units":"MW","warming_up":false,"anomaly":true,"anomaly_score":1.25,"forecasts":['
        b'{"ts":"2024-05-29T16:30:00Z","value":100.0,"lo80":99,"hi80":101.5,"lo95":97.5,"hi95":103},'
        b'{"ts":"2024-05-29T17:00:00Z","value":110.5,"lo80":108.5,"hi80":112.5,"lo95":106.5,"hi95":115}]}'
    )
    doc = json.loads(enc.encode(_forecast([100.0, 110.5], 0.0)))
    assert doc["anomaly"] is False and doc["anomaly_score"] == 0.0
    doc = json.loads(enc.encode(_forecast([100.0, 110.5], None)))
    assert doc["anomaly"] is None and doc["anomaly_score"] is None
    # Non-finite values and bounds become null (the slow path), the rest is unchanged.
    doc = json.loads(enc.encode(_forecast([float("nan"), 110.5], 0.0)))
    assert doc["forecasts"][0] == {"ts": "2024-05-29T16:30:00Z", "value": None, "lo80": None, "hi80": None,
                                   "lo95": None, "hi95": None}  # fmt: skip
    assert doc["forecasts"][1]["hi95"] == 115.0
    # Precision applies to bounds and score alike; a model without intervals keeps the old format.
    doc = json.loads(ForecastEncoder(1800.0, precision=3, intervals=IV).encode(_forecast([100.04, 1.0], 1 / 3)))
    assert doc["forecasts"][0]["lo95"] == 97.5 and doc["anomaly_score"] == 0.333
    assert b"anomaly" not in ForecastEncoder(1800.0).encode(_forecast([1.0, 2.0], 0.5))


def test_engine_checks_each_reading_against_the_previous_one_step_interval() -> None:
    bundle = load_model(MODEL)
    man = bundle.manifest
    iv = dataclasses.replace(man, warmup_ticks=2, intervals=Intervals((0.95,), [[-10.0] * man.horizon],
                                                                       [[10.0] * man.horizon]))  # fmt: skip
    engine = Engine(_Swap(load_step_model(bundle), iv), StateTable(man.layers, 1, 10))
    t0, cad = 1_000_000_000.0, man.cadence_s
    out = [engine.process([Reading("s", (30000.0,), t0 + i * cad, 0.0)]) for i in range(3)]
    # Warm-up 2: the first forecast is made while warming up, so the third reading is the first checked.
    assert [r.forecasts[0].anomaly_score is None for r in out] == [True, True, False]
    assert [r.anomaly_checks for r in out] == [0, 0, 1]
    p = float(out[2].forecasts[0].values[0])  # the 1-step forecast the next reading is checked against
    r = engine.process([Reading("s", (p + 30.0,), t0 + 3 * cad, 0.0)])
    assert r.forecasts[0].anomaly_score == pytest.approx((30.0 - 10.0) / 20.0, rel=1e-6)
    assert (r.anomaly_checks, r.anomalies) == (1, {"high": 1})
    p = float(r.forecasts[0].values[0])
    r = engine.process([Reading("s", (p - 30.0,), t0 + 4 * cad, 0.0)])
    assert r.forecasts[0].anomaly_score == pytest.approx(1.0, rel=1e-6)
    assert (r.anomaly_checks, r.anomalies) == (1, {"low": 1})
    p = float(r.forecasts[0].values[0])
    r = engine.process([Reading("s", (p + 5.0,), t0 + 5 * cad, 0.0)])
    assert r.forecasts[0].anomaly_score == 0.0 and r.anomaly_checks == 1 and not r.anomalies
    # After a filled gap the reading is not checked (no 1-step forecast was made for it).
    r = engine.process([Reading("s", (30000.0,), t0 + 7 * cad, 0.0)])
    assert r.forecasts[0].anomaly_score is None and r.anomaly_checks == 0


class _Swap:
    """The bundled model under another manifest (here: other intervals and warm-up)."""

    def __init__(self, model: object, manifest: object) -> None:
        self._model = model
        self.manifest = manifest

    def step(self, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._model.step(x, state)  # type: ignore[attr-defined, no-any-return]


def test_online_bounds_and_scores_equal_the_offline_run() -> None:
    """Engine + encoder over a stretch of taylor with spikes give the offline run's bounds and scores, bit for bit."""
    model = open_model(MODEL)
    man = model.manifest
    assert man.intervals is not None
    ts, vs = load_series(REPO / "data" / "taylor.csv")
    ts, vs = ts[1000:1300].copy(), vs[1000:1300].copy()
    vs[100::37] += 4000.0  # spikes
    want, _ = stream_forecasts(model, ts, vs)
    lower, upper, scores = offline_intervals(model, want, vs)
    engine = Engine(model, StateTable(man.layers, 1, 10))
    enc = ForecastEncoder.for_manifest(man)
    docs = []
    for t, v in zip(ts, vs, strict=True):
        res = engine.process([Reading("s", (float(v),), float(t), 0.0)])
        docs.append(json.loads(enc.encode(res.forecasts[0])))
    got_lo95 = np.array([[item["lo95"] for item in d["forecasts"]] for d in docs])
    got_hi80 = np.array([[item["hi80"] for item in d["forecasts"]] for d in docs])
    got_values = np.array([[item["value"] for item in d["forecasts"]] for d in docs])
    np.testing.assert_allclose(got_values, want, rtol=1e-5)  # the model step itself: same as test_daemon
    # Bounds are the forecast plus the manifest's offsets: the same arithmetic online and offline (written
    # with BOUND_DIGITS significant digits).
    digits = 10.0 ** -(BOUND_DIGITS - 1)
    np.testing.assert_allclose(got_lo95, got_values + man.intervals.lower[1], rtol=digits)
    np.testing.assert_allclose(got_hi80, got_values + man.intervals.upper[0], rtol=digits)
    np.testing.assert_allclose(got_lo95, lower[:, 1], rtol=1e-5)
    np.testing.assert_allclose(got_hi80, upper[:, 0], rtol=1e-5)
    got_scores = np.array([np.nan if d["anomaly_score"] is None else d["anomaly_score"] for d in docs])
    np.testing.assert_array_equal(np.isnan(got_scores), np.isnan(scores))
    np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-6)
    flagged = [i for i, d in enumerate(docs) if d["anomaly"]]
    assert set(range(100, 300, 37)) <= set(flagged)


def test_metrics_count_checks_and_anomalies_by_direction() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, process_collectors=False)
    assert reg.get_sample_value("edge_lstm_anomalies_total", {"direction": "high"}) == 0
    assert reg.get_sample_value("edge_lstm_anomaly_checks_total") == 0
    model = open_model(MODEL)
    engine = Engine(model, StateTable(model.manifest.layers, 1, 10))
    ts, vs = load_series(REPO / "data" / "taylor.csv")
    vs = vs.copy()
    vs[120] += 5000.0
    vs[140] -= 5000.0
    for t, v in zip(ts[:160], vs[:160], strict=True):
        m.record_batch(engine.process([Reading("s", (float(v),), float(t), 0.0)]), 0.0, 1)
    warm = model.manifest.warmup_ticks
    assert reg.get_sample_value("edge_lstm_anomaly_checks_total") == 160 - warm
    assert reg.get_sample_value("edge_lstm_anomalies_total", {"direction": "high"}) >= 1
    assert reg.get_sample_value("edge_lstm_anomalies_total", {"direction": "low"}) >= 1
