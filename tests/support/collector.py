"""An MQTT client for tests that records every message it receives.

Usage::

    with Collector(broker.host, broker.port, ["forecasts/#"]) as col:
        ...  # publish readings
        msgs = col.wait_for(10, topic="forecasts/a", timeout=10)
        docs = [m.json() for m in msgs]

Subscriptions are made (and acknowledged) before the constructor returns, so nothing published
afterwards is missed.  ``retained`` messages delivered at subscribe time are kept with
``retain=True``; :meth:`wait_for` can skip them.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float  # time.monotonic() on arrival

    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """Subscribes to ``topics`` (QoS 1) and keeps what arrives, in order."""

    def __init__(
        self,
        host: str,
        port: int,
        topics: Iterable[str],
        *,
        client_id: str | None = None,
        session_expiry_s: int = 0,
        timeout: float = 10.0,
        **tls_kwargs: Any,
    ) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = list(topics)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        if tls_kwargs:
            self.client.tls_set(**tls_kwargs)
        if session_expiry_s:
            # A persistent session: what is published while the collector is away (a broker restart) waits for it.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
            self.client.connect(host, port, keepalive=30, clean_start=False, properties=props)
        else:
            self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"collector could not subscribe to {self._topics} on {host}:{port}")

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        m = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, time.monotonic())
        with self._cond:
            self.messages.append(m)
            self._cond.notify_all()

    def select(self, topic: str | None = None, *, retained: bool = True) -> list[Message]:
        """Messages so far, optionally only those on ``topic`` (an MQTT filter) and/or not retained."""
        with self._cond:
            msgs = list(self.messages)
        return [
            m for m in msgs if (topic is None or paho.topic_matches_sub(topic, m.topic)) and (retained or not m.retain)
        ]

    def wait_for(
        self, count: int, topic: str | None = None, *, timeout: float = 10.0, retained: bool = True
    ) -> list[Message]:
        """Wait until at least ``count`` matching messages arrived; returns them (maybe fewer on timeout)."""
        deadline = time.monotonic() + timeout
        got: list[Message] = []
        scanned = 0
        with self._cond:
            while True:
                # only look at what arrived since the last wake-up: bursts of 10k+ messages stay cheap
                for m in self.messages[scanned:]:
                    if (topic is None or paho.topic_matches_sub(topic, m.topic)) and (retained or not m.retain):
                        got.append(m)
                scanned = len(self.messages)
                left = deadline - time.monotonic()
                if len(got) >= count or left <= 0:
                    return got
                self._cond.wait(min(left, 0.2))

    def wait_payload(self, topic: str, payload: bytes, *, timeout: float = 10.0, retained: bool = True) -> bool:
        """Wait for a message with exactly this payload on ``topic``."""
        deadline = time.monotonic() + timeout
        scanned = 0
        with self._cond:
            while True:
                for m in self.messages[scanned:]:
                    if m.payload == payload and paho.topic_matches_sub(topic, m.topic) and (retained or not m.retain):
                        return True
                scanned = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def publisher(host: str, port: int) -> Iterator[paho.Client]:
    """A connected paho client with its network thread running (``publish(...).wait_for_publish()`` works)."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()
