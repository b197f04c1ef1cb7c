"""Footprint: resident memory by stream count, CPU per 1000 readings, time to ready and first forecast.

* **Start-up**: the daemon is started with ``NOTIFY_SOCKET`` pointing at a datagram socket of
  this process (as systemd runs it); the time from spawning the process to ``READY=1``, and to
  the first forecast of a reading published (retained, so it cannot be missed) as soon as
  ``READY=1`` arrived.
* **Memory**: a fresh daemon per stream count, with ``state.capacity`` at least that count
  (the default 10 000 otherwise), fed one reading per stream; VmRSS after start, right after the
  last forecast came back (busy: what the burst's buffers and objects still hold), once the
  daemon has idled long enough to hand the burst's memory back (settled, with two of its parts:
  anonymous memory, pages of mapped files), and the peak (VmHWM), from ``/proc``.  The daemon's
  CPU time over the feed gives CPU seconds per 1000 readings.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from bench import cores, sut
from bench.mqttload import CADENCE, T0, Load, rss_bytes
from tests.support.broker import Broker
from tests.support.collector import Collector

_LOG = logging.getLogger(__name__)

STREAMS = (1, 10_000, 100_000)
# The daemon hands a burst's memory back once idle for 1 s (pipeline.TRIM_AFTER_IDLE_S), its loop
# polling at least every 0.5 s; not imported, so that bench.against can carry this file to old code.
SETTLE_S = 2.0
QUICK_STREAMS = (1, 1_000)
DEFAULT_CAPACITY = 10_000


def startup(broker: Broker, workdir: Path, qos: int) -> dict[str, float]:
    """One start: seconds from spawn to ``READY=1`` and to the first forecast."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock_path = workdir / "notify.sock"
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    stream = f"start{os.getpid()}x{time.monotonic_ns() % 1_000_000}"
    probe_topic = f"sensors/{stream}/value"
    daemon = sut.Daemon(
        broker, workdir / "daemon", qos, capacity=DEFAULT_CAPACITY, env={"NOTIFY_SOCKET": str(sock_path)}, start=False
    )
    col = Collector(broker.host, broker.port, [f"forecasts/{stream}"])
    try:
        t0 = time.monotonic()
        daemon.process.start(wait_online=False)
        ready = _wait_ready(sock, 30.0)
        t_ready = time.monotonic() - t0
        if not ready:
            raise RuntimeError(f"no READY=1 within 30 s:\n{daemon.process.log()[-2000:]}")
        col.client.publish(probe_topic, b'{"ts":%d,"value":30000.0}' % T0, qos=1, retain=True)
        got = col.wait_for(1, timeout=30)
        if not got:
            raise RuntimeError("no forecast within 30 s of READY=1")
        t_first = got[0].at - t0
        col.client.publish(probe_topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained probe
        return {"ready_s": t_ready, "first_forecast_s": t_first}
    finally:
        col.close()
        daemon.close()
        sock.close()
        sock_path.unlink(missing_ok=True)


def _wait_ready(sock: socket.socket, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return False
        if b"READY=1" in data.split(b"\n"):
            return True


def memory(
    broker: Broker, workdir: Path, streams: int, qos: int, feed_rate: float, own_core: frozenset[int] | None = None
) -> dict[str, Any]:
    """RSS of a fresh daemon before and after holding ``streams`` streams (``own_core``: where it runs)."""
    capacity = max(streams, DEFAULT_CAPACITY)
    daemon = sut.Daemon(broker, workdir / f"mem{streams}", qos, capacity=capacity)
    if own_core is not None:
        cores.pin(daemon.pid, own_core)
    try:
        time.sleep(0.5)
        idle = rss_bytes(daemon.pid)
        with Load(broker.host, broker.port, daemon.out_filter, qos) as load:
            r = load.step(
                f"m{streams}",
                streams,
                feed_rate,
                streams,
                {"daemon": daemon.pid},
                daemon.drops,
                quiet_s=2.0,
                cap_s=120.0,
            )
        busy = rss_bytes(daemon.pid)
        time.sleep(SETTLE_S)  # the loop's idle trim: collection, malloc_trim
        m = daemon.metrics()
        held = m.get(("edge_lstm_streams_active", ()), 0.0)
        after = rss_bytes(daemon.pid)
        cpu = r.cpu_s.get("daemon")
        return {
            "streams": streams,
            "capacity": capacity,
            "streams_held": int(held),
            "rss_idle_mb": idle.get("VmRSS", 0) / 2**20,
            "rss_busy_mb": busy.get("VmRSS", 0) / 2**20,
            "rss_mb": after.get("VmRSS", 0) / 2**20,
            "rss_peak_mb": after.get("VmHWM", 0) / 2**20,
            # What the resident set is made of: the process's own memory, and pages of mapped files (the
            # libraries' code, mostly), which the kernel can drop and read again when memory is short.
            "rss_anon_mb": after.get("RssAnon", 0) / 2**20,
            "rss_file_mb": after.get("RssFile", 0) / 2**20,
            "rss_metric_mb": m.get(("process_resident_memory_bytes", ()), 0.0) / 2**20,
            "feed_rate": feed_rate,
            "forecasts_received": r.received,
            "cpu_s_per_1k": (cpu / (streams / 1000)) if cpu is not None and streams >= 1000 else None,
        }
    finally:
        daemon.close()


def run(
    broker: Broker, workdir: Path, *, qos: int, quick: bool, feed_rate: float, own_core: frozenset[int] | None = None
) -> dict[str, Any]:
    """``own_core``: the core the fed daemons run on, as the run's other systems under test (None: any)."""
    repeats = 1 if quick else 3
    starts = [startup(broker, workdir / f"start{i}", qos) for i in range(repeats)]
    mem = [memory(broker, workdir, s, qos, feed_rate, own_core) for s in (QUICK_STREAMS if quick else STREAMS)]
    return {
        "startup": {
            "runs": starts,
            "ready_s_median": statistics.median(s["ready_s"] for s in starts),
            "first_forecast_s_median": statistics.median(s["first_forecast_s"] for s in starts),
        },
        "memory": mem,
        "model_layers": "1x64 (bundled taylor model)",
        "cadence_s": CADENCE,
    }
