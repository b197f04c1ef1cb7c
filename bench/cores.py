"""Where the processes of a run execute: the system under test on a core of its own, the rest beside it.

On a machine of two cores the system under test, the broker, the load generator and the receiver
are four busy processes; left to the scheduler they preempt one another on both cores, and the
latency tail then measures that (p99 9-146 ms over 8-s steps at one stream and 5,000 readings/s,
2.7-3.8 ms in the same runs with the daemon alone on one core).  On a device the daemon shares its
cores with the broker at most, and systemd can give it one of its own (``CPUAffinity=``).  So by
default the system under test (the daemon, the ceiling, the naive script: the same for each) runs
on the last core this process may use, and this process, the broker, the generator and the
receiver on the others.  ``--no-pin`` leaves them all to the scheduler.
"""

from __future__ import annotations

import contextlib
import os


def split() -> tuple[frozenset[int], frozenset[int]] | None:
    """(the core of the system under test, the cores of the rest); None with fewer than two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return frozenset(cores[-1:]), frozenset(cores[:-1])


def pin(pid: int, cores: frozenset[int]) -> None:
    """Every thread of ``pid`` to ``cores`` (threads it starts later inherit their creator's)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cores)


def describe(plan: tuple[frozenset[int], frozenset[int]] | None) -> dict[str, list[int]] | None:
    """The plan as a results file records it."""
    if plan is None:
        return None
    return {"system_under_test": sorted(plan[0]), "others": sorted(plan[1])}
