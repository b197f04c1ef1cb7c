"""The one-step LSTM forecaster in plain numpy, from the model directory's ``weights.npz``.

A test oracle for the TFLite model and a baseline for the benchmark; it never
imports TensorFlow.  ``weights.npz`` holds float32 arrays in Keras layout:

``lstm_{l}_kernel`` ``[D_l, 4H_l]``, ``lstm_{l}_recurrent_kernel`` ``[H_l, 4H_l]``,
``lstm_{l}_bias`` ``[4H_l]`` for every layer ``l`` (gate order i, f, c, o), and
``dense_kernel`` ``[H_last, K]``, ``dense_bias`` ``[K]``.

The step has the same interface as the runtime's ``StepModel.step``: ``x`` ``[B, D]``
and the state list ``[h_0, c_0, h_1, c_1, ...]`` in, ``y`` ``[B, K]`` and the new
state list out.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

_LOG = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.npz"

F32 = npt.NDArray[np.float32]


@dataclasses.dataclass(frozen=True)
class LSTMLayerWeights:
    """One Keras LSTM layer: input kernel, recurrent kernel and bias (gates i, f, c, o)."""

    kernel: F32
    recurrent_kernel: F32
    bias: F32

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])


@dataclasses.dataclass(frozen=True)
class ReferenceWeights:
    """All weights of a stacked-LSTM forecaster with a dense head."""

    lstm: tuple[LSTMLayerWeights, ...]
    dense_kernel: F32
    dense_bias: F32

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer.units for layer in self.lstm)

    @property
    def n_features(self) -> int:
        return int(self.lstm[0].kernel.shape[0])

    @property
    def horizon(self) -> int:
        return int(self.dense_bias.shape[0])

    def to_arrays(self) -> dict[str, F32]:
        out: dict[str, F32] = {}
        for i, layer in enumerate(self.lstm):
            out[f"lstm_{i}_kernel"] = layer.kernel
            out[f"lstm_{i}_recurrent_kernel"] = layer.recurrent_kernel
            out[f"lstm_{i}_bias"] = layer.bias
        out["dense_kernel"] = self.dense_kernel
        out["dense_bias"] = self.dense_bias
        return out

    def save(self, path: Path | str) -> None:
        with open(path, "wb") as f:
            np.savez(f, **self.to_arrays())  # type: ignore[arg-type]

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.ArrayLike]) -> ReferenceWeights:
        layers: list[LSTMLayerWeights] = []
        i = 0
        while f"lstm_{i}_kernel" in arrays:
            layer = LSTMLayerWeights(
                kernel=np.asarray(arrays[f"lstm_{i}_kernel"], dtype=np.float32),
                recurrent_kernel=np.asarray(arrays[f"lstm_{i}_recurrent_kernel"], dtype=np.float32),
                bias=np.asarray(arrays[f"lstm_{i}_bias"], dtype=np.float32),
            )
            h = layer.units
            d_in = layers[-1].units if layers else layer.kernel.shape[0]
            shapes = (layer.kernel.shape, layer.recurrent_kernel.shape, layer.bias.shape)
            if shapes != ((d_in, 4 * h), (h, 4 * h), (4 * h,)):
                raise ValueError(f"LSTM layer {i} has inconsistent weight shapes")
            layers.append(layer)
            i += 1
        if not layers:
            raise ValueError("no LSTM layer weights (lstm_0_kernel missing)")
        dk = np.asarray(arrays["dense_kernel"], dtype=np.float32)
        db = np.asarray(arrays["dense_bias"], dtype=np.float32)
        if dk.ndim != 2 or dk.shape[0] != layers[-1].units or db.shape != (dk.shape[1],):
            raise ValueError("dense weights do not fit the last LSTM layer")
        return cls(lstm=tuple(layers), dense_kernel=dk, dense_bias=db)

    @classmethod
    def load(cls, path: Path | str) -> ReferenceWeights:
        p = Path(path)
        if p.is_dir():
            p = p / WEIGHTS_NAME
        with np.load(p) as z:
            return cls.from_arrays({k: z[k] for k in z.files})


def _sigmoid(z: F32) -> F32:
    return 0.5 * (np.tanh(0.5 * z) + 1.0)  # type: ignore[no-any-return]


class ReferenceModel:
    """Numpy implementation of the exported one-step model (float32 throughout)."""

    def __init__(self, weights: ReferenceWeights) -> None:
        self.weights = weights
        self.layers = weights.layers
        self.horizon = weights.horizon
        self.n_features = weights.n_features

    @classmethod
    def load(cls, path: Path | str) -> ReferenceModel:
        """From a model directory or a ``weights.npz`` file."""
        return cls(ReferenceWeights.load(path))

    def zero_state(self, batch: int) -> list[F32]:
        return [np.zeros((batch, h), dtype=np.float32) for h in self.layers for _ in range(2)]

    def step(self, x: npt.ArrayLike, state: list[F32]) -> tuple[F32, list[F32]]:
        """One tick for ``B`` streams: ``x`` ``[B, D]``, state ``[h_0, c_0, ...]``."""
        inp = np.asarray(x, dtype=np.float32)
        if inp.ndim != 2 or inp.shape[1] != self.n_features:
            raise ValueError(f"x must have shape [B, {self.n_features}], got {inp.shape}")
        if len(state) != 2 * len(self.layers):
            raise ValueError(f"state must hold {2 * len(self.layers)} arrays, got {len(state)}")
        new_state: list[F32] = []
        for i, layer in enumerate(self.weights.lstm):
            h, c = state[2 * i], state[2 * i + 1]
            z = inp @ layer.kernel + h @ layer.recurrent_kernel + layer.bias
            n = layer.units
            gi = _sigmoid(z[:, :n])
            gf = _sigmoid(z[:, n : 2 * n])
            gc = np.tanh(z[:, 2 * n : 3 * n])
            go = _sigmoid(z[:, 3 * n :])
            c_new = (gf * c + gi * gc).astype(np.float32)
            h_new = (go * np.tanh(c_new)).astype(np.float32)
            new_state += [h_new, c_new]
            inp = h_new
        y = (inp @ self.weights.dense_kernel + self.weights.dense_bias).astype(np.float32)
        return y, new_state

    def run(self, xs: npt.ArrayLike) -> F32:
        """Stream a sequence ``[T, D]`` (one stream, zero initial state); outputs ``[T, K]``."""
        seq = np.asarray(xs, dtype=np.float32)
        state = self.zero_state(1)
        out = np.empty((seq.shape[0], self.horizon), dtype=np.float32)
        for t in range(seq.shape[0]):
            y, state = self.step(seq[t : t + 1], state)
            out[t] = y[0]
        return out
