"""Latency: reading published -> forecast received, at fractions of the sustained maximum.

For each stream count, a paced step at 10 %, 50 % and 90 % of the daemon's sustained maximum;
each message is matched to its reading by stream and timestamp, and its latency is the
receiver's arrival time minus the generator's send time (one clock: CLOCK_MONOTONIC).  The
daemon's CPU time over the step gives its CPU cost per 1000 readings.  Each stream count starts
with the throughput searches' warm-up step, which also waits out any backlog of the benchmark run
before.

A 4-s step holds ~30,000 readings, so its p99 is set by its worst 300: one pause of the machine
of some tens of milliseconds (another process on the core, the host of a virtual machine) moves
it by several milliseconds.  The level the target is set at (half the sustained maximum) is
therefore stepped ``HALF_REPEATS`` times in a row; the level reports the step with the median
p99, and ``p99_steps`` lists every step's p99 (the report shows their range).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from bench.mqttload import Load
from bench.throughput import System, prefix_for, warm_up

_LOG = logging.getLogger(__name__)

LEVELS = (0.1, 0.5, 0.9)
QUICK_LEVELS = (0.5,)
TARGET_LEVEL = 0.5
HALF_REPEATS = 3  # steps at TARGET_LEVEL (the full run; --quick steps once)


def run(
    load: Load,
    sut: System,
    sustained: dict[int, float],
    *,
    quick: bool,
    levels: tuple[float, ...] | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """One step per stream count and level (``repeats`` at the target level, default ``HALF_REPEATS``,
    1 with ``quick``); ``sustained`` maps stream count -> sustained max."""
    levels = levels or (QUICK_LEVELS if quick else LEVELS)
    duration = 1.0 if quick else 4.0
    half_repeats = repeats or (1 if quick else HALF_REPEATS)
    out: dict[str, Any] = {}
    for streams, best in sustained.items():
        # Drains what an earlier benchmark left queued (a failed step's backlog would be measured
        # as latency) and warms every stream's state, as the throughput searches do.
        warm_up(load, sut, streams, quick=quick)
        per: dict[str, Any] = {}
        for level in levels:
            rate = max(10.0, level * best)
            count = max(200, int(rate * duration))
            steps = [
                load.step(prefix_for(sut.name, streams), streams, rate, count, {sut.name: sut.pid}, sut.drops)
                for _ in range(half_repeats if level == TARGET_LEVEL else 1)
            ]
            p99s = [x.latency_ms.get("p99", math.nan) for x in steps]
            r = steps[sorted(range(len(steps)), key=lambda i: (math.isnan(p99s[i]), p99s[i]))[len(steps) // 2]]
            cpu = r.cpu_s.get(sut.name)
            per[f"{round(level * 100)}%"] = {
                "rate": rate,
                "count": count,
                "received": r.received,
                "latency_ms": r.latency_ms,
                "cpu_s_per_1k": (cpu / (count / 1000)) if cpu is not None else None,
                "cpu_s": r.cpu_s,
                "passed": all(x.passed for x in steps),
                "why": "; ".join(x.why for x in steps if x.why),
                "p99_steps": p99s,
            }
            _LOG.info(
                "%s latency S=%d at %.0f/s: p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms%s",
                sut.name,
                streams,
                rate,
                r.latency_ms.get("p50", float("nan")),
                r.latency_ms.get("p99", float("nan")),
                r.latency_ms.get("p99.9", float("nan")),
                f" (median of {len(steps)} steps; p99 " + " / ".join(f"{x:.2f}" for x in p99s) + ")"
                if len(steps) > 1
                else "",
            )
        out[str(streams)] = {"sustained_rate": best, "levels": per}
    return out
