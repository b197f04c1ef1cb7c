"""The offline streaming run of a model: the reference the daemon's forecasts are compared with.

Built from the model runtime and the shared feature pipeline only (no daemon code), one tick at a
time with batch 1, exactly as the converter's streaming verification feeds the one-step model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lstm.engine import Engine
from edge_lstm.features import seasonal_changes, seasonal_series
from edge_lstm.modelspec import load_model
from edge_lstm.runtime import StepModel, load_step_model


@dataclass
class StreamState:
    """One stream's LSTM state and previous raw values (NaN before the first tick)."""

    state: list[np.ndarray]
    prev: np.ndarray
    last_ts: float = float("nan")
    ticks: int = 0
    extra: dict = field(default_factory=dict)


def open_model(model_dir: Path) -> StepModel:
    return load_step_model(load_model(model_dir))


def cold_state(model: StepModel) -> StreamState:
    m = model.manifest
    state = [np.zeros((1, h), np.float32) for h in m.layers for _ in (0, 1)]
    return StreamState(state, np.full((1, len(m.pipeline.columns)), np.nan))


def stream_forecasts(
    model: StepModel, ts: np.ndarray, values: np.ndarray, start: StreamState | None = None
) -> tuple[np.ndarray, StreamState]:
    """Forecasts ``[N, K]`` (target units) for consecutive ticks; ``values`` is ``[N]`` or ``[N, V]``."""
    pipe = model.manifest.pipeline
    s = start if start is not None else cold_state(model)
    state = [a.copy() for a in s.state]
    prev = s.prev.copy()
    v = np.asarray(values, np.float64).reshape(len(ts), -1)
    out = np.empty((len(ts), model.manifest.horizon))
    # A model that blends in a seasonal forecast or has seasonal inputs sees the target of every tick
    # since the stream's start.
    history = np.concatenate([s.extra.get("targets", np.zeros(0)), v[:, pipe.target_index]])
    seasonal = seasonal_series(history, pipe.output)
    if seasonal is not None:
        seasonal = seasonal[s.ticks :]
    changes = seasonal_changes(history, pipe)
    if changes is not None:
        changes = changes[s.ticks :]
    for i in range(len(ts)):
        x = pipe.encode(v[i : i + 1], prev, ts[i : i + 1], None if changes is None else changes[i : i + 1])
        y, state = model.step(x, state)
        out[i] = pipe.decode(y, v[i : i + 1, pipe.target_index], None if seasonal is None else seasonal[i : i + 1])[0]
        prev = v[i : i + 1].copy()
    return out, StreamState(state, prev, float(ts[-1]), s.ticks + len(ts), {"targets": history})


def restore_as_daemon(state_dir: Path, config: dict, model: StepModel) -> tuple[Engine, int]:
    """The engine a daemon with ``config`` restores from ``state_dir``: its checkpoint, then its journal.

    Returns the engine and how many journaled messages were stepped after the checkpoint.
    """
    from edge_lstm import checkpoint as ckpt
    from edge_lstm.config import parse_config
    from edge_lstm.daemon import make_decoder
    from edge_lstm.journal import read_journal
    from edge_lstm.pipeline import replay_journal, routes_of
    from edge_lstm.state import StateTable

    cfg = parse_config(config)
    m = model.manifest
    res = ckpt.load_checkpoint(state_dir, m.sha256, m.layers, len(m.pipeline.columns), cfg.state.capacity)
    table = res.table if res.table is not None else StateTable(m.layers, len(m.pipeline.columns), cfg.state.capacity)
    engine = Engine(model, table)
    found = read_journal(state_dir, m.sha256)
    stepped = replay_journal(found.records, res.journal_seq, engine, make_decoder(cfg, m), routes_of(cfg))
    return engine, stepped


def offline_intervals(model: StepModel, forecasts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """For an uninterrupted run from a cold start: bounds ``[N, L, K]`` and anomaly scores ``[N]``.

    Reading ``i`` is checked against the 1-step interval of forecast ``i - 1`` at the widest level once
    the stream has warmed up (forecasts made while warming up are not checked); NaN: not checked.
    """
    from edge_lstm.intervals import anomaly_score

    m = model.manifest
    iv = m.intervals
    assert iv is not None, "the model has no intervals"
    lower = forecasts[:, None, :] + iv.lower
    upper = forecasts[:, None, :] + iv.upper
    target = np.asarray(values, np.float64).reshape(len(forecasts), -1)[:, m.pipeline.target_index]
    scores = np.full(len(forecasts), np.nan)
    lo1, hi1 = float(iv.lower[-1, 0]), float(iv.upper[-1, 0])
    for i in range(max(1, m.warmup_ticks), len(forecasts)):
        p = float(forecasts[i - 1, 0])
        scores[i] = anomaly_score(float(target[i]), p + lo1, p + hi1)
    return lower, upper, scores
