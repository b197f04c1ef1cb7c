"""Training: a Keras sequence model ``Input(None, D) -> L x LSTM(H) -> Dense(K)``.

The model is trained on windows of the training part (each from zero state,
with the first ``warmup`` ticks carrying no loss), with early stopping on the
validation part.  Targets may be missing (NaN): the loss skips them.

After training, every horizon's output gets a gain in ``[0, 1]`` fitted on the
out-of-sample validation forecasts (:mod:`converter.validation`): a head that
does not beat persistence at some horizon is shrunk towards it (gain 0 is
exactly persistence, since the outputs are deltas).  The gains are folded into
the dense layer (:func:`apply_gains`), so the exported model is unchanged in shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.tfimport import ABSL_PREAMBLE, keras, tf
from edge_lstm.reference import LSTMLayerWeights, ReferenceWeights
from edge_lstm.runtime import NATIVE_INFO, native_log_to_debug

_LOG = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

# With op determinism on (a seed gives one model), TensorFlow 2.21's input pipeline logs this
# error-level line once per network trained; the attribute is ignored and nothing is wrong.
HARMLESS_TF_LINE = re.compile(r"NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    units: tuple[int, ...] = (64,)
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 3e-3
    patience: int = 8
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FitResult:
    model: keras.Model
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    seconds: float
    history: dict[str, list[float]]


def set_seed(seed: int) -> None:
    """Same seed, same data -> same model."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def build_model(n_features: int, units: Sequence[int], horizon: int) -> keras.Model:
    """The sequence model; ``LSTM(64)`` on ``(None, 10)`` with ``Dense(32)`` is the classic shape."""
    inp = keras.Input(shape=(None, n_features), name="x")
    h = inp
    for i, n in enumerate(units):
        h = keras.layers.LSTM(n, return_sequences=True, name=f"lstm_{i}")(h)
    out = keras.layers.Dense(horizon, name="dense")(h)
    return keras.Model(inp, out, name="edge_lstm_forecaster")


def masked_mse(horizon_weights: F32) -> Any:
    """Weighted mean squared error over the finite targets only.

    ``horizon_weights`` balance the horizons: a 1-tick change is much smaller
    than a 16-tick one, and unweighted the long horizons would drown it out.
    """
    w = tf.constant(np.asarray(horizon_weights, dtype=np.float32))

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        mask = tf.math.is_finite(y_true)
        diff = tf.where(mask, y_pred - tf.where(mask, y_true, tf.zeros_like(y_true)), tf.zeros_like(y_pred))
        n = tf.maximum(tf.reduce_sum(tf.cast(mask, y_pred.dtype)), 1.0)
        return tf.reduce_sum(tf.square(diff) * w) / n

    return loss


def horizon_weights(y: F32) -> F32:
    """Inverse mean square of each horizon's finite targets, normalised to mean 1."""
    ms = np.array([np.nanmean(np.square(y[..., k])) for k in range(y.shape[-1])], dtype=np.float64)
    ms = np.where(np.isfinite(ms) & (ms > 0), ms, 1.0)
    w = 1.0 / ms
    return (w / w.mean()).astype(np.float32)


class _Progress(keras.callbacks.Callback):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self._epochs = epochs
        self._t0 = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        _LOG.info(
            "epoch %d/%d  loss %.4f  val_loss %.4f  (%.0f s)",
            epoch + 1, self._epochs, logs.get("loss", float("nan")), logs.get("val_loss", float("nan")),
            time.monotonic() - self._t0,
        )  # fmt: skip


def fit(
    train: tuple[F32, F32],
    val: tuple[F32, F32],
    n_features: int,
    horizon: int,
    cfg: FitConfig,
) -> FitResult:
    """Train with early stopping on the validation loss; the best epoch's weights are kept."""
    set_seed(cfg.seed)
    model = build_model(n_features, cfg.units, horizon)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate, clipnorm=1.0),
        loss=masked_mse(horizon_weights(train[1])),
    )
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(2, cfg.patience // 3)),
        _Progress(cfg.epochs),
    ]
    t0 = time.monotonic()
    with native_log_to_debug((NATIVE_INFO, ABSL_PREAMBLE), HARMLESS_TF_LINE):
        hist = model.fit(
            train[0],
            train[1],
            validation_data=val,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            shuffle=True,
            callbacks=callbacks,
            verbose=0,
        )
    seconds = time.monotonic() - t0
    val_loss = [float(v) for v in hist.history.get("val_loss", [])]
    best = int(np.argmin(val_loss)) if val_loss else 0
    return FitResult(
        model=model,
        epochs_run=len(val_loss),
        best_epoch=best + 1,
        best_val_loss=val_loss[best] if val_loss else float("nan"),
        seconds=seconds,
        history={k: [float(x) for x in v] for k, v in hist.history.items()},
    )


def extract_weights(model: keras.Model) -> ReferenceWeights:
    """The trained weights in the layout of ``weights.npz``."""
    layers: list[LSTMLayerWeights] = []
    dense: list[F32] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            k, rk, b = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            layers.append(LSTMLayerWeights(kernel=k, recurrent_kernel=rk, bias=b))
        elif isinstance(layer, keras.layers.Dense):
            dense = [np.asarray(w, dtype=np.float32) for w in layer.get_weights()]
    return ReferenceWeights(lstm=tuple(layers), dense_kernel=dense[0], dense_bias=dense[1])


def model_from_weights(weights: ReferenceWeights) -> keras.Model:
    """Rebuild the Keras sequence model from ``weights.npz`` (for verification)."""
    model = build_model(weights.n_features, weights.layers, weights.horizon)
    for i, layer in enumerate(weights.lstm):
        model.get_layer(f"lstm_{i}").set_weights([layer.kernel, layer.recurrent_kernel, layer.bias])
    model.get_layer("dense").set_weights([weights.dense_kernel, weights.dense_bias])
    return model


def predict_sequence(model: keras.Model, x: F32) -> F32:
    """Run the sequence model over one whole sequence ``[T, D]`` from zero state; ``[T, K]``.

    The call runs as one TensorFlow graph, traced once per model for any length: called
    eagerly, Keras steps the LSTM's loop op by op from Python (4.4 ms a tick on 2 cores
    against 0.06 ms in the graph, with the same numbers), which made a 30,000-tick
    validation block cost minutes.
    """
    run = _sequence_runs.get(model)
    if run is None:
        spec = tf.TensorSpec([1, None, model.input_shape[-1]], tf.float32)
        # A weak reference: the cache must not keep the model alive.  A partial rather than a
        # lambda: TensorFlow counts traces per code object and would warn of "retracing" by the
        # fifth model, though each model's graph is traced once.
        run = tf.function(functools.partial(_run_model, weakref.ref(model)), input_signature=[spec])
        _sequence_runs[model] = run
    return np.asarray(run(x[None].astype(np.float32)))[0].astype(np.float32)


_sequence_runs: weakref.WeakKeyDictionary[keras.Model, Any] = weakref.WeakKeyDictionary()


def _run_model(model: weakref.ref[keras.Model], x: tf.Tensor) -> tf.Tensor:
    alive = model()
    assert alive is not None, "the model was freed while its traced run is in use"
    return alive(x, training=False)


def apply_gains(weights: ReferenceWeights, gains: F32) -> ReferenceWeights:
    """Fold per-output gains into the dense head."""
    g = np.asarray(gains, dtype=np.float32)
    return dataclasses.replace(
        weights,
        dense_kernel=(weights.dense_kernel * g[None, :]).astype(np.float32),
        dense_bias=(weights.dense_bias * g).astype(np.float32),
    )
