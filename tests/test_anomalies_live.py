"""Anomaly flags end to end: a real series with injected spikes, replayed through the daemon on a real broker.

The taylor hold-out (the part the model and its intervals never saw, with one warm-up of context before
it) goes to the daemon twice, as two streams: as it is, and with spikes added. Every spike beyond the
95 % band must be flagged, the clean stream's false-flag rate must be within 2 points of 5 %, and
every flag and score must equal the offline run's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from tests.support.broker import Broker
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_MODEL, DaemonProcess
from tests.support.offline import offline_intervals, open_model, stream_forecasts
from tests.test_daemon import publish_series, publisher

SPIKE_EVERY = 23


def _holdout(series: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    report = json.loads((TAYLOR_MODEL / "report.json").read_text())
    split = report["data"]["split"]
    warmup = json.loads((TAYLOR_MODEL / "manifest.json").read_text())["warmup_ticks"]
    start = split["train"] + split["val"] - warmup
    ts, vs = series
    return ts[start:], vs[start:], warmup


def test_spikes_are_flagged_and_clean_data_is_flagged_at_the_nominal_rate(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    collector_factory: Callable[..., Collector],
    taylor_series: tuple[np.ndarray, np.ndarray],
) -> None:
    model = open_model(TAYLOR_MODEL)
    iv = model.manifest.intervals
    assert iv is not None and iv.check_level == 0.95
    ts, clean, warmup = _holdout(taylor_series)
    width = iv.upper[-1, 0] - iv.lower[-1, 0]
    spiked = clean.copy()
    spike_at = np.arange(warmup + 5, len(ts), SPIKE_EVERY)
    signs = np.where(np.arange(len(spike_at)) % 2 == 0, 1.0, -1.0)
    spiked[spike_at] += signs * np.linspace(0.5, 4.0, len(spike_at)) * width  # some inside the band, most beyond

    d = daemon_factory(broker).start()
    col = collector_factory(broker, ["forecasts/#"])
    pub = publisher(broker)
    publish_series(pub, "clean", ts, clean)
    publish_series(pub, "spiked", ts, spiked)
    col.wait_for(len(ts), "forecasts/clean", timeout=120)
    col.wait_for(len(ts), "forecasts/spiked", timeout=120)
    pub.disconnect()

    def flags(topic: str) -> tuple[np.ndarray, np.ndarray]:
        docs = sorted((m.json() for m in col.select(topic, retained=False)), key=lambda doc: doc["ts_epoch"])
        assert [doc["ts_epoch"] for doc in docs] == ts.tolist()
        score = np.array([np.nan if doc["anomaly_score"] is None else doc["anomaly_score"] for doc in docs])
        flag = np.array([doc["anomaly"] is True for doc in docs])
        assert (np.isnan(score) == np.array([doc["anomaly"] is None for doc in docs])).all()
        return flag, score

    # Clean data: flagged about as often as the 95 % level promises.
    flag, score = flags("forecasts/clean")
    checked = ~np.isnan(score)
    assert checked.sum() == len(ts) - warmup
    rate = flag[checked].mean()
    assert abs(rate - 0.05) <= 0.02, rate
    want_fc, _ = stream_forecasts(model, ts, clean)
    *_, want_score = offline_intervals(model, want_fc, clean)
    np.testing.assert_array_equal(flag, want_score > 0)

    # Spiked data: every spike beyond the band (by the offline run) is flagged, with the offline score.
    flag, score = flags("forecasts/spiked")
    want_fc, _ = stream_forecasts(model, ts, spiked)
    *_, want_score = offline_intervals(model, want_fc, spiked)
    beyond = spike_at[want_score[spike_at] > 0]
    assert len(beyond) >= 0.8 * len(spike_at)  # most spikes are beyond the band...
    assert flag[beyond].all()  # ...and every one of them is flagged
    np.testing.assert_array_equal(flag, want_score > 0)
    np.testing.assert_allclose(score[checked], want_score[checked], rtol=1e-4, atol=1e-6)
    # The biggest spikes score about as many widths as they were made to stick out.
    assert score[spike_at[-1]] > 2.0

    n_checks = 2 * (len(ts) - warmup)
    assert d.metric("edge_lstm_anomaly_checks_total") == n_checks
    total = d.metric("edge_lstm_anomalies_total", direction="high") + d.metric(
        "edge_lstm_anomalies_total", direction="low"
    )
    assert total == int(flag.sum()) + int(flags("forecasts/clean")[0].sum())
