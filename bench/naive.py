"""The naive baseline: the forecasting script a user would write without edge-lstm.

``python -m bench.naive HOST PORT QOS [PROTOCOL [IN_ROOT]]`` subscribes to ``IN_ROOT/+/value``
and, for every reading, computes the model's features by hand from the manifest, runs one LiteRT
invoke at batch 1 with that stream's LSTM state from a dict, and publishes the forecast as JSON on
``naive/{stream}`` at ``QOS``.  No batching, no journal, no metrics, no gap handling: what the
daemon is compared with to show what it buys.  Same MQTT client settings as the ceiling; prints
``ready`` once subscribed and runs until SIGTERM.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.ceiling import MAX_INFLIGHT, MAX_QUEUED
from bench.mqttload import IN_ROOT as DEFAULT_IN_ROOT
from bench.mqttload import KEEPALIVE, _paho_client
from edge_lstm.config import MqttProtocol

MODEL = Path(__file__).resolve().parents[1] / "models" / "taylor"
IN_ROOT = "naive-in"  # the readings' topic root the benchmark uses for this baseline
OUT_FILTER = "naive/+"


def main(argv: list[str]) -> int:
    host, port, qos = argv[1], int(argv[2]), int(argv[3])
    protocol = MqttProtocol(argv[4]) if len(argv) > 4 else MqttProtocol.V5
    in_filter = f"{argv[5] if len(argv) > 5 else DEFAULT_IN_ROOT}/+/value"
    # -- the script proper: about 40 lines, as a user would write it --------------------------------
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((MODEL / "manifest.json").read_text())
    interpreter = Interpreter(model_path=str(MODEL / "model.tflite"), num_threads=1)
    run = interpreter.get_signature_runner()
    hidden = manifest["layers"][0]
    feats, out = manifest["features"], manifest["output"]
    state: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}  # stream -> (h, c, last value)
    client = _paho_client("naive", protocol)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED)

    def features(ts: float, value: float, last: float) -> list[float]:
        day, week = ts % 86400 / 86400, (ts / 86400 + 3) % 7 / 7  # 1970-01-01 was a Thursday
        raw = {"diff": value - last, "level": value, "tod_sin": math.sin(2 * math.pi * day),
               "tod_cos": math.cos(2 * math.pi * day), "dow_sin": math.sin(2 * math.pi * week),
               "dow_cos": math.cos(2 * math.pi * week)}  # fmt: skip
        return [(raw[f["kind"]] - f.get("center", 0.0)) / f.get("scale", 1.0) for f in feats]

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        stream = msg.topic.split("/")[1]
        reading = json.loads(msg.payload)
        ts, value = float(reading["ts"]), float(reading["value"])
        zeros = np.zeros((1, hidden), np.float32)
        h, cell, last = state.get(stream, (zeros, zeros, value))
        x = np.array([features(ts, value, last)], np.float32)
        res = run(x=x, h_0=h, c_0=cell)
        state[stream] = (res["h_0"], res["c_0"], value)
        steps = [value + out["center"] + out["scale"] * float(y) for y in res["y"][0]]
        forecast = {"ts": ts, "stream": stream, "forecast": steps}
        c.publish("naive/" + stream, json.dumps(forecast), qos)

    # ---------------------------------------------------------------------------------------------
    client.on_message = on_message
    client.on_subscribe = lambda *_a: print("ready", flush=True)
    client.on_connect = lambda c, *_a: c.subscribe(in_filter, qos)
    signal.signal(signal.SIGTERM, lambda *_a: client.disconnect())
    client.connect(host, port, keepalive=KEEPALIVE)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
