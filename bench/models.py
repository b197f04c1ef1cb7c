"""Models for every quantization mode, built once with the converter into ``bench/.cache/models/``.

The benchmark needs one model per quantization mode with the bundled model's shape (1 layer of
64 units, horizon 16, 6 inputs).  They are trained on the bundled series with the converter's
own command (``edge-lstm-convert train ... --quantize MODE``), a few epochs and a fixed seed:
the weights only need the right shape and realistic ranges for the timing, and the same seed
gives every mode the same float weights.  Building needs the ``convert`` extra (TensorFlow) and
takes about 12 s per mode; it happens only when asked (``python -m bench model --build-models``)
and never in the tests.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

_LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "taylor"
DATA = REPO / "data" / "taylor.csv"
CACHE = Path(__file__).resolve().parent / ".cache" / "models"
MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
EPOCHS = 3
SEED = 0


def model_dir(mode: str, cache: Path = CACHE) -> Path:
    return cache / mode


def is_built(directory: Path) -> bool:
    try:
        json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (directory / "model.tflite").is_file()


def convert_command(mode: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "converter",
        "train",
        str(DATA),
        "--time-col",
        "timestamp",
        "--target",
        "demand_mw",
        "--units-label",
        "MW",
        "--horizon",
        "16",
        "--units",
        "64",
        "--layers",
        "1",
        "--epochs",
        str(EPOCHS),
        "--seed",
        str(SEED),
        "--quantize",
        mode,
        "--modes",
        "none",
        "--no-plot",
        "--name",
        f"taylor-{mode}",
        "--out",
        str(out),
    ]


def build(modes: tuple[str, ...] = MODES, cache: Path = CACHE, *, force: bool = False) -> dict[str, str]:
    """Build the missing models; returns ``{mode: "built" | "cached" | "failed: ..."}``."""
    status: dict[str, str] = {}
    for mode in modes:
        out = model_dir(mode, cache)
        if is_built(out) and not force:
            status[mode] = "cached"
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        _LOG.info("building the %s model with the converter (a few epochs) ...", mode)
        proc = subprocess.run(convert_command(mode, out), capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            status[mode] = f"failed: {last[0]}"
            _LOG.error("converter failed for %s: %s", mode, last[0])
        else:
            status[mode] = "built"
    return status


def available(cache: Path = CACHE) -> dict[str, Path]:
    """Model directories to time: the bundled model plus every built quantization mode."""
    found = {"bundled": BUNDLED}
    for mode in MODES:
        d = model_dir(mode, cache)
        if is_built(d):
            found[mode] = d
    return found
