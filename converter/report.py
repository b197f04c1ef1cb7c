"""Hold-out scores against the baselines, ``report.json``, the plot and the summary table.

Scores are in the target's units, per horizon ``1..K``, over hold-out origins
that are real readings whose forecast tick is a real reading in the hold-out
too.  The model, persistence (the last reading), seasonal naive (the reading
one season before the forecast tick) and, with statsmodels, a seasonal ARIMA
and exponential smoothing (:mod:`converter.classical`) are scored on exactly
the same (origin, horizon) pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.classical import CLASSICAL
from converter.prepare import EncodedSegment, EvalRun, Part
from edge_lstm.features import FeaturePipeline, seasonal_forecasts

_LOG = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

REPORT_NAME = "report.json"
PLOT_NAME = "forecast.png"


class PerHorizon:
    """Arrays per horizon: ``actual[k - 1]`` holds the readings scored at horizon ``k``."""

    actual: list[F64]

    @property
    def horizon(self) -> int:
        return len(self.actual)

    @property
    def counts(self) -> list[int]:
        return [int(a.shape[0]) for a in self.actual]


@dataclasses.dataclass(frozen=True)
class Pairs(PerHorizon):
    """The scored (origin, horizon) pairs of the hold-out and the baselines' errors on them."""

    run_index: list[npt.NDArray[np.intp]]  # per horizon: index of the run
    offset: list[npt.NDArray[np.intp]]  # per horizon: origin tick relative to the run start
    last: list[F64]  # per horizon: the reading at the origin
    actual: list[F64]  # per horizon: the reading at origin + k
    seasonal: list[F64]  # per horizon: the seasonal-naive forecast (s_k)
    reference: list[F64]  # per horizon: r_k, the reading as many seasons before the origin (NaN: none)


def scored_pairs(
    encoded: Sequence[EncodedSegment], runs: Sequence[EvalRun], horizon: int, season: int, part: Part = Part.HOLDOUT
) -> Pairs:
    """The (origin, horizon) pairs of ``part`` that count: both ticks real readings with a season of history."""
    ri: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(horizon)]
    off: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(horizon)]
    last: list[list[F64]] = [[] for _ in range(horizon)]
    act: list[list[F64]] = [[] for _ in range(horizon)]
    sea: list[list[F64]] = [[] for _ in range(horizon)]
    ref: list[list[F64]] = [[] for _ in range(horizon)]
    for r_i, run in enumerate(runs):
        e = encoded[run.seg_index]
        obs = e.segment.observed
        t = np.arange(run.score_from, run.stop)
        for k in range(1, horizon + 1):
            j = t + k
            back = season * math.ceil(k / season)  # seasons before: s_k's from the forecast tick, r_k's from t
            s = j - back
            ok = (j < run.stop) & (s >= 0)
            tt, jj, ss = t[ok], j[ok], s[ok]
            ok2 = obs[tt] & obs[jj] & (e.part[tt] == part) & (e.part[jj] == part)
            tt, jj, ss = tt[ok2], jj[ok2], ss[ok2]
            ri[k - 1].append(np.full(tt.shape[0], r_i, dtype=np.intp))
            off[k - 1].append((tt - run.start).astype(np.intp))
            last[k - 1].append(e.target[tt])
            act[k - 1].append(e.target[jj])
            sea[k - 1].append(e.target[ss])
            rr = tt - back
            ref[k - 1].append(np.where(rr >= 0, e.target[np.maximum(rr, 0)], np.nan))

    def cat(chunks: list[Any], dtype: Any) -> Any:
        return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype=dtype)

    return Pairs(
        run_index=[cat(c, np.intp) for c in ri],
        offset=[cat(c, np.intp) for c in off],
        last=[cat(c, np.float64) for c in last],
        actual=[cat(c, np.float64) for c in act],
        seasonal=[cat(c, np.float64) for c in sea],
        reference=[cat(c, np.float64) for c in ref],
    )


def network_outputs(pairs: Pairs, preds: Sequence[F32]) -> list[F64]:
    """Per horizon, the network's output ``k`` on the scored pairs; ``preds`` per run ``[T, K]``."""
    return [
        np.array([preds[r][o, k] for r, o in zip(pairs.run_index[k], pairs.offset[k], strict=True)], dtype=np.float64)
        for k in range(pairs.horizon)
    ]


def model_forecasts(pairs: Pairs, preds: Sequence[F32], pipeline: FeaturePipeline) -> list[F64]:
    """Per horizon, the model's forecasts (target units) on the scored pairs, seasonal blend included."""
    out: list[F64] = []
    for k, y in enumerate(network_outputs(pairs, preds)):
        y_full = np.zeros((y.shape[0], pairs.horizon))
        y_full[:, k] = y
        s_full = np.full((y.shape[0], pairs.horizon), np.nan)
        r_full = np.full((y.shape[0], pairs.horizon), np.nan)
        s_full[:, k], r_full[:, k] = pairs.seasonal[k], pairs.reference[k]
        sea = seasonal_forecasts(s_full, r_full, pairs.last[k], pipeline.output)
        out.append(pipeline.decode(y_full, pairs.last[k], sea)[:, k] if y.size else np.zeros(0))
    return out


def mae(forecast: Sequence[F64], actual: Sequence[F64]) -> list[float]:
    return [float(np.mean(np.abs(f - a))) if a.size else float("nan") for f, a in zip(forecast, actual, strict=True)]


def rmse(forecast: Sequence[F64], actual: Sequence[F64]) -> list[float]:
    return [
        float(np.sqrt(np.mean((f - a) ** 2))) if a.size else float("nan") for f, a in zip(forecast, actual, strict=True)
    ]


def holdout_metrics(
    pairs: Pairs, forecasts: Sequence[F64], others: Mapping[str, Sequence[F64]] | None = None
) -> dict[str, dict[str, list[float]]]:
    """MAE and RMSE per horizon of the model, persistence, seasonal naive and ``others`` (e.g. sarima, ets)."""
    named = {"model": forecasts, "persistence": pairs.last, "seasonal_naive": pairs.seasonal, **(others or {})}
    return {
        "mae": {n: mae(f, pairs.actual) for n, f in named.items()},
        "rmse": {n: rmse(f, pairs.actual) for n, f in named.items()},
    }


def best_naive_ratio(metrics: Mapping[str, Mapping[str, Sequence[float]]]) -> list[float]:
    """Per horizon: model MAE / the better of persistence and seasonal naive (<= 1: no worse than both)."""
    m = metrics["mae"]
    return [
        a / min(p, s) if min(p, s) > 0 else float("nan")
        for a, p, s in zip(m["model"], m["persistence"], m["seasonal_naive"], strict=True)
    ]


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/Inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(directory: Path, report: Mapping[str, Any]) -> Path:
    path = Path(directory) / REPORT_NAME
    path.write_text(json.dumps(_clean(report), indent=2) + "\n")
    return path


def summary_table(report: Mapping[str, Any], units: str = "") -> str:
    """A plain-text table: MAE per horizon for model and baselines, then one line per quantization mode.

    ``ratio`` is the model's MAE over the better naive forecast (persistence or seasonal naive).
    """
    h = report["holdout"]["mae"]
    u = f" [{units}]" if units else ""
    cols = [c for c in ("model", "persistence", "seasonal_naive", *CLASSICAL) if c in h]
    label = {"seasonal_naive": "seasonal"}
    lines = [f"hold-out MAE{u}", f"{'horizon':>8} " + " ".join(f"{label.get(c, c):>12}" for c in cols) + " ratio"]
    ratios = best_naive_ratio(report["holdout"])
    for k in range(len(h["model"])):
        cells = " ".join(f"{_num(h[c][k]):>12}" for c in cols)
        lines.append(f"{k + 1:>8} {cells} {ratios[k]:>5.3f}")
    if report.get("intervals"):
        lines += ["", *coverage_table(report["intervals"])]
    lines.append("")
    lines.append(f"{'mode':>8} {'bytes':>8} {'parity':>10} {'MAE h=1':>12} {'MAE mean':>12} {'vs float32':>10}")
    modes = report.get("modes", {})
    base = modes.get("float32", {}).get("mae_mean")
    for name, m in modes.items():
        # without a float32 row (train --modes none, verify without --modes) there is nothing to compare
        rel = f"{(m['mae_mean'] / base - 1.0) * 100:>+9.2f}%" if base else f"{'-':>10}"
        lines.append(
            f"{name:>8} {m['size_bytes']:>8d} {m['parity']:>10.2e} {m['mae'][0]:>12.4g} {m['mae_mean']:>12.4g} {rel}"
        )
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def coverage_table(intervals: Mapping[str, Any]) -> list[str]:
    """Lines of the hold-out coverage (%) of each interval level per horizon."""
    cov = intervals["holdout_coverage"]
    labels = list(cov)
    lines = [
        f"hold-out coverage of the prediction intervals ({intervals['method']}, %)",
        f"{'horizon':>8} " + " ".join(f"{'nominal ' + lab:>11}" for lab in labels),
    ]
    for k in range(len(cov[labels[0]])):
        values = [cov[lab][k] for lab in labels]
        cells = " ".join(f"{100.0 * c:>11.1f}" if c is not None else f"{'-':>11}" for c in values)
        lines.append(f"{k + 1:>8} {cells}")
    return lines


def plot(
    path: Path,
    timestamps: F64,
    actual: F64,
    forecast_1: F64,
    forecast_k: F64,
    horizon: int,
    metrics: Mapping[str, Mapping[str, list[float]]],
    title: str,
    units: str,
    bands: Sequence[tuple[float, F64, F64]] | None = None,
) -> None:
    """Actual vs forecast over the end of the hold-out (with the 1-step intervals), and MAE by horizon.

    ``bands`` holds ``(level, lower, upper)`` of the 1-step forecasts, narrowest level first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = np.asarray(timestamps, dtype="datetime64[s]")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw={"height_ratios": [2, 1]})
    for i, (level, lo, hi) in enumerate(reversed(bands or [])):
        ax1.fill_between(
            times, lo, hi, color="tab:blue", alpha=0.12 + 0.1 * i, lw=0,
            label=f"{100 * level:g} % interval, 1 tick ahead",
        )  # fmt: skip
    ax1.plot(times, actual, color="black", lw=1.2, label="actual")
    ax1.plot(times, forecast_1, color="tab:blue", lw=1.0, label="forecast, 1 tick ahead")
    ax1.plot(times, forecast_k, color="tab:orange", lw=1.0, alpha=0.8, label=f"forecast, {horizon} ticks ahead")
    ax1.set_title(title)
    ax1.set_ylabel(units or "value")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax1.xaxis.get_major_locator()))
    ks = np.arange(1, horizon + 1)
    mae_m = metrics["mae"]
    ax2.plot(ks, mae_m["model"], marker="o", label="model")
    ax2.plot(ks, mae_m["persistence"], marker="s", label="persistence")
    ax2.plot(ks, mae_m["seasonal_naive"], marker="^", label="seasonal naive")
    for name, marker in zip(CLASSICAL, ("v", "D"), strict=True):
        if name in mae_m:
            ax2.plot(ks, mae_m[name], marker=marker, ls="--", label=name.upper())
    ax2.set_xlabel("horizon (ticks)")
    ax2.set_ylabel(f"hold-out MAE{f' ({units})' if units else ''}")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
