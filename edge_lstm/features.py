"""Feature pipeline shared by the converter and the daemon.

A model sees, at every tick, a vector ``x`` built from the raw readings of that
tick, the readings of the previous tick and the tick's timestamp.  The same
functions build ``x`` when the converter trains and when the daemon streams, so
the two can never disagree.  Everything here is pure numpy.

Input features (``FeatureSpec.kind``):

``diff``
    ``(v_t - v_{t-1}) / scale`` for one value column.  Differences make the model
    indifferent to the series' level, which is what lets a model trained on one
    range keep working when a trending series leaves it.  The first tick of a
    stream has no previous reading: its difference is 0.
``level``
    ``(v_t - center) / scale``, clipped to ``[-LEVEL_CLIP, LEVEL_CLIP]`` so that a
    level far outside the training range cannot drive the network into
    saturation.
``seasonal``
    ``(y_{t-m+j} - y_{t-m}) / scale`` for the target ``y``, season ``m`` (``FeatureSpec.season``)
    and lead ``j`` (``FeatureSpec.lead``, ``1..m``): how the target moved over the ``j`` ticks
    after this one a season earlier, the change a seasonal ARIMA's seasonal difference carries
    forward.  The network sees last season's shape of the coming ticks without having to hold
    ``m`` ticks in its state.  0 while the stream has less than ``m`` ticks of history (after a
    start or a reset); the daemon keeps each stream's last ``m`` targets for it
    (:attr:`FeaturePipeline.history_ticks`).
``tod_sin``, ``tod_cos``, ``dow_sin``, ``dow_cos``
    Time of day and day of week on the unit circle, from the tick's timestamp in
    local time: shifted by the model's fixed UTC offset, or by the offset of its
    named time zone at that instant (``zoneinfo``, daylight saving time included).

Output (``OutputSpec.kind``):

``delta``
    The network predicts ``(y_{t+k} - y_t) / scale`` for ``k = 1..K``: forecasts are
    the last reading plus a scaled change (persistence is the network's zero).
``level``
    The network predicts ``(y_{t+k} - center) / scale``.

Seasonal blend (``OutputSpec.season_ticks``, ``OutputSpec.seasonal_weights``): forecast ``k`` may
lean on a seasonal forecast ``S_k``, ``forecast_k += w_k * (S_k - y_t)``.  ``S_k`` is seasonal
naive ``s_k``, the reading one season before the forecast tick (:func:`seasonal_lags`), or, at
the horizons ``OutputSpec.seasonal_differenced`` marks, the seasonally differenced forecast
``y_t + (s_k - r_k)``: the last reading plus the change over the same stretch one season
earlier, ``r_k`` being the reading as many seasons before the origin as ``s_k`` lies before the
forecast tick (SARIMA(0,1,0)(0,1,0)'s forecast; it follows a level that drifts away from last
season's).  Where a stream has less history than that (after a start or a reset), ``S_k`` is
missing and the term is 0 (:func:`seasonal_forecasts`).  A model without weights needs no
history at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import math
import zoneinfo
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]

DAY_SECONDS = 86_400.0
WEEK_SECONDS = 7 * DAY_SECONDS
# 1970-01-01 was a Thursday; shifting by 3 days puts Sunday 00:00 (UTC + offset) at phase 0.
_EPOCH_WEEKDAY_SHIFT = 3 * DAY_SECONDS
LEVEL_CLIP = 8.0
# Longest season a model may name (blend or inputs): a day of 1-second ticks fits. Each stream keeps
# up to this many float64 targets, so a manifest cannot make the daemon allocate without bound.
MAX_SEASON_TICKS = 100_000
# The ring's bound: a season of targets and, for a differenced blend, the reference tick before it.
MAX_HISTORY_TICKS = MAX_SEASON_TICKS + 1


def blend_history_ticks(season: int, horizon: int, differenced: bool) -> int:
    """Targets a stream keeps for a blend over ``season`` ticks: one season for seasonal naive; for the
    differenced forecast one more tick and as many more seasons as the horizon spans (``r_k``)."""
    return season * -(-horizon // season) + 1 if differenced else season
# Zone offsets change only on quarter hours (every transition in the tz database since 1970 does).
_OFFSET_STEP = 900.0


@functools.lru_cache(maxsize=32)
def time_zone(name: str) -> zoneinfo.ZoneInfo:
    """The named IANA time zone; ValueError naming the fix when the system has no such zone."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Berlin; install the tzdata package "
            "if the system has no time zone database)"
        ) from None


@functools.lru_cache(maxsize=4096)
def _zone_offset(name: str, quarter: float) -> float:
    t = dt.datetime.fromtimestamp(quarter * _OFFSET_STEP, tz=time_zone(name))
    off = t.utcoffset()
    return 0.0 if off is None else off.total_seconds()


def zone_offset(name: str, ts: float) -> float:
    """UTC offset in seconds of zone ``name`` at epoch time ``ts``."""
    return _zone_offset(name, math.floor(ts / _OFFSET_STEP))


def zone_offsets(name: str, ts: npt.ArrayLike) -> FloatArray:
    """:func:`zone_offset` for an array of timestamps (one look-up per distinct quarter hour)."""
    t = np.asarray(ts, dtype=np.float64)
    q, inv = np.unique(np.floor(t / _OFFSET_STEP), return_inverse=True)
    table = np.fromiter((_zone_offset(name, float(x)) for x in q.tolist()), dtype=np.float64, count=len(q))
    return table[inv.reshape(t.shape)]


class FeatureKind(str, enum.Enum):
    """What one model input is computed from."""

    DIFF = "diff"
    LEVEL = "level"
    SEASONAL = "seasonal"
    TOD_SIN = "tod_sin"
    TOD_COS = "tod_cos"
    DOW_SIN = "dow_sin"
    DOW_COS = "dow_cos"

    @property
    def is_calendar(self) -> bool:
        return self not in (FeatureKind.DIFF, FeatureKind.LEVEL, FeatureKind.SEASONAL)


CALENDAR_KINDS: tuple[FeatureKind, ...] = (
    FeatureKind.TOD_SIN,
    FeatureKind.TOD_COS,
    FeatureKind.DOW_SIN,
    FeatureKind.DOW_COS,
)


class OutputKind(str, enum.Enum):
    """How the network's K outputs map back to the target's units."""

    DELTA = "delta"
    LEVEL = "level"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One model input: its name, how it is computed, and its scaling."""

    name: str
    kind: FeatureKind
    column: str | None = None  # value column for diff/level/seasonal; None for calendar
    center: float = 0.0
    scale: float = 1.0
    season: int = 0  # seasonal: the season m in ticks
    lead: int = 0  # seasonal: j, the change from y_{t-m} to y_{t-m+j}

    def __post_init__(self) -> None:
        if self.kind is FeatureKind.SEASONAL and not 1 <= self.lead <= self.season:
            raise ValueError(f"feature {self.name!r}: a seasonal input needs 1 <= lead <= season")
        if self.season > MAX_SEASON_TICKS:
            raise ValueError(f"feature {self.name!r}: season {self.season} is above {MAX_SEASON_TICKS} ticks")

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "kind": self.kind.value}
        if not self.kind.is_calendar:
            d.update(column=self.column, center=self.center, scale=self.scale)
        if self.kind is FeatureKind.SEASONAL:
            d.update(season=self.season, lead=self.lead)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeatureSpec:
        try:
            kind = FeatureKind(str(d["kind"]))
        except ValueError:
            known = ", ".join(k.value for k in FeatureKind)
            name, given = d.get("name"), d["kind"]
            raise ValueError(f"feature {name!r}: unknown kind {given!r} (this build knows {known})") from None
        if kind.is_calendar:
            return cls(name=str(d["name"]), kind=kind)
        column = d.get("column")
        if not isinstance(column, str) or not column:
            raise ValueError(f"feature {d.get('name')!r}: kind {kind.value} needs a 'column'")
        scale = float(d.get("scale", 1.0))  # type: ignore[arg-type]
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"feature {d.get('name')!r}: scale must be a positive number")
        center = float(d.get("center", 0.0))  # type: ignore[arg-type]
        if not math.isfinite(center):  # a NaN level makes every forecast NaN; an infinite one pins it at the clip
            raise ValueError(f"feature {d.get('name')!r}: center must be a finite number")
        season, lead = d.get("season", 0), d.get("lead", 0)
        if kind is FeatureKind.SEASONAL and not all(type(n) is int for n in (season, lead)):
            raise ValueError(f"feature {d.get('name')!r}: season and lead must be whole numbers of ticks")
        return cls(
            name=str(d["name"]),
            kind=kind,
            column=column,
            center=center,
            scale=scale,
            season=int(season) if kind is FeatureKind.SEASONAL else 0,  # type: ignore[call-overload]
            lead=int(lead) if kind is FeatureKind.SEASONAL else 0,  # type: ignore[call-overload]
        )


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The forecast head: which column, how many ticks ahead, and its scaling."""

    target: str
    horizon: int
    kind: OutputKind = OutputKind.DELTA
    center: float = 0.0
    scale: float = 1.0
    season_ticks: int = 0  # season of the seasonal blend (seasonal naive or differenced); 0: none
    seasonal_weights: tuple[float, ...] = ()  # per horizon, weight of (seasonal forecast - last reading)
    seasonal_differenced: tuple[bool, ...] = ()  # per horizon, the seasonal forecast is differenced (else naive)

    def __post_init__(self) -> None:
        if self.seasonal_weights and (self.season_ticks < 1 or len(self.seasonal_weights) != self.horizon):
            raise ValueError("seasonal_weights need season_ticks >= 1 and one weight per horizon")
        if self.seasonal_weights and self.season_ticks > MAX_SEASON_TICKS:
            raise ValueError(f"season_ticks {self.season_ticks} is above {MAX_SEASON_TICKS} ticks")
        if self.seasonal_differenced and len(self.seasonal_differenced) != len(self.seasonal_weights):
            raise ValueError("seasonal_differenced needs seasonal_weights and one flag per horizon")
        # A flag counts only where its horizon has a weight; none left: no flags (what to_dict writes).
        pairs = zip(self.seasonal_differenced, self.seasonal_weights, strict=False)  # no flags: empty
        flags = tuple(bool(d) and w != 0.0 for d, w in pairs)
        object.__setattr__(self, "seasonal_differenced", flags if any(flags) else ())
        if self.history_ticks > MAX_HISTORY_TICKS:  # differenced over more than one season
            raise ValueError(f"season_ticks {self.season_ticks} with horizon {self.horizon} would keep "
                             f"{self.history_ticks} targets per stream, more than {MAX_HISTORY_TICKS}")  # fmt: skip

    @property
    def seasonal(self) -> bool:
        """Whether forecasts lean on a seasonal forecast (and so need each stream's recent targets)."""
        return bool(self.seasonal_weights) and any(w != 0.0 for w in self.seasonal_weights)

    @property
    def differenced(self) -> bool:
        """Whether some horizon with a weight leans on the seasonally differenced forecast."""
        return bool(self.seasonal_differenced)

    @property
    def history_ticks(self) -> int:
        """Target values a stream must keep for the seasonal blend: one season (seasonal naive), one
        more tick and as many more seasons as the horizon spans (differenced: ``r_k``), or 0."""
        return blend_history_ticks(self.season_ticks, self.horizon, self.differenced) if self.seasonal else 0

    @functools.cached_property
    def differenced_mask(self) -> npt.NDArray[np.bool_]:
        """``[K]``: the horizons whose seasonal forecast is differenced."""
        return np.asarray(self.seasonal_differenced or (False,) * self.horizon, dtype=bool)

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "target": self.target,
            "horizon": self.horizon,
            "kind": self.kind.value,
            "center": self.center,
            "scale": self.scale,
        }
        if self.seasonal:
            d.update(season_ticks=self.season_ticks, seasonal_weights=list(self.seasonal_weights))
        if self.differenced:
            d.update(seasonal_differenced=[bool(f) for f in self.seasonal_differenced])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> OutputSpec:
        horizon = int(d["horizon"])  # type: ignore[call-overload]
        if horizon < 1:
            raise ValueError("output horizon must be >= 1")
        scale = float(d.get("scale", 1.0))  # type: ignore[arg-type]
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError("output scale must be a positive number")
        center = float(d.get("center", 0.0))  # type: ignore[arg-type]
        if not math.isfinite(center):
            raise ValueError("output center must be a finite number")
        weights = d.get("seasonal_weights") or []
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights):
            raise ValueError("seasonal_weights must be a list of numbers")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("seasonal_weights must be finite")
        season = d.get("season_ticks", 0)
        if weights and type(season) is not int:  # as for seasonal inputs: 24.7, "24" or true is no season
            raise ValueError("output season_ticks must be a whole number of ticks")
        differenced = d.get("seasonal_differenced", [])
        if not isinstance(differenced, list) or not all(isinstance(f, bool) for f in differenced):
            raise ValueError("seasonal_differenced must be a list of true/false")
        return cls(
            target=str(d["target"]),
            horizon=horizon,
            kind=OutputKind(str(d.get("kind", "delta"))),
            center=center,
            scale=scale,
            season_ticks=int(season) if weights else 0,  # type: ignore[call-overload]
            seasonal_weights=tuple(float(w) for w in weights),
            seasonal_differenced=tuple(differenced) if weights else (),
        )


def calendar_features(
    timestamps: npt.ArrayLike, kinds: Sequence[FeatureKind] = CALENDAR_KINDS, utc_offset_s: float = 0.0
) -> FloatArray:
    """Calendar features of epoch-second timestamps, shape ``[N, len(kinds)]``."""
    t = np.asarray(timestamps, dtype=np.float64) + utc_offset_s
    out = np.empty((t.shape[0], len(kinds)), dtype=np.float64)
    _calendar_into(out, list(range(len(kinds))), _calendar_source(kinds), t)
    return out


# Calendar phases: column 0 the time of day, column 1 the day of the week.
_PHASE_SHIFT = np.asarray([0.0, _EPOCH_WEEKDAY_SHIFT])
_PHASE_PERIOD = np.asarray([DAY_SECONDS, WEEK_SECONDS])
# Where each calendar kind is in [sin(day), sin(week), cos(day), cos(week)].
_CALENDAR_SOURCE = {
    FeatureKind.TOD_SIN: 0,
    FeatureKind.DOW_SIN: 1,
    FeatureKind.TOD_COS: 2,
    FeatureKind.DOW_COS: 3,
}


def _calendar_source(kinds: Sequence[FeatureKind]) -> list[int]:
    """Where each calendar kind is in ``[sin(day), sin(week), cos(day), cos(week)]``."""
    try:
        return [_CALENDAR_SOURCE[k] for k in kinds]
    except KeyError as e:
        raise ValueError(f"{e.args[0].value} is not a calendar feature") from None


def _calendar_into(out: FloatArray, columns: Sequence[int], source: Sequence[int], t: FloatArray) -> None:
    """Write calendar features of shifted timestamps ``t`` into ``out[:, columns]``.

    ``source`` comes from :func:`_calendar_source`.  Both phases, and the sines
    and cosines, are each one array operation: a small batch costs a handful of
    numpy calls whatever the number of features.
    """
    phase = 2.0 * np.pi * np.mod(t[:, None] - _PHASE_SHIFT, _PHASE_PERIOD) / _PHASE_PERIOD
    out[:, columns] = np.concatenate([np.sin(phase), np.cos(phase)], axis=1)[:, source]


@dataclasses.dataclass(frozen=True)
class _EncodePlan:
    """Index arrays that let :meth:`FeaturePipeline.encode` fill each kind of feature in one operation."""

    calendar_columns: list[int]
    calendar_source: list[int]  # see _calendar_source
    diff_x: npt.NDArray[np.intp]  # columns of x
    diff_v: npt.NDArray[np.intp]  # their value columns
    diff_scale: FloatArray
    level_x: npt.NDArray[np.intp]
    level_v: npt.NDArray[np.intp]
    level_center: FloatArray
    level_scale: FloatArray
    diff_rows: tuple[tuple[int, int, float], ...]  # (x column, value column, scale) for one-row encoding
    level_rows: tuple[tuple[int, int, float, float], ...]  # (x column, value column, center, scale)
    seasonal_x: npt.NDArray[np.intp]  # columns of x of the seasonal inputs, in feature order
    seasonal_scale: FloatArray


@dataclasses.dataclass(frozen=True)
class FeaturePipeline:
    """Turns raw readings into model inputs and model outputs into forecasts.

    ``columns`` are the raw value columns a reading carries, in the order the
    arrays passed to :meth:`encode` use.  ``features`` are the model's inputs in
    the order of the ``x`` tensor.
    """

    columns: tuple[str, ...]
    features: tuple[FeatureSpec, ...]
    output: OutputSpec
    utc_offset_s: float = 0.0
    timezone: str | None = None  # IANA zone of the calendar inputs; None: the fixed utc_offset_s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.utc_offset_s) and abs(self.utc_offset_s) <= DAY_SECONDS):
            raise ValueError(f"utc_offset_seconds must be a finite offset within a day, got {self.utc_offset_s}")
        if self.timezone is not None:
            time_zone(self.timezone)  # ValueError when unknown
            if self.utc_offset_s:
                raise ValueError("give a time zone or a fixed UTC offset, not both")
        if not self.columns:
            raise ValueError("a model needs at least one value column")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"duplicate value columns: {list(self.columns)}")
        if self.output.target not in self.columns:
            raise ValueError(f"target {self.output.target!r} is not one of the columns {list(self.columns)}")
        for f in self.features:
            if not f.kind.is_calendar and f.column not in self.columns:
                raise ValueError(f"feature {f.name!r} uses unknown column {f.column!r}")
            if f.kind is FeatureKind.SEASONAL and f.column != self.output.target:
                raise ValueError(f"feature {f.name!r}: a seasonal input must use the target {self.output.target!r}")

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def target_index(self) -> int:
        return self.columns.index(self.output.target)

    @functools.cached_property
    def seasonal_inputs(self) -> tuple[FeatureSpec, ...]:
        """The ``seasonal`` inputs, in the order :meth:`encode` takes their raw changes."""
        return tuple(f for f in self.features if f.kind is FeatureKind.SEASONAL)

    @property
    def history_ticks(self) -> int:
        """Targets each stream must keep: the seasonal blend's (:attr:`OutputSpec.history_ticks`) or
        the seasonal inputs' season, whichever is more; 0 when the model uses neither."""
        return max([self.output.history_ticks, *(f.season for f in self.seasonal_inputs)])

    def encode(
        self,
        values: npt.ArrayLike,
        previous: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        seasonal: npt.ArrayLike | None = None,
    ) -> FloatArray:
        """Model inputs ``x`` of shape ``[B, D]`` (float32) for B ticks.

        ``values`` and ``previous`` are ``[B, V]`` raw readings (columns in
        ``self.columns`` order) of this tick and of the tick before; a NaN in
        ``previous`` (a stream's first tick) makes that difference 0.  ``seasonal``
        ``[B, S]`` are the raw changes of the :attr:`seasonal_inputs`
        (:func:`seasonal_changes`, :func:`seasonal_changes_from_history`); NaN, or no
        array at all, means too little history and gives 0.
        """
        v = np.asarray(values, dtype=np.float64)
        p = np.asarray(previous, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != len(self.columns):
            raise ValueError(f"values must have shape [B, {len(self.columns)}], got {v.shape}")
        plan = self._plan
        x = np.empty((v.shape[0], self.n_features), dtype=np.float64)
        if plan.calendar_columns:
            t = self.local_time(timestamps)
            _calendar_into(x, plan.calendar_columns, plan.calendar_source, t)
        if len(plan.diff_x):
            d = (v[:, plan.diff_v] - p[:, plan.diff_v]) / plan.diff_scale
            x[:, plan.diff_x] = np.where(np.isnan(d), 0.0, d)
        if len(plan.level_x):
            lv = (v[:, plan.level_v] - plan.level_center) / plan.level_scale
            x[:, plan.level_x] = np.clip(lv, -LEVEL_CLIP, LEVEL_CLIP)
        if len(plan.seasonal_x):
            if seasonal is None:
                x[:, plan.seasonal_x] = 0.0
            else:
                sd = np.asarray(seasonal, dtype=np.float64) / plan.seasonal_scale
                x[:, plan.seasonal_x] = np.where(np.isnan(sd), 0.0, sd)
        return x.astype(np.float32)

    def encode_row(
        self,
        values: Sequence[float],
        previous: Sequence[float],
        timestamp: float,
        seasonal: Sequence[float] | None = None,
    ) -> FloatArray:
        """:meth:`encode` of one tick, ``[1, D]`` float32, bit for bit, at a fraction of the cost.

        Arithmetic on Python floats is the same IEEE double arithmetic numpy
        does element-wise (``%`` is numpy's ``mod``); the sines and cosines
        still come from numpy, so the result cannot differ from :meth:`encode`.
        """
        plan = self._plan
        x = [0.0] * len(self.features)
        if plan.calendar_columns:
            t = timestamp + (self.utc_offset_s if self.timezone is None else zone_offset(self.timezone, timestamp))
            day = 2.0 * math.pi * ((t - 0.0) % DAY_SECONDS) / DAY_SECONDS
            week = 2.0 * math.pi * ((t - _EPOCH_WEEKDAY_SHIFT) % WEEK_SECONDS) / WEEK_SECONDS
            phase = np.array([day, week])
            waves = [*np.sin(phase).tolist(), *np.cos(phase).tolist()]
            for j, k in zip(plan.calendar_columns, plan.calendar_source, strict=True):
                x[j] = waves[k]
        for j, c, scale in plan.diff_rows:
            d = (values[c] - previous[c]) / scale
            x[j] = 0.0 if math.isnan(d) else d
        for j, c, center, scale in plan.level_rows:
            x[j] = min(max((values[c] - center) / scale, -LEVEL_CLIP), LEVEL_CLIP)
        if seasonal is not None:
            for j, change, scale in zip(plan.seasonal_x.tolist(), seasonal, plan.seasonal_scale.tolist(), strict=True):
                d = change / scale
                x[j] = 0.0 if math.isnan(d) else d
        return np.array([x], dtype=np.float32)

    def local_time(self, timestamps: npt.ArrayLike) -> FloatArray:
        """Epoch timestamps shifted into the calendar's local time."""
        t = np.asarray(timestamps, dtype=np.float64)
        if self.timezone is None:
            return t + self.utc_offset_s
        return t + zone_offsets(self.timezone, t)

    @functools.cached_property
    def _plan(self) -> _EncodePlan:
        feats = list(enumerate(self.features))
        cal = [(j, f.kind) for j, f in feats if f.kind.is_calendar]
        diff = [(j, f) for j, f in feats if f.kind is FeatureKind.DIFF]
        level = [(j, f) for j, f in feats if f.kind is FeatureKind.LEVEL]
        seasonal = [(j, f) for j, f in feats if f.kind is FeatureKind.SEASONAL]

        def idx(items: Sequence[int]) -> npt.NDArray[np.intp]:
            return np.asarray(items, dtype=np.intp)

        def col(f: FeatureSpec) -> int:
            return self.columns.index(f.column)  # type: ignore[arg-type]

        return _EncodePlan(
            calendar_columns=[j for j, _ in cal],
            calendar_source=_calendar_source([k for _, k in cal]),
            diff_x=idx([j for j, _ in diff]),
            diff_v=idx([col(f) for _, f in diff]),
            diff_scale=np.asarray([f.scale for _, f in diff], dtype=np.float64),
            level_x=idx([j for j, _ in level]),
            level_v=idx([col(f) for _, f in level]),
            level_center=np.asarray([f.center for _, f in level], dtype=np.float64),
            level_scale=np.asarray([f.scale for _, f in level], dtype=np.float64),
            diff_rows=tuple((j, col(f), float(f.scale)) for j, f in diff),
            level_rows=tuple((j, col(f), float(f.center), float(f.scale)) for j, f in level),
            seasonal_x=idx([j for j, _ in seasonal]),
            seasonal_scale=np.asarray([f.scale for _, f in seasonal], dtype=np.float64),
        )

    def decode(
        self, y: npt.ArrayLike, last_target: npt.ArrayLike, seasonal: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.float64]:
        """Forecasts ``[B, K]`` in the target's units from network outputs ``[B, K]``.

        ``seasonal`` ``[B, K]`` are the blend's seasonal forecasts ``S_k``
        (:func:`seasonal_forecasts`; NaN where a stream has too little history); they
        count only when the output has seasonal weights.  One
        tick's ``[K]`` outputs with a scalar ``last_target`` give its ``[K]`` forecasts.
        """
        last = np.asarray(last_target, dtype=np.float64)[..., None]
        out = np.asarray(y, dtype=np.float64) * self.output.scale
        out = out + last if self.output.kind is OutputKind.DELTA else out + self.output.center
        if seasonal is not None and self.output.seasonal:
            lean = np.asarray(seasonal, dtype=np.float64) - last
            out = out + self._seasonal_weights * np.where(np.isnan(lean), 0.0, lean)
        return out

    @functools.cached_property
    def _seasonal_weights(self) -> FloatArray:
        return np.asarray(self.output.seasonal_weights, dtype=np.float64)

    def to_dict(self) -> dict[str, object]:
        return {
            "columns": list(self.columns),
            "features": [f.to_dict() for f in self.features],
            "output": self.output.to_dict(),
            "utc_offset_seconds": self.utc_offset_s,
            **({"timezone": self.timezone} if self.timezone is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeaturePipeline:
        cols = d.get("columns")
        feats = d.get("features")
        if not isinstance(cols, list) or not isinstance(feats, list):
            raise ValueError("'columns' and 'features' must be lists")
        return cls(
            columns=tuple(str(c) for c in cols),
            features=tuple(FeatureSpec.from_dict(f) for f in feats),
            output=OutputSpec.from_dict(d["output"]),  # type: ignore[arg-type]
            utc_offset_s=float(d.get("utc_offset_seconds", 0.0)),  # type: ignore[arg-type]
            timezone=None if d.get("timezone") is None else str(d["timezone"]),
        )


def seasonal_lags(season: int, horizon: int) -> npt.NDArray[np.intp]:
    """For ``k = 1..K``: how many ticks before the origin seasonal naive's reading lies.

    Seasonal naive forecasts tick ``t + k`` with the reading at ``t + k - m * ceil(k / m)``
    (``m`` = ``season``), which is ``lag_k = m * ceil(k / m) - k`` ticks before the origin
    ``t``, always in ``0 .. m - 1``: one season of history covers every horizon.
    """
    k = np.arange(1, horizon + 1)
    return (season * -(-k // season) - k).astype(np.intp)


def seasonal_naive(target: npt.ArrayLike, season: int, horizon: int) -> FloatArray:
    """Seasonal-naive forecasts ``[T, K]`` from every tick of a stretch that starts a stream.

    ``target`` ``[T]`` holds the target at consecutive ticks from a stream's start (or
    reset); entries without enough history are NaN.
    """
    return _lagged(np.asarray(target, dtype=np.float64), seasonal_lags(season, horizon))


def reference_lags(season: int, horizon: int) -> npt.NDArray[np.intp]:
    """For ``k = 1..K``: how many ticks before the origin ``r_k`` lies: ``m * ceil(k / m)``."""
    k = np.arange(1, horizon + 1)
    return (season * -(-k // season)).astype(np.intp)


def _lagged(tgt: FloatArray, lags: npt.NDArray[np.intp]) -> FloatArray:
    idx = np.arange(tgt.shape[0])[:, None] - lags[None, :]
    return np.where(idx >= 0, tgt[np.maximum(idx, 0)], np.nan)


def seasonal_forecasts(
    naive: FloatArray, reference: FloatArray | None, last: npt.ArrayLike, output: OutputSpec
) -> FloatArray:
    """The blend's seasonal forecasts ``S_k`` ``[..., K]``: seasonal naive ``s_k``, or ``y_t + (s_k - r_k)``
    at the differenced horizons (NaN where ``s_k`` or ``r_k`` is missing).

    The converter (on its scored pairs and whole stretches) and the daemon (from each
    stream's ring) both call this, so both get the same numbers.
    """
    if reference is None or not output.differenced:
        return naive
    last_col = np.asarray(last, dtype=np.float64)[..., None]
    return np.where(output.differenced_mask, seasonally_differenced(naive, reference, last_col), naive)


def seasonally_differenced(naive: FloatArray, reference: FloatArray, last: FloatArray) -> FloatArray:
    """``y_t + (s_k - r_k)``: the last reading plus the change over the same stretch a season earlier."""
    return last + (naive - reference)


def seasonal_series(target: npt.ArrayLike, output: OutputSpec) -> FloatArray | None:
    """:func:`seasonal_forecasts` ``[T, K]`` at every tick of a stretch that starts a stream (None: no blend).

    The daemon keeps the last :attr:`OutputSpec.history_ticks` targets of each stream in a
    ring and gets the same numbers (:func:`seasonal_from_history`).
    """
    if not output.seasonal:
        return None
    tgt = np.asarray(target, dtype=np.float64)
    m, k = output.season_ticks, output.horizon
    naive = _lagged(tgt, seasonal_lags(m, k))
    reference = _lagged(tgt, reference_lags(m, k)) if output.differenced else None
    return seasonal_forecasts(naive, reference, tgt, output)


def record_history(history: FloatArray, rows: npt.ArrayLike, tick_index: npt.ArrayLike, target: npt.ArrayLike) -> None:
    """Store the target of tick ``tick_index`` (0 = a stream's first tick) in its row's ring.

    ``history`` is ``[rows, M]``; column ``i % M`` holds tick ``i``, so the ring always holds
    the last ``M`` ticks (``M`` = :attr:`FeaturePipeline.history_ticks`), all that
    :func:`seasonal_from_history` and :func:`seasonal_changes_from_history` need.
    """
    m = history.shape[1]
    history[np.asarray(rows, np.intp), np.asarray(tick_index, np.int64) % m] = target


def seasonal_from_history(
    history: FloatArray, rows: npt.ArrayLike, tick_index: npt.ArrayLike, output: OutputSpec
) -> FloatArray:
    """The blend's seasonal forecasts ``[B, K]`` at origin ticks ``tick_index`` from the rings of ``rows``.

    The same numbers as :func:`seasonal_series` on the stream's whole history: NaN where a
    reading they need precedes the stream's first tick (or the ring's last restart).  A
    scalar row and tick give that one origin's ``[K]``.
    """
    m, k = output.season_ticks, output.horizon
    tick = np.asarray(tick_index, np.int64)
    row = np.asarray(rows, np.intp)
    naive = _ring_at(history, row, tick, seasonal_lags(m, k))
    if not output.differenced:
        return naive
    reference = _ring_at(history, row, tick, reference_lags(m, k))
    return seasonal_forecasts(naive, reference, history[row, tick % history.shape[1]], output)


def _ring_at(
    history: FloatArray, row: npt.NDArray[np.intp], tick: npt.NDArray[np.int64], lags: npt.NDArray[np.intp]
) -> FloatArray:
    """``[..., L]``: the targets ``lags`` ticks before tick ``tick`` of ``row`` from the ring, NaN before
    the stream's first tick (or the ring's last restart)."""
    idx = tick[..., None] - lags
    return np.where(idx >= 0, history[row[..., None], idx % history.shape[1]], np.nan)


def _input_lags(specs: Sequence[FeatureSpec]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Ticks before the current one of ``y_{t-m+j}`` and of ``y_{t-m}``, per seasonal input."""
    return (
        np.asarray([f.season - f.lead for f in specs], dtype=np.intp),
        np.asarray([f.season for f in specs], dtype=np.intp),
    )


def seasonal_changes(target: npt.ArrayLike, pipeline: FeaturePipeline) -> FloatArray | None:
    """Raw changes ``[T, S]`` of the seasonal inputs at every tick of a stretch that starts a stream.

    NaN where a reading they need precedes the stretch; None when the model has no seasonal
    inputs.  The daemon gets the same numbers from each stream's ring
    (:func:`seasonal_changes_from_history`).
    """
    specs = pipeline.seasonal_inputs
    if not specs:
        return None
    tgt = np.asarray(target, dtype=np.float64)
    ahead, base = _input_lags(specs)
    return _lagged(tgt, ahead) - _lagged(tgt, base)


def seasonal_changes_from_history(
    history: FloatArray,
    rows: npt.ArrayLike,
    tick_index: npt.ArrayLike,
    current: npt.ArrayLike,
    pipeline: FeaturePipeline,
) -> FloatArray:
    """:func:`seasonal_changes` ``[B, S]`` of ticks ``tick_index`` (not yet in the ring) of ``rows``.

    ``current`` ``[B]`` are those ticks' targets (a lead of a whole season reads the tick
    itself).  A scalar row, tick and target give that tick's ``[S]``.
    """
    tick = np.asarray(tick_index, np.int64)
    row = np.asarray(rows, np.intp)
    now = np.asarray(current, np.float64)[..., None]
    ahead, base = _input_lags(pipeline.seasonal_inputs)
    # a lead of a whole season (lag 0) is the tick itself, not yet in the ring
    return np.where(ahead == 0, now, _ring_at(history, row, tick, ahead)) - _ring_at(history, row, tick, base)


def seasonal_changes_row(
    ring: FloatArray | Sequence[float], tick_index: int, current: float, pipeline: FeaturePipeline
) -> list[float]:
    """:func:`seasonal_changes_from_history` of one stream's tick on Python floats, bit for bit.

    ``ring`` is the stream's row of the ring (a view of it will do); only the two targets each
    input needs are read from it, so the cost does not grow with the season (a list of the whole
    row had cost ~40 us a reading at a day of minutes and ~3 ms at a day of seconds).  The
    single-tick path calls this, where numpy's small-array calls would cost more than the arithmetic.
    """
    size = len(ring)
    nan = math.nan
    out: list[float] = []
    for f in pipeline.seasonal_inputs:
        ahead = f.season - f.lead
        a = current if ahead == 0 else (float(ring[(tick_index - ahead) % size]) if tick_index >= ahead else nan)
        b = float(ring[(tick_index - f.season) % size]) if tick_index >= f.season else nan
        out.append(a - b)
    return out
