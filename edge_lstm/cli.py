"""The ``edge-lstm`` command: ``run``, ``check-config``, ``demo``, ``config-docs``.

Exit codes: 0 success, 1 a bad configuration or model (or a failure at run
time), 2 a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_lstm import __version__
from edge_lstm import checkpoint as ckpt
from edge_lstm.config import Config, ConfigError, LogLevel, load_config, reference_markdown, to_toml
from edge_lstm.modelspec import ModelError

_LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: LogLevel = LogLevel.INFO, json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Log to stderr, one line per event (replaces any handlers set before)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.as_logging)
    # paho logs every packet at debug level: keep it quiet unless asked for.
    logging.getLogger("paho.mqtt").setLevel(logging.WARNING if level is not LogLevel.DEBUG else logging.DEBUG)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-lstm",
        description="LSTM forecasts for MQTT sensor streams: readings in, per-stream state, forecasts out.",
    )
    p.add_argument("--version", action="version", version=f"edge-lstm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon", description="Run the forecasting daemon until SIGTERM/SIGINT.")
    run.add_argument("--config", "-c", required=True, type=Path, metavar="FILE", help="TOML configuration file")

    check = sub.add_parser(
        "check-config",
        help="validate a configuration and its model, start nothing",
        description="Validate a configuration file, load and verify its model, print the effective "
        "configuration (secrets as ***) and what the daemon would subscribe to. Starts nothing.",
    )
    check.add_argument("file", type=Path, metavar="FILE")

    demo = sub.add_parser(
        "demo",
        help="replay the bundled series through a private broker and show live forecasts",
        description="Start a private Mosquitto on a free loopback port, run the daemon on the bundled "
        "model and replay the bundled half-hourly demand series through the broker at an accelerated "
        "rate, printing readings and forecasts. Ctrl-C stops it.",
    )
    demo.add_argument("--model", type=Path, help="model directory (default: the bundled models/taylor)")
    demo.add_argument("--data", type=Path, help="CSV to replay (default: the bundled data/taylor.csv)")
    demo.add_argument("--rate", type=float, default=20.0, help="ticks per second (default 20)")
    demo.add_argument("--streams", type=int, default=1, help="parallel copies of the series (default 1)")
    demo.add_argument("--ticks", type=int, default=0, help="stop after this many ticks (default: all data)")
    demo.add_argument("--metrics-port", type=int, default=0, help="metrics port (default: a free port)")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")

    docs = sub.add_parser("config-docs", help="print the configuration reference (Markdown)")
    docs.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    return p


def _fail(message: str) -> int:
    print(f"edge-lstm: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_check_config(path: Path, out: TextIO) -> int:
    """Validate and explain a configuration; starts nothing."""
    from edge_lstm.daemon import describe_model, load_serving_model, make_decoder

    try:
        cfg = load_config(path)
    except ConfigError as e:
        return _fail(str(e))
    print(f"# configuration {cfg.source}: valid", file=out)
    print("# effective configuration (secrets shown as ***)", file=out)
    print(to_toml(cfg), file=out)
    try:
        model = load_serving_model(cfg)
        make_decoder(cfg, model.manifest)
    except (ModelError, ConfigError) as e:
        return _fail(str(e))
    print("# model", file=out)
    for line in describe_model(model, cfg.state.capacity):
        print(f"  {line}", file=out)
    print("# subscriptions (QoS 1)", file=out)
    for f in cfg.subscriptions():
        where = f"stream id from topic level {f.stream_level + 1}" if f.stream_level is not None else "no stream level"
        if cfg.input.stream_field:
            where += f"; payload field {cfg.input.stream_field!r} first"
        print(f"  {f.filter:<40} {where}", file=out)
    print("# output", file=out)
    print(
        f"  forecasts   {cfg.output.topic} (QoS {cfg.output.qos}{', retained' if cfg.output.retain else ''})", file=out
    )
    print(f"  status      {cfg.status_topic} (retained online/offline)", file=out)
    print(f"  broker      {'mqtts' if cfg.mqtt.tls else 'mqtt'}://{cfg.mqtt.host}:{cfg.mqtt.port} "
          f"(MQTT {cfg.mqtt.protocol.value}, client id {cfg.mqtt.client_id})", file=out)  # fmt: skip
    if cfg.metrics.enabled:
        where = f"http://{cfg.metrics.bind}:{cfg.metrics.port}/metrics"
        print(f"  metrics     {where} ({_port_check(cfg.metrics.bind, cfg.metrics.port)})", file=out)
    state_dir = Path(cfg.state.dir)
    usable, state = _state_dir_check(state_dir)
    print(f"  state       {state_dir} ({state})", file=out)
    if not usable:
        print("# not ok: the daemon could not use its state directory; nothing was started", file=out)
        return EXIT_FAILURE
    print("# ok: nothing was started", file=out)
    return EXIT_OK


def _state_dir_check(state_dir: Path) -> tuple[bool, str]:
    """Whether the daemon can use (or create) its state directory, and the reason as one phrase."""
    if state_dir.exists():
        if not state_dir.is_dir():
            return False, "NOT a directory"
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return False, "NOT writable by this user"
        holder = ckpt.state_dir_holder(state_dir)
        if holder is not None:  # usable: a restart of that daemon frees it
            return True, f"writable; held by a running daemon, pid {holder}: a second one would be refused"
        return True, "writable"
    parent = state_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return False, f"CANNOT be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return False, f"CANNOT be created by this user (in {parent})"
    return True, "will be created"


def _port_check(bind: str, port: int) -> str:
    """Whether the metrics endpoint could listen now (the daemon's own server binds, then lets go)."""
    from prometheus_client import CollectorRegistry

    from edge_lstm.metrics import MetricsServer

    try:
        MetricsServer(CollectorRegistry(), bind, port).check_address()
    except OSError as e:
        return f"NOT free now: {e.strerror or e}; a running daemon's own port is freed by its restart"
    return "free"


def cmd_run(path: Path) -> int:
    from edge_lstm.daemon import Daemon, StartError

    try:
        cfg: Config = load_config(path)
    except ConfigError as e:
        setup_logging()
        _LOG.error("bad configuration: %s", e)
        return EXIT_FAILURE
    setup_logging(cfg.log.level, cfg.log.json)
    daemon = Daemon(cfg)
    try:
        return daemon.run()
    except StartError as e:
        _LOG.error("cannot start: %s", e)
        return EXIT_FAILURE


def cmd_config_docs(output: Path | None, out: TextIO) -> int:
    text = reference_markdown()
    if output is None:
        out.write(text)
    else:
        output.write_text(text)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return cmd_run(args.config)
    if args.command == "check-config":
        return cmd_check_config(args.file, sys.stdout)
    if args.command == "config-docs":
        return cmd_config_docs(args.output, sys.stdout)
    if args.command == "demo":
        from edge_lstm.demo import DemoOptions, run_demo

        if args.rate <= 0 or args.streams < 1 or args.ticks < 0:
            print("edge-lstm demo: --rate must be > 0, --streams >= 1, --ticks >= 0", file=sys.stderr)
            return EXIT_USAGE
        opts = DemoOptions(
            model=args.model,
            data=args.data,
            rate=args.rate,
            streams=args.streams,
            ticks=args.ticks,
            metrics_port=args.metrics_port,
            quiet=args.quiet,
        )
        return run_demo(opts)
    parser.print_help(sys.stderr)  # pragma: no cover - argparse rejects unknown commands
    return EXIT_USAGE
