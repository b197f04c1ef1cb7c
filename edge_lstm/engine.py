"""One batch of readings in, forecasts and outcome counts out (pure, no I/O).

The engine applies the time policy (see ``docs/architecture.md``) and steps the
model once for the whole batch:

* a reading older than its stream's last one is ``out_of_order``, one with the
  same timestamp ``duplicate``; both are dropped;
* ``n = ticks_between(last, now)`` ticks after the last reading, with
  ``n <= max_gap_ticks``, the ``n - 1`` missing ticks are filled by linear
  interpolation (:func:`edge_lstm.features.fill_gap`, timestamps likewise) and
  the model steps through them first - batched across the streams that have
  gaps, so the common no-gap case stays a single model step;
* a longer gap resets the stream's state (reason ``gap``) and the reading
  starts it afresh.

One model step takes at most one reading per stream; a stream repeated in a
batch is stepped through its readings in order, in successive steps.  A batch
of one reading takes a scalar path with the same results (``_process_one``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from edge_lstm.intervals import anomaly_score, anomaly_scores
from edge_lstm.modelspec import Manifest
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import Reading
from edge_lstm.runtime import StepFunction
from edge_lstm.state import StateTable

_LOG = logging.getLogger(__name__)

IntArray = npt.NDArray[np.intp]


@dataclasses.dataclass
class Forecast:
    """The K forecasts made after one reading of one stream."""

    stream: str
    ts: float  # epoch seconds of the reading the forecast follows
    values: npt.NDArray[np.float64]  # [K], target units; values[k-1] is for ts + k * cadence
    warming_up: bool
    received: float  # time.monotonic() when the reading arrived
    model_id: str
    # How far the reading lay outside the previous tick's 1-step interval, in interval widths (0: inside);
    # None when it was not checked (no intervals, no on-time forecast to check against).
    anomaly_score: float | None = None


@dataclasses.dataclass
class BatchResult:
    """Everything one call of :meth:`Engine.process` produced."""

    forecasts: list[Forecast]
    outcomes: Counter[Outcome]  # one count per reading in the batch
    resets: Counter[str]  # state resets by reason ("gap", "model_change", ...)
    abs_errors: list[tuple[str, float]]  # (stream, |1-step forecast - actual|) in target units
    evictions: int
    inference_seconds: float
    batch_size: int  # readings that went through the model (filled ticks not counted)
    model_steps: int = 0  # model invocations (1 per batch unless gaps were filled or a stream repeats)
    step_sizes: list[int] = dataclasses.field(default_factory=list)  # readings per model step (not filled ticks)
    anomaly_checks: int = 0  # readings checked against the previous tick's 1-step interval
    anomalies: Counter[str] = dataclasses.field(default_factory=Counter)  # outside it: "high" / "low"


def _empty_result() -> BatchResult:
    return BatchResult([], Counter(), Counter(), [], 0, 0.0, 0, 0)


def _waves(readings: Sequence[Reading], size: int) -> list[list[Reading]]:
    """Split readings into groups with distinct streams (and at most ``size``), keeping order per stream."""
    seen: Counter[str] = Counter()
    waves: list[list[Reading]] = []
    for r in readings:
        k = seen[r.stream]
        seen[r.stream] += 1
        if k == len(waves):
            waves.append([])
        waves[k].append(r)
    return [w[i : i + size] for w in waves for i in range(0, len(w), size)]


class Engine:
    """Turns batches of readings into forecasts, keeping per-stream state in a :class:`StateTable`.

    ``max_gap_ticks`` overrides the manifest's gap limit when given; ``clock``
    times the model steps (default :func:`time.perf_counter`).
    """

    def __init__(
        self,
        model: StepFunction,
        table: StateTable,
        max_gap_ticks: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._check_table(model.manifest, table)
        self.model = model
        self.table = table
        self._gap_override = max_gap_ticks
        self._clock = clock
        self._pending_resets: Counter[str] = Counter()
        self.row_path = True  # a batch of one reading takes _process_one (tests turn it off to compare)
        self._configure(model.manifest)

    @staticmethod
    def _check_table(manifest: Manifest, table: StateTable) -> None:
        if table.layers != manifest.layers or table.n_values != len(manifest.pipeline.columns):
            raise ValueError(
                f"state table layout (layers {table.layers}, {table.n_values} values) does not fit the model "
                f"(layers {manifest.layers}, {len(manifest.pipeline.columns)} values)"
            )

    def _configure(self, m: Manifest) -> None:
        self.manifest = m
        self.max_gap_ticks = m.max_gap_ticks if self._gap_override is None else int(self._gap_override)
        if self.max_gap_ticks < 1:
            raise ValueError(f"max_gap_ticks must be at least 1, got {self.max_gap_ticks}")
        self._pipeline = m.pipeline
        self._cadence = m.cadence_s
        self._target = m.pipeline.target_index
        self._warmup = m.warmup_ticks
        self._model_id = m.model_id
        self._check = m.intervals.check_offsets if m.intervals is not None else None

    # -- public ---------------------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> BatchResult:
        """Step the model for a batch of readings (normally one per stream)."""
        result = _empty_result()
        if self._pending_resets:
            result.resets.update(self._pending_resets)
            self._pending_resets.clear()
        if not readings:
            return result
        if len(readings) <= self.table.capacity and len({r.stream for r in readings}) == len(readings):
            self._process_group(readings, result)
        else:
            for wave in _waves(readings, self.table.capacity):
                self._process_group(wave, result)
        return result

    def replace_model(self, model: StepFunction) -> bool:
        """Switch to another model; keep the state when layer sizes and columns match.

        Otherwise every stream is reset (counted as ``model_change`` in the next
        batch result).  Returns True when the state was kept.
        """
        old, new = self.model.manifest, model.manifest
        keep = old.layers == new.layers and old.pipeline.columns == new.pipeline.columns
        if keep:
            self.model = model
            self._configure(new)
            return True
        arrays = self.table.to_arrays()
        order = np.argsort(arrays["last_seen"], kind="stable").tolist()
        streams = [str(arrays["streams"][i]) for i in order]
        table = StateTable(new.layers, len(new.pipeline.columns), self.table.capacity)
        for s in streams:  # least recently seen first keeps the eviction order
            table.rows_for([s])
        self.table = table
        self.model = model
        self._configure(new)
        if streams:
            self._pending_resets["model_change"] += len(streams)
        _LOG.info(
            "model changed to %s: state of %d stream(s) reset (layers or columns differ)", new.model_id, len(streams)
        )
        return False

    # -- internals ------------------------------------------------------------------------------

    def _step(
        self, rows: IntArray | slice, x: npt.NDArray[np.float32], result: BatchResult
    ) -> npt.NDArray[np.float32]:
        t = self.table
        state = t.gather(rows)
        t0 = self._clock()
        y, new_state = self.model.step(x, state)
        result.inference_seconds += self._clock() - t0
        result.model_steps += 1
        t.scatter(rows, new_state)
        return y

    def _process_group(self, readings: Sequence[Reading], result: BatchResult) -> None:
        if len(readings) == 1 and self.row_path:
            self._process_one(readings[0], result)
        else:
            self._process_distinct(readings, result)

    def _process_one(self, reading: Reading, result: BatchResult) -> None:
        """:meth:`_process_distinct` for a single reading, on Python scalars (a batch of one is common).

        Same policy, same arithmetic, same results (``tests/test_engine.py``
        runs random sequences through both); numpy is used for the model step and the forecasts only.
        """
        t = self.table
        stream, ts = reading.stream, reading.ts
        row = t.row(stream)
        if row is not None:
            last = float(t.last_ts[row])
            if ts <= last:  # False when there is no last reading (NaN)
                result.outcomes[Outcome.OUT_OF_ORDER if ts < last else Outcome.DUPLICATE] += 1
                return
        rows, evicted = t.rows_for([stream])
        result.evictions += evicted
        row = int(rows[0])
        last = float(t.last_ts[row])
        n_ticks = 1
        if not math.isnan(last):
            elapsed = round((ts - last) / self._cadence)  # half to even, as np.rint
            if elapsed > 1:
                n_ticks = min(elapsed, self.max_gap_ticks + 1)
                if n_ticks > self.max_gap_ticks:
                    t.reset(rows)
                    result.resets["gap"] += 1
                    n_ticks = 1

        values = reading.values
        actual = values[self._target]
        pending = float(t.pending_value[row])
        score: float | None = None
        if n_ticks == 1 and not math.isnan(pending):
            result.abs_errors.append((stream, abs(pending - actual)))
            if self._check is not None:
                upper = pending + self._check[1]
                score = anomaly_score(actual, pending + self._check[0], upper)
                result.anomaly_checks += 1
                if score > 0:
                    result.anomalies["high" if actual > upper else "low"] += 1
        if n_ticks > 1:
            v = np.array([values], dtype=np.float64)
            self._fill_gaps(rows, np.array([n_ticks - 1]), v, np.array([ts]), np.array([last]), result)

        x = self._pipeline.encode_row(values, t.prev[row].tolist(), ts)
        y = self._step(slice(row, row + 1), x, result)
        fc = self._pipeline.decode(y, [actual])[0]
        t.prev[row] = values
        t.last_ts[row] = ts
        ticks = int(t.ticks[row]) + 1
        t.ticks[row] = ticks
        warming = ticks < self._warmup
        t.pending_value[row] = math.nan if warming else fc[0]
        t.pending_ts[row] = ts + self._cadence
        result.forecasts.append(Forecast(stream, reading.ts, fc, warming, reading.received, self._model_id, score))
        result.outcomes[Outcome.PROCESSED] += 1
        result.batch_size += 1
        result.step_sizes.append(1)

    def _process_distinct(self, readings: Sequence[Reading], result: BatchResult) -> None:
        t = self.table
        n = len(readings)
        streams = [r.stream for r in readings]
        ts = np.fromiter([r.ts for r in readings], dtype=np.float64, count=n)
        values = np.array([r.values for r in readings], dtype=np.float64).reshape(n, t.n_values)

        # Out-of-order and duplicate readings of known streams are dropped (before rows_for, which
        # would mark their streams as seen).
        found = list(map(t.row, streams))
        if None in found:
            idx = np.fromiter([i for i, r in enumerate(found) if r is not None], dtype=np.intp)
            known_rows = np.fromiter([r for r in found if r is not None], dtype=np.intp, count=len(idx))
        else:
            idx = None
            known_rows = np.fromiter(found, dtype=np.intp, count=n)  # type: ignore[arg-type]
        if len(known_rows):
            known_ts = ts if idx is None else ts[idx]
            stale = known_ts <= t.last_ts[known_rows]  # False where there is no last reading (NaN)
            if stale.any():
                late = int((known_ts[stale] < t.last_ts[known_rows[stale]]).sum())
                result.outcomes[Outcome.OUT_OF_ORDER] += late
                result.outcomes[Outcome.DUPLICATE] += int(stale.sum()) - late
                keep = np.ones(n, dtype=bool)
                keep[np.flatnonzero(stale) if idx is None else idx[stale]] = False
                sel = np.flatnonzero(keep)
                readings = [readings[i] for i in sel.tolist()]
                streams = [streams[i] for i in sel.tolist()]
                ts, values = ts[sel], values[sel]
                n = len(readings)
                if n == 0:
                    return

        rows, evicted = t.rows_for(streams)
        result.evictions += evicted
        last_ts = t.last_ts[rows]
        elapsed = np.rint((ts - last_ts) / self._cadence)  # NaN for a stream's first reading
        single = True  # every reading is one tick after its stream's last (or its first)
        if (elapsed > 1).any():
            single = False
            has_prev = ~np.isnan(last_ts)
            n_ticks = np.ones(n, dtype=np.int64)
            n_ticks[has_prev] = np.clip(elapsed[has_prev], 1, self.max_gap_ticks + 1).astype(np.int64)
            too_long = has_prev & (n_ticks > self.max_gap_ticks)
            if too_long.any():
                t.reset(rows[too_long])
                result.resets["gap"] += int(too_long.sum())
                n_ticks[too_long] = 1

        # 1-step errors: the pending forecast of a stream whose last reading was one tick ago.
        # (pending_value is NaN for a reset or new stream and while warming up.)
        actual = values[:, self._target]
        pending = t.pending_value[rows]
        on_time = ~np.isnan(pending) if single else ~np.isnan(pending) & (n_ticks == 1)
        scores: list[float | None] | None = None
        if on_time.any():
            scored = np.flatnonzero(on_time)
            errs = np.abs(pending[scored] - actual[scored]).tolist()
            result.abs_errors.extend(zip([streams[i] for i in scored.tolist()], errs, strict=True))
            if self._check is not None:
                p, a = pending[scored], actual[scored]
                upper = p + self._check[1]
                sc = anomaly_scores(a, p + self._check[0], upper)
                scores = [None] * n
                for i, v in zip(scored.tolist(), sc.tolist(), strict=True):
                    scores[i] = v
                out = sc > 0
                result.anomaly_checks += len(scored)
                high = int((out & (a > upper)).sum())
                if high:
                    result.anomalies["high"] += high
                if int(out.sum()) - high:
                    result.anomalies["low"] += int(out.sum()) - high

        if not single:
            fills = n_ticks - 1
            if fills.any():
                self._fill_gaps(rows, fills, values, ts, last_ts, result)

        # The real readings: one batched step.
        x = self._pipeline.encode(values, t.prev[rows], ts)
        y = self._step(rows, x, result)
        fc = self._pipeline.decode(y, actual)
        t.prev[rows] = values
        t.last_ts[rows] = ts
        ticks = t.ticks[rows] + 1
        t.ticks[rows] = ticks
        warming = ticks < self._warmup
        t.pending_value[rows] = np.where(warming, np.nan, fc[:, 0])
        t.pending_ts[rows] = ts + self._cadence

        model_id = self._model_id
        warm_list = warming.tolist()
        if scores is None:
            result.forecasts.extend(
                Forecast(r.stream, r.ts, fc[i], warm_list[i], r.received, model_id) for i, r in enumerate(readings)
            )
        else:
            result.forecasts.extend(
                Forecast(r.stream, r.ts, fc[i], warm_list[i], r.received, model_id, scores[i])
                for i, r in enumerate(readings)
            )
        result.outcomes[Outcome.PROCESSED] += n
        result.batch_size += n
        result.step_sizes.append(n)

    def _fill_gaps(
        self,
        rows: IntArray,
        fills: npt.NDArray[np.int64],
        values: npt.NDArray[np.float64],
        ts: npt.NDArray[np.float64],
        last_ts: npt.NDArray[np.float64],
        result: BatchResult,
    ) -> None:
        """Step the streams with gaps through their interpolated ticks (one batched step per depth)."""
        t = self.table
        n_ticks = fills + 1
        start_values = t.prev[rows]
        for j in range(1, int(fills.max()) + 1):
            sub = np.flatnonzero(fills >= j)
            r = rows[sub]
            nt = n_ticks[sub].astype(np.float64)
            # Same arithmetic as features.fill_gap and the converter's filled timestamps.
            w = (np.float64(j) / nt)[:, None]
            v = (1.0 - w) * start_values[sub] + w * values[sub]
            tj = last_ts[sub] + (ts[sub] - last_ts[sub]) * np.float64(j) / nt
            x = self._pipeline.encode(v, t.prev[r], tj)
            self._step(r, x, result)
            t.prev[r] = v
            t.ticks[r] += 1
