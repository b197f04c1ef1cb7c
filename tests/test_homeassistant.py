"""Home Assistant discovery: exact topics and payloads, removal on eviction, the config section."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_lstm import __version__
from edge_lstm.config import ConfigError, parse_config
from edge_lstm.homeassistant import Discovery, safe_id
from edge_lstm.intervals import Intervals
from edge_lstm.modelspec import Manifest, load_manifest
from tests.support.broker import Broker
from tests.support.collector import Collector, publisher
from tests.support.daemon import DaemonProcess

REPO = Path(__file__).resolve().parent.parent
# Home Assistant's discovery topic pattern (homeassistant/components/mqtt/discovery.py, TOPIC_MATCHER).
HA_TOPIC = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")


def _manifest(with_intervals: bool = True) -> Manifest:
    m = load_manifest(REPO / "tests" / "data" / "tiny2x8")
    if not with_intervals:
        return dataclasses.replace(m, intervals=None)
    k = m.horizon
    iv = Intervals((0.8, 0.95), -np.ones((2, k)) * [[1.0], [2.0]], np.ones((2, k)) * [[1.0], [2.0]])
    return dataclasses.replace(m, intervals=iv)


def _discovery(manifest: Manifest) -> Discovery:
    return Discovery(
        manifest,
        prefix="homeassistant",
        client_id="edge-lstm-pi",
        output_topic="forecasts/{stream}",
        status_topic="edge-lstm/edge-lstm-pi/status",
    )


def test_configs_of_a_new_stream_exact_topics_and_payloads() -> None:
    d = _discovery(_manifest())
    msgs = d.on_new_stream("kitchen")
    topics = [t for t, _, _ in msgs]
    assert topics == [
        "homeassistant/sensor/edge-lstm-pi/kitchen_forecast/config",
        "homeassistant/sensor/edge-lstm-pi/kitchen_lower/config",
        "homeassistant/sensor/edge-lstm-pi/kitchen_upper/config",
        "homeassistant/binary_sensor/edge-lstm-pi/kitchen_anomaly/config",
        "homeassistant/sensor/edge-lstm-pi/kitchen_anomaly_score/config",
    ]
    assert all(retain for _, _, retain in msgs)
    assert all(HA_TOPIC.fullmatch(t.removeprefix("homeassistant/")) for t in topics)
    docs = [json.loads(p) for _, p, _ in msgs]
    device = {
        "identifiers": ["edge-lstm-pi_kitchen"],
        "name": "kitchen",
        "manufacturer": "edge-lstm",
        "model": _manifest().model_id,
        "sw_version": __version__,
    }
    common = {
        "state_topic": "forecasts/kitchen",
        "availability": [{"topic": "edge-lstm/edge-lstm-pi/status"}],
        "payload_available": "online",
        "payload_not_available": "offline",
        "has_entity_name": True,
        "device": device,
        "origin": {"name": "edge-lstm", "sw_version": __version__},
    }
    assert docs[0] == {
        **common,
        "name": "Forecast",
        "unique_id": "edge-lstm-pi_kitchen_forecast",
        "value_template": "{{ value_json.forecasts[0].value }}",
        "state_class": "measurement",
        "unit_of_measurement": "MW",
    }
    assert docs[1]["value_template"] == "{{ value_json.forecasts[0].lo95 }}"
    assert docs[1]["name"] == "Forecast lower 95 %" and docs[1]["unit_of_measurement"] == "MW"
    assert docs[2]["value_template"] == "{{ value_json.forecasts[0].hi95 }}"
    assert docs[3] == {
        **common,
        "name": "Anomaly",
        "unique_id": "edge-lstm-pi_kitchen_anomaly",
        "value_template": "{{ 'ON' if value_json.anomaly else 'OFF' }}",
        "device_class": "problem",
    }
    assert docs[4]["unique_id"] == "edge-lstm-pi_kitchen_anomaly_score" and "unit_of_measurement" not in docs[4]
    assert len({doc["unique_id"] for doc in docs}) == 5
    # Payloads are compact and key-sorted: the same stream always gives the same bytes.
    assert msgs[0][1] == json.dumps(docs[0], sort_keys=True, separators=(",", ":")).encode()


def test_each_stream_is_announced_once_and_removed_on_eviction() -> None:
    d = _discovery(_manifest())
    assert len(d.on_new_stream("a")) == 5
    assert d.on_new_stream("a") == []
    removed = d.on_evicted("a")
    assert [p for _, p, _ in removed] == [b""] * 5 and all(r for _, _, r in removed)
    assert [t for t, _, _ in removed] == [t for t, _, _ in d.configs("a")]
    assert d.on_evicted("a") == [] and d.on_evicted("never-seen") == []
    assert len(d.on_new_stream("a")) == 5  # seen again after eviction: announced again


def test_home_assistant_restart_gets_every_config_again() -> None:
    d = _discovery(_manifest())
    first = d.on_new_streams(["b", "a"])
    assert d.ha_status_topic == "homeassistant/status"
    assert sorted(d.on_ha_online()) == sorted(first)


def test_model_without_intervals_has_only_the_forecast_entity() -> None:
    msgs = _discovery(_manifest(with_intervals=False)).on_new_stream("kitchen")
    assert [t for t, _, _ in msgs] == ["homeassistant/sensor/edge-lstm-pi/kitchen_forecast/config"]


def test_stream_ids_outside_the_id_alphabet_stay_distinct_and_valid() -> None:
    assert safe_id("kitchen-2_a") == "kitchen-2_a"
    a, b = safe_id("floor 1/temp"), safe_id("floor_1_temp")
    assert a != b and re.fullmatch(r"[A-Za-z0-9_-]+", a)
    d = _discovery(_manifest())
    msgs = d.on_new_stream("floor 1.température")
    for topic, payload, _ in msgs:
        assert HA_TOPIC.fullmatch(topic.removeprefix("homeassistant/"))
        doc = json.loads(payload)
        assert doc["state_topic"] == "forecasts/floor 1.température"
        assert doc["device"]["name"] == "floor 1.température"


def test_config_section_is_opt_in_and_checked() -> None:
    c = parse_config({})
    assert c.homeassistant.enabled is False and c.homeassistant.discovery_prefix == "homeassistant"
    c = parse_config({"homeassistant": {"enabled": True, "discovery_prefix": "ha"}, "mqtt": {"client_id": "pi"}})
    d = Discovery.from_config(c, _manifest())
    assert d.on_new_stream("s")[0][0] == "ha/sensor/pi/s_forecast/config"
    for bad in ("", "ha/#", "/ha", "ha/"):
        with pytest.raises(ConfigError, match=r"homeassistant\.discovery_prefix"):
            parse_config({"homeassistant": {"discovery_prefix": bad}})
    with pytest.raises(ConfigError, match="unknown key 'prefix' in section \\[homeassistant\\]"):
        parse_config({"homeassistant": {"prefix": "ha"}})


def test_daemon_announces_streams_removes_evicted_ones_and_answers_home_assistant_on_a_real_broker(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(broker, overrides={"homeassistant": {"enabled": True}, "state": {"capacity": 1}})
    node = safe_id(d.client_id)
    with publisher(broker.host, broker.port) as pub:
        with Collector(broker.host, broker.port, ["homeassistant/#", "forecasts/#"]) as col:
            d.start()

            def send(stream: str, ts: float) -> None:
                body = json.dumps({"ts": ts, "demand_mw": 25000.0})
                pub.publish(f"sensors/{stream}/value", body, qos=1).wait_for_publish(10)

            def configs(stream: str) -> dict[str, bytes]:
                return {m.topic: m.payload for m in col.select() if f"/{node}/{stream}_" in m.topic}

            send("kitchen", 1e9)
            col.wait_for(1, "forecasts/#", timeout=20, retained=False)
            first = configs("kitchen")
            assert sorted(first) == sorted(
                f"homeassistant/{c}/{node}/kitchen_{k}/config"
                for c, k in [("sensor", "forecast"), ("sensor", "lower"), ("sensor", "upper"),
                             ("binary_sensor", "anomaly"), ("sensor", "anomaly_score")]
            )  # fmt: skip
            forecast_cfg = json.loads(first[f"homeassistant/sensor/{node}/kitchen_forecast/config"])
            assert forecast_cfg["state_topic"] == "forecasts/kitchen"
            assert forecast_cfg["availability"] == [{"topic": d.status_topic}]
            # A second stream evicts the first (capacity 1): its entities are removed (empty retained configs).
            send("garage", 1e9)
            col.wait_for(2, "forecasts/#", timeout=20, retained=False)
            deadline = time.monotonic() + 10
            while any(configs("kitchen").values()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert configs("kitchen") and not any(configs("kitchen").values())
            assert len(configs("garage")) == 5
            # Home Assistant restarts and announces itself: the daemon sends its configs again.
            col.clear()
            pub.publish("homeassistant/status", "online", qos=1).wait_for_publish(10)
            deadline = time.monotonic() + 10
            while len(configs("garage")) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(configs("garage")) == 5 and not configs("kitchen")
            # A burst of `online`s right after: answered once more, when the last answer is 5 s old, not per message.
            for _ in range(20):
                pub.publish("homeassistant/status", "online", qos=1).wait_for_publish(10)
            time.sleep(7)
            sent = [m for m in col.select() if f"/{node}/garage_" in m.topic]
            assert len(sent) == 10, len(sent)
            assert d.terminate() == 0
        # The retained configs stay on the broker for Home Assistant, the evicted stream's are gone.
        with Collector(broker.host, broker.port, ["homeassistant/#"]) as col:
            kept = {m.topic for m in col.wait_for(5, timeout=10)}
            assert all(f"/{node}/garage_" in t for t in kept), kept

