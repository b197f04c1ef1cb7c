"""``edge-lstm demo``: the daemon on the bundled model, fed a real series through a private broker.

Starts Mosquitto on a free loopback port, runs the daemon in this process on
``models/taylor``, replays ``data/taylor.csv`` (half-hourly electricity demand)
through the broker at ``--rate`` ticks per second as ``--streams`` copies
(each a day further into the series), prints a live table of readings and
forecasts, and at the end a summary: readings, forecasts and the 1-step MAE of
the model against persistence (the last value) over the same readings.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from edge_lstm.config import ConfigError, parse_config
from edge_lstm.intervals import bound_keys, level_label
from edge_lstm.modelspec import ModelError, load_manifest
from edge_lstm.ticks import StreamTicks

_LOG = logging.getLogger(__name__)
INTERRUPT_POLL_S = 0.1  # how often the replay looks for a Ctrl-C

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
INSTALL_HINT = "mosquitto is not installed: sudo apt-get install mosquitto (or run `make demo`)"
STREAM_OFFSET_TICKS = 48  # each extra stream starts one day (48 half-hours) later in the series
TABLE_STREAMS = 3  # streams shown in the live table
TOPIC_IN = "demo/{stream}/reading"
TOPIC_OUT = "demo/forecasts/{stream}"


@dataclasses.dataclass
class DemoOptions:
    model: Path | None = None
    data: Path | None = None
    rate: float = 20.0
    streams: int = 1
    ticks: int = 0  # 0: until the data ends
    metrics_port: int = 0
    quiet: bool = False


def _candidates(relative: str) -> Iterator[Path]:
    here = Path(__file__).resolve().parent
    yield Path.cwd() / relative
    yield here.parent / relative  # a source checkout
    yield here / "bundled" / relative  # an installed wheel (pyproject.toml maps them there)


def find_bundled(relative: str) -> Path | None:
    """The bundled ``models/taylor`` or ``data/taylor.csv``: in the working directory, the checkout or the package."""
    for p in _candidates(relative):
        if p.exists():
            return p
    return None


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """A Mosquitto process on a free loopback port, for the demo only."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nmax_queued_messages 100000\n"
        )
        log = open(self.workdir / "mosquitto.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            # Own session: Ctrl-C in the terminal stops the demo, which then stops the broker itself.
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not start: {(self.workdir / 'mosquitto.log').read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def load_csv(path: Path) -> tuple[list[str], list[float], list[list[float]]]:
    """``(value column names, epoch timestamps, rows of values)``; the first column is the ISO timestamp."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        ts: list[float] = []
        rows: list[list[float]] = []
        for row in reader:
            if not row:
                continue
            t = dt.datetime.fromisoformat(row[0].replace("Z", "+00:00"))
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.timezone.utc)
            ts.append(t.timestamp())
            rows.append([float(v) if v.strip() else math.nan for v in row[1:]])
    return header[1:], ts, rows


@dataclasses.dataclass
class _StreamStats:
    readings: int = 0
    ticks: int = 0  # ticks the readings closed (each one forecast, unless filled across a gap)
    forecasts: int = 0
    model_err: list[float] = dataclasses.field(default_factory=list)
    persist_err: list[float] = dataclasses.field(default_factory=list)
    checked: int = 0  # readings checked against their previous 1-step interval
    anomalies: int = 0  # of those, outside it


class _ForecastBook:
    """Collects forecasts from the output topic (paho thread) for the table and the summary."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[tuple[str, float], dict[str, Any]] = {}
        self.count = 0
        self.cond = threading.Condition(self.lock)

    def on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            key = (str(doc["stream"]), float(doc["ts_epoch"]))
        except (ValueError, KeyError, TypeError):
            return
        with self.cond:
            self.by_key[key] = doc
            self.count += 1
            self.cond.notify_all()

    def get(self, stream: str, ts: float, timeout: float, interrupt: _Interrupt) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (stream, ts) not in self.by_key:
                left = deadline - time.monotonic()
                if left <= 0 or interrupt.requested:
                    return None
                self.cond.wait(min(left, INTERRUPT_POLL_S))
            return self.by_key[(stream, ts)]


class _Interrupt:
    """The SIGINT handler during the replay: only sets a flag (a handler must not take a lock the
    interrupted code may hold, nor raise in the middle of a library call); the replay polls it."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, _signum: int, _frame: Any) -> None:
        self.requested = True

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, INTERRUPT_POLL_S))


def _client(name: str, port: int) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    return c


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%a %m-%d %H:%M")


def run_demo(opts: DemoOptions, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code."""
    out = out or sys.stdout
    model_dir = opts.model or find_bundled("models/taylor")
    data_path = opts.data or find_bundled("data/taylor.csv")
    if model_dir is None or data_path is None:
        print("edge-lstm demo: cannot find the bundled models/taylor and data/taylor.csv; "
              "run it from the source checkout or pass --model and --data", file=sys.stderr)  # fmt: skip
        return 1
    binary = find_mosquitto()
    if binary is None:
        print(f"edge-lstm demo: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        manifest = load_manifest(model_dir)
        columns, stamps, rows = load_csv(data_path)
    except (ModelError, OSError, ValueError) as e:
        print(f"edge-lstm demo: {e}", file=sys.stderr)
        return 1
    missing = [c for c in manifest.pipeline.columns if c not in columns]
    if missing:
        print(f"edge-lstm demo: {data_path} lacks the model's column(s) {missing}", file=sys.stderr)
        return 1
    col_idx = [columns.index(c) for c in manifest.pipeline.columns]
    target_name = manifest.pipeline.output.target
    target = columns.index(target_name)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    on_main = threading.current_thread() is threading.main_thread()
    # `kill` (SIGTERM) stops the demo as Ctrl-C does, so that the private broker is stopped too.
    original_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler) if on_main else None
    try:
        return _run(opts, out, model_dir, data_path, binary, manifest, stamps, rows, col_idx, target)
    finally:
        if original_sigterm is not None:
            signal.signal(signal.SIGTERM, original_sigterm)


def _run(
    opts: DemoOptions,
    out: TextIO,
    model_dir: Path,
    data_path: Path,
    binary: str,
    manifest: Any,
    stamps: list[float],
    rows: list[list[float]],
    col_idx: list[int],
    target: int,
) -> int:
    from edge_lstm.daemon import Daemon, StartError  # after the cheap checks: loads the runtime

    on_main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    with tempfile.TemporaryDirectory(prefix="edge-lstm-demo-") as tmp:
        workdir = Path(tmp)
        broker = PrivateBroker(binary, workdir)
        try:
            broker.start()
        except (OSError, RuntimeError) as e:
            print(f"edge-lstm demo: {e}", file=sys.stderr)
            return 1
        daemon = None
        clients: list[paho.Client] = []
        stats: dict[str, _StreamStats] = {}
        original_sigint: Any = None  # the SIGINT handler before the replay installed its own
        try:
            try:
                cfg = parse_config(
                    {
                        "model": {"path": str(Path(model_dir).resolve())},
                        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "edge-lstm-demo"},
                        "input": {"topics": [TOPIC_IN], "max_clock_skew_s": 0},
                        "output": {"topic": TOPIC_OUT, "qos": 1},
                        "state": {"dir": str(workdir / "state"), "checkpoint_interval_s": 3600},
                        "metrics": {"port": opts.metrics_port or free_port()},
                        "log": {"level": "warning"},
                    }
                )
            except ConfigError as e:
                print(f"edge-lstm demo: {e}", file=sys.stderr)
                return 1
            daemon = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
            try:
                daemon.start()
            except StartError as e:
                print(f"edge-lstm demo: cannot start the daemon: {e}", file=sys.stderr)
                return 1
            book = _ForecastBook()
            sub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="demo-viewer")
            subscribed = threading.Event()
            sub.on_message = book.on_message
            sub.on_subscribe = lambda *_a: subscribed.set()
            sub.connect("127.0.0.1", broker.port, keepalive=30)
            sub.subscribe(TOPIC_OUT.replace("{stream}", "+"), qos=1)
            sub.loop_start()
            clients.append(sub)
            subscribed.wait(5)
            pub = _client("demo-sensors", broker.port)
            clients.append(pub)
            url = daemon.metrics_server.url if daemon.metrics_server is not None else "(metrics disabled)"
            print(
                f"broker    mqtt://127.0.0.1:{broker.port}  (mosquitto_sub -p {broker.port} -t 'demo/#' -v)", file=out
            )
            print(f"model     {manifest.model_id}: {manifest.horizon} ticks of {manifest.cadence_s / 60:g} min ahead, "
                  f"warm-up {manifest.warmup_ticks} ticks", file=out)  # fmt: skip
            print(f"metrics   {url}", file=out)
            print(f"replaying {data_path.name}: {opts.streams} stream(s) at {opts.rate:g} ticks/s; Ctrl-C stops\n",
                  file=out)  # fmt: skip
            interrupt = _Interrupt()
            if on_main:
                original_sigint = signal.signal(signal.SIGINT, interrupt)
                signal.signal(signal.SIGTERM, interrupt)
            stats = _replay(opts, pub, book, stamps, rows, col_idx, target, manifest, out, interrupt)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping", file=out)
        finally:
            # A second Ctrl-C must not leave the broker behind: cleanup takes a few seconds at most.
            old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main else None
            old_sigterm = signal.signal(signal.SIGTERM, signal.SIG_IGN) if on_main else None
            if original_sigint is not None:
                old_sigint = original_sigint
            for c in clients:
                c.disconnect()
                c.loop_stop()
            if daemon is not None:
                daemon.stop()
            broker.stop()
            if on_main:
                signal.signal(signal.SIGINT, old_sigint)
                signal.signal(signal.SIGTERM, old_sigterm)
        _summary(stats, manifest.target_units, out)
        if daemon is not None:
            reg = daemon.registry
            received = reg.get_sample_value("edge_lstm_readings_received_total") or 0.0
            processed = reg.get_sample_value("edge_lstm_readings_total", {"outcome": "processed"}) or 0.0
            published = reg.get_sample_value("edge_lstm_forecasts_published_total") or 0.0
            print(f"  daemon: received {received:.0f}, processed {processed:.0f}, published {published:.0f}", file=out)
    return 0


def _replay(
    opts: DemoOptions,
    pub: paho.Client,
    book: _ForecastBook,
    stamps: list[float],
    rows: list[list[float]],
    col_idx: list[int],
    target: int,
    manifest: Any,
    out: TextIO,
    interrupt: _Interrupt,
) -> dict[str, _StreamStats]:
    columns = list(manifest.pipeline.columns)
    n_streams = opts.streams
    available = len(stamps) - STREAM_OFFSET_TICKS * (n_streams - 1)
    if available < 2:
        print("edge-lstm demo: the data is too short for that many streams", file=sys.stderr)
        return {}
    n_ticks = min(available, opts.ticks) if opts.ticks else available
    names = [f"s{k}" for k in range(n_streams)] if n_streams > 1 else [manifest.name]
    stats = {n: _StreamStats() for n in names}
    # The readings go through the model's own tick policy here too, so the table waits for exactly the
    # forecasts the daemon makes: one per tick a reading closes, stamped with the tick's time (a reading
    # off the grid, or aggregated with others, closes its tick only when a later one arrives).
    policy = manifest.ticks
    open_ticks = {n: StreamTicks.empty(len(columns)) for n in names}
    target_col = manifest.pipeline.target_index
    last_actual: dict[str, float] = {}
    last_index: dict[str, int] = {}
    last_fc: dict[str, list[float]] = {}
    last_warming: dict[str, bool] = {}
    fmt = _number_format([r[target] for r in rows])
    units = manifest.target_units
    iv = manifest.intervals
    band_keys = bound_keys(iv.check_level) if iv is not None else None
    last_band: dict[str, tuple[float, float]] = {}
    if not opts.quiet:
        band = f"  {level_label(iv.check_level) + ' % interval':>19}" if iv is not None else ""
        print(f"{'stream':<8} {'time (UTC)':<15} {'actual':>9} {'forecast':>9} {'error':>8} "
              f"{'+' + str(manifest.horizon) + ' ticks':>10}{band}  {units}", file=out)  # fmt: skip

    start = time.monotonic()
    try:
        for i in range(n_ticks):
            interrupt.sleep(start + i / opts.rate - time.monotonic())
            if interrupt.requested:
                break
            sent = []
            for k, name in enumerate(names):
                j = i + k * STREAM_OFFSET_TICKS
                values = rows[j]
                if any(math.isnan(values[c]) for c in col_idx):
                    continue
                model_values = [values[ci] for ci in col_idx]
                doc = {"ts": stamps[j], **dict(zip(columns, model_values, strict=True))}
                pub.publish(TOPIC_IN.replace("{stream}", name), json.dumps(doc), qos=1)
                stats[name].readings += 1
                _outcome, closed = policy.push(open_ticks[name], stamps[j], model_values)
                sent += [(name, tick) for tick in closed if tick.observed]
            for name, tick in sent:
                ts, actual = tick.ts, tick.values[target_col]
                fc = book.get(name, ts, max(2.0, 5.0 / opts.rate), interrupt)
                st = stats[name]
                st.ticks += 1
                prev_fc = last_fc.get(name)
                prev_warming = last_warming.get(name, True)
                # The forecast made one tick before this one (none across a gap or a reset).
                follows = last_index.get(name) == tick.index - 1 and not tick.reset
                one_step = prev_fc[0] if prev_fc and follows else None
                band_text = ""
                if band_keys is not None and name in last_band and follows:
                    lo, hi = last_band[name]
                    band_text = f"  {fmt(lo, 9)}..{fmt(hi, 8, left=True)}"
                if fc is None:  # none came in time: the next tick has no 1-step forecast to score or show
                    last_fc.pop(name, None)
                    last_band.pop(name, None)
                else:
                    st.forecasts += 1
                    last_fc[name] = [f["value"] for f in fc["forecasts"]]
                    last_warming[name] = bool(fc.get("warming_up"))
                    if band_keys is not None:
                        first = fc["forecasts"][0]
                        last_band[name] = (first[band_keys[0]], first[band_keys[1]])
                    if fc.get("anomaly") is not None:
                        st.checked += 1
                        st.anomalies += bool(fc["anomaly"])
                # Scored once the daemon no longer flags the forecast warming up (after the stream's first
                # ticks and after every reset).
                if one_step is not None and name in last_actual and not prev_warming:
                    st.model_err.append(abs(one_step - actual))
                    st.persist_err.append(abs(last_actual[name] - actual))
                last_actual[name] = actual
                last_index[name] = tick.index
                if not opts.quiet and names.index(name) < TABLE_STREAMS:
                    err = fmt(one_step - actual, 8, sign=True) if one_step is not None else f"{'':>8}"
                    ahead = fmt(last_fc[name][-1], 10) if fc is not None else f"{'-':>10}"
                    fcs = fmt(one_step, 9) if one_step is not None else f"{'-':>9}"
                    flag = "  (warming up)" if fc is not None and fc.get("warming_up") else ""
                    if fc is not None and fc.get("anomaly"):
                        flag = f"  ANOMALY ({fc['anomaly_score'] or math.inf:.1f} widths out)"
                    print(f"{name:<8} {_fmt_time(ts):<15} {fmt(actual, 9)} {fcs} {err} {ahead}{band_text}{flag}",
                          file=out)  # fmt: skip
    except KeyboardInterrupt:
        interrupt.requested = True
    if interrupt.requested:
        print("\ninterrupted: stopping", file=out)
    return stats


def _decimals(magnitude: float, least: int, most: int) -> int:
    """Decimals for about four significant digits of numbers of this magnitude, within [least, most]."""
    if not (magnitude > 0 and math.isfinite(magnitude)):
        return least
    return max(least, min(most, 3 - math.floor(math.log10(magnitude))))


def _number_format(values: list[float]) -> Any:
    """A formatter with as many decimals as the series' magnitude needs for about four significant digits
    (electricity demand in MW: none; a temperature of 23.18 °C: two)."""
    decimals = _decimals(max((abs(v) for v in values if math.isfinite(v)), default=0.0), 0, 4)

    def fmt(v: float, width: int, *, sign: bool = False, left: bool = False) -> str:
        text = f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"
        return f"{text:<{width}}" if left else f"{text:>{width}}"

    return fmt


def _fixed(v: float, width: int = 10) -> str:
    """``v`` with about four significant digits and at least one decimal (169.1; 0.06411)."""
    return f"{v:{width}.{_decimals(abs(v), 1, 6)}f}"


def _summary(stats: dict[str, _StreamStats], units: str, out: TextIO) -> None:
    readings = sum(s.readings for s in stats.values())
    forecasts = sum(s.forecasts for s in stats.values())
    model = [e for s in stats.values() for e in s.model_err]
    persist = [e for s in stats.values() for e in s.persist_err]
    print("\nsummary", file=out)
    print(f"  readings published   {readings}", file=out)
    print(f"  forecasts received   {forecasts}", file=out)
    if model:
        mae_m = sum(model) / len(model)
        mae_p = sum(persist) / len(persist)
        ratio = mae_m / mae_p if mae_p else math.nan
        print(f"  1-step MAE, model        {_fixed(mae_m)} {units}  (after warm-up, {len(model)} forecasts)", file=out)
        print(f"  1-step MAE, persistence  {_fixed(mae_p)} {units}  (model/persistence = {ratio:.2f})", file=out)
    else:
        print("  (too few ticks after warm-up for an error estimate)", file=out)
    checked = sum(s.checked for s in stats.values())
    if checked:
        flagged = sum(s.anomalies for s in stats.values())
        share = 100 * flagged / checked
        print(f"  anomalies flagged        {flagged:10d} of {checked} readings checked ({share:.1f} %)", file=out)
