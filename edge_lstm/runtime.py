"""The one place that picks the TFLite interpreter and runs the one-step model.

``ai-edge-litert`` (``ai_edge_litert.interpreter``) is preferred; the legacy
``tflite-runtime`` package is the fallback for devices without a LiteRT wheel.
:func:`load_step_model` turns a verified :class:`~edge_lstm.modelspec.ModelBundle`
into a :class:`StepModel` whose :meth:`StepModel.step` takes a batch of inputs
and LSTM states and returns the forecasts and the new states.

The batch dimension is dynamic.  By default (``BatchPolicy.EXACT``) one
interpreter is resized whenever the batch size changes; the alternative
(``POW2``) pads a batch to the next power of two and keeps one interpreter per
such size.  Measured on the bundled model (H=64, K=16, dynamic-range) and a
float32 model of the same shape, with batch sizes drawn from 1..300, EXACT was
about twice as fast (0.5 vs 1.0 us and 0.7 vs 1.3 us per row): resizing is
cheap, padding is not.  Rows of an LSTM batch are independent, so padding never
changes the real rows' results.

A :class:`StepModel` is not thread-safe: one worker thread uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_lstm.modelspec import Manifest, ModelBundle, ModelError

_LOG = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


class Runtime(str, enum.Enum):
    """Which interpreter package to use."""

    AUTO = "auto"
    LITERT = "ai-edge-litert"
    TFLITE = "tflite-runtime"


class BatchPolicy(str, enum.Enum):
    """How a batch of any size is fitted to an interpreter."""

    POW2 = "pow2"  # pad to the next power of two; one interpreter per such size
    EXACT = "exact"  # one interpreter, resized whenever the batch size changes


# (runtime, module holding Interpreter, distribution name for the version)
_CANDIDATES: dict[Runtime, tuple[str, str]] = {
    Runtime.LITERT: ("ai_edge_litert.interpreter", "ai-edge-litert"),
    Runtime.TFLITE: ("tflite_runtime.interpreter", "tflite-runtime"),
}


class StepFunction(Protocol):
    """What the engine needs from a model: a manifest and a batched step."""

    manifest: Manifest
    runtime_name: str
    runtime_version: str

    def step(self, x: npt.NDArray[np.float32], state: Sequence[npt.NDArray[np.float32]]) -> tuple[F32, list[F32]]: ...


@dataclasses.dataclass(frozen=True)
class _Backend:
    runtime: Runtime
    version: str
    interpreter_cls: Any


def _distribution_version(module: Any, dist: str) -> str:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    import importlib.metadata  # only here: importing it cost the daemon 0.8 MB resident at start

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_backend(runtime: Runtime | str = Runtime.AUTO) -> _Backend:
    """Import the requested interpreter package (or the first available one for ``auto``)."""
    runtime = Runtime(runtime)
    order = [Runtime.LITERT, Runtime.TFLITE] if runtime is Runtime.AUTO else [runtime]
    errors = []
    for candidate in order:
        module_name, dist = _CANDIDATES[candidate]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"{candidate.value}: {e}")
            continue
        top = importlib.import_module(module_name.split(".")[0])
        return _Backend(candidate, _distribution_version(top, dist), module.Interpreter)
    wanted = " or ".join(f"'pip install {c.value}'" for c in order)
    raise ModelError(f"no TFLite interpreter is installed ({'; '.join(errors)}); run {wanted}")


@dataclasses.dataclass
class _Slot:
    """One interpreter allocated for one batch size, with its tensor indices."""

    interpreter: Any
    batch: int
    inputs: list[int]  # tensor indices in manifest.input_names order
    outputs: list[int]  # tensor indices in manifest.output_names order


NATIVE_INFO = "INFO: "  # how the runtimes' C++ logger starts an informational line


@contextlib.contextmanager
def native_log_to_debug(
    prefixes: tuple[str, ...] = (NATIVE_INFO,), pattern: re.Pattern[str] | None = None
) -> Iterator[None]:
    """Turn the runtime's native INFO lines on file descriptor 2 into debug log records.

    ``prefixes``: the starts of the lines to turn into records (``INFO: `` by default);
    ``pattern``: lines it matches anywhere are taken too.

    LiteRT's C++ code prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` to
    descriptor 2 when a process first allocates an interpreter; ``TF_CPP_MIN_LOG_LEVEL`` does
    not reach that logger, and Python's ``sys.stderr`` is not involved. While the block runs,
    descriptor 2 is a pipe read by a thread: lines with one of the prefixes go to this module's
    logger at debug level, every other line (warnings, errors, other threads' output) goes on to
    the real descriptor 2 as soon as it is read, so a native crash inside the block still shows
    what was printed before it.
    """
    try:
        if sys.stderr is not None:  # None when the process started with descriptor 2 closed
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 at all: nothing to keep clean
        yield
        return
    try:
        read_end, write_end = os.pipe()
    except OSError:
        os.close(saved)
        yield
        return

    def pump() -> None:
        with open(read_end, "rb") as lines:  # ends when the block's end closes the last write end
            for raw in lines:
                line = raw.decode(errors="replace")
                if line.startswith(prefixes) or (pattern is not None and pattern.search(line)):
                    _LOG.debug("%s", line.removeprefix(NATIVE_INFO).strip())
                else:
                    with contextlib.suppress(OSError):
                        _write_all(saved, raw)

    reader = threading.Thread(target=pump, name="native-log", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader drains it and stops
        reader.join(timeout=10.0)
        if not reader.is_alive():
            os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class StepModel:
    """A loaded one-step model.  Use :func:`load_step_model` to build one."""

    def __init__(
        self, bundle: ModelBundle, backend: _Backend, threads: int = 1, policy: BatchPolicy = BatchPolicy.EXACT
    ) -> None:
        self.manifest: Manifest = bundle.manifest
        self.runtime_name: str = backend.runtime.value
        self.runtime_version: str = backend.version
        self.policy = BatchPolicy(policy)
        self._backend = backend
        self._content = bundle.content
        self._threads = int(threads)
        self._where = str(bundle.model_path)
        self._slots: dict[int, _Slot] = {}
        self._layers = self.manifest.layers
        self._n_state = 2 * len(self._layers)
        self._state_sizes = [h for h in self._layers for _ in (0, 1)]
        with native_log_to_debug():
            first = self._new_slot(1)
        self._slots[1] = first

    # -- construction ---------------------------------------------------------------------------

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.runtime_name} {self.runtime_version}: model {self._where}: {what}")

    def _new_interpreter(self) -> Any:
        try:
            return self._backend.interpreter_cls(model_content=self._content, num_threads=self._threads)
        except Exception as e:  # the runtimes raise ValueError/RuntimeError for models they cannot load
            raise self._fail(f"cannot be loaded: {e}") from e

    def _tensor_indices(self, interpreter: Any) -> tuple[list[int], list[int]]:
        m = self.manifest
        sigs: dict[str, Any] = {}
        with contextlib.suppress(AttributeError):  # older runtimes lack signature support
            sigs = interpreter._get_full_signature_list() or {}
        if sigs:
            sig = sigs.get("serving_default") or next(iter(sigs.values()))
            in_map: dict[str, int] = dict(sig["inputs"])
            out_map: dict[str, int] = dict(sig["outputs"])
        else:
            # No signature: fall back to tensor names such as "serving_default_x:0".
            in_map = {_bare_name(d["name"]): d["index"] for d in interpreter.get_input_details()}
            out_map = {_bare_name(d["name"]): d["index"] for d in interpreter.get_output_details()}
        missing_in = [n for n in m.input_names if n not in in_map]
        missing_out = [n for n in m.output_names if n not in out_map]
        if missing_in or missing_out:
            raise self._fail(
                f"tensors named in the manifest are missing (inputs {missing_in}, outputs {missing_out}); "
                f"the model has inputs {sorted(in_map)} and outputs {sorted(out_map)}"
            )
        return [in_map[n] for n in m.input_names], [out_map[n] for n in m.output_names]

    def _check_shapes(self, interpreter: Any, inputs: list[int], outputs: list[int]) -> None:
        m = self.manifest
        widths_in = [m.pipeline.n_features, *self._state_sizes]
        widths_out = [m.horizon, *self._state_sizes]
        details = {d["index"]: d for d in interpreter.get_tensor_details()}
        for names, indices, widths in ((m.input_names, inputs, widths_in), (m.output_names, outputs, widths_out)):
            for name, idx, width in zip(names, indices, widths, strict=True):
                d = details[idx]
                shape = [int(s) for s in d.get("shape_signature", d["shape"])]
                if len(shape) != 2 or shape[1] != width:
                    raise self._fail(f"tensor {name!r} has shape {shape}, the manifest implies [B, {width}]")
                if np.dtype(d["dtype"]) != np.float32:
                    raise self._fail(f"tensor {name!r} is {np.dtype(d['dtype']).name}, expected float32")

    def _new_slot(self, batch: int) -> _Slot:
        it = self._new_interpreter()
        inputs, outputs = self._tensor_indices(it)
        if not self._slots:
            self._check_shapes(it, inputs, outputs)
        widths = [self.manifest.pipeline.n_features, *self._state_sizes]
        try:
            for idx, width in zip(inputs, widths, strict=True):
                it.resize_tensor_input(idx, [batch, width], strict=False)
            it.allocate_tensors()
        except Exception as e:
            raise self._fail(f"cannot be prepared for batch size {batch}: {e}") from e
        return _Slot(it, batch, inputs, outputs)

    def _resize(self, slot: _Slot, batch: int) -> None:
        widths = [self.manifest.pipeline.n_features, *self._state_sizes]
        for idx, width in zip(slot.inputs, widths, strict=True):
            slot.interpreter.resize_tensor_input(idx, [batch, width], strict=False)
        slot.interpreter.allocate_tensors()
        slot.batch = batch

    # -- inference ------------------------------------------------------------------------------

    @property
    def interpreters(self) -> int:
        """How many interpreters are allocated (one per batch size bucket)."""
        return len(self._slots)

    def step(self, x: npt.NDArray[np.float32], state: Sequence[npt.NDArray[np.float32]]) -> tuple[F32, list[F32]]:
        """One tick for a batch: ``x`` ``[B, D]``, ``state`` ``[h_0, c_0, ...]`` each ``[B, H_l]``.

        Returns ``y`` ``[B, K]`` and the new state, as arrays the caller owns.
        """
        b = int(x.shape[0])
        if len(state) != self._n_state:
            raise ValueError(f"expected {self._n_state} state arrays, got {len(state)}")
        if b == 0:
            return np.zeros((0, self.manifest.horizon), np.float32), [
                np.zeros((0, h), np.float32) for h in self._state_sizes
            ]
        if self.policy is BatchPolicy.POW2:
            size = 1 << (b - 1).bit_length()
            slot = self._slots.get(size)
            if slot is None:
                slot = self._slots[size] = self._new_slot(size)
                _LOG.debug("allocated an interpreter for batch size %d", size)
        else:
            size = b
            slot = self._slots[1]
            if slot.batch != b:
                self._resize(slot, b)
        it = slot.interpreter
        arrays = [x, *state]
        for idx, a in zip(slot.inputs, arrays, strict=True):
            if size != b:
                padded = np.zeros((size, a.shape[1]), np.float32)
                padded[:b] = a
                a = padded
            else:
                a = np.ascontiguousarray(a, dtype=np.float32)
            it.set_tensor(idx, a)
        it.invoke()
        out = [it.get_tensor(idx) for idx in slot.outputs]  # get_tensor returns copies
        if size != b:
            out = [o[:b] for o in out]
        return out[0], out[1:]


def _bare_name(tensor_name: str) -> str:
    name = tensor_name.split(":")[0]
    return name.removeprefix("serving_default_")


def load_step_model(
    bundle: ModelBundle,
    runtime: Runtime | str = Runtime.AUTO,
    threads: int = 1,
    policy: BatchPolicy | str = BatchPolicy.EXACT,
) -> StepModel:
    """Build a :class:`StepModel` for a verified model bundle.

    Raises :class:`~edge_lstm.modelspec.ModelError` when no runtime is
    installed, or the runtime cannot load the model (the message names the
    runtime and its version), or the model's tensors do not match its manifest.
    """
    backend = find_backend(runtime)
    model = StepModel(bundle, backend, threads=threads, policy=BatchPolicy(policy))
    _LOG.info(
        "model %s loaded with %s %s (%d thread(s))",
        bundle.manifest.model_id, backend.runtime.value, backend.version, threads,
    )  # fmt: skip
    return model
