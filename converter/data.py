"""CSV loading, cadence inference and resampling onto a regular tick grid.

Pure numpy and the stdlib ``csv`` module: no TensorFlow here, so bad input is
rejected in a second, before any training starts.

Policy for holes (the daemon applies the same rules live):

* A row whose timestamp or any used value is empty or NaN is a *missing*
  reading; it is dropped.  (The daemon rejects such a reading and never steps
  the model with it.)
* Between two consecutive readings ``n = ticks_between(t_prev, t_now)`` ticks
  apart: ``n <= max_gap_ticks`` fills the ``n - 1`` ticks in between with
  :func:`edge_lstm.features.fill_gap` (linear interpolation); a longer gap ends
  the segment and the next reading starts a new one (the daemon resets the
  stream's state).
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
from edge_lstm.features import fill_gap, ticks_between

_LOG = logging.getLogger(__name__)

_MISSING = frozenset({"", "nan", "na", "n/a", "null", "none"})
# Numbers above this are taken as epoch milliseconds (1e11 s is the year 5138).
_EPOCH_MS_THRESHOLD = 1e11


@dataclasses.dataclass(frozen=True)
class RawSeries:
    """The rows of a CSV file as parsed: epoch seconds and float values (NaN = missing)."""

    timestamps: npt.NDArray[np.float64]  # [N], strictly increasing
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
    """A series resampled onto its cadence grid, as segments."""

    segments: tuple[Segment, ...]
    columns: tuple[str, ...]
    cadence_s: float
    max_gap_ticks: int
    n_rows: int  # rows in the file
    n_missing: int  # rows dropped for an empty/NaN cell
    n_filled: int  # ticks interpolated

    @property
    def n_ticks(self) -> int:
        return sum(len(s) for s in self.segments)


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
    d = np.diff(ts)
    if d.size and np.any(d == 0):
        k = int(np.argmax(d == 0))
        raise ConvertError(f"{p}: duplicate timestamp at data rows {k + 1} and {k + 2} ({_iso(ts[k])})")
    if d.size and np.any(d < 0):
        k = int(np.argmax(d < 0))
        raise ConvertError(
            f"{p}: timestamps are not sorted: data row {k + 2} ({_iso(ts[k + 1])}) comes before row {k + 1} "
            f"({_iso(ts[k])})"
        )
    return RawSeries(timestamps=ts, values=np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns)),
                     columns=tuple(columns))  # fmt: skip


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def infer_cadence(timestamps: npt.NDArray[np.float64]) -> float:
    """The median spacing of the timestamps, in seconds."""
    if timestamps.shape[0] < 2:
        raise ConvertError("cannot infer a cadence from fewer than two timestamps")
    return float(np.median(np.diff(timestamps)))


def resample(raw: RawSeries, cadence_s: float | None = None, max_gap_ticks: int = 4) -> GridSeries:
    """Put the readings on the cadence grid, fill short gaps, split at long ones."""
    if max_gap_ticks < 1:
        raise ConvertError("max_gap_ticks must be at least 1")
    ok = np.all(np.isfinite(raw.values), axis=1)
    ts = raw.timestamps[ok]
    vals = raw.values[ok]
    n_missing = int((~ok).sum())
    if ts.shape[0] < 2:
        raise ConvertError(f"too few complete rows: {ts.shape[0]} of {raw.timestamps.shape[0]}")
    # Rows with a missing value still tell the cadence.
    cadence = float(cadence_s) if cadence_s is not None else infer_cadence(raw.timestamps)
    if not (cadence > 0 and math.isfinite(cadence)):
        raise ConvertError(f"cadence must be a positive number of seconds, got {cadence}")
    segments: list[Segment] = []
    n_filled = 0
    seg_t: list[npt.NDArray[np.float64]] = [ts[:1]]
    seg_v: list[npt.NDArray[np.float64]] = [vals[:1]]
    seg_o: list[npt.NDArray[np.bool_]] = [np.ones(1, dtype=bool)]

    def close() -> None:
        segments.append(Segment(np.concatenate(seg_t), np.concatenate(seg_v), np.concatenate(seg_o)))

    for k in range(1, ts.shape[0]):
        if ts[k] - ts[k - 1] < 0.5 * cadence:
            raise ConvertError(
                f"readings at {_iso(ts[k - 1])} and {_iso(ts[k])} fall on the same tick at a cadence of "
                f"{cadence:g} s (pass a smaller --cadence)"
            )
        n = ticks_between(float(ts[k - 1]), float(ts[k]), cadence)
        if n > max_gap_ticks:
            close()
            seg_t, seg_v, seg_o = [], [], []
        elif n > 1:
            # Filled ticks get evenly spaced timestamps between the two real readings.
            seg_t.append(ts[k - 1] + (ts[k] - ts[k - 1]) * np.arange(1, n, dtype=np.float64) / n)
            seg_v.append(fill_gap(vals[k - 1], vals[k], n))
            seg_o.append(np.zeros(n - 1, dtype=bool))
            n_filled += n - 1
        seg_t.append(ts[k : k + 1])
        seg_v.append(vals[k : k + 1])
        seg_o.append(np.ones(1, dtype=bool))
    close()
    kept = [s for s in segments if len(s) >= 2]
    if len(kept) < len(segments):
        _LOG.info("dropped %d single-reading segment(s) between long gaps", len(segments) - len(kept))
    return GridSeries(
        segments=tuple(kept),
        columns=raw.columns,
        cadence_s=cadence,
        max_gap_ticks=max_gap_ticks,
        n_rows=int(raw.timestamps.shape[0]),
        n_missing=n_missing,
        n_filled=n_filled,
    )


def load(
    path: Path | str,
    time_col: str,
    columns: Sequence[str],
    cadence_s: float | None = None,
    max_gap_ticks: int = 4,
) -> GridSeries:
    """Read a CSV file and resample it onto its cadence grid."""
    raw = read_csv(path, time_col, columns)
    grid = resample(raw, cadence_s, max_gap_ticks)
    _LOG.info(
        "%s: %d rows, %d missing, cadence %g s, %d tick(s) filled, %d segment(s), %d ticks",
        path, grid.n_rows, grid.n_missing, grid.cadence_s, grid.n_filled, len(grid.segments), grid.n_ticks,
    )  # fmt: skip
    return grid
