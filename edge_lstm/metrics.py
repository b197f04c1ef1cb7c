"""Prometheus metrics of the daemon, created on a registry passed in.

The names are a contract with the Grafana dashboard and the alert rules in
``deploy/``; ``docs/metrics.md`` lists them.  Code updates them where the work
happens (the MQTT callbacks, the worker, the checkpointer) through the
attributes of :class:`Metrics`; nothing here polls or parses.

``edge_lstm_readings_received_total`` equals the sum of
``edge_lstm_readings_total`` over its ``outcome`` label once the queue is
drained: every reading ends in exactly one :class:`~edge_lstm.outcomes.Outcome`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import socket
import socketserver
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from edge_lstm import __version__
from edge_lstm.engine import BatchResult
from edge_lstm.histogram import BatchHistogram, RollingMeanGauge
from edge_lstm.modelspec import Manifest
from edge_lstm.outcomes import Outcome

_LOG = logging.getLogger(__name__)

NAMESPACE = "edge_lstm"
DEFAULT_PORT = 9745
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_INFERENCE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ..., 1024
_CHECKPOINT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Absolute errors span the target's units: a wide log scale.
_ERROR_BUCKETS = tuple(m * 10.0**e for e in range(-3, 6) for m in (1.0, 2.5, 5.0))
STREAM_ERROR_WINDOW = 32  # readings in the rolling mean of edge_lstm_stream_abs_error
RESET_REASONS = ("gap", "model_change")
RESTORE_RESULTS = ("restored", "cold", "rejected")
RELOAD_RESULTS = ("ok", "failed")
ANOMALY_DIRECTIONS = ("high", "low")


class Metrics:
    """All metrics of one daemon, registered on ``registry``.

    ``process_collectors`` adds the default ``process_*``, ``python_*`` and GC
    collectors to the registry (the default registry already has them).
    """

    def __init__(self, registry: CollectorRegistry, *, max_stream_labels: int = 100, process_collectors: bool = True):
        self.registry = registry
        ns = NAMESPACE
        r = registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.received = Counter(
            "readings_received", "Readings received (an array body of n readings counts n)", namespace=ns, registry=r
        )
        self.readings = Counter(
            "readings", "What became of each reading received, by outcome", ["outcome"], namespace=ns, registry=r
        )
        for o in Outcome:  # export zeros, so rates and sums work from the first scrape
            self.readings.labels(o.value)
        self._outcome_children = {o: self.readings.labels(o.value) for o in Outcome}
        self.forecasts_published = Counter(
            "forecasts_published",
            "Forecasts the broker acknowledged (QoS 1) or that were written to the socket (QoS 0)",
            namespace=ns,
            registry=r,
        )
        self.publish_failures = Counter(
            "publish_failures",
            "Forecasts that could not be published or that the broker refused",
            namespace=ns,
            registry=r,
        )
        self.forecasts_redelivered = Counter(
            "forecasts_redelivered",
            "Forecasts made from messages the broker delivered again after a crash (a subscriber may see them twice)",
            namespace=ns,
            registry=r,
        )
        self.messages_redelivered = Counter(
            "messages_redelivered",
            "Messages the broker delivered again that were already in the state: acknowledged, not processed twice",
            namespace=ns,
            registry=r,
        )
        self.journal_commits = Counter(
            "journal_commits", "Group commits of the journal (one write and one sync each)", namespace=ns, registry=r
        )
        self.journal_bytes = Counter("journal_bytes", "Bytes written to the journal", namespace=ns, registry=r)
        self.journal_failures = Counter(
            "journal_failures",
            "Journal writes that failed (the acknowledgements wait and are retried)",
            namespace=ns,
            registry=r,
        )
        self.journal_dropped_bytes = Counter(
            "journal_dropped_bytes",
            "Bytes of the journal found at start that could not be replayed (a write cut short by a crash, damage, "
            "or another model's journal; the file as found is kept as journal.wal.damaged)",
            namespace=ns,
            registry=r,
        )
        # The histograms the worker updates for every batch take a batch of values at once.
        self.latency = BatchHistogram(
            "latency_seconds",
            "Reading received to forecast published",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.inference = BatchHistogram(
            "inference_seconds", "One batched model step", namespace=ns, registry=r, buckets=_INFERENCE_BUCKETS
        )
        self.batch_size = BatchHistogram(
            "batch_size", "Readings per batched model step", namespace=ns, registry=r, buckets=_BATCH_BUCKETS
        )
        self.queue_depth = Gauge("queue_depth", "Readings waiting in the intake queue", namespace=ns, registry=r)
        self.queue_capacity = Gauge("queue_capacity", "Bound of the intake queue", namespace=ns, registry=r)
        self.streams_active = Gauge("streams_active", "Streams held in the state table", namespace=ns, registry=r)
        self.streams_capacity = Gauge("streams_capacity", "Capacity of the state table", namespace=ns, registry=r)
        self.evictions = Counter(
            "stream_evictions", "Streams evicted (least recently seen) to make room", namespace=ns, registry=r
        )
        self.state_resets = Counter(
            "state_resets", "Stream state resets by reason", ["reason"], namespace=ns, registry=r
        )
        for reason in RESET_REASONS:
            self.state_resets.labels(reason)
        # Readings checked against the previous tick's 1-step interval (models with intervals), and those
        # outside it: the anomaly rate is the ratio of their rates.
        self.anomaly_checks = Counter(
            "anomaly_checks",
            "Readings checked against the previous tick's 1-step prediction interval (widest level)",
            namespace=ns,
            registry=r,
        )
        self.anomalies = Counter(
            "anomalies",
            "Readings outside the previous tick's 1-step prediction interval, above (high) or below (low) it",
            ["direction"],
            namespace=ns,
            registry=r,
        )
        self._anomaly_children = {d: self.anomalies.labels(d) for d in ANOMALY_DIRECTIONS}
        self.forecast_abs_error = BatchHistogram(
            "forecast_abs_error",
            "Absolute 1-step forecast error in the target's units",
            ["model"],
            namespace=ns,
            registry=r,
            buckets=_ERROR_BUCKETS,
        )
        self.forecast_trained_mae = Gauge(
            "forecast_trained_mae",
            "The model's hold-out 1-step MAE from its manifest (target units)",
            ["model"],
            namespace=ns,
            registry=r,
        )
        self.stream_abs_error = RollingMeanGauge(
            "stream_abs_error",
            f"Rolling mean ({STREAM_ERROR_WINDOW} readings) of the 1-step absolute error, for a capped set of streams",
            "stream",
            namespace=ns,
            window=STREAM_ERROR_WINDOW,
            max_series=max_stream_labels,
            registry=r,
        )
        self.mqtt_connected = Gauge("mqtt_connected", "1 while connected to the broker", namespace=ns, registry=r)
        self.mqtt_reconnects = Counter(
            "mqtt_reconnects", "Connections to the broker after the first", namespace=ns, registry=r
        )
        self.mqtt_last_message = Gauge(
            "mqtt_last_message_timestamp_seconds",
            "Time the last input message arrived",
            namespace=ns,
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "checkpoint_duration_seconds",
            "Time to write one checkpoint",
            namespace=ns,
            registry=r,
            buckets=_CHECKPOINT_BUCKETS,
        )
        self.checkpoint_size = Gauge(
            "checkpoint_size_bytes", "Size of the last checkpoint written", namespace=ns, registry=r
        )
        self.checkpoint_last_success = Gauge(
            "checkpoint_last_success_timestamp_seconds",
            "Time of the last successful checkpoint",
            namespace=ns,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "checkpoint_failures", "Checkpoints that could not be written", namespace=ns, registry=r
        )
        self.state_restores = Counter(
            "state_restores", "State restores at start, by result", ["result"], namespace=ns, registry=r
        )
        for result in RESTORE_RESULTS:
            self.state_restores.labels(result)
        self.model_reloads = Counter(
            "model_reloads", "Model reloads (SIGHUP), by result", ["result"], namespace=ns, registry=r
        )
        for result in RELOAD_RESULTS:
            self.model_reloads.labels(result)
        self.model_info = Info("model", "The model being served", namespace=ns, registry=r)
        self.build_info = Info("build", "edge-lstm build", namespace=ns, registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        self._model_id = ""

    # -- updates at the point of work ----------------------------------------------------------

    def outcome(self, outcome: Outcome, n: int = 1) -> None:
        if n:
            self._outcome_children[outcome].inc(n)

    def outcomes(self, counts: Iterable[tuple[Outcome, int]]) -> None:
        for outcome, n in counts:
            self.outcome(outcome, n)

    def record_batch(self, result: BatchResult, done: float, streams_active: int) -> None:
        """Everything one batch changes: outcomes, latency, errors, batch size, state table size.

        ``done`` is the ``time.monotonic()`` when its forecasts were handed to
        the MQTT client (they count as published once the broker acknowledges them).
        """
        if result.forecasts:
            self.latency.observe_many([done - f.received for f in result.forecasts])
        self.outcomes(result.outcomes.items())
        for reason, n in result.resets.items():
            self.state_resets.labels(reason).inc(n)
        if result.abs_errors and self._model_id:
            self.abs_errors(self._model_id, result.abs_errors)
        if result.evictions:
            self.evictions.inc(result.evictions)
        if result.anomaly_checks:
            self.anomaly_checks.inc(result.anomaly_checks)
            for direction, n in result.anomalies.items():
                self._anomaly_children[direction].inc(n)
        self.inference.observe(result.inference_seconds)
        self.batch_size.observe_many(result.step_sizes)
        self.streams_active.set(streams_active)

    def set_model(self, manifest: Manifest, runtime_name: str, runtime_version: str) -> None:
        """Publish the model's identity and its trained error (on start and after each reload)."""
        old = self._model_id
        self._model_id = manifest.model_id
        self.model_info.info(
            {
                "model": manifest.model_id,
                "name": manifest.name,
                "sha256": manifest.sha256,
                "quantization": manifest.quantization.value,
                "runtime": runtime_name,
                "runtime_version": runtime_version,
                "horizon": str(manifest.horizon),
                "layers": ",".join(str(n) for n in manifest.layers),
            }
        )
        if old and old != manifest.model_id:
            with contextlib.suppress(KeyError):
                self.forecast_trained_mae.remove(old)
        mae = trained_mae(manifest)
        if mae is not None:
            self.forecast_trained_mae.labels(manifest.model_id).set(mae)
        self.forecast_abs_error.labels(manifest.model_id)

    def abs_errors(self, model_id: str, errors: Sequence[tuple[str, float]]) -> None:
        """Record 1-step absolute errors: the per-model histogram and capped per-stream rolling means."""
        self.forecast_abs_error.labels(model_id).observe_many([e for _, e in errors])
        self.stream_abs_error.add(errors)


def trained_mae(manifest: Manifest) -> float | None:
    """The hold-out 1-step MAE of the model as recorded by the converter, if the manifest has it."""
    extra = manifest.extra
    candidates: list[object] = []
    metrics = extra.get("metrics")
    if isinstance(metrics, dict):
        candidates += [metrics.get("holdout_mae_1"), metrics.get("mae_1"), metrics.get("holdout_mae")]
        hold = metrics.get("holdout")
        if isinstance(hold, dict):
            mae = hold.get("mae")
            if isinstance(mae, dict):
                mae = mae.get("model")
            candidates.append(mae)
    candidates += [extra.get("holdout_mae_1"), extra.get("trained_mae")]
    for c in candidates:
        if isinstance(c, list) and c:
            c = c[0]
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0:
            return float(c)
    return None


class _QuietHandler(WSGIRequestHandler):
    """A request handler that logs nothing and gives up on a client silent for ``timeout`` seconds."""

    timeout = 10.0  # socket timeout while reading a request: a client that never finishes it frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` at once: a connection beyond them is closed at once.

    prometheus-client's own server starts a thread for every connection without a bound, so
    idle or half-sent requests (300 idle connections: 305 threads) pile up in the daemon.
    """

    daemon_threads = True
    max_connections = 64

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or hung up: nothing to report (the base class prints a traceback).
        _LOG.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """The HTTP endpoint serving ``registry`` at ``http://BIND:PORT/metrics``."""

    def __init__(
        self, registry: CollectorRegistry, bind: str, port: int, *, max_connections: int = 64, timeout: float = 10.0
    ) -> None:
        self._registry = registry
        self._bind = bind
        self._port = port
        self._max_connections = max_connections
        self._timeout = timeout
        self._server: _BoundedServer | None = None
        self._thread: threading.Thread | None = None

    def _listen(self) -> _BoundedServer:
        """The HTTP server, bound and listening (raises ``OSError`` when the address cannot be taken)."""
        infos = socket.getaddrinfo(self._bind, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0] if infos else socket.AF_INET
        server_class = type(
            "MetricsHttpServer", (_BoundedServer,), {"address_family": family, "max_connections": self._max_connections}
        )
        handler = type("MetricsHandler", (_QuietHandler,), {"timeout": self._timeout})
        return make_server(  # type: ignore[return-value]
            self._bind, self._port, make_wsgi_app(self._registry), server_class, handler
        )

    def check_address(self) -> None:
        """Bind the address as :meth:`start` would, and let go at once (``OSError`` when it cannot)."""
        self._listen().server_close()

    def start(self) -> None:
        server = self._listen()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        _LOG.info("metrics at %s", self.url)

    @property
    def refused(self) -> int:
        """Connections closed at once because ``max_connections`` were open."""
        return self._server.refused if self._server is not None else 0

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self._bind}]" if ":" in self._bind else self._bind
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
