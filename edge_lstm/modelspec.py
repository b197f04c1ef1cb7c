"""The model artefact's contract: ``model.tflite`` plus ``manifest.json``.

The converter writes a model directory; the daemon reads it without
TensorFlow.  The manifest says everything needed to feed the one-step model and
read its answer: features and their scaling, cadence, horizon, layer sizes,
tensor names, quantization, and the SHA-256 of the ``.tflite`` file, which is
checked before the file is used.

The one-step model has inputs ``x`` ``[B, D]`` and ``h_l``, ``c_l`` ``[B, H_l]`` for
every layer ``l``, and outputs ``y`` ``[B, K]`` (network units, see
:mod:`edge_lstm.features`) and the new ``h_l``, ``c_l``.  All inputs and outputs
are float32 in every quantization mode.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from pathlib import Path
from typing import Any

from edge_lstm.features import FeaturePipeline
from edge_lstm.intervals import Intervals
from edge_lstm.ticks import MAX_CADENCE_S, MAX_GAP_TICKS, MIN_CADENCE_S, TickPolicy

FORMAT = "edge-lstm-model"
FORMAT_VERSION = 2
# Version 2 adds output.seasonal_differenced and the seasonal input kind; a manifest that uses neither is
# written as version 1, so builds that read only version 1 still load it, and refuse one whose forecasts
# they would get wrong.
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.tflite"


class Quantization(str, enum.Enum):
    """How the model's weights (and maybe activations) are stored."""

    FLOAT32 = "float32"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    INT8 = "int8"
    INT16X8 = "int16x8"


class ModelError(Exception):
    """A model directory or file that cannot be used; the message names the problem."""


def state_names(layers: tuple[int, ...]) -> list[str]:
    """Names of the state tensors, in order: ``h_0, c_0, h_1, c_1, ...``."""
    return [f"{kind}_{i}" for i in range(len(layers)) for kind in ("h", "c")]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything the daemon needs to know about a model, and its provenance."""

    name: str
    sha256: str
    quantization: Quantization
    pipeline: FeaturePipeline
    cadence_s: float
    layers: tuple[int, ...]
    target_units: str = ""
    model_file: str = MODEL_NAME
    warmup_ticks: int = 0  # ticks a stream needs before its forecasts are trusted
    max_gap_ticks: int = 4  # gaps up to this many ticks were interpolated in training
    intervals: Intervals | None = None  # calibrated prediction intervals; None in older manifests
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # metrics, versions, ...
    # How readings map onto ticks (manifest "ticks"); None: a manifest written before it existed,
    # read with TickPolicy.legacy (one reading per tick, as those models were trained).
    tick_policy: TickPolicy | None = None

    def __post_init__(self) -> None:
        p = self.tick_policy
        if p is not None and (p.cadence_s != self.cadence_s or p.max_gap_ticks != self.max_gap_ticks):
            raise ValueError("the tick policy's cadence and gap limit must be the manifest's")

    @property
    def ticks(self) -> TickPolicy:
        """The tick policy the model was trained with."""
        if self.tick_policy is not None:
            return self.tick_policy
        return TickPolicy.legacy(self.cadence_s, self.max_gap_ticks)

    @property
    def horizon(self) -> int:
        return self.pipeline.output.horizon

    @property
    def model_id(self) -> str:
        """Short identity used in forecasts and metrics: name plus hash prefix."""
        return f"{self.name}@{self.sha256[:12]}"

    @property
    def input_names(self) -> list[str]:
        return ["x", *state_names(self.layers)]

    @property
    def output_names(self) -> list[str]:
        return ["y", *state_names(self.layers)]

    @staticmethod
    def _needs_version_2(pipeline: FeaturePipeline) -> bool:
        return pipeline.output.differenced or bool(pipeline.seasonal_inputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if self._needs_version_2(self.pipeline) else 1,
            "name": self.name,
            "model_file": self.model_file,
            "sha256": self.sha256,
            "quantization": self.quantization.value,
            "cadence_seconds": self.cadence_s,
            "layers": list(self.layers),
            "target_units": self.target_units,
            "warmup_ticks": self.warmup_ticks,
            "max_gap_ticks": self.max_gap_ticks,
            **({"ticks": self.tick_policy.to_dict()} if self.tick_policy is not None else {}),
            "inputs": self.input_names,
            "outputs": self.output_names,
            **self.pipeline.to_dict(),
            **({"intervals": self.intervals.to_dict()} if self.intervals is not None else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise ModelError(f"not an edge-lstm manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            raise ModelError(
                f"manifest format_version {version!r} is not supported (this build reads "
                f"{', '.join(map(str, READ_VERSIONS))})"
            )
        known = {
            "format", "format_version", "name", "model_file", "sha256", "quantization", "cadence_seconds",
            "layers", "target_units", "warmup_ticks", "max_gap_ticks", "inputs", "outputs",
            "columns", "features", "output", "utc_offset_seconds", "timezone", "ticks", "intervals",
        }  # fmt: skip
        try:
            layers = tuple(int(n) for n in d["layers"])
            if not layers or min(layers) < 1:
                raise ValueError("'layers' must list at least one positive size")
            cadence = float(d["cadence_seconds"])
            if not MIN_CADENCE_S <= cadence <= MAX_CADENCE_S:  # NaN fails too
                raise ValueError(f"'cadence_seconds' must be {MIN_CADENCE_S:g}..{MAX_CADENCE_S:g}, got {cadence}")
            sha = str(d["sha256"])
            if len(sha) != 64:
                raise ValueError("'sha256' must be 64 hex digits")
            max_gap = int(d.get("max_gap_ticks", 4))
            if not 1 <= max_gap <= MAX_GAP_TICKS:
                raise ValueError(f"'max_gap_ticks' must be 1..{MAX_GAP_TICKS}, got {max_gap}")
            pipeline = FeaturePipeline.from_dict(d)
            if cls._needs_version_2(pipeline) and version < 2:
                what = "output.seasonal_differenced" if pipeline.output.differenced else "a seasonal input"
                raise ValueError(f"{what} needs format_version 2")
            intervals = Intervals.from_dict(d["intervals"], pipeline.output.horizon) if "intervals" in d else None
            return cls(
                name=str(d["name"]),
                sha256=sha.lower(),
                quantization=Quantization(d["quantization"]),
                pipeline=pipeline,
                cadence_s=cadence,
                layers=layers,
                target_units=str(d.get("target_units", "")),
                model_file=str(d.get("model_file", MODEL_NAME)),
                warmup_ticks=int(d.get("warmup_ticks", 0)),
                max_gap_ticks=max_gap,
                intervals=intervals,
                extra={k: v for k, v in d.items() if k not in known},
                tick_policy=None if d.get("ticks") is None else TickPolicy.from_manifest(d, cadence, max_gap),
            )
        except KeyError as e:
            raise ModelError(f"manifest is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelError(f"manifest is invalid: {e}") from None

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A verified model: its manifest and the bytes of its ``.tflite`` file."""

    manifest: Manifest
    model_path: Path
    content: bytes


def load_manifest(path: Path | str) -> Manifest:
    """Read ``manifest.json`` from a model directory (or the manifest file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelError(f"model manifest not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read model manifest {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model manifest {p} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"model manifest {p} must hold a JSON object")
    return Manifest.from_dict(raw)


def load_model(path: Path | str) -> ModelBundle:
    """Load and verify a model directory (or its ``manifest.json``): manifest valid, file present, SHA-256 equal.

    Errors name ``path`` as given: a path that does not exist is never taken for its parent.
    """
    p = Path(path)
    if p.is_dir():
        directory = p
    elif p.is_file() and p.name == MANIFEST_NAME:
        directory = p.parent
    elif p.exists():
        raise ModelError(f"{path} is not a model directory (expected a directory holding {MANIFEST_NAME})")
    else:
        raise ModelError(f"model directory not found: {path}")
    manifest = load_manifest(directory)
    model_path = directory / manifest.model_file
    try:
        content = model_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {model_path}") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {model_path}: {e}") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != manifest.sha256:
        raise ModelError(
            f"model file {model_path} does not match its manifest "
            f"(sha256 {digest[:12]}…, manifest says {manifest.sha256[:12]}…): refusing a modified or truncated file"
        )
    return ModelBundle(manifest=manifest, model_path=model_path, content=content)
