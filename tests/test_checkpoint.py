"""Checkpoints: round trip, resume equals an uninterrupted run, every kind of bad file set aside."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_lstm.checkpoint import (
    CHECKPOINT_NAME,
    LoadStatus,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from edge_lstm.engine import Engine
from edge_lstm.modelspec import load_model
from edge_lstm.payload import Reading
from edge_lstm.runtime import load_step_model
from edge_lstm.state import StateTable

FP = "ab" * 32
OTHER = "cd" * 32
LAYERS = (3, 2)
MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "taylor"


def filled_table(n: int = 5, capacity: int = 10, seed: int = 0) -> StateTable:
    t = StateTable(LAYERS, 2, capacity)
    rng = np.random.default_rng(seed)
    for i in range(n):
        rows, _ = t.rows_for([f"stream-{i}"])
        t.scatter(rows, [rng.normal(size=(1, h)).astype(np.float32) for h in (3, 3, 2, 2)])
        t.prev[rows] = rng.normal(size=(1, 2))
        t.last_ts[rows] = 1.7e9 + i
        t.ticks[rows] = i
        t.pending_value[rows] = np.nan if i % 2 else float(i)
        t.pending_ts[rows] = 1.7e9 + i + 60
    return t


def assert_same(a: StateTable, b: StateTable) -> None:
    assert set(a.streams()) == set(b.streams())
    for s in a.streams():
        ra, rb = a.row(s), b.row(s)
        for x, y in zip(a.state, b.state, strict=True):
            np.testing.assert_array_equal(x[ra], y[rb])
        for name in ("prev", "last_ts", "ticks", "last_seen", "pending_value", "pending_ts"):
            np.testing.assert_array_equal(getattr(a, name)[ra], getattr(b, name)[rb])


def load(d: Path, fp: str = FP, layers: tuple[int, ...] = LAYERS, capacity: int = 10):  # type: ignore[no-untyped-def]
    return load_checkpoint(d, fp, layers, 2, capacity, wall=lambda: 1_717_000_000.0)


def test_round_trip(tmp_path: Path) -> None:
    t = filled_table()
    saved = save_checkpoint(t, tmp_path, FP)
    path = tmp_path / CHECKPOINT_NAME
    assert saved.path == path and saved.size == path.stat().st_size and saved.streams == 5
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    res = load(tmp_path)
    assert res.status is LoadStatus.RESTORED and res.table is not None and res.streams == 5
    assert res.size == saved.size
    assert_same(t, res.table)


def test_snapshot_arrays_and_empty_table(tmp_path: Path) -> None:
    save_checkpoint(StateTable(LAYERS, 2, 4).to_arrays(), tmp_path, FP)
    res = load(tmp_path)
    assert res.status is LoadStatus.RESTORED and res.streams == 0


def test_missing_is_a_plain_cold_start(tmp_path: Path) -> None:
    res = load(tmp_path)
    assert res.status is LoadStatus.MISSING and res.table is None and res.set_aside is None


def _rejected(tmp_path: Path, data: bytes, fp: str = FP, layers: tuple[int, ...] = LAYERS) -> str:
    (tmp_path / CHECKPOINT_NAME).write_bytes(data)
    res = load(tmp_path, fp=fp, layers=layers)
    assert res.status is LoadStatus.REJECTED and res.table is None
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert res.set_aside is not None and res.set_aside.read_bytes() == data
    assert res.set_aside.name.startswith("state.ckpt.rejected-20240529T")
    return res.reason


def test_foreign_model_is_set_aside(tmp_path: Path) -> None:
    data = encode_checkpoint(filled_table().to_arrays(), OTHER)
    assert "another model" in _rejected(tmp_path, data)


def test_newer_format_is_set_aside(tmp_path: Path) -> None:
    data = encode_checkpoint(filled_table().to_arrays(), FP)
    body = data[:8] + struct.pack(">I", 2) + data[12:-32]
    assert "newer" in _rejected(tmp_path, body + hashlib.sha256(body).digest())


def test_layout_mismatch_is_set_aside(tmp_path: Path) -> None:
    data = encode_checkpoint(filled_table().to_arrays(), FP)
    assert "layout" in _rejected(tmp_path, data, layers=(4, 2))


def test_garbage_and_pickles_are_set_aside(tmp_path: Path) -> None:
    assert "magic" in _rejected(tmp_path, b"hello world, this is not a checkpoint at all" * 3)
    arrays = filled_table().to_arrays()
    arrays["streams"] = np.array([object()] * 5, dtype=object)
    assert "unreadable payload" in _rejected(tmp_path, encode_checkpoint(arrays, FP))


_GOOD = encode_checkpoint(filled_table().to_arrays(), FP)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(_GOOD) - 1))
def test_truncated_files_are_set_aside(tmp_path: Path, cut: int) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    _rejected(tmp_path, _GOOD[:cut])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(_GOOD) * 8 - 1))
def test_every_bit_flip_is_set_aside(tmp_path: Path, bit: int) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    data = bytearray(_GOOD)
    data[bit // 8] ^= 1 << (bit % 8)
    _rejected(tmp_path, bytes(data))


def test_only_the_newest_rejected_files_are_kept(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / CHECKPOINT_NAME).write_bytes(b"junk %d" % i)
        load_checkpoint(tmp_path, FP, LAYERS, 2, 10, wall=lambda i=i: 1_717_000_000.0 + i, keep_rejected=3)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [f"state.ckpt.rejected-20240529T1626{s}Z" for s in (45, 46, 47)]
    assert (tmp_path / kept[-1]).read_bytes() == b"junk 7"


def test_failed_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(filled_table(seed=1), tmp_path, FP)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    (tmp_path / f".state.ckpt.tmp-{os.getpid()}").mkdir()  # the temp file cannot be created
    with pytest.raises(OSError):
        save_checkpoint(filled_table(seed=2), tmp_path, FP)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError):
        save_checkpoint(filled_table(), tmp_path / "a-file", FP)


def test_a_state_directory_removed_while_running_is_recreated(tmp_path: Path) -> None:
    d = tmp_path / "state" / "edge-lstm"
    saved = save_checkpoint(filled_table(), d, FP)
    assert saved.path == d / CHECKPOINT_NAME and load(d).status is LoadStatus.RESTORED


def test_open_ticks_survive_a_checkpoint_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    """A stream half-way through a tick resumes it; a file written before ticks were explicit restores."""
    import dataclasses

    from edge_lstm.ticks import Aggregate, Align, TickPolicy

    bundle = load_model(MODEL_DIR)
    m = dataclasses.replace(
        bundle.manifest, tick_policy=TickPolicy(1800.0, 0.0, Align.START, Aggregate.MEAN, 600.0, 4)
    )
    model = load_step_model(dataclasses.replace(bundle, manifest=m))
    readings = [Reading("s", (29000.0 + 37 * k,), 1.7e9 + 330.0 * k, 0.0) for k in range(60)]
    straight, first = Engine(model, StateTable(m.layers, 1, 8)), Engine(model, StateTable(m.layers, 1, 8))
    for r in readings[:31]:
        straight.process([r])
        first.process([r])
    assert not np.isnan(first.table.slot_tick[first.table.row("s")]).all()  # a tick is open
    save_checkpoint(first.table, tmp_path, m.sha256)
    res = load_checkpoint(tmp_path, m.sha256, m.layers, 1, 8)
    assert res.table is not None
    resumed = Engine(model, res.table)
    for r in readings[31:]:
        a, b = straight.process([r]), resumed.process([r])
        assert a.outcomes == b.outcomes
        assert [(f.ts, f.values.tolist()) for f in a.forecasts] == [(f.ts, f.values.tolist()) for f in b.forecasts]
    old = {k: v for k, v in filled_table().to_arrays().items() if not k.startswith(("slot_", "newest"))}
    (tmp_path / CHECKPOINT_NAME).write_bytes(encode_checkpoint(old, FP))
    res = load(tmp_path)
    assert res.status is LoadStatus.RESTORED and res.table is not None
    row = res.table.row("stream-3")
    assert res.table.newest[row] == res.table.last_ts[row] == 1.7e9 + 3  # a repeat of it is a duplicate


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".state.ckpt.tmp-99999").write_bytes(b"half a checkpoint")
    assert load(tmp_path).status is LoadStatus.MISSING
    assert list(tmp_path.iterdir()) == []


def test_restored_engine_continues_like_an_uninterrupted_one(tmp_path: Path) -> None:
    bundle = load_model(MODEL_DIR)
    model = load_step_model(bundle)
    m = bundle.manifest
    rng = np.random.default_rng(11)
    streams = [f"site-{i}" for i in range(5)]
    values = 29000 + 2500 * np.sin(np.arange(40)[:, None] / 6 + np.arange(5)) + rng.normal(0, 150, (40, 5))

    def batch(k: int) -> list[Reading]:
        return [Reading(s, (float(values[k, i]),), 1.7e9 + k * m.cadence_s, 0.0) for i, s in enumerate(streams)]

    straight = Engine(model, StateTable(m.layers, 1, 64))
    first = Engine(model, StateTable(m.layers, 1, 64))
    for k in range(25):
        straight.process(batch(k))
        first.process(batch(k))
    save_checkpoint(first.table, tmp_path, m.sha256)
    res = load_checkpoint(tmp_path, m.sha256, m.layers, 1, 64)
    assert res.status is LoadStatus.RESTORED and res.table is not None
    resumed = Engine(model, res.table)
    for k in range(25, 40):
        a, b = straight.process(batch(k)), resumed.process(batch(k))
        for fa, fb in zip(a.forecasts, b.forecasts, strict=True):
            assert (fa.stream, fa.warming_up) == (fb.stream, fb.warming_up)
            np.testing.assert_array_equal(fa.values, fb.values)
        assert a.abs_errors == b.abs_errors
