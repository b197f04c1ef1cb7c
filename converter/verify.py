"""Verification: stream sequences through a TFLite model with the LiteRT interpreter, tick by tick.

The model's state is carried between ticks exactly as the daemon carries it;
the result is compared with the Keras sequence model run over the whole
sequence at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter

from edge_lstm.modelspec import state_names
from edge_lstm.runtime import native_log_to_debug

_LOG = logging.getLogger(__name__)

SIGNATURE_KEY = "serving_default"
FLOAT32_PARITY_LIMIT = 1e-4

F32 = npt.NDArray[np.float32]


class TFLiteStepper:
    """A one-step model in the LiteRT interpreter, driven through its signature."""

    def __init__(self, content: bytes, layers: Sequence[int], threads: int = 1) -> None:
        with native_log_to_debug():  # LiteRT's "INFO: Created ... delegate" line, as the daemon keeps it
            self._interp = Interpreter(model_content=content, num_threads=threads)
            self._runner = self._interp.get_signature_runner(SIGNATURE_KEY)
        self.layers = tuple(layers)
        self._names = state_names(self.layers)
        inputs = self._runner.get_input_details()
        outputs = self._runner.get_output_details()
        missing = [n for n in ["x", *self._names] if n not in inputs] + [
            n for n in ["y", *self._names] if n not in outputs
        ]
        if missing:
            raise ValueError(f"model signature lacks {missing}")
        self.n_features = int(inputs["x"]["shape_signature"][-1])
        self.horizon = int(outputs["y"]["shape_signature"][-1])
        self.input_details = inputs

    def zero_state(self, batch: int) -> list[F32]:
        return [np.zeros((batch, h), dtype=np.float32) for h in self.layers for _ in range(2)]

    def step(self, x: F32, state: list[F32]) -> tuple[F32, list[F32]]:
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        feeds.update({n: np.ascontiguousarray(s, dtype=np.float32) for n, s in zip(self._names, state, strict=True)})
        out = self._runner(**feeds)
        return np.asarray(out["y"], dtype=np.float32), [np.asarray(out[n], dtype=np.float32) for n in self._names]

    def run(self, xs: F32) -> F32:
        """Stream one sequence ``[T, D]`` from zero state; outputs ``[T, K]``."""
        state = self.zero_state(1)
        out = np.empty((xs.shape[0], self.horizon), dtype=np.float32)
        for t in range(xs.shape[0]):
            y, state = self.step(xs[t : t + 1], state)
            out[t] = y[0]
        return out


def check_batch_resize(content: bytes, layers: Sequence[int], batch: int = 7) -> F32:
    """Resize the batch dimension with ``resize_tensor_input`` + ``allocate_tensors`` and invoke once."""
    with native_log_to_debug():
        interp = Interpreter(model_content=content)
        details = interp.get_input_details()
        for d in details:
            interp.resize_tensor_input(d["index"], [batch, int(d["shape_signature"][-1])])
        interp.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in details:
        interp.set_tensor(d["index"], rng.uniform(-0.5, 0.5, size=(batch, int(d["shape"][-1]))).astype(np.float32))
    interp.invoke()
    outs = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    for o in outs:
        if o.shape[0] != batch:
            raise ValueError(f"output batch {o.shape[0]} after resizing the input batch to {batch}")
    return outs[0]


def max_abs_deviation(a: Sequence[F32], b: Sequence[F32]) -> float:
    """Largest absolute difference over all pairs of sequences."""
    return max((float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True) if x.size), default=0.0)
