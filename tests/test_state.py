"""StateTable: rows, growth, least-recently-seen eviction, reset, gather/scatter, arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.state import StateTable, bytes_per_stream


def table(capacity: int = 4, layers: tuple[int, ...] = (3, 2), n_values: int = 2) -> StateTable:
    return StateTable(layers, n_values, capacity)


def test_new_streams_get_distinct_reset_rows() -> None:
    t = table()
    rows, evicted = t.rows_for(["a", "b"])
    assert evicted == 0 and len(t) == 2 and len(set(rows.tolist())) == 2
    assert [a.shape[1] for a in t.state] == [3, 3, 2, 2]
    assert np.isnan(t.prev[rows]).all() and np.isnan(t.last_ts[rows]).all()
    assert (t.ticks[rows] == 0).all()
    again, _ = t.rows_for(["b", "a"])
    assert again.tolist() == rows[::-1].tolist()
    assert t.row("a") == rows[0] and t.stream_of(int(rows[1])) == "b" and "a" in t and "z" not in t


def test_gather_scatter_round_trip() -> None:
    t = table()
    rows, _ = t.rows_for(["a", "b", "c"])
    new = [np.full((3, h), k + 1, np.float32) * np.arange(1, 4, dtype=np.float32)[:, None]
           for k, h in enumerate((3, 3, 2, 2))]  # fmt: skip
    t.scatter(rows, new)
    sub = t.gather(rows[[2, 0]])
    for got, want in zip(sub, new, strict=True):
        np.testing.assert_array_equal(got, want[[2, 0]])
    sub[0][:] = -1  # gather returns copies
    assert (t.state[0][rows] != -1).all()


def test_least_recently_seen_is_evicted() -> None:
    t = table(capacity=3)
    t.rows_for(["a"])
    t.rows_for(["b"])
    t.rows_for(["c"])
    t.rows_for(["a"])  # b is now the least recently seen
    rows, evicted = t.rows_for(["d"])
    assert evicted == 1 and t.evictions == 1
    assert set(t.streams()) == {"a", "c", "d"}
    assert t.ticks[rows[0]] == 0 and np.isnan(t.last_ts[rows[0]])
    rows, evicted = t.rows_for(["e", "a", "f"])  # a is in the call: c and d go
    assert evicted == 2 and set(t.streams()) == {"a", "e", "f"}


def test_evicted_row_state_is_reset() -> None:
    t = table(capacity=1, layers=(2,), n_values=1)
    rows, _ = t.rows_for(["a"])
    t.scatter(rows, [np.ones((1, 2), np.float32), np.ones((1, 2), np.float32)])
    t.prev[rows] = 5.0
    t.ticks[rows] = 9
    rows2, evicted = t.rows_for(["b"])
    assert evicted == 1 and rows2[0] == rows[0]
    assert (t.state[0][rows2] == 0).all() and np.isnan(t.prev[rows2]).all() and t.ticks[rows2[0]] == 0


def test_batch_larger_than_capacity_is_refused_without_damage() -> None:
    t = table(capacity=2)
    t.rows_for(["a"])
    with pytest.raises(ValueError):
        t.rows_for(["x", "y", "z"])
    assert set(t.streams()) == {"a"}


def test_growth_keeps_contents_and_stops_at_capacity() -> None:
    t = StateTable((4,), 1, capacity=3000)
    assert t.allocated == 1024
    first, _ = t.rows_for(["s0"])
    t.state[0][first] = 7.0
    t.last_ts[first] = 123.0
    t.rows_for([f"s{i}" for i in range(1, 2000)])
    assert t.allocated == 2048
    t.rows_for([f"s{i}" for i in range(2000, 3000)])
    assert t.allocated == 3000 and len(t) == 3000
    assert (t.state[0][t.row("s0")] == 7.0).all() and t.last_ts[t.row("s0")] == 123.0
    t.rows_for(["new"])
    assert t.allocated == 3000 and t.evictions == 1 and "s0" not in t


def test_remove_and_reset_all() -> None:
    t = table()
    rows, _ = t.rows_for(["a", "b"])
    t.ticks[rows] = 5
    assert t.remove("a") and not t.remove("a")
    assert len(t) == 1
    assert t.reset_all() == 1 and t.ticks[t.row("b")] == 0
    rows, evicted = t.rows_for(["c", "d", "e"])  # the freed row is reused, no eviction
    assert evicted == 0 and len(t) == 4


def test_arrays_round_trip() -> None:
    t = table(capacity=5)
    rows, _ = t.rows_for(["a", "b", "c"])
    rng = np.random.default_rng(0)
    t.scatter(rows, [rng.normal(size=(3, h)).astype(np.float32) for h in (3, 3, 2, 2)])
    t.prev[rows] = rng.normal(size=(3, 2))
    t.last_ts[rows] = [1.0, 2.0, 3.0]
    t.ticks[rows] = [4, 5, 6]
    t.pending_value[rows] = [0.5, np.nan, 1.5]
    t.pending_ts[rows] = [10.0, np.nan, 30.0]
    t.rows_for(["b"])
    back = StateTable.from_arrays(t.to_arrays(), (3, 2), 2, capacity=5)
    assert set(back.streams()) == {"a", "b", "c"}
    for s in ("a", "b", "c"):
        r, r2 = t.row(s), back.row(s)
        for a, b in zip(t.state, back.state, strict=True):
            np.testing.assert_array_equal(a[r], b[r2])
        for name in ("prev", "last_ts", "ticks", "last_seen", "pending_value", "pending_ts"):
            np.testing.assert_array_equal(getattr(t, name)[r], getattr(back, name)[r2])
    # eviction order survives: a is the least recently seen
    back.rows_for(["d", "e"])
    back.rows_for(["f"])
    assert "a" not in back and "b" in back


def test_from_arrays_keeps_most_recent_when_capacity_shrinks() -> None:
    t = table(capacity=4)
    for s in ("a", "b", "c", "d"):
        t.rows_for([s])
    back = StateTable.from_arrays(t.to_arrays(), (3, 2), 2, capacity=2)
    assert set(back.streams()) == {"c", "d"}


def test_from_arrays_rejects_layout_mismatch() -> None:
    arrays = table().to_arrays()
    with pytest.raises(ValueError, match="h_0"):
        StateTable.from_arrays(arrays, (4, 2), 2, capacity=4)
    with pytest.raises(ValueError, match="prev"):
        StateTable.from_arrays(arrays, (3, 2), 3, capacity=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=4, unique=True), max_size=40),
       st.integers(1, 6))  # fmt: skip
def test_table_matches_an_lru_model(batches: list[list[int]], capacity: int) -> None:
    t = StateTable((2,), 1, capacity)
    seen: dict[str, int] = {}  # stream -> call number of its last access
    evictions = 0
    for clock, batch in enumerate(batches):
        ids = [f"s{i}" for i in batch][:capacity]
        before = set(t.streams())
        rows, evicted = t.rows_for(ids)
        after = set(t.streams())
        expected_size = min(capacity, len(before | set(ids)))
        assert len(after) == expected_size and set(ids) <= after
        removed = before - after
        assert evicted == len(removed) == len(before | set(ids)) - expected_size
        evictions += evicted
        survivors = after - set(ids)
        assert all(seen[r] <= seen[k] for r in removed for k in survivors)  # least recently seen went first
        for s in ids:
            seen[s] = clock
        assert len(set(rows.tolist())) == len(ids)
        assert all(t.row(s) == r for s, r in zip(ids, rows.tolist(), strict=True))
    assert t.evictions == evictions


def test_the_seasonal_history_goes_through_a_checkpoint_file_and_resets() -> None:
    from edge_lstm.checkpoint import decode_checkpoint, encode_checkpoint

    t = StateTable((4,), 1, 10, history_ticks=6)
    rows, _ = t.rows_for(["a", "b"])
    t.history[rows] = np.arange(12.0).reshape(2, 6)
    back = StateTable.from_arrays(decode_checkpoint(encode_checkpoint(t.to_arrays(), "0" * 64), "0" * 64), (4,), 1, 10)
    assert back.history_ticks == 6
    np.testing.assert_array_equal(back.history[back.row("b")], np.arange(6.0, 12.0))
    t.reset(rows[:1])
    assert np.isnan(t.history[rows[0]]).all() and not np.isnan(t.history[rows[1]]).any()
    assert "history" not in StateTable((4,), 1, 10).to_arrays()  # a model without the blend stores none


def test_the_ring_grows_with_the_streams_not_with_the_rows_made_ready_for_them() -> None:
    """A model with a season of 100,000 ticks keeps 800 kB per stream: the daemon's table makes 1,024 rows
    ready at start (and doubles), and a ring that followed them had held 819 MB resident for one stream.
    The ring's rows follow the rows handed out, and every target survives its growth, a swap and an
    eviction's reuse."""
    t = StateTable((4,), 1, 5000)
    t.ensure_history(1000)
    assert t.allocated == 1024 and t.history.shape == (0, 1000)
    rows, _ = t.rows_for(["s0"])
    assert t.history.shape[0] <= 16 and t.history.nbytes <= 16 * 8000  # was 1024 rows, 8.2 MB
    t.history[rows[0]] = np.arange(1000.0)
    for n in range(1, 3000):
        (r,), _ = t.rows_for([f"s{n}"])
        assert np.isnan(t.history[r]).all()
        t.history[r, n % 1000] = n
    assert 3000 <= t.history.shape[0] < 3000 * 1.25 + 16 and t.allocated == 4096
    np.testing.assert_array_equal(t.history[t.row("s0")], np.arange(1000.0))
    assert all(t.history[t.row(f"s{n}"), n % 1000] == n for n in range(1, 3000))
    back = StateTable.from_arrays(t.to_arrays(), (4,), 1, 5000)
    assert back.history.shape[0] < 3000 * 1.25 + 16
    np.testing.assert_array_equal(back.history[back.row("s0")], np.arange(1000.0))
    small = StateTable((4,), 1, 2, history_ticks=3)  # full: a new stream takes an evicted row, ring cleared
    small.rows_for(["a", "b"])
    small.history[:] = 7.0
    (r,), evicted = small.rows_for(["c"])
    assert evicted == 1 and small.history.shape == (2, 3) and np.isnan(small.history[r]).all()


@pytest.mark.parametrize(("old", "new"), [(5, 6), (6, 5), (4, 9), (9, 4)])
def test_a_new_ring_width_keeps_the_latest_targets_both_rings_hold(old: int, new: int) -> None:
    """A model swap between seasonal naive (one season) and the differenced forecast (one tick more):
    each stream's latest min(old, new) targets move to their columns in the new ring."""
    from edge_lstm.features import record_history

    t = StateTable((4,), 1, 8, history_ticks=old)
    rows, _ = t.rows_for(["a", "b", "c"])
    seen = {0: 11, 1: 3, 2: 0}  # ticks each stream has seen since its start
    for r, n in seen.items():
        for i in range(n):
            record_history(t.history, rows[r], i, 100.0 * r + i)
        t.ticks[rows[r]] = n
    t.ensure_history(new)
    assert t.history.shape == (t.allocated, new)
    for r, n in seen.items():
        kept = {i for i in range(max(0, n - min(old, new)), n)}
        for col in range(new):
            held = [i for i in kept if i % new == col]
            if held:
                assert t.history[rows[r], col] == 100.0 * r + held[0]
            else:
                assert np.isnan(t.history[rows[r], col])


@pytest.mark.parametrize(("layers", "n_values", "history"), [((64,), 1, 0), ((32, 16), 3, 0), ((8,), 2, 48)])
def test_bytes_per_stream_is_what_a_full_table_holds_per_stream(
    layers: tuple[int, ...], n_values: int, history: int
) -> None:
    t = StateTable(layers, n_values, 100, history_ticks=history)
    t.rows_for([f"s{i}" for i in range(100)])
    assert t.allocated == 100
    assert bytes_per_stream(layers, n_values, history) * 100 == t.nbytes()
