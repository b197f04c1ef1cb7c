"""Per-stream model state in one table of numpy arrays (pure).

Every stream owns one row: its LSTM state (``h_l``, ``c_l`` for every layer),
its previous raw values, its last timestamp, the ticks it has seen since its
last reset, when it was last seen (for eviction) and the pending 1-step
forecast (for the online error).  Batching is fancy indexing with an array of
row numbers, so a batch of any size costs a few numpy operations, and the only
per-stream Python object is the dictionary entry from stream id to row.

The arrays grow by doubling up to ``capacity`` rows; when the table is full, a
new stream takes the row of the least recently seen one (an eviction).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from edge_lstm.modelspec import state_names
from edge_lstm.ticks import OPEN_SLOTS, StreamTicks, TickPolicy

_LOG = logging.getLogger(__name__)

IntArray = npt.NDArray[np.intp]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

_INITIAL_ROWS = 1024


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    numpy's arrays and the bursts of Python objects a busy loop makes come
    from the C heap; glibc keeps what they free for reuse, so without this the
    resident size after growing the table or a burst of new streams stays at
    its high-water mark.  Costs well under a millisecond on the daemon's heap.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_PER_ROW_FIELDS = ("prev", "last_ts", "ticks", "last_seen", "pending_value", "pending_ts")
# The open ticks: (name, trailing shape (V = values), fill).  A checkpoint written before they existed
# restores with no tick open and its last reading's time as the newest.
_TICK_FIELDS: tuple[tuple[str, tuple[str | int, ...], float], ...] = (
    ("newest", (), np.nan),
    ("slot_tick", (OPEN_SLOTS,), np.nan),
    ("slot_n", (OPEN_SLOTS,), 0.0),
    ("slot_sum", (OPEN_SLOTS, "V"), 0.0),
    ("slot_last", (OPEN_SLOTS, "V"), np.nan),
    ("slot_last_ts", (OPEN_SLOTS,), np.nan),
)


class StateTable:
    """The state of up to ``capacity`` streams for a model with the given layer sizes.

    Public arrays (row-indexed, ``allocated`` rows long; only rows in use are meaningful):

    ``state``          list ``[h_0, c_0, h_1, c_1, ...]``, each ``[rows, H_l]`` float32
    ``prev``           ``[rows, V]`` float64 raw values of the last tick (NaN: none yet)
    ``last_ts``        ``[rows]`` float64 epoch seconds of the last tick (NaN: none yet)
    ``ticks``          ``[rows]`` int64 ticks seen since the last reset
    ``last_seen``      ``[rows]`` int64 logical time of the last access (for eviction)
    ``pending_value``  ``[rows]`` float64 last 1-step forecast (NaN: none)
    ``pending_ts``     ``[rows]`` float64 the timestamp that forecast is for

    and the open ticks (:class:`edge_lstm.ticks.StreamTicks`, ``S = OPEN_SLOTS``):

    ``newest``         ``[rows]`` float64 event time of the newest reading (NaN: none)
    ``slot_tick``      ``[rows, S]`` float64 index of each open bucket (NaN: slot free)
    ``slot_n``         ``[rows, S]`` float64 readings in it
    ``slot_sum``       ``[rows, S, V]`` float64 their sum
    ``slot_last``      ``[rows, S, V]`` float64 the newest one's values (by event time)
    ``slot_last_ts``   ``[rows, S]`` float64 its timestamp

    ``prev`` and ``last_ts`` are then the values and the timestamp of the last closed tick.

    A model that blends in a seasonal forecast or has seasonal inputs
    (``FeaturePipeline.history_ticks`` = ``M`` > 0) also needs

    ``history``        ``[rows, M]`` float64 the target of the last ``M`` ticks, tick ``i`` (counted
                       from the stream's start or reset) in column ``i % M``
                       (:func:`edge_lstm.features.record_history`); ``M * 8`` bytes per stream.
                       Its rows grow with the rows handed out, not with the other arrays'
                       allocation: a season of 100,000 ticks costs 800 kB a row, and 1,024 rows
                       made ready for streams that never come would hold 819 MB.
    """

    def __init__(self, layers: Sequence[int], n_values: int, capacity: int, history_ticks: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not layers or min(layers) < 1:
            raise ValueError("layers must list at least one positive size")
        if n_values < 1:
            raise ValueError("n_values must be at least 1")
        self.layers = tuple(int(h) for h in layers)
        self.n_values = int(n_values)
        self.capacity = int(capacity)
        self.evictions = 0  # cumulative
        self.evicted_ids: list[str] | None = None  # set to a list to collect the ids evicted (its owner drains it)
        self._clock = 0
        self._rows: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self.state: list[F32] = []
        self.prev: F64 = np.empty((0, self.n_values))
        self.last_ts: F64 = np.empty(0)
        self.ticks: npt.NDArray[np.int64] = np.empty(0, np.int64)
        self.last_seen: npt.NDArray[np.int64] = np.empty(0, np.int64)
        self.pending_value: F64 = np.empty(0)
        self.pending_ts: F64 = np.empty(0)
        self.newest: F64 = np.empty(0)
        self.slot_tick: F64 = np.empty((0, OPEN_SLOTS))
        self.slot_n: F64 = np.empty((0, OPEN_SLOTS))
        self.slot_sum: F64 = np.empty((0, OPEN_SLOTS, self.n_values))
        self.slot_last: F64 = np.empty((0, OPEN_SLOTS, self.n_values))
        self.slot_last_ts: F64 = np.empty((0, OPEN_SLOTS))
        if history_ticks < 0:
            raise ValueError("history_ticks must not be negative")
        self.history: F64 = np.empty((0, int(history_ticks)))
        self._grow(min(self.capacity, _INITIAL_ROWS))

    def _shape(self, shape: tuple[str | int, ...]) -> tuple[int, ...]:
        return tuple(self.n_values if d == "V" else int(d) for d in shape)

    # -- size -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, stream: object) -> bool:
        return stream in self._rows

    @property
    def allocated(self) -> int:
        return len(self._ids)

    def streams(self) -> Iterator[str]:
        return iter(self._rows)

    def row(self, stream: str) -> int | None:
        return self._rows.get(stream)

    def stream_of(self, row: int) -> str | None:
        return self._ids[row]

    def nbytes(self) -> int:
        names = [*_PER_ROW_FIELDS, *(f for f, _, _ in _TICK_FIELDS), "history"]
        arrays: list[npt.NDArray[np.generic]] = [*self.state, *(getattr(self, f) for f in names)]
        return sum(a.nbytes for a in arrays)

    def _grow(self, rows: int) -> None:
        old = self.allocated
        if rows <= old:
            return

        def extend(a: npt.NDArray[np.generic], fill: float) -> npt.NDArray[np.generic]:
            out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
            out[:old] = a
            return out

        if self.state:
            self.state = [extend(a, 0.0) for a in self.state]  # type: ignore[misc]
        else:
            self.state = [np.zeros((rows, h), np.float32) for h in self.layers for _ in (0, 1)]
        self.prev = extend(self.prev, np.nan)  # type: ignore[assignment]
        self.last_ts = extend(self.last_ts, np.nan)  # type: ignore[assignment]
        self.ticks = extend(self.ticks, 0)  # type: ignore[assignment]
        self.last_seen = extend(self.last_seen, -1)  # type: ignore[assignment]
        self.pending_value = extend(self.pending_value, np.nan)  # type: ignore[assignment]
        self.pending_ts = extend(self.pending_ts, np.nan)  # type: ignore[assignment]
        for name, _shape, fill in _TICK_FIELDS:
            setattr(self, name, extend(getattr(self, name), fill))
        self._ids.extend([None] * (rows - old))
        # pop() takes from the end: keep low rows first so the table stays compact
        self._free.extend(range(rows - 1, old - 1, -1))
        release_free_memory()  # the old arrays

    # -- rows -----------------------------------------------------------------------------------

    def rows_for(self, streams: Sequence[str]) -> tuple[IntArray, int]:
        """Rows of ``streams`` (distinct ids), allocating fresh rows for new ones.

        All of them are marked as seen now.  Returns the rows and how many
        streams were evicted to make room (also added to :attr:`evictions`).
        New rows start reset.
        """
        if len(streams) > self.capacity:
            raise ValueError(f"{len(streams)} streams do not fit a table of capacity {self.capacity}")
        self._clock += 1
        rows = np.empty(len(streams), dtype=np.intp)
        missing: list[int] = []
        get = self._rows.get
        for i, s in enumerate(streams):
            r = get(s)
            if r is None:
                missing.append(i)
            else:
                rows[i] = r
        evicted = 0
        if missing:
            if len(missing) < len(streams):
                # Mark the known streams first so that eviction cannot pick them.
                known = np.ones(len(streams), dtype=bool)
                known[missing] = False
                self.last_seen[rows[known]] = self._clock
            new_rows = self._allocate(len(missing))
            evicted = len(missing) - len(new_rows)
            if evicted:
                new_rows += self._evict(evicted)
            for i, r in zip(missing, new_rows, strict=True):
                self._rows[streams[i]] = r
                self._ids[r] = streams[i]
                rows[i] = r
            self._fit_history(max(new_rows) + 1)
            self.reset(np.asarray(new_rows, dtype=np.intp))
        self.last_seen[rows] = self._clock
        return rows, evicted

    def _allocate(self, n: int) -> list[int]:
        """Up to ``n`` free rows, growing the arrays if the capacity allows."""
        if len(self._free) < n and self.allocated < self.capacity:
            need = self.allocated + n - len(self._free)
            self._grow(min(self.capacity, max(need, 2 * self.allocated)))
        take = min(n, len(self._free))
        return [self._free.pop() for _ in range(take)]

    def _evict(self, n: int) -> list[int]:
        """Free the ``n`` least recently seen rows not touched by the current call."""
        seen = self.last_seen[: self.allocated]
        candidates = np.flatnonzero((seen >= 0) & (seen < self._clock))
        if len(candidates) < n:
            raise ValueError(f"a batch of {n} more new streams does not fit a table of capacity {self.capacity}")
        if n < len(candidates):
            candidates = candidates[np.argpartition(seen[candidates], n - 1)[:n]]
        victims = candidates.tolist()
        for r in victims:
            old = self._ids[r]
            if old is not None:
                del self._rows[old]
                if self.evicted_ids is not None:
                    self.evicted_ids.append(old)
        self.evictions += n
        _LOG.debug("evicted %d least recently seen stream(s)", n)
        return victims

    def remove(self, stream: str) -> bool:
        """Forget a stream; its row becomes free.  True when it was present."""
        r = self._rows.pop(stream, None)
        if r is None:
            return False
        self._ids[r] = None
        self.reset(np.asarray([r], dtype=np.intp))
        self.last_seen[r] = -1
        self._free.append(r)
        return True

    def reset(self, rows: IntArray) -> None:
        """Start the given rows afresh: zero state, no previous values or timestamp."""
        for a in self.state:
            a[rows] = 0.0
        self.prev[rows] = np.nan
        self.last_ts[rows] = np.nan
        self.ticks[rows] = 0
        self.pending_value[rows] = np.nan
        self.pending_ts[rows] = np.nan
        for name, _shape, fill in _TICK_FIELDS:
            getattr(self, name)[rows] = fill
        self.history[rows] = np.nan

    @property
    def history_ticks(self) -> int:
        return int(self.history.shape[1])

    def _fit_history(self, rows: int) -> None:
        """Give the ring at least ``rows`` rows (every row handed out has one), by a quarter more at a time."""
        have = int(self.history.shape[0])
        if rows <= have:
            return
        grown = np.full((min(self.allocated, max(rows, have + max(16, have // 4))), self.history_ticks), np.nan)
        grown[:have] = self.history
        self.history = grown

    def ensure_history(self, ticks: int) -> None:
        """Keep ``ticks`` targets per stream from now on (a new model may need more, fewer or none).

        A changed length keeps each stream's latest targets that both rings hold (tick ``i`` moves
        from column ``i % old`` to ``i % new``), so a swap between a seasonal-naive and a
        differenced model gives the same numbers as a run on the new model from the start,
        once the stream has seen the new ring's length; older targets are missing until then.
        """
        new_width, old_width = int(ticks), self.history_ticks
        if new_width == old_width:
            return
        old = self.history
        self.history = np.full((old.shape[0], new_width), np.nan)
        keep = min(new_width, old_width)
        if not keep:
            return
        rows = np.arange(old.shape[0])
        for back in range(keep):  # tick ticks - 1 - back, where the stream has it
            i = self.ticks[: len(rows)] - 1 - back
            has = i >= 0
            self.history[rows[has], i[has] % new_width] = old[rows[has], i[has] % old_width]

    def reset_all(self) -> int:
        """Reset every stream in use (rows are kept); returns how many."""
        used = np.fromiter(self._rows.values(), dtype=np.intp, count=len(self._rows))
        self.reset(used)
        return len(used)

    # -- batching -------------------------------------------------------------------------------

    def gather(self, rows: IntArray | slice) -> list[F32]:
        """The state arrays for ``rows``, in ``[h_0, c_0, ...]`` order: copies for an index array,
        views for a slice (cheaper for one row; the model step copies its inputs)."""
        return [a[rows] for a in self.state]

    def scatter(self, rows: IntArray | slice, state: Sequence[npt.NDArray[np.float32]]) -> None:
        """Write new state arrays for ``rows``."""
        for a, s in zip(self.state, state, strict=True):
            a[rows] = s

    # -- open ticks -----------------------------------------------------------------------------

    def load_ticks(self, row: int, policy: TickPolicy) -> StreamTicks:
        """The tick state of one row (the last closed tick's index from its stored time)."""
        return StreamTicks(
            float(self.newest[row]),
            policy.tick_index(float(self.last_ts[row])),
            self.prev[row].tolist(),
            self.slot_tick[row].tolist(),
            self.slot_n[row].tolist(),
            self.slot_sum[row].tolist(),
            self.slot_last[row].tolist(),
            self.slot_last_ts[row].tolist(),
        )

    def store_ticks(self, row: int, s: StreamTicks, policy: TickPolicy) -> None:
        """Write a row's tick state back (the last closed tick as its time)."""
        self.newest[row] = s.newest
        self.last_ts[row] = policy.tick_time(s.last_tick)
        self.prev[row] = s.prev
        self.slot_tick[row] = s.slot_tick
        self.slot_n[row] = s.slot_n
        self.slot_sum[row] = s.slot_sum
        self.slot_last[row] = s.slot_last
        self.slot_last_ts[row] = s.slot_last_ts

    # -- persistence ----------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """The rows in use as plain arrays (stream ids in ``streams``), for checkpoints."""
        ids = list(self._rows)
        rows = np.fromiter(self._rows.values(), dtype=np.intp, count=len(ids))
        out: dict[str, npt.NDArray[np.generic]] = {"streams": np.asarray(ids, dtype=np.str_)}
        for name, a in zip(state_names(self.layers), self.state, strict=True):
            out[name] = a[rows]
        for name in (*_PER_ROW_FIELDS, *(f for f, _, _ in _TICK_FIELDS)):
            out[name] = getattr(self, name)[rows]
        if self.history_ticks:
            out["history"] = self.history[rows]
        return out

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, npt.NDArray[np.generic]], layers: Sequence[int], n_values: int, capacity: int
    ) -> StateTable:
        """Rebuild a table from :meth:`to_arrays` output; raises ValueError on a layout mismatch.

        With more streams than ``capacity``, the most recently seen ones are kept.
        """
        ids = [str(s) for s in np.asarray(arrays["streams"]).tolist()]
        n = len(ids)
        hist = arrays.get("history")
        m = int(hist.shape[1]) if hist is not None and hist.ndim == 2 else 0
        table = cls(layers, n_values, capacity, history_ticks=m)
        if len(set(ids)) != n:
            raise ValueError("duplicate stream ids")
        expected: dict[str, tuple[tuple[int, ...], type]] = {}
        for name, h in zip(state_names(table.layers), [h for h in table.layers for _ in (0, 1)], strict=True):
            expected[name] = ((n, h), np.float32)
        expected.update(
            prev=((n, table.n_values), np.float64),
            last_ts=((n,), np.float64),
            ticks=((n,), np.int64),
            last_seen=((n,), np.int64),
            pending_value=((n,), np.float64),
            pending_ts=((n,), np.float64),
        )
        for name, shape_spec, _fill in _TICK_FIELDS:
            expected[name] = ((n, *table._shape(shape_spec)), np.float64)
        if hist is not None:
            expected["history"] = ((n, table.history_ticks), np.float64)
        arrays = dict(arrays)
        if "newest" not in arrays and "last_ts" in arrays:  # written before ticks were explicit
            arrays["newest"] = np.asarray(arrays["last_ts"])
            for name, shape_spec, fill in _TICK_FIELDS[1:]:
                arrays[name] = np.full((n, *table._shape(shape_spec)), fill)
        for name, (shape, dtype) in expected.items():
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"array {name!r} is missing")
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"array {name!r} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape)}")
        order = np.argsort(np.asarray(arrays["last_seen"]), kind="stable")[::-1][:capacity][::-1]
        keep = [ids[i] for i in order.tolist()]
        rows, _ = table.rows_for(keep)
        table.scatter(rows, [np.asarray(arrays[name])[order] for name in state_names(table.layers)])
        for name in (*_PER_ROW_FIELDS, *(f for f, _, _ in _TICK_FIELDS), *(("history",) if hist is not None else ())):
            getattr(table, name)[rows] = np.asarray(arrays[name])[order]
        table._clock = int(table.last_seen[rows].max()) if len(rows) else 0
        return table


def bytes_per_stream(layers: Sequence[int], n_values: int, history_ticks: int = 0) -> int:
    """What one stream takes in a :class:`StateTable`, and so in every checkpoint (besides its id)."""
    return StateTable(layers, n_values, 1).nbytes() + 8 * int(history_ticks)
