"""``edge-lstm-convert``: train and verify edge-lstm models from CSV files.

Only parses flags and prints; the work is in :mod:`converter.convert`.
TensorFlow is imported only once a command runs, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from converter.errors import ConvertError
from converter.prepare import CalendarMode, LevelMode, SeasonalInputMode, Split
from edge_lstm.features import time_zone
from edge_lstm.modelspec import Quantization

if TYPE_CHECKING:
    from converter.convert import TrainConfig
from edge_lstm.ticks import Aggregate, Align

_LOG = logging.getLogger(__name__)

PROG = "edge-lstm-convert"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_VERIFY_FAILED = 3


def _choices(modes: type[enum.Enum]) -> str:
    """How an enum's values read in --help: ``{a,b,c}``."""
    return "{" + ",".join(str(m.value) for m in modes) + "}"


_OFFSET = re.compile(r"(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?")


def _timezone(text: str) -> tuple[str | None, float]:
    """``--timezone``: an IANA zone name, or a fixed offset such as ``+02:00`` / ``UTC-5`` (zone None, seconds)."""
    t = text.strip()
    if t.upper() in ("UTC", "Z", "GMT"):
        return None, 0.0
    m = _OFFSET.fullmatch(t)
    if m:
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours > 14 or minutes >= 60:
            raise ConvertError(f"--timezone {text!r}: a UTC offset is at most ±14:00")
        return None, (1 if m.group(1) == "+" else -1) * (hours * 3600.0 + minutes * 60.0)
    try:
        time_zone(t)
    except ValueError as e:
        raise ConvertError(f"--timezone: {e}") from None
    return t, 0.0


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def _quantization(text: str) -> Quantization:
    try:
        return Quantization(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a mode (choose from {', '.join(q.value for q in Quantization)})"
        ) from None


def _levels(text: str) -> tuple[float, ...]:
    if text == "none":
        return ()
    try:
        levels = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'none' or levels such as 0.8,0.95") from None
    if not levels or any(not 0.0 < v < 1.0 for v in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: levels must lie strictly between 0 and 1, e.g. 0.8,0.95")
    return levels


def _modes(text: str) -> tuple[Quantization, ...]:
    if text == "all":
        return tuple(Quantization)
    if text == "none":
        return ()
    try:
        return tuple(Quantization(m.strip()) for m in text.split(",") if m.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give 'all', 'none' or a comma-separated list of {[q.value for q in Quantization]}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train, quantize and verify streaming LSTM forecasters.")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modes = ", ".join(q.value for q in Quantization)

    t = sub.add_parser(
        "train",
        help="train a model on a CSV file and write a model directory",
        description="Train on DATA (CSV with a header row), export a one-step TFLite model with explicit "
        "LSTM state, verify it and write model.tflite, manifest.json, weights.npz, report.json and "
        "forecast.png into --out.",
    )
    t.add_argument("data", type=Path, metavar="DATA.csv")
    t.add_argument("--out", required=True, type=Path, metavar="DIR", help="model directory to write")
    t.add_argument("--time-col", required=True,
                   help="timestamp column: ISO 8601, date, year-month, or epoch s/ms/us/ns (by magnitude)")
    t.add_argument("--target", required=True, help="column to forecast")
    t.add_argument("--features", default="", help="more value columns as inputs, comma-separated")
    t.add_argument("--horizon", type=int, default=16, help="forecast ticks ahead, K (default 16)")
    t.add_argument("--units", type=int, default=64, help="LSTM units per layer (default 64)")
    t.add_argument("--layers", type=int, default=1, help="stacked LSTM layers (default 1)")
    t.add_argument("--epochs", type=int, default=100, help="maximum epochs; early stopping ends sooner (default 100)")
    t.add_argument("--seed", type=int, default=0, help="random seed: same seed, same data, same model (default 0)")
    t.add_argument("--quantize", type=_quantization, default=Quantization.DYNAMIC, metavar="MODE",
                   help=f"quantization of the written model: {modes} (default dynamic)")  # fmt: skip
    t.add_argument("--cadence", type=_positive_float, default=None, metavar="SECONDS",
                   help="tick length; default: the period the timestamps show (docs/converter.md)")  # fmt: skip
    t.add_argument("--units-label", default="", metavar="LABEL", help="units of the target, e.g. MW")
    t.add_argument("--name", default=None, help="model name (default: the --out directory's name)")
    t.add_argument("--max-gap-ticks", type=int, default=4,
                   help="gaps up to this many ticks are interpolated, longer ones split the series "
                        "(default 4)")  # fmt: skip
    t.add_argument("--level", type=LevelMode, default=LevelMode.AUTO, choices=list(LevelMode),
                   metavar=_choices(LevelMode),
                   help="columns also fed as a clipped level; auto: the target unless the series trends")  # fmt: skip
    t.add_argument("--calendar", type=CalendarMode, default=CalendarMode.AUTO, choices=list(CalendarMode),
                   metavar=_choices(CalendarMode),
                   help="time-of-day/day-of-week inputs as the cadence allows (auto) or none")  # fmt: skip
    t.add_argument("--seasonal-input", type=SeasonalInputMode, default=SeasonalInputMode.AUTO,
                   choices=list(SeasonalInputMode), metavar=_choices(SeasonalInputMode),
                   help="feed the network last season's change over each coming horizon (auto: when the "
                        "earliest validation fold trains on three seasons; see --season) or none")  # fmt: skip
    t.add_argument("--utc-offset", type=float, default=None, metavar="HOURS",
                   help="fixed offset from UTC for the calendar inputs (default 0)")  # fmt: skip
    t.add_argument("--timezone", default=None, metavar="ZONE",
                   help="time zone of the calendar inputs: an IANA name with daylight saving time "
                        "(Europe/Berlin) or a fixed offset (+01:00); default UTC")  # fmt: skip
    t.add_argument("--aggregate", type=Aggregate, default=None, choices=list(Aggregate),
                   metavar=_choices(Aggregate),
                   help="value of a tick holding several readings: their mean, the last, or the first (which "
                        "closes the tick at once); default: mean when the data has several readings per tick, "
                        "else first")  # fmt: skip
    t.add_argument("--align", type=Align, default=None, choices=list(Align), metavar=_choices(Align),
                   help="a tick's bucket starts at its timestamp (start) or is centred on it (center); default: "
                        "start with several readings per tick, else center")  # fmt: skip
    t.add_argument("--tick-origin", type=float, default=None, metavar="SECONDS",
                   help="one tick's timestamp (epoch seconds; only its phase in the cadence matters); default: "
                        "0 with several readings per tick, else the readings' own grid")  # fmt: skip
    t.add_argument("--lateness", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="how long a tick stays open for readings that arrive late (below one cadence; "
                        "default 0)")  # fmt: skip
    t.add_argument("--warmup", type=int, default=None, metavar="TICKS",
                   help="ticks a stream needs before its forecasts count (default: one season, 16..96)")  # fmt: skip
    t.add_argument("--season", type=int, default=None, metavar="TICKS",
                   help="the season: of seasonal naive, the blend and the seasonal inputs (default: a day "
                        "below daily cadence, a week below weekly, else a year; 1 when gaps leave too few ticks "
                        "a season into their segment; at most 100000)")  # fmt: skip
    t.add_argument("--window", type=int, default=None, metavar="TICKS",
                   help="training window length (default: 4 warm-ups, at least 2 horizons + warm-up, 64)")  # fmt: skip
    t.add_argument("--batch-size", type=int, default=16, help="windows per training batch (default 16)")
    t.add_argument("--learning-rate", type=_positive_float, default=3e-3, help="Adam's learning rate (default 0.003)")
    t.add_argument("--patience", type=int, default=12, help="early-stopping patience in epochs (default 12)")
    t.add_argument("--split", default="0.7,0.15", metavar="TRAIN,VAL",
                   help="chronological fractions for training and validation; the rest is the hold-out "
                        "(default 0.7,0.15)")  # fmt: skip
    t.add_argument("--modes", type=_modes, default=tuple(Quantization), metavar="LIST",
                   help="modes to export and score in the report: all (default), none or a list")  # fmt: skip
    t.add_argument("--levels", type=_levels, default=(0.8, 0.95), metavar="LIST",
                   help="prediction interval levels, calibrated on the validation part (default 0.8,0.95; "
                   "none: no intervals)")  # fmt: skip
    t.add_argument("--folds", type=int, default=3,
                   help="rolling-origin validation folds before the hold-out (default 3)")  # fmt: skip
    t.add_argument("--candidates", type=int, default=2,
                   help="seeds trained on every fold; the best on validation ships (default 2)")  # fmt: skip
    t.add_argument("--no-seasonal-blend", action="store_true",
                   help="shrink towards persistence only, never towards seasonal naive or the seasonally "
                        "differenced forecast")  # fmt: skip
    t.add_argument("--no-baselines", action="store_true", help="skip the SARIMA and ETS baselines")
    t.add_argument("--no-plot", action="store_true", help="skip forecast.png")
    t.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")

    v = sub.add_parser(
        "verify",
        help="stream a CSV's hold-out through a model directory and compare with the float model",
        description="Stream the hold-out part of DATA through DIR/model.tflite tick by tick with the LiteRT "
        "interpreter and compare with the Keras model rebuilt from DIR/weights.npz. Exit status 3 "
        "when the float32 deviation exceeds 1e-4.",
    )
    v.add_argument("model_dir", type=Path, metavar="DIR")
    v.add_argument("data", type=Path, metavar="DATA.csv")
    v.add_argument("--time-col", default=None, help="timestamp column (default: the one the model was trained with)")
    v.add_argument("--modes", type=_modes, default=(), metavar="LIST",
                   help="also re-export and score these modes from weights.npz: all, or a list")  # fmt: skip
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    c = sub.add_parser(
        "calibrate",
        help="(re)calibrate a model directory's prediction intervals on its data",
        description="Stream the validation part of DATA through DIR/model.tflite, fit split-conformal "
        "prediction intervals on its residuals, write them into DIR/manifest.json (the model file is not "
        "changed) and print their coverage on the hold-out.",
    )
    c.add_argument("model_dir", type=Path, metavar="DIR")
    c.add_argument("data", type=Path, metavar="DATA.csv")
    c.add_argument("--time-col", default=None, help="timestamp column (default: the one the model was trained with)")
    c.add_argument("--levels", type=_levels, default=(0.8, 0.95), metavar="LIST",
                   help="interval levels (default 0.8,0.95)")  # fmt: skip
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _split(text: str) -> Split:
    try:
        a, b = (float(s) for s in text.split(","))
    except ValueError:
        raise ConvertError(f"--split {text!r}: expected TRAIN,VAL fractions such as 0.7,0.15") from None
    return Split(a, b)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``train`` flags."""
    from converter.convert import TrainConfig

    if args.timezone is not None and args.utc_offset is not None:
        raise ConvertError("give --timezone or --utc-offset, not both")
    zone, utc_offset_s = (
        _timezone(args.timezone) if args.timezone is not None else (None, (args.utc_offset or 0.0) * 3600.0)
    )
    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        time_col=args.time_col,
        target=args.target,
        features=tuple(c.strip() for c in args.features.split(",") if c.strip()),
        horizon=args.horizon,
        units=args.units,
        layers=args.layers,
        epochs=args.epochs,
        seed=args.seed,
        quantize=args.quantize,
        cadence_s=args.cadence,
        units_label=args.units_label,
        name=args.name,
        max_gap_ticks=args.max_gap_ticks,
        level=args.level,
        calendar=args.calendar,
        seasonal_inputs=args.seasonal_input,
        utc_offset_s=utc_offset_s,
        timezone=zone,
        aggregate=args.aggregate,
        align=args.align,
        tick_origin_s=args.tick_origin,
        lateness_s=args.lateness,
        warmup_ticks=args.warmup,
        season=args.season,
        window=args.window,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        split=_split(args.split),
        modes=args.modes,
        levels=args.levels,
        plot=not args.no_plot,
        folds=args.folds,
        candidates=args.candidates,
        seasonal_blend=not args.no_seasonal_blend,
        baselines=not args.no_baselines,
    )
    return cfg


def _train(args: argparse.Namespace) -> int:
    from converter.convert import train

    cfg = train_config(args)
    result = train(cfg)
    if args.json:
        print(json.dumps(result.report, indent=2, default=str))
    else:
        print(result.table)
        print(f"\nwrote {result.out} ({result.manifest.model_id}, {result.manifest.quantization.value})")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from converter.convert import VerifyConfig, verify
    from converter.report import summary_table

    res = verify(VerifyConfig(model_dir=args.model_dir, data=args.data, time_col=args.time_col, modes=args.modes))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(summary_table(res))
        print(f"\n{res['model']}: {'OK' if res['ok'] else 'FAILED'}")
    return EXIT_OK if res["ok"] else EXIT_VERIFY_FAILED


def _calibrate(args: argparse.Namespace) -> int:
    from converter.convert import CalibrateConfig, calibrate
    from converter.report import coverage_table

    res = calibrate(CalibrateConfig(model_dir=args.model_dir, data=args.data, time_col=args.time_col,
                                    levels=args.levels))  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print("\n".join(coverage_table(res["intervals"])))
        print(f"\nwrote the intervals into {args.model_dir} ({res['model']})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's own C++ info and warning lines (CPU features, SavedModel loading) would bury the
    # progress lines; its errors still show (but one known harmless line: converter.train).  Set
    # TF_CPP_MIN_LOG_LEVEL=0 to see them all.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # TensorFlow's Python logger: "Assets written to: <temporary dir>" at info, and a warning that
    # Keras' training function was traced again for each new network; errors still show.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "calibrate":
            return _calibrate(args)
        return _verify(args)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
