"""``python -m bench.idlecost``: what a reading costs when it comes after the process was idle.

At low rates the daemon spends several times more CPU per reading than under load
(``python -m bench cpu``: 1,000 against 3,000 readings/s), although it does the same work per
reading and no more wake-ups.  This separates the two causes in one process, without MQTT
or threads: the daemon's real pipeline end to end (``bench.pipeline.Whole``: accept, model
step, encode, PUBACK, journal write without sync, acknowledgement) takes one reading at a
time, back to back or with the thread asleep between readings, and the CPU time of each
(``time.thread_time``) is recorded.  With a sleep between readings nothing else differs, so
the difference is what running on caches other processes (or the idle CPU) evicted costs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bench.pipeline import Whole

GAPS_MS = (0.0, 1.0, 5.0, 20.0, 0.0)  # the last repeats the first: the machine did not drift


def measure(whole: Whole, gap_s: float, readings: int) -> list[float]:
    """CPU seconds of each of ``readings`` single-reading rounds, ``gap_s`` asleep between them."""
    times = []
    for _ in range(readings):
        t0 = time.thread_time()
        whole.round(1)
        times.append(time.thread_time() - t0)
        if gap_s:
            time.sleep(gap_s)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idlecost", description=__doc__.splitlines()[0])
    p.add_argument("--readings", type=int, default=200, help="readings per gap (default 200)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edge-lstm-idlecost-") as tmp:
        whole = Whole(1, Path(tmp))
        whole.round(300)  # warm: state row, caches, the journal file
        print("gap between readings    CPU per reading (median, mean)")
        for gap_ms in GAPS_MS:
            t = measure(whole, gap_ms / 1000.0, args.readings)
            median, mean = statistics.median(t) * 1e6, statistics.mean(t) * 1e6
            print(f"{gap_ms:6.0f} ms              {median:7.0f} us, {mean:7.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
