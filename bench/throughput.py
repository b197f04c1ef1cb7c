"""Throughput: the highest rate sustained with no drops, for the ceiling and for the daemon.

For each stream count S the rate rises geometrically from a start rate until a step fails, then
the interval between the last passing and the first failing rate is bisected.  A step offers
``rate × duration`` readings, paced by the generator, and passes when every output message
arrived, the system under test reports no drop, the last output came at most
``max(0.25 s, 5 % of the step)`` after the last reading (no backlog building up), and the
generator really sent at the offered rate.  Before the ramp every stream gets a few readings,
so the daemon's state table is warm.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

from bench.mqttload import Load, StepResult

_LOG = logging.getLogger(__name__)

STREAMS = (1, 100, 10_000)
QUICK_STREAMS = (100,)


class System(Protocol):
    """A system under test: the ceiling republisher or the daemon."""

    name: str
    out_filter: str

    @property
    def pid(self) -> int: ...

    def drops(self) -> int: ...


def prefix_for(system: str, streams: int) -> str:
    return f"{system[0]}{streams}"


def warm_up(load: Load, sut: System, streams: int, *, quick: bool) -> StepResult:
    """A few readings for every stream at a gentle rate (state rows, caches, connections)."""
    n = max(streams * (1 if streams >= 1000 else 2), 50 if quick else 200)
    rate = min(2000.0, max(200.0, n / 2.0))
    return load.step(prefix_for(sut.name, streams), streams, rate, n, {sut.name: sut.pid}, sut.drops, cap_s=60)


def search(
    load: Load,
    sut: System,
    streams: int,
    *,
    start: float,
    factor: float,
    duration: float,
    max_steps: int,
    bisect: int,
    min_count: int = 200,
) -> dict[str, Any]:
    """Ramp the rate up to the first failure, then bisect; returns the steps and the sustained max."""
    prefix = prefix_for(sut.name, streams)
    steps: list[StepResult] = []
    best: float | None = None
    failed: float | None = None

    def run(rate: float) -> bool:
        count = max(min_count, int(rate * duration))
        r = load.step(prefix, streams, rate, count, {sut.name: sut.pid}, sut.drops)
        steps.append(r)
        _LOG.info(
            "%s S=%d %.0f/s: %s (delivered %.0f/s, p99 %.1f ms)",
            sut.name,
            streams,
            rate,
            "pass" if r.passed else "FAIL " + r.why,
            r.delivered_rate,
            r.latency_ms.get("p99", float("nan")),
        )
        return r.passed

    rate = start
    for _ in range(max_steps):
        if run(rate):
            best = rate
            if "generator-limited" in steps[-1].why:
                break
            rate *= factor
        else:
            failed = rate
            break
    if best is None and failed is not None:  # even the start rate failed: go down
        rate = failed
        for _ in range(3):
            rate /= 2
            if run(rate):
                best = rate
                break
            failed = rate
    if best is not None and failed is not None:
        lo, hi = best, failed
        for _ in range(bisect):
            mid = math.sqrt(lo * hi)
            if run(mid):
                lo = mid
            else:
                hi = mid
        best = lo
    generator_limited = any("generator-limited" in s.why for s in steps)
    peak = max((s.delivered_rate for s in steps), default=0.0)
    return {
        "streams": streams,
        "sustained_rate": best,
        "first_failing_rate": failed,
        "peak_delivered_rate": peak,
        "generator_limited": generator_limited,
        "steps": [s.to_dict() for s in steps],
    }


def measure(
    load: Load, sut: System, streams_list: tuple[int, ...], *, quick: bool, start_rates: dict[int, float] | None = None
) -> dict[str, Any]:
    """Warm up and search every stream count for one system under test."""
    out: dict[str, Any] = {}
    for s in streams_list:
        warm = warm_up(load, sut, s, quick=quick)
        start = (start_rates or {}).get(s, 500.0 if quick else 1000.0)
        res = search(
            load,
            sut,
            s,
            start=start,
            factor=2.0 if quick else 1.4,
            duration=1.0 if quick else 3.0,
            max_steps=2 if quick else 12,
            bisect=0 if quick else 2,
        )
        res["warm_up"] = warm.to_dict()
        out[str(s)] = res
    return out
