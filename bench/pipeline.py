"""The daemon's own code per reading, stage by stage, in one process (no broker, no sockets).

What the MQTT benchmarks cannot separate: how much of a reading's cost is edge-lstm's code
rather than paho's or the broker's.  The same objects the daemon wires together are driven
directly with the load generator's payloads (``bench.mqttload.payload``):

``decode``   ``PayloadDecoder.decode`` of one JSON body (the MQTT thread's work);
``queue``    the intake queue: append each reading, take the batches (a deque, as in the pipeline);
``engine``   ``Engine.process`` of each batch (time policy, features, model step, state);
``model``    the part of ``engine`` spent in the model step itself (``BatchResult.inference_seconds``);
``encode``   ``ForecastEncoder.encode`` of every forecast;
``metrics``  ``Metrics.record_batch`` of each batch (the Prometheus updates).

``whole`` is then measured separately: the real :class:`edge_lstm.pipeline.Pipeline` end to end
(``accept`` of each message, ``step`` of each batch, the PUBACK of each forecast, ``commit``:
journal write, without its sync, and the acknowledgements), with a link that only records what it
would send.  ``whole`` minus the sum of the stages is the cost of the delivery bookkeeping.

Streams tick in turn (reading ``g`` goes to stream ``g % S``, one tick per round), so with S
streams the worker's batches hold ``min(S, engine.max_batch)`` readings, as in the daemon under
a steady load.  Each stage is timed over all readings of a round of work; the figure is the
median over repeats, in microseconds of CPU time per reading (``time.thread_time``: other
processes on the machine slow it less than they would wall-clock time).
"""

from __future__ import annotations

import collections
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.mqttload import payload
from edge_lstm.config import parse_config
from edge_lstm.daemon import load_serving_model, make_decoder
from edge_lstm.engine import BatchResult, Engine
from edge_lstm.forecast import ForecastEncoder
from edge_lstm.journal import Journal
from edge_lstm.metrics import Metrics
from edge_lstm.mqtt import Inbound
from edge_lstm.payload import Reading
from edge_lstm.pipeline import Pipeline as DaemonPipeline
from edge_lstm.state import StateTable

_LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STREAMS = (1, 100, 10_000)
QUICK_STREAMS = (1, 100)
STAGES = ("decode", "queue", "engine", "model", "encode", "metrics")


def _readings_per_round(streams: int, quick: bool) -> int:
    """Enough readings that a round takes ~0.1-0.5 s, and whole ticks of every stream."""
    target = 2_000 if quick else 10_000
    return max(streams, (target // streams) * streams)


class Pipeline:
    """The daemon's in-process objects for the bundled model and the default configuration."""

    def __init__(self, streams: int) -> None:
        cfg = parse_config(
            {
                "model": {"path": str(REPO / "models" / "taylor")},
                "state": {"capacity": 20_000},
                "input": {"max_clock_skew_s": 0},  # the payloads carry 2024 timestamps
            }
        )
        self.cfg = cfg
        self.streams = streams
        self.model = load_serving_model(cfg)
        manifest = self.model.manifest
        self.decoder = make_decoder(cfg, manifest)
        self.encoder = ForecastEncoder.for_manifest(manifest, precision=cfg.output.precision or None)
        self.metrics = Metrics(CollectorRegistry(), max_stream_labels=cfg.metrics.max_stream_labels)
        self.metrics.set_model(manifest, self.model.runtime_name, self.model.runtime_version)
        self.table = StateTable(manifest.layers, len(manifest.pipeline.columns), cfg.state.capacity)
        self.engine = Engine(self.model, self.table)
        self.queue: collections.deque[Reading] = collections.deque()
        # One tick of every stream per batch, as the worker sees a steady load without a backlog.
        self.batch = min(streams, cfg.engine.max_batch)
        self.topic_streams = [f"s{i}" for i in range(streams)]
        self.next_g = 0

    def bodies(self, n: int) -> list[tuple[str, bytes]]:
        g0 = self.next_g
        self.next_g += n
        return [(self.topic_streams[g % self.streams], payload(g, self.streams)) for g in range(g0, g0 + n)]

    def round(self, n: int) -> dict[str, float]:
        """One round of ``n`` readings through every stage; seconds per stage."""
        bodies = self.bodies(n)
        clock = time.thread_time  # CPU time of this thread: other processes on the cores do not inflate it
        decode = self.decoder.decode
        t0 = clock()
        readings: list[Reading] = []
        for stream, body in bodies:
            readings.extend(decode(body, stream, 0.0, 0.0).readings)
        t_decode = clock() - t0

        q = self.queue
        t0 = clock()
        q.extend(readings)
        batches: list[list[Reading]] = []
        while q:
            batches.append([q.popleft() for _ in range(min(self.batch, len(q)))])
        t_queue = clock() - t0

        t0 = clock()
        results: list[BatchResult] = [self.engine.process(b) for b in batches]
        t_engine = clock() - t0
        t_model = sum(r.inference_seconds for r in results)

        encode = self.encoder.encode
        t0 = clock()
        for res in results:
            for f in res.forecasts:
                encode(f)
        t_encode = clock() - t0

        record = self.metrics.record_batch
        active = len(self.table)
        t0 = clock()
        for res in results:
            record(res, 0.0, active)
        t_metrics = clock() - t0
        return {
            "decode": t_decode,
            "queue": t_queue,
            "engine": t_engine,
            "model": t_model,
            "encode": t_encode,
            "metrics": t_metrics,
            "batches": float(len(batches)),
        }


class _RecordingLink:
    """Stands in for the MQTT link: keeps the tokens of what would be published."""

    def __init__(self) -> None:
        self.tokens: list[object] = []
        self.acks = 0
        self.outstanding = 0
        self.hold = False
        self.connects = 1  # the link's connection number

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, token: object = None) -> bool:
        self.tokens.append(token)
        return True

    def flush(self) -> None:
        pass

    def ack(self, mid: int, qos: int) -> None:
        self.acks += 1


class Whole:
    """The daemon's real pipeline, end to end, with a recording link and a journal without sync."""

    def __init__(self, streams: int, directory: Path) -> None:
        base = Pipeline(streams)
        self.base = base
        manifest = base.model.manifest
        self.link = _RecordingLink()
        self.journal = Journal(directory, manifest.sha256, sync=False)
        self.journal.reset([])
        table = StateTable(manifest.layers, len(manifest.pipeline.columns), base.cfg.state.capacity)
        self.pipeline = DaemonPipeline(base.cfg, Engine(base.model, table), base.decoder, base.encoder,
                                       self.link, base.metrics, self.journal)  # type: ignore[arg-type]  # fmt: skip
        self.mid = 0

    def round(self, n: int) -> float:
        bodies = self.base.bodies(n)
        p, link = self.pipeline, self.link
        msgs = []
        for stream, body in bodies:
            self.mid = self.mid % 65535 + 1
            msgs.append(Inbound(f"sensors/{stream}/value", body, self.mid, 1, False, False, 0.0))
        clock = time.thread_time
        t0 = clock()
        accept, step, done = p.accept, p.step, p.on_published
        for m in msgs:
            accept(m)
        while p.queue:
            step(self.base.batch)
            for token in link.tokens:
                done(token, True)
            link.tokens.clear()
            p.commit()
        elapsed = clock() - t0
        if self.journal.size > 64 << 20:  # as a checkpoint would
            self.journal.reset([])
        return elapsed


def measure(streams: int, *, quick: bool, repeats: int | None = None) -> dict[str, Any]:
    p = Pipeline(streams)
    n = _readings_per_round(streams, quick)
    p.round(max(streams, 200))  # warm: every stream has a state row, caches filled
    reps = repeats or (3 if quick else 7)
    rounds = [p.round(n) for _ in range(reps)]
    per_reading = {s: statistics.median(r[s] for r in rounds) / n * 1e6 for s in STAGES}
    own = _own_total(per_reading)
    with tempfile.TemporaryDirectory(prefix="edge-lstm-bench-") as tmp:
        whole = Whole(streams, Path(tmp))
        whole.round(max(streams, 200))
        whole_us = statistics.median(whole.round(n) for _ in range(reps)) / n * 1e6
    return {
        "whole_us_per_reading": whole_us,
        "streams": streams,
        "readings_per_round": n,
        "repeats": reps,
        "batch_size": n / statistics.median(r["batches"] for r in rounds),
        "us_per_reading": per_reading,
        "us_per_reading_total": own,
        "spread_total_us": _spread(rounds, n),
        "readings_per_s_one_core": 1e6 / own if own else None,
    }


def _own_total(stage_times: dict[str, float]) -> float:
    """The sum over the stages, without ``model`` (it is inside ``engine``)."""
    return sum(stage_times[s] for s in STAGES if s != "model")


def _spread(rounds: list[dict[str, float]], n: int) -> list[float]:
    totals = sorted(_own_total(r) / n * 1e6 for r in rounds)
    return [totals[0], totals[-1]]


def run(*, quick: bool, progress: Callable[[str], None] = _LOG.info) -> dict[str, Any]:
    out: dict[str, Any] = {"stages": {s: _STAGE_DOC[s] for s in STAGES}, "streams": {}}
    for s in QUICK_STREAMS if quick else STREAMS:
        res = measure(s, quick=quick)
        out["streams"][str(s)] = res
        progress(
            f"pipeline S={s}: {res['us_per_reading_total']:.1f} us/reading in stages, "
            f"{res['whole_us_per_reading']:.1f} whole "
            + ", ".join(f"{k} {v:.1f}" for k, v in res["us_per_reading"].items())
        )
    return out


_STAGE_DOC = {
    "decode": "PayloadDecoder.decode of one JSON body",
    "queue": "intake queue append and batch taking (deque)",
    "engine": "Engine.process (includes model)",
    "model": "model step inside the engine",
    "encode": "ForecastEncoder.encode",
    "metrics": "Metrics.record_batch",
}


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
