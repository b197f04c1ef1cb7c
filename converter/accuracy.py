"""``python -m converter.accuracy``: train on every series of the accuracy set and write the comparison.

For each series in :data:`SERIES` (all in ``data/``, see ``data/README.md`` for
provenance and licences) the converter trains a model with the command shown,
and the hold-out MAE per horizon of the model, persistence, seasonal naive,
SARIMA and ETS goes into ``docs/accuracy.json`` (every horizon) and the table
of ``docs/accuracy.md`` (representative horizons).  Needs the ``convert`` extra
with statsmodels.  ``--only NAME,...`` retrains some series and keeps the
others' results from the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.cli import main as convert_main

_LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
ACCURACY_MD = REPO / "docs" / "accuracy.md"
ACCURACY_JSON = REPO / "docs" / "accuracy.json"
# Acceptance bar on model MAE / the better naive MAE, every horizon.
BAR = 1.02
# Acceptance of the prediction intervals: hold-out coverage within this many points of the nominal
# level at horizon 1 and at the last horizon.
COVERAGE_TOLERANCE = {"first": 4.0, "last": 6.0}
WHO = ("model", "persistence", "seasonal_naive", "sarima", "ets")


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    file: str
    time_col: str
    target: str
    horizon: int
    about: str  # what the series is and which properties it brings
    flags: tuple[str, ...] = ()

    def args(self, out: Path, data: Path = Path("data")) -> list[str]:
        return [
            "train", str(data / self.file), "--time-col", self.time_col, "--target", self.target,
            "--horizon", str(self.horizon), *self.flags, "--out", str(out),
        ]  # fmt: skip


SERIES: tuple[Series, ...] = (
    Series("taylor", "taylor.csv", "timestamp", "demand_mw", 16,
           "electricity demand, 30 min, 4032 ticks: daily and weekly seasons",
           ("--units", "64", "--epochs", "100", "--patience", "10", "--candidates", "1")),
    Series("msft", "msft.csv", "date", "close", 5,
           "stock price, daily, 1980 trading days: trend, weekend gaps", ("--units", "32")),
    Series("co2", "co2.csv", "date", "co2_ppm", 4,
           "Mauna Loa CO2, weekly, 2284 ticks: trend, yearly season, 59 holes", ("--units", "16")),
    Series("water_flow", "water_flow.csv", "timestamp", "flow_lps", 6,
           "pipeline flow sensor, hourly, 1268 readings: daily season, gaps up to 32 h",
           ("--units", "32")),
    Series("seattle_temps", "seattle_temps.csv", "timestamp", "temp_f", 6,
           "air temperature, hourly, 1464 ticks (Nov-Dec 2010): a daily shape that repeats almost exactly "
           "from day to day (seasonal naive misses by ~0.1 F), as smoothed normals do",
           ("--units", "32")),
    Series("occupancy", "occupancy.csv", "timestamp", "temperature_c", 4,
           "office temperature sensor, 16 min, 509 ticks: daily season, occupancy changes",
           ("--units", "16")),
    Series("airline", "airline.csv", "month", "passengers_k", 3,
           "airline passengers, monthly, 144 ticks: short, trend, yearly season", ("--units", "16")),
)


def train_one(series: Series, work: Path) -> dict[str, Any]:
    out = work / series.name
    args = ["-q", *series.args(out, REPO / "data"), "--modes", "none", "--quantize", "dynamic", "--no-plot", "--json"]
    t0 = time.monotonic()
    cpu0 = time.process_time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = convert_main(args)
    if code != 0:
        raise RuntimeError(f"{series.name}: training failed with exit status {code}")
    report = json.loads(buf.getvalue())
    h = report["holdout"]
    features = json.loads((out / "manifest.json").read_text())["features"]
    return {
        "about": series.about,
        "command": "edge-lstm-convert " + shlex.join(series.args(Path(f"models/{series.name}"))),
        "ticks": report["data"]["ticks"],
        "cadence_seconds": report["data"]["cadence_seconds"],
        "season_ticks": h["season_ticks"],
        "horizon": series.horizon,
        "pairs": h["pairs"],
        "mae": {w: h["mae"].get(w) for w in WHO},
        "ratio_best_naive": h["ratio_best_naive"],
        "baselines": h.get("baselines", {}),
        "seasonal_weights": report["training"]["seasonal_weights"],
        "seasonal_differenced": report["training"].get("seasonal_differenced", []),
        "gains": report["training"]["gains"],
        "seasonal_inputs": sum(f["kind"] == "seasonal" for f in features),
        "seed": report["training"]["seed"],
        "interval_coverage": report["intervals"]["holdout_coverage"] if report.get("intervals") else {},
        "quantization_vs_float32": report["modes"]["dynamic"]["mae_mean"] / report["modes"]["float32"]["mae_mean"]
        - 1.0,
        "seconds": time.monotonic() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }


def rescore_baselines(series: Series, result: dict[str, Any]) -> None:
    """Recompute SARIMA and ETS for a series (the network's numbers stay)."""
    from converter.cli import build_parser, train_config
    from converter.convert import holdout_baselines

    cfg = train_config(build_parser().parse_args(series.args(Path("unused"), REPO / "data")))
    found = holdout_baselines(cfg)
    for name, b in found.items():
        result["mae"][name] = b["mae"]
        result["baselines"][name] = {k: b[k] for k in ("spec", "seconds", "fit_ticks")}


def representative(horizon: int) -> list[int]:
    return sorted({1, min(3, horizon), max(1, horizon // 2), horizon} if horizon > 3 else set(range(1, horizon + 1)))


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.4g}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Accuracy: the model against naive and classical forecasts",
        "",
        "Generated by `python -m converter.accuracy` (do not edit by hand); every horizon is in",
        "[`accuracy.json`](accuracy.json). Hold-out MAE in the target's units, on the last 15 % of",
        "each series, all forecasts scored on the same (origin, horizon) pairs (see",
        "[converter.md](converter.md)). *ratio* is model MAE / the better naive forecast",
        f"(persistence or seasonal naive) at that horizon; the acceptance bar is <= {BAR:.2f}.",
        "SARIMA and ETS are fitted on the ticks before the hold-out and then filtered over it with",
        "fixed parameters. **Bold**: the best forecast of the row. The model's forecast is the",
        "network blended, per horizon, with persistence and with seasonal naive or the seasonally",
        "differenced forecast (last reading plus the change over the same stretch one season",
        "earlier), as chosen on the validation folds; the weights are in the last table. Where",
        "the earliest fold trains on three seasons, the network also sees last season's change",
        "over each coming horizon as inputs (`--seasonal-input`, see converter.md; the last",
        "table's *seasonal inputs*).",
        "",
        "| series | h | model | persistence | seasonal naive | SARIMA | ETS | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    above: list[str] = []
    over_bar: list[str] = []
    sarima_wins: list[str] = []
    not_sarima: list[str] = []
    beats_sarima = 0
    for name, r in results.items():
        m = r["mae"]
        for k in representative(r["horizon"]):
            row = [m[w][k - 1] if m.get(w) else None for w in WHO]
            finite = [v for v in row if v is not None and math.isfinite(v)]
            best = min(finite) if finite else None
            cells = [f"**{_fmt(v)}**" if v is not None and v == best else _fmt(v) for v in row]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {r['ratio_best_naive'][k - 1]:.3f} |")
        for k, q in enumerate(r["ratio_best_naive"], start=1):
            if q > 1.0:
                above.append(f"{name} h={k}: {q:.3f}")
            if q > BAR:
                over_bar.append(f"{name} h={k}: {q:.3f}")
        sar = m.get("sarima")
        pairs = enumerate(zip(m["model"], sar or [], strict=False), start=1)
        lost = [str(k) for k, (a, b) in pairs if b is not None and b < a]
        if lost:
            sarima_wins.append(f"{name} h={','.join(lost)}")
        if sar and sar[0] is not None and m["model"][0] < sar[0]:
            beats_sarima += 1
        elif sar:
            not_sarima.append(f"{name} ({_fmt(m['model'][0])} vs {_fmt(sar[0])})")
    worst = max(max(r["ratio_best_naive"]) for r in results.values())
    missing = [s.name for s in SERIES if s.name not in results]
    lines += [
        "",
        "## Summary",
        "",
        *([f"* **Not measured yet** (run `python -m converter.accuracy --only {','.join(missing)}`): "
           + ", ".join(missing) + "."] if missing else []),
        f"* Worst ratio to the better naive forecast over every series and horizon: **{worst:.3f}**.",
        "* Ratios above 1.00: " + (", ".join(above) if above else "none") + ".",
        f"* Ratios above the {BAR:.2f} bar: " + (", ".join(over_bar) if over_bar else "none") + ".",
        "* SARIMA is better than the model at: "
        + ("; ".join(sarima_wins) if sarima_wins else "no horizon of any series")
        + ".",
        f"* The model beats SARIMA one tick ahead on **{beats_sarima} of {len(results)}** series; "
        + ("not on: " + ", ".join(not_sarima) if not_sarima else "on all of them")
        + ".",
    ]
    lines += coverage_section(results)
    lines += [
        "",
        "## The series",
        "",
        "| series | what | ticks | season | seasonal inputs | seed | seasonal weights (h=1..K; d: differenced) | "
        "SARIMA / ETS spec | train s (cpu s; baselines s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        specs = " / ".join(b["spec"] for b in r["baselines"].values()) or "-"
        flags = r.get("seasonal_differenced") or [False] * len(r["seasonal_weights"])
        weights = ", ".join(f"{w:.2f}{'d' if d else ''}" for w, d in zip(r["seasonal_weights"], flags, strict=True))
        lines.append(
            f"| {name} | {r['about']} | {r['ticks']} | {r['season_ticks']} | {r.get('seasonal_inputs', 0)} | "
            f"{r['seed']} | {weights} | {specs} | "
            f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f}; {sum(b['seconds'] for b in r['baselines'].values()):.0f}) |"
        )
    lines += ["", "Commands (each with `--quantize dynamic`):", ""]
    lines += [f"* {name}: `{r['command']}`" for name, r in results.items()]
    lines += ["", "Provenance and licences of the data: [`data/README.md`](../data/README.md).", ""]
    return "\n".join(lines)


def coverage_misses(results: dict[str, Any]) -> list[str]:
    """Where hold-out coverage is further from the nominal level than :data:`COVERAGE_TOLERANCE` allows."""
    misses = []
    for name, r in results.items():
        for label, per_h in r.get("interval_coverage", {}).items():
            nominal = float(label.rstrip("%"))
            for where, k in (("first", 0), ("last", len(per_h) - 1)):
                got = per_h[k]
                if got is None or not math.isfinite(got):
                    continue
                off = 100.0 * got - nominal
                if abs(off) > COVERAGE_TOLERANCE[where]:
                    n = r["pairs"][k]
                    se = 100.0 * math.sqrt(nominal / 100.0 * (1.0 - nominal / 100.0) / n)
                    misses.append(
                        f"{name} {label} % h={k + 1}: {100.0 * got:.1f} % ({off:+.1f} points; "
                        f"{n} pairs, sampling s.e. {se:.1f})"
                    )
    return misses


def coverage_section(results: dict[str, Any]) -> list[str]:
    """The hold-out coverage of the prediction intervals at horizon 1 and at the last horizon."""
    have = {n: r for n, r in results.items() if r.get("interval_coverage")}
    if not have:
        return []
    labels = list(next(iter(have.values()))["interval_coverage"])
    first, last = COVERAGE_TOLERANCE["first"], COVERAGE_TOLERANCE["last"]
    lines = [
        "",
        "## Prediction intervals",
        "",
        "Hold-out coverage (%) of the split-conformal intervals, calibrated on the validation part pooled",
        "with the earlier folds' out-of-sample residuals, at horizon 1 and at the last horizon K; the bar",
        f"is the nominal level +/-{first:g} points at h=1 and +/-{last:g} at h=K. A miss lists the hold-out",
        "pairs it rests on and the standard error that sampling alone gives a coverage share at that",
        "level (sqrt(p (1 - p) / n)): a miss within about two of them says little either way.",
        "",
        "| series | K | " + " | ".join(f"{lab} % h=1 | {lab} % h=K" for lab in labels) + " |",
        "|---|---|" + "---|---|" * len(labels),
    ]
    for name, r in have.items():
        cov = r["interval_coverage"]
        cells = []
        for lab in labels:
            per_h = cov.get(lab) or [math.nan]
            cells += [_fmt_pct(per_h[0]), _fmt_pct(per_h[-1])]
        lines.append(f"| {name} | {r['horizon']} | " + " | ".join(cells) + " |")
    misses = coverage_misses(have)
    lines += ["", "* Outside the bar: " + ("; ".join(misses) if misses else "none") + "."]
    return lines


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100.0 * v:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converter.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated series names to retrain (default: all)")
    p.add_argument("--json", type=Path, default=ACCURACY_JSON)
    p.add_argument("--md", type=Path, default=ACCURACY_MD)
    p.add_argument("--rescore-baselines", action="store_true",
                   help="recompute only SARIMA and ETS of the series in the JSON file (no training)")  # fmt: skip
    p.add_argument("--add", type=Path, action="append", default=[],
                   help="merge the results in this JSON file (from another run) and rewrite the table")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    only = {s for s in args.only.split(",") if s}
    unknown = only - {s.name for s in SERIES}
    if unknown:
        p.error(f"unknown series: {sorted(unknown)}")
    keep = only or args.add or args.rescore_baselines
    results: dict[str, Any] = json.loads(args.json.read_text()) if keep and args.json.exists() else {}
    for extra in args.add:
        results.update(json.loads(extra.read_text()))
    if args.rescore_baselines:
        for s in SERIES:
            if s.name in results and (not only or s.name in only):
                _LOG.info("baselines of %s", s.name)
                rescore_baselines(s, results[s.name])
    train_some = not args.rescore_baselines and (bool(only) or not args.add)
    with tempfile.TemporaryDirectory() as tmp:
        for s in SERIES:
            if not train_some or (only and s.name not in only):
                continue
            _LOG.info("training %s", s.name)
            results[s.name] = train_one(s, Path(tmp))
            args.json.write_text(json.dumps(_ordered(results), indent=1) + "\n")
    results = _ordered(results)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.md.write_text(markdown(results))
    return 0


def _ordered(results: dict[str, Any]) -> dict[str, Any]:
    return {s.name: results[s.name] for s in SERIES if s.name in results}


if __name__ == "__main__":
    sys.exit(main())
