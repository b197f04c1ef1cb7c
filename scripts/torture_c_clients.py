"""SIGKILL the daemon again and again while C clients feed it and listen: nothing lost, nothing different.

``python scripts/torture_c_clients.py [--streams 20] [--ticks 1000] [--kills 25] [--inflight 20]``

A harness independent of the test suite's Python clients: Mosquitto's own C tools carry the
load. One ``mosquitto_pub -l`` per stream publishes a stretch of the bundled taylor series at
QoS 1 as fast as the broker takes it (a backlog for the daemon), one ``mosquitto_sub`` with a
persistent session collects every forecast, and the daemon (``edge-lstm run``, checkpoints every
0.7 s) is killed with SIGKILL at random moments 0.2-1.5 s apart and started again at once.

At the end every reading must have a forecast, and every forecast's text (values and bounds)
must equal what an uninterrupted engine and the forecast encoder give for that reading.
Duplicates (forecasts sent again for readings whose acknowledgement died with a process) are
allowed and counted.  Exits 1 when a forecast is missing or differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.data import read_csv  # noqa: E402
from edge_lstm.engine import Engine  # noqa: E402
from edge_lstm.forecast import ForecastEncoder  # noqa: E402
from edge_lstm.modelspec import load_model  # noqa: E402
from edge_lstm.payload import Reading  # noqa: E402
from edge_lstm.runtime import load_step_model  # noqa: E402
from edge_lstm.state import StateTable  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def series(streams: int, ticks: int) -> dict[str, list[tuple[float, float]]]:
    """Stream ``sK``: ``ticks`` consecutive readings of taylor from offset ``37 K``, shifted by ``K`` MW."""
    raw = read_csv(REPO / "data" / "taylor.csv", "timestamp", ["demand_mw"])
    ts, vs = raw.timestamps.tolist(), raw.values[:, 0].tolist()
    if ticks > len(ts):
        raise SystemExit(f"--ticks at most {len(ts)}")
    out = {}
    for k in range(streams):
        off = (k * 37) % (len(ts) - ticks + 1)
        out[f"s{k}"] = [(ts[off + i], vs[off + i] + k) for i in range(ticks)]
    return out


def collected(path: Path) -> list[dict[str, Any]]:
    docs = []
    for line in path.read_text(errors="replace").splitlines():
        topic, _, body = line.partition(" ")
        if topic.startswith("forecasts/"):
            with contextlib.suppress(ValueError):  # a line cut by the collector's stop
                docs.append(json.loads(body))
    return docs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=20, help="streams, one publisher each (default 20)")
    p.add_argument("--ticks", type=int, default=1000, help="readings per stream (default 1000)")
    p.add_argument("--kills", type=int, default=25, help="SIGKILLs, each followed by a restart (default 25)")
    p.add_argument("--inflight", type=int, default=20, help="the broker's max_inflight_messages (default 20)")
    p.add_argument("--seed", type=int, default=7, help="seed of the kill times (default 7)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, collected forecasts)")
    args = p.parse_args()
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: apt-get install mosquitto mosquitto-clients)")
    edge_lstm = Path(sys.executable).with_name("edge-lstm")
    work = Path(tempfile.mkdtemp(prefix="edge-lstm-torture-"))
    port, metrics_port = free_port(), free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_inflight_messages {args.inflight}\nmax_queued_messages 1000000\n"
    )
    (work / "daemon.toml").write_text(
        f'[model]\npath = "{REPO / "models" / "taylor"}"\n[mqtt]\nport = {port}\nclient_id = "torture"\n'
        f'[state]\ndir = "{work / "state"}"\ncheckpoint_interval_s = 0.7\n[metrics]\nport = {metrics_port}\n'
        "[input]\nmax_clock_skew_s = 0\n"
    )
    data = series(args.streams, args.ticks)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], log: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
        with open(work / log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        spawn(["mosquitto", "-c", str(work / "mosquitto.conf")], "mosquitto.log")
        time.sleep(0.5)
        sub = spawn(["mosquitto_sub", "-p", str(port), "-q", "1", "-c", "-i", "torture-collector",
                     "-t", "forecasts/#", "-v"], "forecasts.txt")  # fmt: skip
        time.sleep(0.3)
        daemon = spawn([str(edge_lstm), "run", "--config", str(work / "daemon.toml")], "daemon-0.log")
        time.sleep(1.5)
        print(f"publishing {args.streams} x {args.ticks} readings; {args.kills} SIGKILLs", flush=True)
        pubs = []
        for name, ser in data.items():
            pub = spawn(["mosquitto_pub", "-p", str(port), "-q", "1", "-l", "-t", f"sensors/{name}/value"],
                        f"pub-{name}.log", stdin=subprocess.PIPE)  # fmt: skip
            assert pub.stdin is not None
            pub.stdin.write("".join(json.dumps({"ts": t, "demand_mw": v}) + "\n" for t, v in ser).encode())
            pub.stdin.close()
            pubs.append(pub)
        rng = random.Random(args.seed)
        for i in range(1, args.kills + 1):
            time.sleep(rng.uniform(0.2, 1.5))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            daemon = spawn([str(edge_lstm), "run", "--config", str(work / "daemon.toml")], f"daemon-{i}.log")
            print(f"  kill {i}: restarted", flush=True)
        for pub in pubs:
            pub.wait(60)
        want_n = args.streams * args.ticks
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if len({(d["stream"], d["ts_epoch"]) for d in collected(work / "forecasts.txt")}) >= want_n:
                break
            time.sleep(1.0)
        time.sleep(2.0)  # duplicates still on their way
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        sub.send_signal(signal.SIGTERM)
        sub.wait(10)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    model = load_step_model(load_model(REPO / "models" / "taylor"))
    encoder = ForecastEncoder.for_manifest(model.manifest)
    want = {}
    for name, ser in data.items():
        engine = Engine(model, StateTable(model.manifest.layers, 1, 4))
        for t, v in ser:
            for f in engine.process([Reading(name, (v,), t, 0.0)]).forecasts:
                want[(name, f.ts)] = json.loads(encoder.encode(f))["forecasts"]
    got: dict[tuple[str, float], object] = {}
    duplicates = differing = 0
    for doc in collected(work / "forecasts.txt"):
        key = (doc["stream"], doc["ts_epoch"])
        duplicates += key in got
        got.setdefault(key, doc["forecasts"])
        differing += doc["forecasts"] != want.get(key)
    missing = sum(key not in got for key in want)
    replayed = sum(
        int(n)
        for log in work.glob("daemon-*.log")
        for n in re.findall(r"(\d+) journaled message\(s\) after the checkpoint", log.read_text(errors="replace"))
    )
    print(
        f"readings {want_n}: forecasts {len(got)} distinct, {missing} missing, {differing} differing from an "
        f"uninterrupted run, {duplicates} duplicates; {args.kills + 1} daemon starts, {replayed} journaled "
        f"messages stepped again in all"
    )
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if missing or differing else 0


if __name__ == "__main__":
    sys.exit(main())
