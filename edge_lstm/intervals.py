"""Prediction intervals of a model and the anomaly check against them (pure).

The converter calibrates, for every horizon ``k`` and every nominal level
(default 80 % and 95 %), an offset below and above the point forecast from
out-of-sample residuals (split conformal, see ``docs/converter.md``); the
manifest carries them as ``intervals``.  The interval of a forecast ``v`` is
``[v + lower[level][k], v + upper[level][k]]`` in target units.

A reading is checked against the 1-step interval at the widest level made one
tick earlier: outside it, the reading is anomalous, and its score is how far
out it lies in interval widths (0 inside, 0.5 half a width beyond a bound).
The converter's offline evaluation, the engine and the offline-equality tests
all use :func:`anomaly_score`, so they agree to the bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

DEFAULT_LEVELS = (0.8, 0.95)


def level_label(level: float) -> str:
    """The level as a percentage for keys and labels: 0.95 -> ``95``, 0.995 -> ``99.5``."""
    return f"{round(level * 100.0, 6):g}"


def bound_keys(level: float) -> tuple[str, str]:
    """The forecast item keys of a level's bounds: ``("lo95", "hi95")``."""
    label = level_label(level)
    return f"lo{label}", f"hi{label}"


@dataclasses.dataclass(frozen=True, eq=False)
class Intervals:
    """Per-level, per-horizon offsets from the point forecast (target units).

    ``lower[i][k]`` and ``upper[i][k]`` belong to ``levels[i]`` and horizon
    ``k + 1``; levels are increasing and each interval holds the narrower ones.
    """

    levels: tuple[float, ...]
    lower: F64  # [L, K]
    upper: F64  # [L, K]
    method: str = "split_conformal"
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # where the residuals came from

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.lower, np.float64), np.asarray(self.upper, np.float64)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        if not self.levels:
            raise ValueError("intervals need at least one level")
        if any(not 0.0 < lv < 1.0 for lv in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"interval levels must be increasing and in (0, 1), got {list(self.levels)}")
        if lo.ndim != 2 or lo.shape != hi.shape or lo.shape[0] != len(self.levels):
            raise ValueError("interval offsets must be [levels, horizon] arrays of the same shape")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (lo > hi).any():
            raise ValueError("interval offsets must be finite with lower <= upper")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Intervals):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    @property
    def horizon(self) -> int:
        return int(self.lower.shape[1])

    @property
    def check_level(self) -> float:
        """The level readings are checked against (the widest)."""
        return self.levels[-1]

    @property
    def check_offsets(self) -> tuple[float, float]:
        """The 1-step offsets at :attr:`check_level`."""
        return float(self.lower[-1, 0]), float(self.upper[-1, 0])

    def bounds(self, values: F64) -> tuple[F64, F64]:
        """Lower and upper bounds ``[..., L, K]`` of forecasts ``values`` ``[..., K]``."""
        v = np.asarray(values, np.float64)[..., None, :]
        return v + self.lower, v + self.upper

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "levels": list(self.levels),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            **({"calibration": self.calibration} if self.calibration else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, horizon: int) -> Intervals:
        """Parse a manifest's ``intervals``; raises ValueError naming the problem."""
        if not isinstance(d, dict):
            raise ValueError("'intervals' must be an object")
        try:
            levels = tuple(float(v) for v in d["levels"])
            lower = np.asarray(d["lower"], dtype=np.float64)
            upper = np.asarray(d["upper"], dtype=np.float64)
        except KeyError as e:
            raise ValueError(f"'intervals' is missing {e.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ValueError("'intervals' levels and offsets must be numbers") from None
        iv = cls(levels, lower, upper, str(d.get("method", "split_conformal")), dict(d.get("calibration", {})))
        if iv.horizon != horizon:
            raise ValueError(f"'intervals' cover {iv.horizon} horizons, the model forecasts {horizon}")
        return iv


def anomaly_score(actual: float, lower: float, upper: float) -> float:
    """How far ``actual`` lies outside ``[lower, upper]``, in interval widths (0 inside)."""
    if actual > upper:
        return (actual - upper) / (upper - lower) if upper > lower else math.inf
    if actual < lower:
        return (lower - actual) / (upper - lower) if upper > lower else math.inf
    return 0.0


def anomaly_scores(actual: F64, lower: F64, upper: F64) -> F64:
    """:func:`anomaly_score` elementwise (same arithmetic)."""
    width = upper - lower
    with np.errstate(divide="ignore", invalid="ignore"):
        above = np.where(width > 0, (actual - upper) / width, np.inf)
        below = np.where(width > 0, (lower - actual) / width, np.inf)
    return np.where(actual > upper, above, np.where(actual < lower, below, 0.0))


# -- calibration (converter side) ------------------------------------------------------------------


def conformal_offsets(residuals: Sequence[F64], levels: Sequence[float]) -> tuple[F64, F64]:
    """Split-conformal offsets ``[L, K]`` from out-of-sample residuals (actual - forecast) per horizon.

    Each level's interval takes the residuals' ``(1 - level) / 2`` and
    ``(1 + level) / 2`` order statistics with the finite-sample correction
    (ranks ``floor((n + 1) a)`` and ``ceil((n + 1) (1 - a))``), so a bias of the
    model shifts the interval instead of widening it.
    """
    lv = list(levels)
    lower = np.zeros((len(lv), len(residuals)))
    upper = np.zeros((len(lv), len(residuals)))
    for k, r in enumerate(residuals):
        s = np.sort(np.asarray(r, np.float64)[np.isfinite(r)])
        n = s.size
        if n == 0:
            raise ValueError(f"no residuals at horizon {k + 1} to calibrate intervals on")
        for i, level in enumerate(lv):
            a = (1.0 - level) / 2.0
            # 1-based ranks; the 1e-9 keeps (1 - 0.8) / 2 * 20 from flooring to 1
            lo_rank = math.floor((n + 1) * a + 1e-9)
            hi_rank = math.ceil((n + 1) * (1.0 - a) - 1e-9)
            lower[i, k] = s[max(lo_rank, 1) - 1]
            upper[i, k] = s[min(hi_rank, n) - 1]
    # Nested levels: a wider level never gives a narrower interval.
    lower = np.minimum.accumulate(lower, axis=0)
    upper = np.maximum.accumulate(upper, axis=0)
    return lower, upper


def coverage(residuals: Sequence[F64], iv: Intervals) -> list[list[float]]:
    """Per level and horizon, the share of residuals inside the interval (NaN when none)."""
    out: list[list[float]] = []
    for i in range(len(iv.levels)):
        row = []
        for k, r in enumerate(residuals):
            r = np.asarray(r, np.float64)
            row.append(float(np.mean((r >= iv.lower[i, k]) & (r <= iv.upper[i, k]))) if r.size else math.nan)
        out.append(row)
    return out
