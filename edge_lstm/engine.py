"""One batch of readings in, forecasts and outcome counts out (pure, no I/O).

The engine applies the tick policy of :mod:`edge_lstm.ticks` (the converter
applies the very same code to its training data): every reading is merged into
its stream's open tick, counted ``processed`` (it opened the tick),
``aggregated``, ``late`` or ``duplicate``; the ticks it closes - with the
interpolated ticks of a short gap before them, or a reset after a long one -
step the model, one step per tick.  Each closed (observed) tick yields exactly
one forecast; a reading whose tick is still open yields none.

Ticks of different streams are stepped together: the ``j``-th tick closed by a
batch for every stream goes into the ``j``-th model step, so the common case -
each stream closing at most one tick - is one model step for the batch.  All
per-stream tick state lives in the :class:`StateTable`; nothing depends on a
clock, so replaying the same readings rebuilds the same state.
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

from edge_lstm.features import (
    record_history,
    seasonal_changes_from_history,
    seasonal_changes_row,
    seasonal_from_history,
)
from edge_lstm.intervals import anomaly_score, anomaly_scores
from edge_lstm.modelspec import Manifest
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import Reading
from edge_lstm.runtime import StepFunction
from edge_lstm.state import StateTable
from edge_lstm.ticks import Tick, TickPolicy

_LOG = logging.getLogger(__name__)

IntArray = npt.NDArray[np.intp]


@dataclasses.dataclass
class Forecast:
    """The K forecasts made at one closed tick of one stream."""

    stream: str
    ts: float  # epoch seconds of the tick the forecast follows
    values: npt.NDArray[np.float64]  # [K], target units; values[k-1] is for ts + k * cadence
    warming_up: bool
    received: float  # time.monotonic() when the reading that closed the tick arrived
    model_id: str
    # How far the tick's value lay outside the previous tick's 1-step interval, in interval widths (0: inside);
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
    batch_size: int  # closed ticks that went through the model (filled ticks not counted)
    model_steps: int = 0  # model invocations (1 per batch unless gaps were filled or a stream closed several)
    step_sizes: list[int] = dataclasses.field(default_factory=list)  # closed ticks per model step (not filled)
    anomaly_checks: int = 0  # closed ticks checked against the previous tick's 1-step interval
    anomalies: Counter[str] = dataclasses.field(default_factory=Counter)  # outside it: "high" / "low"


def _empty_result() -> BatchResult:
    return BatchResult([], Counter(), Counter(), [], 0, 0.0, 0, 0)


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
        self.row_path = True  # a model step of one tick encodes on Python floats (tests turn it off to compare)
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
        policy = m.ticks
        if self._gap_override is not None:
            if int(self._gap_override) < 1:
                raise ValueError(f"max_gap_ticks must be at least 1, got {self._gap_override}")
            policy = dataclasses.replace(policy, max_gap_ticks=int(self._gap_override))
        self.policy: TickPolicy = policy
        self.max_gap_ticks = policy.max_gap_ticks
        self._pipeline = m.pipeline
        self._cadence = m.cadence_s
        self._target = m.pipeline.target_index
        self._warmup = m.warmup_ticks
        self._model_id = m.model_id
        self._check = m.intervals.check_offsets if m.intervals is not None else None
        # A model that blends in a seasonal forecast or has seasonal inputs needs each stream's recent
        # targets (history_ticks).
        self._history = m.pipeline.history_ticks
        self._blend = m.pipeline.output.seasonal
        self._season_inputs = bool(m.pipeline.seasonal_inputs)
        self.table.ensure_history(self._history)

    # -- public ---------------------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> BatchResult:
        """Take a batch of readings (arrival order); step the model for the ticks they close."""
        result = _empty_result()
        if self._pending_resets:
            result.resets.update(self._pending_resets)
            self._pending_resets.clear()
        cap = self.table.capacity
        start = 0
        while start < len(readings):
            # A chunk holds at most `capacity` distinct streams (all need a row at once).
            seen: set[str] = set()
            stop = start
            while stop < len(readings) and (readings[stop].stream in seen or len(seen) < cap):
                seen.add(readings[stop].stream)
                stop += 1
            self._process_chunk(readings[start:stop], result)
            start = stop
        return result

    def replace_model(self, model: StepFunction) -> bool:
        """Switch to another model; keep the state when layer sizes, columns and tick policy match.

        Otherwise every stream is reset (counted as ``model_change`` in the next
        batch result).  Returns True when the state was kept.
        """
        old, new = self.model.manifest, model.manifest
        keep = old.layers == new.layers and old.pipeline.columns == new.pipeline.columns and old.ticks == new.ticks
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
            "model changed to %s: state of %d stream(s) reset (layers, columns or ticks differ)",
            new.model_id, len(streams),
        )  # fmt: skip
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

    def _process_chunk(self, readings: Sequence[Reading], result: BatchResult) -> None:
        """Readings of at most ``capacity`` streams: tick policy per stream, then the model steps."""
        t = self.table
        policy = self.policy
        by_stream: dict[str, list[Reading]] = {}
        for r in readings:
            by_stream.setdefault(r.stream, []).append(r)
        streams = list(by_stream)
        rows, evicted = t.rows_for(streams)
        result.evictions += evicted
        row_list = rows.tolist()
        outcomes = result.outcomes
        closed: list[list[tuple[Tick, float]]] = []
        for stream, row in zip(streams, row_list, strict=True):
            s = t.load_ticks(row, policy)
            mine: list[tuple[Tick, float]] = []
            for r in by_stream[stream]:
                outcome, ticks = policy.push(s, r.ts, r.values)
                outcomes[outcome] += 1
                mine += [(tick, r.received) for tick in ticks]
            t.store_ticks(row, s, policy)
            closed.append(mine)
        depth = max(map(len, closed), default=0)
        for j in range(depth):
            wave = [i for i, mine in enumerate(closed) if len(mine) > j]
            self._step_ticks([streams[i] for i in wave], rows[wave], [closed[i][j] for i in wave], result)

    def _step_ticks(
        self, streams: list[str], rows: IntArray, ticks: list[tuple[Tick, float]], result: BatchResult
    ) -> None:
        """One model step for one tick of each of these (distinct) streams."""
        t = self.table
        n = len(ticks)
        resets = [i for i, (tick, _) in enumerate(ticks) if tick.reset]
        if resets:
            r = rows[resets]
            for a in t.state:
                a[r] = 0.0
            t.ticks[r] = 0
            t.pending_value[r] = np.nan
            result.resets["gap"] += len(resets)
        if n == 1 and self.row_path:
            self._step_one(streams[0], int(rows[0]), ticks[0][0], ticks[0][1], result)
            return
        values = np.array([tk.values for tk, _ in ticks], dtype=np.float64)
        previous = np.array([tk.previous for tk, _ in ticks], dtype=np.float64)
        ts = np.array([tk.ts for tk, _ in ticks], dtype=np.float64)
        changes = None
        if self._season_inputs:
            now = t.ticks[rows]
            changes = seasonal_changes_from_history(t.history, rows, now, values[:, self._target], self._pipeline)
        x = self._pipeline.encode(values, previous, ts, changes)
        y = self._step(rows, x, result)
        t.ticks[rows] += 1
        if self._history:  # every tick, filled ones too, as the converter's series holds them
            record_history(t.history, rows, t.ticks[rows] - 1, [tk.values[self._target] for tk, _ in ticks])
        observed = [i for i, (tick, _) in enumerate(ticks) if tick.observed]
        if len(observed) < n:
            t.pending_value[rows[[i for i in range(n) if not ticks[i][0].observed]]] = np.nan
        if not observed:
            return
        target = self._target
        obs_rows = rows[observed]
        actual = np.array([ticks[i][0].values[target] for i in observed], dtype=np.float64)
        seasonal = None
        if self._blend:
            seasonal = seasonal_from_history(t.history, obs_rows, t.ticks[obs_rows] - 1, self._pipeline.output)
        fc = self._pipeline.decode(y[observed], actual, seasonal)
        # 1-step errors: the pending forecast of a stream whose previous tick was observed and one tick ago
        # (pending_value is NaN after a filled tick, a reset, for a new stream and while warming up).
        pending = t.pending_value[obs_rows]
        scored = np.flatnonzero(~np.isnan(pending))
        scores: list[float | None] = [None] * len(observed)
        if len(scored):
            errs = np.abs(pending[scored] - actual[scored]).tolist()
            result.abs_errors.extend(zip([streams[observed[i]] for i in scored.tolist()], errs, strict=True))
            if self._check is not None:
                pv, av = pending[scored], actual[scored]
                upper = pv + self._check[1]
                sc = anomaly_scores(av, pv + self._check[0], upper)
                for i, v in zip(scored.tolist(), sc.tolist(), strict=True):
                    scores[i] = v
                out = sc > 0
                result.anomaly_checks += len(scored)
                high = int((out & (av > upper)).sum())
                if high:
                    result.anomalies["high"] += high
                if int(out.sum()) - high:
                    result.anomalies["low"] += int(out.sum()) - high
        warming = t.ticks[obs_rows] < self._warmup
        t.pending_value[obs_rows] = np.where(warming, np.nan, fc[:, 0])
        t.pending_ts[obs_rows] = np.array([ticks[i][0].ts for i in observed]) + self._cadence
        model_id = self._model_id
        warm_list = warming.tolist()
        result.forecasts.extend(
            Forecast(streams[i], ticks[i][0].ts, fc[k], warm_list[k], ticks[i][1], model_id, scores[k])
            for k, i in enumerate(observed)
        )
        result.batch_size += len(observed)
        result.step_sizes.append(len(observed))

    def _step_one(self, stream: str, row: int, tick: Tick, received: float, result: BatchResult) -> None:
        """:meth:`_step_ticks` for a single tick (a reset already applied), on scalars and 1-D arrays.

        The same arithmetic in the same order, so the same numbers bit for bit (the
        engine tests compare both paths); a stream's run of ticks, and every tick at
        low load, goes this way, where the batch path's small-array overhead is most
        of a reading's cost.
        """
        t = self.table
        ticks = t.ticks
        target = tick.values[self._target]
        changes = None
        if self._season_inputs:
            changes = seasonal_changes_row(t.history[row], int(ticks[row]), target, self._pipeline)
        x = self._pipeline.encode_row(tick.values, tick.previous, tick.ts, changes)
        y = self._step(slice(row, row + 1), x, result)
        ticks[row] += 1
        index = int(ticks[row]) - 1
        if self._history:
            t.history[row, index % self._history] = target  # record_history of one tick
        if not tick.observed:
            t.pending_value[row] = math.nan
            return
        seasonal = None
        if self._blend:
            seasonal = seasonal_from_history(t.history, row, index, self._pipeline.output)
        fc = self._pipeline.decode(y[0], target, seasonal)
        pending = float(t.pending_value[row])
        score: float | None = None
        if not math.isnan(pending):
            result.abs_errors.append((stream, abs(pending - target)))
            if self._check is not None:
                upper = pending + self._check[1]
                score = anomaly_score(target, pending + self._check[0], upper)
                result.anomaly_checks += 1
                if score > 0:
                    result.anomalies["high" if target > upper else "low"] += 1
        warming = index + 1 < self._warmup
        first = float(fc[0])
        t.pending_value[row] = math.nan if warming else first
        t.pending_ts[row] = tick.ts + self._cadence
        result.forecasts.append(Forecast(stream, tick.ts, fc, warming, received, self._model_id, score))
        result.batch_size += 1
        result.step_sizes.append(1)
