"""The shared feature pipeline: calendar phases, diff/level scaling, decode, gap policy."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.features import (
    LEVEL_CLIP,
    FeatureKind,
    FeaturePipeline,
    FeatureSpec,
    OutputKind,
    OutputSpec,
    calendar_features,
    record_history,
    seasonal_changes,
    seasonal_changes_from_history,
    seasonal_changes_row,
    zone_offset,
    zone_offsets,
)


def _utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp()


def _pipeline(
    kind: OutputKind = OutputKind.DELTA, utc_offset_s: float = 0.0, timezone: str | None = None
) -> FeaturePipeline:
    return FeaturePipeline(
        columns=("a", "b"),
        features=(
            FeatureSpec("a_diff", FeatureKind.DIFF, "a", scale=2.0),
            FeatureSpec("b_diff", FeatureKind.DIFF, "b", scale=0.5),
            FeatureSpec("a_level", FeatureKind.LEVEL, "a", center=10.0, scale=5.0),
            FeatureSpec("tod_sin", FeatureKind.TOD_SIN),
            FeatureSpec("dow_cos", FeatureKind.DOW_COS),
        ),
        output=OutputSpec(target="a", horizon=3, kind=kind, center=10.0, scale=4.0),
        utc_offset_s=utc_offset_s,
        timezone=timezone,
    )


def test_calendar_phases() -> None:
    kinds = [FeatureKind.TOD_SIN, FeatureKind.TOD_COS, FeatureKind.DOW_SIN, FeatureKind.DOW_COS]
    sunday_midnight = _utc(2000, 6, 4)  # a Sunday: the week's phase 0
    f = calendar_features([sunday_midnight, sunday_midnight + 6 * 3600, _utc(2000, 6, 8, 12)], kinds)
    np.testing.assert_allclose(f[0], [0, 1, 0, 1], atol=1e-12)
    np.testing.assert_allclose(f[1, :2], [1, 0], atol=1e-12)  # 06:00 is a quarter day
    week_phase = 2 * np.pi * 4.5 / 7  # Thursday noon
    np.testing.assert_allclose(f[2], [0, -1, np.sin(week_phase), np.cos(week_phase)], atol=1e-12)
    # A fixed UTC offset shifts the phase: 22:00 UTC at +2 h is local midnight.
    shifted = calendar_features([sunday_midnight - 2 * 3600], kinds, utc_offset_s=2 * 3600)
    np.testing.assert_allclose(shifted[0], [0, 1, 0, 1], atol=1e-12)
    with pytest.raises(ValueError):
        calendar_features([0.0], [FeatureKind.DIFF])


def test_encode_diff_level_calendar() -> None:
    p = _pipeline()
    t = _utc(2000, 6, 4, 6)  # Sunday 06:00
    x = p.encode([[12.0, 1.0]], [[10.0, 2.0]], [t])
    assert x.dtype == np.float32 and x.shape == (1, 5)
    np.testing.assert_allclose(x[0], [1.0, -2.0, 0.4, 1.0, np.cos(2 * np.pi * 0.25 / 7)], atol=1e-6)


def test_first_tick_difference_is_zero_and_level_is_clipped() -> None:
    p = _pipeline()
    x = p.encode([[1000.0, 1.0], [-1000.0, 1.0]], [[np.nan, np.nan], [np.nan, 0.0]], [0.0, 0.0])
    assert x[0, 0] == 0 and x[0, 1] == 0 and x[1, 1] == 2.0
    assert x[0, 2] == LEVEL_CLIP and x[1, 2] == -LEVEL_CLIP


def test_encode_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="shape"):
        _pipeline().encode([[1.0]], [[1.0]], [0.0])


def test_decode_delta_is_persistence_plus_scaled_change() -> None:
    p = _pipeline(OutputKind.DELTA)
    out = p.decode([[0.0, 0.5, -1.0]], [100.0])
    np.testing.assert_allclose(out, [[100.0, 102.0, 96.0]])
    # Persistence is the network's zero, whatever the level: a trending series stays in range.
    np.testing.assert_allclose(p.decode(np.zeros((2, 3)), [5.0, 5000.0]), [[5.0] * 3, [5000.0] * 3])


def test_decode_level() -> None:
    p = _pipeline(OutputKind.LEVEL)
    np.testing.assert_allclose(p.decode([[0.0, 1.0, -1.0]], [123.0]), [[10.0, 14.0, 6.0]])


def test_pipeline_round_trip_and_validation() -> None:
    p = _pipeline(utc_offset_s=3600.0)
    assert FeaturePipeline.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="target"):
        FeaturePipeline(columns=("a",), features=(), output=OutputSpec(target="z", horizon=1))
    with pytest.raises(ValueError, match="unknown column"):
        FeaturePipeline(
            columns=("a",),
            features=(FeatureSpec("q", FeatureKind.DIFF, "q"),),
            output=OutputSpec(target="a", horizon=1),
        )
    with pytest.raises(ValueError, match="scale"):
        FeatureSpec.from_dict({"name": "a", "kind": "diff", "column": "a", "scale": 0})
    with pytest.raises(ValueError, match="horizon"):
        OutputSpec.from_dict({"target": "a", "horizon": 0})


def test_named_zone_follows_daylight_saving_time() -> None:
    """Europe/Berlin: 09:00 local is 08:00 UTC in winter and 07:00 UTC in summer; both read as 09:00."""
    p = _pipeline(timezone="Europe/Berlin")
    winter, summer = _utc(2024, 3, 29, 8), _utc(2024, 4, 2, 7)  # DST began on 31 March 2024
    x = p.encode([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [winter, summer])
    nine = math.sin(2 * math.pi * 9 / 24)
    np.testing.assert_allclose(x[:, 3], [nine, nine], atol=1e-6)
    fixed = _pipeline(utc_offset_s=3600.0).encode([[1.0, 1.0]], [[1.0, 1.0]], [summer])
    assert abs(float(fixed[0, 3]) - nine) > 0.1  # a fixed offset is an hour off in summer
    # The offset changes exactly at the transition (01:00 UTC), and arrays agree with scalars.
    change = _utc(2024, 3, 31, 1)
    assert zone_offset("Europe/Berlin", change - 1) == 3600.0 and zone_offset("Europe/Berlin", change) == 7200.0
    ts = np.array([change - 900.5, change - 1, change, change + 1, _utc(2024, 10, 27, 1) - 1, _utc(2024, 10, 27, 1)])
    assert zone_offsets("Europe/Berlin", ts).tolist() == [zone_offset("Europe/Berlin", t) for t in ts.tolist()]
    assert zone_offsets("Europe/Berlin", ts).tolist()[-2:] == [7200.0, 3600.0]


def test_zone_is_stored_and_checked() -> None:
    p = _pipeline(timezone="Australia/Melbourne")
    d = p.to_dict()
    assert d["timezone"] == "Australia/Melbourne" and FeaturePipeline.from_dict(d) == p
    assert "timezone" not in _pipeline().to_dict()  # manifests without a zone stay as they were
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        _pipeline(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="not both"):
        _pipeline(timezone="Europe/Berlin", utc_offset_s=3600.0)


_row = st.tuples(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.one_of(st.just(math.nan), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.floats(min_value=0, max_value=5e9, allow_nan=False),
)


@settings(max_examples=400, deadline=None)
@given(_row, st.sampled_from([(0.0, None), (3600.0, None), (-16200.0, None), (0.0, "Europe/Berlin"),
                              (0.0, "America/St_Johns")]))  # fmt: skip
def test_encode_row_is_encode_bit_for_bit(row: tuple[float, ...], zone: tuple[float, str | None]) -> None:
    v0, v1, p0, p1, ts = row
    p = _pipeline(utc_offset_s=zone[0], timezone=zone[1])
    want = p.encode([[v0, v1]], [[p0, p1]], [ts])
    got = p.encode_row((v0, v1), (p0, p1), ts)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _seasonal_pipeline(season: int, leads: tuple[int, ...]) -> FeaturePipeline:
    base = _pipeline()
    extra = tuple(
        FeatureSpec(f"s{j}", FeatureKind.SEASONAL, "a", scale=0.5 * j, season=season, lead=j) for j in leads
    )
    return FeaturePipeline(base.columns, base.features + extra, base.output)


def test_seasonal_inputs_are_last_seasons_change_round_trip_and_are_checked() -> None:
    """x_j = (y_{t-m+j} - y_{t-m}) / scale, 0 where the stretch is too short; the spec round-trips and
    refuses leads outside 1..m, another column than the target and non-integer seasons."""
    p = _seasonal_pipeline(4, (1, 2, 4))
    assert FeaturePipeline.from_dict(p.to_dict()) == p and p.history_ticks == 4
    y = np.array([1.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    ch = seasonal_changes(y, p)
    assert ch is not None and ch.shape == (7, 3)
    assert np.isnan(ch[:4]).all()  # y_{t-4} does not exist yet
    assert ch[4].tolist() == [3.0 - 1.0, 4.0 - 1.0, 16.0 - 1.0]  # lead 4 reads the tick itself
    assert ch[6].tolist() == [8.0 - 4.0, 16.0 - 4.0, 64.0 - 4.0]
    values = np.column_stack([y, np.zeros(7)])
    x = p.encode(values, np.vstack([[np.nan, np.nan], values[:-1]]), np.zeros(7), ch)
    np.testing.assert_allclose(x[:, -3:], np.nan_to_num(ch / [0.5, 1.0, 2.0]).astype(np.float32))
    assert seasonal_changes(y, _pipeline()) is None and _pipeline().history_ticks == 0
    with pytest.raises(ValueError, match="lead"):
        FeatureSpec("s", FeatureKind.SEASONAL, "a", season=3, lead=4)
    with pytest.raises(ValueError, match="lead"):
        FeatureSpec("s", FeatureKind.SEASONAL, "a", season=3, lead=0)
    with pytest.raises(ValueError, match="target"):
        FeaturePipeline(("a", "b"), (FeatureSpec("s", FeatureKind.SEASONAL, "b", season=3, lead=1),),
                        OutputSpec(target="a", horizon=1))  # fmt: skip
    d = {"name": "s", "kind": "seasonal", "column": "a", "scale": 1.0, "season": 24.5, "lead": 1}
    with pytest.raises(ValueError, match="whole numbers"):
        FeatureSpec.from_dict(d)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(0, 6),
    st.lists(st.integers(0, 30), min_size=1, max_size=3),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
)
def test_the_ring_gives_the_same_seasonal_inputs_as_the_whole_history(
    season: int, wider: int, restarts: list[int], series: list[float]
) -> None:
    """Online (a ring of the last M >= m targets, the current tick not yet in it) equals offline (the
    whole stretch since the stream's last restart) bit for bit, on the batch and the scalar path."""
    p = _seasonal_pipeline(season, tuple(range(1, season + 1)))
    ring = np.full((2, season + wider), np.nan)
    stretch: list[float] = []
    index = 0
    for i, v in enumerate(series):
        if i in restarts:
            stretch, index = [], 0
        stretch.append(v)
        want = seasonal_changes(np.asarray(stretch), p)
        assert want is not None
        got = seasonal_changes_from_history(ring, np.array([1]), np.array([index]), np.array([v]), p)
        np.testing.assert_array_equal(got[0], want[-1])
        np.testing.assert_array_equal(seasonal_changes_from_history(ring, 1, index, v, p), want[-1])
        np.testing.assert_array_equal(seasonal_changes_row(ring[1].tolist(), index, v, p), want[-1])
        np.testing.assert_array_equal(seasonal_changes_row(ring[1], index, v, p), want[-1])
        record_history(ring, np.array([1]), np.array([index]), [v])
        index += 1


def test_encode_row_with_seasonal_inputs_is_encode_bit_for_bit() -> None:
    p = _seasonal_pipeline(3, (1, 2))
    for changes in ([0.3, -7.25], [math.nan, 1e5], [math.nan, math.nan]):
        want = p.encode([[1.0, 2.0]], [[0.5, 1.0]], [1e9], [changes])
        np.testing.assert_array_equal(p.encode_row((1.0, 2.0), (0.5, 1.0), 1e9, changes), want)
    # no changes at all: a stream with too little history, zeros
    assert p.encode_row((1.0, 2.0), (0.5, 1.0), 1e9)[0, -2:].tolist() == [0.0, 0.0]
    assert p.encode([[1.0, 2.0]], [[0.5, 1.0]], [1e9])[0, -2:].tolist() == [0.0, 0.0]
