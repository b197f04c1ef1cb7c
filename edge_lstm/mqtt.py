"""The daemon's MQTT connection (paho-mqtt 2.x): connect, TLS, auth, status, routing.

:class:`MqttLink` wraps one paho client:

* MQTT 5 or 3.1.1, a stable client id and a persistent session (MQTT 5:
  ``clean_start=False`` plus a session expiry interval; 3.1.1:
  ``clean_session=False``), so QoS 1 readings published while the daemon is
  away wait in the broker;
* QoS 1 subscriptions, made again in ``on_connect`` on every connect;
* connect failures (bad credentials, not authorised) and refused
  subscriptions logged with the broker's reason;
* reconnects with exponential backoff, by paho's network thread
  (``loop_start``);
* a retained status topic: last will ``offline``, ``online`` once the daemon
  is ready (again after every reconnect), ``offline`` on a clean stop;
* ``TCP_NODELAY`` on the socket: paho leaves Nagle's algorithm on, which
  delays small publishes made right after a read by up to ~40 ms.

Handlers registered with :meth:`MqttLink.route` run on paho's network thread
and must be quick (the daemon's only decodes and enqueues).  One ``on_message``
routes every message: the first route whose filter matches the topic takes it
(each filter compiled once to a regular expression); a message no route
matches (a subscription left in the persistent session by an earlier
configuration) is acknowledged and ignored.  Acknowledgements
are manual: a QoS 1 message is acknowledged only once its handler took it in,
so readings that arrive while the daemon is stopping stay with the broker and
are delivered again to the next run.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_lstm.config import MqttConfig, MqttProtocol
from edge_lstm.metrics import Metrics

_LOG = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
SUBSCRIBE_QOS = 1
MAX_QUEUED_PUBLISHES = 10_000  # paho's own outgoing queue while disconnected: bounded
MAX_INFLIGHT = 64
PUBLISH_BACKPRESSURE_S = 2.0  # longest a publish waits for room in paho's queue while connected
REFUSAL_LOG_EVERY_S = 60.0  # a broker refusing every forecast logs once a minute, not per forecast

# Returns True when the message was taken in (it is then acknowledged), False to leave it
# unacknowledged: the broker delivers it again after the next connect (persistent session).
MessageHandler = Callable[[str, bytes], bool]


class MqttLink:
    """One MQTT connection of the daemon.

    ``metrics`` is optional so the link can be used (and tested) on its own.
    """

    def __init__(self, cfg: MqttConfig, status_topic: str, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.status_topic = status_topic
        self._metrics = metrics
        self._subscriptions: list[str] = []
        self._routes: list[tuple[re.Pattern[str], MessageHandler]] = []
        self._connected = threading.Event()
        self._ready = False
        self._connects = 0
        self._lock = threading.Lock()
        self.last_error: str = ""
        self.publish_refusals = 0  # QoS 1/2 publishes the broker acknowledged with a failure (MQTT 5)
        self._refusal_logged_at = -REFUSAL_LOG_EVERY_S
        v5 = cfg.protocol is MqttProtocol.V5
        self._v5 = v5
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=True,
            manual_ack=True,
        )
        c = self.client
        c.enable_logger(logging.getLogger("paho.mqtt"))
        c.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        c.max_queued_messages_set(MAX_QUEUED_PUBLISHES)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.will_set(status_topic, OFFLINE, qos=1, retain=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            c.tls_set(
                ca_certs=cfg.ca_file or None,
                certfile=cfg.cert_file or None,
                keyfile=cfg.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if cfg.tls_insecure:
                c.tls_insecure_set(True)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_message = self._on_message

    # -- set-up ---------------------------------------------------------------------------------

    def route(self, topic_filter: str, handler: MessageHandler) -> None:
        """Subscribe to ``topic_filter`` (QoS 1) and pass its messages to ``handler(topic, payload)``."""
        self._routes.append((filter_pattern(topic_filter), handler))
        self._subscriptions.append(topic_filter)

    def start(self) -> None:
        """Start connecting in the background; paho's thread keeps reconnecting until :meth:`stop`."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()
        if self.client._thread is not None:  # name paho's network thread in thread dumps
            self.client._thread.name = "mqtt-network"

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_ready(self) -> None:
        """Publish ``online`` now and after every later (re)connect."""
        with self._lock:
            self._ready = True
        if self.connected:
            self.client.publish(self.status_topic, ONLINE, qos=1, retain=True)

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message; False (and counted) when paho refuses it.

        While disconnected, QoS > 0 messages wait in paho's bounded queue and go
        out after the reconnect.  While connected and that queue is full, the
        call waits (up to ``PUBLISH_BACKPRESSURE_S``) for the broker to catch up.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE and self.connected:
            # Backpressure: the broker acknowledges slower than we publish.  Wait for room (the
            # intake queue absorbs the delay, dropping oldest when full) rather than lose forecasts.
            deadline = time.monotonic() + PUBLISH_BACKPRESSURE_S
            while info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE and self.connected and time.monotonic() < deadline:
                time.sleep(0.001)
                info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0):
            return True
        if self._metrics is not None:
            self._metrics.publish_failures.inc()
        _LOG.debug("publish to %s failed: %s", topic, paho.error_string(info.rc))
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (when connected), disconnect and stop the network thread."""
        with self._lock:
            self._ready = False
        if self.connected:
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                _LOG.warning("could not publish offline status: %s", e)
        deadline = time.monotonic() + timeout
        self.client.disconnect()
        self.client.loop_stop()
        if time.monotonic() > deadline:
            _LOG.warning("MQTT disconnect took longer than %.1f s", timeout)
        self._connected.clear()
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(0)

    # -- paho callbacks (network thread) --------------------------------------------------------

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as e:
            _LOG.debug("cannot set TCP_NODELAY: %s", e)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = describe_connack(reason_code)
            _LOG.error("MQTT broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, self.last_error)
            self._connected.clear()
            if self._metrics is not None:
                self._metrics.mqtt_connected.set(0)
            return
        self.last_error = ""
        self._connects += 1
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(1)
            if self._connects > 1:
                self._metrics.mqtt_reconnects.inc()
        _LOG.info(
            "MQTT connected to %s:%d as %s (session present: %s)",
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            flags.session_present,
        )
        if self._subscriptions:
            client.subscribe([(f, SUBSCRIBE_QOS) for f in self._subscriptions])
        with self._lock:
            ready = self._ready
        if ready:
            client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._connected.set()

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception says why.
        err = sys.exc_info()[1]
        self.last_error = describe_connect_error(err) if err is not None else "not reachable"
        _LOG.warning("MQTT broker %s:%d: %s; retrying", self.cfg.host, self.cfg.port, self.last_error)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(0)
        if was:
            if reason_code.is_failure:
                _LOG.warning("MQTT connection lost (%s); reconnecting", reason_code)
            else:
                _LOG.info("MQTT disconnected")

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        for topic, rc in zip(self._subscriptions, reason_codes, strict=False):
            if rc.is_failure:
                _LOG.error("MQTT subscription to %r refused by the broker: %s", topic, rc)
            else:
                _LOG.info("subscribed to %r (QoS %d)", topic, rc.value)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, _mid: int, reason_code: ReasonCode, _properties: Properties | None
    ) -> None:
        # MQTT 5 brokers say in the PUBACK when they refuse a publish (e.g. 0x87 Not authorized by an ACL);
        # MQTT 3.1.1 brokers drop it silently.
        if not reason_code.is_failure:
            return
        self.publish_refusals += 1
        if self._metrics is not None:
            self._metrics.publish_failures.inc()
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
            self._refusal_logged_at = now
            _LOG.error(
                "MQTT broker refused a publish: %s (%d refused so far; check the broker's ACL for the output "
                "and status topics of user %r)",
                reason_code,
                self.publish_refusals,
                self.cfg.username or "anonymous",
            )

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # not valid UTF-8: no filter can match it
            topic = None
        if topic is not None:
            for pattern, handler in self._routes:
                if pattern.fullmatch(topic):
                    if handler(topic, bytes(msg.payload)) and msg.qos > 0:
                        client.ack(msg.mid, msg.qos)
                    return
        _LOG.debug("message on unexpected topic %r ignored", topic)
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)


def filter_pattern(topic_filter: str) -> re.Pattern[str]:
    """A regular expression that fully matches the topics an MQTT filter matches.

    ``+`` is one level (possibly empty), a final ``#`` any number of levels
    (``a/#`` matches ``a`` too); a filter starting with a wildcard does not
    match topics starting with ``$`` (MQTT 3.1.1 section 4.7.2).
    """
    levels = topic_filter.split("/")
    out = r"(?!\$)" if levels[0] in ("+", "#") else ""
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            out += f"(?:{sep}.*)?" if i else ".*"
            break
        out += sep + ("[^/]*" if level == "+" else re.escape(level))
    return re.compile(out, re.DOTALL)


def describe_connack(reason_code: ReasonCode) -> str:
    """A CONNACK failure in words an operator can act on."""
    name = str(reason_code)
    hints = {
        "Bad user name or password": "check mqtt.username and the password",
        "Not authorized": "the broker does not allow this user, password or client id",
        "Client identifier not valid": "the broker rejects mqtt.client_id",
        "Unsupported protocol version": 'try mqtt.protocol = "3.1.1"',
        "Server unavailable": "the broker is not accepting connections",
    }
    for key, hint in hints.items():
        if key.lower() in name.lower():
            return f"{name} ({hint})"
    return name


def describe_connect_error(err: BaseException) -> str:
    """A failed connection attempt (socket or TLS error) in words an operator can act on."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate was not accepted: {err.verify_message or err.reason} "
            "(check mqtt.ca_file and that the broker's certificate is current and names this host)"
        )
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or err).lower()
        if "certificate" in reason or "unknown ca" in reason or "alert" in reason:
            return (
                f"TLS: the broker refused the handshake ({err.reason or err}): check mqtt.cert_file and "
                "mqtt.key_file (client certificate signed by a CA the broker trusts, and not expired)"
            )
        return f"TLS handshake failed: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name: {err.strerror or err}"
    if isinstance(err, TimeoutError):
        return "connection timed out"
    return f"not reachable: {getattr(err, 'strerror', None) or err}"
