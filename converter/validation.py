"""Rolling-origin validation: folds, out-of-sample forecasts per horizon, and the blend fitted on them.

The part of the series before the hold-out is cut into ``n`` folds.  Fold ``i``
trains on every tick before its validation block and is validated (early
stopping, scores) on that block; the blocks are the last ``n`` stretches of
``val_frac`` of the series before the hold-out, so the last fold is the plain
train/validation split and every earlier fold moves the origin back by one
block::

    fold 0   [ train ......... ][ val ]
    fold 1   [ train ................. ][ val ]
    fold 2   [ train ......................... ][ val ][ hold-out ]

Every validation forecast comes from a model that never saw that block, so the
pooled :class:`OutOfSample` forecasts are honest out-of-sample errors: the
per-horizon blend is fitted on them, candidates are compared on them, and
their residuals (:meth:`OutOfSample.residuals`) are what interval calibration
can use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from converter.prepare import Split
from converter.report import Pairs, network_outputs
from edge_lstm.features import FeaturePipeline

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# A fold needs at least this share of the series to train on.
MIN_TRAIN_FRAC = 0.3


def rolling_folds(split: Split, n_folds: int) -> list[Split]:
    """The folds' splits, earliest first; the last one is ``split`` itself.

    Each fold's "hold-out" part is everything after its validation block (never
    used by the fold).  Folds that would train on less than ``MIN_TRAIN_FRAC`` of
    the series are left out.
    """
    if n_folds < 1:
        raise ValueError("n_folds must be at least 1")
    folds: list[Split] = []
    for back in range(n_folds - 1, -1, -1):
        train_frac = split.train_frac - back * split.val_frac
        if back and train_frac < MIN_TRAIN_FRAC - 1e-9:
            continue
        folds.append(Split(train_frac, split.val_frac))
    return folds


@dataclasses.dataclass(frozen=True)
class OutOfSample:
    """Forecast inputs on scored (origin, horizon) pairs that no model saw in training.

    Per horizon ``k`` (list index ``k - 1``), in target units: ``last`` the reading at the
    origin (persistence), ``actual`` the reading at the forecast tick, ``delta`` the
    network's forecast change (before any gain), ``seasonal`` the seasonal-naive forecast.
    """

    last: list[F64]
    actual: list[F64]
    delta: list[F64]
    seasonal: list[F64]

    @property
    def horizon(self) -> int:
        return len(self.actual)

    @property
    def counts(self) -> list[int]:
        return [int(a.shape[0]) for a in self.actual]

    @classmethod
    def concat(cls, parts: Sequence[OutOfSample]) -> OutOfSample:
        if not parts:
            raise ValueError("no out-of-sample forecasts to pool")
        k = parts[0].horizon

        def cat(field: str) -> list[F64]:
            return [np.concatenate([getattr(p, field)[i] for p in parts]) for i in range(k)]

        return cls(last=cat("last"), actual=cat("actual"), delta=cat("delta"), seasonal=cat("seasonal"))

    def forecasts(self, blend: Blend | None = None) -> list[F64]:
        """The shipped forecast on every pair: ``last + gain * delta + weight * (seasonal - last)``."""
        b = blend or Blend.identity(self.horizon)
        out = []
        for k in range(self.horizon):
            lean = np.where(np.isnan(self.seasonal[k]), 0.0, self.seasonal[k] - self.last[k])
            out.append(self.last[k] + float(b.gains[k]) * self.delta[k] + float(b.weights[k]) * lean)
        return out

    def residuals(self, blend: Blend | None = None) -> list[F64]:
        """Out-of-sample residuals ``actual - forecast`` per horizon (target units)."""
        return [a - f for a, f in zip(self.actual, self.forecasts(blend), strict=True)]

    def mae(self, blend: Blend | None = None) -> list[float]:
        return [float(np.mean(np.abs(r))) if r.size else math.nan for r in self.residuals(blend)]

    def baseline_mae(self) -> dict[str, list[float]]:
        def m(f: Sequence[F64]) -> list[float]:
            return [float(np.mean(np.abs(a - x))) if a.size else math.nan for a, x in zip(self.actual, f, strict=True)]

        return {"persistence": m(self.last), "seasonal_naive": m(self.seasonal)}

    def score(self, blend: Blend | None = None) -> float:
        """Mean over horizons of MAE / persistence MAE (scale-free; lower is better)."""
        model = np.asarray(self.mae(blend))
        pers = np.asarray(self.baseline_mae()["persistence"])
        ok = np.isfinite(model) & (pers > 0)
        return float(np.mean(model[ok] / pers[ok])) if ok.any() else math.nan


@dataclasses.dataclass(frozen=True)
class Blend:
    """Per horizon: the gain on the network's change and the weight of seasonal naive.

    ``gain 0, weight 0`` is persistence, ``gain 0, weight 1`` seasonal naive.
    """

    gains: F32
    weights: F32

    @classmethod
    def identity(cls, horizon: int) -> Blend:
        return cls(np.ones(horizon, np.float32), np.zeros(horizon, np.float32))


# Grid of the blend search: both coefficients in [0, 1].
BLEND_GRID = np.linspace(0.0, 1.0, 41)


def fit_blend(oos: OutOfSample, grid: npt.NDArray[np.float64] = BLEND_GRID, seasonal: bool = True) -> Blend:
    """Per horizon, the (gain, weight) on the grid with the least out-of-sample absolute error.

    The grid holds persistence (0, 0) and seasonal naive (0, 1), so on the pooled
    validation forecasts the blend is never worse than either.  Ties go to the
    smaller coefficients (the simpler forecast).  ``seasonal=False`` fixes every
    weight at 0.
    """
    k_max = oos.horizon
    gains = np.ones(k_max, np.float32)
    weights = np.zeros(k_max, np.float32)
    w_grid = grid if seasonal else np.zeros(1)
    for k in range(k_max):
        n = oos.actual[k].shape[0]
        if n < 2:
            continue
        err = oos.actual[k] - oos.last[k]
        lean = np.where(np.isnan(oos.seasonal[k]), 0.0, oos.seasonal[k] - oos.last[k])
        d = oos.delta[k]
        best = (math.inf, 0.0, 0.0)
        for w in w_grid:
            rest = err - w * lean  # [n]
            # all gains at once: [G, n]
            cost = np.mean(np.abs(rest[None, :] - grid[:, None] * d[None, :]), axis=1)
            i = int(np.argmin(cost))
            if cost[i] < best[0] - 1e-12:
                best = (float(cost[i]), float(grid[i]), float(w))
        gains[k], weights[k] = best[1], best[2]
    return Blend(gains=gains, weights=weights)


def out_of_sample(pairs: Pairs, preds: Sequence[F32], pipeline: FeaturePipeline) -> OutOfSample:
    """The validation pairs of one fold as :class:`OutOfSample` (``preds``: that fold's network outputs per run)."""
    scale = pipeline.output.scale
    return OutOfSample(
        last=list(pairs.last),
        actual=list(pairs.actual),
        delta=[y * scale for y in network_outputs(pairs, preds)],
        seasonal=list(pairs.seasonal),
    )
