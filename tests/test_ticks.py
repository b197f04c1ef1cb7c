"""The tick policy: aggregation, closing, lateness, gaps; the converter's ticks are the daemon's ticks."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from converter.data import RawSeries, choose_policy, resample
from converter.errors import ConvertError
from converter.prepare import _previous
from edge_lstm.engine import Engine
from edge_lstm.modelspec import load_model
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import Reading
from edge_lstm.runtime import load_step_model
from edge_lstm.state import StateTable
from edge_lstm.ticks import Aggregate, Align, StreamTicks, Tick, TickPolicy, ticks_of
from tests.test_engine import NumpyModel, engine_for, make_manifest

CAD = 60.0
T0 = 1_716_998_400.0  # on the minute grid
MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "taylor"


def _push_all(policy: TickPolicy, readings: Sequence[tuple[float, float]]) -> tuple[list[Tick], list[Outcome]]:
    s = StreamTicks.empty(1)
    ticks: list[Tick] = []
    outcomes: list[Outcome] = []
    for ts, v in readings:
        o, closed = policy.push(s, ts, (v,))
        outcomes.append(o)
        ticks += closed
    return ticks, outcomes


def test_mean_last_and_first() -> None:
    burst = [(T0 + 1, 1.0), (T0 + 30, 2.0), (T0 + 20, 6.0), (T0 + 61, 0.0)]  # the third is older than the second
    mean, outcomes = _push_all(TickPolicy(CAD, aggregate=Aggregate.MEAN), burst)
    assert outcomes == [Outcome.PROCESSED, Outcome.AGGREGATED, Outcome.AGGREGATED, Outcome.PROCESSED]
    assert [(t.ts, t.values) for t in mean] == [(T0, (3.0,))]
    last, _ = _push_all(TickPolicy(CAD, aggregate=Aggregate.LAST), burst)
    assert last[0].values == (2.0,)  # the newest by event time, not by arrival
    first, outcomes = _push_all(TickPolicy(CAD, aggregate=Aggregate.FIRST), burst)
    assert [t.values for t in first] == [(1.0,), (0.0,)]  # each tick closes at its first reading
    assert outcomes == [Outcome.PROCESSED, Outcome.LATE, Outcome.LATE, Outcome.PROCESSED]


def test_lateness_keeps_a_tick_open_and_late_readings_are_counted() -> None:
    p = TickPolicy(CAD, aggregate=Aggregate.MEAN, lateness_s=20.0)
    seq = [(T0 + 10, 1.0), (T0 + 65, 5.0), (T0 + 50, 3.0), (T0 + 80, 7.0), (T0 + 55, 9.0), (T0 + 80, 7.0)]
    ticks, outcomes = _push_all(p, seq)
    # T0+65 opens tick 1 while tick 0 stays open (its end + 20 s is T0+80); T0+50 still joins tick 0;
    # T0+80 closes tick 0; T0+55 arrives after that: late; T0+80 again: duplicate.
    assert outcomes == [Outcome.PROCESSED, Outcome.PROCESSED, Outcome.AGGREGATED, Outcome.AGGREGATED,
                        Outcome.LATE, Outcome.DUPLICATE]  # fmt: skip
    assert [(t.ts, t.values) for t in ticks] == [(T0, (2.0,))]
    with pytest.raises(ValueError, match="below the cadence"):
        TickPolicy(CAD, lateness_s=CAD)
    with pytest.raises(ValueError, match="lateness must be 0"):
        TickPolicy(CAD, aggregate=Aggregate.FIRST, lateness_s=1.0)


def test_gaps_are_filled_or_reset_and_the_grid_is_absolute() -> None:
    p = TickPolicy(CAD, origin_s=15.0, align=Align.START, aggregate=Aggregate.MEAN, max_gap_ticks=3)
    assert p.bucket(T0 + 15) == p.bucket(T0 + 74.9) == p.bucket(T0 + 14.9) + 1
    seq = [(T0 + 20, 0.0), (T0 + 80, 1.0), (T0 + 260, 4.0), (T0 + 500, 9.0), (T0 + 560, 0.0)]
    ticks, _ = _push_all(p, seq)
    assert [(t.ts - T0, t.values, t.observed, t.reset) for t in ticks] == [
        (15.0, (0.0,), True, False),
        (75.0, (1.0,), True, False),
        (135.0, (2.0,), False, False),  # two ticks filled by interpolation
        (195.0, (3.0,), False, False),
        (255.0, (4.0,), True, False),
        (495.0, (9.0,), True, True),  # 4 ticks after the last: longer than the limit, the stream resets
    ]
    assert ticks[2].previous == (1.0,) and math.isnan(ticks[5].previous[0])
    assert [t.ts - T0 for t in p.flush(StreamTicks.empty(1))] == []


def test_manifest_round_trip_and_legacy() -> None:
    p = TickPolicy(1800.0, 900.0, Align.CENTER, Aggregate.LAST, 120.0, 3)
    assert TickPolicy.from_manifest({"ticks": p.to_dict()}, 1800.0, 3) == p
    assert TickPolicy.from_manifest({}, 1800.0, 3) == TickPolicy(1800.0, 0.0, Align.CENTER, Aggregate.FIRST, 0.0, 3)
    with pytest.raises(ValueError, match="unknown field"):
        TickPolicy.from_manifest({"ticks": {"agregate": "mean"}}, 60.0, 4)
    with pytest.raises(ValueError):
        TickPolicy.from_manifest({"ticks": {"aggregate": "median"}}, 60.0, 4)


def test_converter_default_policy_suits_the_data() -> None:
    one_hz = T0 + np.arange(600.0)
    p = choose_policy(one_hz, 60.0)
    assert (p.aggregate, p.align, p.origin_s) == (Aggregate.MEAN, Align.START, 0.0)
    hourly_at_half_past = T0 + 1800 + 3600 * np.arange(48.0) + np.tile([-40.0, 40.0], 24)
    p = choose_policy(hourly_at_half_past, 3600.0)
    assert (p.cadence_s, p.aggregate, p.align, p.origin_s) == (3600.0, Aggregate.FIRST, Align.CENTER, 1800.0)
    assert choose_policy(one_hz, 60.0, aggregate=Aggregate.LAST).aggregate is Aggregate.LAST


# -- the converter's offline path and the daemon's online path see the same ticks and forecasts -------


@st.composite
def _irregular(draw: st.DrawFn) -> list[tuple[float, float]]:
    """One stream's readings in arrival order: on time, jittered, bursts, duplicates, gaps, late ones."""
    cur = T0 + draw(st.floats(0, CAD))
    out: list[tuple[float, float]] = []
    for _ in range(draw(st.integers(2, 70))):
        kind = draw(st.sampled_from(["next", "next", "jitter", "burst", "burst", "dup", "late", "gap", "long"]))
        u = draw(st.floats(0, 1))
        v = draw(st.floats(-20, 40, allow_nan=False))
        if kind == "dup":
            out.append((out[-1][0] if out else cur, v))
            continue
        if kind == "late":
            out.append((cur - CAD * 2.5 * u, v))
            continue
        cur += {"next": CAD, "jitter": CAD * (0.5 + u), "burst": CAD * 0.2 * u + 0.25,
                "gap": CAD * (2 + 3 * u), "long": CAD * (6 + 4 * u)}[kind]  # fmt: skip
        out.append((cur, v))
    return out


_POLICIES = [
    None,  # a manifest without ticks: the legacy policy
    (Align.START, Aggregate.MEAN, 0.0),
    (Align.START, Aggregate.MEAN, 40.0),
    (Align.CENTER, Aggregate.LAST, 25.0),
    (Align.START, Aggregate.FIRST, 0.0),
]


@settings(max_examples=150, deadline=None)
@given(_irregular(), st.sampled_from(_POLICIES), st.integers(1, 4))
def test_offline_and_online_paths_give_the_same_ticks_and_forecasts(
    readings: list[tuple[float, float]], ticks: tuple[Align, Aggregate, float] | None, batch: int
) -> None:
    model = NumpyModel(make_manifest(columns=("a",), max_gap=3, warmup=4, ticks=ticks))
    m = model.manifest
    policy = m.ticks
    # Offline: the converter's resampling and input encoding, the model streamed over each segment.
    raw = RawSeries(np.array([t for t, _ in readings]), np.array([[v] for _, v in readings]), ("a",))
    try:
        grid = resample(raw, policy)
    except ConvertError:
        assume(False)  # mostly late rows, or too few: the converter refuses such a file
        raise
    offline: dict[float, tuple[list[float], bool, float]] = {}
    for seg in grid.segments:
        x = m.pipeline.encode(seg.values, _previous(seg.values), seg.timestamps)
        state = model.ref.zero_state(1)
        for i in range(len(seg)):
            y, state = model.ref.step(x[i : i + 1], state)
            if seg.observed[i]:
                fc = m.pipeline.decode(y, [seg.values[i, 0]])[0]
                offline[float(seg.timestamps[i])] = (fc.tolist(), i + 1 < m.warmup_ticks, float(seg.values[i, 0]))
    # Online: the engine, fed in batches of a few readings.
    eng = engine_for(model)
    online: dict[float, tuple[list[float], bool]] = {}
    outcomes: Counter[Outcome] = Counter()
    rs = [Reading("s", (v,), t, float(i)) for i, (t, v) in enumerate(readings)]
    for k in range(0, len(rs), batch):
        res = eng.process(rs[k : k + batch])
        outcomes.update(res.outcomes)
        for f in res.forecasts:
            assert f.ts not in online
            online[f.ts] = (f.values.tolist(), f.warming_up)
    assert sum(outcomes.values()) == len(readings)
    offline_counts = {Outcome.AGGREGATED: grid.n_aggregated, Outcome.LATE: grid.n_late,
                      Outcome.DUPLICATE: grid.n_duplicate}  # fmt: skip
    assert {o: outcomes[o] for o in offline_counts} == offline_counts
    # Same ticks: every forecast online is one offline (bit for bit), and offline has only the ticks
    # still open online (flushed at the end of the file) and those of segments too short to train on.
    all_ticks, _ = ticks_of(policy, [(t, (v,)) for t, v in readings], 1)
    still_open = {t.ts for t in all_ticks} - {t.ts for t in _closed_online(policy, readings)}
    for ts, (values, warming) in online.items():
        if ts in offline:
            assert (values, warming) == offline[ts][:2]
        else:
            assert ts in {t.ts for t in all_ticks}  # a one-tick segment the converter drops
    assert set(offline) - set(online) <= still_open
    assert len(still_open & {t.ts for t in all_ticks if t.observed}) <= 2


def _closed_online(policy: TickPolicy, readings: list[tuple[float, float]]) -> list[Tick]:
    s = StreamTicks.empty(1)
    out: list[Tick] = []
    for ts, v in readings:
        out += policy.push(s, ts, (v,))[1]
    return out


# -- the bundled model, a fast sensor ------------------------------------------------------------


def test_a_10_s_sensor_into_the_30_minute_model() -> None:
    """50 readings an hour... 360: one forecast per 30 minutes, warm-up counted in ticks, outcomes add up."""
    bundle = load_model(MODEL_DIR)
    m = bundle.manifest
    assert m.cadence_s == 1800 and m.warmup_ticks == 48 and m.tick_policy is None  # a manifest from before ticks
    eng = Engine(load_step_model(bundle), StateTable(m.layers, 1, 10))
    t0 = 959_040_000.0  # 2000-05-23T00:00:00Z
    n = 6 * 60 * 30  # 30 hours every 10 s
    forecasts = []
    outcomes: Counter[Outcome] = Counter()
    for i in range(n):
        r = Reading("kitchen", (30000.0 + 2000 * math.sin(i / 2000),), t0 + 10.0 * i, float(i))
        res = eng.process([r])
        outcomes.update(res.outcomes)
        forecasts += res.forecasts
    assert sum(outcomes.values()) == n
    assert len(forecasts) == outcomes[Outcome.PROCESSED] == 61  # ticks 00:00, 00:30, ... 30:00 (centred buckets)
    assert outcomes[Outcome.LATE] == n - 61  # later readings of a tick its first reading closed
    assert np.all(np.diff([f.ts for f in forecasts]) == 1800.0)
    assert [f.warming_up for f in forecasts] == [True] * 47 + [False] * 14  # 48 ticks = 24 h, not 8 minutes
    assert forecasts[47].ts - t0 == 47 * 1800.0
