"""Load generator and receiver processes, and one paced step of load through a system under test.

Three processes besides the broker and the system under test (the daemon or the ceiling):

* the **generator** publishes readings at a set rate.  It writes each burst of due readings to
  the socket with one ``send`` and takes its send time just before; between bursts it sleeps
  until the next reading is due (no busy-wait), and it reads the broker's acknowledgements every
  256 readings and at the end of the step.
* the **receiver** subscribes to the output topics; a reading thread stamps every message of a
  read with the time the read returned and acknowledges them in one ``send``; its main thread
  only waits for commands.

* this process only sends commands and reads ``/proc`` and the daemon's metrics between steps.

Both speak MQTT through :mod:`bench.wire`, a few dozen lines of hand-built packets, so that the
harness costs a small part of the two cores it shares with the broker and the system under test.

Message ``g`` of a series (counted from 0 across all its steps) goes to stream ``g % S`` with
tick ``g // S``: streams are visited round robin, each stream's readings are exactly one model
cadence apart (no gaps, no out-of-order), and the receiver maps an output message back to ``g``
from its stream id and timestamp.  Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same
clock in every process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import os
import socket
import threading
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.wire import PING_EVERY_S, PUBACK, PUBLISH, WireClient, packet, publish_fields
from edge_lstm.config import MqttProtocol

_LOG = logging.getLogger(__name__)

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z: the first tick's timestamp
CADENCE = 1800.0  # the bundled model's cadence
KEEPALIVE = 600
# A day of half-hourly demand-like values (MW), so the model sees realistic inputs.
LEVELS = [round(30000.0 + 5000.0 * math.sin(2 * math.pi * i / 48), 1) for i in range(48)]
CLK_TCK = os.sysconf("SC_CLK_TCK")
IN_ROOT = "sensors"  # first level of the reading topics unless a system under test asks for its own


def in_topic(prefix: str, s: int, root: str = IN_ROOT) -> str:
    return f"{root}/{prefix}-{s}/value"


def payload(g: int, streams: int) -> bytes:
    k = g // streams
    return b'{"ts":%d,"value":%.1f}' % (T0 + int(k * CADENCE), LEVELS[k % 48])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (and its finished children are not counted)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak) and two of VmRSS's parts, RssAnon and RssFile (not RssShmem), of a process, in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _paho_client(name: str, protocol: MqttProtocol = MqttProtocol.V5) -> Any:
    """A paho client speaking ``protocol`` (as the daemon's ``mqtt.protocol``), with ``TCP_NODELAY``."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
        protocol=MQTTProtocolVersion.MQTTv5 if protocol is MqttProtocol.V5 else MQTTProtocolVersion.MQTTv311,
    )

    def nodelay(_c: Any, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = nodelay
    return client


# -- generator process ---------------------------------------------------------------------------


def _generator_step(link: WireClient, cmd: dict[str, Any], qos: int) -> dict[str, Any]:
    prefix, streams, rate = cmd["prefix"], int(cmd["streams"]), float(cmd["rate"])
    first, n = int(cmd["first"]), int(cmd["count"])
    topics = [in_topic(prefix, s, cmd.get("root", IN_ROOT)).encode() for s in range(streams)]
    sends = np.full(n, np.nan)
    mono = time.monotonic
    build = link.publish_packet
    acks = 0

    def read_acks(timeout: float | None) -> None:
        nonlocal acks
        if not link.read(timeout):
            raise ConnectionError("the broker closed the generator's connection")
        acks += sum(1 for f, _s, _e in link.take() if f & 0xF0 == PUBACK)

    start = mono() + 0.005
    j = 0
    while j < n:
        now = mono()
        due = min(n, int((now - start) * rate) + 1, j + 256)
        if due <= j:
            time.sleep(start + j / rate - now)  # the acknowledgements wait in the socket meanwhile
            continue
        burst = b"".join([build(topics[g % streams], payload(g, streams), qos) for g in range(first + j, first + due)])
        sends[j:due] = mono()
        link.send(burst)
        if j // 256 != due // 256:
            read_acks(0)
        j = due
    deadline = mono() + 30
    while qos and acks < n and mono() < deadline:
        read_acks(deadline - mono())
    return {"sends": sends, "unacked": bool(qos and acks < n)}


def generator_main(conn: Connection, host: str, port: int, qos: int, protocol: MqttProtocol = MqttProtocol.V5) -> None:
    """The load generator (a child process): one step per command until ``None``."""
    link = WireClient(host, port, f"bench-gen-{uuid.uuid4().hex[:6]}", protocol, KEEPALIVE)
    conn.send({"ready": True, "pid": os.getpid()})
    while True:
        while not conn.poll(1.0):
            link.keepalive()
            link.read(0)
            link.take()  # stray acknowledgements of a step that timed out, PINGRESP
        cmd = conn.recv()
        if cmd is None:
            break
        conn.send(_generator_step(link, cmd, qos))
    link.close()


# -- receiver process ----------------------------------------------------------------------------


class _Recorder:
    """Arrival times of the expected messages (the reading thread writes, the main thread reads)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.prefix = b""
        self.streams = 1
        self.first = 0
        self.recv = np.zeros(0)
        self.count = 0
        self.stray = 0
        self.last_at = 0.0

    def expect(self, prefix: str, streams: int, first: int, n: int) -> None:
        with self.cond:
            self.prefix, self.streams, self.first = prefix.encode(), streams, first
            self.recv = np.full(n, np.nan)
            self.count = self.stray = 0
            self.last_at = time.monotonic()

    def record(self, now: float, messages: list[tuple[bytes, bytes]]) -> None:
        """Messages (topic, body) that arrived in one read at ``now``."""
        with self.cond:
            self.last_at = now
            recv, n = self.recv, len(self.recv)
            for topic, body in messages:
                stream = topic.rsplit(b"/", 1)[-1] if topic.startswith(_OUT_ROOTS) else b""
                i = body.find(b'"ts_epoch":')
                if i >= 0:
                    i += 11
                else:
                    i = body.find(b'"ts":') + 5
                end = body.find(b",", i)
                try:
                    prefix, _, s = stream.rpartition(b"-")
                    ts = float(body[i:end])
                    idx = round((ts - T0) / CADENCE) * self.streams + int(s) - self.first
                except ValueError:
                    self.stray += 1
                    continue
                if prefix != self.prefix or not 0 <= idx < n or recv[idx] == recv[idx]:
                    self.stray += 1
                    continue
                recv[idx] = now
                self.count += 1
            if self.count == n:
                self.cond.notify_all()

    def collect(self, quiet_s: float, cap_s: float) -> dict[str, Any]:
        """Wait until everything arrived, or nothing arrived for ``quiet_s``, or ``cap_s`` passed."""
        end = time.monotonic() + cap_s
        with self.cond:
            while self.count < len(self.recv):
                now = time.monotonic()
                if now >= end or now - self.last_at >= quiet_s:
                    break
                self.cond.wait(min(0.05, end - now))
            return {"recv": self.recv.copy(), "count": self.count, "stray": self.stray}


_OUT_ROOTS = (b"forecasts/", b"ceiling/", b"naive/")


def _receive(link: WireClient, rec: _Recorder) -> None:
    """The receiver's reading thread: every read's messages stamped with the time the read returned."""
    mono = time.monotonic
    while True:
        try:
            if not link.read(PING_EVERY_S):
                return
        except (OSError, ValueError):  # closed by the main thread at the end of the run
            return
        now = mono()
        messages, acks = [], []
        for first, start, end in link.take():
            if first & 0xF0 == PUBLISH:
                topic, body, pid = publish_fields(link.data, first, start, end, link.v5)
                messages.append((topic, body))
                if pid:
                    acks.append(packet(PUBACK, pid.to_bytes(2, "big")))
        if acks:
            link.send(b"".join(acks))
        else:
            link.keepalive()
        if messages:
            rec.record(now, messages)


def receiver_main(
    conn: Connection, host: str, port: int, topic_filter: str, qos: int, protocol: MqttProtocol = MqttProtocol.V5
) -> None:
    """The receiver (a child process): records arrivals on ``topic_filter``."""
    rec = _Recorder()
    link = WireClient(host, port, f"bench-recv-{uuid.uuid4().hex[:6]}", protocol, KEEPALIVE)
    link.subscribe(topic_filter, qos)
    threading.Thread(target=_receive, args=(link, rec), name="bench-receiver-read", daemon=True).start()
    conn.send({"ready": True, "pid": os.getpid()})
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        if cmd[0] == "expect":
            rec.expect(*cmd[1:])
            conn.send("ok")
        elif cmd[0] == "collect":
            conn.send(rec.collect(*cmd[1:]))
    link.close()


# -- one step ------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepResult:
    """One paced step of load through a system under test."""

    streams: int
    rate: float  # offered readings/s
    count: int
    received: int
    stray: int
    generator_rate: float  # readings/s the generator really sent
    delivered_rate: float  # received / (last arrival - first send)
    lag_s: float  # last arrival - last send
    latency_ms: dict[str, float]
    cpu_s: dict[str, float]  # CPU seconds of each process during the step
    drops: int  # readings the system under test reports it dropped
    passed: bool
    why: str  # what failed, empty when passed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latency_stats(lat_s: np.ndarray) -> dict[str, float]:
    if len(lat_s) == 0:
        return {}
    ms = lat_s * 1e3
    p = np.percentile(ms, [50, 90, 99, 99.9])
    return {
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p99": float(p[2]),
        "p99.9": float(p[3]),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
        "n": len(ms),
    }


class Load:
    """A generator and a receiver process for one system under test (its output topic filter)."""

    def __init__(
        self,
        host: str,
        port: int,
        out_filter: str,
        qos: int,
        series: dict[str, int] | None = None,
        *,
        protocol: MqttProtocol = MqttProtocol.V5,
        in_root: str = IN_ROOT,
    ) -> None:
        """``series``: next message number of each series, shared by the loads of one run (a system under
        test that keeps state must see every stream's ticks continue, not start again).  ``protocol``:
        the MQTT version of the generator and the receiver; ``in_root``: first level of the reading
        topics (``ROOT/PREFIX-S/value``), so that each system under test only sees its own readings."""
        self.qos = qos
        self.in_root = in_root
        ctx = mp.get_context("spawn")
        self._gen, gen_child = ctx.Pipe()
        self._rec, rec_child = ctx.Pipe()
        self._procs = [
            ctx.Process(
                target=generator_main, args=(gen_child, host, port, qos, protocol), name="bench-generator", daemon=True
            ),
            ctx.Process(
                target=receiver_main,
                args=(rec_child, host, port, out_filter, qos, protocol),
                name="bench-receiver",
                daemon=True,
            ),
        ]
        for p in self._procs:
            p.start()
        hello_gen, hello_rec = self._gen.recv(), self._rec.recv()
        if not (hello_gen["ready"] and hello_rec["ready"]):
            self.close()
            raise RuntimeError("load generator or receiver could not connect to the broker")
        self.pids = {"generator": int(hello_gen["pid"]), "receiver": int(hello_rec["pid"])}
        self._next: dict[str, int] = series if series is not None else {}
        # The last step's send and arrival time of each reading (NaN: no output), for a look at its tail.
        self.last_stamps: tuple[np.ndarray, np.ndarray] | None = None

    def step(
        self,
        prefix: str,
        streams: int,
        rate: float,
        count: int,
        watch: dict[str, int],
        drops: Any = None,
        lag_limit_s: float = 0.25,
        quiet_s: float = 1.0,
        cap_s: float = 30.0,
    ) -> StepResult:
        """Offer ``count`` readings at ``rate`` to ``streams`` streams of series ``prefix``.

        ``watch``: more processes (name -> pid) whose CPU time is measured; ``drops``: a callable
        returning the system under test's cumulative drop count (None when it has none).
        """
        first = self._next.get(prefix, 0)
        self._next[prefix] = first + count
        pids = {**self.pids, **watch}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        drops0 = drops() if drops else 0
        self._rec.send(("expect", prefix, streams, first, count))
        self._rec.recv()
        self._gen.send(
            {"prefix": prefix, "streams": streams, "rate": rate, "first": first, "count": count, "root": self.in_root}
        )
        sent = self._gen.recv()
        self._rec.send(("collect", quiet_s, cap_s))
        got = self._rec.recv()
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        dropped = (drops() - drops0) if drops else 0
        sends, recv = sent["sends"], got["recv"]
        self.last_stamps = (sends, recv)
        ok = ~np.isnan(recv)
        gen_span = float(sends[-1] - sends[0]) if count > 1 else 0.0
        gen_rate = (count - 1) / gen_span if gen_span > 0 else float("inf")
        last = float(np.nanmax(recv)) if ok.any() else float("nan")
        delivered_rate = got["count"] / (last - float(sends[0])) if ok.any() and last > sends[0] else 0.0
        lag = last - float(sends[-1]) if ok.any() else float("inf")
        duration = count / rate
        limit = max(lag_limit_s, 0.05 * duration)
        why = []
        if got["count"] < count:
            why.append(f"{count - got['count']} not received")
        if dropped:
            why.append(f"{dropped} dropped")
        if lag > limit:
            why.append(f"backlog: last output {lag:.2f} s after the last reading (limit {limit:.2f} s)")
        if gen_rate < 0.97 * rate:
            why.append(f"generator-limited ({gen_rate:.0f}/s)")
        cpu = {}
        for k in pids:
            before, after = cpu0[k], cpu1[k]
            if before is not None and after is not None:
                cpu[k] = after - before
        return StepResult(
            streams=streams,
            rate=rate,
            count=count,
            received=got["count"],
            stray=got["stray"],
            generator_rate=gen_rate,
            delivered_rate=delivered_rate,
            lag_s=lag,
            latency_ms=latency_stats(recv[ok] - sends[ok]),
            cpu_s=cpu,
            drops=dropped,
            passed=not why,
            why="; ".join(why),
        )

    def close(self) -> None:
        for conn in (self._gen, self._rec):
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(2)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
