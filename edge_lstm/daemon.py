"""The daemon: wiring of model, state, checkpoints, metrics, MQTT and the worker.

Start, in order: configuration (already loaded) -> model (load and verify) ->
state (restore the checkpoint) -> metrics server -> MQTT -> worker and
checkpointer threads; then ``READY=1`` and the retained ``online`` status once
connected.  Stop, in reverse, from one stop event: intake closes (later
messages stay unacknowledged with the broker), the worker finishes what is
queued (up to ``engine.drain_timeout_s``), the last checkpoint is written,
``offline`` is published and the connection closed.

Threads:

``mqtt-network``  paho's loop: decodes each message and enqueues its readings
``worker``        takes batches, runs the engine, publishes forecasts, pings the watchdog
``checkpointer``  writes a checkpoint every ``state.checkpoint_interval_s``
main thread       waits for signals: SIGTERM/SIGINT stop, SIGHUP reloads the model

The worker alone touches the engine and the state table; the checkpointer takes
a snapshot of the table under the same lock.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from edge_lstm import checkpoint as ckpt
from edge_lstm.batcher import Batcher
from edge_lstm.config import Config, ConfigError, TopicFilter
from edge_lstm.engine import BatchResult, Engine
from edge_lstm.forecast import ForecastEncoder
from edge_lstm.metrics import Metrics, MetricsServer
from edge_lstm.modelspec import Manifest, ModelError, load_model
from edge_lstm.mqtt import MqttLink
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import PayloadDecoder, PayloadError
from edge_lstm.runtime import StepModel, load_step_model
from edge_lstm.sdnotify import Notifier
from edge_lstm.state import StateTable

_LOG = logging.getLogger(__name__)

WORKER_IDLE_S = 0.5  # longest sleep of the worker without a batch (it pings the watchdog after each)
CONNECT_LOG_EVERY_S = 10.0
CHECKPOINT_LOCK_TIMEOUT_S = 10.0
STATUS_EVERY_S = 10.0


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
            timestamp_fields=(i.timestamp_field,) if i.timestamp_field else (),
            max_payload_bytes=i.max_payload_bytes,
            max_array_len=i.max_array_len,
            max_abs_value=i.max_abs_value,
            max_clock_skew_s=i.max_clock_skew_s or None,
        )
    except ValueError as e:
        raise ConfigError(f"input.fields: {e} (model columns: {list(manifest.pipeline.columns)})") from None


def describe_model(model: StepModel) -> list[str]:
    m = model.manifest
    return [
        f"id          {m.model_id}",
        f"columns     {', '.join(m.pipeline.columns)}",
        f"target      {m.pipeline.output.target} ({m.target_units or 'no units'})",
        f"features    {', '.join(f.name for f in m.pipeline.features)}",
        f"layers      {', '.join(str(n) for n in m.layers)}; horizon {m.horizon} ticks of {m.cadence_s:g} s",
        f"warm-up     {m.warmup_ticks} ticks; gaps up to {m.max_gap_ticks} ticks interpolated",
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
        self._intake_open = threading.Event()
        self._engine_lock = threading.Lock()
        self._pending_model: StepModel | None = None
        self._threads: list[threading.Thread] = []
        self.model: StepModel | None = None
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.decoder: PayloadDecoder | None = None
        self.encoder: ForecastEncoder | None = None
        self.link: MqttLink | None = None
        self.metrics_server: MetricsServer | None = None
        self._worker_done = threading.Event()
        self.failed = False  # the worker died: exit non-zero so a supervisor restarts the daemon
        self._last_watchdog = 0.0
        self._status_at = time.monotonic()
        self._status_count = 0

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
            self.decoder = make_decoder(cfg, self.model.manifest)
        except (ModelError, ConfigError) as e:
            raise StartError(str(e)) from None
        manifest = self.model.manifest
        self.encoder = ForecastEncoder.for_manifest(manifest, precision=cfg.output.precision or None)
        self.metrics.set_model(manifest, self.model.runtime_name, self.model.runtime_version)
        _LOG.info("model %s (%s %s)", manifest.model_id, self.model.runtime_name, self.model.runtime_version)

        table = self._restore_state(manifest)
        self.engine = Engine(self.model, table, max_gap_ticks=cfg.state.max_gap_ticks or None)
        self.batcher = Batcher(cfg.engine.queue_size)
        self.metrics.queue_capacity.set(cfg.engine.queue_size)
        self.metrics.streams_capacity.set(cfg.state.capacity)
        self.metrics.streams_active.set(len(table))

        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.registry, cfg.metrics.bind, cfg.metrics.port)
            try:
                self.metrics_server.start()
            except OSError as e:
                self.metrics_server = None
                raise StartError(f"cannot serve metrics on {cfg.metrics.bind}:{cfg.metrics.port}: {e}") from None

        self.link = MqttLink(cfg.mqtt, cfg.status_topic, self.metrics)
        for f in cfg.subscriptions():
            self.link.route(f.filter, self._intake_handler(f))
        self._intake_open.set()
        self.link.start()
        self._spawn("worker", self._worker)
        self._spawn("checkpointer", self._checkpointer)

        self.notifier.status(f"connecting to {cfg.mqtt.host}:{cfg.mqtt.port}")
        waited = 0.0
        while not self.link.wait_connected(0.25):
            if self.stop_event.is_set():
                return
            waited += 0.25
            if waited % CONNECT_LOG_EVERY_S < 0.25:
                why = f": {self.link.last_error}" if self.link.last_error else ""
                _LOG.warning("still not connected to %s:%d%s", cfg.mqtt.host, cfg.mqtt.port, why)
        self.link.set_ready()
        self.phase = Phase.RUNNING
        self.notifier.ready(f"serving {manifest.model_id}")
        _LOG.info("ready: model %s, %d stream(s) restored, subscribed to %s",
                  manifest.model_id, len(table), ", ".join(f.filter for f in cfg.subscriptions()))  # fmt: skip

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
        _LOG.info("stopping: intake closed, finishing queued readings")
        self._intake_open.clear()
        if self.batcher is not None:
            self.batcher.close()
        for t in self._threads:
            t.join(self.cfg.engine.drain_timeout_s + 30)
            if t.is_alive():
                _LOG.error("thread %s did not stop", t.name)
        if self.engine is not None:
            self._checkpoint()
        if self.link is not None:
            self.link.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.notifier.close()
        self.phase = Phase.STOPPED
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

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- intake (mqtt-network thread) -----------------------------------------------------------

    def _intake_handler(self, tf: TopicFilter) -> Callable[[str, bytes], bool]:
        decoder = self.decoder
        batcher = self.batcher
        metrics = self.metrics
        clock = self.clock
        intake_open = self._intake_open
        assert decoder is not None and batcher is not None
        received_counter = metrics.received
        last_message = metrics.mqtt_last_message

        def handle(topic: str, payload: bytes) -> bool:
            if not intake_open.is_set():
                return False  # stopping: leave it with the broker for the next run
            received = time.monotonic()
            now = clock()
            last_message.set(now)
            try:
                result = decoder.decode(payload, tf.stream_of(topic), now, received)
            except PayloadError as e:
                received_counter.inc()
                metrics.outcome(e.outcome)
                if _LOG.isEnabledFor(logging.DEBUG):
                    _LOG.debug("rejected message on %s (%s): %s", topic, e.outcome.value, e)
                return True
            received_counter.inc(result.count)
            for outcome in result.rejected:
                metrics.outcome(outcome)
            for reading in result.readings:
                dropped = batcher.put(reading)
                if dropped:
                    metrics.outcome(Outcome.QUEUE_FULL, dropped)
            return True

        return handle

    # -- worker ---------------------------------------------------------------------------------

    def _worker(self) -> None:
        assert self.batcher is not None and self.engine is not None
        batcher = self.batcher
        max_batch = self.cfg.engine.max_batch
        linger_s = self.cfg.engine.max_wait_ms / 1000.0
        drain_deadline: float | None = None
        try:
            while True:
                if self.stop_event.is_set():
                    if drain_deadline is None:
                        drain_deadline = time.monotonic() + self.cfg.engine.drain_timeout_s
                    if len(batcher) == 0 or time.monotonic() > drain_deadline:
                        break
                pending = self._pending_model
                if pending is not None:
                    self._pending_model = None
                    self._swap_model(pending)
                batch = batcher.take_batch(max_batch, WORKER_IDLE_S, 0.0 if self.stop_event.is_set() else linger_s)
                if batch:
                    with self._engine_lock:
                        result = self.engine.process(batch)
                    self._publish(result)
                self.metrics.queue_depth.set(len(batcher))
                self._watchdog()
                self._status(len(batch) if batch else 0)
            left = batcher.drain()
            if left:
                self.metrics.outcome(Outcome.SHUTDOWN, len(left))
                _LOG.warning("%d queued reading(s) not processed before the drain timeout", len(left))
        except Exception:
            _LOG.exception("worker failed; stopping the daemon")
            self.failed = True
            self.stop_event.set()
        finally:
            self._worker_done.set()

    def _publish(self, result: BatchResult) -> None:
        link = self.link
        encoder = self.encoder
        assert link is not None and encoder is not None
        out = self.cfg.output
        qos, retain = out.qos, out.retain
        template = out.topic
        published = 0
        for f in result.forecasts:
            if link.publish(template.replace("{stream}", f.stream), encoder.encode(f), qos, retain):
                published += 1
        assert self.engine is not None
        self.metrics.record_batch(result, published, time.monotonic(), len(self.engine.table))

    def _status(self, processed: int) -> None:
        """A ``STATUS=`` line for ``systemctl status`` every ``STATUS_EVERY_S``."""
        if not self.notifier.enabled:
            return
        self._status_count += processed
        now = time.monotonic()
        if now - self._status_at >= STATUS_EVERY_S:
            rate = self._status_count / (now - self._status_at)
            streams = len(self.engine.table) if self.engine is not None else 0
            self.notifier.status(f"serving {self._model_id()}: {streams} streams, {rate:.1f} readings/s")
            self._status_at, self._status_count = now, 0

    def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= min(interval, 5.0):
            self._last_watchdog = now
            self.notifier.watchdog()

    # -- model reload ---------------------------------------------------------------------------

    def _load_replacement(self) -> None:
        """Load the model file again (main thread); the worker swaps it in between batches."""
        try:
            model = load_serving_model(self.cfg)
        except ModelError as e:
            self.metrics.model_reloads.labels("failed").inc()
            _LOG.error("model reload failed, keeping %s: %s", self._model_id(), e)
            return
        self._pending_model = model

    def _swap_model(self, model: StepModel) -> None:
        assert self.engine is not None
        old = self._model_id()
        try:
            decoder_ok = (
                tuple(model.manifest.pipeline.columns) == tuple(self.decoder.columns) if self.decoder else False
            )
            if not decoder_ok:
                raise ModelError(
                    f"new model reads columns {list(model.manifest.pipeline.columns)}, not the current ones"
                )
            with self._engine_lock:
                kept = self.engine.replace_model(model)
        except (ModelError, ValueError) as e:
            self.metrics.model_reloads.labels("failed").inc()
            _LOG.error("model reload failed, keeping %s: %s", old, e)
            return
        self.model = model
        self.encoder = ForecastEncoder.for_manifest(model.manifest, precision=self.cfg.output.precision or None)
        self.metrics.set_model(model.manifest, model.runtime_name, model.runtime_version)
        self.metrics.model_reloads.labels("ok").inc()
        if kept:
            _LOG.info("model reloaded: %s -> %s, stream state kept", old, model.manifest.model_id)
        else:
            _LOG.warning("model reloaded: %s -> %s, layer sizes differ: all stream state reset",
                         old, model.manifest.model_id)  # fmt: skip
        self.notifier.status(f"serving {model.manifest.model_id}")

    def _model_id(self) -> str:
        return self.model.manifest.model_id if self.model is not None else "-"

    # -- state and checkpoints ------------------------------------------------------------------

    def _restore_state(self, manifest: Manifest) -> StateTable:
        cfg = self.cfg
        directory = Path(cfg.state.dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartError(f"cannot create state.dir {directory}: {e.strerror or e}") from None
        res = ckpt.load_checkpoint(
            directory, manifest.sha256, manifest.layers, len(manifest.pipeline.columns), cfg.state.capacity
        )
        if res.table is not None:
            self.metrics.state_restores.labels("restored").inc()
            _LOG.info("state restored: %d stream(s) from %s", len(res.table), res.path)
            return res.table
        if res.status is ckpt.LoadStatus.REJECTED:
            self.metrics.state_restores.labels("rejected").inc()
            _LOG.warning("state checkpoint rejected (%s): starting cold", res.reason)
        else:
            self.metrics.state_restores.labels("cold").inc()
            _LOG.info("no usable state checkpoint (%s): starting cold", res.reason)
        return StateTable(manifest.layers, len(manifest.pipeline.columns), cfg.state.capacity)

    def _checkpointer(self) -> None:
        interval = self.cfg.state.checkpoint_interval_s
        while not self.stop_event.wait(interval):
            self._checkpoint()

    def _checkpoint(self) -> None:
        assert self.engine is not None and self.model is not None
        start = time.monotonic()
        if not self._engine_lock.acquire(timeout=CHECKPOINT_LOCK_TIMEOUT_S):
            self.metrics.checkpoint_failures.inc()
            _LOG.error("checkpoint skipped: the worker holds the state for more than %.0f s", CHECKPOINT_LOCK_TIMEOUT_S)
            return
        try:
            arrays = self.engine.table.to_arrays()
            manifest = self.model.manifest
        finally:
            self._engine_lock.release()
        try:
            saved = ckpt.save_checkpoint(arrays, Path(self.cfg.state.dir), manifest.sha256)
        except OSError as e:
            self.metrics.checkpoint_failures.inc()
            _LOG.error("checkpoint failed: %s", e)
            return
        self.metrics.checkpoint_duration.observe(time.monotonic() - start)
        self.metrics.checkpoint_size.set(saved.size)
        self.metrics.checkpoint_last_success.set(self.clock())
        _LOG.debug("checkpoint: %d stream(s), %d bytes", saved.streams, saved.size)
