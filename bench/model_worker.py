"""Time one TFLite interpreter package on model directories (run as a script, in any venv).

This file imports nothing from the project and only numpy plus the interpreter
package, so the same code times ``ai-edge-litert`` in the project's venv and
``tflite-runtime`` (which needs numpy<2) in a venv of its own::

    python bench/model_worker.py '{"runtime": "tflite-runtime", "models": [{"mode": "int8",
        "path": "DIR"}], "batches": [1, 64], "min_time": 0.2, "repeats": 3}'

It prints one JSON document: the runtime's version and, per model, either
``"status": "ok"`` with the time of one full step (set every input, invoke, read
every output) per batch size, or ``"status": "cannot load"`` with the runtime's
message.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}


def _bare(name: str) -> str:
    return name.split(":")[0].removeprefix("serving_default_")


def _indices(it: Any, names: list[str], outputs: bool) -> list[int]:
    sigs: dict[str, Any] = {}
    with contextlib.suppress(AttributeError):  # older runtimes lack signatures
        sigs = it._get_full_signature_list() or {}
    if sigs:
        sig = sigs.get("serving_default") or next(iter(sigs.values()))
        mapping = dict(sig["outputs" if outputs else "inputs"])
    else:
        details = it.get_output_details() if outputs else it.get_input_details()
        mapping = {_bare(d["name"]): d["index"] for d in details}
    return [int(mapping[n]) for n in names]


def time_call(fn: Callable[[], object], min_time: float, repeats: int = 3) -> float:
    """Best-of-``repeats`` mean seconds of ``fn()``, after a short warm-up."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    loops = max(3, int(min_time / repeats / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def time_step(
    it: Any, ins: list[int], outs: list[int], arrays: list[np.ndarray], min_time: float, repeats: int
) -> float:
    """Best-of-``repeats`` mean seconds of one full step."""

    def step() -> None:
        for idx, a in zip(ins, arrays, strict=True):
            it.set_tensor(idx, a)
        it.invoke()
        for idx in outs:
            it.get_tensor(idx)

    return time_call(step, min_time, repeats)


def bench_model(cls: Any, path: Path, batches: list[int], min_time: float, repeats: int) -> dict[str, Any]:
    manifest = json.loads((path / "manifest.json").read_text())
    layers = [int(h) for h in manifest["layers"]]
    n_features = len(manifest["features"])
    widths = [n_features] + [h for h in layers for _ in (0, 1)]
    out: dict[str, Any] = {
        "path": str(path),
        "bytes": (path / manifest.get("model_file", "model.tflite")).stat().st_size,
    }
    try:
        it = cls(model_path=str(path / manifest.get("model_file", "model.tflite")), num_threads=1)
        ins = _indices(it, list(manifest["inputs"]), outputs=False)
        outs = _indices(it, list(manifest["outputs"]), outputs=True)
        it.allocate_tensors()
    except Exception as e:  # each runtime raises its own types for models it cannot load
        out.update(status="cannot load", error=" ".join(str(e).split())[:300])
        return out
    rng = np.random.default_rng(0)
    per_batch: dict[str, Any] = {}
    for b in batches:
        for idx, w in zip(ins, widths, strict=True):
            it.resize_tensor_input(idx, [b, w], strict=False)
        it.allocate_tensors()
        arrays = [rng.uniform(-1, 1, (b, w)).astype(np.float32) for w in widths]
        s = time_step(it, ins, outs, arrays, min_time, repeats)
        per_batch[str(b)] = {"us_per_step": s * 1e6, "us_per_row": s * 1e6 / b}
    out.update(status="ok", batches=per_batch)
    return out


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    runtime = args["runtime"]
    try:
        module = importlib.import_module(MODULES[runtime])
    except ImportError as e:
        print(json.dumps({"runtime": runtime, "error": f"cannot import: {e}"}))
        return 0
    try:
        version = importlib.metadata.version(runtime)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    results = {}
    for m in args["models"]:
        results[m["mode"]] = bench_model(
            module.Interpreter, Path(m["path"]), list(args["batches"]), float(args["min_time"]), int(args["repeats"])
        )
    print(json.dumps({"runtime": runtime, "version": version, "numpy": np.__version__, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
