"""CPU per reading at a fixed rate: the daemon against the ceiling, the same work for both.

Sustained-rate searches on a shared 2-core machine move by tens of percent from run to run.
The CPU time a process spends per reading at a rate both systems keep up with is far steadier,
and it is what decides the maximum once the cores are the limit.  For each stream count a
paced step at each of ``RATES`` readings/s (after a warm-up step, so the daemon's state rows exist);
the figure is the process's user + system CPU per 1000 readings (``/proc/PID/stat``), for the
daemon and for the ceiling republisher, and their ratio.  Steps are repeated and the median
kept.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from bench.mqttload import Load
from bench.throughput import System, prefix_for, warm_up

_LOG = logging.getLogger(__name__)

RATES = (1000.0, 3000.0)  # readings/s: below both maxima at every stream count (wake-ups per reading
# dominate the cost at the low rate; at the higher one the work per reading shows)
STREAMS = (1, 100, 10_000)
QUICK_STREAMS = (100,)


def measure(load: Load, sut: System, streams: int, rate: float, *, quick: bool, repeats: int) -> dict[str, Any]:
    """Median CPU seconds per 1000 readings of ``sut`` over ``repeats`` paced steps at ``rate``."""
    duration = 1.0 if quick else 4.0
    count = max(streams, int(rate * duration))
    per_1k: list[float] = []
    p99: list[float] = []
    for _ in range(repeats):
        r = load.step(prefix_for(sut.name, streams), streams, rate, count, {sut.name: sut.pid}, sut.drops)
        cpu = r.cpu_s.get(sut.name)
        if cpu is not None and r.received == count:
            per_1k.append(cpu / (count / 1000.0))
            p99.append(r.latency_ms.get("p99", float("nan")))
    if not per_1k:
        return {"rate": rate, "count": count, "cpu_s_per_1k": None, "why": "no complete step"}
    return {
        "rate": rate,
        "count": count,
        "steps": len(per_1k),
        "cpu_s_per_1k": statistics.median(per_1k),
        "cpu_s_per_1k_all": per_1k,
        "p99_ms": statistics.median(p99),
    }


def run(daemon: tuple[Load, System], ceiling: tuple[Load, System], *, quick: bool) -> dict[str, Any]:
    """Both systems at every stream count and rate; ``daemon``/``ceiling`` are (load, system) pairs."""
    repeats = 1 if quick else 3
    rates = RATES[:1] if quick else RATES
    out: dict[str, Any] = {"rates": list(rates), "streams": {}}
    for streams in QUICK_STREAMS if quick else STREAMS:
        for load, sut in (daemon, ceiling):
            warm_up(load, sut, streams, quick=quick)
        per_rate: dict[str, Any] = {}
        for rate in rates:
            d = measure(*daemon, streams, rate, quick=quick, repeats=repeats)
            c = measure(*ceiling, streams, rate, quick=quick, repeats=repeats)
            ratio = d["cpu_s_per_1k"] / c["cpu_s_per_1k"] if d["cpu_s_per_1k"] and c["cpu_s_per_1k"] else None
            per_rate[f"{rate:.0f}"] = {"daemon": d, "ceiling": c, "daemon_over_ceiling": ratio}
            _LOG.info(
                "cpu S=%d at %.0f/s: daemon %s s, ceiling %s s per 1000 readings",
                streams,
                rate,
                f"{d['cpu_s_per_1k']:.3f}" if d["cpu_s_per_1k"] else "-",
                f"{c['cpu_s_per_1k']:.3f}" if c["cpu_s_per_1k"] else "-",
            )
        out["streams"][str(streams)] = per_rate
    return out
