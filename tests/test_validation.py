"""Rolling-origin folds, the per-horizon blend towards persistence and seasonal naive, and its decoding."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from converter import validation
from converter.prepare import Split
from converter.validation import BLEND_GRID, HEDGE_WEIGHT, Blend, OutOfSample, fit_blend, rolling_folds
from edge_lstm.features import (
    FeatureKind,
    FeaturePipeline,
    FeatureSpec,
    OutputSpec,
    seasonal_lags,
    seasonal_naive,
)


def test_rolling_folds_move_the_origin_back_one_validation_block_each() -> None:
    folds = rolling_folds(Split(0.7, 0.15), 3)
    assert [round(f.train_frac, 6) for f in folds] == [0.4, 0.55, 0.7]
    assert all(f.val_frac == 0.15 for f in folds)
    # Folds that would train on too little of the series are left out; the last fold is the split itself.
    assert [round(f.train_frac, 6) for f in rolling_folds(Split(0.5, 0.2), 4)] == [0.3, 0.5]
    assert rolling_folds(Split(0.7, 0.15), 1) == [Split(0.7, 0.15)]


def test_seasonal_lags_point_into_the_last_season() -> None:
    assert seasonal_lags(4, 9).tolist() == [3, 2, 1, 0, 3, 2, 1, 0, 3]
    assert seasonal_lags(1, 3).tolist() == [0, 0, 0]
    lags = seasonal_lags(48, 16)
    assert lags.min() >= 0 and lags.max() < 48


def test_seasonal_naive_is_the_reading_one_season_before_the_forecast_tick() -> None:
    y = np.arange(10.0) * 10
    s = seasonal_naive(y, season=4, horizon=5)
    # origin t=5, k=1 forecasts tick 6 with tick 2; k=5 forecasts tick 10 with tick 6 (= 10 - 4*ceil(5/4) + ... )
    assert s[5, 0] == y[2] and s[5, 3] == y[5] and s[5, 4] == y[2]
    assert np.isnan(s[0, 0]) and s[0, 3] == y[0] and np.isnan(s[2, 0]) and s[3, 0] == y[0]
    for t in range(10):
        for k in range(1, 6):
            j = t + k - 4 * -(-k // 4)
            assert (np.isnan(s[t, k - 1]) and j < 0) or s[t, k - 1] == y[j]


def _pipeline(weights: tuple[float, ...] = (), season: int = 0) -> FeaturePipeline:
    out = OutputSpec(target="v", horizon=3, scale=2.0, season_ticks=season, seasonal_weights=weights)
    return FeaturePipeline(columns=("v",), features=(FeatureSpec("v_diff", FeatureKind.DIFF, "v"),), output=out)


def test_decode_leans_on_seasonal_naive_by_its_weights_and_round_trips() -> None:
    p = _pipeline((0.0, 0.5, 1.0), season=24)
    y = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    s = np.array([[110.0, 120.0, 130.0], [np.nan, 90.0, np.nan]])
    got = p.decode(y, [100.0, 100.0], s)
    np.testing.assert_allclose(got, [[102.0, 112.0, 132.0], [100.0, 95.0, 100.0]])
    # Without seasonal values (or weights) decoding is the plain delta decoding.
    np.testing.assert_allclose(p.decode(y, [100.0, 100.0]), [[102.0] * 3, [100.0] * 3])
    np.testing.assert_allclose(_pipeline().decode(y, [100.0, 100.0], s), [[102.0] * 3, [100.0] * 3])
    back = FeaturePipeline.from_dict(p.to_dict())
    assert back == p and back.output.history_ticks == 24
    plain = _pipeline((0.0, 0.0, 0.0), season=24)
    assert "seasonal_weights" not in plain.to_dict()["output"] and plain.output.history_ticks == 0
    with pytest.raises(ValueError):
        OutputSpec(target="v", horizon=3, season_ticks=24, seasonal_weights=(1.0,))
    with pytest.raises(ValueError):
        OutputSpec(target="v", horizon=3, season_ticks=24, seasonal_weights=(1.0,) * 3, seasonal_differenced=(True,))
    diff = dataclasses.replace(p.output, seasonal_differenced=(False, True, False))
    assert diff.differenced and diff.history_ticks == 25 and OutputSpec.from_dict(diff.to_dict()) == diff
    assert diff.to_dict()["seasonal_differenced"] == [False, True, False]
    # A flag on a horizon without weight needs nothing and is dropped.
    idle = dataclasses.replace(p.output, seasonal_weights=(0.0, 1.0, 0.0), seasonal_differenced=(True, False, False))
    assert not idle.differenced and idle.history_ticks == 24 and "seasonal_differenced" not in idle.to_dict()
    assert idle.seasonal_differenced == () and OutputSpec.from_dict(idle.to_dict()) == idle


def _oos(
    delta: np.ndarray, seasonal: np.ndarray, actual: np.ndarray, last: np.ndarray, reference: np.ndarray | None = None
) -> OutOfSample:
    ref = np.full(last.shape, np.nan) if reference is None else reference
    return OutOfSample(last=[last], actual=[actual], delta=[delta], seasonal=[seasonal], reference=[ref])


def test_without_the_reference_readings_the_blend_is_the_seasonal_naive_one() -> None:
    """Where r_k is missing the differenced forecasts are seasonal naive's weight-0 candidates: they
    must not win a horizon the seasonal-naive search left to the naive forecast."""
    for seed in range(40):  # the search without this rule gave seed 32's horizon to the network (gain 1)
        rng = np.random.default_rng(seed)
        folds = []
        for i in range(3):
            n = 40
            last = rng.normal(50, 5, n)
            change = rng.normal(0, 3, n)
            actual = last + change + rng.normal(0, 2, n)
            seasonal = last + change * (1 if i < 2 else -1) + rng.normal(0, 1, n)  # misleads in one fold
            folds.append(_oos(change * rng.uniform(0.2, 1), seasonal, actual, last))
        a, b = fit_blend(folds), fit_blend(folds, differenced=False)
        assert a.differenced is None and np.array_equal(a.gains, b.gains) and np.array_equal(a.weights, b.weights)


def test_blend_leans_on_the_seasonally_differenced_forecast_when_the_level_drifts() -> None:
    """A daily shape that holds while the level drifts: seasonal naive misses by the drift, last + s - r
    does not; the blend takes the differenced forecast (and only when allowed to)."""
    rng = np.random.default_rng(11)
    n = 300
    reference = rng.normal(50, 5, n)  # r: one season before the origin
    seasonal = reference + rng.normal(0, 3, n)  # s: one season before the forecast tick
    drift = rng.normal(0, 4, n)  # the level moved by this since last season
    last = reference + drift
    actual = last + (seasonal - reference) + rng.normal(0, 0.3, n)
    folds = [_oos(rng.normal(0, 2, n // 3), seasonal[i::3], actual[i::3], last[i::3], reference[i::3])
             for i in range(3)]  # fmt: skip
    b = fit_blend(folds)
    assert b.is_differenced(0) and b.weights[0] > 0.9 and b.gains[0] < 0.2
    pooled = OutOfSample.concat(folds)
    naive_mae = min(pooled.baseline_mae()["persistence"][0], pooled.baseline_mae()["seasonal_naive"][0])
    assert pooled.mae(b)[0] < 0.3 * naive_mae
    plain = fit_blend(folds, differenced=False)
    assert not plain.is_differenced(0) and pooled.mae(plain)[0] > 2 * pooled.mae(b)[0]
    assert not fit_blend(folds, seasonal=False).is_differenced(0)


def test_blend_takes_the_network_when_it_is_right_and_seasonal_naive_when_that_is() -> None:
    rng = np.random.default_rng(0)
    n = 400
    last = rng.normal(100, 10, n)
    change = rng.normal(0, 5, n)
    seasonal = last + rng.normal(0, 5, n)
    # The network knows the change: gain 1, no seasonal weight.
    b = fit_blend(_oos(change, seasonal, last + change, last))
    assert b.gains[0] == 1.0 and b.weights[0] == 0.0
    # The network is noise and seasonal naive is right: weight 1, gain 0.
    b = fit_blend(_oos(rng.normal(0, 5, n), seasonal, seasonal, last))
    assert b.gains[0] == 0.0 and b.weights[0] == 1.0
    # Both useless: persistence (0, 0).
    b = fit_blend(_oos(rng.normal(0, 5, n), last + rng.normal(0, 5, n), last + rng.normal(0, 0.1, n), last))
    assert b.gains[0] == 0.0 and b.weights[0] == 0.0
    # seasonal=False never leans on seasonal naive.
    assert fit_blend(_oos(rng.normal(0, 5, n), seasonal, seasonal, last), seasonal=False).weights[0] == 0.0


def test_blend_is_never_worse_than_either_naive_forecast_on_the_data_it_is_fitted_on() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 200
        last = rng.normal(0, 1, n)
        actual = last + rng.normal(0, 1, n)
        seasonal = actual + rng.normal(0, rng.uniform(0.2, 3), n)
        oos = _oos(rng.normal(0, 1, n) + rng.uniform(0, 1) * (actual - last), seasonal, actual, last)
        b = fit_blend(oos)
        base = oos.baseline_mae()
        assert oos.mae(b)[0] <= min(base["persistence"][0], base["seasonal_naive"][0]) + 1e-12
        res = oos.residuals(b)[0]
        np.testing.assert_allclose(res, actual - oos.forecasts(b)[0])
    ident = Blend.identity(1)
    assert oos.forecasts(ident)[0] == pytest.approx(last + oos.delta[0])


def _pooled_mae_fit(oos: OutOfSample) -> Blend:
    """The earlier selection, for comparison: the grid point with the least MAE pooled over every pair."""
    best = (math.inf, 0.0, 0.0)
    for w in BLEND_GRID:
        for g in BLEND_GRID:
            cost = oos.mae(Blend(np.array([g], np.float32), np.array([w], np.float32)))[0]
            if cost < best[0] - 1e-12:
                best = (cost, float(g), float(w))
    return Blend(np.array([best[1]], np.float32), np.array([best[2]], np.float32))


@pytest.mark.parametrize("anomalous", [(1,), (1, 2)])
def test_a_huge_outlier_in_validation_does_not_decide_the_blend(anomalous: tuple[int, ...]) -> None:
    # Three folds in which seasonal naive beats persistence; the anomalous ones also hold a maintenance
    # drop that seasonal naive repeats a season later, missing by 200 where persistence misses by 20.
    rng = np.random.default_rng(4)
    n = 200

    def fold(outlier: bool) -> OutOfSample:
        last = rng.normal(100, 10, n)
        actual = last + rng.normal(0, 5, n)
        seasonal = actual + rng.normal(0, 1, n)
        if outlier:
            last[:20] = actual[:20] - 20.0
            seasonal[:20] = actual[:20] - 200.0
        return _oos(rng.normal(0, 5, n), seasonal, actual, last)

    folds = [fold(i in anomalous) for i in range(3)]
    pooled = OutOfSample.concat(folds)
    # Pooled absolute error: the outlier pairs outweigh everything else and seasonal naive loses.
    base = pooled.baseline_mae()
    assert base["persistence"][0] < base["seasonal_naive"][0]
    assert _pooled_mae_fit(pooled).weights[0] == 0.0
    # Capped, fold by fold: seasonal naive, which is right on every other pair, wins.
    b = fit_blend(folds)
    assert b.weights[0] >= 0.9 and b.gains[0] <= 0.1
    for i, f in enumerate(folds):
        clean = slice(20, None) if i in anomalous else slice(None)
        err = np.abs(f.residuals(b)[0][clean]).mean()
        assert err <= 1.05 * np.abs(f.actual[0] - f.seasonal[0])[clean].mean()
        assert err < 0.5 * np.abs(f.actual[0] - f.last[0])[clean].mean()


def test_fold_by_fold_blend_is_never_worse_than_either_naive_forecast_in_the_median_fold() -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        folds = []
        for _ in range(3):
            n = int(rng.integers(50, 150))
            last = rng.normal(0, 1, n)
            actual = last + rng.normal(0, 1, n)
            seasonal = actual + rng.normal(0, rng.uniform(0.2, 3), n)
            folds.append(_oos(rng.normal(0, 1, n) + rng.uniform(0, 1) * (actual - last), seasonal, actual, last))
        b = fit_blend(folds)
        if b.gains[0] == 0.0 and b.weights[0] == HEDGE_WEIGHT:  # the two naive forecasts were not apart
            for f in folds:
                base = f.baseline_mae()
                assert f.mae(b)[0] <= (base["persistence"][0] + base["seasonal_naive"][0]) / 2 + 1e-12
            continue
        best = [min(f.baseline_mae()["persistence"][0], f.baseline_mae()["seasonal_naive"][0]) for f in folds]
        cost = float(np.median([f.mae(b)[0] / m for f, m in zip(folds, best, strict=True)]))
        for naive in ("persistence", "seasonal_naive"):
            naive_cost = float(np.median([f.baseline_mae()[naive][0] / m for f, m in zip(folds, best, strict=True)]))
            assert cost <= naive_cost + 1e-9
    # A single fold is the old pooled fit.
    one, pooled_fit = fit_blend(folds[:1]), fit_blend(folds[0])
    np.testing.assert_array_equal(one.gains, pooled_fit.gains)
    np.testing.assert_array_equal(one.weights, pooled_fit.weights)
    with pytest.raises(ValueError):
        fit_blend([])


def test_a_horizon_the_folds_cannot_decide_between_the_naive_forecasts_takes_half_of_each() -> None:
    """Persistence better in one fold, seasonal naive in the others, by a few per cent, their errors much
    alike (so mixing them gains too little to be trusted on its own) and a network that adds nothing: which naive
    forecast wins next is a coin toss, so the horizon mixes them; where seasonal naive is clearly better
    in every fold it stays seasonal naive."""
    rng = np.random.default_rng(11)

    def fold(p_noise: float, s_noise: float) -> OutOfSample:
        n = 120
        actual = rng.normal(100, 10, n)
        shared, own = rng.normal(0, 1, n), rng.normal(0, 1, n)
        last = actual + p_noise * shared
        seasonal = actual + s_noise * (0.95 * shared + math.sqrt(1 - 0.95**2) * own)
        return _oos(np.zeros(n), seasonal, actual, last)  # a network that forecasts no change

    close = [fold(5.0, 5.3), fold(5.3, 5.0), fold(5.2, 5.0)]
    b = fit_blend(close)
    assert b.gains[0] == 0.0 and b.weights[0] == HEDGE_WEIGHT
    for f in close:  # never worse than the mean of the two naive forecasts' errors, fold by fold
        base = f.baseline_mae()
        assert f.mae(b)[0] <= (base["persistence"][0] + base["seasonal_naive"][0]) / 2
    apart = [fold(5.0, 3.0), fold(5.3, 3.1), fold(5.2, 2.9)]
    b = fit_blend(apart)
    assert b.gains[0] == 0.0 and b.weights[0] == 1.0
    one = fit_blend(close[:1])  # one fold: no spread to judge by, the better naive forecast
    assert one.weights[0] in (0.0, 1.0)


def test_out_of_sample_pools_folds_per_horizon() -> None:
    a = OutOfSample([np.ones(2)] * 2, [np.ones(2)] * 2, [np.zeros(2)] * 2, [np.ones(2)] * 2, [np.ones(2)] * 2)
    b = OutOfSample([np.ones(3)] * 2, [np.ones(3)] * 2, [np.zeros(3)] * 2, [np.ones(3)] * 2, [np.ones(3)] * 2)
    pooled = OutOfSample.concat([a, b])
    assert pooled.counts == [5, 5] and pooled.horizon == 2


@pytest.mark.parametrize("differenced", [False, True])
def test_the_ring_gives_the_same_seasonal_forecasts_as_the_whole_history(differenced: bool) -> None:
    """Seasonal naive from a ring of one season; with differenced horizons (K beyond the season too)
    from a ring of history_ticks: bit for bit what the converter computes on the whole stretch."""
    from edge_lstm.features import record_history, seasonal_from_history, seasonal_series

    rng = np.random.default_rng(3)
    for season, horizon in ((1, 3), (4, 9), (24, 6), (7, 7)):
        flags = tuple(bool(f) for f in rng.integers(0, 2, horizon)) if differenced else ()
        if differenced:
            flags = (True, *flags[1:])
        out = OutputSpec(target="v", horizon=horizon, season_ticks=season,
                         seasonal_weights=(0.5,) * horizon, seasonal_differenced=flags)  # fmt: skip
        size = out.history_ticks
        assert size == (season * -(-horizon // season) + 1 if differenced else season)
        streams = [rng.normal(size=int(n)) for n in rng.integers(1, 60, size=3)]
        ring = np.full((3, size), np.nan)
        for i in range(max(len(s) for s in streams)):
            rows = np.array([r for r, s in enumerate(streams) if i < len(s)])
            record_history(ring, rows, np.full(rows.size, i), [streams[r][i] for r in rows])
            got = seasonal_from_history(ring, rows, np.full(rows.size, i), out)
            for j, r in enumerate(rows):
                want = seasonal_series(streams[r][: i + 1], out)
                assert want is not None
                np.testing.assert_array_equal(got[j], want[i])
                if not differenced:
                    np.testing.assert_array_equal(got[j], seasonal_naive(streams[r][: i + 1], season, horizon)[i])
                else:
                    one = seasonal_from_history(ring, int(r), i, out)  # the single-tick path's scalar call
                    np.testing.assert_array_equal(one, got[j])
                    k = np.arange(1, horizon + 1)
                    back = season * -(-k // season)
                    y = streams[r]
                    for h in np.flatnonzero(np.array(flags)):
                        if i - back[h] >= 0:
                            assert want[i][h] == y[i] + (y[i + k[h] - back[h]] - y[i - back[h]])
                        else:
                            assert np.isnan(want[i][h])


def test_a_horizon_with_too_few_pairs_to_judge_is_persistence() -> None:
    """One validation pair shows nothing: the network does not get the horizon by default."""
    one = np.array([1.0])
    b = fit_blend([_oos(one, one * 5, one * 3, one), _oos(one, one * 5, one * 3, one)])
    assert (float(b.gains[0]), float(b.weights[0])) == (0.0, 0.0)


def test_with_one_fold_a_gain_its_pairs_disagree_on_is_given_up() -> None:
    """One fold (a short series): the one-standard-error rule over its pairs. The network is right on five
    pairs and far off on the sixth: cheaper on average, not by more than its spread."""
    last = np.zeros(6)
    actual = np.ones(6)
    network = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -3.0])
    seasonal = actual + np.array([10.0, -10.0] * 3)  # far off: persistence is the naive forecast to beat
    b = fit_blend([_oos(network, seasonal, actual, last)])
    assert (float(b.gains[0]), float(b.weights[0])) == (0.0, 0.0)
    # Right on every pair: kept.
    b = fit_blend([_oos(np.ones(6), seasonal, actual, last)])
    assert float(b.gains[0]) == 1.0
    # Right on four pairs: too few to trust.
    four = slice(0, 4)
    b = fit_blend([_oos(np.ones(4), seasonal[four], actual[four], last[four])])
    assert float(b.gains[0]) == 0.0
    # The seed race ranks candidates without the one-fold check.
    assert float(fit_blend(_oos(network, seasonal, actual, last), check_one_fold=False).gains[0]) == 1.0


def _skilled_fold(rng: np.random.Generator, n: int, skill: float) -> OutOfSample:
    """A fold whose network forecasts ``skill`` times the true change plus noise (skill < 0 points it the wrong
    way); seasonal naive is far off, so persistence is the naive forecast to beat."""
    last = rng.normal(0, 1, n)
    change = rng.normal(0, 1, n)
    actual = last + change
    seasonal = actual + rng.normal(0, 3, n)
    return _oos(skill * change + rng.normal(0, 0.3, n), seasonal, actual, last)


def test_a_gain_the_folds_disagree_on_falls_back_to_the_better_naive_forecast() -> None:
    """One-standard-error rule: the network's gain must hold across folds, not in a median fold only."""
    rng = np.random.default_rng(6)

    def fold(skill: float) -> OutOfSample:
        return _skilled_fold(rng, 120, skill)

    agree = fit_blend([fold(0.8), fold(0.7), fold(0.9)])
    assert agree.gains[0] > 0.5  # every fold gains: kept
    split = [fold(0.9), fold(0.8), fold(-0.9)]
    # The median fold alone would keep the network (two folds of three gain a lot) ...
    cost_net = np.median([f.mae(Blend(np.ones(1, np.float32), np.zeros(1, np.float32)))[0] for f in split])
    cost_pers = np.median([f.baseline_mae()["persistence"][0] for f in split])
    assert cost_net < cost_pers
    # ... but the third fold contradicts it by more than the gain: persistence.
    b = fit_blend(split)
    assert (b.gains[0], b.weights[0]) == (0.0, 0.0)


def test_intervals_pool_the_validation_residuals_with_the_earlier_folds() -> None:
    import types

    from converter.calibrate import Scored, fit_intervals
    from edge_lstm.intervals import conformal_offsets

    rng = np.random.default_rng(7)
    val = [rng.normal(0, 1, 40), rng.normal(0, 2, 38)]
    earlier = [[rng.normal(0, 1.5, 50), rng.normal(0, 3, 47)], [rng.normal(0, 1, 45), rng.normal(0, 2, 44)]]

    pairs = types.SimpleNamespace(counts=[40, 38], actual=val)
    scored = Scored(pairs, [np.zeros(40), np.zeros(38)])  # type: ignore[arg-type]
    iv = fit_intervals(scored, (0.8, 0.95), earlier=earlier)
    pooled = [np.concatenate([val[k], earlier[0][k], earlier[1][k]]) for k in range(2)]
    lo, hi = conformal_offsets(pooled, (0.8, 0.95))
    np.testing.assert_array_equal(iv.lower, lo)
    np.testing.assert_array_equal(iv.upper, hi)
    assert iv.calibration == {"part": "validation + 2 earlier fold(s)", "pairs": [135, 129]}
    alone = fit_intervals(scored, (0.8, 0.95))
    assert alone.calibration == {"part": "validation", "pairs": [40, 38]}


def test_a_gain_the_folds_trust_but_not_surely_is_halved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three folds gain 30, 10 and 2 % of the change: better by one standard error, not at 95 % (Student's t,
    2 degrees of freedom).  The horizon takes half of the candidate and half of the naive forecast (here
    persistence), which in every fold errs no more than the mean of the two; folds that all gain a lot keep
    the whole candidate."""
    rng = np.random.default_rng(1)

    def fold(skill: float) -> OutOfSample:
        return _skilled_fold(rng, 80, skill)

    weak = [fold(0.3), fold(0.1), fold(0.02)]
    strong = [fold(0.8), fold(0.7), fold(0.9)]
    hedged, kept = fit_blend(weak), fit_blend(strong)
    monkeypatch.setattr(validation, "t95", lambda df: 1.0)  # "surely" = trusted: no hedge
    whole, whole_strong = fit_blend(weak), fit_blend(strong)
    assert whole.gains[0] > 0.5
    assert hedged.gains[0] == pytest.approx(whole.gains[0] * HEDGE_WEIGHT)
    assert hedged.weights[0] == pytest.approx(whole.weights[0] * HEDGE_WEIGHT)
    for f in weak:
        assert f.mae(hedged)[0] <= (f.mae(whole)[0] + f.baseline_mae()["persistence"][0]) / 2 + 1e-12
    np.testing.assert_array_equal(kept.gains, whole_strong.gains)
    np.testing.assert_array_equal(kept.weights, whole_strong.weights)


def test_t95_is_students_one_sided_quantile() -> None:
    # Reference values: one-sided 95 % quantiles of Student's t (any statistics table).
    for df, q in ((1, 6.314), (2, 2.920), (10, 1.812), (11, 1.796), (20, 1.725), (120, 1.658)):
        assert validation.t95(df) == pytest.approx(q, abs=0.015)
    with pytest.raises(ValueError):
        validation.t95(0)
