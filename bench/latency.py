"""Latency: reading published -> forecast received, at fractions of the sustained maximum.

For each stream count, a paced step at 10 %, 50 % and 90 % of the daemon's sustained maximum;
each message is matched to its reading by stream and timestamp, and its latency is the
receiver's arrival time minus the generator's send time (one clock: CLOCK_MONOTONIC).  The
daemon's CPU time over the step gives its CPU cost per 1000 readings.  Each stream count starts
with the throughput searches' warm-up step, which also waits out any backlog of the benchmark run
before.
"""

from __future__ import annotations

import logging
from typing import Any

from bench.mqttload import Load
from bench.throughput import System, prefix_for, warm_up

_LOG = logging.getLogger(__name__)

LEVELS = (0.1, 0.5, 0.9)
QUICK_LEVELS = (0.5,)


def run(
    load: Load, sut: System, sustained: dict[int, float], *, quick: bool, levels: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """One step per stream count and level; ``sustained`` maps stream count -> sustained max."""
    levels = levels or (QUICK_LEVELS if quick else LEVELS)
    duration = 1.0 if quick else 4.0
    out: dict[str, Any] = {}
    for streams, best in sustained.items():
        # Drains what an earlier benchmark left queued (a failed step's backlog would be measured
        # as latency) and warms every stream's state, as the throughput searches do.
        warm_up(load, sut, streams, quick=quick)
        per: dict[str, Any] = {}
        for level in levels:
            rate = max(10.0, level * best)
            count = max(200, int(rate * duration))
            r = load.step(prefix_for(sut.name, streams), streams, rate, count, {sut.name: sut.pid}, sut.drops)
            cpu = r.cpu_s.get(sut.name)
            per[f"{round(level * 100)}%"] = {
                "rate": rate,
                "count": count,
                "received": r.received,
                "latency_ms": r.latency_ms,
                "cpu_s_per_1k": (cpu / (count / 1000)) if cpu is not None else None,
                "cpu_s": r.cpu_s,
                "passed": r.passed,
                "why": r.why,
            }
            _LOG.info(
                "%s latency S=%d at %.0f/s: p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms",
                sut.name,
                streams,
                rate,
                r.latency_ms.get("p50", float("nan")),
                r.latency_ms.get("p99", float("nan")),
                r.latency_ms.get("p99.9", float("nan")),
            )
        out[str(streams)] = {"sustained_rate": best, "levels": per}
    return out
