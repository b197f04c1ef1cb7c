"""The interpreter wrapper: tensor mapping, batching, copies, clear errors (bundled model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_lstm import runtime
from edge_lstm.modelspec import ModelBundle, ModelError, load_model
from edge_lstm.reference import ReferenceModel
from edge_lstm.runtime import BatchPolicy, Runtime, find_backend, load_step_model

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "taylor"


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_model(MODEL_DIR)


def _inputs(bundle: ModelBundle, b: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    m = bundle.manifest
    x = rng.normal(size=(b, m.pipeline.n_features)).astype(np.float32)
    state = [rng.normal(scale=0.5, size=(b, h)).astype(np.float32) for h in m.layers for _ in (0, 1)]
    return x, state


def test_auto_picks_litert_and_reports_its_version(bundle: ModelBundle) -> None:
    model = load_step_model(bundle)
    assert model.runtime_name == "ai-edge-litert"
    assert model.runtime_version[0].isdigit()
    assert model.manifest is bundle.manifest


@pytest.mark.parametrize("policy", list(BatchPolicy))
def test_batched_step_equals_row_by_row(bundle: ModelBundle, policy: BatchPolicy) -> None:
    model = load_step_model(bundle, policy=policy)
    m = bundle.manifest
    for b in (1, 3, 8, 13):
        x, state = _inputs(bundle, b, seed=b)
        y, new = model.step(x, state)
        assert y.shape == (b, m.horizon) and y.dtype == np.float32
        assert [s.shape for s in new] == [(b, h) for h in m.layers for _ in (0, 1)]
        for i in range(b):
            y1, new1 = model.step(x[i : i + 1], [s[i : i + 1] for s in state])
            np.testing.assert_allclose(y1[0], y[i], atol=1e-5)
            for s1, s in zip(new1, new, strict=True):
                np.testing.assert_allclose(s1[0], s[i], atol=1e-5)


def test_pow2_policy_keeps_one_interpreter_per_bucket(bundle: ModelBundle) -> None:
    model = load_step_model(bundle, policy="pow2")
    for b in (3, 4, 5, 7, 8):
        model.step(*_inputs(bundle, b))
    assert model.interpreters == 3  # sizes 1 (initial), 4 and 8


def test_results_are_copies(bundle: ModelBundle) -> None:
    model = load_step_model(bundle)
    x, state = _inputs(bundle, 4, seed=1)
    y, new = model.step(x, state)
    kept_y, kept_h = y.copy(), new[0].copy()
    model.step(*_inputs(bundle, 4, seed=2))
    np.testing.assert_array_equal(y, kept_y)
    np.testing.assert_array_equal(new[0], kept_h)


def test_state_threading_follows_the_numpy_reference(bundle: ModelBundle) -> None:
    model = load_step_model(bundle)
    ref = ReferenceModel.load(MODEL_DIR)
    rng = np.random.default_rng(3)
    state = ref.zero_state(5)
    ref_state = ref.zero_state(5)
    for _ in range(60):
        x = rng.normal(size=(5, bundle.manifest.pipeline.n_features)).astype(np.float32)
        y, state = model.step(x, state)
        y_ref, ref_state = ref.step(x, ref_state)
        # dynamic-range quantization: activations are quantized per step, so allow a small deviation
        np.testing.assert_allclose(y, y_ref, atol=0.1)
    assert np.abs(state[0]).max() > 0.05  # the state really evolved


def test_empty_batch(bundle: ModelBundle) -> None:
    model = load_step_model(bundle)
    y, new = model.step(*_inputs(bundle, 0))
    assert y.shape == (0, bundle.manifest.horizon)
    assert [s.shape[0] for s in new] == [0, 0]


def test_wrong_layer_sizes_in_manifest_are_refused(bundle: ModelBundle) -> None:
    manifest = dataclasses.replace(bundle.manifest, layers=(32,))
    with pytest.raises(ModelError, match=r"ai-edge-litert .*h_0.*\[B, 32\]"):
        load_step_model(dataclasses.replace(bundle, manifest=manifest))


def test_wrong_horizon_in_manifest_is_refused(bundle: ModelBundle) -> None:
    m = bundle.manifest
    pipeline = dataclasses.replace(m.pipeline, output=dataclasses.replace(m.pipeline.output, horizon=m.horizon + 1))
    with pytest.raises(ModelError, match="'y'"):
        load_step_model(dataclasses.replace(bundle, manifest=dataclasses.replace(m, pipeline=pipeline)))


def test_missing_state_tensors_are_refused(bundle: ModelBundle) -> None:
    manifest = dataclasses.replace(bundle.manifest, layers=(64, 64))
    with pytest.raises(ModelError, match=r"missing.*h_1"):
        load_step_model(dataclasses.replace(bundle, manifest=manifest))


def test_unloadable_model_names_runtime_and_version(bundle: ModelBundle) -> None:
    version = find_backend(Runtime.LITERT).version
    broken = dataclasses.replace(bundle, content=bundle.content[: len(bundle.content) // 2])
    with pytest.raises(ModelError, match=f"ai-edge-litert {version}.*cannot be loaded"):
        load_step_model(broken)


def test_no_runtime_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        runtime,
        "_CANDIDATES",
        {Runtime.LITERT: ("no_such_pkg_a.interpreter", "x"), Runtime.TFLITE: ("no_such_pkg_b.interpreter", "y")},
    )
    with pytest.raises(ModelError, match="pip install ai-edge-litert' or 'pip install tflite-runtime"):
        find_backend("auto")
    with pytest.raises(ModelError, match="pip install tflite-runtime"):
        find_backend("tflite-runtime")


def test_unknown_runtime_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        find_backend("tensorflow")
