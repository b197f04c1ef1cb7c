"""CSV loading, cadence inference and resampling onto the model's ticks.

Pure numpy and the stdlib ``csv`` module: no TensorFlow here, so bad input is
rejected in a second, before any training starts.

The rows are a log of one stream in arrival (file) order.  They become ticks
through :class:`edge_lstm.ticks.TickPolicy` - the very code the daemon runs on
live readings - so training sees exactly the ticks the device will see:

* A row whose timestamp or any used value is empty or NaN is a *missing*
  reading; it is dropped.  (The daemon rejects such a reading.)
* Several rows in one tick are aggregated (mean, last or first); rows whose tick
  has already closed are late, rows repeating the newest timestamp duplicates:
  both dropped and counted.
* A gap of ``n <= max_gap_ticks`` ticks is filled by linear interpolation; a
  longer one ends the segment and the next tick starts a new one (the daemon
  resets the stream's state).
* Filled ticks are fed to the network but are never used as training targets,
  as forecast origins or for scoring: ``Segment.observed`` marks the real ones.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import itertools
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from converter.errors import ConvertError
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import DEFAULT_MAX_ABS_VALUE, MAX_EPOCH_S, MIN_EPOCH_S, epoch_scale
from edge_lstm.ticks import Aggregate, Align, TickPolicy, ticks_of

_LOG = logging.getLogger(__name__)

_MISSING = frozenset({"", "nan", "na", "n/a", "null", "none"})


@dataclasses.dataclass(frozen=True)
class RawSeries:
    """The rows of a CSV file as parsed: epoch seconds and float values (NaN = missing)."""

    timestamps: npt.NDArray[np.float64]  # [N], file order
    values: npt.NDArray[np.float64]  # [N, V]
    columns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of ticks on the cadence grid with no gap longer than ``max_gap_ticks``."""

    timestamps: npt.NDArray[np.float64]  # [T]
    values: npt.NDArray[np.float64]  # [T, V], finite
    observed: npt.NDArray[np.bool_]  # [T], False on interpolated ticks

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])


@dataclasses.dataclass(frozen=True)
class GridSeries:
    """A series resampled onto its ticks, as segments."""

    segments: tuple[Segment, ...]
    columns: tuple[str, ...]
    policy: TickPolicy
    n_rows: int  # rows in the file
    n_missing: int  # rows dropped for an empty/NaN cell
    n_filled: int  # ticks interpolated
    n_aggregated: int = 0  # rows merged into a tick another row opened
    n_late: int = 0  # rows whose tick had closed
    n_duplicate: int = 0  # rows repeating the newest timestamp

    @property
    def n_ticks(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def cadence_s(self) -> float:
        return self.policy.cadence_s

    @property
    def max_gap_ticks(self) -> int:
        return self.policy.max_gap_ticks


_YEAR_MONTH = re.compile(r"\d{4}-\d{2}")


def parse_timestamp(text: str) -> float:
    """Epoch seconds from ISO 8601 (date-time, date or year-month; naive means UTC) or an epoch number.

    An epoch number is seconds, milliseconds, microseconds or nanoseconds by its magnitude, by the
    daemon's rule (:func:`edge_lstm.payload.epoch_scale`).  Times from the year 5138 on (1e11 s)
    are refused, as the daemon refuses them; times before 1970 are read (history), though the
    daemon refuses those in live readings.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    try:
        num = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(num):
            raise ValueError(f"timestamp {s!r} is not finite")
        return _in_range(num * epoch_scale(abs(num)), s)
    if _YEAR_MONTH.fullmatch(s):  # ISO 8601's reduced precision: the month's first day
        s += "-01"
    try:
        stamp = dt.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith(("Z", "z")) else s)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.timezone.utc)
        epoch = stamp.timestamp()
    except (ValueError, OverflowError):  # OverflowError: an offset pushing year 1 or 9999 out of range
        raise ValueError(
            f"timestamp {s!r} is neither ISO 8601 nor an epoch number (seconds, ms, us or ns)"
        ) from None
    return _in_range(epoch, s)


def _in_range(epoch: float, text: str) -> float:
    if not abs(epoch) < MAX_EPOCH_S:
        raise ValueError(f"timestamp {text!r} is {epoch:.4g} s from 1970, beyond the year 5138 the daemon accepts")
    return epoch


def _parse_value(text: str) -> float:
    s = text.strip()
    if s.lower() in _MISSING:
        return math.nan
    v = float(s)  # ValueError for text
    if math.isinf(v):
        raise ValueError("infinite")
    return v


EPOCH_1971_S = 31_536_000.0  # 1971-01-01T00:00:00Z: every timestamp before it suggests serial dates or years


def read_csv(path: Path | str, time_col: str, columns: Sequence[str]) -> RawSeries:
    """Read ``time_col`` and ``columns`` from a CSV file with a header row."""
    p = Path(path)
    if not columns:
        raise ConvertError("no value columns given")
    try:
        fh = open(p, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise ConvertError(f"data file not found: {p}") from None
    except OSError as e:
        raise ConvertError(f"cannot read data file {p}: {e.strerror or e}") from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ConvertError(f"{p}: the file is empty") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise ConvertError(f"{p}: not a readable CSV file: {e}") from None
        header = [h.strip() for h in header]
        missing = [c for c in (time_col, *columns) if c not in header]
        if missing:
            hint = ""
            if len(header) == 1 and ";" in header[0]:
                hint = "; the file separates its columns with ';': the converter reads commas (convert it)"
            elif lower := [h for c in missing for h in header if h.lower() == c.lower()]:
                hint = f"; did you mean {', '.join(map(repr, lower))}?"
            raise ConvertError(
                f"{p}: column(s) {', '.join(map(repr, missing))} not found (the file has {header}){hint}"
            )
        twice = sorted({c for c in (time_col, *columns) if header.count(c) > 1})
        if twice:
            raise ConvertError(f"{p}: the header names column(s) {', '.join(map(repr, twice))} more than once")
        ti = header.index(time_col)
        vi = [header.index(c) for c in columns]
        times: list[float] = []
        rows: list[list[float]] = []
        no_time = 0
        try:
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    row = row + [""] * (len(header) - len(row))
                elif len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
                    raise ConvertError(
                        f"{p} line {lineno}: {len(row)} fields where the header has {len(header)} (a number "
                        "written with a thousands separator, or a comma in an unquoted text cell? An extra column "
                        "needs a name in the header)"
                    )
                if not row[ti].strip():  # a row without a time cannot be placed: dropped, as empty values are
                    no_time += 1
                    continue
                try:
                    t = parse_timestamp(row[ti])
                except ValueError as e:
                    raise ConvertError(f"{p} line {lineno}: column {time_col!r}: {e}") from None
                vals: list[float] = []
                for c, j in zip(columns, vi, strict=True):
                    try:
                        vals.append(_parse_value(row[j]))
                    except ValueError:
                        raise ConvertError(
                            f"{p} line {lineno}: column {c!r}: {row[j].strip()!r} is not a finite number"
                        ) from None
                times.append(t)
                rows.append(vals)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ConvertError(f"{p}: not a readable CSV file: {e}") from None
    if no_time:
        _LOG.warning("%s: %d row(s) with an empty %r cell dropped", p, no_time, time_col)
    if not times:
        raise ConvertError(f"{p}: no data rows")
    ts = np.asarray(times, dtype=np.float64)
    if ts.min() >= 0 and ts.max() < EPOCH_1971_S:
        _LOG.warning(
            "%s: column %r: every timestamp falls in 1970 (%g .. %g as epoch seconds): if these are spreadsheet "
            "serial dates, years or yyyymmdd numbers, write them as ISO 8601 dates (2024-03-01 or "
            "2024-03-01T12:00:00Z), or the cadence and the calendar inputs are wrong", p, time_col, times[0],
            times[-1],
        )  # fmt: skip
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    _warn_unlike_daemon(p, ts, values)
    return RawSeries(timestamps=ts, values=values, columns=tuple(columns))


def _warn_unlike_daemon(path: Path, ts: npt.NDArray[np.float64], values: npt.NDArray[np.float64]) -> None:
    """Say so when rows hold what the daemon's defaults refuse in live readings (fine for training)."""
    early = int(np.count_nonzero(ts < MIN_EPOCH_S))
    if early:
        _LOG.warning(
            "%s: %d of %d rows are from before 1970; fine for training on history, but the daemon refuses "
            "live readings that old (outcome bad_timestamp)", path, early, ts.shape[0],
        )  # fmt: skip
    big = int(np.count_nonzero(np.abs(values) > DEFAULT_MAX_ABS_VALUE))
    if big:
        _LOG.warning(
            "%s: %d value(s) beyond +-%g, which the daemon refuses unless input.max_abs_value is raised "
            "(outcome non_finite)", path, big, DEFAULT_MAX_ABS_VALUE,
        )  # fmt: skip


def infer_cadence(timestamps: npt.NDArray[np.float64]) -> float:
    """The readings' cadence in seconds, as a sensor's configured period would be.

    The median spacing of jittered readings is only near the true cadence
    (60.6 s for 50 readings every 60 s +- 8 s; more with gaps), and a grid that
    is off drifts through the readings: after some ticks every reading lands in
    a neighbouring bucket, and a device would lose readings as late for as long
    as it runs.  So the median spacing is only a start.  From it and from the
    tenth percentile of the spacings (the one-tick spacings, when gaps are
    common):

    1. the median of the spacings within half of it either way;
    2. the period, within 10 % of that, on whose grid the first readings sit
       most tightly (:func:`_grid_fit`, a periodogram of their times);
    3. the slope of a least-squares line through the readings' (tick number,
       time), numbered on that grid within each stretch between long gaps (so a
       stray reading far from the rest, a device whose clock was unset, has no
       leverage), over the first 16, 32, 64, ... readings and then all of them
       (:func:`_refine_cadence`), with its standard error.

    Of these periods and the median spacing, those on whose grid all the
    readings sit as tightly as on the best one (within ``_FIT_TOLERANCE``)
    qualify, and the longest wins (readings on a grid of 60 s sit as tightly
    on one of 30 s; of estimates within 1 % of it, the one with the smallest
    standard error).  Its roundest rounding (whole seconds, tenths, hundredths,
    milliseconds) within three standard errors is the cadence: readings every
    60 s +- 8 s give 60 s, with or without gaps, exact readings every 59.95 s
    give 59.95 s.  Readings that sit on no grid at all (irregular events) keep
    the median spacing.
    """
    t = np.unique(timestamps)
    if t.shape[0] < 2:
        raise ConvertError("cannot infer a cadence from fewer than two distinct timestamps")
    gaps = np.diff(t)
    spacing = float(np.median(gaps))
    periods = {spacing: math.inf}  # period: its standard error (the median spacing is not rounded)
    for anchor in (spacing, float(np.quantile(gaps, 0.1))):
        near = gaps[(gaps > 0.5 * anchor) & (gaps < 1.5 * anchor)]
        start = float(np.median(near)) if near.size else anchor
        period, se = _refine_cadence(t, _best_period(t[:_PERIODOGRAM_READINGS], start))
        periods[period] = se
    fits = {c: _grid_fit(t, c) for c in periods if c > 0}
    best = max(fits.values())
    if best < min(0.9, 2.5 / math.sqrt(t.shape[0])):  # no grid: as tight as random times on the best of many
        return spacing
    good = [c for c, f in fits.items() if f >= best - _FIT_TOLERANCE]
    longest = max(good)
    chosen = min((c for c in good if c >= 0.99 * longest), key=lambda c: periods[c])  # the best-known of it
    # Within three standard errors, and never closer than the timestamps' own float resolution allows.
    se = periods[chosen]
    tolerance = (3 * se if math.isfinite(se) else 0.0) + _CADENCE_RESOLUTION  # no error known: no rounding
    return next((r for d in range(4) if abs((r := round(chosen, d)) - chosen) <= tolerance and r > 0), chosen)


# How much looser another period may fit the readings and still be taken if longer (mean resultant length, 0..1).
_FIT_TOLERANCE = 0.01
# Readings the period search of infer_cadence looks at (it costs ~8 * n^2 operations).
_PERIODOGRAM_READINGS = 256
# Spacings (in periods) that split the readings into stretches numbered on their own.
_STRETCH_GAP = 100
# Epoch seconds of today carry ~2e-7 s of float resolution; a fitted cadence is no finer than this.
_CADENCE_RESOLUTION = 1e-6


def _best_period(t: npt.NDArray[np.float64], start: float) -> float:
    """The period within 10 % of ``start`` whose grid the readings fit most tightly."""
    trial = start * np.linspace(0.9, 1.1, 8 * t.shape[0] + 1)
    return float(trial[int(np.argmax([_grid_fit(t, c) for c in trial]))])


def _refine_cadence(t: npt.NDArray[np.float64], cadence: float) -> tuple[float, float]:
    """The least-squares cadence of sorted readings and its standard error.

    The readings are numbered on a grid of ``cadence`` within each stretch between gaps of more than
    ``_STRETCH_GAP`` periods (each stretch its own intercept), over doubling prefixes of the readings.
    """
    n = t.shape[0]
    cuts = [0, *(np.flatnonzero(np.diff(t) > _STRETCH_GAP * cadence) + 1).tolist(), n]
    m = 8
    while True:
        m = min(2 * m, n)
        kcs, tcs = _stretches(t, cuts, m, cadence)
        den = sum(float(np.dot(k, k)) for k in kcs)
        if den > 0:
            slope = sum(float(np.dot(k, x)) for k, x in zip(kcs, tcs, strict=True)) / den
            if not slope > 0:
                return cadence, math.inf
            cadence = slope
        if m >= n:
            break
    kcs, tcs = _stretches(t, cuts, n, cadence)
    den = sum(float(np.dot(k, k)) for k in kcs)
    dof = sum(k.size for k in kcs) - len(kcs) - 1
    if den <= 0 or dof < 1:
        return cadence, math.inf
    resid = sum(float(np.sum((x - cadence * k) ** 2)) for k, x in zip(kcs, tcs, strict=True))
    return cadence, math.sqrt(resid / dof / den)


def _stretches(
    t: npt.NDArray[np.float64], cuts: list[int], m: int, cadence: float
) -> tuple[list[npt.NDArray[np.float64]], list[npt.NDArray[np.float64]]]:
    """Per stretch of the first ``m`` readings with 2 or more: tick numbers and times, both centred."""
    kcs, tcs = [], []
    for a, b in itertools.pairwise(cuts):
        seg = t[a : min(b, m)]
        if seg.shape[0] < 2:
            continue
        k = np.round((seg - seg[0]) / cadence)
        kcs.append(k - k.mean())
        tcs.append(seg - seg.mean())
    return kcs, tcs


def _mean_phase(t: npt.NDArray[np.float64], cadence: float) -> complex:
    """The mean of the readings' phases on a grid of ``cadence`` (from the epoch) as unit vectors: its angle is
    where in the cycle they sit, its length how tightly (1: all at one offset; near 0: all round the cycle)."""
    phase = 2 * np.pi * np.mod(t, cadence) / cadence
    return complex(float(np.mean(np.cos(phase))), float(np.mean(np.sin(phase))))


def _grid_fit(t: npt.NDArray[np.float64], cadence: float) -> float:
    """How tightly the readings sit on a grid of ``cadence`` (see :func:`_mean_phase`)."""
    return abs(_mean_phase(t, cadence))


def choose_policy(
    timestamps: npt.NDArray[np.float64],
    cadence_s: float | None = None,
    max_gap_ticks: int = 4,
    *,
    aggregate: Aggregate | None = None,
    align: Align | None = None,
    origin_s: float | None = None,
    lateness_s: float = 0.0,
) -> TickPolicy:
    """The tick policy for a log: what is given, and defaults that suit the data for the rest.

    A log with several readings per tick (median spacing at most half the
    cadence) gets ``mean`` over buckets that start on the UTC grid
    (``origin`` 0); a log with about one reading per tick gets ``first`` over
    buckets centred on the readings' own grid (the mean phase of their
    timestamps), so jitter never moves a reading to the next tick and a tick
    closes as soon as its reading arrives.
    """
    spacing = infer_cadence(timestamps)
    cadence = float(cadence_s) if cadence_s is not None else spacing
    if not (cadence > 0 and math.isfinite(cadence)):
        raise ConvertError(f"cadence must be a positive number of seconds, got {cadence}")
    if max_gap_ticks < 1:
        raise ConvertError("max_gap_ticks must be at least 1")
    sub = spacing <= cadence / 2
    agg = aggregate if aggregate is not None else (Aggregate.MEAN if sub else Aggregate.FIRST)
    al = align if align is not None else (Align.START if sub else Align.CENTER)
    if origin_s is None:
        if sub:
            origin_s = 0.0
        else:
            mean = _mean_phase(timestamps, cadence)
            angle = math.atan2(mean.imag, mean.real)
            origin_s = round((angle / (2 * np.pi)) * cadence % cadence, 3)
    try:
        return TickPolicy(cadence, origin_s, al, agg, lateness_s, max_gap_ticks)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def resample(raw: RawSeries, policy: TickPolicy) -> GridSeries:
    """Put the readings on their ticks with the daemon's tick policy; fill short gaps, split at long ones."""
    ok = np.all(np.isfinite(raw.values), axis=1)
    ts = raw.timestamps[ok]
    vals = raw.values[ok]
    n_missing = int((~ok).sum())
    if ts.shape[0] < 2:
        raise ConvertError(f"too few complete rows: {ts.shape[0]} of {raw.timestamps.shape[0]}")
    ticks, outcomes = ticks_of(policy, list(zip(ts.tolist(), vals.tolist(), strict=True)), len(raw.columns))
    counts = {o: 0 for o in Outcome}
    for o in outcomes:
        counts[o] += 1
    late = counts[Outcome.LATE] + counts[Outcome.DUPLICATE]
    if late > ts.shape[0] // 2:
        raise ConvertError(
            f"{late} of {ts.shape[0]} rows are older than a tick already closed or repeat a timestamp: the file "
            "must list each stream's readings in time order (oldest first)"
        )
    segments: list[Segment] = []
    run: list[int] = []

    def close() -> None:
        if run:
            segments.append(
                Segment(
                    np.asarray([ticks[i].ts for i in run], dtype=np.float64),
                    np.asarray([ticks[i].values for i in run], dtype=np.float64).reshape(len(run), len(raw.columns)),
                    np.asarray([ticks[i].observed for i in run], dtype=bool),
                )
            )

    for i, tick in enumerate(ticks):
        if tick.reset:
            close()
            run = []
        run.append(i)
    close()
    kept = [s for s in segments if len(s) >= 2]
    if len(kept) < len(segments):
        _LOG.info("dropped %d single-tick segment(s) between long gaps", len(segments) - len(kept))
    return GridSeries(
        segments=tuple(kept),
        columns=raw.columns,
        policy=policy,
        n_rows=int(raw.timestamps.shape[0]),
        n_missing=n_missing,
        n_filled=sum(1 for t in ticks if not t.observed),
        n_aggregated=counts[Outcome.AGGREGATED],
        n_late=counts[Outcome.LATE],
        n_duplicate=counts[Outcome.DUPLICATE],
    )


# More late or incomplete rows than this share of the file is worth a warning (they are dropped).
DROPPED_ROWS_WARN_SHARE = 0.05


def load(
    path: Path | str,
    time_col: str,
    columns: Sequence[str],
    cadence_s: float | None = None,
    max_gap_ticks: int = 4,
    *,
    policy: TickPolicy | None = None,
    aggregate: Aggregate | None = None,
    align: Align | None = None,
    origin_s: float | None = None,
    lateness_s: float = 0.0,
) -> GridSeries:
    """Read a CSV file and put it on its ticks: ``policy`` when given (a model's), else :func:`choose_policy`."""
    raw = read_csv(path, time_col, columns)
    if policy is None:  # rows with a missing value still tell the cadence
        policy = choose_policy(
            raw.timestamps, cadence_s, max_gap_ticks,
            aggregate=aggregate, align=align, origin_s=origin_s, lateness_s=lateness_s,
        )  # fmt: skip
    grid = resample(raw, policy)
    _LOG.info(
        "%s: %d rows (%d missing, %d aggregated, %d late, %d duplicate); ticks of %g s (%s, %s, origin %g s, "
        "lateness %g s); %d tick(s) filled, %d segment(s), %d ticks",
        path, grid.n_rows, grid.n_missing, grid.n_aggregated, grid.n_late, grid.n_duplicate, policy.cadence_s,
        policy.aggregate.value, policy.align.value, policy.origin_s, policy.lateness_s, grid.n_filled,
        len(grid.segments), grid.n_ticks,
    )  # fmt: skip
    lost = grid.n_late + grid.n_missing
    if grid.n_rows and lost > DROPPED_ROWS_WARN_SHARE * grid.n_rows:
        _LOG.warning(
            "%s: %d of %d rows (%.0f %%) are not in the ticks: %d late (a row after a later one, or a second "
            "reading in a tick that aggregate 'first' has closed: is the file in time order? would --cadence or "
            "--aggregate mean fit it?) and %d with an empty value",
            path, lost, grid.n_rows, 100 * lost / grid.n_rows, grid.n_late, grid.n_missing,
        )  # fmt: skip
    return grid
