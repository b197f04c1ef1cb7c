"""The numpy LSTM step: hand-checked maths, weights file round trip, and equality with TFLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_lstm.reference import LSTMLayerWeights, ReferenceModel, ReferenceWeights

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "taylor"


def _random_weights(d: int, layers: tuple[int, ...], k: int, seed: int = 0) -> ReferenceWeights:
    rng = np.random.default_rng(seed)
    lstm = []
    d_in = d
    for h in layers:
        lstm.append(
            LSTMLayerWeights(
                kernel=rng.normal(0, 0.4, (d_in, 4 * h)).astype(np.float32),
                recurrent_kernel=rng.normal(0, 0.4, (h, 4 * h)).astype(np.float32),
                bias=rng.normal(0, 0.1, 4 * h).astype(np.float32),
            )
        )
        d_in = h
    return ReferenceWeights(
        lstm=tuple(lstm),
        dense_kernel=rng.normal(0, 0.4, (d_in, k)).astype(np.float32),
        dense_bias=rng.normal(0, 0.1, k).astype(np.float32),
    )


def test_single_unit_step_matches_the_lstm_equations() -> None:
    # One input, one unit, gates i, f, c, o with known weights.
    w = ReferenceWeights(
        lstm=(
            LSTMLayerWeights(
                kernel=np.array([[0.5, -0.3, 0.8, 0.2]], np.float32),
                recurrent_kernel=np.array([[0.1, 0.4, -0.6, 0.3]], np.float32),
                bias=np.array([0.0, 1.0, 0.0, 0.0], np.float32),
            ),
        ),
        dense_kernel=np.array([[2.0]], np.float32),
        dense_bias=np.array([0.5], np.float32),
    )
    x, h, c = 1.5, 0.2, -0.4

    def sig(z: float) -> float:
        return 1 / (1 + np.exp(-z))

    i = sig(0.5 * x + 0.1 * h)
    f = sig(-0.3 * x + 0.4 * h + 1.0)
    g = np.tanh(0.8 * x - 0.6 * h)
    o = sig(0.2 * x + 0.3 * h)
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    y, state = ReferenceModel(w).step(
        np.array([[x]], np.float32), [np.array([[h]], np.float32), np.array([[c]], np.float32)]
    )
    assert state[0][0, 0] == pytest.approx(h_new, abs=1e-6)
    assert state[1][0, 0] == pytest.approx(c_new, abs=1e-6)
    assert y[0, 0] == pytest.approx(2.0 * h_new + 0.5, abs=1e-6)


def test_stacked_layers_batch_rows_are_independent() -> None:
    ref = ReferenceModel(_random_weights(3, (8, 5), 4))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    state = [rng.normal(size=s.shape).astype(np.float32) for s in ref.zero_state(6)]
    y, new = ref.step(x, state)
    assert y.shape == (6, 4) and [s.shape for s in new] == [(6, 8), (6, 8), (6, 5), (6, 5)]
    for b in range(6):
        y1, _ = ref.step(x[b : b + 1], [s[b : b + 1] for s in state])
        np.testing.assert_allclose(y1[0], y[b], atol=1e-6)


def test_weights_round_trip_and_validation(tmp_path: Path) -> None:
    w = _random_weights(4, (6, 6), 3)
    w.save(tmp_path / "weights.npz")
    back = ReferenceWeights.load(tmp_path)
    assert back.layers == (6, 6) and back.n_features == 4 and back.horizon == 3
    for a, b in zip(w.to_arrays().values(), back.to_arrays().values(), strict=True):
        np.testing.assert_array_equal(a, b)
    arrays = w.to_arrays()
    arrays["lstm_1_kernel"] = arrays["lstm_1_kernel"][:5]
    with pytest.raises(ValueError, match="layer 1"):
        ReferenceWeights.from_arrays(arrays)
    with pytest.raises(ValueError, match="x must have shape"):
        ReferenceModel(w).step(np.zeros((1, 5), np.float32), ReferenceModel(w).zero_state(1))


def test_reference_equals_tflite_float32_for_the_bundled_model() -> None:
    """The bundled weights exported as float32 and run by LiteRT agree with numpy within 1e-5."""
    from converter.export import export_tflite
    from converter.verify import TFLiteStepper
    from edge_lstm.modelspec import Quantization, load_model

    weights = ReferenceWeights.load(MODEL)
    man = load_model(MODEL).manifest
    assert weights.layers == man.layers and weights.n_features == man.pipeline.n_features
    assert weights.horizon == man.horizon
    stepper = TFLiteStepper(export_tflite(weights, Quantization.FLOAT32), weights.layers)
    ref = ReferenceModel(weights)
    rng = np.random.default_rng(2)
    batch = 4
    s_lite, s_ref = stepper.zero_state(batch), ref.zero_state(batch)
    worst = 0.0
    for _ in range(200):  # long enough for the state to matter
        x = rng.normal(0, 1, (batch, weights.n_features)).astype(np.float32)
        y_lite, s_lite = stepper.step(x, s_lite)
        y_ref, s_ref = ref.step(x, s_ref)
        worst = max(worst, float(np.max(np.abs(y_lite - y_ref))))
        worst = max(worst, *(float(np.max(np.abs(a - b))) for a, b in zip(s_lite, s_ref, strict=True)))
    assert worst <= 1e-5


def test_reference_tracks_the_shipped_dynamic_model() -> None:
    """The shipped (quantized) model.tflite is the export of the shipped weights.npz."""
    from converter.verify import TFLiteStepper
    from edge_lstm.modelspec import load_model

    bundle = load_model(MODEL)
    stepper = TFLiteStepper(bundle.content, bundle.manifest.layers)
    ref = ReferenceModel.load(MODEL)
    rng = np.random.default_rng(3)
    xs = rng.normal(0, 0.7, (100, ref.n_features)).astype(np.float32)
    y_lite, y_ref = stepper.run(xs), ref.run(xs)
    assert float(np.max(np.abs(y_lite - y_ref))) < 0.05
    assert float(np.mean(np.abs(y_lite - y_ref))) < 0.01
