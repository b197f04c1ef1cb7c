"""Prediction intervals: conformal calibration, the anomaly score, the manifest field."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_lstm.intervals import (
    Intervals,
    anomaly_score,
    anomaly_scores,
    bound_keys,
    conformal_offsets,
    coverage,
    level_label,
)
from edge_lstm.modelspec import Manifest, ModelError, load_manifest

REPO = Path(__file__).resolve().parent.parent


def test_level_labels_and_bound_keys() -> None:
    assert level_label(0.95) == "95" and level_label(0.8) == "80" and level_label(0.995) == "99.5"
    assert bound_keys(0.95) == ("lo95", "hi95")


def test_conformal_offsets_take_the_corrected_order_statistics() -> None:
    r = np.arange(1.0, 20.0)  # 19 residuals 1..19
    lo, hi = conformal_offsets([r], [0.8, 0.9])
    # level 0.8: ranks floor(20 * 0.1) = 2 and ceil(20 * 0.9) = 18
    assert (lo[0, 0], hi[0, 0]) == (2.0, 18.0)
    # level 0.9: ranks floor(20 * 0.05) = 1 and ceil(20 * 0.95) = 19
    assert (lo[1, 0], hi[1, 0]) == (1.0, 19.0)
    # too few residuals for the level: the extremes
    lo, hi = conformal_offsets([np.array([-1.0, 3.0])], [0.95])
    assert (lo[0, 0], hi[0, 0]) == (-1.0, 3.0)
    with pytest.raises(ValueError, match="horizon 2"):
        conformal_offsets([r, np.array([np.nan])], [0.8])


def test_conformal_coverage_on_exchangeable_residuals_is_near_nominal() -> None:
    rng = np.random.default_rng(0)
    cal = [rng.standard_t(4, 2000) + 0.5 * k for k in range(3)]
    test = [rng.standard_t(4, 20000) + 0.5 * k for k in range(3)]
    lo, hi = conformal_offsets(cal, [0.8, 0.95])
    cov = coverage(test, Intervals((0.8, 0.95), lo, hi))
    for row, level in zip(cov, (0.8, 0.95), strict=True):
        assert all(abs(c - level) < 0.02 for c in row), row
    assert (hi[:, 2] > 0.5).all()  # a biased horizon shifts its interval


@given(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(1e-3, 1e6, allow_nan=False),
)
def test_anomaly_score_scalar_and_vector_agree(actual: float, lower: float, width: float) -> None:
    upper = lower + width
    s = anomaly_score(actual, lower, upper)
    v = anomaly_scores(np.array([actual]), np.array([lower]), np.array([upper]))[0]
    assert s == v
    assert (s > 0) == (actual > upper or actual < lower)
    if actual > upper:
        assert s == pytest.approx((actual - upper) / width)


def test_anomaly_score_in_widths() -> None:
    assert anomaly_score(5.0, 0.0, 2.0) == 1.5
    assert anomaly_score(-1.0, 0.0, 2.0) == 0.5
    assert anomaly_score(1.0, 0.0, 2.0) == 0.0
    assert anomaly_score(1.0, 0.0, 0.0) == math.inf


def _intervals(k: int) -> Intervals:
    return Intervals((0.8, 0.95), -np.ones((2, k)) * [[1.0], [2.0]], np.ones((2, k)) * [[1.5], [3.0]])


def test_manifest_round_trip_with_intervals_and_old_manifests_load_without(tmp_path: Path) -> None:
    old = load_manifest(REPO / "tests" / "data" / "tiny2x8")
    assert old.intervals is None and "intervals" not in old.to_dict()
    m = dataclasses.replace(old, intervals=_intervals(old.horizon))
    m.write(tmp_path)
    back = load_manifest(tmp_path)
    assert back == m and back.intervals is not None
    assert back.intervals.check_level == 0.95 and back.intervals.check_offsets == (-2.0, 3.0)
    lo, hi = back.intervals.bounds(np.array([10.0] * old.horizon))
    assert lo.shape == (2, old.horizon) and lo[1, 0] == 8.0 and hi[0, 0] == 11.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(levels=[0.95, 0.8]), "increasing"),
        (lambda d: d.update(levels=[0.8, 1.0]), "increasing"),
        (lambda d: d.update(lower=[[0.0] * 4, [0.0] * 4], upper=[[-1.0] * 4, [0.0] * 4]), "lower <= upper"),
        (lambda d: d.update(lower=[[0.0] * 3, [0.0] * 3], upper=[[0.0] * 3, [0.0] * 3]), "cover 3 horizons"),
        (lambda d: d.pop("upper"), "missing 'upper'"),
    ],
)
def test_bad_intervals_are_rejected_with_the_reason(tmp_path: Path, change: object, message: str) -> None:
    old = load_manifest(REPO / "tests" / "data" / "tiny2x8")
    d = dataclasses.replace(old, intervals=_intervals(old.horizon)).to_dict()
    change(d["intervals"])  # type: ignore[operator]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match=message):
        load_manifest(tmp_path)


def test_manifest_dataclass_default_has_no_intervals() -> None:
    assert {f.name: f.default for f in dataclasses.fields(Manifest)}["intervals"] is None
