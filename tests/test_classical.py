"""The SARIMA and ETS baselines: forecasts from filtered states equal statsmodels' own, on the report's pairs."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest

from converter.classical import _ahead, classical_forecasts
from converter.data import load
from converter.prepare import Part, Split, assign_parts, build_pipeline, encode, eval_runs
from converter.report import mae, scored_pairs

pytest.importorskip("statsmodels")
pytestmark = pytest.mark.slow  # maximum-likelihood fits take seconds each


def test_forecasts_from_filtered_states_equal_statsmodels_forecasts() -> None:
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    rng = np.random.default_rng(0)
    t = np.arange(300)
    y = 10 * np.sin(2 * np.pi * t / 12) + 0.05 * t + rng.normal(0, 1, t.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = SARIMAX(y[:250], order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)).fit(disp=False)
        filtered = SARIMAX(y, order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)).filter(res.params)
        ahead = _ahead(filtered, 5)
        for origin in (260, 281):
            # statsmodels: the same parameters, data up to the origin, forecast 5 ahead
            upto = SARIMAX(y[: origin + 1], order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)).filter(res.params)
            np.testing.assert_allclose(ahead[origin], upto.forecast(5), rtol=1e-7, atol=1e-7)


def test_baselines_score_the_report_pairs_of_a_seasonal_series_with_gaps(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 12 * 40  # two-hourly: a day is 12 ticks
    t = np.arange(n)
    y = 20 + 5 * np.sin(2 * np.pi * t / 12) + np.cumsum(rng.normal(0, 0.2, n))
    path = tmp_path / "two_hourly.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "v"])
        for i in range(n):
            if i in (150, 151) or 250 <= i < 260:  # a short gap (interpolated) and a long one (two segments)
                continue
            w.writerow([1_700_000_000 + 7200 * i, f"{y[i]:.4f}"])
    grid = load(path, "ts", ("v",), None, 4)
    assert len(grid.segments) == 2
    split = Split()
    pipe = build_pipeline(grid, assign_parts(grid, split), "v", 3)
    enc = encode(grid, pipe, split)
    runs = eval_runs(enc, Part.HOLDOUT, 12)
    pairs = scored_pairs(enc, runs, 3, 12)
    out = classical_forecasts(enc, runs, pairs.run_index, pairs.offset, grid.cadence_s, 12, 3)
    assert set(out) == {"sarima", "ets"}
    assert out["sarima"]["spec"] == "SARIMA(1,1,1)(0,1,1)_12" and out["ets"]["spec"] == "ETS(A,Ad,A)_12"
    for name in ("sarima", "ets"):
        fc = out[name]["forecasts"]
        assert [f.shape for f in fc] == [a.shape for a in pairs.actual]
        m = mae(fc, pairs.actual)
        # A daily cycle on a slow random walk: both models see the cycle and beat persistence 3 ticks ahead.
        assert m[2] < 0.8 * mae(pairs.last, pairs.actual)[2], (name, m)
    # Every origin scored is a hold-out tick.
    r = runs[int(pairs.run_index[0][0])]
    assert enc[r.seg_index].part[r.start + int(pairs.offset[0][0])] == Part.HOLDOUT


def test_the_hold_out_forecasts_use_nothing_after_their_origin(tmp_path: Path) -> None:
    """Parameters and ETS's initial states come from the ticks before the hold-out: changing the last
    hold-out readings leaves every forecast made before them unchanged (a filter started from states
    concentrated over the whole series would move them all)."""
    rng = np.random.default_rng(4)
    n = 12 * 40
    y = 20 + 5 * np.sin(2 * np.pi * np.arange(n) / 12) + np.cumsum(rng.normal(0, 0.2, n))

    def baselines(values: np.ndarray, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ts", "v"])
            w.writerows([1_700_000_000 + 7200 * i, f"{v:.4f}"] for i, v in enumerate(values))
        grid = load(path, "ts", ("v",), None, 4)
        split = Split()
        enc = encode(grid, build_pipeline(grid, assign_parts(grid, split), "v", 3), split)
        runs = eval_runs(enc, Part.HOLDOUT, 12)
        pairs = scored_pairs(enc, runs, 3, 12)
        out = classical_forecasts(enc, runs, pairs.run_index, pairs.offset, grid.cadence_s, 12, 3)
        return out["ets"]["forecasts"], pairs.offset

    changed = y.copy()
    changed[-20:] += 15.0
    (a, offset), (b, _) = baselines(y, "a"), baselines(changed, "b")
    for k in range(3):
        # pairs run in origin order, the last at the last tick minus k: all but the last 20 start earlier
        assert len(a[k]) == len(offset[k]) > 40
        np.testing.assert_array_equal(a[k][:-20], b[k][:-20])
        assert not np.allclose(a[k][-5:], b[k][-5:])  # the late ones do see the change
