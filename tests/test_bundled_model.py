"""The bundled demo model: loads without TensorFlow, hash matches, and meets its accuracy targets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_lstm.modelspec import ModelError, Quantization, load_model

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "taylor"
DATA = REPO / "data" / "taylor.csv"

# Runs in a fresh interpreter: loads the model and streams the last two weeks of the bundled
# series through LiteRT exactly as the daemon would, then proves TensorFlow was never imported.
_NO_TF_SCRIPT = textwrap.dedent(
    """
    import csv, json, sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from edge_lstm.modelspec import load_model
    from converter.data import parse_timestamp

    bundle = load_model(sys.argv[1])
    m = bundle.manifest
    pipe = m.pipeline
    with open(sys.argv[2], newline="") as f:
        rows = list(csv.DictReader(f))[-672:]
    ts = np.array([parse_timestamp(r["timestamp"]) for r in rows])
    vals = np.array([[float(r[c]) for c in pipe.columns] for r in rows])
    interp = Interpreter(model_content=bundle.content)
    runner = interp.get_signature_runner(m.extra["signature"])
    names = m.input_names[1:]
    state = {n: np.zeros((1, h), np.float32) for n, h in zip(names, [h for h in m.layers for _ in range(2)])}
    prev = np.full((1, vals.shape[1]), np.nan)
    forecasts = []
    for t in range(len(rows)):
        x = pipe.encode(vals[t : t + 1], prev, ts[t : t + 1])
        out = runner(x=x, **state)
        state = {n: out[n] for n in names}
        forecasts.append(pipe.decode(out["y"], vals[t : t + 1, pipe.target_index])[0])
        prev = vals[t : t + 1]
    f = np.array(forecasts)
    y = vals[:, pipe.target_index]
    w = m.warmup_ticks
    mae_model = float(np.mean(np.abs(f[w:-1, 0] - y[w + 1 :])))
    mae_persistence = float(np.mean(np.abs(y[w:-1] - y[w + 1 :])))
    # Batch dimension resizes: 5 streams in one call (a fresh interpreter, as the daemon's batcher uses).
    interp = Interpreter(model_content=bundle.content)
    for d in interp.get_input_details():
        interp.resize_tensor_input(d["index"], [5, int(d["shape_signature"][-1])])
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros((5, int(d["shape"][-1])), np.float32))
    interp.invoke()
    batch = [interp.get_tensor(d["index"]).shape[0] for d in interp.get_output_details()]
    print(json.dumps({
        "tensorflow_imported": any(k == "tensorflow" or k.startswith("tensorflow.") for k in sys.modules),
        "keras_imported": "keras" in sys.modules,
        "mae_model": mae_model,
        "mae_persistence": mae_persistence,
        "batch": batch,
        "model_id": m.model_id,
    }))
    """
)


def test_bundled_model_loads_and_streams_in_a_process_without_tensorflow() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, str(MODEL), str(DATA)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tensorflow_imported"] is False and res["keras_imported"] is False
    assert res["batch"] == [5, 5, 5]
    # The last two weeks (partly training data, so only a sanity bound): far better than persistence.
    assert res["mae_model"] < 0.5 * res["mae_persistence"]
    assert res["model_id"].startswith("taylor@")


def test_bundled_model_hash_matches_its_manifest(tmp_path: Path) -> None:
    bundle = load_model(MODEL)
    import hashlib

    assert hashlib.sha256((MODEL / "model.tflite").read_bytes()).hexdigest() == bundle.manifest.sha256
    # A modified copy is refused.
    bad = tmp_path / "taylor"
    bad.mkdir()
    for name in ("manifest.json", "model.tflite"):
        (bad / name).write_bytes((MODEL / name).read_bytes())
    content = bytearray((bad / "model.tflite").read_bytes())
    content[len(content) // 2] ^= 0x01
    (bad / "model.tflite").write_bytes(bytes(content))
    with pytest.raises(ModelError, match="does not match"):
        load_model(bad)


def test_bundled_model_contract() -> None:
    m = load_model(MODEL).manifest
    assert m.quantization is Quantization.DYNAMIC
    assert m.cadence_s == 1800 and m.target_units == "MW"
    assert m.pipeline.columns == ("demand_mw",)
    assert 8 <= m.horizon <= 16 and len(m.layers) <= 2 and max(m.layers) <= 64
    assert m.warmup_ticks > 0 and m.max_gap_ticks >= 1
    metrics = m.extra["metrics"]
    assert metrics["holdout_mae_1"] > 0
    assert metrics["holdout_mae_1"] <= 0.4 * metrics["holdout_mae_1_persistence"]
    assert {"tensorflow", "keras", "edge-lstm"} <= set(m.extra["versions"]) or "tensorflow-cpu" in m.extra["versions"]


def test_bundled_report_meets_the_acceptance_targets() -> None:
    r = json.loads((MODEL / "report.json").read_text())
    mae = r["holdout"]["mae"]
    assert (
        len(mae["model"]) == len(mae["persistence"]) == len(mae["seasonal_naive"]) == load_model(MODEL).manifest.horizon
    )
    assert len(r["holdout"]["rmse"]["model"]) == len(mae["model"])
    # 1-step: at most 0.4x persistence and below seasonal naive (one day = 48 ticks).
    assert mae["model"][0] <= 0.4 * mae["persistence"][0]
    assert mae["model"][0] < mae["seasonal_naive"][0]
    assert r["holdout"]["season_ticks"] == 48
    # Every horizon beats both baselines.
    assert all(m < p and m < s for m, p, s in zip(mae["model"], mae["persistence"], mae["seasonal_naive"], strict=True))
    # Dynamic-range quantization within 1% of float32, 1 step ahead and on average.
    modes = r["modes"]
    assert modes["dynamic"]["mae"][0] <= 1.01 * modes["float32"]["mae"][0]
    assert modes["dynamic"]["mae_mean"] <= 1.01 * modes["float32"]["mae_mean"]
    assert r["parity"]["float32"] <= 1e-4
    assert set(r["parity"]) == {q.value for q in Quantization}
    assert r["modes"]["dynamic"]["sha256"] == load_model(MODEL).manifest.sha256


def test_bundled_intervals_meet_the_coverage_targets() -> None:
    """Hold-out coverage within 4 points of nominal one tick ahead and 6 points at the last horizon."""
    r = json.loads((MODEL / "report.json").read_text())["intervals"]
    iv = load_model(MODEL).manifest.intervals
    assert iv is not None and iv.levels == (0.8, 0.95) and r["levels"] == [0.8, 0.95]
    for level, label in zip(iv.levels, ("80", "95"), strict=True):
        cov = r["holdout_coverage"][label]
        assert len(cov) == iv.horizon
        assert abs(cov[0] - level) <= 0.04, (label, cov[0])
        assert abs(cov[-1] - level) <= 0.06, (label, cov[-1])
    assert min(r["holdout_pairs"]) >= 500

