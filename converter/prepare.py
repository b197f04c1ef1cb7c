"""From a resampled series to network inputs and targets: pipeline, split, windows, evaluation runs.

Pure numpy.  Inputs are built with :meth:`edge_lstm.features.FeaturePipeline.encode`,
the very function the daemon calls on live readings.

The split is chronological over the ticks of all segments: the first
``train_frac`` of the ticks train, the next ``val_frac`` drive early stopping
and calibration, the rest is the hold-out.  A target counts only when its
origin and the tick it forecasts are both real readings (not interpolated) in
the same part of the split, so nothing leaks across the boundaries.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from converter.data import GridSeries, Segment
from converter.errors import ConvertError
from edge_lstm.features import (
    DAY_SECONDS,
    WEEK_SECONDS,
    FeatureKind,
    FeaturePipeline,
    FeatureSpec,
    OutputKind,
    OutputSpec,
    seasonal_changes,
)

_LOG = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class Part(enum.IntEnum):
    """Which part of the chronological split a tick belongs to."""

    TRAIN = 0
    VAL = 1
    HOLDOUT = 2


class LevelMode(str, enum.Enum):
    """Which value columns also enter the network as a clipped, scaled level."""

    AUTO = "auto"  # the target, unless the series trends out of its training range
    NONE = "none"
    TARGET = "target"
    ALL = "all"


# Share of validation readings outside the training range above which a series counts as trending.
TREND_OUTSIDE_SHARE = 0.1


class CalendarMode(str, enum.Enum):
    """Calendar inputs: decided from the cadence (auto), or none."""

    AUTO = "auto"
    NONE = "none"


class SeasonalInputMode(str, enum.Enum):
    """Seasonal inputs (last season's change over each coming horizon): auto or none."""

    AUTO = "auto"  # see seasonal_inputs_fit
    NONE = "none"


# A seasonal input is 0 for a stream's first season: the training part of the fold with the least
# data must hold this many seasons, so that every fold's network learns from the inputs over two.
MIN_SEASONS_FOR_INPUTS = 3


def seasonal_inputs_fit(season: int, train_ticks: int) -> bool:
    """Whether ``auto`` feeds seasonal inputs: a season of 2 ticks or more, and ``train_ticks`` (the
    training part of the earliest validation fold) holding :data:`MIN_SEASONS_FOR_INPUTS` seasons."""
    return season >= 2 and train_ticks >= MIN_SEASONS_FOR_INPUTS * season


# The default season is kept only when at least this share of the scored ticks lies a whole season or more
# into its segment: seasonal naive, the seasonal blend and the seasonal inputs need a season of history, and a
# gap longer than max_gap_ticks starts a new segment with none (the daemon resets the stream there too).
MIN_SEASON_HISTORY_SHARE = 0.5


def season_history_share(parts: Sequence[npt.NDArray[np.int8]], season: int) -> float:
    """The share of the validation and hold-out ticks (those scored) that lie at least ``season`` ticks into
    their segment; ``parts`` is :func:`assign_parts` of the series."""
    scored = held = 0
    for p in parts:
        idx = np.flatnonzero(p != Part.TRAIN)
        scored += idx.size
        held += int((idx >= season).sum())
    return held / scored if scored else 0.0


def gap_ticks(segments: Sequence[Segment], cadence_s: float) -> list[int]:
    """The ticks missing between one segment and the next (each longer than ``max_gap_ticks``)."""
    return [round((b.timestamps[0] - a.timestamps[-1]) / cadence_s) - 1 for a, b in itertools.pairwise(segments)]


@dataclasses.dataclass(frozen=True)
class Split:
    train_frac: float = 0.7
    val_frac: float = 0.15

    def __post_init__(self) -> None:
        if not (0 < self.train_frac < 1 and 0 < self.val_frac < 1 and self.train_frac + self.val_frac < 1):
            raise ConvertError("split fractions must be positive and leave room for a hold-out")

    @property
    def holdout_frac(self) -> float:
        return 1.0 - self.train_frac - self.val_frac


@dataclasses.dataclass(frozen=True)
class EncodedSegment:
    """One segment as the network sees it, with its targets and bookkeeping."""

    segment: Segment
    x: F32  # [T, D]
    y: F32  # [T, K] network units; NaN where the target does not count
    part: npt.NDArray[np.int8]  # [T] Part of every tick
    target: F64  # [T] the target column, in its units

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """A stretch of one segment to stream from zero state; scored ticks are ``score_from`` on."""

    seg_index: int
    start: int  # first tick streamed (segment coordinates)
    stop: int  # one past the last tick
    score_from: int  # first tick (segment coordinates) whose forecasts count


def calendar_kinds(cadence_s: float) -> tuple[FeatureKind, ...]:
    """Calendar inputs that make sense at a cadence: time of day below a day, day of week below a week."""
    kinds: list[FeatureKind] = []
    if cadence_s <= DAY_SECONDS / 4:
        kinds += [FeatureKind.TOD_SIN, FeatureKind.TOD_COS]
    if cadence_s <= DAY_SECONDS:
        kinds += [FeatureKind.DOW_SIN, FeatureKind.DOW_COS]
    return tuple(kinds)


YEAR_SECONDS = 365.25 * DAY_SECONDS


def season_ticks(cadence_s: float) -> int:
    """The seasonal-naive period: a day below daily cadence, a week at daily cadence, else a year."""
    if cadence_s < DAY_SECONDS:
        return max(1, round(DAY_SECONDS / cadence_s))
    if cadence_s < WEEK_SECONDS:
        return max(1, round(WEEK_SECONDS / cadence_s))
    return max(1, round(YEAR_SECONDS / cadence_s))


def assign_parts(grid: GridSeries, split: Split) -> list[npt.NDArray[np.int8]]:
    """The Part of every tick, per segment (chronological over all ticks)."""
    n = grid.n_ticks
    train_end = math.floor(n * split.train_frac)
    val_end = math.floor(n * (split.train_frac + split.val_frac))
    parts: list[npt.NDArray[np.int8]] = []
    offset = 0
    for seg in grid.segments:
        pos = offset + np.arange(len(seg))
        p = np.full(len(seg), Part.HOLDOUT, dtype=np.int8)
        p[pos < val_end] = Part.VAL
        p[pos < train_end] = Part.TRAIN
        parts.append(p)
        offset += len(seg)
    return parts


def _previous(values: F64) -> F64:
    prev = np.empty_like(values)
    prev[0] = np.nan
    prev[1:] = values[:-1]
    return prev


def build_pipeline(
    grid: GridSeries,
    parts: Sequence[npt.NDArray[np.int8]],
    target: str,
    horizon: int,
    level: LevelMode = LevelMode.AUTO,
    calendar: CalendarMode = CalendarMode.AUTO,
    utc_offset_s: float = 0.0,
    timezone: str | None = None,
    seasonal_inputs: int = 0,
) -> FeaturePipeline:
    """Choose the inputs and fit their scaling on the training part only.

    ``seasonal_inputs``: the season ``m`` of the ``seasonal`` inputs (one per horizon up to the
    season, :class:`FeatureKind` ``seasonal``); 0 for none (:func:`seasonal_inputs_fit` decides
    ``auto``).
    """
    if horizon < 1:
        raise ConvertError("--horizon must be at least 1")
    cols = grid.columns
    train_vals = [s.values[p == Part.TRAIN] for s, p in zip(grid.segments, parts, strict=True)]
    train_diffs = [np.diff(s.values[p == Part.TRAIN], axis=0) for s, p in zip(grid.segments, parts, strict=True)]
    vals = np.concatenate([v for v in train_vals if v.size]) if any(v.size for v in train_vals) else None
    diffs = np.concatenate([d for d in train_diffs if d.size]) if any(d.size for d in train_diffs) else None
    if vals is None or diffs is None or diffs.shape[0] < 2:
        lengths = [len(seg) for seg in grid.segments]
        where = (f"{grid.n_ticks} ticks in {len(lengths)} stretch(es), the longest {max(lengths)}" if lengths else
                 "no two readings are within --max-gap-ticks of each other")  # fmt: skip
        raise ConvertError(
            f"the training part of the series is too short: {where} (a gap longer than --max-gap-ticks "
            f"{grid.max_gap_ticks} ticks of {grid.cadence_s:g} s splits the series; check --cadence and "
            "--max-gap-ticks)"
        )
    if not np.isfinite(diffs).all():
        big = float(np.max(np.abs(vals)))
        raise ConvertError(f"values up to {big:.3g} are too large: their changes overflow; rescale the column")

    def positive(s: float) -> float:
        return float(s) if math.isfinite(s) and s > 1e-12 else 1.0

    features: list[FeatureSpec] = []
    for j, c in enumerate(cols):
        scale = positive(diffs[:, j].std())
        features.append(FeatureSpec(name=f"{c}_diff", kind=FeatureKind.DIFF, column=c, scale=scale))
    if level is LevelMode.AUTO:
        level = LevelMode.NONE if trends(grid, parts, target) else LevelMode.TARGET
        _LOG.info("level input: %s", "none (the series trends)" if level is LevelMode.NONE else "target")
    level_cols = {LevelMode.NONE: (), LevelMode.TARGET: (target,), LevelMode.ALL: cols}[level]
    for c in level_cols:
        j = cols.index(c)
        features.append(
            FeatureSpec(
                name=f"{c}_level",
                kind=FeatureKind.LEVEL,
                column=c,
                center=float(vals[:, j].mean()),
                scale=positive(vals[:, j].std()),
            )
        )
    if calendar is CalendarMode.AUTO:
        features += [FeatureSpec(name=k.value, kind=k) for k in calendar_kinds(grid.cadence_s)]
    # The output scale is the RMS change over the horizon, so every horizon's target is O(1).
    ti = cols.index(target)
    deltas: dict[int, list[float]] = {}
    for s, p in zip(grid.segments, parts, strict=True):
        y = s.values[p == Part.TRAIN, ti]
        for k in range(1, horizon + 1):
            if y.shape[0] > k:
                deltas.setdefault(k, []).append(float(np.mean((y[k:] - y[:-k]) ** 2)))
    every = [d for k in sorted(deltas) for d in deltas[k]]
    out_scale = positive(math.sqrt(float(np.mean(every)))) if every else 1.0
    season = seasonal_inputs
    # Lead j's change is scaled as the series' own j-tick changes are (most seasons' shapes are).
    for j in range(1, min(horizon, season) + 1):
        scale = positive(math.sqrt(float(np.mean(deltas[j])))) if j in deltas else out_scale
        features.append(
            FeatureSpec(f"{target}_season_{j}", FeatureKind.SEASONAL, target, scale=scale, season=season, lead=j)
        )
    output = OutputSpec(target=target, horizon=horizon, kind=OutputKind.DELTA, scale=out_scale)
    try:
        return FeaturePipeline(
            columns=tuple(cols), features=tuple(features), output=output, utc_offset_s=utc_offset_s, timezone=timezone
        )
    except ValueError as e:
        raise ConvertError(str(e)) from None


def trends(grid: GridSeries, parts: Sequence[npt.NDArray[np.int8]], column: str) -> bool:
    """Whether ``column`` leaves its training range in the validation part.

    A level input only helps while future levels look like the training ones;
    on a trending series it pushes the network into a range it never saw, so
    the level is left out and the model works on differences alone.
    """
    j = grid.columns.index(column)
    train = np.concatenate([s.values[p == Part.TRAIN, j] for s, p in zip(grid.segments, parts, strict=True)])
    val = np.concatenate([s.values[p == Part.VAL, j] for s, p in zip(grid.segments, parts, strict=True)])
    if train.size == 0 or val.size == 0:
        return False
    outside = float(np.mean((val < train.min()) | (val > train.max())))
    return outside > TREND_OUTSIDE_SHARE


def encode_segment(pipeline: FeaturePipeline, seg: Segment, part: npt.NDArray[np.int8]) -> EncodedSegment:
    """Network inputs for every tick and the masked delta targets."""
    tgt = seg.values[:, pipeline.target_index]
    x = pipeline.encode(seg.values, _previous(seg.values), seg.timestamps, seasonal_changes(tgt, pipeline))
    k_max = pipeline.output.horizon
    n = len(seg)
    y = np.full((n, k_max), np.nan, dtype=np.float64)
    for k in range(1, k_max + 1):
        if n <= k:
            break
        ok = seg.observed[:-k] & seg.observed[k:] & (part[:-k] == part[k:])
        d = (tgt[k:] - tgt[:-k]) / pipeline.output.scale
        y[:-k, k - 1] = np.where(ok, d, np.nan)
    return EncodedSegment(segment=seg, x=x, y=y.astype(np.float32), part=part, target=tgt)


def encode(grid: GridSeries, pipeline: FeaturePipeline, split: Split) -> list[EncodedSegment]:
    parts = assign_parts(grid, split)
    return [encode_segment(pipeline, s, p) for s, p in zip(grid.segments, parts, strict=True)]


def training_windows(
    encoded: Sequence[EncodedSegment], part: Part, length: int, stride: int, warmup: int
) -> tuple[F32, F32]:
    """Windows ``[N, length, D]`` / ``[N, length, K]`` whose targets lie in ``part``.

    Each window starts from zero state, so the first ``warmup`` ticks of a window
    that does not start its segment carry no loss (the state is still cold).
    A window may start before ``part`` to give the state context.
    """
    xs: list[F32] = []
    ys: list[F32] = []
    for e in encoded:
        idx = np.flatnonzero(e.part == part)
        if idx.size == 0:
            continue
        first, last = int(idx[0]), int(idx[-1]) + 1
        start = max(0, first - warmup)
        starts = list(range(start, max(start + 1, last - length + 1), stride))
        if starts[-1] + length < last:
            starts.append(max(start, last - length))
        for s in starts:
            x = np.zeros((length, e.x.shape[1]), dtype=np.float32)
            y = np.full((length, e.y.shape[1]), np.nan, dtype=np.float32)
            stop = min(s + length, len(e))
            x[: stop - s] = e.x[s:stop]
            ys_part = np.where((e.part[s:stop] == part)[:, None], e.y[s:stop], np.nan)
            y[: stop - s] = ys_part
            if s > 0:
                y[: min(warmup, length)] = np.nan
            if np.isfinite(y).any():
                xs.append(x)
                ys.append(y)
    if not xs:
        return (np.zeros((0, length, 1), np.float32), np.zeros((0, length, 1), np.float32))
    return np.stack(xs), np.stack(ys)


def eval_runs(encoded: Sequence[EncodedSegment], part: Part, warmup: int) -> list[EvalRun]:
    """Stretches to stream for scoring ``part``: each starts up to ``warmup`` ticks early for context."""
    runs: list[EvalRun] = []
    for i, e in enumerate(encoded):
        idx = np.flatnonzero(e.part == part)
        if idx.size == 0:
            continue
        first, last = int(idx[0]), int(idx[-1]) + 1
        start = max(0, first - warmup)
        runs.append(EvalRun(seg_index=i, start=start, stop=last, score_from=max(first, start + warmup)))
    return runs
