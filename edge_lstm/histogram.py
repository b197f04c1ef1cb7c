"""Prometheus histograms and rolling-mean gauges updated a batch at a time.

``prometheus_client.Histogram.observe`` takes a lock and walks the buckets for
every value: ~1.5 µs, several times per reading on the worker's hot path.
:class:`BatchHistogram` keeps plain counts per bucket, takes its lock once per
batch (:meth:`HistogramChild.observe_many`) and finds buckets by bisection, or
with numpy for large batches.  It exposes exactly what ``Histogram`` does:
``_bucket`` (cumulative, ``le`` labels formatted the same way), ``_count``,
``_sum`` and ``_created``.

:class:`RollingMeanGauge` keeps, for a capped set of label values, the last N
observations and exports their mean: appending is all the hot path does, the
mean is taken when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

NUMPY_FROM = 64  # batches at least this long are bucketed with numpy


def _add_in_turn(total: float, values: Iterable[float]) -> float:
    for v in values:
        total += v
    return total


def _created_series() -> bool:
    """Whether prometheus_client exports ``_created`` series (PROMETHEUS_DISABLE_CREATED_SERIES)."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class HistogramChild:
    """The buckets of one label set."""

    def __init__(self, bounds: Sequence[float], lock: threading.Lock) -> None:
        self._bounds = list(bounds)  # upper bounds without +Inf
        self._bounds_array = np.asarray(self._bounds, dtype=np.float64)
        self._counts = [0] * (len(self._bounds) + 1)  # last: above every bound (+Inf only)
        self._sum = 0.0
        self._lock = lock
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float]) -> None:
        """Observe every value (one lock for all of them).

        As ``prometheus_client``: the sum adds the values one after the other
        (never raises, NaN and infinities included) and a NaN falls in no bucket.
        """
        n = len(values)
        if n == 0:
            return
        if n >= NUMPY_FROM:
            a = np.asarray(values, dtype=np.float64)
            a = a[~np.isnan(a)]
            found = np.bincount(np.searchsorted(self._bounds_array, a, side="left"), minlength=len(self._counts))
            with self._lock:
                self._counts = [c + int(k) for c, k in zip(self._counts, found.tolist(), strict=True)]
                self._sum = _add_in_turn(self._sum, values)
            return
        where = bisect.bisect_left
        bounds = self._bounds
        with self._lock:
            counts = self._counts
            for v in values:
                if v == v:  # not NaN
                    counts[where(bounds, v)] += 1
            self._sum = _add_in_turn(self._sum, values)

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative counts per bucket (last is +Inf, the total count) and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = []
        running = 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total


class BatchHistogram(Collector):
    """A histogram metric (optionally labelled) with batch updates; registered on ``registry``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        namespace: str = "",
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket bound")
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = HistogramChild(self.bounds, self._lock)
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, HistogramChild(self.bounds, self._lock))
        return child

    def remove(self, *values: str) -> None:
        with self._lock:
            self._children.pop(tuple(str(v) for v in values), None)

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def observe_many(self, values: Sequence[float]) -> None:
        self._children[()].observe_many(values)

    def describe(self) -> Iterable[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> Iterable[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        with self._lock:
            children = list(self._children.items())
        created = _created_series()
        for key, child in children:
            labels = dict(zip(self.labelnames, key, strict=True))
            cumulative, total = child.snapshot()
            for le, count in zip(les, cumulative, strict=True):
                family.add_sample(f"{self.name}_bucket", {**labels, "le": le}, float(count))
            family.add_sample(f"{self.name}_count", labels, float(cumulative[-1]))
            family.add_sample(f"{self.name}_sum", labels, total)
            if created:
                family.add_sample(f"{self.name}_created", labels, child.created)
        return [family]


class RollingMeanGauge(Collector):
    """``name{label="..."}``: the mean of the last ``window`` values, for the first ``max_series`` label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelname: str,
        *,
        namespace: str = "",
        window: int,
        max_series: int,
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelname = labelname
        self.window = int(window)
        self.max_series = int(max_series)
        self._series: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def add(self, pairs: Iterable[tuple[str, float]]) -> None:
        """Append ``(label value, observation)`` pairs; new label values beyond the cap are ignored."""
        series = self._series
        with self._lock:
            for key, value in pairs:
                window = series.get(key)
                if window is None:
                    if len(series) >= self.max_series:
                        continue
                    window = series[key] = deque(maxlen=self.window)
                window.append(value)

    def means(self) -> Iterator[tuple[str, float]]:
        with self._lock:
            items = [(k, list(w)) for k, w in self._series.items()]
        for key, values in items:
            yield key, sum(values) / len(values)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=[self.labelname])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.labelname])
        for key, mean in self.means():
            family.add_metric([key], mean)
        return [family]
