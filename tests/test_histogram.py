"""Batch-updated histograms export exactly what prometheus_client's Histogram does."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from edge_lstm.histogram import NUMPY_FROM, BatchHistogram, RollingMeanGauge

BUCKETS = (0.001, 0.0025, 0.01, 1.0, 2.5, 10.0, 1000.0)


def _samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in reg.collect()
        for s in fam.samples
        if not s.name.endswith("_created")
    }


values = st.lists(st.floats(min_value=0.0, max_value=5000.0, allow_nan=False), max_size=3 * NUMPY_FROM)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, max_size=4))
def test_same_buckets_count_and_sum_as_prometheus_client(batches: list[list[float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = BatchHistogram("lat", "doc", ["model"], namespace="x", buckets=BUCKETS, registry=ours)
    ref = Histogram("lat", "doc", ["model"], namespace="x", buckets=BUCKETS, registry=theirs)
    for batch in batches:  # small batches take the bisect path, long ones numpy
        h.labels("m").observe_many(batch)
        ref.labels("m")
        for v in batch:
            ref.labels("m").observe(v)
    assert _samples(ours) == _samples(theirs)  # sums too: added in the same order


def test_exposition_text_matches_prometheus_client_without_labels() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = BatchHistogram("batch_size", "Readings per step", namespace="e", buckets=(1.0, 2.0, 4.0), registry=ours)
    ref = Histogram("batch_size", "Readings per step", namespace="e", buckets=(1.0, 2.0, 4.0), registry=theirs)
    for v in (1.0, 2.0, 3.0, 9.0):
        h.observe(v)
        ref.observe(v)

    def text(reg: CollectorRegistry) -> list[str]:
        return [ln for ln in generate_latest(reg).decode().splitlines() if "_created" not in ln]

    assert text(ours) == text(theirs)
    created = [s for fam in ours.collect() for s in fam.samples if s.name.endswith("_created")]
    assert len(created) == 1 and created[0].value > 0


@pytest.mark.parametrize("size", [3, NUMPY_FROM + 1])
def test_nan_and_overflow_behave_as_in_prometheus_client(size: int) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = BatchHistogram("err", "doc", buckets=BUCKETS, registry=ours)
    ref = Histogram("err", "doc", buckets=BUCKETS, registry=theirs)
    values = [1e308, 1e308, float("nan")] + [0.5] * (size - 3)
    h.observe_many(values)  # must not raise: the worker records every batch
    for v in values:
        ref.observe(v)
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), key


def test_labels_are_checked_and_removable() -> None:
    reg = CollectorRegistry()
    h = BatchHistogram("err", "doc", ["model"], buckets=(1.0,), registry=reg)
    with pytest.raises(ValueError):
        h.labels()
    h.labels("a").observe(0.5)
    h.labels("b").observe(2.0)
    h.remove("a")
    assert reg.get_sample_value("err_count", {"model": "a"}) is None
    assert reg.get_sample_value("err_bucket", {"model": "b", "le": "+Inf"}) == 1.0
    with pytest.raises(ValueError):
        BatchHistogram("none", "doc", buckets=(float("inf"),), registry=None)


def test_rolling_mean_gauge_caps_series_and_rolls() -> None:
    reg = CollectorRegistry()
    g = RollingMeanGauge("abs_err", "doc", "stream", window=3, max_series=2, registry=reg)
    g.add([("a", 1.0), ("b", 4.0), ("c", 9.0), ("a", 2.0)])
    assert reg.get_sample_value("abs_err", {"stream": "a"}) == 1.5
    assert reg.get_sample_value("abs_err", {"stream": "c"}) is None
    g.add([("a", 3.0), ("a", 4.0)])
    assert reg.get_sample_value("abs_err", {"stream": "a"}) == 3.0  # mean of the last 3
