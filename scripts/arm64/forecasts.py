"""Forecasts of the bundled model over the whole bundled series, for comparing machines.

    python scripts/arm64/forecasts.py OUT.npy

Runs the model one tick at a time from a cold state (the offline reference the daemon is tested
against, ``tests/support/offline.py``) and saves the ``[N, K]`` forecasts in target units.
``make check-arm64`` runs it natively and in the emulated arm64 system and compares the two.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.offline import open_model, stream_forecasts  # noqa: E402


def main(out: str) -> None:
    with open(ROOT / "data" / "taylor.csv", newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("demand_mw")
    ts = np.array([dt.datetime.fromisoformat(r[0].replace("Z", "+00:00")).timestamp() for r in rows[1:]])
    values = np.array([float(r[col]) for r in rows[1:]])
    forecasts, _ = stream_forecasts(open_model(ROOT / "models" / "taylor"), ts, values)
    np.save(out, forecasts)
    print(f"{forecasts.shape[0]} ticks x {forecasts.shape[1]} steps -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
