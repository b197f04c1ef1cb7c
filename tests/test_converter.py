"""Train, export, quantize and verify end to end on real data (a small model, a few epochs).

Every quantization mode is checked by numbers: the test streams each exported
model through the LiteRT interpreter itself and compares with the numpy
reference (parity) and with the actual readings (accuracy).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from converter.cli import main
from converter.convert import TrainConfig, train
from converter.data import load
from converter.prepare import CalendarMode, Part, Split, encode
from converter.report import REPORT_NAME
from converter.verify import TFLiteStepper
from edge_lstm.features import FeatureKind
from edge_lstm.modelspec import Quantization, load_model
from edge_lstm.reference import ReferenceModel, ReferenceWeights

REPO = Path(__file__).resolve().parent.parent
TAYLOR = REPO / "data" / "taylor.csv"

# Largest |TFLite - float reference| (network units) and largest hold-out MAE increase over float32.
BOUNDS: dict[Quantization, tuple[float, float]] = {
    Quantization.FLOAT32: (1e-5, 1e-6),
    Quantization.FLOAT16: (2e-3, 0.005),
    Quantization.DYNAMIC: (2e-2, 0.02),
    Quantization.INT16X8: (2e-2, 0.02),
    Quantization.INT8: (0.15, 0.05),
}


@pytest.fixture(scope="module")
def holey_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four weeks of taylor with empty cells, a NaN, a short gap and a long gap."""
    with open(TAYLOR, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1 : 1 + 4 * 336]
    for i in (100, 101, 700):
        body[i][1] = ""
    body[400][1] = "NaN"
    del body[900:912]  # six hours missing: longer than max_gap_ticks, splits the series
    del body[500:502]  # one hour missing: interpolated
    path = tmp_path_factory.mktemp("data") / "taylor_holes.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return path


@pytest.fixture(scope="module")
def trained(holey_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "small"
    cfg = TrainConfig(
        data=holey_csv,
        out=out,
        time_col="timestamp",
        target="demand_mw",
        horizon=4,
        units=16,
        epochs=8,
        patience=3,
        quantize=Quantization.FLOAT32,
        units_label="MW",
        seed=3,
        folds=2,
        candidates=2,
    )
    train(cfg)
    return out


def _holdout_sequences(
    model_dir: Path, data: Path
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Hold-out input sequences and (actual next readings, last readings, observed) for 1-step scoring."""
    man = load_model(model_dir).manifest
    grid = load(data, "timestamp", man.pipeline.columns, policy=man.ticks)
    enc = encode(grid, man.pipeline, Split())
    seqs, truth = [], []
    for e in enc:
        idx = np.flatnonzero(e.part == Part.HOLDOUT)
        if idx.size < 10:
            continue
        seqs.append(e.x[idx])
        obs = e.segment.observed[idx]
        truth.append((e.target[idx], obs, idx))
    return seqs, truth


def _mae_1(
    preds: list[np.ndarray], truth: list[tuple[np.ndarray, np.ndarray, np.ndarray]], scale: float, warm: int
) -> float:
    errs = []
    for p, (tgt, obs, _) in zip(preds, truth, strict=True):
        f = tgt[:-1] + p[:-1, 0] * scale
        ok = obs[:-1] & obs[1:]
        ok[:warm] = False
        errs.append(np.abs(f - tgt[1:])[ok])
    return float(np.mean(np.concatenate(errs)))


def test_model_directory_is_complete_and_consistent(trained: Path) -> None:
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["forecast.png", "manifest.json", "model.tflite", REPORT_NAME, "weights.npz"]
    assert not list(trained.parent.glob(".*tmp"))  # staging directory renamed away
    bundle = load_model(trained)  # checks the SHA-256
    m = bundle.manifest
    assert m.quantization is Quantization.FLOAT32
    assert m.layers == (16,) and m.horizon == 4 and m.cadence_s == 1800
    assert m.target_units == "MW" and m.warmup_ticks == 48 and m.max_gap_ticks == 4
    assert [f.kind for f in m.pipeline.features][:2] == [FeatureKind.DIFF, FeatureKind.LEVEL]
    assert m.extra["metrics"]["holdout_mae_1"] > 0
    assert "tensorflow" in json.dumps(m.extra["versions"])
    assert (trained / "forecast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_the_fixed_keys_and_consistent_numbers(trained: Path, holey_csv: Path) -> None:
    r = json.loads((trained / REPORT_NAME).read_text())
    for metric in ("mae", "rmse"):
        for who in ("model", "persistence", "seasonal_naive"):
            vals = r["holdout"][metric][who]
            assert len(vals) == 4 and all(v > 0 for v in vals)
    assert set(r["parity"]) == {q.value for q in Quantization}
    assert r["parity"]["float32"] <= 1e-4
    assert r["data"]["rows_missing"] == 4 and r["data"]["segments"] == 2 and r["data"]["ticks_filled"] >= 5
    # Persistence in the report equals persistence computed here from the CSV.
    _, truth = _holdout_sequences(trained, holey_csv)
    errs = []
    for tgt, obs, _ in truth:
        ok = obs[:-1] & obs[1:]
        errs.append(np.abs(tgt[1:] - tgt[:-1])[ok])
    assert r["holdout"]["mae"]["persistence"][0] == pytest.approx(float(np.mean(np.concatenate(errs))), rel=0.02)
    # Even a few epochs of training must beat persistence one tick ahead on this series.
    assert r["holdout"]["mae"]["model"][0] < r["holdout"]["mae"]["persistence"][0]
    assert r["modes"]["float32"]["mae"] == pytest.approx(r["holdout"]["mae"]["model"], rel=1e-4)
    # Two rolling-origin folds pool their validation pairs; two seeds competed on the last fold.
    v = r["validation"]
    assert len(v["folds"]) == 2 and [c["seed"] for c in v["candidates"]] == [3, 4] and v["seed"] in (3, 4)
    best = min(v["candidates"], key=lambda c: c["score"])
    assert v["seed"] == best["seed"] and r["training"]["seed"] == v["seed"]
    assert all(n > 0 for n in v["pairs"]) and len(r["training"]["seasonal_weights"]) == 4
    # On the cost it was chosen on (validation, fold by fold), the blend is never worse than either naive forecast.
    c = v["blend_cost"]
    for k in range(4):
        assert c["model"][k] <= min(c["persistence"][k], c["seasonal_naive"][k]) + 1e-6
        assert min(c["persistence"][k], c["seasonal_naive"][k]) >= 1.0 - 1e-9
    # SARIMA and ETS are scored on the hold-out pairs next to the model.
    for who in ("sarima", "ets"):
        assert len(r["holdout"]["mae"][who]) == 4 and all(x > 0 for x in r["holdout"]["mae"][who])
    assert r["holdout"]["baselines"]["sarima"]["spec"].startswith("SARIMA(1,1,1)(0,1,1)_48")
    h = r["holdout"]["mae"]
    ratio = [m / min(p, q) for m, p, q in zip(h["model"], h["persistence"], h["seasonal_naive"], strict=True)]
    assert r["holdout"]["ratio_best_naive"] == pytest.approx(ratio)


@pytest.mark.parametrize("mode", list(Quantization), ids=lambda q: q.value)
def test_each_quantization_mode_streams_like_the_float_model(
    mode: Quantization, trained: Path, holey_csv: Path
) -> None:
    from converter.export import export_tflite, representative_from_inputs

    weights = ReferenceWeights.load(trained)
    man = load_model(trained).manifest
    seqs, truth = _holdout_sequences(trained, holey_csv)
    rep = representative_from_inputs(weights, seqs, max_samples=300)
    content = export_tflite(weights, mode, rep)
    stepper = TFLiteStepper(content, weights.layers)
    ref = ReferenceModel(weights)
    lite = [stepper.run(s) for s in seqs]
    flt = [ref.run(s) for s in seqs]
    dev = max(float(np.max(np.abs(a - b))) for a, b in zip(lite, flt, strict=True))
    max_dev, max_rel = BOUNDS[mode]
    assert dev <= max_dev, f"{mode.value}: deviation {dev:.3g}"
    scale = man.pipeline.output.scale
    mae_lite = _mae_1(lite, truth, scale, man.warmup_ticks)
    mae_float = _mae_1(flt, truth, scale, man.warmup_ticks)
    assert mae_lite <= mae_float * (1 + max_rel) + 1e-9, f"{mode.value}: MAE {mae_lite:.2f} vs float {mae_float:.2f}"
    # The report's number for this mode agrees with this independent measurement.
    r = json.loads((trained / REPORT_NAME).read_text())
    assert r["modes"][mode.value]["parity"] <= max_dev
    # Batch of 3 streams in one call equals three separate calls.
    x3 = np.stack([s[5] for s in seqs[:1]] * 3) + np.array([[0.0], [0.1], [-0.1]], dtype=np.float32)
    y3, _ = stepper.step(x3, stepper.zero_state(3))
    for b in range(3):
        y1, _ = stepper.step(x3[b : b + 1], stepper.zero_state(1))
        np.testing.assert_allclose(y3[b], y1[0], atol=1e-5)


def test_training_is_reproducible_with_a_seed(tmp_path: Path, holey_csv: Path, trained: Path) -> None:
    cfg = TrainConfig(
        data=holey_csv,
        out=tmp_path / "again",
        time_col="timestamp",
        target="demand_mw",
        horizon=4,
        units=16,
        epochs=8,
        patience=3,
        quantize=Quantization.FLOAT32,
        units_label="MW",
        seed=3,
        folds=2,
        candidates=2,
        modes=(),
        plot=False,
        baselines=False,
    )
    again = train(cfg)
    assert again.manifest.sha256 == load_model(trained).manifest.sha256


def test_verify_command_passes_and_catches_a_mismatch(
    trained: Path, holey_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "verify", str(trained), str(holey_csv), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["parity"]["float32"] <= 1e-4
    # Weights that no longer match the exported model: the float32 deviation shows and verify fails.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    w = ReferenceWeights.load(bad)
    w = ReferenceWeights(lstm=w.lstm, dense_kernel=w.dense_kernel * 1.05, dense_bias=w.dense_bias)
    w.save(bad / "weights.npz")
    assert main(["-q", "verify", str(bad), str(holey_csv), "--json"]) == 3
    res = json.loads(capsys.readouterr().out)
    assert not res["ok"] and res["parity"]["float32"] > 1e-4


def test_intervals_are_calibrated_on_validation_and_scored_on_the_hold_out(
    trained: Path, holey_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from converter.calibrate import score_part
    from edge_lstm.intervals import conformal_offsets

    man = load_model(trained).manifest
    iv = man.intervals
    assert iv is not None and iv.levels == (0.8, 0.95) and iv.method == "split_conformal"
    assert (iv.lower[1] <= iv.lower[0]).all() and (iv.upper[0] <= iv.upper[1]).all() and (iv.lower < iv.upper).all()
    # Training pools the shipped model's validation residuals with the earlier fold's out-of-sample ones.
    grid = load(holey_csv, "timestamp", man.pipeline.columns, man.cadence_s, man.max_gap_ticks)
    enc = encode(grid, man.pipeline, Split())
    content = (trained / "model.tflite").read_bytes()
    season = man.extra["training"]["season_ticks"]
    val = score_part(content, man.layers, man.pipeline, enc, Part.VAL, man.warmup_ticks, season)
    assert iv.calibration["part"] == "validation + 1 earlier fold(s)"
    assert all(p > v > 0 for p, v in zip(iv.calibration["pairs"], val.pairs.counts, strict=True))
    # report.json: hold-out coverage per level and horizon, recomputed here from the hold-out residuals.
    r = json.loads((trained / REPORT_NAME).read_text())["intervals"]
    hold = score_part(content, man.layers, man.pipeline, enc, Part.HOLDOUT, man.warmup_ticks, season)
    for i, label in enumerate(("80", "95")):
        want = [float(np.mean((res >= iv.lower[i, k]) & (res <= iv.upper[i, k]))) for k, res in
                enumerate(hold.residuals)]  # fmt: skip
        assert r["holdout_coverage"][label] == pytest.approx(want)
    assert r["holdout_pairs"] == hold.pairs.counts and r["calibration"]["pairs"] == iv.calibration["pairs"]
    # verify reports the same coverage; calibrate on a copy rewrites the same intervals.
    assert main(["-q", "verify", str(trained), str(holey_csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["intervals"]["holdout_coverage"] == r["holdout_coverage"]
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert main(["-q", "calibrate", str(copy), str(holey_csv), "--levels", "0.5,0.9"]) == 0
    assert "nominal 90" in capsys.readouterr().out
    again = load_model(copy).manifest
    assert again.sha256 == man.sha256 and again.intervals is not None and again.intervals.levels == (0.5, 0.9)
    assert json.loads((copy / REPORT_NAME).read_text())["intervals"]["levels"] == [0.5, 0.9]
    # Recalibrating a model directory (no folds to pool) takes exactly the conformal order statistics
    # of the shipped model's validation residuals.
    assert main(["-q", "calibrate", str(copy), str(holey_csv)]) == 0
    capsys.readouterr()
    cal = load_model(copy).manifest.intervals
    assert cal is not None and cal.calibration["part"] == "validation"
    lo, hi = conformal_offsets(val.residuals, (0.8, 0.95))
    np.testing.assert_array_equal(lo, cal.lower)
    np.testing.assert_array_equal(hi, cal.upper)


def test_calibrate_puts_the_data_on_the_models_ticks(
    trained: Path, holey_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """calibrate reads the CSV with the manifest's tick policy, not one guessed again from the data."""
    import shutil

    from converter.calibrate import score_part
    from edge_lstm.intervals import conformal_offsets
    from edge_lstm.ticks import Align

    copy = tmp_path / "shifted"
    shutil.copytree(trained, copy)
    manifest_path = copy / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    # Buckets that start a quarter of an hour after the readings: each tick is stamped 15 min later.
    doc["ticks"] = {**doc["ticks"], "align": Align.START.value, "origin_seconds": 900.0 - doc["cadence_seconds"]}
    manifest_path.write_text(json.dumps(doc))
    man = load_model(copy).manifest
    assert main(["-q", "calibrate", str(copy), str(holey_csv)]) == 0
    capsys.readouterr()
    cal = load_model(copy).manifest.intervals
    assert cal is not None

    def offsets(grid_kwargs: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
        grid = load(holey_csv, "timestamp", man.pipeline.columns, **grid_kwargs)  # type: ignore[arg-type]
        enc = encode(grid, man.pipeline, Split())
        val = score_part((copy / "model.tflite").read_bytes(), man.layers, man.pipeline, enc, Part.VAL,
                         man.warmup_ticks, man.extra["training"]["season_ticks"])  # fmt: skip
        return conformal_offsets(val.residuals, man.intervals.levels if man.intervals else (0.8, 0.95))

    lo, hi = offsets({"policy": man.ticks})
    np.testing.assert_array_equal(lo, cal.lower)
    np.testing.assert_array_equal(hi, cal.upper)
    guessed_lo, _ = offsets({"cadence_s": man.cadence_s, "max_gap_ticks": man.max_gap_ticks})
    assert not np.array_equal(guessed_lo, cal.lower)  # the two grids give different intervals


def test_a_whole_sequence_runs_as_one_graph_with_the_eager_numbers(caplog: pytest.LogCaptureFixture) -> None:
    """The validation and hold-out runs: one traced graph per model for any length, same numbers as eager."""
    import gc

    from converter.train import _sequence_runs, build_model, predict_sequence

    model = build_model(5, (8, 8), 3)
    x = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    for n in (300, 37):
        eager = np.asarray(model(x[None, :n], training=False))[0]
        np.testing.assert_array_equal(predict_sequence(model, x[:n]), eager)
    assert _sequence_runs[model].experimental_get_tracing_count() == 1  # not traced again for a new length
    del model
    gc.collect()
    assert len(_sequence_runs) == 0  # the cache does not keep a model alive
    for _ in range(8):  # a training run's candidates and folds: no warning that reads like a fault
        other = build_model(5, (4,), 2)
        for n in (20, 30, 40):
            predict_sequence(other, x[:n])
    assert "retracing" not in caplog.text


def test_tensorflows_start_up_lines_are_hidden_as_its_log_level_asks() -> None:
    """Abseil's lines before it is set up (oneDNN's notice on AVX-512 CPUs) honour TF_CPP_MIN_LOG_LEVEL too."""
    from converter.tfimport import absl_lines_below

    one_dnn = ("I0000 00:00:1796003189.499688    7838 port.cc:153] oneDNN custom operations are on. You may see "
               "slightly different numerical results")  # fmt: skip
    warning = "W1130 01:23:45.678901   12 cpu_feature_guard.cc:210] This TensorFlow binary is optimized"
    error = "E0000 00:00:1796003189.499688    7838 util.cc:1] something failed"
    info_only, info_and_warnings = absl_lines_below("1"), absl_lines_below("2")
    assert info_only is not None and info_and_warnings is not None
    assert info_only.search(one_dnn) and not info_only.search(warning)
    assert info_and_warnings.search(one_dnn) and info_and_warnings.search(warning)
    assert not info_and_warnings.search(error) and not info_and_warnings.search("INFO: Created delegate")
    assert absl_lines_below("0") is None and absl_lines_below("") is None and absl_lines_below("x") is None
    assert absl_lines_below("4") is not None and absl_lines_below("4").search(warning)  # type: ignore[union-attr]
    assert absl_lines_below("02") is not None


def test_a_cpu_without_avx_keeps_tensorflows_fatal_line_on_the_terminal() -> None:
    """TensorFlow aborts on such a CPU right after its line: the import must not pass through a pipe."""
    import platform

    from converter.tfimport import lacks_avx

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the check is for x86 CPUs")
    assert lacks_avx("processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt\n")
    assert not lacks_avx("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    assert not lacks_avx("processor\t: 0\n")  # no flags line: nothing to go on


def test_a_quiet_training_prints_nothing_on_stderr(tmp_path: Path) -> None:
    """`-q train` as a user runs it: nothing but errors, and TensorFlow's and LiteRT's lines are none."""
    import os
    import subprocess
    import sys

    path = tmp_path / "quiet.csv"
    t = np.arange(400)
    y = 10 + np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(3).standard_normal(400)
    path.write_text("ts,v\n" + "".join(f"{1_700_000_000 + 3600 * i},{x:.4f}\n" for i, x in zip(t, y, strict=True)))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run(
        [sys.executable, "-m", "converter", "-q", "train", str(path), "--time-col", "ts", "--target", "v",
         "--horizon", "2", "--units", "4", "--epochs", "1", "--folds", "3", "--candidates", "2", "--no-plot",
         "--no-baselines", "--out", str(tmp_path / "m")],  # every quantization mode: TensorFlow's quantizer too
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_classic_shape_10_features_32_outputs(tmp_path: Path) -> None:
    """LSTM(64) on (None, 10) + Dense(32): trains, exports, and streams a batch through LiteRT."""
    rng = np.random.default_rng(0)
    n = 700
    t = np.arange(n)
    cols = [f"s{i}" for i in range(9)]
    data = np.stack([np.sin(t / (5 + i)) + 0.05 * rng.standard_normal(n) + i for i in range(9)], axis=1)
    path = tmp_path / "multi.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", *cols])
        for i in range(n):
            w.writerow([1_000_000 + 86400 * 7 * i, *(f"{v:.5f}" for v in data[i])])  # weekly: no calendar inputs
    out = tmp_path / "classic"
    code = main(
        [
            "-q", "train", str(path), "--time-col", "ts", "--target", "s0", "--features", ",".join(cols[1:]),
            "--level", "target", "--horizon", "32", "--units", "64", "--epochs", "1", "--modes", "none",
            "--quantize", "float32", "--no-plot", "--warmup", "8", "--folds", "1", "--candidates", "1",
            "--no-baselines", "--seasonal-input", "none", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    bundle = load_model(out)
    assert bundle.manifest.pipeline.n_features == 10 and bundle.manifest.horizon == 32
    assert bundle.manifest.layers == (64,)
    stepper = TFLiteStepper(bundle.content, (64,))
    assert stepper.n_features == 10 and stepper.horizon == 32
    x = rng.standard_normal((5, 10)).astype(np.float32)
    state = stepper.zero_state(5)
    ref = ReferenceModel.load(out)
    ref_state = ref.zero_state(5)
    for _ in range(3):
        y, state = stepper.step(x, state)
        y_ref, ref_state = ref.step(x, ref_state)
        assert y.shape == (5, 32)
        np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_trending_series_with_gaps_beats_persistence(tmp_path: Path) -> None:
    """A series that climbs far above its training range: the model must still beat persistence."""
    rng = np.random.default_rng(1)
    n = 1500
    t = np.arange(n)
    y = 0.4 * t + 20 * np.sin(2 * np.pi * t / 24) + rng.standard_normal(n)
    path = tmp_path / "trend.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "v"])
        for i in range(n):
            if i % 97 in (3, 4):  # two-hour holes
                continue
            w.writerow([1_600_000_000 + 3600 * i, "" if i % 131 == 0 else f"{y[i]:.3f}"])
    out = tmp_path / "trend"
    res = train(
        TrainConfig(
            data=path, out=out, time_col="ts", target="v", horizon=3, units=16, epochs=12, patience=4,
            modes=(Quantization.DYNAMIC,), plot=False, candidates=1, baselines=False,
        )
    )  # fmt: skip
    kinds = {f.kind for f in res.manifest.pipeline.features}
    assert FeatureKind.LEVEL not in kinds  # the hold-out is far outside the training range
    h = res.report["holdout"]["mae"]
    assert h["model"][0] < 0.8 * h["persistence"][0]
    assert res.report["modes"]["dynamic"]["mae"][0] < 0.8 * h["persistence"][0]


def test_real_series_with_trend_and_holes_beats_persistence(tmp_path: Path) -> None:
    """Weekly Mauna Loa CO2 (bundled): rising trend, yearly season, 59 missing weeks."""
    data = Path(__file__).resolve().parent.parent / "data" / "co2.csv"
    res = train(
        TrainConfig(
            data=data, out=tmp_path / "co2", time_col="date", target="co2_ppm", horizon=4, units=16,
            epochs=25, patience=5, modes=(Quantization.DYNAMIC,), plot=False, candidates=1, baselines=False,
        )
    )  # fmt: skip
    h = res.report["holdout"]["mae"]
    assert res.report["holdout"]["season_ticks"] == 52
    for k in range(4):
        assert h["model"][k] < 0.9 * h["persistence"][k]
        assert h["model"][k] < h["seasonal_naive"][k]


def test_a_horizon_leans_on_seasonal_naive_where_that_wins(tmp_path: Path) -> None:
    """A daily pattern the network has too few epochs to learn: the blend takes seasonal naive instead."""
    rng = np.random.default_rng(4)
    n = 24 * 60
    t = np.arange(n)
    shape = rng.normal(0, 10, 24)  # an irregular daily profile, the same every day
    y = 50 + shape[t % 24] + rng.normal(0, 0.5, n)
    path = tmp_path / "daily.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "v"])
        for i in range(n):
            w.writerow([1_600_000_000 + 3600 * i, f"{y[i]:.3f}"])
    res = train(
        TrainConfig(
            data=path, out=tmp_path / "daily", time_col="ts", target="v", horizon=3, units=8, epochs=1,
            modes=(), plot=False, candidates=1, baselines=False, calendar=CalendarMode.NONE,
        )
    )  # fmt: skip
    out = load_model(tmp_path / "daily").manifest.pipeline.output
    assert out.season_ticks == 24 and out.history_ticks == 24
    assert min(out.seasonal_weights) >= 0.5, out.seasonal_weights
    h = res.report["holdout"]["mae"]
    for k in range(3):
        assert h["model"][k] <= 1.02 * min(h["persistence"][k], h["seasonal_naive"][k])
        assert h["model"][k] < 0.5 * h["persistence"][k]
    # The validation residuals the blend was fitted on are there for interval calibration.
    res_k = res.validation.residuals(res.blend)
    assert len(res_k) == 3 and all(r.size > 100 for r in res_k)
    assert float(np.mean(np.abs(res_k[0]))) == pytest.approx(res.report["validation"]["mae"]["model"][0])


def test_a_1_second_log_trains_a_1_minute_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """`edge-lstm-convert train --cadence 60 --aggregate mean` on a raw sensor log sampled every second."""
    rng = np.random.default_rng(5)
    t0 = 1_700_000_040  # on the minute
    n = 2 * 86_400
    t = np.arange(n)
    v = 20 + 3 * np.sin(2 * np.pi * t / 86_400) + 0.5 * np.sin(2 * np.pi * t / 3_600) + rng.normal(0, 0.3, n)
    keep = (t % 7_200) >= 180  # three minutes missing every two hours: filled
    path = tmp_path / "raw_1s.csv"
    with open(path, "w") as f:
        f.write("ts,temp\n")
        f.writelines(f"{t0 + i},{x:.3f}\n" for i, x in zip(t[keep], v[keep], strict=True))
    out = tmp_path / "minutely"
    caplog.set_level("INFO", logger="converter.convert")
    code = main(["train", str(path), "--time-col", "ts", "--target", "temp", "--cadence", "60", "--aggregate", "mean",
                 "--horizon", "4", "--units", "8", "--epochs", "3", "--patience", "2", "--modes", "none",
                 "--quantize", "float32", "--no-plot", "--folds", "1", "--candidates", "1", "--no-baselines",
                 "--json", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert "training 1 of 1: seed 0 on fold 1 of 1 (training part 70 % of the series" in caplog.text  # progress
    man = load_model(out).manifest
    assert man.cadence_s == 60 and man.ticks.aggregate.value == "mean" and man.ticks.align.value == "start"
    assert json.loads((out / "manifest.json").read_text())["ticks"]["aggregate"] == "mean"
    d = report["data"]
    assert d["rows"] == int(keep.sum()) and d["segments"] == 1
    assert d["ticks"] == 2 * 1440 - 3 and d["ticks_filled"] == 23 * 3  # the first three minutes are not there
    assert d["rows_aggregated"] == int(keep.sum()) - (d["ticks"] - d["ticks_filled"])
    assert np.isfinite(report["holdout"]["mae"]["model"][0])


def test_summary_table_compares_modes_with_float32_only_when_it_was_scored() -> None:
    from converter.report import summary_table

    mode = {"size_bytes": 100, "parity": 1e-3, "mae": [2.0], "mae_mean": 2.2}
    report = {"holdout": {"mae": {"model": [1.0], "persistence": [2.0], "seasonal_naive": [3.0]}},
              "modes": {"dynamic": mode}}  # fmt: skip
    last = summary_table(report).splitlines()[-1]
    assert "nan" not in last and last.split()[-1] == "-"
    report["modes"] = {"float32": {**mode, "mae_mean": 2.0}, "dynamic": mode}
    assert summary_table(report).splitlines()[-1].split()[-1] == "+10.00%"


def test_business_hours_data_trains_without_a_season_it_cannot_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """5-minute readings 07:00-21:00 on weekdays: every night splits the series (gap > max_gap_ticks), so no
    stretch holds the default season of a day (288 ticks). Training must not need seasonal naive there."""
    rng = np.random.default_rng(7)
    day = np.arange(169)  # 07:00 .. 21:00
    profile = 100 + 60 * np.sin(np.pi * day / 168)
    rows = []
    for d in range(28):
        if d % 7 >= 5:
            continue  # weekend
        t0 = 1_700_006_400 + d * 86_400 + 7 * 3600  # 2023-11-15 is a Wednesday; readings from 07:00 UTC
        rows += [(t0 + 300 * i, profile[i] + rng.normal(0, 8)) for i in day]
    path = tmp_path / "calls.csv"
    with open(path, "w") as f:
        f.write("ts,calls\n")
        f.writelines(f"{t},{v:.2f}\n" for t, v in rows)
    caplog.set_level("WARNING", logger="converter.convert")
    res = train(
        TrainConfig(
            data=path, out=tmp_path / "calls", time_col="ts", target="calls", horizon=3, units=8, epochs=2,
            modes=(), plot=False, candidates=1, folds=2, baselines=False,
        )
    )  # fmt: skip
    assert "no season: only 0 % of the validation and hold-out ticks lie a season (288 ticks" in caplog.text
    assert "bridge the gaps with a larger --max-gap-ticks" in caplog.text
    man = load_model(tmp_path / "calls").manifest
    assert man.pipeline.history_ticks == 0 and not man.pipeline.seasonal_inputs  # nothing per stream to keep
    assert man.warmup_ticks == 16
    h = res.report["holdout"]
    assert h["season_ticks"] == 1 and h["pairs"][0] > 100
    for k in range(3):
        assert np.isfinite(h["mae"]["model"][k])
        assert h["mae"]["model"][k] <= 1.02 * h["mae"]["persistence"][k]
