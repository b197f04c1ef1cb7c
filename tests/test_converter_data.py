"""CSV parsing, cadence, gap policy and bad input of the converter (no TensorFlow, fast)."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest

from converter.cli import main
from converter.data import choose_policy, infer_cadence, load, parse_timestamp, read_csv, resample
from converter.errors import ConvertError
from converter.prepare import (
    LevelMode,
    Part,
    Split,
    assign_parts,
    build_pipeline,
    encode,
    eval_runs,
    season_ticks,
    seasonal_inputs_fit,
    training_windows,
    trends,
)
from edge_lstm.features import FeatureKind
from edge_lstm.ticks import Aggregate, Align


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _series_csv(
    path: Path, n: int = 200, cadence: int = 3600, drop: tuple[int, ...] = (), blank: tuple[int, ...] = ()
) -> Path:
    t0 = 1_700_000_000
    lines = ["ts,v,w"]
    for i in range(n):
        if i in drop:
            continue
        v = "" if i in blank else f"{10 + math.sin(i / 5):.4f}"
        lines.append(f"{t0 + i * cadence},{v},{i}")
    return _write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2000-06-05T00:30:00Z", dt.datetime(2000, 6, 5, 0, 30, tzinfo=dt.timezone.utc).timestamp()),
        ("2000-06-05T02:30:00+02:00", dt.datetime(2000, 6, 5, 0, 30, tzinfo=dt.timezone.utc).timestamp()),
        ("2000-06-05 00:30:00", dt.datetime(2000, 6, 5, 0, 30, tzinfo=dt.timezone.utc).timestamp()),
        ("2010-01-04", dt.datetime(2010, 1, 4, tzinfo=dt.timezone.utc).timestamp()),
        ("2010-03", dt.datetime(2010, 3, 1, tzinfo=dt.timezone.utc).timestamp()),  # monthly data
        ("1700000000", 1_700_000_000.0),
        ("1700000000.5", 1_700_000_000.5),
        ("1700000000123", 1_700_000_000.123),
        ("1700000000123456", 1_700_000_000.123456),
        ("1700000000123456789", 1_700_000_000.123456789),
        ("-86400", -86_400.0),  # history before 1970 is read (the daemon refuses it live)
    ],
)
def test_parse_timestamp_formats(text: str, expected: float) -> None:
    assert parse_timestamp(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["", "yesterday", "2000-13-01", "nan", "2e20", "6000-01-01T00:00:00Z"])
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


@pytest.mark.parametrize("seconds", [0.0, 1.5, 1_700_000_000.0, 1_700_000_000.25, 99_999_999_999.0])
def test_epoch_numbers_read_as_the_daemon_reads_them(seconds: float) -> None:
    """One magnitude rule (s, ms, us, ns) for the converter's CSV cells and the daemon's payloads."""
    from edge_lstm.payload import parse_timestamp as daemon_parse

    for scale in (1, 1_000, 1_000_000, 1_000_000_000):
        number = seconds if scale == 1 else round(seconds * scale)
        if number < 1e11 and scale > 1:  # too small to be read as that unit: it is seconds to both
            continue
        assert parse_timestamp(str(number)) == pytest.approx(daemon_parse(number), abs=1e-6)
        assert parse_timestamp(str(number)) == pytest.approx(seconds, abs=1e-4)


def test_rows_the_daemon_would_refuse_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _write(tmp_path / "d.csv", "ts,v\n1950-01-01,1\n1950-02-01,2e13\n1950-03-01,3\n")
    with caplog.at_level("WARNING", logger="converter.data"):
        read_csv(p, "ts", ["v"])
    assert "3 of 3 rows are from before 1970" in caplog.text
    assert "1 value(s) beyond +-1e+12" in caplog.text


def _jittered(n: int, cadence: float, jitter: float, keep: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = 1_700_000_000.0 + np.arange(n) * cadence + rng.uniform(-jitter, jitter, n)
    return t[rng.random(n) < keep]


@pytest.mark.parametrize(
    ("n", "cadence", "jitter", "keep"),
    [(1500, 60.0, 8.0, 1.0), (50, 60.0, 8.0, 1.0), (2000, 60.0, 8.0, 0.7), (2000, 60.0, 8.0, 0.4),
     (1500, 59.5, 3.0, 1.0), (300, 3600.0, 200.0, 1.0), (1000, 0.25, 0.01, 1.0)],
)  # fmt: skip
def test_cadence_of_jittered_readings_is_the_sensors_period(n: int, cadence: float, jitter: float, keep: float) -> None:
    """The median spacing of jittered readings is off (60.6 s for 50 readings every 60 +- 8 s, 64 s with
    30 % missing); the inferred cadence is the period itself, round where the sensor's is."""
    t = _jittered(n, cadence, jitter, keep)
    assert float(np.median(np.diff(t))) != cadence
    assert infer_cadence(t) == cadence


@pytest.mark.parametrize(("n", "cadence"), [(50, 59.95), (200, 59.99), (50, 60.05), (2, 61.37)])
def test_exact_readings_keep_their_cadence_unrounded(n: int, cadence: float) -> None:
    """Rounding is taken only within the fit's own uncertainty: exact readings every 59.95 s are not 60 s."""
    assert infer_cadence(1_700_000_000.0 + np.arange(n) * cadence) == pytest.approx(cadence, abs=1e-6)


def test_a_stray_reading_far_from_the_rest_does_not_bend_the_cadence() -> None:
    """A device whose clock was unset sent one reading at epoch 0: it has no leverage on the fit."""
    t = _jittered(3000, 12.345, 1.2)
    assert infer_cadence(np.concatenate(([0.0], t))) == infer_cadence(t) == 12.345


def test_a_grid_inferred_from_jittered_readings_does_not_drift_through_a_week() -> None:
    """A policy inferred from a day of readings every 60 +- 8 s keeps every reading of the next week on
    its own tick: none late, none filled (a grid 0.03 s off lost 4.5 % of them as late)."""
    from edge_lstm.outcomes import Outcome
    from edge_lstm.ticks import ticks_of

    day = _jittered(1500, 60.0, 8.0, seed=1)
    policy = choose_policy(day)
    week = _jittered(10_080, 60.0, 8.0, seed=2)
    ticks, outcomes = ticks_of(policy, [(float(t), [1.0]) for t in week], 1)
    assert outcomes.count(Outcome.LATE) == 0 and all(t.observed for t in ticks)


def test_irregular_events_keep_the_median_spacing() -> None:
    t = 1_700_000_000.0 + np.cumsum(np.random.default_rng(3).exponential(60.0, 1000))
    assert infer_cadence(t) == float(np.median(np.diff(t)))


def test_empty_and_nan_cells_are_missing_readings_filled_by_the_gap_policy(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", "ts,v\n0,1\n60,\n120,NaN\n180,4\n240,5\n")
    raw = read_csv(p, "ts", ["v"])
    assert np.isnan(raw.values[1, 0]) and np.isnan(raw.values[2, 0])
    grid = resample(raw, choose_policy(raw.timestamps, max_gap_ticks=4))
    assert grid.n_missing == 2 and grid.n_filled == 2 and len(grid.segments) == 1
    seg = grid.segments[0]
    np.testing.assert_allclose(seg.values[:, 0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(seg.timestamps, [0, 60, 120, 180, 240])
    assert seg.observed.tolist() == [True, False, False, True, True]


def test_a_row_with_an_empty_time_cell_is_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = read_csv(_write(tmp_path / "d.csv", "ts,v\n0,1\n,2\n120,3\n  ,4\n"), "ts", ["v"])
    assert raw.timestamps.tolist() == [0, 120] and raw.values[:, 0].tolist() == [1, 3]
    assert "2 row(s) with an empty 'ts' cell dropped" in caplog.text


def test_a_1_hz_log_aggregates_onto_a_60_s_cadence(tmp_path: Path) -> None:
    """A raw sensor log faster than the cadence: one tick per minute, the mean of its readings."""
    t0 = 1_700_000_040  # on the minute
    rows = [f"{t0 + i},{i % 60}" for i in range(3600) if i not in range(600, 630)]  # 30 s missing: no gap
    rows.insert(100, f"{t0 + 50},99")  # a late row (its minute has closed), and a duplicate:
    rows.insert(200, rows[199])
    grid = load(_write(tmp_path / "d.csv", "ts,v\n" + "\n".join(rows) + "\n"), "ts", ["v"], cadence_s=60)
    p = grid.policy
    assert (p.cadence_s, p.aggregate, p.align, p.origin_s) == (60.0, Aggregate.MEAN, Align.START, 0.0)
    (seg,) = grid.segments
    assert len(seg) == 60 and seg.observed.all() and grid.n_filled == 0
    np.testing.assert_allclose(seg.timestamps, t0 + 60 * np.arange(60))
    np.testing.assert_allclose(seg.values[:, 0], [29.5] * 10 + [44.5] + [29.5] * 49)  # minute 10: 30..59 only
    assert (grid.n_late, grid.n_duplicate, grid.n_aggregated) == (1, 1, 3570 - 60)
    last = load(tmp_path / "d.csv", "ts", ["v"], cadence_s=60, aggregate=Aggregate.LAST)
    np.testing.assert_allclose(last.segments[0].values[:, 0], 59.0)


def test_long_gap_splits_the_series_into_segments(tmp_path: Path) -> None:
    p = _series_csv(tmp_path / "d.csv", n=100, drop=tuple(range(40, 50)))
    grid = load(p, "ts", ["v"], max_gap_ticks=4)
    assert [len(s) for s in grid.segments] == [40, 50]
    assert grid.cadence_s == 3600


def test_short_gap_is_interpolated_not_split(tmp_path: Path) -> None:
    p = _series_csv(tmp_path / "d.csv", n=100, drop=(40, 41, 42))
    grid = load(p, "ts", ["v"], max_gap_ticks=4)
    assert [len(s) for s in grid.segments] == [100]
    assert grid.n_filled == 3
    assert (~grid.segments[0].observed).sum() == 3


def test_cadence_is_the_median_spacing_or_given(tmp_path: Path) -> None:
    ts = np.array([0, 60, 120, 300, 360, 420], dtype=np.float64)
    assert infer_cadence(ts) == 60
    p = _series_csv(tmp_path / "d.csv", n=50, cadence=1800)
    assert load(p, "ts", ["v"]).cadence_s == 1800
    grid = load(p, "ts", ["v"], cadence_s=900, max_gap_ticks=4)
    assert grid.cadence_s == 900 and grid.n_filled == 49  # every other tick filled


def test_split_is_chronological_and_targets_never_cross_parts(tmp_path: Path) -> None:
    p = _series_csv(tmp_path / "d.csv", n=400)
    grid = load(p, "ts", ["v", "w"])
    split = Split(0.6, 0.2)
    parts = assign_parts(grid, split)
    assert (np.diff(parts[0]) >= 0).all()
    assert [(parts[0] == q).sum() for q in Part] == [240, 80, 80]
    pipe = build_pipeline(grid, parts, "v", horizon=3, level=LevelMode.TARGET)
    enc = encode(grid, pipe, split)[0]
    # Inputs are exactly FeaturePipeline.encode of (values, previous values).
    v = grid.segments[0].values
    prev = np.vstack([np.full((1, 2), np.nan), v[:-1]])
    np.testing.assert_array_equal(enc.x, pipe.encode(v, prev, grid.segments[0].timestamps))
    # Delta targets in network units, NaN across the train/val boundary and past the end.
    k = 2
    t = 100
    assert enc.y[t, k - 1] == pytest.approx((v[t + k, 0] - v[t, 0]) / pipe.output.scale, rel=1e-5)
    assert np.isnan(enc.y[239, 0]) and np.isfinite(enc.y[238, 0])
    assert np.isnan(enc.y[-1]).all()
    # Scaling comes from the training part only.
    level = next(f for f in pipe.features if f.kind is FeatureKind.LEVEL)
    assert level.center == pytest.approx(v[:240, 0].mean())


def test_windows_and_eval_runs_cover_their_part(tmp_path: Path) -> None:
    p = _series_csv(tmp_path / "d.csv", n=600)
    grid = load(p, "ts", ["v"])
    split = Split()
    parts = assign_parts(grid, split)
    pipe = build_pipeline(grid, parts, "v", horizon=4)
    enc = encode(grid, pipe, split)
    x, y = training_windows(enc, Part.TRAIN, length=64, stride=8, warmup=16)
    assert x.shape[1:] == (64, pipe.n_features) and y.shape[1:] == (64, 4)
    assert np.isfinite(y).any(axis=(1, 2)).all()
    runs = eval_runs(enc, Part.HOLDOUT, warmup=16)
    first_holdout = int(np.flatnonzero(enc[0].part == Part.HOLDOUT)[0])
    assert runs[0].start == first_holdout - 16 and runs[0].score_from == first_holdout and runs[0].stop == 600


def test_calendar_inputs_follow_the_cadence(tmp_path: Path) -> None:
    hourly = load(_series_csv(tmp_path / "h.csv", n=300, cadence=3600), "ts", ["v"])
    daily = load(_series_csv(tmp_path / "d.csv", n=300, cadence=86400), "ts", ["v"])
    kinds_h = {f.kind for f in build_pipeline(hourly, assign_parts(hourly, Split()), "v", 2).features}
    kinds_d = {f.kind for f in build_pipeline(daily, assign_parts(daily, Split()), "v", 2).features}
    assert FeatureKind.TOD_SIN in kinds_h and FeatureKind.DOW_SIN in kinds_h
    assert FeatureKind.TOD_SIN not in kinds_d and FeatureKind.DOW_SIN in kinds_d
    assert season_ticks(1800) == 48 and season_ticks(86400) == 7 and season_ticks(7 * 86400) == 52


def test_seasonal_inputs_one_per_horizon_up_to_the_season_scaled_like_the_series_changes(tmp_path: Path) -> None:
    """auto feeds them when the earliest fold trains on three seasons (the first has no inputs yet); each
    is scaled like the series' own j-tick changes, and encodes last season's change."""
    assert seasonal_inputs_fit(24, 72) and not seasonal_inputs_fit(24, 71) and not seasonal_inputs_fit(1, 1000)
    grid = load(_series_csv(tmp_path / "h.csv", n=300, cadence=3600), "ts", ["v"])
    parts = assign_parts(grid, Split())
    pipe = build_pipeline(grid, parts, "v", 4, seasonal_inputs=24)
    seasonal = [f for f in pipe.features if f.kind is FeatureKind.SEASONAL]
    assert [(f.season, f.lead, f.column) for f in seasonal] == [(24, j, "v") for j in (1, 2, 3, 4)]
    y = grid.segments[0].values[parts[0] == Part.TRAIN, 0]
    assert seasonal[2].scale == pytest.approx(float(np.sqrt(np.mean((y[3:] - y[:-3]) ** 2))))
    assert pipe.history_ticks == 24
    assert len([f for f in build_pipeline(grid, parts, "v", 30, seasonal_inputs=6).features if f.season]) == 6
    assert not build_pipeline(grid, parts, "v", 4).seasonal_inputs
    # the encoded inputs are last season's changes: 0 for the first season, then the changes
    (seg,) = encode(grid, build_pipeline(grid, parts, "v", 2, seasonal_inputs=24), Split())
    tgt = seg.target
    assert (seg.x[:24, -2:] == 0).all()
    np.testing.assert_allclose(seg.x[30, -1] * seasonal[1].scale, tgt[30 - 24 + 2] - tgt[30 - 24], rtol=1e-5)


def test_rows_a_user_would_not_expect_to_lose_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hours = [f"2024-01-{1 + i // 24:02d}T{i % 24:02d}:00:00Z,{i % 5}\n" for i in range(400)]
    load(_write(tmp_path / "swapped.csv", "ts,v\n" + "".join(hours[200:] + hours[:200])), "ts", ("v",))
    assert "200 of 400 rows (50 %) are not in the ticks: 200 late" in caplog.text
    caplog.clear()
    load(_write(tmp_path / "serial.csv", "ts,v\n" + "".join(f"{45292 + i / 24:.6f},{i % 5}\n" for i in range(400))),
         "ts", ("v",))  # fmt: skip
    assert "every timestamp falls in 1970" in caplog.text and "spreadsheet serial dates" in caplog.text
    caplog.clear()
    load(_write(tmp_path / "fine.csv", "ts,v\n" + "".join(hours)), "ts", ("v",))
    assert "WARNING" not in [r.levelname for r in caplog.records]


def test_the_length_check_asks_of_the_last_horizon_what_scoring_asks(tmp_path: Path) -> None:
    """Validation and hold-out in runs of 53 ticks, season 48, warm-up 16, horizon 8: scoring finds 10 pairs
    at every horizon (an origin 8 ahead needs 40 ticks behind it, not 47), so the check lets it train."""
    from converter.convert import _check_length
    from converter.data import Segment
    from converter.prepare import EncodedSegment
    from converter.report import scored_pairs

    k_max, season, warmup = 8, 48, 16

    def seg(n: int, part: Part) -> EncodedSegment:
        tgt = np.sin(np.arange(n) / 5.0)
        y = np.full((n, k_max), np.nan, np.float32)
        for k in range(1, k_max + 1):
            y[:-k, k - 1] = tgt[k:] - tgt[:-k]
        s = Segment(np.arange(n) * 60.0, tgt[:, None], np.ones(n, bool))
        return EncodedSegment(s, np.zeros((n, 1), np.float32), y, np.full(n, int(part), np.int8), tgt)

    enc = [seg(400, Part.TRAIN), seg(53, Part.VAL), seg(53, Part.VAL), seg(53, Part.HOLDOUT), seg(53, Part.HOLDOUT)]
    for part in (Part.VAL, Part.HOLDOUT):
        pairs = scored_pairs(enc, eval_runs(enc, part, warmup), k_max, season, part)
        assert [len(a) for a in pairs.actual] == [10] * k_max
    _check_length(enc, k_max, warmup, season)  # no error
    # No season: runs of 25 and 20 ticks leave 11 targets one tick ahead past the warm-up, 1 eight ahead.
    with pytest.raises(ConvertError, match="1 val targets 8 ticks ahead lie past the warm-up"):
        _check_length([enc[0], seg(25, Part.VAL), seg(20, Part.VAL), seg(53, Part.HOLDOUT)], k_max, warmup, 1)


def test_rows_with_trailing_empty_fields_still_read(tmp_path: Path) -> None:
    raw = read_csv(_write(tmp_path / "t.csv", "ts,v\n0,1,,\n60,2, ,\n"), "ts", ["v"])
    assert raw.values[:, 0].tolist() == [1, 2]


def test_the_default_season_gives_way_only_when_scored_ticks_lack_its_history(tmp_path: Path) -> None:
    """A day and a half of 5-minute ticks without a gap: the validation and hold-out ticks all have a day
    behind them, so the day stays the season; business hours split by every night: no tick has one."""
    from converter.convert import _default_season

    rows = "".join(f"{1_700_000_000 + 300 * i},{i % 7}\n" for i in range(432))
    grid = load(_write(tmp_path / "short.csv", "ts,v\n" + rows), "ts", ("v",))
    assert _default_season(grid, assign_parts(grid, Split())) == 288
    days = "".join(f"{1_700_000_000 + 86_400 * d + 300 * i},{i % 7}\n" for d in range(10) for i in range(169))
    grid = load(_write(tmp_path / "hours.csv", "ts,v\n" + days), "ts", ("v",))
    assert len(grid.segments) == 10
    assert _default_season(grid, assign_parts(grid, Split())) == 1


def test_trending_series_drops_the_level_input(tmp_path: Path) -> None:
    lines = ["ts,v"] + [f"{i * 3600},{i * 0.5 + math.sin(i):.3f}" for i in range(400)]
    grid = load(_write(tmp_path / "t.csv", "\n".join(lines) + "\n"), "ts", ["v"])
    parts = assign_parts(grid, Split())
    assert trends(grid, parts, "v")
    kinds = {f.kind for f in build_pipeline(grid, parts, "v", 2, level=LevelMode.AUTO).features}
    assert FeatureKind.LEVEL not in kinds and FeatureKind.DIFF in kinds
    flat = load(_series_csv(tmp_path / "f.csv", n=400), "ts", ["v"])
    fparts = assign_parts(flat, Split())
    assert not trends(flat, fparts, "v")
    kinds = {f.kind for f in build_pipeline(flat, fparts, "v", 2, level=LevelMode.AUTO).features}
    assert FeatureKind.LEVEL in kinds


# --- bad input through the command line: one line naming the problem, non-zero exit, nothing written ---


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    return code, errors[0]


@pytest.mark.parametrize(
    ("content", "args", "needle"),
    [
        ("ts,v\n0,1\n60,2\n", ["--target", "nope"], "'nope' not found"),
        ("ts,v\n0,1\n60,2\n", ["--target", "v", "--features", "x"], "'x' not found"),
        ("time,v\n0,1\n60,2\n", ["--target", "v"], "'ts' not found"),
        ("ts,v\n0,1\n60,abc\n120,3\n", ["--target", "v"], "line 3: column 'v': 'abc' is not a finite number"),
        ("ts,v\n0,1\n60,inf\n", ["--target", "v"], "'inf' is not a finite number"),
        ("ts,v\n240,1\n180,2\n120,3\n60,4\n0,5\n", ["--target", "v"], "time order"),
        ("ts,v\n0,1\n60,2\n", ["--target", "v", "--timezone", "Europe/Bonn"], "unknown time zone"),
        ("ts,v\n0,1\n60,2\n", ["--target", "v", "--lateness", "60"], "below the cadence"),
        ("ts,v\n0,1\nsoon,2\n", ["--target", "v"], "line 3: column 'ts'"),
        ("ts,v\n" + "".join(f"{i * 60},{i % 7}\n" for i in range(40)), ["--target", "v"], "series too short"),
        ("", ["--target", "v"], "empty"),
        ("ts,v,v\n0,1,2\n60,2,3\n", ["--target", "v"], "names column(s) 'v' more than once"),
        ("ts,v\n" + "".join(f"{i * 60},{(-1) ** i * 1e308}\n" for i in range(400)), ["--target", "v"],
         "too large: their changes overflow"),
        ("ts,v\n" + "".join(f"{i * 600},{i % 7}\n" for i in range(400)), ["--target", "v", "--cadence", "60"],
         "no two readings are within --max-gap-ticks"),
        ("ts,v\n1700000000000000,1\n1700000060000000,2\n3e20,3\n", ["--target", "v"], "beyond the year 5138"),
        ("ts,v\n" + "".join(f"{i * 60},{i % 7}\n" for i in range(400)), ["--target", "v", "--season", "100001"],
         "--season is 100001 ticks; it must be 1..100000"),
        ("ts,v\n" + "".join(f"{i * 60},{i % 7}\n" for i in range(400)), ["--target", "v", "--season", "-3"],
         "--season is -3 ticks"),
        ("ts,v\n" + "".join(f"{i * 60},{i % 7}\n" for i in range(400)),
         ["--target", "v", "--season", "60000", "--horizon", "60001"], "would keep 120001 targets per stream"),
        ("ts,v\n" + "".join(f"{1_700_000_000 + 60 * i},1,{i % 10}00.5\n" for i in range(400)), ["--target", "v"],
         "line 2: 3 fields where the header has 2 (a number written with a thousands separator"),
        ("time;v\n1700000000;1\n", ["--target", "v"], "separates its columns with ';'"),
        ("ts,V\n1700000000,1\n", ["--target", "v"], "did you mean 'V'?"),
        # 27 runs of 30 hourly readings, 70 hours apart: no target 16 hours ahead in the same run.
        ("ts,v\n" + "".join(f"{1_700_000_000 + 3600 * (r * 100 + i)},{i % 7}\n" for r in range(27) for i in range(30)),
         ["--target", "v"], "val targets 16 ticks ahead lie past the warm-up (16 ticks) and with a season"),
        # 20 stretches of 30 minutely readings, an hour apart: none lies a season of 100 ticks into its stretch.
        ("ts,v\n" + "".join(f"{(d * 90 + i) * 60},{i % 7}\n" for d in range(20) for i in range(30)),
         ["--target", "v", "--season", "100", "--horizon", "2", "--warmup", "4"],
         "0 val targets lie past the warm-up (4 ticks) and a season (100 ticks) into their segment"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, args: list[str], needle: str
) -> None:
    data = _write(tmp_path / "bad.csv", content)
    out = tmp_path / "model"
    code, line = _run(["train", str(data), "--time-col", "ts", *args, "--out", str(out)], capsys)
    assert code != 0
    assert needle in line
    assert line.startswith("edge-lstm-convert: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # no --out, no temp dir


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _run(
        ["train", str(tmp_path / "none.csv"), "--time-col", "ts", "--target", "v", "--out", str(tmp_path / "m")],
        capsys,
    )
    assert code != 0 and "data file not found" in line


def test_unwritable_out_fails_before_reading_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _write(tmp_path / "file", "x")
    data = _series_csv(tmp_path / "d.csv")
    code, line = _run(
        ["train", str(data), "--time-col", "ts", "--target", "v", "--out", str(blocker / "model")], capsys
    )
    assert code != 0 and "--out" in line
    code, line = _run(["train", str(data), "--time-col", "ts", "--target", "v", "--out", str(blocker)], capsys)
    assert code != 0 and "not a directory" in line


def test_out_refuses_to_replace_a_directory_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _series_csv(tmp_path / "d.csv")
    precious = tmp_path / "docs"
    precious.mkdir()
    _write(precious / "notes.txt", "keep me")
    code, line = _run(["train", str(data), "--time-col", "ts", "--target", "v", "--out", str(precious)], capsys)
    assert code != 0 and "holds no model" in line
    assert (precious / "notes.txt").read_text() == "keep me"


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["train", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: edge-lstm-convert" in capsys.readouterr().out


def test_an_unknown_quantization_mode_is_refused_with_the_modes_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "x.csv", "--time-col", "t", "--target", "y", "--quantize", "int4"])
    assert exit_.value.code == 2
    assert "'int4' is not a mode (choose from float32, dynamic, float16, int8, int16x8)" in capsys.readouterr().err
