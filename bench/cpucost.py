"""CPU per reading at a fixed rate: the daemon against the ceiling, the same work for both.

Sustained-rate searches on a shared 2-core machine move by tens of percent from run to run.
The CPU time a process spends per reading at a rate both systems keep up with is far steadier,
and it is what decides the maximum once the cores are the limit.  For each stream count a
paced step at ``RATE`` readings/s (after a warm-up step, so the daemon's state rows exist);
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

RATE = 1000.0  # readings/s: well below both maxima at every stream count
STREAMS = (1, 100, 10_000)
QUICK_STREAMS = (100,)


def measure(load: Load, sut: System, streams: int, *, quick: bool, repeats: int) -> dict[str, Any]:
    """Median CPU seconds per 1000 readings of ``sut`` over ``repeats`` paced steps."""
    warm_up(load, sut, streams, quick=quick)
    duration = 1.0 if quick else 5.0
    count = max(streams, int(RATE * duration))
    per_1k: list[float] = []
    p99: list[float] = []
    for _ in range(repeats):
        r = load.step(prefix_for(sut.name, streams), streams, RATE, count, {sut.name: sut.pid}, sut.drops)
        cpu = r.cpu_s.get(sut.name)
        if cpu is not None and r.received == count:
            per_1k.append(cpu / (count / 1000.0))
            p99.append(r.latency_ms.get("p99", float("nan")))
    if not per_1k:
        return {"rate": RATE, "count": count, "cpu_s_per_1k": None, "why": "no complete step"}
    return {
        "rate": RATE,
        "count": count,
        "steps": len(per_1k),
        "cpu_s_per_1k": statistics.median(per_1k),
        "cpu_s_per_1k_all": per_1k,
        "p99_ms": statistics.median(p99),
    }


def run(daemon: tuple[Load, System], ceiling: tuple[Load, System], *, quick: bool) -> dict[str, Any]:
    """Both systems at every stream count; ``daemon``/``ceiling`` are (load, system) pairs."""
    repeats = 1 if quick else 3
    out: dict[str, Any] = {"rate": RATE, "streams": {}}
    for streams in QUICK_STREAMS if quick else STREAMS:
        d = measure(*daemon, streams, quick=quick, repeats=repeats)
        c = measure(*ceiling, streams, quick=quick, repeats=repeats)
        ratio = d["cpu_s_per_1k"] / c["cpu_s_per_1k"] if d["cpu_s_per_1k"] and c["cpu_s_per_1k"] else None
        out["streams"][str(streams)] = {"daemon": d, "ceiling": c, "daemon_over_ceiling": ratio}
        _LOG.info(
            "cpu S=%d at %.0f/s: daemon %s s, ceiling %s s per 1000 readings",
            streams,
            RATE,
            f"{d['cpu_s_per_1k']:.3f}" if d["cpu_s_per_1k"] else "-",
            f"{c['cpu_s_per_1k']:.3f}" if c["cpu_s_per_1k"] else "-",
        )
    return out
