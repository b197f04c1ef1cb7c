"""The daemon's TOML configuration: schema, validation, secrets and reference docs.

Every section is a dataclass and every field carries a description; the same
schema parses the file, checks it, prints it (secrets as ``***``) and generates
``docs/configuration.md`` (``edge-lstm config-docs``), so the reference cannot
drift from the code.

Loading is strict: an unknown key or section is an error naming it, types are
checked (no silent coercion), and rules across fields are checked after the
fields themselves.  Secrets are resolved once, at load: ``password_env`` names
an environment variable, ``password_file`` a file (``$CREDENTIALS_DIRECTORY`` is
expanded, for systemd's ``LoadCredential=``).  Relative paths are relative to
the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import re
import socket
import ssl
import stat
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edge_lstm.payload import DEFAULT_MAX_ABS_VALUE, MAX_STREAM_ID_LEN
from edge_lstm.runtime import Runtime
from edge_lstm.ticks import MAX_GAP_TICKS

_LOG = logging.getLogger(__name__)

STREAM_PLACEHOLDER = "{stream}"
REDACTED = "***"
_CRED_VAR = re.compile(r"\$(?:\{CREDENTIALS_DIRECTORY\}|CREDENTIALS_DIRECTORY\b)")
_HOST_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_TOPIC_BYTES = 65_535  # MQTT: a topic is a UTF-8 string of at most 65,535 bytes
MAX_SESSION_EXPIRY_S = 0xFFFF_FFFF  # MQTT 5: a four-byte interval (this value: the session never expires)
MAX_DRAIN_TIMEOUT_S = 86_400.0
MAX_THREADS = 256
# Characters a broker refuses in a topic or client id: MQTT forbids U+0000; Mosquitto (2.0) also drops a client
# that sends a control character, a Unicode non-character or a lone surrogate in one ("Malformed packet").
_NONCHARACTERS = "".join(chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF))
_REFUSED_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ud800-\udfff" + _NONCHARACTERS + "]")
# Discovery topics add to their prefix: /<component>/<client id, reduced>/<stream id>_<key>/config.
_DISCOVERY_TOPIC_RESERVE = 300


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key and the problem."""


class MqttProtocol(str, enum.Enum):
    """MQTT protocol version spoken to the broker."""

    V5 = "5"
    V311 = "3.1.1"


class RetainedPolicy(str, enum.Enum):
    """What the daemon does with retained input messages (sent again on every subscribe)."""

    IGNORE = "ignore"
    PROCESS = "process"


class LogLevel(str, enum.Enum):
    """Lowest level of log lines written to stderr."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def as_logging(self) -> int:
        return int(getattr(logging, self.name))


def _doc(doc: str, *, secret: bool = False, example: str | None = None) -> dict[str, Any]:
    """Field metadata: the description used by the generated docs, and whether the value is secret."""
    return {"doc": doc, "secret": secret, "example": example}


@dataclasses.dataclass
class ModelConfig:
    """The forecasting model."""

    path: str = dataclasses.field(
        default="models/taylor", metadata=_doc("Model directory holding `manifest.json` and `model.tflite`.")
    )
    runtime: Runtime = dataclasses.field(
        default=Runtime.AUTO,
        metadata=_doc(
            "Interpreter package: `auto` (ai-edge-litert, else tflite-runtime), `ai-edge-litert` or `tflite-runtime`."
        ),
    )
    threads: int = dataclasses.field(
        default=1, metadata=_doc("Interpreter threads for one batched model step (1..256).")
    )


@dataclasses.dataclass
class MqttConfig:
    """Connection to the MQTT broker."""

    host: str = dataclasses.field(default="localhost", metadata=_doc("Broker host name or address."))
    port: int = dataclasses.field(default=1883, metadata=_doc("Broker port (usually 1883, or 8883 with TLS)."))
    client_id: str = dataclasses.field(
        default="edge-lstm-{hostname}",
        metadata=_doc(
            "Client id; keep it stable so the broker keeps the persistent session (QoS 1 readings queued "
            "while the daemon is away). `{hostname}` is replaced by the machine's host name."
        ),
    )
    protocol: MqttProtocol = dataclasses.field(
        default=MqttProtocol.V5, metadata=_doc('MQTT protocol version: `"5"` or `"3.1.1"`.')
    )
    keepalive: int = dataclasses.field(default=30, metadata=_doc("Keepalive interval in seconds."))
    session_expiry_s: int = dataclasses.field(
        default=86400,
        metadata=_doc(
            "MQTT 5 session expiry interval: how long the broker keeps the session while disconnected "
            "(0..4294967295; the largest: never expires)."
        ),
    )
    username: str = dataclasses.field(default="", metadata=_doc("User name; empty for anonymous access."))
    password: str = dataclasses.field(
        default="",
        metadata=_doc(
            "Password written in this file (discouraged: prefer `password_env` or `password_file`; the "
            "daemon warns when a file holding a password is readable by everyone).",
            secret=True,
        ),
    )
    password_env: str = dataclasses.field(
        default="", metadata=_doc("Name of an environment variable holding the password.")
    )
    password_file: str = dataclasses.field(
        default="",
        metadata=_doc(
            "File holding the password (trailing newline ignored); `$CREDENTIALS_DIRECTORY/mqtt-password` works "
            "with systemd's `LoadCredential=`."
        ),
    )
    tls: bool = dataclasses.field(default=False, metadata=_doc("Connect with TLS."))
    ca_file: str = dataclasses.field(
        default="", metadata=_doc("CA certificate(s) to verify the broker; empty uses the system's trust store.")
    )
    cert_file: str = dataclasses.field(
        default="", metadata=_doc("Client certificate for TLS client authentication (needs `key_file`).")
    )
    key_file: str = dataclasses.field(default="", metadata=_doc("Private key of `cert_file`."))
    tls_insecure: bool = dataclasses.field(
        default=False, metadata=_doc("Skip the broker host name check. For tests only.")
    )
    reconnect_min_s: int = dataclasses.field(
        default=1,
        metadata=_doc(
            "First reconnect delay in seconds; doubles on each failure, and on each connection lost within 10 s "
            "of connecting (another client with this id, a refused packet)."
        ),
    )
    reconnect_max_s: int = dataclasses.field(
        default=30, metadata=_doc("Longest reconnect delay in seconds (at most 3600).")
    )
    status_topic: str = dataclasses.field(
        default="edge-lstm/{client_id}/status",
        metadata=_doc("Retained status topic: `online` once ready, `offline` on exit and as the last will."),
    )


@dataclasses.dataclass
class InputConfig:
    """Where readings come from and how they are read."""

    topics: list[str] = dataclasses.field(
        default_factory=lambda: ["sensors/{stream}/value"],
        metadata=_doc(
            "Topic filters to subscribe to (QoS 1). `{stream}` marks the level holding the stream id; "
            "`+` and `#` are allowed elsewhere. Filters must not overlap (the broker would deliver a message once "
            "per filter it matches, and its readings would count twice) nor match `output.topic` (for every stream), "
            "`mqtt.status_topic` or, with discovery on, topics under the discovery prefix (the daemon would read its "
            "own messages): both are refused at start."
        ),
    )
    stream_field: str = dataclasses.field(
        default="",
        metadata=_doc("Take the stream id from this JSON field instead of the topic (the topic is the fallback)."),
    )
    fields: dict[str, str] = dataclasses.field(
        default_factory=lambda: {},
        metadata=_doc(
            "Model column -> payload field name (default: the column's own name). A bare number feeds a "
            "single-column model.",
            example='{ demand_mw = "value" }',
        ),
    )
    timestamp_fields: list[str] = dataclasses.field(
        default_factory=lambda: ["ts", "timestamp", "time"],
        metadata=_doc(
            "Payload fields with the reading's time (epoch s/ms/us/ns or ISO 8601), the first one present wins; "
            "the arrival time is used when none is. Empty list: always the arrival time. (The older key "
            "`timestamp_field = \"NAME\"` is read as `[\"NAME\"]`.)"
        ),
    )
    max_payload_bytes: int = dataclasses.field(
        default=65536, metadata=_doc("Larger message bodies are rejected (`too_large`).")
    )
    max_array_len: int = dataclasses.field(default=1024, metadata=_doc("Most readings in one JSON array body."))
    max_abs_value: float = dataclasses.field(
        default=DEFAULT_MAX_ABS_VALUE, metadata=_doc("Values of larger magnitude are rejected (`non_finite`).")
    )
    retained: RetainedPolicy = dataclasses.field(
        default=RetainedPolicy.IGNORE,
        metadata=_doc(
            "Retained input messages (the broker sends them again on every subscribe and reconnect): "
            '`"ignore"` counts them (`retained`) and leaves them out; `"process"` treats them as readings '
            "by the tick policy (one with the timestamp of the stream's newest reading is then a `duplicate`, "
            "an older one `late` or `aggregated`)."
        ),
    )
    @property
    def timestamp_field(self) -> str:
        """The first timestamp field ("" for none): what a caller that reads a single field uses."""
        return self.timestamp_fields[0] if self.timestamp_fields else ""

    max_clock_skew_s: float = dataclasses.field(
        default=86400.0,
        metadata=_doc(
            "Timestamps further than this from the arrival time are rejected (`bad_timestamp`); 0 disables the check."
        ),
    )


@dataclasses.dataclass
class OutputConfig:
    """Where forecasts go."""

    topic: str = dataclasses.field(
        default="forecasts/{stream}", metadata=_doc("Topic template for forecasts; `{stream}` is the stream id.")
    )
    qos: int = dataclasses.field(default=1, metadata=_doc("QoS of forecast messages (0, 1 or 2)."))
    retain: bool = dataclasses.field(default=False, metadata=_doc("Publish forecasts retained."))
    precision: int = dataclasses.field(
        default=0,
        metadata=_doc(
            "Significant digits of forecast values, bounds and anomaly scores (printf `%g`: a value with more "
            "integer digits than this is written with an exponent, e.g. 3.128e+04 at 4; 17 reads back as the "
            "exact float). 0 writes values and bounds with a fixed number of decimals, enough that the last "
            "digit is at most a millionth of the model's size (its output scale, the size of a typical change "
            "it forecasts, or the series' level if smaller): 3 decimals for the bundled model; exact floats "
            "where that would take more than 17."
        ),
    )


@dataclasses.dataclass
class StateConfig:
    """Per-stream LSTM state and its checkpoints."""

    dir: str = dataclasses.field(
        default="/var/lib/edge-lstm", metadata=_doc("Directory for state checkpoints (must be writable).")
    )
    checkpoint_interval_s: float = dataclasses.field(
        default=60.0,
        metadata=_doc(
            "Seconds between checkpoints (each waits for a moment when nothing stepped awaits the broker); one "
            "more on shutdown. Between checkpoints the journal holds what was acknowledged."
        ),
    )
    journal_sync: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "Sync the journal of acknowledged messages to disk (`fdatasync`) before acknowledging them: the "
            "promise then holds across power loss; false keeps it across a killed process only."
        ),
    )
    capacity: int = dataclasses.field(
        default=10000, metadata=_doc("Most streams kept; the least recently seen is evicted beyond this.")
    )
    max_gap_ticks: int = dataclasses.field(
        default=0,
        metadata=_doc(
            "Gaps up to this many ticks are filled by interpolation, longer ones reset the stream; "
            "0 uses the model's own (manifest `max_gap_ticks`). At most 10000: each filled tick is a model step."
        ),
    )


@dataclasses.dataclass
class EngineConfig:
    """Batching of readings into model steps."""

    max_batch: int = dataclasses.field(
        default=256,
        metadata=_doc(
            "Most readings the loop takes at once, oldest first; each stream's first reading in it goes "
            "into one batched model step, a stream's repeats into the next steps, in order."
        ),
    )
    max_wait_ms: float = dataclasses.field(
        default=0.0,
        metadata=_doc(
            "How long the loop may hold the oldest queued reading back (ms) while fewer than `max_batch` are "
            "queued, to take more readings per wake-up: fewer, larger model steps and publish bursts for at most "
            "this much added latency. 0 (the default): step whatever is queued as soon as the loop is free; "
            "under load readings still gather while a step runs. A wait saves CPU at middling rates and costs "
            "latency: at 10,000 streams and 7,600 readings/s, 2 ms took 101 instead of 129 µs of CPU per "
            "reading and raised the p99 latency from 4-8 to 13-14 ms, for the same highest sustained rate "
            "(docs/architecture.md, \"One loop\"). It does not wait when the latest message came longer than "
            "this after the one before (readings that far apart: a wait would gather none), and it stops "
            "waiting when every reading queued since the last step is of one stream and that stream has sent "
            "twice (one stream's run, where a wait gathers no other stream and holds the acknowledgements back)."
        ),
    )
    queue_size: int = dataclasses.field(
        default=10000,
        metadata=_doc(
            "Most readings queued for the model; when full, the daemon stops reading from the broker until there "
            "is room (the daemon drops nothing: unacknowledged messages wait in the broker, up to its "
            "`max_queued_messages`, see docs/deploy.md)."
        ),
    )
    drain_timeout_s: float = dataclasses.field(
        default=10.0,
        metadata=_doc(
            "On shutdown, how long to wait for the broker to acknowledge forecasts already published; readings "
            "not yet processed count as `shutdown` and stay unacknowledged, so the broker delivers them again "
            "(0..86400)."
        ),
    )


@dataclasses.dataclass
class MetricsConfig:
    """Prometheus metrics endpoint."""

    enabled: bool = dataclasses.field(default=True, metadata=_doc("Serve metrics over HTTP."))
    bind: str = dataclasses.field(
        default="127.0.0.1", metadata=_doc("Address the endpoint binds to (loopback by default).")
    )
    port: int = dataclasses.field(
        default=9745, metadata=_doc("Port of `http://BIND:PORT/metrics`; 0 picks a free port.")
    )
    max_stream_labels: int = dataclasses.field(
        default=100,
        metadata=_doc("Most streams exported with their own `edge_lstm_stream_abs_error` series (first come)."),
    )


@dataclasses.dataclass
class LogConfig:
    """Logging to stderr."""

    level: LogLevel = dataclasses.field(default=LogLevel.INFO, metadata=_doc("`debug`, `info`, `warning` or `error`."))
    json: bool = dataclasses.field(
        default=False, metadata=_doc("Write one JSON object per line instead of plain text.")
    )


@dataclasses.dataclass
class HomeAssistantConfig:
    """Home Assistant MQTT discovery (opt-in): each stream's forecast, bounds and anomaly flag as entities."""

    enabled: bool = dataclasses.field(
        default=False,
        metadata=_doc(
            "Publish retained discovery configs for each new stream (an empty retained config removes its "
            "entities when the stream is evicted)."
        ),
    )
    discovery_prefix: str = dataclasses.field(
        default="homeassistant", metadata=_doc("Home Assistant's MQTT discovery prefix.")
    )


@dataclasses.dataclass
class Config:
    """The whole configuration."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mqtt: MqttConfig = dataclasses.field(default_factory=MqttConfig)
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    state: StateConfig = dataclasses.field(default_factory=StateConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    homeassistant: HomeAssistantConfig = dataclasses.field(default_factory=HomeAssistantConfig)
    source: Path | None = dataclasses.field(default=None, compare=False)

    @property
    def status_topic(self) -> str:
        return self.mqtt.status_topic.replace("{client_id}", self.mqtt.client_id)

    def subscriptions(self) -> list[TopicFilter]:
        return [TopicFilter.parse(t) for t in self.input.topics]

    def output_topic(self, stream: str) -> str:
        return self.output.topic.replace(STREAM_PLACEHOLDER, stream)


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "mqtt": MqttConfig,
    "input": InputConfig,
    "output": OutputConfig,
    "state": StateConfig,
    "engine": EngineConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "homeassistant": HomeAssistantConfig,
}


@dataclasses.dataclass(frozen=True)
class TopicFilter:
    """One input topic: the MQTT filter to subscribe to and where the stream id sits in it."""

    template: str
    filter: str
    stream_level: int | None  # index of the `{stream}` level, None when the id comes from the payload

    @classmethod
    def parse(cls, template: str) -> TopicFilter:
        levels = template.split("/")
        stream_level: int | None = None
        out = []
        for i, level in enumerate(levels):
            if level == STREAM_PLACEHOLDER:
                if stream_level is not None:
                    raise ConfigError(f"input.topics: {template!r} has more than one {STREAM_PLACEHOLDER} level")
                stream_level = i
                out.append("+")
            elif "{" in level or "}" in level:
                raise ConfigError(f"input.topics: {template!r}: {STREAM_PLACEHOLDER} must be a whole topic level")
            elif level == "#" and i != len(levels) - 1:
                raise ConfigError(f"input.topics: {template!r}: '#' must be the last level")
            elif ("#" in level or "+" in level) and level not in ("#", "+"):
                raise ConfigError(f"input.topics: {template!r}: '+' and '#' must be whole levels")
            else:
                out.append(level)
        return cls(template=template, filter="/".join(out), stream_level=stream_level)

    def stream_of(self, topic: str) -> str | None:
        """The raw stream id in a topic that matched this filter (None when not in the topic)."""
        if self.stream_level is None:
            return None
        levels = topic.split("/")
        return levels[self.stream_level] if self.stream_level < len(levels) else None


# -- parsing ------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of strings"
    if origin is dict:
        return "a table of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Check one TOML value against its field type (no silent coercion beyond int -> float)."""
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value)
        except ValueError:
            raise bad from None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema error


# Keys renamed since: old key -> (new key, how the old value reads as the new one).
_RENAMED: dict[tuple[str, str], tuple[str, Any]] = {
    ("input", "timestamp_field"): ("timestamp_fields", lambda v: [v] if v else []),
}


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    for (section, old), (new, convert) in _RENAMED.items():
        if section == name and old in raw:
            if new in raw:
                raise ConfigError(f"[{name}] sets both {old!r} and its new name {new!r}: keep {new!r}")
            if not isinstance(raw[old], str):
                raise ConfigError(f"{name}.{old}: expected a string, got {raw[old]!r}")
            raw = {**{k: v for k, v in raw.items() if k != old}, new: convert(raw[old])}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in section [{name}] (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(f"{name}.{key}", hints[key], value) for key, value in raw.items()}
    return cls(**kwargs)


def _expand_credentials(where: str, text: str, environ: Mapping[str, str]) -> str:
    if not _CRED_VAR.search(text):
        return text
    cred = environ.get("CREDENTIALS_DIRECTORY", "")
    if not cred:
        raise ConfigError(f"{where}: {text!r} uses $CREDENTIALS_DIRECTORY, which is not set")
    return _CRED_VAR.sub(lambda _m: cred, text)


def _resolve_path(base: Path | None, text: str) -> str:
    if not text:
        return text
    p = Path(text).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p)


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _resolve_secret(m: MqttConfig, source: Path | None, environ: Mapping[str, str]) -> None:
    given = [k for k in ("password", "password_env", "password_file") if getattr(m, k)]
    if len(given) > 1:
        raise ConfigError(f"mqtt: set only one of password, password_env and password_file (got {', '.join(given)})")
    if m.password and source is not None and _world_readable(source):
        _LOG.warning("config file %s holds a password and is readable by everyone: chmod o-r it", source)
    if m.password_env:
        value = environ.get(m.password_env)
        if value is None:
            raise ConfigError(f"mqtt.password_env: environment variable {m.password_env!r} is not set")
        m.password = value
    elif m.password_file:
        path = Path(m.password_file)
        try:
            m.password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"mqtt.password_file: cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"mqtt.password_file: {path} is not UTF-8 text") from None
        if _world_readable(path):
            _LOG.warning("password file %s is readable by everyone: chmod o-r it", path)
    if m.password and not m.username:
        raise ConfigError("mqtt: a password is set but mqtt.username is empty")


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters (or topics): level by level, ``+`` matches any one
    level and ``#`` the rest, its parent level included (``a/#`` matches ``a``)."""
    la, lb = a.split("/"), b.split("/")
    if (la[0].startswith("$") and lb[0] in ("+", "#")) or (lb[0].startswith("$") and la[0] in ("+", "#")):
        return False  # a filter that starts with a wildcard matches no topic that starts with "$"
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None or (x != y and "+" not in (x, y)):
            return False
    return True


def topic_problem(topic: str) -> str | None:
    """Why a broker would refuse ``topic`` (a topic name, filter or client id), or None when it would not."""
    if not topic:
        return "is empty"
    bad = _REFUSED_CHAR.search(topic)
    if bad is not None:
        return f"contains U+{ord(bad.group()):04X}, which brokers refuse (NUL, control characters, non-characters)"
    size = len(topic.encode("utf-8"))
    if size > MAX_TOPIC_BYTES:
        return f"is {size:,} bytes long in UTF-8; MQTT allows {MAX_TOPIC_BYTES:,}"
    return None


def _check_tls_files(m: MqttConfig) -> None:
    """Load the certificate files as the connection will, so that a wrong file is refused here, not at start."""
    try:
        ctx = ssl.create_default_context(cafile=m.ca_file or None)
        if m.cert_file:
            ctx.load_cert_chain(m.cert_file, m.key_file or None, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        files = ", ".join(f"{k} = {getattr(m, k)}" for k in ("ca_file", "cert_file", "key_file") if getattr(m, k))
        hint = " (a key file with a pass phrase is not supported)" if "decrypt" in str(e).lower() else ""
        raise ConfigError(f"mqtt: the TLS files cannot be loaded ({files}): {e}{hint}") from None


def _shown(topic: str) -> str:
    return repr(topic) if len(topic) <= 80 else repr(topic[:60]) + f"... ({len(topic):,} characters)"


def _validate(c: Config) -> None:
    """Rules on single values and across fields."""
    m = c.mqtt

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    def topic_ok(key: str, topic: str, shown: str | None = None) -> None:
        problem = topic_problem(topic)
        need(problem is None, f"{key} {shown or _shown(topic)} {problem}")

    need(1 <= c.model.threads <= MAX_THREADS, f"model.threads must be 1..{MAX_THREADS}, got {c.model.threads}")
    need(bool(c.model.path), "model.path must not be empty")
    need(bool(m.host), "mqtt.host must not be empty")
    need(1 <= m.port <= 65535, f"mqtt.port must be 1..65535, got {m.port}")
    need(bool(m.client_id) and len(m.client_id) <= 128, "mqtt.client_id must be 1..128 characters")
    need(not any(ch in m.client_id for ch in "+#/"), f"mqtt.client_id {m.client_id!r} must not contain + # /")
    topic_ok("mqtt.client_id", m.client_id)
    need(5 <= m.keepalive <= 65535, f"mqtt.keepalive must be 5..65535 s, got {m.keepalive}")
    need(
        0 <= m.session_expiry_s <= MAX_SESSION_EXPIRY_S,
        f"mqtt.session_expiry_s must be 0..{MAX_SESSION_EXPIRY_S} (the largest: never expires), "
        f"got {m.session_expiry_s}",
    )
    need(
        1 <= m.reconnect_min_s <= m.reconnect_max_s <= 3600,
        "mqtt: need 1 <= reconnect_min_s <= reconnect_max_s <= 3600",
    )
    need(bool(m.cert_file) == bool(m.key_file), "mqtt: cert_file and key_file go together")
    if not m.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            need(not getattr(m, key), f"mqtt.{key} is set but mqtt.tls is false")
        need(not m.tls_insecure, "mqtt.tls_insecure is set but mqtt.tls is false")
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(m, key)
        need(not value or Path(value).is_file(), f"mqtt.{key}: file not found: {value}")
    if m.tls:
        _check_tls_files(m)
    st = c.status_topic
    need(bool(st) and "+" not in st and "#" not in st, f"mqtt.status_topic {st!r} must be a topic without wildcards")
    topic_ok("mqtt.status_topic", st)

    i = c.input
    need(bool(i.topics), "input.topics must list at least one topic")
    filters = c.subscriptions()  # raises on malformed templates
    for f in filters:
        need(
            f.stream_level is not None or bool(i.stream_field),
            f"input.topics: {f.template!r} has no {STREAM_PLACEHOLDER} level and input.stream_field is empty",
        )
        topic_ok("input.topics:", f.filter, _shown(f.template))
    need(len({f.filter for f in filters}) == len(filters), "input.topics lists the same filter twice")
    for n, f in enumerate(filters):
        for g in filters[n + 1 :]:
            need(
                not filters_overlap(f.filter, g.filter),
                f"input.topics: {_shown(f.template)} and {_shown(g.template)} overlap: the broker delivers a message "
                "that matches both once for each, and its readings would count twice",
            )
    need(1 <= i.max_payload_bytes <= 16 << 20, "input.max_payload_bytes must be 1..16777216")
    need(1 <= i.max_array_len <= 100_000, "input.max_array_len must be 1..100000")
    need(i.max_abs_value > 0, "input.max_abs_value must be > 0")
    need(i.max_clock_skew_s >= 0, "input.max_clock_skew_s must be >= 0 (0 disables the check)")
    need(all(i.timestamp_fields), "input.timestamp_fields must not hold an empty name")

    o = c.output
    need(o.qos in (0, 1, 2), f"output.qos must be 0, 1 or 2, got {o.qos}")
    need("+" not in o.topic and "#" not in o.topic, f"output.topic {o.topic!r} must not contain wildcards")
    need(bool(o.topic.replace(STREAM_PLACEHOLDER, "")), "output.topic must not be empty")
    longest = o.topic.replace(STREAM_PLACEHOLDER, "x" * MAX_STREAM_ID_LEN)
    topic_ok("output.topic", longest, f"{_shown(o.topic)} (with a stream id of {MAX_STREAM_ID_LEN} characters)")
    need(0 <= o.precision <= 17, "output.precision must be 0..17")
    # A stream's level of the output topic matches an input filter's wildcard, never one of its words: a
    # filter that catches forecasts only of a stream with one particular id is not refused.
    forecasts = "/".join("\0" if STREAM_PLACEHOLDER in level else level for level in o.topic.split("/"))
    own = [("output.topic", o.topic, forecasts), ("mqtt.status_topic", st, st)]
    if c.homeassistant.enabled:  # its discovery configs (retained) and Home Assistant's status
        prefix = c.homeassistant.discovery_prefix
        own.append(("homeassistant.discovery_prefix", prefix, f"{prefix}/#"))
    for f in filters:
        for key, shown, topic in own:
            need(
                not filters_overlap(f.filter, topic),
                f"input.topics: {_shown(f.template)} matches the daemon's own {key} {_shown(shown)}: it would read "
                "what it publishes",
            )

    s = c.state
    need(bool(s.dir), "state.dir must not be empty")
    need(s.checkpoint_interval_s > 0, "state.checkpoint_interval_s must be > 0")
    need(s.capacity >= 1, "state.capacity must be >= 1")
    need(
        0 <= s.max_gap_ticks <= MAX_GAP_TICKS,
        f"state.max_gap_ticks must be 0..{MAX_GAP_TICKS} (0 = the model's own; each filled tick is a model step)",
    )

    e = c.engine
    need(1 <= e.max_batch <= 65536, "engine.max_batch must be 1..65536")
    need(0 <= e.max_wait_ms <= 1000, "engine.max_wait_ms must be 0..1000")
    need(e.queue_size >= e.max_batch, "engine.queue_size must be >= engine.max_batch")
    need(
        0 <= e.drain_timeout_s <= MAX_DRAIN_TIMEOUT_S,
        f"engine.drain_timeout_s must be 0..{MAX_DRAIN_TIMEOUT_S:.0f} s, got {e.drain_timeout_s}",
    )

    mt = c.metrics
    need(0 <= mt.port <= 65535, f"metrics.port must be 0..65535, got {mt.port}")
    need(bool(mt.bind), "metrics.bind must not be empty")
    need(mt.max_stream_labels >= 0, "metrics.max_stream_labels must be >= 0")

    prefix = c.homeassistant.discovery_prefix
    need(
        bool(prefix) and not any(ch in prefix for ch in "+#") and prefix.strip("/") == prefix,
        f"homeassistant.discovery_prefix {prefix!r} must be a topic without wildcards or leading/trailing '/'",
    )
    topic_ok(
        "homeassistant.discovery_prefix",
        prefix + "x" * _DISCOVERY_TOPIC_RESERVE,
        f"{_shown(prefix)} (with the ~{_DISCOVERY_TOPIC_RESERVE} characters its discovery topics add)",
    )


def parse_config(
    data: Mapping[str, Any], *, source: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build and validate a :class:`Config` from parsed TOML; secrets are resolved here."""
    env = os.environ if environ is None else environ
    for name in data:
        if name not in _SECTION_TYPES:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(_SECTION_TYPES)})")
    sections = {name: _section(name, cls, data.get(name, {})) for name, cls in _SECTION_TYPES.items()}
    c = Config(**sections, source=source)
    base = source.parent if source is not None else None

    host = _HOST_SAFE.sub("-", socket.gethostname()) or "host"
    c.mqtt.client_id = c.mqtt.client_id.replace("{hostname}", host)
    c.model.path = _resolve_path(base, c.model.path)
    c.state.dir = _resolve_path(base, c.state.dir)
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        raw = _expand_credentials(f"mqtt.{key}", getattr(c.mqtt, key), env)
        setattr(c.mqtt, key, _resolve_path(base, raw))
    _validate(c)
    _resolve_secret(c.mqtt, source, env)
    return c


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a TOML configuration file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): TOML files are UTF-8") from None
    return parse_config(data, source=p.resolve(), environ=environ)


# -- showing ------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or not value.is_integer() else f"{value:.1f}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}" if value else "{}"
    raise TypeError(type(value))  # pragma: no cover


def to_toml(c: Config) -> str:
    """The effective configuration as TOML, secrets shown as ``***``."""
    lines: list[str] = []
    for name in _SECTION_TYPES:
        section = getattr(c, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("secret") and value:
                value = REDACTED
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The configuration reference (``docs/configuration.md``), generated from the schema."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `edge-lstm config-docs` from edge_lstm/config.py; do not edit by hand. -->",
        "",
        "`edge-lstm run --config FILE` reads a TOML file with the sections below. Every key is optional;",
        "an unknown key or section is an error, and so is a value of the wrong type.",
        "`edge-lstm check-config FILE` validates a file, loads and verifies the model and prints the",
        "effective configuration (passwords as `***`) without starting anything; it also says whether the",
        "state directory can be used (exit 1 when it cannot), whether a running daemon holds it and",
        "whether the metrics port is free now. Its `state` line says what a stream's state takes",
        "(`648 bytes per stream; 6.2 MiB at state.capacity 10,000 streams` for the bundled model):",
        "memory when that many streams are held, and the size of every checkpoint.",
        "",
        "Relative paths are relative to the directory of the configuration file. Exactly one of",
        "`mqtt.password`, `mqtt.password_env` and `mqtt.password_file` may be set; the password is read",
        "when the file is loaded and never printed or logged.",
        "",
    ]
    for name, cls in _SECTION_TYPES.items():
        out += [f"## `[{name}]`", "", (cls.__doc__ or "").strip(), "", "| Key | Type | Default | Description |"]
        out.append("|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        default_obj = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and issubclass(tp, enum.Enum):
                tname = "string"
            elif typing.get_origin(tp) is list:
                tname = "list of strings"
            elif typing.get_origin(tp) is dict:
                tname = "table"
            elif isinstance(tp, types.GenericAlias):  # pragma: no cover
                tname = str(tp)
            else:
                tname = {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]
            default = _toml_value(getattr(default_obj, f.name))
            doc = f.metadata["doc"]
            if f.metadata.get("example"):
                doc += f" Example: `{f.metadata['example']}`."
            cell = doc.replace("|", "\\|")
            out.append(f"| `{f.name}` | {tname} | `{default}` | {cell} |")
        out.append("")
    out += ["## Example", "", "```toml", to_toml(Config()).rstrip(), "```", ""]
    return "\n".join(out)
