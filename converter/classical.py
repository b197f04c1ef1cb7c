"""Classical baselines for the report: a seasonal ARIMA and exponential smoothing (statsmodels).

What a careful analyst would fit instead of the network, scored on the same
hold-out pairs as the model:

* **SARIMA** ``(1,1,1)(0,1,1)_m``, the "airline" model, with ``m`` the report's
  season (plain ARIMA ``(1,1,1)`` when the data holds fewer than three seasons);
* **ETS**: additive exponential smoothing with a damped trend and an additive
  season ``m`` (``statsmodels.tsa.statespace.exponential_smoothing``).

Parameters are fitted by maximum likelihood on the ticks before the hold-out
(the most recent ``FIT_TICKS`` of them, after the last missing tick when that
leaves four seasons, with SARIMA's differencing done up front: that keeps a fit
with a long season to seconds), then the Kalman filter runs over the hold-out
with those parameters fixed: each forecast ``k`` ticks ahead is made from the state filtered up to
its origin, with no refit.  Interpolated ticks are fed as the network sees
them; the ticks between segments (a long gap) are missing values.

statsmodels is optional: without it, :func:`classical_forecasts` returns ``{}``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.prepare import EncodedSegment, EvalRun, Part, gap_ticks

_LOG = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

FIT_TICKS = 1000  # most recent pre-hold-out ticks the parameters are fitted on
MAX_GAP_FILL = 1000  # a gap between segments enters as at most this many missing ticks
CLASSICAL = ("sarima", "ets")


def available() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class _Series:
    y: F64  # the target on one timeline: segments one after the other, NaN for the ticks between
    seg_start: list[int]  # where each segment starts on it
    holdout_start: int


def _timeline(encoded: Sequence[EncodedSegment], cadence_s: float) -> _Series:
    chunks: list[F64] = []
    starts: list[int] = []
    pos = 0
    holdout = -1
    gaps = gap_ticks([e.segment for e in encoded], cadence_s)
    for i, e in enumerate(encoded):
        if i:
            n_gap = int(min(max(gaps[i - 1], 0), MAX_GAP_FILL))
            chunks.append(np.full(n_gap, np.nan))
            pos += n_gap
        starts.append(pos)
        chunks.append(np.asarray(e.target, np.float64))
        h = np.flatnonzero(e.part == Part.HOLDOUT)
        if holdout < 0 and h.size:
            holdout = pos + int(h[0])
        pos += len(e)
    y = np.concatenate(chunks)
    return _Series(y=y, seg_start=starts, holdout_start=holdout if holdout >= 0 else y.shape[0])


def _models(season: int, n_fit: int) -> dict[str, Callable[..., Any]]:
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    seasonal = season > 1 and n_fit >= 3 * season

    def sarima(y: F64, fitting: bool = False) -> Any:
        # Fitting on the differenced series halves the state (same parameters, much faster).
        if seasonal:
            return SARIMAX(y, order=(1, 1, 1), seasonal_order=(0, 1, 1, season), simple_differencing=fitting)
        return SARIMAX(y, order=(1, 1, 1), simple_differencing=fitting)

    def ets(y: F64, fitting: bool = False) -> Any:
        return ExponentialSmoothing(y, trend=True, damped_trend=True, seasonal=season if seasonal else None)

    return {"sarima": sarima, "ets": ets}


def _keep_filtered_mean_only() -> int:
    """Kalman filter memory flags: store the filtered state means, none of the covariance matrices."""
    from statsmodels.tsa.statespace import kalman_filter as kf

    return (
        kf.MEMORY_NO_FORECAST_COV | kf.MEMORY_NO_PREDICTED_COV | kf.MEMORY_NO_FILTERED_COV
        | kf.MEMORY_NO_GAIN | kf.MEMORY_NO_SMOOTHING | kf.MEMORY_NO_STD_FORECAST
    )  # fmt: skip


def _fast(model: Any, y: F64) -> Any:
    """Chandrasekhar recursions (much faster for a large state) when nothing is missing.

    Only for the differenced ARMA being fitted: with the diffuse start of the undifferenced
    model (or ETS) they give wrong states.
    """
    if not np.isnan(y).any():
        model.ssm.filter_chandrasekhar = True
    return model


def _spec(name: str, model: Any) -> str:
    if name == "sarima":
        p, d, q = model.order
        sp, sd, sq, m = model.seasonal_order
        return f"SARIMA({p},{d},{q})({sp},{sd},{sq})_{m}" if m else f"ARIMA({p},{d},{q})"
    return f"ETS(A,Ad,A)_{model.seasonal_periods}" if model.seasonal else "ETS(A,Ad,N)"


def _ahead(filtered: Any, horizon: int) -> F64:
    """Forecasts ``[T, K]``: row ``t`` forecasts ``t + 1 .. t + K`` from the state filtered up to ``t``."""
    fr = filtered.filter_results
    a = np.asarray(fr.filtered_state, np.float64)  # [m, T]
    transition = np.asarray(fr.transition[:, :, 0])
    c = np.asarray(fr.state_intercept[:, 0])[:, None]
    z = np.asarray(fr.design[0, :, 0])
    d = float(fr.obs_intercept[0, 0])
    out = np.empty((a.shape[1], horizon))
    for k in range(horizon):
        a = transition @ a + c
        out[:, k] = z @ a + d
    return out


def classical_forecasts(
    encoded: Sequence[EncodedSegment],
    runs: Sequence[EvalRun],
    run_index: Sequence[npt.NDArray[np.intp]],
    offset: Sequence[npt.NDArray[np.intp]],
    cadence_s: float,
    season: int,
    horizon: int,
) -> dict[str, dict[str, Any]]:
    """Per baseline: ``forecasts`` (per horizon, on the given scored pairs), ``spec`` and ``seconds``.

    ``run_index`` and ``offset`` are :class:`converter.report.Pairs` fields: the origin of
    pair ``i`` at horizon ``k`` is tick ``runs[run_index[k][i]].start + offset[k][i]`` of its segment.
    """
    if not available():
        return {}
    series = _timeline(encoded, cadence_s)
    lo = max(0, series.holdout_start - FIT_TICKS)
    gaps = np.flatnonzero(np.isnan(series.y[lo : series.holdout_start]))
    if gaps.size and series.holdout_start - (lo + int(gaps[-1]) + 1) >= max(4 * season, 100):
        lo += int(gaps[-1]) + 1  # a stretch without missing ticks: the fast filter applies
    fit_y = series.y[lo : series.holdout_start]
    run_y = series.y[lo:]
    out: dict[str, dict[str, Any]] = {}
    for name, make in _models(season, int(np.isfinite(fit_y).sum())).items():
        t0 = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # cov_type "none": no parameter covariance (numerical derivatives: many more filter passes)
                fitting = make(fit_y, fitting=True)
                if name == "sarima":
                    _fast(fitting, fit_y)
                res = fitting.fit(disp=False, maxiter=100, cov_type="none")
                model = make(run_y)
                model.ssm.set_conserve_memory(_keep_filtered_mean_only())
                filtered = model.filter(res.params, cov_type="none")
                ahead = _ahead(filtered, horizon)
        except (ValueError, np.linalg.LinAlgError) as e:  # a model statsmodels cannot fit to this series
            _LOG.warning("%s baseline not fitted: %s", name, e)
            continue
        fc: list[F64] = []
        for k in range(horizon):
            start = np.array([series.seg_start[r.seg_index] + r.start for r in runs], dtype=np.intp)
            origin = start[np.asarray(run_index[k], np.intp)] + np.asarray(offset[k], np.intp)
            fc.append(ahead[origin - lo, k] if origin.size else np.zeros(0))
        spec = _spec(name, model)
        seconds = time.monotonic() - t0
        _LOG.info("%s baseline %s fitted on %d ticks in %.1f s", name, spec, fit_y.shape[0], seconds)
        out[name] = {"forecasts": fc, "spec": spec, "seconds": seconds, "fit_ticks": int(fit_y.shape[0])}
    return out
