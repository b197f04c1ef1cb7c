"""Reliability 1: the broker restarts mid-stream; no reading is silently lost."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess
from tests.support.faults import PersistentClient, record, reliability_report  # noqa: F401

pytestmark = pytest.mark.usefixtures("reliability_report")

READINGS = 400
RESTART_AT = 200


def _wait_accounted(d: DaemonProcess, at_least: float, timeout: float = 30.0) -> tuple[float, dict[str, float]]:
    """Wait until every received reading has an outcome and at least ``at_least`` were received."""
    deadline = time.monotonic() + timeout
    received, outcomes = 0.0, {}
    while time.monotonic() < deadline:
        received = d.metric("edge_lstm_readings_received_total")
        outcomes = d.outcomes()
        if received >= at_least and sum(outcomes.values()) == received:
            return received, outcomes
        time.sleep(0.1)
    return received, outcomes


def test_broker_restart_mid_stream_loses_no_reading(
    broker_factory: Callable[..., Broker],
    daemon_factory: Callable[..., DaemonProcess],
    taylor_series: tuple[np.ndarray, np.ndarray],
) -> None:
    broker = broker_factory(persistence=True).start()
    d = daemon_factory(broker).start()
    sink = PersistentClient(broker.host, broker.port, ["forecasts/#"], client_id="rel1-sink")
    source = PersistentClient(broker.host, broker.port, client_id="rel1-source")
    ts, values = taylor_series
    ts, values = ts[1000 : 1000 + READINGS], values[1000 : 1000 + READINGS]

    restarted = threading.Event()

    def restart() -> None:
        broker.stop()  # SIGTERM: Mosquitto writes its persistence file
        time.sleep(0.5)  # readings keep being published into paho's queue meanwhile
        broker.start()
        restarted.set()

    restarter: threading.Thread | None = None
    for i, (t, v) in enumerate(zip(ts, values, strict=True)):
        if i == RESTART_AT:
            restarter = threading.Thread(target=restart)
            restarter.start()
        source.publish("sensors/plant/value", json.dumps({"ts": float(t), "demand_mw": float(v)}).encode())
        time.sleep(0.004)
    assert restarter is not None
    restarter.join(30)
    assert restarted.is_set() and broker.starts == 2

    assert source.wait(acked=READINGS, timeout=60), f"publisher: {source.acked}/{READINGS} acknowledged"
    received, outcomes = _wait_accounted(d, READINGS)
    assert sink.wait(messages=int(outcomes.get("processed", 0)), timeout=60)
    time.sleep(0.5)  # a late redelivered duplicate would show up here
    received, outcomes = _wait_accounted(d, READINGS)
    source.close()
    sink.close()

    forecast_ts = [json.loads(p)["ts_epoch"] for _t, p in sink.messages]
    distinct = set(forecast_ts)
    reconnects = d.metric("edge_lstm_mqtt_reconnects_total")
    redelivered = received - READINGS
    counted_dupes = outcomes.get("duplicate", 0) + outcomes.get("late", 0)

    processed = outcomes.get("processed", 0)
    published_ts = {float(t) for t in ts}
    assert reconnects >= 1, d.log()
    assert sum(outcomes.values()) == received
    # every forecast belongs to a published reading, and every processed reading reached the subscriber
    assert distinct <= published_ts
    assert len(distinct) == processed, (len(distinct), processed)
    # the rest of what was published, and every redelivery, is in a counter: nothing silently lost
    unforecast = READINGS - len(distinct)
    assert counted_dupes == unforecast + redelivered, ({k: v for k, v in outcomes.items() if v}, received)
    others = {k: v for k, v in outcomes.items() if k not in ("processed", "duplicate", "late") and v}
    assert not others, others
    assert d.terminate() == 0

    record("1", "readings published (QoS 1, persistent session), broker restarted after", f"{READINGS}, {RESTART_AT}")
    record("1", "daemon reconnects", int(reconnects), ">= 1, by itself")
    record("1", "readings received by the daemon (incl. redeliveries)", int(received), "= sum of outcome counters")
    record("1", "processed (forecast published)", int(processed), "= distinct forecasts seen by the subscriber")
    record("1", "distinct readings forecast, seen by a persistent-session subscriber", len(distinct), "= processed")
    record("1", "forecast messages received (incl. re-sent ones)", len(forecast_ts), ">= processed")
    record("1", "readings re-sent by the broker or the publisher", int(redelivered), "= received - published")
    record("1", "readings the publisher's client re-sent after newer ones (counted late)",
           int(outcomes.get("late", 0)), "-")  # fmt: skip
    record("1", "duplicate + late", int(counted_dupes), "= (published - forecast) + re-sent")
    record("1", "readings lost silently", 0, "published = forecast + counted, exactly")
