"""``python -m bench [NAME ...] [--quick] [--protocol {5,3.1.1}] [--repeat N]``: run benchmarks, write
JSON results and the summary."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import enum
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench import cores, machine, report, results
from bench import sut as systems
from edge_lstm.config import MqttProtocol

if TYPE_CHECKING:
    from bench.mqttload import Load
    from bench.throughput import System

_S = TypeVar("_S", systems.Daemon, systems.Ceiling, systems.Naive)

_LOG = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
QUICK_RESULTS = BENCH_DIR / ".cache" / "quick"
DOC = REPO / "docs" / "performance.md"


class Bench(str, enum.Enum):
    """The benchmarks, in the order the full suite runs them."""

    MODEL = "model"
    PIPELINE = "pipeline"  # the daemon's own code per reading, in-process (no broker)
    CEILING = "ceiling"
    NAIVE = "naive"  # the script a user would write: one LiteRT invoke per message (bench/naive.py)
    DAEMON = "daemon"
    CPU = "cpu"  # CPU per reading at a fixed rate, daemon and ceiling (the steadiest comparison)
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
        "--protocol",
        choices=[v.value for v in MqttProtocol],
        default=MqttProtocol.V5.value,
        help="MQTT protocol of the ceiling, the daemon (mqtt.protocol) and the load clients (default 5)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="searches per stream count for the ceiling and daemon throughput, alternating the two; "
        "the median is reported with the min and max (default 1)",
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a configuration setting of the daemon under test, e.g. engine.max_wait_ms=2 (TOML value; repeatable)",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave every process to the scheduler (default: the system under test on a core of its own, "
        "the broker and the load clients on the others; see bench/cores.py)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        args.settings = parse_settings(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.protocol = MqttProtocol(args.protocol)
    for name in args.names:
        if name not in {b.value for b in Bench}:
            p.error(f"unknown benchmark {name!r} (choose from {', '.join(b.value for b in Bench)})")
    return args


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["engine.max_wait_ms=2", ...]`` -> ``{"engine": {"max_wait_ms": 2}}`` (values read as TOML)."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        out.setdefault(section, {})[name] = value
    return out


class Session:
    """One run: a broker shared by every MQTT benchmark, and the daemon kept up between them."""

    def __init__(
        self,
        workdir: Path,
        qos: int,
        protocol: MqttProtocol = MqttProtocol.V5,
        settings: dict[str, dict[str, Any]] | None = None,
        *,
        pin: bool = True,
    ) -> None:
        """``pin``: the system under test on a core of its own, the rest on the others (:mod:`bench.cores`)."""
        self.workdir = workdir
        self.cores = cores.split() if pin else None
        if self.cores is not None:
            os.sched_setaffinity(0, self.cores[1])  # the broker, the generator and the receiver inherit it
        self.qos = qos
        self.protocol = protocol
        self.settings = settings or {}
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
            self._daemon = self._own_core(
                systems.Daemon(
                    self.broker, self.workdir / "daemon", self.qos, protocol=self.protocol, settings=self.settings
                )
            )
        return self._daemon

    def ceiling(self) -> systems.Ceiling:
        """A new ceiling republisher (the caller closes it)."""
        return self._own_core(systems.Ceiling(self.broker, self.qos, self.protocol))

    def naive(self) -> systems.Naive:
        """A new naive script (the caller closes it)."""
        return self._own_core(systems.Naive(self.broker, self.qos, self.protocol))

    def _own_core(self, sut: _S) -> _S:
        if self.cores is not None:
            cores.pin(sut.pid, self.cores[0])
        return sut

    def load(self, sut: System) -> Load:
        """A load generator and receiver for ``sut``, on this run's broker, protocol and series."""
        from bench.mqttload import Load

        return Load(
            self.broker.host,
            self.broker.port,
            sut.out_filter,
            self.qos,
            self.series,
            protocol=self.protocol,
            in_root=sut.in_root,
        )

    def close_daemon(self) -> None:
        if self._daemon is not None:
            self._daemon.close()
            self._daemon = None

    def close(self) -> None:
        self.close_daemon()
        if self._broker is not None:
            self._broker.close()


@contextlib.contextmanager
def session(
    qos: int,
    protocol: MqttProtocol = MqttProtocol.V5,
    settings: dict[str, dict[str, Any]] | None = None,
    *,
    pin: bool = True,
) -> Iterator[Session]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-lstm-bench-"))
    s = Session(workdir, qos, protocol, settings, pin=pin)
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
        "protocol": args.protocol.value,
        "repeat": args.repeat,
        "daemon_settings": args.settings,
        "machine": machine.details(find_mosquitto()),
    }
    t_start = time.monotonic()
    from bench import footprint, modelcost, throughput

    streams = throughput.QUICK_STREAMS if args.quick else throughput.STREAMS
    with session(args.qos, args.protocol, args.settings, pin=args.pin) as s:
        run["cores"] = cores.describe(s.cores)
        daemon_doc: dict[str, Any] | None = None
        if Bench.MODEL in names:
            res = modelcost.run(quick=args.quick, tflite=args.tflite, build_models=args.build_models)
            results.write(out, "model", run, res)
        if Bench.PIPELINE in names:
            from bench import pipeline

            results.write(out, "pipeline", run, pipeline.run(quick=args.quick))
        naive_doc: dict[str, Any] | None = None
        if Bench.CEILING in names or Bench.DAEMON in names or Bench.NAIVE in names:
            found = _throughput(
                s, streams, args.quick, args.repeat, daemon=Bench.DAEMON in names, naive=Bench.NAIVE in names
            )
            results.write(out, "ceiling", run, found["ceiling"])
            if "daemon" in found:
                daemon_doc = {"results": found["daemon"]}
                results.write(out, "daemon", run, found["daemon"])
            if "naive" in found:
                naive_doc = {"results": found["naive"]}
                results.write(out, "naive", run, found["naive"])
        if Bench.CPU in names:
            results.write(out, "cpu", run, _cpu(s, args.quick))
        if Bench.LATENCY in names or Bench.PROFILE in names or Bench.FOOTPRINT in names:
            daemon_doc = daemon_doc or results.read(out, "daemon")
        sustained = _sustained(daemon_doc)
        if Bench.LATENCY in names:
            if not sustained:
                _LOG.info("latency needs the sustained maximum: running the daemon search first")
                daemon_doc = {"results": _daemon_only(s, streams, args.quick, args.repeat)}
                sustained = _sustained(daemon_doc)
            naive_doc = naive_doc or results.read(out, "naive")  # measured when this run or an earlier one has it
            naive_max = {k: v for k, v in _sustained(naive_doc).items() if k in streams}
            res = _latency(s, {k: v for k, v in sustained.items() if k in streams}, args.quick, naive_max)
            results.write(out, "latency", run, res)
        if Bench.PROFILE in names:
            if args.quick:
                results.write(out, "profile", run, {"skipped": "not run in quick mode"})
            else:
                profiles = {str(n): _profile(s, out, sustained.get(n, 1000.0), n) for n in (100, 1)}
                results.write(out, "profile", run, {"profiles": profiles})
        if Bench.FOOTPRINT in names:
            # The run's daemon subscribes to the same reading topics: it would take the feed too, on the
            # same core as the daemon measured.
            s.close_daemon()
            feed = 0.5 * sustained.get(10_000, 4000.0)  # new streams cost more than known ones
            own_core = s.cores[0] if s.cores is not None else None
            res = footprint.run(
                s.broker, s.workdir / "footprint", qos=args.qos, quick=args.quick, feed_rate=feed, own_core=own_core
            )
            # its daemons and loads are its own, with the default protocol: record that, not --protocol
            results.write(out, "footprint", {**run, "protocol": MqttProtocol.V5.value, "daemon_settings": {}}, res)
    _LOG.info("benchmarks done in %.0f s", time.monotonic() - t_start)
    if doc_path is not None:
        report.write(out, doc_path)
    return 0


CEILING_SYSTEM = "minimal paho republisher (bench/ceiling.py)"
NAIVE_SYSTEM = "naive script: one LiteRT invoke per message, batch 1 (bench/naive.py)"
DAEMON_SYSTEM = "edge-lstm run, bundled model (1x64, K=16, dynamic)"


def _throughput(
    s: Session, streams: tuple[int, ...], quick: bool, repeat: int, *, daemon: bool, naive: bool = False
) -> dict[str, Any]:
    """The ceiling's (and the daemon's, the naive script's) searches, alternating when repeated."""
    from bench import throughput

    def ceiling_start(_s: int, _r: int, _so_far: dict[str, list[float | None]]) -> float | None:
        return None if quick else 2000.0

    def daemon_start(_s: int, r: int, so_far: dict[str, list[float | None]]) -> float | None:
        c = so_far["ceiling"][r]  # the ceiling's search just before, in the same repeat
        return None if quick or not c else max(200.0, round(c * 0.4, -1))

    def naive_start(_s: int, r: int, so_far: dict[str, list[float | None]]) -> float | None:
        c = so_far["ceiling"][r]
        return None if quick or not c else max(200.0, round(c * 0.3, -1))

    with contextlib.ExitStack() as stack:
        ceiling = s.ceiling()
        stack.callback(ceiling.close)
        contenders = [throughput.Contender(ceiling, stack.enter_context(s.load(ceiling)), ceiling_start)]
        if daemon:
            d = s.daemon()
            contenders.append(throughput.Contender(d, stack.enter_context(s.load(d)), daemon_start))
        if naive:
            n = s.naive()
            stack.callback(n.close)
            contenders.append(throughput.Contender(n, stack.enter_context(s.load(n)), naive_start))
        found = throughput.measure(contenders, streams, quick=quick, repeat=repeat)
    seen = _client_protocols(s, daemon=daemon, naive=naive)
    out: dict[str, Any] = {"ceiling": {"system": CEILING_SYSTEM, "client_protocols": seen, "streams": found["ceiling"]}}
    if naive:
        out["naive"] = {
            "system": NAIVE_SYSTEM,
            "client_protocols": seen,
            "streams": _ratios(found["naive"], found["ceiling"], "ceiling"),
        }
        if daemon:
            _ratios(found["daemon"], found["naive"], "naive")
    if daemon:
        out["daemon"] = _daemon_results(found["daemon"], found["ceiling"], s.daemon().process.config)
        out["daemon"]["client_protocols"] = seen
    return out


def _client_protocols(s: Session, *, daemon: bool, naive: bool = False) -> dict[str, list[str]]:
    """The MQTT versions the broker saw each client connect with so far (warns when not the asked one)."""
    roles = {"bench-gen-": "generator", "bench-recv-": "receiver", "bench-ceiling-": "ceiling"}
    if naive:
        roles["bench-naive-"] = "naive"
    if daemon:
        roles[s.daemon().process.client_id] = "daemon"
    seen = systems.client_protocols(s.broker, roles)
    for role, versions in seen.items():
        if versions != [s.protocol.value]:
            _LOG.warning("the broker saw %s connect with MQTT %s, not %s", role, versions, s.protocol.value)
    return seen


def _daemon_only(s: Session, streams: tuple[int, ...], quick: bool, repeat: int) -> dict[str, Any]:
    from bench import throughput

    d = s.daemon()
    with s.load(d) as load:
        found = throughput.measure([throughput.Contender(d, load)], streams, quick=quick, repeat=repeat)
    res = _daemon_results(found["daemon"], {}, d.process.config)
    res["client_protocols"] = _client_protocols(s, daemon=True)
    return res


def _daemon_results(found: dict[str, Any], ceiling: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The daemon's search results with the ratio to the ceiling (medians, and per repeat)."""
    return {"system": DAEMON_SYSTEM, "config": config, "streams": _ratios(found, ceiling, "ceiling")}


def _ratios(found: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """Adds ``{name}_sustained_rate``, ``ratio_to_{name}`` (of the medians) and ``ratio_to_{name}_per_repeat``
    (of the searches run one after the other) to each stream count's result in ``found``."""
    for k, v in found.items():
        ov = other.get(k, {})
        o = ov.get("sustained_rate")
        v[f"{name}_sustained_rate"] = o
        v[f"ratio_to_{name}"] = (v["sustained_rate"] / o) if o and v["sustained_rate"] else None
        pairs = zip(v["sustained_rates"], ov.get("sustained_rates", []), strict=False)
        v[f"ratio_to_{name}_per_repeat"] = [(a / b) if a and b else None for a, b in pairs]
    return found


def _cpu(s: Session, quick: bool) -> dict[str, Any]:
    from bench import cpucost

    d = s.daemon()
    ceiling = s.ceiling()
    try:
        with s.load(d) as dload, s.load(ceiling) as cload:
            return cpucost.run((dload, d), (cload, ceiling), quick=quick)
    finally:
        ceiling.close()


def _latency(
    s: Session, sustained: dict[int, float], quick: bool, naive_max: dict[int, float] | None = None
) -> dict[str, Any]:
    from bench import latency

    d = s.daemon()
    with s.load(d) as load:
        daemon_res = latency.run(load, d, sustained, quick=quick)
    ceiling = s.ceiling()
    try:
        with s.load(ceiling) as load:
            ceiling_res = latency.run(load, ceiling, sustained, quick=quick, levels=(0.5,), repeats=1)
    finally:
        ceiling.close()
    res = {"daemon": daemon_res, "ceiling_at_daemon_rates": ceiling_res}
    if naive_max:  # at half of its own maximum: the daemon's half may be more than it sustains
        naive = s.naive()
        try:
            with s.load(naive) as load:
                res["naive"] = latency.run(load, naive, naive_max, quick=quick, levels=(0.5,), repeats=1)
        finally:
            naive.close()
    return res


def _profile(s: Session, out: Path, rate: float, streams: int = 100, seconds: int = 8) -> dict[str, Any]:
    import threading

    from bench import profile
    from bench.throughput import prefix_for

    d = s.daemon()
    stacks_path = out / f"profile-stacks-{streams}.txt"
    found: dict[str, Any] = {}

    def sample() -> None:
        time.sleep(0.5)
        found["collapsed"], found["note"] = profile.record(d.pid, seconds, stacks_path)

    with s.load(d) as load:
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
