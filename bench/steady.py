"""``python -m bench.steady``: the daemon's latency over long steps at one fixed rate.

The latency benchmark (``python -m bench latency``) paces each level for 4 s, too short to
meet a pause that comes every 15-20 s, such as a full collection of Python's cyclic garbage
collector; its p99 then depends on whether one happened to fall inside the step.  This runs
the daemon (the checkout's code, the benchmark's configuration and broker) for ``--seconds``
per step at ``--rate`` readings/s, ``--repeat`` times, and prints each step's latency
percentiles and maximum.  Compare two revisions by running it in each checkout, alternating.

``--windows S`` also prints the p99 of each S-second slice of a step (by send time): a tail
that comes in bursts (a pause of the machine, a stall upstream) shows as a few slices far above
the rest, one that is the daemon's steady state as all of them.  ``--dump DIR`` writes each
step's send and arrival times (``step-N.npz``, CLOCK_MONOTONIC seconds, NaN for no output).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from bench.cli import Session, parse_settings
from bench.throughput import prefix_for, warm_up


def window_p99(sends: np.ndarray, arrivals: np.ndarray, seconds: float, over_ms: float = 10.0) -> str:
    """The p99 latency (ms) of each ``seconds`` slice of a step by send time, and how many exceed ``over_ms``."""
    got = ~np.isnan(arrivals)
    lat_ms = (arrivals - sends) * 1e3
    slot = ((sends - sends[0]) // seconds).astype(int)
    slices = [(slot == k) & got for k in range(int(slot.max()) + 1)]
    p99 = [float(np.percentile(lat_ms[m], 99)) for m in slices if m.any()]
    over = sum(v > over_ms for v in p99)
    text = " ".join(f"{v:.0f}" for v in p99)
    return f"p99 per {seconds:g}-s slice: {text} ({over} of {len(p99)} over {over_ms:g} ms)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1000.0, help="readings per second (default 1000)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each step (default 30)")
    p.add_argument("--streams", type=int, default=1, help="streams, visited round robin (default 1)")
    p.add_argument("--repeat", type=int, default=2, help="steps, one after the other (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a configuration setting of the daemon, as for python -m bench")  # fmt: skip
    p.add_argument("--windows", type=float, default=0.0, metavar="S",
                   help="also print the p99 of each S-second slice of every step")  # fmt: skip
    p.add_argument("--dump", type=Path, metavar="DIR", help="write each step's send and arrival times to DIR")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="leave every process to the scheduler (as python -m bench --no-pin)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edge-lstm-steady-") as tmp:
        try:
            settings = parse_settings(args.set)
        except ValueError as e:
            p.error(str(e))
        s = Session(Path(tmp), 1, settings=settings, pin=args.pin)
        try:
            d = s.daemon()
            with s.load(d) as load:
                warm_up(load, d, args.streams, quick=False)
                print(f"{args.streams} stream(s) at {args.rate:g} readings/s, {args.seconds:g} s per step")
                watch = {d.name: d.pid}
                if s.broker.proc is not None:
                    watch["broker"] = s.broker.proc.pid
                for i in range(args.repeat):
                    count = int(args.rate * args.seconds)
                    r = load.step(prefix_for(d.name, args.streams), args.streams, args.rate, count,
                                  watch, d.drops)  # fmt: skip
                    lat = r.latency_ms
                    cols = ", ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p99", "p99.9", "max") if k in lat)
                    cpu = r.cpu_s.get(d.name)
                    per = f"; daemon CPU {cpu / count * 1e6:.0f} µs/reading" if cpu is not None else ""
                    span = count / args.rate
                    for k in ("generator", "receiver", "broker"):
                        per += f", {k} {r.cpu_s[k] / span:.2f} core" if k in r.cpu_s else ""
                    print(f"step {i + 1}: {r.received}/{count} received; latency ms: {cols}{per}", flush=True)
                    if load.last_stamps is not None:
                        sends, arrivals = load.last_stamps
                        if args.windows > 0:
                            print("  " + window_p99(sends, arrivals, args.windows), flush=True)
                        if args.dump is not None:
                            args.dump.mkdir(parents=True, exist_ok=True)
                            np.savez(args.dump / f"step-{i + 1}.npz", sends=sends, arrivals=arrivals)
        finally:
            s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
