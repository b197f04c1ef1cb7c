"""Engine: tick policy, gap filling, warm-up, online error, model swap; batched == one reading at a time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.engine import Engine
from edge_lstm.features import FeatureKind, FeaturePipeline, FeatureSpec, OutputSpec
from edge_lstm.intervals import Intervals
from edge_lstm.modelspec import Manifest, Quantization, load_model
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import Reading
from edge_lstm.reference import LSTMLayerWeights, ReferenceModel, ReferenceWeights
from edge_lstm.runtime import load_step_model
from edge_lstm.state import StateTable
from edge_lstm.ticks import Aggregate, Align, TickPolicy
from tests.support.offline import stream_forecasts

CADENCE = 60.0
T0 = 1_716_998_400.0  # on the minute grid
MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "taylor"


def make_manifest(layers: tuple[int, ...] = (5, 3), horizon: int = 3, columns: tuple[str, ...] = ("a", "b"),
                  warmup: int = 3, max_gap: int = 4, name: str = "fake",
                  ticks: tuple[Align, Aggregate, float] | None = None) -> Manifest:  # fmt: skip
    feats = [FeatureSpec(f"d_{c}", FeatureKind.DIFF, c, 0.0, 2.0) for c in columns]
    feats += [FeatureSpec(f"l_{c}", FeatureKind.LEVEL, c, 10.0, 5.0) for c in columns]
    feats += [FeatureSpec("tod_sin", FeatureKind.TOD_SIN), FeatureSpec("tod_cos", FeatureKind.TOD_COS)]
    pipeline = FeaturePipeline(columns, tuple(feats), OutputSpec(columns[0], horizon, scale=3.0))
    return Manifest(name=name, sha256=f"{abs(hash((layers, name))):064d}"[-64:], quantization=Quantization.FLOAT32,
                    pipeline=pipeline, cadence_s=CADENCE, layers=layers, target_units="u",
                    warmup_ticks=warmup, max_gap_ticks=max_gap,
                    tick_policy=None if ticks is None else TickPolicy(CADENCE, 0.0, *ticks, max_gap))  # fmt: skip


class NumpyModel:
    """A real (numpy) LSTM with random weights, standing in for the interpreter in unit tests."""

    runtime_name = "numpy"
    runtime_version = "test"

    def __init__(self, manifest: Manifest, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        layers, d = [], manifest.pipeline.n_features
        for h in manifest.layers:
            layers.append(LSTMLayerWeights(rng.normal(0, 0.7, (d, 4 * h)).astype(np.float32),
                                           rng.normal(0, 0.7, (h, 4 * h)).astype(np.float32),
                                           rng.normal(0, 0.2, 4 * h).astype(np.float32)))  # fmt: skip
            d = h
        k = manifest.horizon
        weights = ReferenceWeights(tuple(layers), rng.normal(0, 0.5, (d, k)).astype(np.float32),
                                   rng.normal(0, 0.1, k).astype(np.float32))  # fmt: skip
        self.manifest = manifest
        self.ref = ReferenceModel(weights)
        self.calls: list[int] = []

    def step(self, x: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        self.calls.append(int(x.shape[0]))
        return self.ref.step(x, list(state))


def engine_for(model: NumpyModel | object, capacity: int = 100, **kw: object) -> Engine:
    m = model.manifest  # type: ignore[attr-defined]
    return Engine(model, StateTable(m.layers, len(m.pipeline.columns), capacity), **kw)  # type: ignore[arg-type]


def rd(stream: str, tick: float, *values: float) -> Reading:
    return Reading(stream, tuple(values), T0 + tick * CADENCE, 0.5)


def sequential(
    model: NumpyModel, readings: Sequence[Reading], capacity: int = 100
) -> dict[str, list[tuple[np.ndarray, bool]]]:
    """The oracle for batching: the same readings through a fresh engine, one reading per call."""
    eng = engine_for(model, capacity)
    out: dict[str, list[tuple[np.ndarray, bool]]] = {}
    for r in readings:
        for f in eng.process([r]).forecasts:
            out.setdefault(f.stream, []).append((f.values, f.warming_up))
    return out


# -- time policy ----------------------------------------------------------------------------------


def test_one_step_for_a_batch_without_gaps_and_counts() -> None:
    model = NumpyModel(make_manifest())
    eng = engine_for(model)
    res = eng.process([rd("s1", 0, 1, 2), rd("s2", 0, 3, 4)])
    assert model.calls == [2]
    assert res.outcomes == {Outcome.PROCESSED: 2}
    assert [f.stream for f in res.forecasts] == ["s1", "s2"]
    assert all(f.values.shape == (3,) and f.model_id == "fake@" + model.manifest.sha256[:12] for f in res.forecasts)
    assert res.batch_size == 2 and res.model_steps == 1 and res.inference_seconds >= 0


def test_late_and_duplicates_are_dropped_and_counted() -> None:
    model = NumpyModel(make_manifest())
    eng = engine_for(model)
    eng.process([rd("s1", 5, 1, 1), rd("s2", 5, 1, 1)])
    res = eng.process([rd("s1", 4, 2, 2), rd("s2", 5, 2, 2), rd("s3", 0, 2, 2)])
    assert res.outcomes == {Outcome.LATE: 1, Outcome.DUPLICATE: 1, Outcome.PROCESSED: 1}
    assert [f.stream for f in res.forecasts] == ["s3"]
    assert eng.table.last_ts[eng.table.row("s1")] == T0 + 5 * CADENCE  # unchanged
    res = eng.process([rd("s1", 4, 2, 2), rd("s2", 5, 2, 2)])
    assert res.outcomes == {Outcome.LATE: 1, Outcome.DUPLICATE: 1} and model.calls == [2, 1]


def test_mean_ticks_close_when_a_reading_passes_their_end() -> None:
    """Several readings per tick: one model step per closed tick, at the first reading of a later tick."""
    model = NumpyModel(make_manifest(ticks=(Align.START, Aggregate.MEAN, 0.0), warmup=1))
    eng = engine_for(model)
    res = eng.process([rd("s", 0.1, 1, 2), rd("s", 0.5, 3, 4), rd("s", 0.9, 5, 6)])
    assert res.outcomes == {Outcome.PROCESSED: 1, Outcome.AGGREGATED: 2} and res.forecasts == []
    assert model.calls == []
    res = eng.process([rd("s", 1.0, 7, 8)])  # at the tick's end: closes it
    assert res.outcomes == {Outcome.PROCESSED: 1} and model.calls == [1]
    (f,) = res.forecasts
    assert f.ts == T0 and f.received == 0.5
    fresh = engine_for(NumpyModel(make_manifest(warmup=1))).process([rd("x", 0, 3, 4)]).forecasts[0]
    np.testing.assert_array_equal(f.values, fresh.values)  # the tick's value is the mean (3, 4)


def test_short_gap_is_filled_with_extra_steps_only_for_that_stream() -> None:
    model = NumpyModel(make_manifest(max_gap=4))
    eng = engine_for(model)
    eng.process([rd("s1", 0, 1, 1), rd("s2", 0, 1, 1)])
    model.calls.clear()
    res = eng.process([rd("s1", 4, 5, 5), rd("s2", 1, 2, 2)])  # s1: 3 filled ticks, s2: none
    assert model.calls == [2, 1, 1, 1]  # the j-th tick of every stream in the j-th step
    assert res.model_steps == 4 and res.batch_size == 2 and len(res.forecasts) == 2
    assert eng.table.ticks[eng.table.row("s1")] == 5 and eng.table.ticks[eng.table.row("s2")] == 2
    assert res.resets == {}


def test_long_gap_resets_state() -> None:
    model = NumpyModel(make_manifest(max_gap=4))
    eng = engine_for(model)
    for k in range(3):
        eng.process([rd("s1", k, k, k)])
    model.calls.clear()
    res = eng.process([rd("s1", 2 + 5, 9, 9)])
    assert res.resets == {"gap": 1}
    assert model.calls == [1]
    assert eng.table.ticks[eng.table.row("s1")] == 1
    fresh = engine_for(model).process([rd("x", 7, 9, 9)]).forecasts[0]
    np.testing.assert_allclose(res.forecasts[0].values, fresh.values)


def test_jittered_timestamps_stay_on_their_tick() -> None:
    """Legacy (centred) buckets: a reading belongs to the nearest grid point, whatever its jitter."""
    model = NumpyModel(make_manifest())
    eng = engine_for(model)
    eng.process([rd("s1", 0, 1, 1)])
    model.calls.clear()
    assert [f.ts for f in eng.process([rd("s1", 1.3, 1, 1)]).forecasts] == [T0 + CADENCE]
    assert eng.process([rd("s1", 1.45, 1, 1)]).outcomes == {Outcome.LATE: 1}  # tick 1 already taken
    eng.process([rd("s1", 2.6, 1, 1)])  # tick 3: tick 2 filled
    eng.process([rd("s1", 3.6, 1, 1)])  # tick 4
    assert model.calls == [1, 1, 1, 1]


def test_warm_up_flag() -> None:
    eng = engine_for(NumpyModel(make_manifest(warmup=3)))
    flags = [eng.process([rd("s", k, 1, 1)]).forecasts[0].warming_up for k in range(4)]
    assert flags == [True, True, False, False]


def test_one_step_error_against_the_previous_forecast() -> None:
    model = NumpyModel(make_manifest(warmup=1))
    eng = engine_for(model)
    f0 = eng.process([rd("s", 0, 10, 1)]).forecasts[0]
    res = eng.process([rd("s", 1, 12, 1)])
    assert res.abs_errors == [("s", pytest.approx(abs(f0.values[0] - 12.0)))]
    res = eng.process([rd("s", 3, 13, 1)])  # after a filled gap: not scored
    assert res.abs_errors == []


def test_no_error_scored_for_forecasts_made_while_warming_up() -> None:
    eng = engine_for(NumpyModel(make_manifest(warmup=3)))
    errors = [eng.process([rd("s", k, k, 1)]).abs_errors for k in range(4)]
    assert [len(e) for e in errors] == [0, 0, 0, 1]


def test_repeated_stream_in_one_batch_is_processed_in_order() -> None:
    model = NumpyModel(make_manifest())
    batched = engine_for(model).process([rd("s", 0, 1, 1), rd("t", 0, 1, 1), rd("s", 1, 2, 2)])
    assert [f.stream for f in batched.forecasts] == ["s", "t", "s"]
    assert batched.outcomes == {Outcome.PROCESSED: 3}
    one = engine_for(model)
    one.process([rd("s", 0, 1, 1)])
    np.testing.assert_allclose(batched.forecasts[2].values, one.process([rd("s", 1, 2, 2)]).forecasts[0].values)


def test_evictions_are_reported() -> None:
    eng = engine_for(NumpyModel(make_manifest()), capacity=2)
    eng.process([rd("a", 0, 1, 1), rd("b", 0, 1, 1)])
    res = eng.process([rd("c", 0, 1, 1), rd("d", 0, 1, 1), rd("e", 0, 1, 1)])
    assert res.evictions == 3 and res.outcomes == {Outcome.PROCESSED: 3} and len(eng.table) == 2


def test_table_must_fit_the_model() -> None:
    with pytest.raises(ValueError, match="layout"):
        Engine(NumpyModel(make_manifest()), StateTable((4,), 2, 10))  # type: ignore[arg-type]


def test_max_gap_override() -> None:
    model = NumpyModel(make_manifest(max_gap=4))
    eng = engine_for(model, max_gap_ticks=1)
    eng.process([rd("s", 0, 1, 1)])
    assert eng.process([rd("s", 2, 1, 1)]).resets == {"gap": 1}


# -- model swap -----------------------------------------------------------------------------------


def test_replace_model_with_same_layout_keeps_state() -> None:
    m1 = NumpyModel(make_manifest(), seed=1)
    m2 = NumpyModel(dataclasses.replace(make_manifest(), name="other"), seed=2)
    eng = engine_for(m1)
    eng.process([rd("s", 0, 1, 1)])
    state = [a[eng.table.row("s")].copy() for a in eng.table.state]
    assert eng.replace_model(m2) is True
    assert all(np.array_equal(a[eng.table.row("s")], b) for a, b in zip(eng.table.state, state, strict=True))
    res = eng.process([rd("s", 1, 2, 2)])
    assert res.resets == {} and res.forecasts[0].model_id.startswith("other@")
    assert eng.table.ticks[eng.table.row("s")] == 2


def test_replace_model_with_other_layers_resets_everything() -> None:
    m1 = NumpyModel(make_manifest())
    m2 = NumpyModel(make_manifest(layers=(4,), name="small"))
    eng = engine_for(m1)
    eng.process([rd("s", 0, 1, 1), rd("t", 0, 1, 1)])
    assert eng.replace_model(m2) is False
    assert eng.table.layers == (4,) and set(eng.table.streams()) == {"s", "t"}
    res = eng.process([rd("s", 1, 2, 2)])
    assert res.resets == {"model_change": 2}
    assert res.forecasts[0].warming_up and eng.table.ticks[eng.table.row("s")] == 1
    assert eng.process([rd("s", 2, 2, 2)]).resets == {}


# -- batched == sequential -------------------------------------------------------------------------

_offsets = st.one_of(
    st.sampled_from([1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 0.0, -1.0, 7.0]),
    st.floats(min_value=0.6, max_value=1.4),
)


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[dict[str, list[Reading]], list[int]]:
    per_stream: dict[str, list[Reading]] = {}
    for s in range(draw(st.integers(1, 5))):
        tick = draw(st.floats(min_value=0, max_value=10))
        rs = []
        for _ in range(draw(st.integers(1, 12))):
            v = draw(st.floats(min_value=-20, max_value=40, allow_nan=False))
            rs.append(rd(f"s{s}", tick, v, v / 2))
            tick += draw(_offsets)
        per_stream[f"s{s}"] = rs
    order = draw(st.permutations([i for i, rs in enumerate(per_stream.values()) for _ in rs]))
    sizes = draw(st.lists(st.integers(1, 6), min_size=len(order), max_size=len(order)))
    return per_stream, [*order, *sizes]


_policies = st.sampled_from(
    [
        None,
        (Align.START, Aggregate.MEAN, 0.0),
        (Align.CENTER, Aggregate.LAST, 30.0),
        (Align.START, Aggregate.MEAN, 45.0),
    ]
)


@settings(max_examples=60, deadline=None)
@given(_scenario(), st.booleans(), _policies)
def test_batched_equals_sequential(
    scenario: tuple[dict[str, list[Reading]], list[int]], distinct: bool, ticks: tuple[Align, Aggregate, float] | None
) -> None:
    per_stream, plan = scenario
    model = NumpyModel(make_manifest(max_gap=4, warmup=3, ticks=ticks))
    n = sum(len(v) for v in per_stream.values())
    order, sizes = plan[:n], plan[n:]
    names = list(per_stream)
    cursors = dict.fromkeys(names, 0)
    interleaved = []
    for i in order:
        s = names[i]
        interleaved.append(per_stream[s][cursors[s]])
        cursors[s] += 1
    batches: list[list[Reading]] = []
    pos = 0
    for size in sizes:
        if pos >= n:
            break
        batch: list[Reading] = []
        while pos < n and len(batch) < size:
            if distinct and any(r.stream == interleaved[pos].stream for r in batch):
                break
            batch.append(interleaved[pos])
            pos += 1
        batches.append(batch)
    eng = engine_for(model)
    got: dict[str, list[tuple[np.ndarray, bool]]] = {s: [] for s in names}
    counted = 0
    for b in batches:
        res = eng.process(b)
        counted += sum(res.outcomes.values())
        for f in res.forecasts:
            got[f.stream].append((f.values, f.warming_up))
    assert counted == n
    for s, rs in per_stream.items():
        want = sequential(model, rs).get(s, [])
        assert len(got[s]) == len(want)
        for (gv, gw), (wv, ww) in zip(got[s], want, strict=True):
            assert gw == ww
            np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)


_steps = st.lists(
    st.tuples(
        st.integers(0, 4),  # stream
        st.one_of(st.sampled_from([1.0, 1.0, 1.0, 0.0, -1.0, 9.0]), st.floats(min_value=-0.6, max_value=6.6)),
        st.floats(min_value=-20, max_value=40, allow_nan=False),
    ),
    min_size=1,
    max_size=40,
)


def _with_seasonal_inputs(m: Manifest, season: int, leads: Sequence[int] = (1, 2, 3)) -> Manifest:
    """``m`` with seasonal inputs of the target (column ``a``) at these leads (those up to the season)."""
    extra = tuple(
        FeatureSpec(f"season_{j}", FeatureKind.SEASONAL, "a", scale=1.5 + j, season=season, lead=j)
        for j in leads
        if j <= season
    )
    return dataclasses.replace(m, pipeline=dataclasses.replace(m.pipeline, features=m.pipeline.features + extra))


@settings(max_examples=80, deadline=None)
@given(_steps, st.integers(2, 6), _policies, st.sampled_from([0, 1, 4]), st.booleans(), st.sampled_from([0, 1, 3, 5]))
def test_single_tick_path_equals_the_batch_path_exactly(
    steps: list[tuple[int, float, float]],
    cap: int,
    ticks: tuple[Align, Aggregate, float] | None,
    season: int,
    differenced: bool,
    input_season: int,
) -> None:
    """A model step of one tick runs on scalars: same forecasts, counts, errors, anomaly checks and state,
    with and without the seasonal blend (seasonal naive, or seasonally differenced at some horizons) and
    seasonal inputs (of another season than the blend's, or the same)."""
    iv = Intervals((0.8, 0.95), [[-0.5, -1.0, -1.5], [-1.0, -2.0, -3.0]], [[0.4, 1.0, 1.5], [0.9, 2.0, 3.0]])
    m = dataclasses.replace(make_manifest(max_gap=4, warmup=3, ticks=ticks), intervals=iv)
    if input_season:
        m = _with_seasonal_inputs(m, input_season)
    flags = (True, False, True) if differenced else ()
    model = NumpyModel(_blended(m, season, (0.5, 1.0, 0.25), flags) if season else m)
    ticks: dict[int, float] = {}
    readings = []
    for s, jump, v in steps:  # per stream: on time, jittered, late, duplicate, short and long gaps
        ticks[s] = ticks.get(s, 0.0) + jump
        readings.append(rd(f"s{s}", ticks[s], v, v / 2))
    scalar, vector = engine_for(model, cap), engine_for(model, cap)
    vector.row_path = False
    for r in readings:
        a, b = scalar.process([r]), vector.process([r])
        assert (a.outcomes, a.resets, a.evictions, a.batch_size, a.model_steps, a.step_sizes) == (
            b.outcomes,
            b.resets,
            b.evictions,
            b.batch_size,
            b.model_steps,
            b.step_sizes,
        )
        assert a.abs_errors == b.abs_errors
        assert (a.anomaly_checks, a.anomalies) == (b.anomaly_checks, b.anomalies)
        assert a.anomaly_checks == len(a.abs_errors)
        assert [(f.stream, f.ts, f.warming_up, f.values.tolist(), f.anomaly_score) for f in a.forecasts] == [
            (f.stream, f.ts, f.warming_up, f.values.tolist(), f.anomaly_score) for f in b.forecasts
        ]
    ta, tb = scalar.table.to_arrays(), vector.table.to_arrays()
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)


def test_batched_equals_sequential_with_the_bundled_model() -> None:
    bundle = load_model(MODEL_DIR)
    model = load_step_model(bundle)
    m = bundle.manifest
    rng = np.random.default_rng(7)
    series = {f"s{i}": 29000 + 3000 * np.sin(np.arange(60) / 7 + i) + rng.normal(0, 200, 60) for i in range(6)}
    cad = m.cadence_s

    def reading(s: str, k: int) -> Reading:
        return Reading(s, (float(series[s][k]),), T0 + k * cad, 0.0)

    def fresh() -> Engine:
        return Engine(model, StateTable(m.layers, 1, 100))

    batched = fresh()
    got: dict[str, list[np.ndarray]] = {s: [] for s in series}
    for k in range(60):
        if k % 10 == 3:
            continue  # a one-tick hole in every stream: filled
        tick = [reading(s, k) for s in series]
        cut = k % len(tick)  # batch composition changes from tick to tick
        for part in (tick[:cut], tick[cut:]):
            for f in batched.process(part).forecasts:
                got[f.stream].append(f.values)
    for s in series:
        one = fresh()
        want = [one.process([reading(s, k)]).forecasts[0].values for k in range(60) if k % 10 != 3]
        np.testing.assert_allclose(np.array(got[s]), np.array(want), rtol=1e-4, atol=0.5)  # MW


def _blended(m: Manifest, season: int, weights: tuple[float, ...], differenced: tuple[bool, ...] = ()) -> Manifest:
    out = dataclasses.replace(
        m.pipeline.output, season_ticks=season, seasonal_weights=weights, seasonal_differenced=differenced
    )
    return dataclasses.replace(m, pipeline=dataclasses.replace(m.pipeline, output=out))


@pytest.mark.parametrize(
    ("season", "differenced", "ring"),
    [(5, (), 5), (5, (False, True, True), 6), (2, (True, True, False), 5)],
)
def test_seasonal_blend_online_equals_the_offline_blend_through_gaps_resets_and_a_checkpoint(
    season: int, differenced: tuple[bool, ...], ring: int
) -> None:
    """Per stream, the online forecast is the plain forecast plus w_k * (S_k - last reading), S_k taken
    offline from the stream's ticks since its last reset, filled ticks included: seasonal naive s_k, or
    at the differenced horizons last + s_k - r_k (r_k as many seasons before the origin as s_k before
    the forecast tick; with season 2 and horizon 3, two seasons back at h=3); streams in one batch, a
    restored table and a fresh one agree."""
    weights = (0.5, 1.0, 0.25)
    plain_m = make_manifest(max_gap=4)
    model = NumpyModel(_blended(plain_m, season, weights, differenced))
    plain = NumpyModel(plain_m)  # same seed: same network, no blend
    assert model.manifest.pipeline.output.history_ticks == ring
    rng = np.random.default_rng(5)
    # Stream a: a short gap (ticks 9, 10 filled) and a long one (reset at 30); b: no gap; c: starts late.
    ticks = {"a": [*range(0, 9), *range(11, 22), *range(30, 45)], "b": list(range(0, 45)), "c": list(range(20, 45))}
    values = {s: {k: (float(rng.normal(10, 3)), float(rng.normal(0, 1))) for k in ks} for s, ks in ticks.items()}
    eng, ref = engine_for(model), engine_for(plain)
    got: dict[str, list[np.ndarray]] = {s: [] for s in ticks}
    base: dict[str, list[np.ndarray]] = {s: [] for s in ticks}
    for k in range(45):
        batch = [rd(s, k, *values[s][k]) for s in ticks if k in values[s]]
        if k == 25:  # checkpoint and restore mid-run
            eng = Engine(model, StateTable.from_arrays(eng.table.to_arrays(), plain_m.layers, 2, 100))
            assert eng.table.history_ticks == ring
        for f in eng.process(batch).forecasts:
            got[f.stream].append(f.values)
        for f in ref.process(batch).forecasts:
            base[f.stream].append(f.values)
    for s, ks in ticks.items():
        # the stream's ticks since its last reset, filled ticks linearly interpolated
        segments: list[list[float]] = [[]]
        origins: list[tuple[int, int]] = []  # (segment, index in it) of every reading
        for i, k in enumerate(ks):
            if i and k - ks[i - 1] > 4:
                segments.append([])
            elif i and k - ks[i - 1] > 1:
                a, b, n = values[s][ks[i - 1]][0], values[s][k][0], k - ks[i - 1]
                segments[-1] += [a + (b - a) * j / n for j in range(1, n)]
            segments[-1].append(values[s][k][0])
            origins.append((len(segments) - 1, len(segments[-1]) - 1))
        want = []
        for (seg, idx), b, k in zip(origins, base[s], ks, strict=True):
            last = values[s][k][0]
            lean = []
            for h in range(1, 4):
                back = season * math.ceil(h / season)  # r_h's distance before the origin
                s_h = segments[seg][idx + h - back] if idx + h - back >= 0 else math.nan
                r_h = segments[seg][idx - back] if idx - back >= 0 else math.nan
                sea = last + (s_h - r_h) if differenced and differenced[h - 1] else s_h
                lean.append(0.0 if math.isnan(sea) else sea - last)
            want.append(b + np.asarray(weights) * np.array(lean))
        np.testing.assert_allclose(np.array(got[s]), np.array(want), rtol=0, atol=1e-9, err_msg=s)
    # The blend changed forecasts once a season of history was there.
    assert not np.allclose(np.array(got["b"][10:]), np.array(base["b"][10:]))


@pytest.mark.parametrize(("input_season", "blend_season"), [(4, 0), (1, 0), (3, 5), (6, 2)])
def test_seasonal_inputs_online_equal_the_offline_run_through_gaps_resets_and_a_checkpoint(
    input_season: int, blend_season: int
) -> None:
    """A model fed last season's changes (y_{t-m+j} - y_{t-m}): per stream, the engine's forecasts equal
    a cold-start offline run over each stretch between resets (filled ticks interpolated), with
    streams sharing batches and the table restored from its arrays mid-run; the ring is as wide as the
    widest need (the inputs' season or the blend's)."""
    plain_m = make_manifest(max_gap=4)
    m = _with_seasonal_inputs(plain_m, input_season)
    if blend_season:
        m = _blended(m, blend_season, (0.5, 1.0, 0.25), (True, False, True))
    model = NumpyModel(m)
    ring = max(input_season, m.pipeline.output.history_ticks)
    assert m.pipeline.history_ticks == ring
    rng = np.random.default_rng(11)
    ticks = {"a": [*range(0, 9), *range(11, 22), *range(30, 45)], "b": list(range(0, 45)), "c": list(range(20, 45))}
    values = {s: {k: (float(rng.normal(10, 3)), float(rng.normal(0, 1))) for k in ks} for s, ks in ticks.items()}
    eng = engine_for(model)
    got: dict[str, list[np.ndarray]] = {s: [] for s in ticks}
    for k in range(45):
        if k == 25:
            eng = Engine(model, StateTable.from_arrays(eng.table.to_arrays(), plain_m.layers, 2, 100))
            assert eng.table.history_ticks == ring
        for f in eng.process([rd(s, k, *values[s][k]) for s in ticks if k in values[s]]).forecasts:
            got[f.stream].append(f.values)
    for s, ks in ticks.items():
        stretches: list[list[int]] = [[]]
        for i, k in enumerate(ks):
            if i and k - ks[i - 1] > 4:
                stretches.append([])
            stretches[-1].append(k)
        want = []
        for run in stretches:
            grid = np.arange(run[0], run[-1] + 1)
            v = np.column_stack([np.interp(grid, run, [values[s][k][c] for k in run]) for c in (0, 1)])
            fc, _ = stream_forecasts(model, T0 + grid * CADENCE, v)  # type: ignore[arg-type]
            want += [fc[k - run[0]] for k in run]
        # float32 steps of a batch and of one row round differently in the last bits
        np.testing.assert_allclose(np.array(got[s]), np.array(want), rtol=1e-5, atol=1e-5, err_msg=s)
    # The inputs changed the forecasts once a season of history was there.
    plain = engine_for(NumpyModel(_blended(plain_m, blend_season, (0.5, 1.0, 0.25), (True, False, True))
                                  if blend_season else plain_m))  # fmt: skip
    base = [f.values for k in range(45) for f in plain.process([rd("b", k, *values["b"][k])]).forecasts]
    assert not np.allclose(np.array(got["b"][input_season + 1 :]), np.array(base[input_season + 1 :]))


def test_history_costs_nothing_for_a_model_without_the_blend_and_follows_a_model_change() -> None:
    plain = engine_for(NumpyModel(make_manifest()))
    assert plain.table.history_ticks == 0 and "history" not in plain.table.to_arrays()
    plain.process([rd("s", 0, 1, 1)])
    blended = NumpyModel(_blended(make_manifest(), 24, (0.0, 0.5, 1.0)))
    assert plain.replace_model(blended)  # same layers and columns: state kept, a ring of 24 added
    rows = plain.table.history.shape[0]
    assert plain.table.history_ticks == 24 and 1 <= rows <= 16 < plain.table.allocated  # one stream, not 100 rows
    ring = plain.table.nbytes() - engine_for(NumpyModel(make_manifest())).table.nbytes()
    assert ring == 24 * 8 * rows


class _RingOfRows(np.ndarray):
    """A ring whose rows cannot be copied out whole: a reading may read only the targets it needs."""

    def tolist(self) -> object:  # type: ignore[override]
        raise AssertionError(f"a whole ring row of {self.size} targets copied for one reading")


def test_the_single_tick_path_reads_two_targets_per_seasonal_input_not_the_whole_ring() -> None:
    """With a day of minutes as the season (1,440 targets per stream) a reading's seasonal inputs cost
    two look-ups each; a copy of the row per reading had cost ~50 us, a third of a reading at one
    stream.  The forecasts still equal the batch path's bit for bit."""
    m = _with_seasonal_inputs(make_manifest(), 1440, leads=(1, 3))
    rng = np.random.default_rng(5)
    readings = [rd("s", k, float(rng.normal(10, 3)), float(rng.normal(0, 1))) for k in range(1500)]
    row, batch = engine_for(NumpyModel(m)), engine_for(NumpyModel(m))
    batch.row_path = False
    got: list[np.ndarray] = []
    want: list[np.ndarray] = []
    for i, r in enumerate(readings):
        got += [f.values for f in row.process([r]).forecasts]
        want += [f.values for f in batch.process([r]).forecasts]
        if i == 0:
            row.table.history = row.table.history.view(_RingOfRows)
    assert isinstance(row.table.history, _RingOfRows) and row.table.ticks[0] == 1500
    np.testing.assert_array_equal(np.array(got), np.array(want))
