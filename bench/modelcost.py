"""Model cost: one batched model step by batch size, quantization mode and runtime.

Measured for every model directory of :mod:`bench.models` (the bundled model and one per
quantization mode):

* ``ai-edge-litert`` directly (``bench/model_worker.py``: set inputs, invoke, read outputs);
* ``edge_lstm.runtime`` (``StepModel.step``, what the daemon calls), at a fixed batch size and
  with batch sizes varying from step to step as they do in the daemon (each change resizes the
  interpreter);
* ``tflite-runtime`` in a venv of its own (it needs numpy<2), created under ``bench/.venvs/``
  only with ``--tflite``; models it cannot load are reported as such;
* the numpy reference (``edge_lstm.reference``, float32 weights from ``weights.npz``).

All single-threaded (the daemon's default ``model.threads = 1``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.model_worker import time_call

_LOG = logging.getLogger(__name__)

BATCHES = (1, 16, 64, 256, 1024)
QUICK_BATCHES = (1, 64)
VENVS = Path(__file__).resolve().parent / ".venvs"
TFLITE_VENV = VENVS / "tflite-runtime"
WORKER = Path(__file__).resolve().parent / "model_worker.py"
VARYING_MAX_BATCH = 256  # the daemon's default engine.max_batch
# BLAS thread pools spin on a shared 2-core machine and make small products erratic: one thread.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def ensure_tflite_venv(venv: Path = TFLITE_VENV) -> tuple[Path | None, str]:
    """Create the tflite-runtime venv when missing; returns (python, note)."""
    py = venv / "bin" / "python"
    if py.exists():
        return py, "existing venv"
    venv.parent.mkdir(parents=True, exist_ok=True)
    _LOG.info("creating %s with tflite-runtime and numpy<2 ...", venv)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", "tflite-runtime", "numpy<2"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return None, f"cannot install tflite-runtime: {msg}"
    return py, "venv created"


def run_worker(
    python: Path | str, runtime: str, dirs: dict[str, Path], batches: tuple[int, ...], min_time: float
) -> dict[str, Any]:
    args = {
        "runtime": runtime,
        "models": [{"mode": k, "path": str(v)} for k, v in dirs.items()],
        "batches": list(batches),
        "min_time": min_time,
        "repeats": 3,
    }
    proc = subprocess.run([str(python), str(WORKER), json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"runtime": runtime, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    try:
        doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"runtime": runtime, "error": f"unreadable output: {proc.stdout[-200:]!r}"}
    return doc


def _inputs(rng: np.random.Generator, b: int, n_features: int, layers: tuple[int, ...]) -> tuple[Any, list[Any]]:
    x = rng.uniform(-1, 1, (b, n_features)).astype(np.float32)
    state = [rng.uniform(-0.5, 0.5, (b, h)).astype(np.float32) for h in layers for _ in (0, 1)]
    return x, state


def bench_step_model(directory: Path, batches: tuple[int, ...], min_time: float) -> dict[str, Any]:
    """``edge_lstm.runtime.StepModel.step`` with ai-edge-litert: fixed and varying batch sizes."""
    from edge_lstm.modelspec import ModelError, load_model
    from edge_lstm.runtime import Runtime, load_step_model

    try:
        model = load_step_model(load_model(directory), Runtime.LITERT, threads=1)
    except ModelError as e:
        return {"status": "cannot load", "error": str(e)}
    m = model.manifest
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"status": "ok", "runtime_version": model.runtime_version, "batches": {}}
    for b in batches:
        x, state = _inputs(rng, b, m.pipeline.n_features, m.layers)
        s = time_call(functools.partial(model.step, x, state), min_time)
        out["batches"][str(b)] = {"us_per_step": s * 1e6, "us_per_row": s * 1e6 / b}
    # Varying sizes, as the daemon's batches come: every change of size resizes the interpreter.
    sizes = rng.integers(1, VARYING_MAX_BATCH + 1, 200)
    feeds = [_inputs(rng, int(b), m.pipeline.n_features, m.layers) for b in sizes]
    rows = int(sizes.sum())

    def cycle() -> None:
        for x, state in feeds:
            model.step(x, state)

    s = time_call(cycle, min_time, repeats=2)
    out["varying"] = {
        "sizes": f"uniform 1..{VARYING_MAX_BATCH}",
        "us_per_step": s * 1e6 / len(feeds),
        "us_per_row": s * 1e6 / rows,
    }
    return out


def bench_reference(directory: Path, batches: tuple[int, ...], min_time: float) -> dict[str, Any]:
    """The numpy reference step, in a child process with one BLAS thread (like the runtimes' one thread)."""
    env = {**os.environ, **{k: "1" for k in BLAS_THREAD_VARS}}
    cmd = [sys.executable, "-m", "bench.modelcost", str(directory), json.dumps(list(batches)), str(min_time)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=models.REPO)
    try:
        doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"status": "failed", "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return doc


def _reference_in_process(directory: Path, batches: tuple[int, ...], min_time: float) -> dict[str, Any]:
    from edge_lstm.reference import ReferenceModel

    try:
        ref = ReferenceModel.load(directory)
    except (OSError, ValueError, KeyError) as e:
        return {"status": "cannot load", "error": str(e)}
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"status": "ok", "blas_threads": 1, "batches": {}}
    for b in batches:
        x, state = _inputs(rng, b, ref.n_features, ref.layers)
        s = time_call(functools.partial(ref.step, x, state), min_time)
        out["batches"][str(b)] = {"us_per_step": s * 1e6, "us_per_row": s * 1e6 / b}
    return out


def model_info(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / "manifest.json").read_text())
    weights = directory / "weights.npz"
    return {
        "path": str(directory.relative_to(models.REPO)) if directory.is_relative_to(models.REPO) else str(directory),
        "quantization": manifest["quantization"],
        "layers": manifest["layers"],
        "horizon": manifest["output"]["horizon"],
        "n_features": len(manifest["features"]),
        "model_bytes": (directory / manifest.get("model_file", "model.tflite")).stat().st_size,
        "weights_npz_bytes": weights.stat().st_size if weights.exists() else None,
    }


def run(*, quick: bool, tflite: bool, build_models: bool) -> dict[str, Any]:
    """The model-cost benchmark; returns the ``results`` part of ``model.json``."""
    batches = QUICK_BATCHES if quick else BATCHES
    min_time = 0.05 if quick else 0.3
    build_status = models.build() if build_models and not quick else {}
    dirs = {"bundled": models.BUNDLED} if quick else models.available()
    missing = [m for m in models.MODES if m not in dirs]
    results: dict[str, Any] = {
        "batches": list(batches),
        "models": {k: model_info(v) for k, v in dirs.items()},
        "modes_missing": [] if quick else missing,
        "build": build_status,
        "runtimes": {},
    }
    _LOG.info("model cost: %d model(s), batches %s", len(dirs), list(batches))
    results["runtimes"]["ai-edge-litert"] = run_worker(sys.executable, "ai-edge-litert", dirs, batches, min_time)
    results["runtimes"]["edge_lstm.runtime"] = {
        "models": {k: bench_step_model(v, batches, min_time) for k, v in dirs.items()}
    }
    if tflite and not quick:
        py, note = ensure_tflite_venv()
        if py is None:
            results["runtimes"]["tflite-runtime"] = {"error": note}
        else:
            doc = run_worker(py, "tflite-runtime", dirs, batches, min_time)
            doc["note"] = note
            results["runtimes"]["tflite-runtime"] = doc
    else:
        results["runtimes"]["tflite-runtime"] = {"error": "not measured (run with --tflite)"}
    # The reference uses the float32 Keras weights: one row per distinct weights file.
    ref_dirs = {"bundled": models.BUNDLED}
    for k, v in dirs.items():
        if k != "bundled" and (v / "weights.npz").exists():
            ref_dirs["converter-built"] = v
            break
    results["runtimes"]["numpy-reference"] = {
        "numpy": np.__version__,
        "models": {k: bench_reference(v, batches, min_time) for k, v in ref_dirs.items()},
    }
    return results


if __name__ == "__main__":  # the reference timing, in its own process (see bench_reference)
    print(json.dumps(_reference_in_process(Path(sys.argv[1]), tuple(json.loads(sys.argv[2])), float(sys.argv[3]))))
