"""The tick policy: how a stream's readings become the model's ticks (pure, shared by converter and daemon).

A model steps once per *tick*: a bucket of ``cadence`` seconds on a fixed grid.
The same code turns readings into ticks when the converter prepares its
training data and when the daemon streams, so the two cannot disagree.

* **Grid.** Tick ``k`` is stamped ``origin + k * cadence`` (epoch seconds).  With
  ``align = start`` its bucket is ``[t_k, t_k + cadence)``; with ``align = center``
  it is ``[t_k - cadence/2, t_k + cadence/2)`` (readings near a grid point belong
  to that point's tick, whatever their jitter).
* **Aggregation.** ``mean`` or ``last`` (by event time) of the readings in a
  bucket; ``first``: the first reading of a bucket is the tick and closes it at
  once (no waiting; the policy of models written before ticks were explicit).
* **Closing.** A tick closes when a reading of the same stream arrives whose
  timestamp is at or beyond the bucket's end plus ``lateness`` (with ``first``,
  at its first reading).  Closing is a function of the readings' event times
  in arrival order only, never of a clock, so replaying the same readings
  rebuilds the same state.
* **Outcomes.** The reading that opens a tick is ``processed``; later readings of
  an open tick are ``aggregated``; a reading whose tick has closed is ``late``;
  one with the same timestamp as the stream's newest reading is ``duplicate``.
* **Gaps.** Between two closed ticks ``n`` ticks apart, ``n <= max_gap_ticks``
  fills the ``n - 1`` ticks in between by linear interpolation (not observed:
  stepped, never scored or published); a longer gap resets the stream.

``lateness`` is below one cadence, so at most two buckets of a stream are open at
a time (:data:`OPEN_SLOTS`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any

from edge_lstm.outcomes import Outcome

OPEN_SLOTS = 2  # buckets of one stream open at once (lateness < cadence)
MIN_CADENCE_S = 1e-3
MAX_CADENCE_S = 1e9  # ~32 years
# A gap is filled tick by tick, one model step each (~50 us): this many hold the daemon's loop ~0.5 s.
MAX_GAP_TICKS = 10_000
_NAN = math.nan


class Aggregate(str, enum.Enum):
    """How the readings that fall in one tick make its value."""

    MEAN = "mean"
    LAST = "last"
    FIRST = "first"


class Align(str, enum.Enum):
    """Where a tick's bucket lies around its timestamp."""

    START = "start"  # [t_k, t_k + cadence)
    CENTER = "center"  # [t_k - cadence/2, t_k + cadence/2)


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """One closed tick of one stream, as the model is stepped with it."""

    index: int  # k: the tick's timestamp is origin + k * cadence
    ts: float
    values: tuple[float, ...]
    previous: tuple[float, ...]  # values of the tick before (NaN after a reset or for a stream's first tick)
    observed: bool  # False for a tick filled by interpolation
    reset: bool  # the stream's state is reset before this tick (a gap longer than max_gap_ticks)


@dataclasses.dataclass(slots=True)
class StreamTicks:
    """One stream's tick state: the same fields as its row in the daemon's state table."""

    newest: float  # event time of the newest reading (NaN: none yet)
    last_tick: float  # index of the last closed tick (NaN: none since the last reset)
    prev: list[float]  # values of the last closed tick
    slot_tick: list[float]  # [OPEN_SLOTS] bucket index of each open bucket (NaN: slot free)
    slot_n: list[float]
    slot_sum: list[list[float]]
    slot_last: list[list[float]]
    slot_last_ts: list[float]

    @classmethod
    def empty(cls, n_values: int) -> StreamTicks:
        return cls(
            _NAN,
            _NAN,
            [_NAN] * n_values,
            [_NAN] * OPEN_SLOTS,
            [0.0] * OPEN_SLOTS,
            [[0.0] * n_values for _ in range(OPEN_SLOTS)],
            [[_NAN] * n_values for _ in range(OPEN_SLOTS)],
            [_NAN] * OPEN_SLOTS,
        )


@dataclasses.dataclass(frozen=True)
class TickPolicy:
    """How readings map onto ticks; stored in the model's manifest (``ticks``)."""

    cadence_s: float
    origin_s: float = 0.0
    align: Align = Align.START
    aggregate: Aggregate = Aggregate.MEAN
    lateness_s: float = 0.0
    max_gap_ticks: int = 4

    def __post_init__(self) -> None:
        if not MIN_CADENCE_S <= self.cadence_s <= MAX_CADENCE_S:  # NaN fails too
            raise ValueError(f"cadence must be {MIN_CADENCE_S:g}..{MAX_CADENCE_S:g} s, got {self.cadence_s}")
        if not math.isfinite(self.origin_s):
            raise ValueError("tick origin must be finite")
        if not (math.isfinite(self.lateness_s) and 0 <= self.lateness_s < self.cadence_s):
            raise ValueError(f"lateness must be at least 0 and below the cadence ({self.cadence_s:g} s)")
        if self.aggregate is Aggregate.FIRST and self.lateness_s:
            raise ValueError("aggregate 'first' closes a tick at its first reading: lateness must be 0")
        if not 1 <= self.max_gap_ticks <= MAX_GAP_TICKS:
            raise ValueError(f"max_gap_ticks must be 1..{MAX_GAP_TICKS}, got {self.max_gap_ticks}")
        # Normalise the origin into [0, cadence): same grid, smaller numbers.
        object.__setattr__(self, "origin_s", math.fmod(self.origin_s, self.cadence_s) % self.cadence_s)

    @classmethod
    def legacy(cls, cadence_s: float, max_gap_ticks: int = 4) -> TickPolicy:
        """The policy of a manifest without ``ticks``: one reading per tick, on a UTC grid, as models were trained."""
        return cls(cadence_s, 0.0, Align.CENTER, Aggregate.FIRST, 0.0, max_gap_ticks)

    # -- the grid -------------------------------------------------------------------------------

    @property
    def _start0(self) -> float:
        return self.origin_s - (0.5 * self.cadence_s if self.align is Align.CENTER else 0.0)

    def bucket(self, ts: float) -> int:
        """Index of the tick whose bucket holds ``ts``."""
        return math.floor((ts - self._start0) / self.cadence_s)

    def tick_time(self, k: float) -> float:
        return self.origin_s + k * self.cadence_s

    def tick_index(self, tick_ts: float) -> float:
        """The index of a tick from its timestamp (NaN stays NaN)."""
        return float(round((tick_ts - self.origin_s) / self.cadence_s)) if tick_ts == tick_ts else _NAN

    def closes_at(self, k: float) -> float:
        """Event time at or beyond which a reading closes tick ``k``."""
        return self._start0 + (k + 1) * self.cadence_s + self.lateness_s

    # -- one stream -----------------------------------------------------------------------------

    def push(self, s: StreamTicks, ts: float, values: Sequence[float]) -> tuple[Outcome, list[Tick]]:
        """Take one reading of a stream (in arrival order): its outcome and the ticks it closes, oldest first."""
        newest = s.newest
        if ts == newest:
            return Outcome.DUPLICATE, []
        k = self.bucket(ts)
        if self.aggregate is Aggregate.FIRST:
            if k <= s.last_tick:  # False while there is no closed tick (NaN)
                return Outcome.LATE, []
            if not ts < newest:
                s.newest = ts
            return Outcome.PROCESSED, self._close(s, k, tuple(values))
        if ts < newest and newest >= self.closes_at(k):
            return Outcome.LATE, []
        closed: list[Tick] = []
        if not ts < newest:
            s.newest = ts
            while True:  # close the open buckets this reading has passed, oldest first
                j = self._oldest_slot(s)
                if j < 0 or ts < self.closes_at(s.slot_tick[j]):
                    break
                closed += self._close(s, int(s.slot_tick[j]), self._value(s, j))
                self._free(s, j)
            if k <= s.last_tick:
                # Only after a reset can a closed tick index lie ahead of an open bucket; not reachable
                # otherwise, as a reading's own bucket closes after it.  Kept safe: count it late.
                return Outcome.LATE, closed
        j = self._slot_of(s, k)
        opened = s.slot_n[j] == 0.0
        if opened:
            s.slot_tick[j] = float(k)
        s.slot_n[j] += 1.0
        acc = s.slot_sum[j]
        for i, v in enumerate(values):
            acc[i] += v
        if not ts < s.slot_last_ts[j]:  # NaN: first reading of the slot
            s.slot_last[j] = list(values)
            s.slot_last_ts[j] = ts
        return (Outcome.PROCESSED if opened else Outcome.AGGREGATED), closed

    def flush(self, s: StreamTicks) -> list[Tick]:
        """Close every open bucket (the end of an offline series; the daemon never flushes)."""
        out: list[Tick] = []
        while (j := self._oldest_slot(s)) >= 0:
            out += self._close(s, int(s.slot_tick[j]), self._value(s, j))
            self._free(s, j)
        return out

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _oldest_slot(s: StreamTicks) -> int:
        best = -1
        for j in range(OPEN_SLOTS):
            t = s.slot_tick[j]
            if t == t and (best < 0 or t < s.slot_tick[best]):
                best = j
        return best

    @staticmethod
    def _slot_of(s: StreamTicks, k: int) -> int:
        free = -1
        for j in range(OPEN_SLOTS):
            if s.slot_tick[j] == k:
                return j
            if free < 0 and s.slot_tick[j] != s.slot_tick[j]:
                free = j
        if free < 0:  # pragma: no cover - lateness < cadence keeps at most OPEN_SLOTS buckets open
            raise AssertionError("no free tick slot")
        return free

    def _value(self, s: StreamTicks, j: int) -> tuple[float, ...]:
        if self.aggregate is Aggregate.MEAN:
            n = s.slot_n[j]
            return tuple(v / n for v in s.slot_sum[j])
        return tuple(s.slot_last[j])

    @staticmethod
    def _free(s: StreamTicks, j: int) -> None:
        s.slot_tick[j] = _NAN
        s.slot_n[j] = 0.0
        s.slot_sum[j] = [0.0] * len(s.slot_sum[j])
        s.slot_last[j] = [_NAN] * len(s.slot_last[j])
        s.slot_last_ts[j] = _NAN

    def _close(self, s: StreamTicks, k: int, values: tuple[float, ...]) -> list[Tick]:
        """Tick ``k`` closes with ``values``: the filled ticks before it (or a reset), then itself."""
        out: list[Tick] = []
        last = s.last_tick
        prev = tuple(s.prev)
        reset = False
        if last == last:
            n = k - int(last)
            if n > self.max_gap_ticks:
                reset = True
                prev = tuple(_NAN for _ in values)
            elif n > 1:
                start = s.prev
                for j in range(1, n):
                    w = j / n
                    v = tuple((1.0 - w) * a + w * b for a, b in zip(start, values, strict=True))
                    out.append(Tick(int(last) + j, self.tick_time(int(last) + j), v, prev, False, False))
                    prev = v
        out.append(Tick(k, self.tick_time(k), values, prev, True, reset))
        s.last_tick = float(k)
        s.prev = list(values)
        return out

    # -- manifest -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``ticks`` object (cadence and gap limit are top-level manifest fields)."""
        return {
            "origin_seconds": self.origin_s,
            "align": self.align.value,
            "aggregate": self.aggregate.value,
            "lateness_seconds": self.lateness_s,
        }

    @classmethod
    def from_manifest(cls, d: dict[str, Any], cadence_s: float, max_gap_ticks: int) -> TickPolicy:
        """The policy of a manifest: its ``ticks`` object, or :meth:`legacy` when it has none."""
        t = d.get("ticks")
        if t is None:
            return cls.legacy(cadence_s, max_gap_ticks)
        if not isinstance(t, dict):
            raise ValueError("'ticks' must be an object")
        unknown = set(t) - {"origin_seconds", "align", "aggregate", "lateness_seconds"}
        if unknown:
            raise ValueError(f"'ticks' has unknown field(s) {sorted(unknown)}")
        return cls(
            cadence_s,
            float(t.get("origin_seconds", 0.0)),
            Align(str(t.get("align", Align.START.value))),
            Aggregate(str(t.get("aggregate", Aggregate.MEAN.value))),
            float(t.get("lateness_seconds", 0.0)),
            max_gap_ticks,
        )


def ticks_of(
    policy: TickPolicy, readings: Sequence[tuple[float, Sequence[float]]], n_values: int
) -> tuple[list[Tick], list[Outcome]]:
    """Offline: one stream's readings (arrival order) to all its ticks, the open ones flushed at the end."""
    s = StreamTicks.empty(n_values)
    ticks: list[Tick] = []
    outcomes: list[Outcome] = []
    for ts, values in readings:
        outcome, closed = policy.push(s, ts, values)
        outcomes.append(outcome)
        ticks += closed
    ticks += policy.flush(s)
    return ticks, outcomes
