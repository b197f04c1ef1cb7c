"""The ceiling: a minimal paho subscriber that republishes each reading unchanged (no model).

``python -m bench.ceiling HOST PORT QOS [PROTOCOL [IN_ROOT]]`` subscribes to ``IN_ROOT/+/value``
(default ``sensors``) and publishes every message's payload to ``ceiling/{stream}`` with the same
client settings as the daemon's MQTT link (``PROTOCOL`` ``5`` or ``3.1.1`` as its
``mqtt.protocol``, default 5; ``TCP_NODELAY``, 64 messages in flight, 10 000 queued).  Its
throughput is the most the daemon's MQTT path could do on this machine with this broker; it
prints ``ready`` once subscribed and runs until SIGTERM.

The benchmark gives the ceiling a topic root of its own (:data:`IN_ROOT`), so that a daemon kept
running on the same broker does not consume the ceiling's readings while the ceiling is measured.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from bench.mqttload import IN_ROOT as DEFAULT_IN_ROOT
from bench.mqttload import KEEPALIVE, _paho_client
from edge_lstm.config import MqttProtocol

IN_ROOT = "ceiling-in"  # the readings' topic root the benchmark uses for the ceiling
OUT_FILTER = "ceiling/+"
MAX_INFLIGHT = 64  # paho's window of QoS 1 publishes in flight (the echo has few outstanding)
MAX_QUEUED = 10_000


def main(argv: list[str]) -> int:
    host, port, qos = argv[1], int(argv[2]), int(argv[3])
    protocol = MqttProtocol(argv[4]) if len(argv) > 4 else MqttProtocol.V5
    in_filter = f"{argv[5] if len(argv) > 5 else DEFAULT_IN_ROOT}/+/value"
    client = _paho_client("ceiling", protocol)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED)
    dropped = 0

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        nonlocal dropped
        stream = msg.topic.split("/")[1]
        if c.publish("ceiling/" + stream, msg.payload, qos).rc != 0:
            dropped += 1

    def on_subscribe(*_a: Any) -> None:
        print("ready", flush=True)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_a: c.subscribe(in_filter, qos)
    signal.signal(signal.SIGTERM, lambda *_a: client.disconnect())
    client.connect(host, port, keepalive=KEEPALIVE)
    client.loop_forever()
    if dropped:
        print(f"ceiling: {dropped} publish(es) refused", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
