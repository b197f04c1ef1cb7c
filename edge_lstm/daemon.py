"""The daemon's lifecycle: start order, signals, model reload, reverse stop.

Start, in order: configuration (already loaded) -> model (load and verify) ->
state (restore the checkpoint, replay the journal after it) -> metrics server
-> MQTT link and the serving loop; then ``READY=1`` and the retained
``online`` status once connected.  Stop, in reverse, from one request: intake
closes, the loop waits (up to ``engine.drain_timeout_s``) for the broker to
acknowledge what was published and acknowledges what is settled, the last
checkpoint is written when nothing is pending, ``offline`` is published and
the connection closed.

Threads:

``serve``         :class:`edge_lstm.pipeline.Loop`: all MQTT I/O, model steps,
                  acknowledgements, journal, checkpoints and watchdog pings
main thread       waits for signals: SIGTERM/SIGINT stop, SIGHUP loads the model
                  file again and hands it to the loop, which swaps it in
``journal-sync``  syncs the journal to disk and wakes ``serve`` (which acknowledges)
``metrics-http``  serves ``/metrics``

The path from socket to forecast is in ``edge_lstm/pipeline.py``.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from edge_lstm import checkpoint as ckpt
from edge_lstm.config import Config, ConfigError
from edge_lstm.engine import Engine
from edge_lstm.forecast import ForecastEncoder
from edge_lstm.metrics import Metrics, MetricsServer
from edge_lstm.modelspec import Manifest, ModelError, load_model
from edge_lstm.mqtt import MqttLink
from edge_lstm.payload import PayloadDecoder
from edge_lstm.pipeline import Loop, Pipeline, open_journal
from edge_lstm.runtime import StepModel, load_step_model
from edge_lstm.sdnotify import Notifier
from edge_lstm.state import StateTable, bytes_per_stream

_LOG = logging.getLogger(__name__)

CONNECT_LOG_EVERY_S = 10.0


class StartError(Exception):
    """The daemon cannot start: bad model, state directory, port in use, ... (one clear message)."""


class Phase(str, enum.Enum):
    """Where the daemon is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


# -- helpers shared with check-config -----------------------------------------------------------


def load_serving_model(cfg: Config) -> StepModel:
    """Load, verify (SHA-256) and open the configured model; raises ModelError."""
    bundle = load_model(Path(cfg.model.path))
    return load_step_model(bundle, cfg.model.runtime, cfg.model.threads)


def make_decoder(cfg: Config, manifest: Manifest) -> PayloadDecoder:
    """The payload decoder for this config and model; raises ConfigError on a field mapping mismatch."""
    i = cfg.input
    try:
        return PayloadDecoder(
            manifest.pipeline.columns,
            fields=i.fields,
            stream_field=i.stream_field or None,
            timestamp_fields=tuple(i.timestamp_fields),
            max_payload_bytes=i.max_payload_bytes,
            max_array_len=i.max_array_len,
            max_abs_value=i.max_abs_value,
            max_clock_skew_s=i.max_clock_skew_s or None,
        )
    except ValueError as e:
        raise ConfigError(f"input.fields: {e} (model columns: {list(manifest.pipeline.columns)})") from None


def _history_users(m: Manifest) -> str:
    """What a model keeps each stream's recent targets for: its seasonal blend, its seasonal inputs or both."""
    blend, inputs = m.pipeline.output.seasonal, bool(m.pipeline.seasonal_inputs)
    return "blend and inputs" if blend and inputs else "blend" if blend else "inputs"


def describe_model(model: StepModel, capacity: int | None = None) -> list[str]:
    """Lines saying what the model is; with ``capacity``, also what its per-stream targets take at it."""
    m = model.manifest
    ring = 8 * m.pipeline.history_ticks  # bytes of float64 targets per stream
    total = [] if not ring or capacity is None else [
        f"(at state.capacity {capacity:,} streams the targets take up to {ring * capacity / 2**20:,.1f} MiB)"
    ]  # fmt: skip
    per = bytes_per_stream(m.layers, len(m.pipeline.columns), m.pipeline.history_ticks)
    at = "" if capacity is None else f"; {per * capacity / 2**20:,.1f} MiB at state.capacity {capacity:,} streams"
    return [
        f"id          {m.model_id}",
        f"columns     {', '.join(m.pipeline.columns)}",
        f"target      {m.pipeline.output.target} ({m.target_units or 'no units'})",
        f"features    {', '.join(f.name for f in m.pipeline.features)}",
        f"layers      {', '.join(str(n) for n in m.layers)}; horizon {m.horizon} ticks of {m.cadence_s:g} s",
        f"warm-up     {m.warmup_ticks} ticks; gaps up to {m.max_gap_ticks} ticks interpolated",
        *([f"history     {m.pipeline.history_ticks} targets per stream ({ring:,} bytes) "
           f"for the seasonal {_history_users(m)}"] if ring else []),
        *total,
        f"state       {per:,} bytes per stream{at}, each checkpoint writes it whole",
        f"weights     {m.quantization.value}",
        f"runtime     {model.runtime_name} {model.runtime_version}",
    ]


class Daemon:
    """One daemon instance.  ``registry``, ``notifier``, ``clock`` are passed in for tests and the demo."""

    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        handle_signals: bool = True,
    ) -> None:
        self.cfg = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.notifier = notifier if notifier is not None else Notifier()
        self.clock = clock
        self.handle_signals = handle_signals
        self.metrics = Metrics(self.registry, max_stream_labels=cfg.metrics.max_stream_labels)
        self.phase = Phase.CREATED
        self.stop_event = threading.Event()
        self._reload_event = threading.Event()
        self.model: StepModel | None = None
        self.engine: Engine | None = None
        self.pipeline: Pipeline | None = None
        self.loop: Loop | None = None
        self.link: MqttLink | None = None
        self.metrics_server: MetricsServer | None = None
        self._thread: threading.Thread | None = None
        self._state_lock: int | None = None  # the state directory's lock (see checkpoint.lock_state_dir)
        self.failed = False  # the serving loop died: exit non-zero so a supervisor restarts the daemon

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a stop signal, stop; returns the exit code (0 after a clean stop)."""
        old_handlers = self._install_signals() if self.handle_signals else {}
        try:
            self.start()
            while not self.stop_event.wait(0.5):
                if self._reload_event.is_set():
                    self._reload_event.clear()
                    self._load_replacement()
            return 1 if self.failed else 0
        finally:
            self.stop()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def start(self) -> None:
        """Ordered start; raises :class:`StartError` with one clear message."""
        cfg = self.cfg
        self.phase = Phase.STARTING
        self.notifier.status("loading model")
        try:
            self.model = load_serving_model(cfg)
            decoder = make_decoder(cfg, self.model.manifest)
        except (ModelError, ConfigError) as e:
            raise StartError(str(e)) from None
        manifest = self.model.manifest
        encoder = ForecastEncoder.for_manifest(manifest, precision=cfg.output.precision or None)
        self.metrics.set_model(manifest, self.model.runtime_name, self.model.runtime_version)
        _LOG.info("model %s (%s %s)", manifest.model_id, self.model.runtime_name, self.model.runtime_version)

        table, journal_seq = self._restore_state(manifest)
        self.engine = Engine(self.model, table, max_gap_ticks=cfg.state.max_gap_ticks or None)
        try:
            journal, records, dropped = open_journal(Path(cfg.state.dir), manifest.sha256, cfg.state.journal_sync)
        except OSError as e:
            raise StartError(f"cannot open the journal in state.dir {cfg.state.dir}: {e.strerror or e}") from None
        self.link = MqttLink(cfg.mqtt, cfg.status_topic)
        self.pipeline = Pipeline(
            cfg, self.engine, decoder, encoder, self.link, self.metrics, journal, clock=self.clock, seq=journal_seq
        )
        self.metrics.journal_dropped_bytes.inc(dropped)
        replayed = self.pipeline.replay(records, after=journal_seq)
        if replayed:
            _LOG.info("state: %d journaled message(s) after the checkpoint stepped again", replayed)
        restored = len(self.engine.table)
        self.link.on_message = self.pipeline.accept
        self.link.on_published = self.pipeline.on_published
        self.link.on_connection = self._on_connection
        self.metrics.queue_capacity.set(cfg.engine.queue_size)
        self.metrics.streams_capacity.set(cfg.state.capacity)
        self.metrics.streams_active.set(len(self.engine.table))

        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.registry, cfg.metrics.bind, cfg.metrics.port)
            try:
                self.metrics_server.start()
            except OSError as e:
                self.metrics_server = None
                raise StartError(f"cannot serve metrics on {cfg.metrics.bind}:{cfg.metrics.port}: {e}") from None

        for f in cfg.subscriptions():
            self.link.subscribe(f.filter)
        if self.pipeline.ha_status_topic is not None:
            self.link.subscribe(self.pipeline.ha_status_topic)
        self.link.begin()
        self.loop = Loop(cfg, self.pipeline, self.link, self.metrics, self.notifier,
                         on_model_swapped=self._model_swapped)  # fmt: skip
        self._thread = threading.Thread(target=self._serve, name="serve", daemon=True)
        self._thread.start()

        self.notifier.status(f"connecting to {cfg.mqtt.host}:{cfg.mqtt.port}")
        waited = 0.0
        while not self.link.connected:
            if self.stop_event.wait(0.25):
                return
            waited += 0.25
            if waited % CONNECT_LOG_EVERY_S < 0.25:
                why = f": {self.link.last_error}" if self.link.last_error else ""
                _LOG.warning("still not connected to %s:%d%s", cfg.mqtt.host, cfg.mqtt.port, why)
        self.loop.request_ready()
        self.phase = Phase.RUNNING
        self.notifier.ready(f"serving {manifest.model_id}")
        _LOG.info("ready: model %s, %d stream(s) restored, subscribed to %s",
                  manifest.model_id, restored, ", ".join(f.filter for f in cfg.subscriptions()))  # fmt: skip

    def _serve(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run()
        except Exception:
            _LOG.exception("the serving loop failed; stopping the daemon")
            self.failed = True
        finally:
            self.stop_event.set()

    def request_stop(self) -> None:
        self.stop_event.set()

    def request_reload(self) -> None:
        self._reload_event.set()

    def stop(self) -> None:
        """Reverse of start; safe to call more than once and after a failed start."""
        if self.phase in (Phase.STOPPED, Phase.CREATED):
            self.phase = Phase.STOPPED
            return
        self.phase = Phase.STOPPING
        self.stop_event.set()
        self.notifier.stopping("stopping")
        serving = self.loop is not None
        if serving:  # after a failed start there is nothing to wait for: its error says it all
            _LOG.info("stopping: intake closed, waiting for the broker to acknowledge what was published")
        if self.loop is not None and self._thread is not None:
            self.loop.request_stop()
            self._thread.join(self.cfg.engine.drain_timeout_s + 30)
            if self._thread.is_alive():
                _LOG.error("the serving loop did not stop")
        if self.link is not None and (self._thread is None or not self._thread.is_alive()):
            self.link.close()
        if self.loop is not None:
            self.loop.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._state_lock is not None:
            os.close(self._state_lock)
            self._state_lock = None
        self.notifier.close()
        self.phase = Phase.STOPPED
        if serving:
            _LOG.info("stopped")

    def _install_signals(self) -> dict[int, Any]:
        def on_stop(signum: int, _frame: FrameType | None) -> None:
            _LOG.info("received %s", signal.Signals(signum).name)
            self.request_stop()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            _LOG.info("received SIGHUP: reloading the model")
            self.request_reload()

        old: dict[int, Any] = {}
        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
            old[sig] = signal.signal(sig, handler)
        return old

    def _on_connection(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected and self.link is not None and self.link.connects > 1:
            self.metrics.mqtt_reconnects.inc()

    # -- model reload ---------------------------------------------------------------------------

    def _load_replacement(self) -> None:
        """Load the model file again (main thread); the loop swaps it in at its next quiescent point."""
        try:
            model = load_serving_model(self.cfg)
        except ModelError as e:
            self.metrics.model_reloads.labels("failed").inc()
            _LOG.error("model reload failed, keeping %s: %s", self._model_id(), e)
            return
        if self.loop is not None:
            self.loop.offer_model(model)

    def _model_swapped(self, model: StepModel, kept: bool) -> None:
        """Called by the loop after a swap (on the serve thread)."""
        old = self._model_id()
        self.model = model
        self.metrics.set_model(model.manifest, model.runtime_name, model.runtime_version)
        self.metrics.model_reloads.labels("ok").inc()
        if kept:
            _LOG.info("model reloaded: %s -> %s, stream state kept", old, model.manifest.model_id)
        else:
            _LOG.warning("model reloaded: %s -> %s, layers, columns or tick policy differ: all stream state reset",
                         old, model.manifest.model_id)  # fmt: skip
        self.notifier.status(f"serving {model.manifest.model_id}")

    def _model_id(self) -> str:
        return self.model.manifest.model_id if self.model is not None else "-"

    # -- state ----------------------------------------------------------------------------------

    def _restore_state(self, manifest: Manifest) -> tuple[StateTable, int]:
        """The checkpointed state table (or a cold one) and the last journal record it includes."""
        cfg = self.cfg
        directory = Path(cfg.state.dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._state_lock = ckpt.lock_state_dir(directory)
        except ckpt.StateDirBusy as e:
            raise StartError(f"state.dir {directory} is in use by another daemon: {e}") from None
        except OSError as e:
            raise StartError(f"cannot create state.dir {directory}: {e.strerror or e}") from None
        res = ckpt.load_checkpoint(
            directory, manifest.sha256, manifest.layers, len(manifest.pipeline.columns), cfg.state.capacity
        )
        if res.table is not None:
            self.metrics.state_restores.labels("restored").inc()
            _LOG.info("state restored: %d stream(s) from %s", len(res.table), res.path)
            return res.table, res.journal_seq
        if res.status is ckpt.LoadStatus.REJECTED:
            self.metrics.state_restores.labels("rejected").inc()
            _LOG.warning("state checkpoint rejected (%s): starting cold", res.reason)
        else:
            self.metrics.state_restores.labels("cold").inc()
            _LOG.info("no usable state checkpoint (%s): starting cold", res.reason)
        return StateTable(manifest.layers, len(manifest.pipeline.columns), cfg.state.capacity), 0
