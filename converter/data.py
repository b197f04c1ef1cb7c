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
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from converter.errors import ConvertError
from edge_lstm.outcomes import Outcome
from edge_lstm.ticks import Aggregate, Align, TickPolicy, ticks_of

_LOG = logging.getLogger(__name__)

_MISSING = frozenset({"", "nan", "na", "n/a", "null", "none"})
# Numbers above this are taken as epoch milliseconds (1e11 s is the year 5138).
_EPOCH_MS_THRESHOLD = 1e11


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


def parse_timestamp(text: str) -> float:
    """Epoch seconds from ISO 8601 (date or date-time; naive means UTC), epoch s or epoch ms."""
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
        return num / 1000.0 if abs(num) >= _EPOCH_MS_THRESHOLD else num
    try:
        stamp = dt.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise ValueError(f"timestamp {s!r} is neither ISO 8601 nor epoch seconds/milliseconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def _parse_value(text: str) -> float:
    s = text.strip()
    if s.lower() in _MISSING:
        return math.nan
    v = float(s)  # ValueError for text
    if math.isinf(v):
        raise ValueError("infinite")
    return v


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
            raise ConvertError(f"{p}: column(s) {', '.join(map(repr, missing))} not found (the file has {header})")
        ti = header.index(time_col)
        vi = [header.index(c) for c in columns]
        times: list[float] = []
        rows: list[list[float]] = []
        try:
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) < len(header):
                    row = row + [""] * (len(header) - len(row))
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
    if not times:
        raise ConvertError(f"{p}: no data rows")
    ts = np.asarray(times, dtype=np.float64)
    return RawSeries(timestamps=ts, values=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns)),
                     columns=tuple(columns))  # fmt: skip


def infer_cadence(timestamps: npt.NDArray[np.float64]) -> float:
    """The median spacing of the (distinct, sorted) timestamps, in seconds."""
    t = np.unique(timestamps)
    if t.shape[0] < 2:
        raise ConvertError("cannot infer a cadence from fewer than two distinct timestamps")
    return float(np.median(np.diff(t)))


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
            phase = 2 * np.pi * np.mod(timestamps, cadence) / cadence
            angle = math.atan2(float(np.mean(np.sin(phase))), float(np.mean(np.cos(phase))))
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
    return grid
