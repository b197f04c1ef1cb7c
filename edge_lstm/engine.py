"""One batch of readings in, forecasts and outcome counts out (pure, no I/O)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import numpy.typing as npt

from edge_lstm.outcomes import Outcome


@dataclasses.dataclass
class Forecast:
    """The K forecasts made after one reading of one stream."""

    stream: str
    ts: float  # epoch seconds of the reading the forecast follows
    values: npt.NDArray[np.float64]  # [K], target units; values[k-1] is for ts + k * cadence
    warming_up: bool
    received: float  # time.monotonic() when the reading arrived
    model_id: str


@dataclasses.dataclass
class BatchResult:
    """Everything one call of :meth:`Engine.process` produced."""

    forecasts: list[Forecast]
    outcomes: Counter[Outcome]  # one count per reading in the batch
    resets: Counter[str]  # state resets by reason ("gap", "model_change", ...)
    abs_errors: list[tuple[str, float]]  # (stream, |1-step forecast - actual|) in target units
    evictions: int
    inference_seconds: float
    batch_size: int
