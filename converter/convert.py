"""The converter's two jobs as library calls: ``train`` (CSV -> model directory) and ``verify``.

``train`` writes everything into a temporary directory next to ``out`` and
renames it into place at the end, so an error or an interrupt never leaves a
half-written model directory behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converter import calibrate as calibrate_mod
from converter import data as data_mod
from converter import report as report_mod
from converter.errors import ConvertError
from converter.prepare import (
    MIN_SEASON_HISTORY_SHARE,
    CalendarMode,
    EncodedSegment,
    EvalRun,
    LevelMode,
    Part,
    SeasonalInputMode,
    Split,
    assign_parts,
    build_pipeline,
    encode,
    eval_runs,
    gap_ticks,
    season_history_share,
    season_ticks,
    seasonal_inputs_fit,
    training_windows,
)
from converter.validation import (
    Blend,
    OutOfSample,
    blend_cost,
    fit_blend,
    naive_costs,
    out_of_sample,
    rolling_folds,
)
from edge_lstm.features import (
    MAX_HISTORY_TICKS,
    MAX_SEASON_TICKS,
    FeaturePipeline,
    blend_history_ticks,
    seasonal_series,
)
from edge_lstm.intervals import DEFAULT_LEVELS, Intervals
from edge_lstm.modelspec import MODEL_NAME, Manifest, ModelError, Quantization, load_manifest
from edge_lstm.reference import WEIGHTS_NAME, ReferenceWeights
from edge_lstm.ticks import Aggregate, Align

_LOG = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

ALL_MODES: tuple[Quantization, ...] = tuple(Quantization)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs; the CLI fills it from flags."""

    data: Path
    out: Path
    time_col: str
    target: str
    features: tuple[str, ...] = ()
    horizon: int = 16
    units: int = 64
    layers: int = 1
    epochs: int = 100
    seed: int = 0
    quantize: Quantization = Quantization.DYNAMIC
    cadence_s: float | None = None
    units_label: str = ""
    name: str | None = None
    max_gap_ticks: int = 4
    level: LevelMode = LevelMode.AUTO
    calendar: CalendarMode = CalendarMode.AUTO
    seasonal_inputs: SeasonalInputMode = SeasonalInputMode.AUTO
    utc_offset_s: float = 0.0
    timezone: str | None = None  # IANA zone of the calendar inputs (instead of utc_offset_s)
    aggregate: Aggregate | None = None  # None: chosen from the data (see converter.data.choose_policy)
    align: Align | None = None
    tick_origin_s: float | None = None
    lateness_s: float = 0.0
    warmup_ticks: int | None = None
    season: int | None = None
    window: int | None = None
    batch_size: int = 16
    learning_rate: float = 3e-3
    patience: int = 12
    split: Split = dataclasses.field(default_factory=Split)
    modes: tuple[Quantization, ...] = ALL_MODES
    levels: tuple[float, ...] = DEFAULT_LEVELS  # prediction interval levels; () for none
    plot: bool = True
    folds: int = 3  # rolling-origin folds (converter.validation)
    candidates: int = 2  # seeds seed, seed + 1, ... compete on the last fold's validation; the best ships
    seasonal_blend: bool = True  # let horizons lean on seasonal naive
    baselines: bool = True  # SARIMA and ETS in the report (needs statsmodels)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any]
    table: str
    validation: OutOfSample  # pooled out-of-sample validation forecasts of the shipped candidate
    blend: Blend  # its per-horizon gains and seasonal weights (validation.residuals(blend): residuals)


@dataclasses.dataclass(frozen=True)
class _FoldData:
    split: Split
    encoded: list[EncodedSegment]
    train: tuple[F32, F32]
    val: tuple[F32, F32]
    runs: list[EvalRun]
    pairs: report_mod.Pairs


@dataclasses.dataclass(frozen=True)
class _Candidate:
    seed: int
    fit: Any  # FitResult on the last fold
    oos: OutOfSample  # its validation forecasts
    score: float  # validation MAE / persistence MAE, mean over horizons, after its own blend


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("edge-lstm", "tensorflow", "tensorflow-cpu", "keras", "numpy", "ai-edge-litert", "statsmodels"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class _StagingDir:
    """A temporary directory next to ``out``, renamed onto ``out`` by :meth:`commit`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConvertError(f"--out {self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / "manifest.json").exists():
            raise ConvertError(f"--out {self.out} is a non-empty directory that holds no model: refusing to replace it")
        parent = self.out.parent
        if not parent.is_dir():
            raise ConvertError(f"--out {self.out}: parent directory {parent} does not exist")
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=parent))
        except OSError as e:
            raise ConvertError(f"--out {self.out} is not writable: {e.strerror or e}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; a model directory is not

    def commit(self) -> None:
        old: Path | None = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:
                os.replace(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# Scored (origin, horizon) pairs the validation and hold-out parts need at the last horizon.
MIN_PAIRS_LAST_HORIZON = 2


def _check_length(encoded: Sequence[EncodedSegment], cfg_horizon: int, warmup: int, season: int) -> None:
    need = {Part.TRAIN: 2 * (warmup + cfg_horizon), Part.VAL: cfg_horizon + 2, Part.HOLDOUT: cfg_horizon + 2}
    for part, n_min in need.items():
        n = sum(int(np.isfinite(e.y[e.part == part, 0]).sum()) for e in encoded)
        if n < n_min:
            total = sum(len(e) for e in encoded)
            raise ConvertError(
                f"series too short: {total} ticks give {n} usable {part.name.lower()} targets, need at least "
                f"{n_min} (use a longer series, a smaller --horizon or a smaller warm-up)"
            )
        if part is Part.TRAIN:
            continue
        n = _scored_targets(encoded, part, 1, warmup, season)
        if n < n_min:
            raise ConvertError(
                f"{n} {part.name.lower()} targets lie past the warm-up ({warmup} ticks) and a season ({season} "
                f"ticks) into their segment, need at least {n_min}: train with a shorter --season or --warmup, "
                "or bridge the gaps between segments with a larger --max-gap-ticks"
            )
        # Every horizon must be scored: the last needs its target inside the same segment too.
        k = cfg_horizon
        n = _scored_targets(encoded, part, k, warmup, season)
        if n < MIN_PAIRS_LAST_HORIZON:
            longest = max(len(e) for e in encoded)
            raise ConvertError(
                f"{n} {part.name.lower()} targets {k} ticks ahead lie past the warm-up ({warmup} ticks) and with "
                f"a season ({season} ticks) of history in their segment (the longest has {longest} ticks), need at "
                f"least {MIN_PAIRS_LAST_HORIZON}: train with a smaller --horizon, --warmup or --season, or bridge "
                "the gaps between segments with a larger --max-gap-ticks"
            )


def _scored_targets(encoded: Sequence[EncodedSegment], part: Part, k: int, warmup: int, season: int) -> int:
    """Targets ``k`` ticks ahead in ``part`` that scoring counts (as :func:`report.scored_pairs` asks): the
    origin past its segment's warm-up, the target and its seasonal naive inside the segment."""
    first = max(warmup, season * math.ceil(k / season) - k)
    return sum(int((np.isfinite(e.y[first:, k - 1]) & (e.part[first:] == part)).sum()) for e in encoded)


def _run_keras(model: Any, encoded: Sequence[EncodedSegment], runs: Sequence[EvalRun]) -> list[F32]:
    from converter.train import predict_sequence

    return [predict_sequence(model, encoded[r.seg_index].x[r.start : r.stop]) for r in runs]


def _evaluate_modes(
    weights: ReferenceWeights,
    modes: Sequence[Quantization],
    representative: list[dict[str, F32]],
    encoded: Sequence[EncodedSegment],
    runs: Sequence[EvalRun],
    keras_preds: Sequence[F32],
    pairs: report_mod.Pairs,
    pipeline: FeaturePipeline,
) -> tuple[dict[str, dict[str, Any]], dict[Quantization, bytes]]:
    from converter.export import export_tflite
    from converter.verify import TFLiteStepper, check_batch_resize, max_abs_deviation

    results: dict[str, dict[str, Any]] = {}
    contents: dict[Quantization, bytes] = {}
    for mode in modes:
        t0 = time.monotonic()
        content = export_tflite(weights, mode, representative)
        convert_s = time.monotonic() - t0
        check_batch_resize(content, weights.layers)
        stepper = TFLiteStepper(content, weights.layers)
        preds = [stepper.run(encoded[r.seg_index].x[r.start : r.stop]) for r in runs]
        if not all(np.all(np.isfinite(p)) for p in preds):
            raise ConvertError(f"the {mode.value} model produced non-finite outputs")
        parity = max_abs_deviation(preds, keras_preds)
        fc = report_mod.model_forecasts(pairs, preds, pipeline)
        m = report_mod.mae(fc, pairs.actual)
        results[mode.value] = {
            "size_bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "parity": parity,
            "mae": m,
            "mae_mean": float(np.nanmean(m)),
            "rmse": report_mod.rmse(fc, pairs.actual),
            "convert_seconds": convert_s,
        }
        contents[mode] = content
        _LOG.info("%s: %d bytes, parity %.2e, hold-out MAE h=1 %.4g", mode.value, len(content), parity, m[0])
    return results, contents


def train(cfg: TrainConfig) -> TrainResult:
    """CSV -> trained, exported, verified model directory at ``cfg.out``."""
    if min(cfg.horizon, cfg.units, cfg.layers, cfg.epochs, cfg.folds, cfg.candidates) < 1:
        raise ConvertError("--horizon, --units, --layers, --epochs, --folds and --candidates must be positive")
    columns = tuple(dict.fromkeys((cfg.target, *cfg.features)))
    if cfg.time_col in columns:
        raise ConvertError(f"the time column {cfg.time_col!r} cannot also be a value column")
    staging = _StagingDir(cfg.out)  # fail on an unwritable --out before training
    try:
        result = _train_into(cfg, columns, staging.path)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return dataclasses.replace(result, out=cfg.out)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    grid: data_mod.GridSeries
    season: int
    warmup: int
    pipeline: FeaturePipeline
    encoded: list[EncodedSegment]


def _prepare(cfg: TrainConfig, columns: tuple[str, ...]) -> _Prepared:
    """The series on its tick grid, its split and network inputs, as ``train`` sees them."""
    grid = data_mod.load(
        cfg.data, cfg.time_col, columns, cfg.cadence_s, cfg.max_gap_ticks,
        aggregate=cfg.aggregate, align=cfg.align, origin_s=cfg.tick_origin_s, lateness_s=cfg.lateness_s,
    )  # fmt: skip
    parts = assign_parts(grid, cfg.split)
    target = np.concatenate([seg.values[:, grid.columns.index(cfg.target)] for seg in grid.segments]) if (
        grid.segments) else np.zeros(0)  # fmt: skip
    if target.size and float(np.ptp(target)) == 0.0:
        _LOG.warning("the target %r is constant (%g) in every tick: persistence is exact and there is nothing "
                     "for a model to learn", cfg.target, float(target[0]))  # fmt: skip
    season = cfg.season or _default_season(grid, parts)
    if not 1 <= season <= MAX_SEASON_TICKS:
        what = "--season" if cfg.season else f"the default season (a day or a week of {grid.cadence_s:g}-s ticks)"
        raise ConvertError(f"{what} is {season} ticks; it must be 1..{MAX_SEASON_TICKS} (the daemon keeps up to a "
                           "season of targets per stream); give a shorter --season")  # fmt: skip
    ring = blend_history_ticks(season, cfg.horizon, differenced=True)  # the most a blend may keep
    if ring > MAX_HISTORY_TICKS:
        raise ConvertError(f"a season of {season} ticks and --horizon {cfg.horizon} would keep {ring} targets per "
                           f"stream, more than {MAX_HISTORY_TICKS}; give a shorter --season or --horizon")  # fmt: skip
    warmup = cfg.warmup_ticks if cfg.warmup_ticks is not None else int(min(96, max(16, season)))
    pipeline = build_pipeline(
        grid, parts, cfg.target, cfg.horizon, level=cfg.level, calendar=cfg.calendar, utc_offset_s=cfg.utc_offset_s,
        timezone=cfg.timezone, seasonal_inputs=_seasonal_inputs(cfg, grid.n_ticks, season),
    )  # fmt: skip
    encoded = encode(grid, pipeline, cfg.split)
    _check_length(encoded, cfg.horizon, warmup, season)
    return _Prepared(grid, season, warmup, pipeline, encoded)


def _default_season(grid: data_mod.GridSeries, parts: Sequence[npt.NDArray[np.int8]]) -> int:
    """:func:`season_ticks` of the cadence, or 1 (no season) when too few scored ticks have a season of history."""
    season = season_ticks(grid.cadence_s)
    share = season_history_share(parts, season)
    if season == 1 or not grid.segments or share >= MIN_SEASON_HISTORY_SHARE:
        return season
    gaps = gap_ticks(grid.segments, grid.cadence_s)
    if gaps:
        why = (f"{len(gaps)} gap(s) longer than --max-gap-ticks {grid.max_gap_ticks} (median {int(np.median(gaps))} "
               f"ticks) split the series into segments of at most {max(len(g) for g in grid.segments)} ticks, "
               "each starting its history anew")  # fmt: skip
        remedy = "bridge the gaps with a larger --max-gap-ticks, or give --season"
    else:
        why = f"the series holds {grid.n_ticks} ticks"
        remedy = "give a longer series, or --season"
    _LOG.warning(
        "no season: only %.0f %% of the validation and hold-out ticks lie a season (%d ticks of %g s) into their "
        "segment (%s), so seasonal naive, the seasonal blend and the seasonal inputs would have little to go on; "
        "training with --season 1. To use the season, %s",
        100 * share, season, grid.cadence_s, why, remedy,
    )  # fmt: skip
    return 1


def _seasonal_inputs(cfg: TrainConfig, n_ticks: int, season: int) -> int:
    """The season of the seasonal inputs, or 0 (``--seasonal-input``; auto: :func:`seasonal_inputs_fit`)."""
    if cfg.seasonal_inputs is SeasonalInputMode.NONE:
        return 0
    if season < 2:
        _LOG.info("seasonal inputs: none (no season)")
        return 0
    earliest = math.floor(n_ticks * rolling_folds(cfg.split, cfg.folds)[0].train_frac)
    if not seasonal_inputs_fit(season, earliest):
        _LOG.info("seasonal inputs: none (the earliest fold trains on %d ticks, %.1f seasons of %d)",
                  earliest, earliest / season, season)  # fmt: skip
        return 0
    _LOG.info("seasonal inputs: %d (season %d ticks)", min(cfg.horizon, season), season)
    return season


def holdout_baselines(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """SARIMA and ETS on the hold-out pairs ``train`` scores (MAE per horizon, spec), without any training."""
    from converter.classical import classical_forecasts

    p = _prepare(cfg, tuple(dict.fromkeys((cfg.target, *cfg.features))))
    runs = eval_runs(p.encoded, Part.HOLDOUT, p.warmup)
    pairs = report_mod.scored_pairs(p.encoded, runs, cfg.horizon, p.season)
    found = classical_forecasts(p.encoded, runs, pairs.run_index, pairs.offset, p.grid.cadence_s, p.season, cfg.horizon)
    return {
        n: {"mae": report_mod.mae(c["forecasts"], pairs.actual), **{k: v for k, v in c.items() if k != "forecasts"}}
        for n, c in found.items()
    }


def _train_into(cfg: TrainConfig, columns: tuple[str, ...], work: Path) -> TrainResult:
    t_start = time.monotonic()
    prep = _prepare(cfg, columns)
    grid, season, warmup, pipeline, encoded = prep.grid, prep.season, prep.warmup, prep.pipeline, prep.encoded
    n_train = sum(int((e.part == Part.TRAIN).sum()) for e in encoded)
    window = cfg.window or int(min(max(4 * warmup, 2 * cfg.horizon + warmup, 64), max(n_train, 8)))
    folds = _fold_data(grid, pipeline, cfg, encoded, window, warmup, season)
    _LOG.info(
        "features %s; windows of %d ticks; %d fold(s), training windows %s; warm-up %d, season %d",
        [f.name for f in pipeline.features], window, len(folds), [f.train[0].shape[0] for f in folds], warmup, season,
    )  # fmt: skip
    # TensorFlow loads only once the data has passed every check.
    from converter.export import representative_from_inputs
    from converter.train import FitConfig, apply_gains, extract_weights, model_from_weights

    fit_cfg = FitConfig(
        units=(cfg.units,) * cfg.layers,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        patience=cfg.patience,
        seed=cfg.seed,
    )
    # Seeds compete on the last fold (the split the shipped model trains on); the winner is then trained
    # on the earlier folds too, and the blend is fitted fold by fold on the out-of-sample forecasts of every fold.
    last = folds[-1]
    seeds = [cfg.seed + i for i in range(cfg.candidates)]
    runs_in_all = len(seeds) + len(folds) - 1
    cands = []
    for i, s in enumerate(seeds):
        _announce_run(i + 1, runs_in_all, s, last, len(folds), len(folds), t_start)
        cands.append(_candidate(last, pipeline, cfg, dataclasses.replace(fit_cfg, seed=s)))
    best = min(cands, key=lambda c: (c.score if math.isfinite(c.score) else math.inf, c.seed))
    fitted = best.fit
    earlier = []
    for i, f in enumerate(folds[:-1]):
        _announce_run(len(seeds) + i + 1, runs_in_all, best.seed, f, i + 1, len(folds), t_start)
        earlier.append(_fold_forecasts(f, pipeline, cfg, dataclasses.replace(fit_cfg, seed=best.seed)))
    per_fold = [*(o for o, _ in earlier), best.oos]
    oos = OutOfSample.concat(per_fold)
    blend = fit_blend(per_fold, seasonal=cfg.seasonal_blend)
    fold_epochs = [e for _, e in earlier] + [fitted.epochs_run]
    _LOG.info("candidates (seed: last-fold validation MAE / persistence) %s; seed %d ships",
              [(c.seed, round(c.score, 4)) for c in cands], best.seed)  # fmt: skip
    marked = [f"{w:.2f}{'d' if blend.is_differenced(k) else ''}" for k, w in enumerate(blend.weights.tolist())]
    _LOG.info("per-horizon gains %s, seasonal weights %s (d: seasonally differenced)",
              [f"{g:.2f}" for g in blend.gains.tolist()], marked)  # fmt: skip
    weights = apply_gains(extract_weights(fitted.model), blend.gains)
    if float(np.max(np.abs(blend.weights), initial=0.0)) > 0.0:
        output = dataclasses.replace(
            pipeline.output,
            season_ticks=season,
            seasonal_weights=tuple(float(w) for w in blend.weights),
            seasonal_differenced=() if blend.differenced is None else tuple(bool(d) for d in blend.differenced),
        )
        pipeline = dataclasses.replace(pipeline, output=output)
    model = model_from_weights(weights)
    x_tr = folds[-1].train[0]

    runs = eval_runs(encoded, Part.HOLDOUT, warmup)
    keras_preds = _run_keras(model, encoded, runs)
    pairs = report_mod.scored_pairs(encoded, runs, cfg.horizon, season)
    forecasts = report_mod.model_forecasts(pairs, keras_preds, pipeline)
    classical: dict[str, dict[str, Any]] = {}
    if cfg.baselines:
        from converter.classical import available, classical_forecasts

        if available():
            classical = classical_forecasts(
                encoded, runs, pairs.run_index, pairs.offset, grid.cadence_s, season, cfg.horizon
            )
        else:
            _LOG.info("statsmodels is not installed: no SARIMA/ETS baselines in the report")
    holdout = report_mod.holdout_metrics(pairs, forecasts, {n: c["forecasts"] for n, c in classical.items()})

    train_seqs = [e.x[e.part == Part.TRAIN] for e in encoded if (e.part == Part.TRAIN).any()]
    representative = representative_from_inputs(weights, train_seqs, seed=cfg.seed)
    modes = tuple(dict.fromkeys((Quantization.FLOAT32, *cfg.modes, cfg.quantize)))
    mode_results, contents = _evaluate_modes(
        weights, modes, representative, encoded, runs, keras_preds, pairs, pipeline
    )
    f32_parity = mode_results[Quantization.FLOAT32.value]["parity"]
    if f32_parity > 1e-4:
        raise ConvertError(f"float32 TFLite model deviates from Keras by {f32_parity:.2e} (limit 1e-4)")
    train_seconds = time.monotonic() - t_start

    content = contents[cfg.quantize]
    intervals: Intervals | None = None
    interval_report: dict[str, Any] | None = None
    if cfg.levels:
        # Calibrated on the model that ships, streamed as the daemon streams it.
        val = calibrate_mod.score_part(content, weights.layers, pipeline, encoded, Part.VAL, warmup, season)
        earlier_residuals = [f.residuals(blend) for f in per_fold[:-1]]
        intervals = calibrate_mod.fit_intervals(val, cfg.levels, earlier=earlier_residuals)
        hold = calibrate_mod.score_part(content, weights.layers, pipeline, encoded, Part.HOLDOUT, warmup, season)
        interval_report = calibrate_mod.interval_report(intervals, hold)
    (work / MODEL_NAME).write_bytes(content)
    weights.save(work / WEIGHTS_NAME)
    name = cfg.name or cfg.out.name
    chosen = mode_results[cfg.quantize.value]
    report: dict[str, Any] = {
        "name": name,
        "data": {
            "file": Path(cfg.data).name,
            "rows": grid.n_rows,
            "rows_missing": grid.n_missing,
            "ticks_filled": grid.n_filled,
            "rows_aggregated": grid.n_aggregated,
            "rows_late": grid.n_late,
            "rows_duplicate": grid.n_duplicate,
            "ticks_policy": grid.policy.to_dict(),
            "segments": len(grid.segments),
            "ticks": grid.n_ticks,
            "cadence_seconds": grid.cadence_s,
            "split": {p.name.lower(): sum(int((e.part == p).sum()) for e in encoded) for p in Part},
        },
        "holdout": {
            **holdout,
            "pairs": pairs.counts,
            "season_ticks": season,
            "ratio_best_naive": report_mod.best_naive_ratio(holdout),
            "baselines": {n: {"spec": c["spec"], "seconds": c["seconds"], "fit_ticks": c["fit_ticks"]}
                          for n, c in classical.items()},
        },
        "validation": {
            "folds": [{"train": f.split.train_frac, "val": f.split.val_frac} for f in folds],
            "pairs": oos.counts,
            "mae": {"model": oos.mae(blend), "model_unblended": oos.mae(), **oos.baseline_mae()},
            # What the blend was chosen on: median over folds of capped MAE / the fold's better naive.
            "blend_cost": {"model": blend_cost(per_fold, blend), **naive_costs(per_fold)},
            "candidates": [{"seed": c.seed, "score": c.score, "epochs": c.fit.epochs_run} for c in cands],
            "fold_epochs": fold_epochs,
            "seed": best.seed,
        },
        "parity": {m: r["parity"] for m, r in mode_results.items()},
        "modes": mode_results,
        "quantization": cfg.quantize.value,
        "model_size_bytes": len(content),
        "weights_size_bytes": (work / WEIGHTS_NAME).stat().st_size,
        "training": {
            "seconds": train_seconds,
            "fit_seconds": fitted.seconds,
            "epochs_run": fitted.epochs_run,
            "best_epoch": fitted.best_epoch,
            "best_val_loss": fitted.best_val_loss,
            "windows": int(x_tr.shape[0]),
            "window_ticks": window,
            "gains": blend.gains.tolist(),
            "seasonal_weights": blend.weights.tolist(),
            "seasonal_differenced": [blend.is_differenced(k) for k in range(cfg.horizon)],
            "seed": best.seed,
        },
        "versions": _versions(),
        "target_units": cfg.units_label,
    }
    if interval_report is not None:
        report["intervals"] = interval_report
    mae1 = holdout["mae"]["model"][0]
    manifest = Manifest(
        name=name,
        sha256=hashlib.sha256(content).hexdigest(),
        quantization=cfg.quantize,
        pipeline=pipeline,
        cadence_s=grid.cadence_s,
        layers=weights.layers,
        target_units=cfg.units_label,
        warmup_ticks=warmup,
        max_gap_ticks=grid.max_gap_ticks,
        tick_policy=grid.policy,
        intervals=intervals,
        extra={
            "time_column": cfg.time_col,
            "signature": "serving_default",
            "metrics": {
                "holdout_mae_1": chosen["mae"][0],
                "holdout_mae": chosen["mae"],
                "holdout_mae_1_float32": mae1,
                "holdout_mae_1_persistence": holdout["mae"]["persistence"][0],
                "holdout_mae_1_seasonal_naive": holdout["mae"]["seasonal_naive"][0],
                **{f"holdout_mae_1_{n}": holdout["mae"][n][0] for n in classical},
                "parity": chosen["parity"],
            },
            "training": {
                "split": {"train": cfg.split.train_frac, "val": cfg.split.val_frac},
                "season_ticks": season,
                "epochs_run": fitted.epochs_run,
                "seed": best.seed,
                "folds": len(folds),
                "candidates": cfg.candidates,
                "seconds": round(train_seconds, 1),
                "data_file": Path(cfg.data).name,
            },
            "versions": report["versions"],
        },
    )
    manifest.write(work)
    report_mod.write_report(work, report)
    if cfg.plot:
        _plot(
            work / report_mod.PLOT_NAME, encoded, runs, keras_preds, pipeline, holdout, name, cfg.units_label, season,
            intervals,
        )  # fmt: skip
    table = report_mod.summary_table(report, cfg.units_label)
    return TrainResult(
        out=cfg.out, manifest=manifest, report=report, table=table, validation=oos, blend=blend
    )


def _fold_data(
    grid: data_mod.GridSeries,
    pipeline: FeaturePipeline,
    cfg: TrainConfig,
    encoded: list[EncodedSegment],
    window: int,
    warmup: int,
    season: int,
) -> list[_FoldData]:
    """Windows and validation pairs of every rolling-origin fold; a fold too short to train is left out."""
    out: list[_FoldData] = []
    splits = rolling_folds(cfg.split, cfg.folds)
    for split in splits:
        last = split is splits[-1]
        enc = encoded if last else encode(grid, pipeline, split)
        if not last:
            try:
                _check_length(enc, cfg.horizon, warmup, season)
            except ConvertError:
                _LOG.info("fold training on %.0f %% of the series is too short: left out", 100 * split.train_frac)
                continue
        tr = training_windows(enc, Part.TRAIN, window, max(1, window // 8), warmup)
        va = training_windows(enc, Part.VAL, window, max(1, window - warmup), warmup)
        runs = eval_runs(enc, Part.VAL, warmup)
        pairs = report_mod.scored_pairs(enc, runs, cfg.horizon, season, Part.VAL)
        out.append(_FoldData(split, enc, tr, va, runs, pairs))
    return out


def _announce_run(n: int, runs: int, seed: int, fold: _FoldData, fold_n: int, folds: int, t_start: float) -> None:
    """The progress line before each network is trained (the epochs follow it)."""
    _LOG.info(
        "training %d of %d: seed %d on fold %d of %d (training part %.0f %% of the series, %d windows; %.0f s so far)",
        n, runs, seed, fold_n, folds, 100 * fold.split.train_frac, fold.train[0].shape[0], time.monotonic() - t_start,
    )  # fmt: skip


def _fold_forecasts(
    fold: _FoldData, pipeline: FeaturePipeline, cfg: TrainConfig, fit_cfg: Any
) -> tuple[OutOfSample, int]:
    """Train on one fold; its out-of-sample validation forecasts and the epochs run."""
    from converter.train import fit

    fitted = fit(fold.train, fold.val, pipeline.n_features, cfg.horizon, fit_cfg)
    preds = _run_keras(fitted.model, fold.encoded, fold.runs)
    return out_of_sample(fold.pairs, preds, pipeline), fitted.epochs_run


def _candidate(fold: _FoldData, pipeline: FeaturePipeline, cfg: TrainConfig, fit_cfg: Any) -> _Candidate:
    """One seed trained on the last fold, scored on its validation block."""
    from converter.train import fit

    fitted = fit(fold.train, fold.val, pipeline.n_features, cfg.horizon, fit_cfg)
    oos = out_of_sample(fold.pairs, _run_keras(fitted.model, fold.encoded, fold.runs), pipeline)
    # A ranking of the seeds on one fold, as before the one-fold check (which decides what ships).
    score = oos.score(fit_blend(oos, seasonal=cfg.seasonal_blend, check_one_fold=False))
    return _Candidate(seed=fit_cfg.seed, fit=fitted, oos=oos, score=score)


def _plot(
    path: Path,
    encoded: Sequence[EncodedSegment],
    runs: Sequence[EvalRun],
    preds: Sequence[F32],
    pipeline: FeaturePipeline,
    holdout: dict[str, dict[str, list[float]]],
    name: str,
    units: str,
    season: int,
    intervals: Intervals | None = None,
    max_ticks: int = 336,
) -> None:
    i = int(np.argmax([r.stop - r.score_from for r in runs]))
    run, pred = runs[i], preds[i]
    e = encoded[run.seg_index]
    k = pipeline.output.horizon
    lo = max(run.score_from + k, run.stop - max_ticks)
    j = np.arange(lo, run.stop)
    sea = seasonal_series(e.target, pipeline.output)
    fc = pipeline.decode(pred, e.target[run.start : run.stop], None if sea is None else sea[run.start : run.stop])
    f1 = fc[j - 1 - run.start, 0]
    fk = fc[j - k - run.start, k - 1]
    bands = None
    if intervals is not None:
        bands = [(lv, f1 + intervals.lower[i, 0], f1 + intervals.upper[i, 0]) for i, lv in enumerate(intervals.levels)]
    report_mod.plot(
        path, e.segment.timestamps[j], e.target[j], f1, fk, k, holdout, f"{name}: hold-out", units, bands=bands
    )


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    model_dir: Path
    data: Path
    time_col: str | None = None
    modes: tuple[Quantization, ...] = ()  # besides the directory's own model: re-export these from weights.npz


def verify(cfg: VerifyConfig) -> dict[str, Any]:
    """Stream the hold-out of ``cfg.data`` through ``DIR/model.tflite`` and compare with Keras."""
    from converter.export import representative_from_inputs
    from converter.train import model_from_weights
    from converter.verify import FLOAT32_PARITY_LIMIT, TFLiteStepper, check_batch_resize, max_abs_deviation
    from edge_lstm.modelspec import load_model

    try:
        bundle = load_model(cfg.model_dir)
        weights = ReferenceWeights.load(Path(cfg.model_dir) / WEIGHTS_NAME)
    except (ModelError, OSError, ValueError, KeyError) as e:
        raise ConvertError(f"cannot load model {cfg.model_dir}: {e}") from None
    man = bundle.manifest
    time_col = cfg.time_col or man.extra.get("time_column")
    if not time_col:
        raise ConvertError("the manifest names no time column: pass --time-col")
    split_d = man.extra.get("training", {}).get("split", {})
    split = Split(float(split_d.get("train", 0.7)), float(split_d.get("val", 0.15)))
    season = int(man.extra.get("training", {}).get("season_ticks", 0)) or season_ticks(man.cadence_s)
    pipeline = man.pipeline
    grid = data_mod.load(cfg.data, str(time_col), pipeline.columns, policy=man.ticks)
    encoded = encode(grid, pipeline, split)
    runs = eval_runs(encoded, Part.HOLDOUT, man.warmup_ticks)
    if not runs:
        raise ConvertError("the data has no hold-out part to verify on")
    keras_model = model_from_weights(weights)
    keras_preds = _run_keras(keras_model, encoded, runs)
    pairs = report_mod.scored_pairs(encoded, runs, man.horizon, season)
    holdout = report_mod.holdout_metrics(pairs, report_mod.model_forecasts(pairs, keras_preds, pipeline))
    check_batch_resize(bundle.content, man.layers)
    stepper = TFLiteStepper(bundle.content, man.layers)
    preds = [stepper.run(encoded[r.seg_index].x[r.start : r.stop]) for r in runs]
    parity = max_abs_deviation(preds, keras_preds)
    fc = report_mod.model_forecasts(pairs, preds, pipeline)
    out: dict[str, Any] = {
        "model": man.model_id,
        "quantization": man.quantization.value,
        "parity": {man.quantization.value: parity},
        "holdout": holdout,
        "modes": {
            man.quantization.value: {
                "size_bytes": len(bundle.content),
                "parity": parity,
                "mae": report_mod.mae(fc, pairs.actual),
                "mae_mean": float(np.nanmean(report_mod.mae(fc, pairs.actual))),
            }
        },
        "ok": True,
    }
    if man.intervals is not None:
        out["intervals"] = calibrate_mod.interval_report(man.intervals, calibrate_mod.Scored(pairs, fc))
    extra = [m for m in cfg.modes if m is not man.quantization]
    if extra:
        train_seqs = [e.x[e.part == Part.TRAIN] for e in encoded if (e.part == Part.TRAIN).any()]
        rep = representative_from_inputs(weights, train_seqs)
        res, _ = _evaluate_modes(weights, extra, rep, encoded, runs, keras_preds, pairs, pipeline)
        out["modes"].update(res)
        out["parity"].update({m: r["parity"] for m, r in res.items()})
    f32 = out["parity"].get(Quantization.FLOAT32.value)
    if f32 is not None and f32 > FLOAT32_PARITY_LIMIT:
        out["ok"] = False
    if not math.isfinite(parity):
        out["ok"] = False
    return out


def manifest_of(directory: Path) -> Manifest:
    try:
        return load_manifest(directory)
    except ModelError as e:
        raise ConvertError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    model_dir: Path
    data: Path
    time_col: str | None = None
    levels: tuple[float, ...] = DEFAULT_LEVELS


def calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """(Re)calibrate the prediction intervals of an existing model directory on the data it was trained on.

    The model file is untouched (same SHA-256, same forecasts): only the
    manifest's ``intervals`` and report.json's ``intervals`` are rewritten.
    """
    import json

    from edge_lstm.modelspec import MANIFEST_NAME, load_model

    if not cfg.levels:
        raise ConvertError("--levels: give at least one level")
    try:
        bundle = load_model(cfg.model_dir)
    except ModelError as e:
        raise ConvertError(f"cannot load model {cfg.model_dir}: {e}") from None
    man = bundle.manifest
    time_col = cfg.time_col or man.extra.get("time_column")
    if not time_col:
        raise ConvertError("the manifest names no time column: pass --time-col")
    training = man.extra.get("training", {})
    split = Split(float(training.get("split", {}).get("train", 0.7)), float(training.get("split", {}).get("val", 0.15)))
    season = int(training.get("season_ticks", 0)) or season_ticks(man.cadence_s)
    grid = data_mod.load(cfg.data, str(time_col), man.pipeline.columns, policy=man.ticks)
    encoded = encode(grid, man.pipeline, split)
    _check_length(encoded, man.horizon, man.warmup_ticks, season)
    args = (bundle.content, man.layers, man.pipeline, encoded)
    val = calibrate_mod.score_part(*args, Part.VAL, man.warmup_ticks, season)
    intervals = calibrate_mod.fit_intervals(val, cfg.levels)
    hold = calibrate_mod.score_part(*args, Part.HOLDOUT, man.warmup_ticks, season)
    rep = calibrate_mod.interval_report(intervals, hold)

    directory = Path(cfg.model_dir)
    staging = Path(tempfile.mkdtemp(prefix=".manifest.", dir=directory))
    try:
        dataclasses.replace(man, intervals=intervals).write(staging)
        os.replace(staging / MANIFEST_NAME, directory / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report_path = directory / report_mod.REPORT_NAME
    if report_path.exists():
        report = json.loads(report_path.read_text())
        report["intervals"] = rep
        report_mod.write_report(directory, report)
        if (directory / report_mod.PLOT_NAME).exists():
            _plot(directory / report_mod.PLOT_NAME, encoded, hold.runs, hold.preds, man.pipeline,
                  report["holdout"], man.name, man.target_units, season, intervals)  # fmt: skip
    return {"model": man.model_id, "intervals": rep}
