"""The daemon's metrics: every name of the shared contract is registered, with its type and labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_lstm.metrics import STREAM_ERROR_WINDOW, Metrics, trained_mae
from edge_lstm.modelspec import load_manifest
from edge_lstm.outcomes import Outcome
from tests.support.daemon import TAYLOR_MODEL

CONTRACT = {
    "edge_lstm_readings_received": "counter",
    "edge_lstm_readings": "counter",
    "edge_lstm_forecasts_published": "counter",
    "edge_lstm_publish_failures": "counter",
    "edge_lstm_latency_seconds": "histogram",
    "edge_lstm_inference_seconds": "histogram",
    "edge_lstm_batch_size": "histogram",
    "edge_lstm_queue_depth": "gauge",
    "edge_lstm_queue_capacity": "gauge",
    "edge_lstm_streams_active": "gauge",
    "edge_lstm_streams_capacity": "gauge",
    "edge_lstm_stream_evictions": "counter",
    "edge_lstm_state_resets": "counter",
    "edge_lstm_anomaly_checks": "counter",
    "edge_lstm_anomalies": "counter",
    "edge_lstm_forecast_abs_error": "histogram",
    "edge_lstm_forecast_trained_mae": "gauge",
    "edge_lstm_stream_abs_error": "gauge",
    "edge_lstm_mqtt_connected": "gauge",
    "edge_lstm_mqtt_reconnects": "counter",
    "edge_lstm_mqtt_last_message_timestamp_seconds": "gauge",
    "edge_lstm_checkpoint_duration_seconds": "histogram",
    "edge_lstm_checkpoint_size_bytes": "gauge",
    "edge_lstm_checkpoint_last_success_timestamp_seconds": "gauge",
    "edge_lstm_checkpoint_failures": "counter",
    "edge_lstm_state_restores": "counter",
    "edge_lstm_model_reloads": "counter",
    "edge_lstm_model_info": "gauge",  # an Info; the text format exposes it as a gauge
    "edge_lstm_build_info": "gauge",
}


def families(registry: CollectorRegistry) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_every_contract_metric_is_registered_with_its_type() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    manifest = load_manifest(TAYLOR_MODEL)
    m.set_model(manifest, "ai-edge-litert", "2.3.0")
    fams = families(reg)
    for name, kind in CONTRACT.items():
        assert name in fams, name
        assert fams[name].type == kind, name  # type: ignore[attr-defined]
    assert any(n.startswith("process_") for n in fams) and any(n.startswith("python_") for n in fams)
    # every outcome is exported from the start, so sums and rates work on the first scrape
    labels = {s.labels["outcome"] for s in fams["edge_lstm_readings"].samples}  # type: ignore[attr-defined]
    assert labels == {o.value for o in Outcome}
    info = reg.get_sample_value(
        "edge_lstm_model_info",
        {
            "model": manifest.model_id, "name": manifest.name, "sha256": manifest.sha256,
            "quantization": manifest.quantization.value, "runtime": "ai-edge-litert", "runtime_version": "2.3.0",
            "horizon": str(manifest.horizon), "layers": ",".join(map(str, manifest.layers)),
        },
    )  # fmt: skip
    assert info == 1
    mae = trained_mae(manifest)
    assert mae is not None and mae > 0
    assert reg.get_sample_value("edge_lstm_forecast_trained_mae", {"model": manifest.model_id}) == mae
    bounds = [s.labels["le"] for s in fams["edge_lstm_batch_size"].samples if s.name.endswith("_bucket")]  # type: ignore[attr-defined]
    assert bounds[:3] == ["1.0", "2.0", "4.0"] and "1024.0" in bounds


def test_stream_error_labels_are_capped_and_rolling() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, max_stream_labels=2, process_collectors=False)
    m.abs_errors("mdl", [("a", 1.0), ("b", 2.0), ("c", 3.0)])
    for _ in range(STREAM_ERROR_WINDOW):
        m.abs_errors("mdl", [("a", 5.0)])
    assert reg.get_sample_value("edge_lstm_stream_abs_error", {"stream": "a"}) == 5.0  # old value rolled out
    assert reg.get_sample_value("edge_lstm_stream_abs_error", {"stream": "b"}) == 2.0
    assert reg.get_sample_value("edge_lstm_stream_abs_error", {"stream": "c"}) is None  # beyond the cap
    assert reg.get_sample_value("edge_lstm_forecast_abs_error_count", {"model": "mdl"}) == 3 + STREAM_ERROR_WINDOW


def test_the_metrics_server_bounds_its_connections_and_drops_silent_clients() -> None:
    import socket
    import time
    import urllib.request

    from edge_lstm.metrics import MetricsServer

    registry = CollectorRegistry()
    Metrics(registry)
    server = MetricsServer(registry, "127.0.0.1", 0, max_connections=3, timeout=0.5)
    server.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        time.sleep(0.1)  # the three hold every slot, sending nothing
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(2)
        assert extra.recv(1) == b""  # closed at once, not queued behind them
        assert server.refused == 1
        for s in idle:  # each is dropped once silent for the timeout, which frees its thread and slot
            s.settimeout(3)
            assert s.recv(1) == b""
        with urllib.request.urlopen(server.url, timeout=5) as r:
            assert b"edge_lstm_readings_received_total" in r.read()
        for s in [*idle, extra]:
            s.close()
    finally:
        server.stop()
