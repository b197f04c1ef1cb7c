"""``python -m bench [NAME ...] [--quick]``: run benchmarks, write JSON results and the summary."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import enum
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import machine, report, results
from bench import sut as systems

_LOG = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
QUICK_RESULTS = BENCH_DIR / ".cache" / "quick"
DOC = REPO / "docs" / "performance.md"


class Bench(str, enum.Enum):
    """The benchmarks, in the order the full suite runs them."""

    MODEL = "model"
    CEILING = "ceiling"
    DAEMON = "daemon"
    LATENCY = "latency"
    PROFILE = "profile"
    FOOTPRINT = "footprint"
    REPORT = "report"  # only regenerate docs/performance.md from the result files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="benchmarks to run: " + ", ".join(b.value for b in Bench) + " (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (under a minute)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results, quick: bench/.cache/quick)")
    p.add_argument("--doc", type=Path, help="summary to write (default docs/performance.md; not written by --quick)")
    p.add_argument(
        "--qos",
        type=int,
        choices=(0, 1),
        default=1,
        help="QoS of readings, forecasts and the receiver's subscription (default 1)",
    )
    p.add_argument(
        "--tflite",
        action="store_true",
        help="also time tflite-runtime (creates bench/.venvs/tflite-runtime when missing)",
    )
    p.add_argument(
        "--build-models",
        action="store_true",
        help="build the missing quantization-mode models with the converter (needs TensorFlow)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name in args.names:
        if name not in {b.value for b in Bench}:
            p.error(f"unknown benchmark {name!r} (choose from {', '.join(b.value for b in Bench)})")
    return args


class Session:
    """One run: a broker shared by every MQTT benchmark, and the daemon kept up between them."""

    def __init__(self, workdir: Path, qos: int) -> None:
        self.workdir = workdir
        self.qos = qos
        self._broker: Any = None
        self._daemon: systems.Daemon | None = None
        self.series: dict[str, int] = {}  # message counters of every load series in this run

    @property
    def broker(self) -> Any:
        if self._broker is None:
            self._broker = systems.start_broker(self.workdir)
            _LOG.info("broker on %s:%d", self._broker.host, self._broker.port)
        return self._broker

    def daemon(self) -> systems.Daemon:
        if self._daemon is None:
            self._daemon = systems.Daemon(self.broker, self.workdir / "daemon", self.qos)
        return self._daemon

    def close(self) -> None:
        if self._daemon is not None:
            self._daemon.close()
        if self._broker is not None:
            self._broker.close()


@contextlib.contextmanager
def session(qos: int) -> Iterator[Session]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-lstm-bench-"))
    s = Session(workdir, qos)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _sustained(doc: dict[str, Any] | None) -> dict[int, float]:
    if not doc:
        return {}
    return {int(k): float(v["sustained_rate"]) for k, v in doc["results"]["streams"].items() if v["sustained_rate"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    names = [Bench(n) for n in args.names] or [b for b in Bench if b is not Bench.REPORT]
    if names == [Bench.REPORT]:
        report.write(args.out or RESULTS, args.doc or DOC)
        return 0
    out: Path = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    doc_path: Path | None = args.doc or (None if args.quick else DOC)
    from tests.support.broker import find_mosquitto

    run = {
        "run_id": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "quick": args.quick,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "qos": args.qos,
        "machine": machine.details(find_mosquitto()),
    }
    t_start = time.monotonic()
    from bench import footprint, modelcost, throughput

    streams = throughput.QUICK_STREAMS if args.quick else throughput.STREAMS
    with session(args.qos) as s:
        ceiling_doc: dict[str, Any] | None = None
        daemon_doc: dict[str, Any] | None = None
        if Bench.MODEL in names:
            res = modelcost.run(quick=args.quick, tflite=args.tflite, build_models=args.build_models)
            results.write(out, "model", run, res)
        if Bench.CEILING in names or Bench.DAEMON in names:
            ceiling_doc = {"results": _ceiling(s, streams, args.quick)}
            results.write(out, "ceiling", run, ceiling_doc["results"])
        if Bench.DAEMON in names:
            assert ceiling_doc is not None
            daemon_doc = {"results": _daemon(s, streams, args.quick, _sustained(ceiling_doc))}
            results.write(out, "daemon", run, daemon_doc["results"])
        if Bench.LATENCY in names or Bench.PROFILE in names or Bench.FOOTPRINT in names:
            daemon_doc = daemon_doc or results.read(out, "daemon")
        sustained = _sustained(daemon_doc)
        if Bench.LATENCY in names:
            if not sustained:
                _LOG.info("latency needs the sustained maximum: running the daemon search first")
                daemon_doc = {"results": _daemon(s, streams, args.quick, {})}
                sustained = _sustained(daemon_doc)
            res = _latency(s, {k: v for k, v in sustained.items() if k in streams}, args.quick)
            results.write(out, "latency", run, res)
        if Bench.PROFILE in names:
            if args.quick:
                results.write(out, "profile", run, {"skipped": "not run in quick mode"})
            else:
                profiles = {str(n): _profile(s, out, sustained.get(n, 1000.0), n) for n in (100, 1)}
                results.write(out, "profile", run, {"profiles": profiles})
        if Bench.FOOTPRINT in names:
            feed = 0.5 * sustained.get(10_000, 4000.0)  # new streams cost more than known ones
            res = footprint.run(s.broker, s.workdir / "footprint", qos=args.qos, quick=args.quick, feed_rate=feed)
            results.write(out, "footprint", run, res)
    _LOG.info("benchmarks done in %.0f s", time.monotonic() - t_start)
    if doc_path is not None:
        report.write(out, doc_path)
    return 0


def _ceiling(s: Session, streams: tuple[int, ...], quick: bool) -> dict[str, Any]:
    from bench import throughput
    from bench.mqttload import Load

    ceiling = systems.Ceiling(s.broker, s.qos)
    try:
        with Load(s.broker.host, s.broker.port, ceiling.out_filter, s.qos, s.series) as load:
            found = throughput.measure(
                load, ceiling, streams, quick=quick, start_rates={k: 2000.0 for k in streams} if not quick else None
            )
    finally:
        ceiling.close()
    return {"system": "minimal paho republisher (bench/ceiling.py)", "streams": found}


def _daemon(s: Session, streams: tuple[int, ...], quick: bool, ceiling: dict[int, float]) -> dict[str, Any]:
    from bench import throughput
    from bench.mqttload import Load

    d = s.daemon()
    starts = {k: max(200.0, round(v * 0.4, -1)) for k, v in ceiling.items()} if not quick else None
    with Load(s.broker.host, s.broker.port, d.out_filter, s.qos, s.series) as load:
        found = throughput.measure(load, d, streams, quick=quick, start_rates=starts)
    for k, v in found.items():
        c = ceiling.get(int(k))
        v["ceiling_sustained_rate"] = c
        v["ratio_to_ceiling"] = (v["sustained_rate"] / c) if c and v["sustained_rate"] else None
    return {
        "system": "edge-lstm run, bundled model (1x64, K=16, dynamic)",
        "config": d.process.config,
        "streams": found,
    }


def _latency(s: Session, sustained: dict[int, float], quick: bool) -> dict[str, Any]:
    from bench import latency
    from bench.mqttload import Load

    d = s.daemon()
    with Load(s.broker.host, s.broker.port, d.out_filter, s.qos, s.series) as load:
        daemon_res = latency.run(load, d, sustained, quick=quick)
    ceiling = systems.Ceiling(s.broker, s.qos)
    try:
        with Load(s.broker.host, s.broker.port, ceiling.out_filter, s.qos, s.series) as load:
            ceiling_res = latency.run(load, ceiling, sustained, quick=quick, levels=(0.5,))
    finally:
        ceiling.close()
    return {"daemon": daemon_res, "ceiling_at_daemon_rates": ceiling_res}


def _profile(s: Session, out: Path, rate: float, streams: int = 100, seconds: int = 8) -> dict[str, Any]:
    import threading

    from bench import profile
    from bench.mqttload import Load
    from bench.throughput import prefix_for

    d = s.daemon()
    stacks_path = out / f"profile-stacks-{streams}.txt"
    found: dict[str, Any] = {}

    def sample() -> None:
        time.sleep(0.5)
        found["collapsed"], found["note"] = profile.record(d.pid, seconds, stacks_path)

    with Load(s.broker.host, s.broker.port, d.out_filter, s.qos, s.series) as load:
        t = threading.Thread(target=sample, name="py-spy")
        t.start()
        step = load.step(
            prefix_for(d.name, streams), streams, rate, int(rate * (seconds + 1.5)), {"daemon": d.pid}, d.drops
        )
        t.join()
    res: dict[str, Any] = {
        "tool": found.get("note"),
        "streams": streams,
        "rate": rate,
        "step": step.to_dict(),
        "daemon_cores_used": step.cpu_s.get("daemon", 0.0) / (step.count / rate),
        "stacks_file": stacks_path.name if found.get("collapsed") else None,
    }
    if found.get("collapsed"):
        res["summary"] = profile.summarise(found["collapsed"])
    return res
