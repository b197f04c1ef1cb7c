"""Home Assistant MQTT discovery for forecast streams (pure: builds topics and payloads, sends nothing).

With ``[homeassistant] enabled = true`` the daemon announces every stream the
first time it forecasts it, as one Home Assistant device with these entities:

``sensor``         the next-tick forecast (``forecasts[0].value``)
``sensor`` x 2     its lower and upper bound at the widest interval level (models with intervals)
``binary_sensor``  whether the last reading lay outside the 1-step interval (``anomaly``)
``sensor``         how far outside, in interval widths (``anomaly_score``)

All of them read the stream's forecast topic through a ``value_template``, and
are available while the daemon's status topic says ``online``.  Following
Home Assistant's conventions, a config is published retained to
``<prefix>/<component>/<node_id>/<object_id>/config``, where ``node_id`` is the
daemon's client id and ``object_id`` the stream id (both reduced to
``[A-Za-z0-9_-]``, with a hash suffix when that changed the id, so two streams
never share one); an empty retained config removes the entity.  Configs are
sent again when Home Assistant announces itself (``<prefix>/status`` =
``online``).  The messages are listed in ``docs/formats.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from edge_lstm import __version__
from edge_lstm.config import Config
from edge_lstm.intervals import bound_keys, level_label
from edge_lstm.modelspec import Manifest

STREAM_PLACEHOLDER = "{stream}"
QOS = 1  # discovery configs are retained, at QoS 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

Message = tuple[str, bytes, bool]  # (topic, payload, retain)


def safe_id(text: str) -> str:
    """``text`` reduced to Home Assistant's id characters; a short hash is added when anything changed."""
    clean = _UNSAFE.sub("_", text)
    if clean == text and clean:
        return clean
    return f"{clean}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclasses.dataclass(frozen=True)
class Entity:
    """One discovered entity of a stream: its component, id suffix and config payload."""

    component: str
    key: str
    config: dict[str, Any]


class Discovery:
    """Discovery configs for the streams of one daemon.

    ``output_topic`` is the forecast topic template (``{stream}`` in it),
    ``status_topic`` the daemon's retained ``online``/``offline`` topic and
    ``client_id`` its MQTT client id.  It remembers which streams it
    announced, so :meth:`on_new_stream` is cheap to call for every forecast.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        prefix: str,
        client_id: str,
        output_topic: str,
        status_topic: str,
    ) -> None:
        self.prefix = prefix
        self.node_id = safe_id(client_id)
        self.output_topic = output_topic
        self.status_topic = status_topic
        self.announced: set[str] = set()
        self._units = manifest.target_units
        self._model = manifest.model_id
        iv = manifest.intervals
        self._bounds = bound_keys(iv.check_level) if iv is not None else None
        self._level = level_label(iv.check_level) if iv is not None else ""

    @classmethod
    def from_config(cls, cfg: Config, manifest: Manifest) -> Discovery:
        return cls(
            manifest,
            prefix=cfg.homeassistant.discovery_prefix,
            client_id=cfg.mqtt.client_id,
            output_topic=cfg.output.topic,
            status_topic=cfg.status_topic,
        )

    @property
    def ha_status_topic(self) -> str:
        """Where Home Assistant publishes ``online`` when it (re)starts: subscribe and call :meth:`on_ha_online`."""
        return f"{self.prefix}/status"

    # -- events -----------------------------------------------------------------------------------

    def on_new_stream(self, stream: str) -> list[Message]:
        """The configs of ``stream`` the first time it is seen, else nothing."""
        if stream in self.announced:
            return []
        self.announced.add(stream)
        return self.configs(stream)

    def on_evicted(self, stream: str) -> list[Message]:
        """Empty retained configs that remove ``stream``'s entities (nothing if it was not announced)."""
        if stream not in self.announced:
            return []
        self.announced.discard(stream)
        return [(self.config_topic(stream, e), b"", True) for e in self.entities(stream)]

    def on_ha_online(self) -> list[Message]:
        """Every announced stream's configs again (Home Assistant restarted and asks for them)."""
        return [m for s in sorted(self.announced) for m in self.configs(s)]

    def on_new_streams(self, streams: Iterable[str]) -> list[Message]:
        return [m for s in streams for m in self.on_new_stream(s)]

    # -- payloads ---------------------------------------------------------------------------------

    def config_topic(self, stream: str, entity: Entity) -> str:
        return f"{self.prefix}/{entity.component}/{self.node_id}/{safe_id(stream)}_{entity.key}/config"

    def configs(self, stream: str) -> list[Message]:
        return [
            (self.config_topic(stream, e), json.dumps(e.config, sort_keys=True, separators=(",", ":")).encode(), True)
            for e in self.entities(stream)
        ]

    def entities(self, stream: str) -> list[Entity]:
        sid = safe_id(stream)
        base_id = f"{self.node_id}_{sid}"
        common: dict[str, Any] = {
            "state_topic": self.output_topic.replace(STREAM_PLACEHOLDER, stream),
            "availability": [{"topic": self.status_topic}],
            "payload_available": "online",
            "payload_not_available": "offline",
            "has_entity_name": True,
            "device": {
                "identifiers": [base_id],
                "name": stream,
                "manufacturer": "edge-lstm",
                "model": self._model,
                "sw_version": __version__,
            },
            "origin": {"name": "edge-lstm", "sw_version": __version__},
        }
        numeric: dict[str, Any] = {"state_class": "measurement"}
        if self._units:
            numeric["unit_of_measurement"] = self._units

        def entity(component: str, key: str, name: str, template: str, **more: Any) -> Entity:
            cfg = {**common, "name": name, "unique_id": f"{base_id}_{key}", "value_template": template, **more}
            return Entity(component, key, cfg)

        out = [entity("sensor", "forecast", "Forecast", "{{ value_json.forecasts[0].value }}", **numeric)]
        if self._bounds is not None:
            lo, hi = self._bounds
            out += [
                entity("sensor", "lower", f"Forecast lower {self._level} %",
                       f"{{{{ value_json.forecasts[0].{lo} }}}}", **numeric),
                entity("sensor", "upper", f"Forecast upper {self._level} %",
                       f"{{{{ value_json.forecasts[0].{hi} }}}}", **numeric),
                entity("binary_sensor", "anomaly", "Anomaly",
                       "{{ 'ON' if value_json.anomaly else 'OFF' }}", device_class="problem"),
                entity("sensor", "anomaly_score", "Anomaly score",
                       "{{ value_json.anomaly_score if value_json.anomaly_score is not none else 0 }}",
                       state_class="measurement"),
            ]  # fmt: skip
        return out
