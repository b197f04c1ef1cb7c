"""Export: trained LSTM weights -> one-step TFLite model with explicit state, as bytes.

The exported function takes ``x`` ``[B, D]`` and ``h_l``, ``c_l`` ``[B, H_l]`` for
every layer and returns ``y`` ``[B, K]`` and the new ``h_l``, ``c_l``; ``B`` is
dynamic.  It is written out from the weights (Keras gate order i, f, c, o), so
the graph holds only FULLY_CONNECTED, ADD, MUL, LOGISTIC, TANH, SPLIT and
CONCATENATION, which every runtime and every quantization mode supports.

In the ``dynamic`` mode the first layer's input kernel and the dense head are
built from blocks small enough for the converter to keep in float (see
``_StepModule._edge_matmul``); everything else is quantized as usual.

Inputs and outputs stay float32 in every mode, so the daemon's interface does
not change with the quantization.  Feed and read tensors through the
``serving_default`` signature (keys ``x``, ``h_0``, ``c_0``, ... and ``y``,
``h_0``, ``c_0``, ...), not by tensor index.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from converter.tfimport import tf
from edge_lstm.modelspec import Quantization, state_names
from edge_lstm.reference import ReferenceModel, ReferenceWeights
from edge_lstm.runtime import NATIVE_INFO, native_log_to_debug

_LOG = logging.getLogger(__name__)

SIGNATURE_KEY = "serving_default"
# The TFLite converter's default: dynamic-range quantization skips smaller weight tensors.
_DYNAMIC_MIN_ELEMENTS = 1024

F32 = npt.NDArray[np.float32]
RepresentativeData = Callable[[], Iterator[dict[str, F32]]]


class _StepModule(tf.Module):
    """Holds the step function; weights are graph constants."""

    def __init__(self, weights: ReferenceWeights, float_edges: bool = False) -> None:
        super().__init__()
        self._weights = weights
        self._float_edges = float_edges
        d = weights.n_features
        specs = [tf.TensorSpec([None, d], tf.float32, name="x")]
        for name, h in zip(state_names(weights.layers), [h for h in weights.layers for _ in range(2)], strict=True):
            specs.append(tf.TensorSpec([None, h], tf.float32, name=name))
        self.step = tf.function(self._step, input_signature=specs)

    def _step(self, x: tf.Tensor, *state: tf.Tensor) -> dict[str, tf.Tensor]:
        out: dict[str, tf.Tensor] = {}
        inp = x
        for i, layer in enumerate(self._weights.lstm):
            h, c = state[2 * i], state[2 * i + 1]
            # Two matmuls, not one over [x, h]: dynamic-range quantization then scales the
            # inputs and the state separately, and the state keeps its precision.
            zx = self._edge_matmul(inp, layer.kernel) if i == 0 else tf.matmul(inp, tf.constant(layer.kernel))
            z = zx + tf.matmul(h, tf.constant(layer.recurrent_kernel))
            z = z + tf.constant(layer.bias)
            gi, gf, gc, go = tf.split(z, 4, axis=1)
            c_new = tf.sigmoid(gf) * c + tf.sigmoid(gi) * tf.tanh(gc)
            h_new = tf.sigmoid(go) * tf.tanh(c_new)
            out[f"h_{i}"] = h_new
            out[f"c_{i}"] = c_new
            inp = h_new
        out["y"] = self._edge_matmul(inp, self._weights.dense_kernel) + tf.constant(self._weights.dense_bias)
        return out

    def _edge_matmul(self, inp: tf.Tensor, kernel: F32) -> tf.Tensor:
        """``inp @ kernel``; with ``float_edges``, as column blocks small enough to stay float.

        Dynamic-range quantization leaves weight tensors below
        ``_DYNAMIC_MIN_ELEMENTS`` in float.  The input kernel (where the small
        1-tick differences enter) and the dense head (where the small 1-tick
        forecast leaves) are the most sensitive weights and are small; keeping
        them float holds the dynamic model's accuracy to that of float32 for a
        few kilobytes.
        """
        rows, cols = kernel.shape
        if not self._float_edges or rows * cols < _DYNAMIC_MIN_ELEMENTS:
            return tf.matmul(inp, tf.constant(kernel))
        step = max(1, (_DYNAMIC_MIN_ELEMENTS - 1) // rows)
        parts = [tf.matmul(inp, tf.constant(kernel[:, j : j + step])) for j in range(0, cols, step)]
        return tf.concat(parts, axis=1)


def representative_from_inputs(
    weights: ReferenceWeights, sequences: Sequence[F32], max_samples: int = 1000, seed: int = 0
) -> list[dict[str, F32]]:
    """Real ``(x, h, c)`` tuples: stream the float model over input sequences and sample the ticks."""
    ref = ReferenceModel(weights)
    names = state_names(weights.layers)
    samples: list[dict[str, F32]] = []
    for seq in sequences:
        state = ref.zero_state(1)
        for t in range(seq.shape[0]):
            sample = {"x": seq[t : t + 1].astype(np.float32)}
            sample.update({n: s.copy() for n, s in zip(names, state, strict=True)})
            samples.append(sample)
            _, state = ref.step(seq[t : t + 1], state)
    if len(samples) > max_samples:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(samples), size=max_samples, replace=False))
        samples = [samples[i] for i in keep]
    return samples


def export_tflite(
    weights: ReferenceWeights,
    mode: Quantization,
    representative: Sequence[dict[str, F32]] | None = None,
) -> bytes:
    """Convert the one-step model to TFLite bytes in one quantization mode.

    ``int8`` and ``int16x8`` need ``representative``: real inputs and states
    (see :func:`representative_from_inputs`), never zeros.
    """
    module = _StepModule(weights, float_edges=mode is Quantization.DYNAMIC)
    concrete = module.step.get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if mode is not Quantization.FLOAT32:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode is Quantization.FLOAT16:
        conv.target_spec.supported_types = [tf.float16]
    elif mode in (Quantization.INT8, Quantization.INT16X8):
        if not representative:
            raise ValueError(f"{mode.value} quantization needs a representative dataset")
        data = list(representative)

        def gen() -> Iterator[dict[str, F32]]:
            yield from data

        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            if mode is Quantization.INT8
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        # Keep float32 at the interface: the daemon feeds every mode the same way.
        conv.inference_input_type = tf.float32
        conv.inference_output_type = tf.float32
    # TensorFlow's quantizer prints its settings ("fully_quantize: 0, ...") on descriptor 2 and
    # calibrates with its own deprecated tf.lite.Interpreter (a UserWarning each time): neither
    # is anything a user can act on, and -q promises errors only.
    with warnings.catch_warnings(), native_log_to_debug((NATIVE_INFO, "fully_quantize: ")):
        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated", UserWarning)
        content: bytes = conv.convert()
    _LOG.info("exported %s model: %d bytes", mode.value, len(content))
    return content
