"""``python -m bench.seasonalcost``: what a seasonal input costs the engine per reading.

The bundled model's manifest is copied twice: as it is, and with its last input (the
day-of-week cosine) replaced by a seasonal input (last season's change over the next tick,
``FeatureKind.SEASONAL``, season ``--season``, 48 by default), so both drive the same network and differ only in
what the engine computes around it: the per-stream ring of targets and the input read from
it.  Each variant's :class:`edge_lstm.engine.Engine` steps the same readings, 1 stream (the
single-tick path) and 100 streams (one batch per tick), in alternating rounds; the median
microseconds per reading are printed.  No MQTT, no threads: the engine alone.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge_lstm.engine import Engine
from edge_lstm.modelspec import load_model
from edge_lstm.payload import Reading
from edge_lstm.runtime import StepModel, load_step_model
from edge_lstm.state import StateTable

MODEL = Path(__file__).resolve().parent.parent / "models" / "taylor"


def variant(work: Path, seasonal: bool, season: int = 48) -> StepModel:
    """The bundled model, or the bundled network fed a seasonal input in place of its last input."""
    d = work / ("seasonal" if seasonal else "plain")
    shutil.copytree(MODEL, d)
    raw = json.loads((d / "manifest.json").read_text())
    if seasonal:
        target = raw["output"]["target"]
        raw["features"][-1] = {"name": f"{target}_season_1", "kind": "seasonal", "column": target,
                               "scale": 900.0, "season": season, "lead": 1}  # fmt: skip
        raw["format_version"] = 2
    (d / "manifest.json").write_text(json.dumps(raw))
    return load_step_model(load_model(d))


def per_reading_us(model: StepModel, streams: int, ticks: int, warm_ticks: int) -> float:
    """Microseconds of ``Engine.process`` per reading, after ``warm_ticks`` (past a season: the ring is full)."""
    m = model.manifest
    engine = Engine(model, StateTable(m.layers, len(m.pipeline.columns), max(streams, 16)))
    t0 = 1_700_000_000.0 - 1_700_000_000.0 % m.cadence_s
    def reading(i: int, k: int) -> Reading:
        return Reading(f"s{i}", (30_000.0 + 1_000.0 * math.sin(k / 7 + i),), t0 + k * m.cadence_s, 0.0)

    batches = [[reading(i, k) for i in range(streams)] for k in range(warm_ticks + ticks)]
    for b in batches[:warm_ticks]:
        engine.process(b)
    start = time.perf_counter()
    for b in batches[warm_ticks:]:
        engine.process(b)
    return (time.perf_counter() - start) / (streams * ticks) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seasonalcost", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant (default 5)")
    p.add_argument("--ticks", type=int, default=3000, help="timed ticks at 1 stream (default 3000; 100 streams: /20)")
    p.add_argument("--season", type=int, default=48, help="the seasonal input's season in ticks (default 48)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.ticks < 20 or not 1 <= args.season <= 20_000:
        p.error("--rounds must be >= 1, --ticks >= 20 and --season 1..20000")
    warm = args.season + 12
    with tempfile.TemporaryDirectory() as tmp:
        models = {"plain": variant(Path(tmp), False), "seasonal input": variant(Path(tmp), True, args.season)}
        print("| streams | plain µs/reading | seasonal input µs/reading |")
        print("|---|---|---|")
        for streams, ticks in ((1, args.ticks), (100, max(1, args.ticks // 20))):
            got: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    got[name].append(per_reading_us(model, streams, ticks, warm))
            plain, seasonal = (statistics.median(got[k]) for k in models)
            print(f"| {streams} | {plain:.1f} | {seasonal:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
