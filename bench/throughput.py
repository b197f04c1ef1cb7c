"""Throughput: the highest rate sustained with no drops, for the ceiling and for the daemon.

For each stream count S the rate rises geometrically from a start rate until a step fails, then
the interval between the last passing and the first failing rate is bisected.  A step offers
``rate × duration`` readings, paced by the generator, and passes when every output message
arrived, the system under test reports no drop, the last output came at most
``max(0.25 s, 5 % of the step)`` after the last reading (no backlog building up), and the
generator really sent at the offered rate.  Before the ramp every stream gets a few readings,
so the daemon's state table is warm.

On a shared machine one search moves by tens of percent from run to run, so a search can be
repeated (``--repeat N``): for each stream count the systems' searches alternate (ceiling,
daemon, ceiling, daemon, ...), so that a drift in machine load touches both alike, and the
result is the median sustained rate with the min and max of the repeats.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bench.mqttload import Load, StepResult

_LOG = logging.getLogger(__name__)

STREAMS = (1, 100, 10_000)
QUICK_STREAMS = (100,)


class System(Protocol):
    """A system under test: the ceiling republisher or the daemon."""

    name: str
    out_filter: str
    in_root: str  # first level of the topics its readings are published to

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


StartRate = Callable[[int, int, dict[str, list[float | None]]], float | None]
"""``(streams, repeat, sustained so far by system name) -> start rate`` (None: the default)."""


@dataclasses.dataclass
class Contender:
    """A system under test with the load (generator and receiver processes) that drives it."""

    sut: System
    load: Load
    start_rate: StartRate | None = None


def _search_settings(quick: bool) -> dict[str, Any]:
    return {
        "factor": 2.0 if quick else 1.4,
        "duration": 1.0 if quick else 3.0,
        "max_steps": 2 if quick else 12,
        "bisect": 0 if quick else 2,
    }


def measure(
    contenders: Sequence[Contender], streams_list: tuple[int, ...], *, quick: bool, repeat: int = 1
) -> dict[str, dict[str, Any]]:
    """Warm up and search every stream count ``repeat`` times, alternating the contenders.

    Returns ``{system name: {str(streams): result}}``; see :func:`combine` for a result's keys.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    out: dict[str, dict[str, Any]] = {c.sut.name: {} for c in contenders}
    for s in streams_list:
        warm = {c.sut.name: warm_up(c.load, c.sut, s, quick=quick) for c in contenders}
        runs: dict[str, list[dict[str, Any]]] = {c.sut.name: [] for c in contenders}
        for r in range(repeat):
            for c in contenders:
                so_far = {k: [v["sustained_rate"] for v in runs_] for k, runs_ in runs.items()}
                start = c.start_rate(s, r, so_far) if c.start_rate else None
                if start is None:
                    start = 500.0 if quick else 1000.0
                if repeat > 1:
                    _LOG.info("%s S=%d: search %d of %d from %.0f/s", c.sut.name, s, r + 1, repeat, start)
                runs[c.sut.name].append(search(c.load, c.sut, s, start=start, **_search_settings(quick)))
        for c in contenders:
            res = combine(runs[c.sut.name])
            res["warm_up"] = warm[c.sut.name].to_dict()
            out[c.sut.name][str(s)] = res
    return out


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the repeated searches of one stream count.

    ``sustained_rate`` and ``first_failing_rate`` are the medians over the repeats (a search that
    sustained no rate counts as 0), ``sustained_min``/``sustained_max`` their range and
    ``sustained_rates`` each repeat's; ``peak_delivered_rate`` is the highest of all steps,
    ``generator_limited`` whether any step was; ``steps`` holds every step, each with the number
    of its ``repeat`` (from 0).
    """
    rates = [float(r["sustained_rate"] or 0.0) for r in runs]
    failing = [float(r["first_failing_rate"]) for r in runs if r["first_failing_rate"] is not None]
    steps = [{**st, "repeat": i} for i, r in enumerate(runs) for st in r["steps"]]
    median = statistics.median(rates)
    return {
        "streams": runs[0]["streams"],
        "repeats": len(runs),
        "sustained_rate": median or None,
        "sustained_min": min(rates) or None,
        "sustained_max": max(rates) or None,
        "sustained_rates": [r["sustained_rate"] for r in runs],
        "first_failing_rate": statistics.median(failing) if failing else None,
        "peak_delivered_rate": max(float(r["peak_delivered_rate"]) for r in runs),
        "generator_limited": any(r["generator_limited"] for r in runs),
        "steps": steps,
    }
