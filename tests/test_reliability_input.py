"""Reliability 4, 5, 6: hostile payloads, overload, stream explosion."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_lstm.outcomes import Outcome
from edge_lstm.payload import PayloadDecoder, PayloadError
from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess
from tests.support.faults import flood_command, peak_rss_kib, record, reliability_report, rss_kib  # noqa: F401

pytestmark = pytest.mark.usefixtures("reliability_report")

NOW = 1_717_000_000.0
SKEW = 86_400.0
MAX_BYTES = 65_536

# Memory caps asserted on the daemon process (resident set, KiB).  The daemon idles at about 60 MB
# with the bundled model loaded; the caps leave room for the interpreter and Python's allocator.
HOSTILE_GROWTH_CAP_KIB = 30 * 1024
OVERLOAD_PEAK_CAP_KIB = 200 * 1024
EXPLOSION_PEAK_CAP_KIB = 200 * 1024


def _decoder() -> PayloadDecoder:
    return PayloadDecoder(["demand_mw"], max_payload_bytes=MAX_BYTES, max_clock_skew_s=SKEW)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


# (label, body, expected outcomes) - the same list feeds the decoder and the live daemon.
# Timestamps are relative to the arrival time (filled in with ``now``).
def hostile_bodies(now: float) -> list[tuple[str, bytes, dict[Outcome, int]]]:
    O = Outcome  # noqa: E741
    return [
        ("random bytes", bytes(range(256)) * 4, {O.BAD_PAYLOAD: 1}),
        ("invalid UTF-8", b'{"demand_mw": 1\xc3\x28}', {O.BAD_PAYLOAD: 1}),
        ("lone surrogate escape", b'{"demand_mw": 1, "x": "\\ud800", "ts": %d}' % int(now - 9000), {O.PROCESSED: 1}),
        ("NaN bare", b"NaN", {O.NON_FINITE: 1}),
        ("-Infinity bare", b"-Infinity", {O.NON_FINITE: 1}),
        ("NaN in JSON", b'{"demand_mw": NaN}', {O.NON_FINITE: 1}),
        ("Infinity in JSON", b'{"demand_mw": Infinity}', {O.NON_FINITE: 1}),
        ("1e308", b"1e308", {O.NON_FINITE: 1}),
        ("1e309 (overflows to inf)", b'{"demand_mw": 1e309}', {O.NON_FINITE: 1}),
        ("400-digit integer", b'{"demand_mw": 1' + b"0" * 400 + b"}", {O.NON_FINITE: 1}),
        ("5000-digit integer", b'{"demand_mw": 1' + b"0" * 5000 + b"}", {O.BAD_PAYLOAD: 1}),
        ("nested 1000 deep (2 KB)", _nested(1000), {O.BAD_PAYLOAD: 1}),
        ("nested 30000 deep (60 KB)", _nested(30000), {O.BAD_PAYLOAD: 1}),
        ("nested 100000 deep (200 KB)", _nested(100000), {O.TOO_LARGE: 1}),
        ("1 MB body", b"[" + b"1," * 524_287 + b"1]", {O.TOO_LARGE: 1}),
        ("empty body", b"", {O.BAD_PAYLOAD: 1}),
        ("whitespace body", b" \t\r\n ", {O.BAD_PAYLOAD: 1}),
        ("string value", b'{"demand_mw": "12"}', {O.BAD_PAYLOAD: 1}),
        ("boolean value", b'{"demand_mw": true}', {O.BAD_PAYLOAD: 1}),
        ("missing field", b'{"temp": 12}', {O.MISSING_FIELD: 1}),
        ("JSON string body", b'"12"', {O.BAD_PAYLOAD: 1}),
        ("empty array", b"[]", {O.BAD_PAYLOAD: 1}),
        ("ts at epoch 1 s", json.dumps({"ts": 1, "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts year 3000", json.dumps({"ts": 32503680000, "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts 9999-12-31", json.dumps({"ts": "9999-12-31T23:59:59Z", "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts 1e300", json.dumps({"ts": 1e300, "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts negative", json.dumps({"ts": -5, "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts garbage string", json.dumps({"ts": "yesterday", "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        ("ts 1 MB-ish string", json.dumps({"ts": "9" * 60_000, "demand_mw": 1}).encode(), {O.BAD_TIMESTAMP: 1}),
        (
            "array: 2 good, 5 bad",
            json.dumps(
                [
                    {"ts": now - 7200, "demand_mw": 1.0},
                    "x",
                    None,
                    {"demand_mw": 1e13},
                    {"ts": 1, "demand_mw": 1},
                    {"t": 1},
                    {"ts": now - 5400, "demand_mw": 2.0},
                ]
            ).encode(),
            {O.PROCESSED: 2, O.BAD_PAYLOAD: 2, O.NON_FINITE: 1, O.BAD_TIMESTAMP: 1, O.MISSING_FIELD: 1},
        ),
        ("array of 2000 numbers", json.dumps([1.0] * 2000).encode(), {O.TOO_LARGE: 1}),
    ]


def _decode_outcomes(dec: PayloadDecoder, body: bytes, now: float) -> collections.Counter[Outcome]:
    out: collections.Counter[Outcome] = collections.Counter()
    try:
        res = dec.decode(body, "h", now, 0.0)
    except PayloadError as e:
        out[e.outcome] += 1
        return out
    out[Outcome.PROCESSED] += len(res.readings)
    out.update(res.rejected)
    return out


# -- 4: hostile payloads ----------------------------------------------------------------------------------


def test_decoder_classifies_every_hostile_body_exactly() -> None:
    dec = _decoder()
    for label, body, want in hostile_bodies(NOW):
        assert _decode_outcomes(dec, body, NOW) == collections.Counter(want), label


_HYPO_STATS: dict[str, int] = collections.defaultdict(int)
_KEYS = ["ts", "demand_mw", "value", "x"]
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=40,
)  # fmt: skip


def _hostile_strategy() -> st.SearchStrategy[bytes]:
    ts = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**25), 10**25), st.text(max_size=40))
    reading = st.fixed_dictionaries({"demand_mw": st.floats(allow_nan=True, allow_infinity=True)}, optional={"ts": ts})
    return st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=64).map(lambda b: b"\xff" + b),
        _json.map(lambda d: json.dumps(d, allow_nan=True).encode()),
        st.lists(reading, max_size=40).map(lambda r: json.dumps(r, allow_nan=True).encode()),
        st.integers(1, 5000).map(_nested),
        st.sampled_from([b"", b"NaN", b"inf", b"-Infinity", b"1e308", b"1e309", b"-0", b" 42 "]),
        st.integers(MAX_BYTES - 4, MAX_BYTES + 4).map(lambda n: b"[" + b"1," * ((n - 3) // 2) + b"1]"),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_hostile_strategy())
def _decode_one_hostile_body(body: bytes) -> None:
    dec = _decoder()
    tracemalloc.start()
    try:
        try:
            res = dec.decode(body, "h", NOW, 0.0)
            outcome = None
        except PayloadError as e:
            res, outcome = None, e.outcome
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _HYPO_STATS["examples"] += 1
    _HYPO_STATS["peak"] = max(_HYPO_STATS["peak"], peak)
    # memory: a bounded multiple of the (bounded) body size, whatever the content
    assert peak <= 64 * 1024 + 40 * min(len(body), MAX_BYTES), (len(body), peak)
    if res is None:
        assert isinstance(outcome, Outcome)
        _HYPO_STATS[f"raised {outcome.value}"] += 1
        if len(body) > MAX_BYTES:
            assert outcome is Outcome.TOO_LARGE
        return
    assert len(body) <= MAX_BYTES
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, list):
        assert res.count == len(doc)  # every element is a reading or a rejection
    else:
        assert res.count == 1
    for r in res.readings:
        assert all(math.isfinite(v) and abs(v) <= 1e12 for v in r.values)
        assert math.isfinite(r.ts) and abs(r.ts - NOW) <= SKEW
    _HYPO_STATS["readings"] += len(res.readings)
    _HYPO_STATS["rejected elements"] += len(res.rejected)


def test_decoder_under_hypothesis_never_fails_counts_exactly_and_stays_small() -> None:
    _HYPO_STATS.clear()
    _decode_one_hostile_body()
    assert _HYPO_STATS["examples"] >= 100
    record("4", "hypothesis bodies decoded (random bytes, bad UTF-8, JSON trees, NaN/Inf, nesting, sizes)",
           _HYPO_STATS["examples"], "no exception but PayloadError; count = elements")  # fmt: skip
    record("4", "largest decoder allocation for one body (tracemalloc peak)", f"{_HYPO_STATS['peak'] / 1024:.0f} KiB",
           "<= 64 KiB + 40 x body size")  # fmt: skip


def test_hostile_batch_through_the_daemon_is_counted_exactly(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(broker, overrides={"input": {"max_clock_skew_s": SKEW}}).start()
    rss0 = rss_kib(d.pid)
    now = time.time()
    dec = _decoder()
    bodies = hostile_bodies(now)
    want: collections.Counter[Outcome] = collections.Counter()
    for _label, _body, per_body in bodies:
        want.update(per_body)
    assert _decode_outcomes(dec, bodies[-2][1], now) == collections.Counter(bodies[-2][2])

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    rounds = 3
    good = 0
    infos = []
    for r in range(rounds):
        for i, (_label, body, _e) in enumerate(bodies):
            # one good reading of its own stream between hostile ones: still forecast
            infos.append(c.publish("sensors/good/value", json.dumps(
                {"ts": now - SKEW + 600 + 1800 * (r * len(bodies) + i), "demand_mw": 25000.0}), qos=1))  # fmt: skip
            good += 1
            # the hostile stream gets a distinct stream id per round so its own good elements are not out of order
            infos.append(c.publish(f"sensors/h{r}/value", body, qos=1))
    for info in infos:
        info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()
    total = rounds * sum(want.values()) + good
    assert d.wait_metric("edge_lstm_readings_received_total", total, timeout=30) == total, d.log()
    deadline = time.monotonic() + 20
    while sum(d.outcomes().values()) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    outcomes = d.outcomes()
    expected: dict[str, int] = {str(o.value): rounds * n for o, n in want.items()}
    expected["processed"] = expected.get("processed", 0) + good
    got = {k: int(v) for k, v in outcomes.items() if v}
    assert got == expected
    # a forecast counts as published once the broker acknowledged it: wait for the last PUBACKs
    assert d.wait_metric("edge_lstm_forecasts_published_total", expected["processed"]) == expected["processed"]
    assert d.running
    growth = rss_kib(d.pid) - rss0
    assert growth < HOSTILE_GROWTH_CAP_KIB, f"RSS grew by {growth} KiB"
    assert d.terminate() == 0
    record("4", "hostile bodies sent to the live daemon (31 kinds x 3 rounds) + good readings between them",
           f"{rounds * len(bodies)} + {good}", "-")  # fmt: skip
    record("4", "readings received (array elements counted one by one)", total, "= sum of outcome counters")
    for o in sorted(expected):
        record("4", f"outcome {o}", expected[o], "exact")
    record("4", "daemon RSS growth over the batch (incl. 3 x 1 MB bodies)", f"{growth / 1024:.1f} MB",
           f"< {HOSTILE_GROWTH_CAP_KIB // 1024} MB; process alive")  # fmt: skip


# -- 5: overload -----------------------------------------------------------------------------------------

OVERLOAD_S = 3.0
OVERLOAD_QUEUE = 2000
# About 10x what the daemon sustains with 1000 streams on the 2-core CI machine (5-7k readings/s:
# every forecast is a QoS 1 publish).  The daemon reads no faster than it steps: the rest waits,
# unacknowledged, in the broker (the test broker queues up to 100 000 messages per client).
OVERLOAD_RATE = 60_000
OVERLOAD_TOTAL = 60_000


def _drained(d: DaemonProcess, total: float, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    outcomes: dict[str, float] = {}
    while time.monotonic() < deadline:
        outcomes = d.outcomes()
        if (
            d.metric("edge_lstm_readings_received_total") >= total
            and sum(outcomes.values()) >= total
            and d.metric("edge_lstm_queue_depth") == 0
        ):
            return outcomes
        time.sleep(0.1)
    return outcomes


class _PeakSampler:
    """Samples a process's RSS every 50 ms (VmHWM covers the peak; this gives the curve's maximum too)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kib = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.max_kib = max(self.max_kib, rss_kib(self.pid))
            except (OSError, KeyError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.max_kib


def test_overload_keeps_memory_capped_and_counts_every_reading(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(
        broker,
        overrides={
            "input": {"topics": ["bulk/#"], "stream_field": "id", "max_array_len": 1000},
            "engine": {"queue_size": OVERLOAD_QUEUE, "max_batch": 256},
            "state": {"capacity": 2000},
        },
    ).start()
    sampler = _PeakSampler(d.pid)
    depths: list[float] = []
    t0 = time.monotonic()
    flood = subprocess.Popen(
        flood_command(broker.host, broker.port, total=OVERLOAD_TOTAL, array=500, streams=1000, rate=OVERLOAD_RATE),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    while flood.poll() is None:
        depths.append(d.metric("edge_lstm_queue_depth"))
        time.sleep(0.05)
    flood_s = time.monotonic() - t0
    out, _ = flood.communicate(timeout=OVERLOAD_S + 120)
    assert flood.returncode == 0
    sent = json.loads(out.strip().splitlines()[-1])
    published = sent["readings"]
    processed_during = d.metric("edge_lstm_readings_total", outcome="processed")
    outcomes = _drained(d, published, timeout=400)
    drain_s = time.monotonic() - t0
    peak = max(sampler.stop(), peak_rss_kib(d.pid))
    received = d.metric("edge_lstm_readings_received_total")
    processed = outcomes.get("processed", 0)
    rejected = sum(v for k, v in outcomes.items() if k != "processed")
    assert processed_during < published, "the flood did not overload the daemon: no test of backpressure"
    assert received == published, (received, published)
    assert processed == published and rejected == 0, outcomes  # nothing dropped: the broker held the rest
    # The queue stops growing at its bound while the daemon can step; while too many forecasts await
    # PUBACKs it reads on (only those PUBACKs make room), and what comes in then is up to the broker.
    # Mosquitto 2.0.11 does not hold its in-flight window (20) then: after one PUBACK it sends a whole
    # window of queued messages again (checked by hand: 20 unacknowledged, one PUBACK, 40). So the
    # bound that holds is on memory, not on the queue.
    assert max(depths) < published, "the daemon took the whole flood in: the broker held none of it"
    assert peak < OVERLOAD_PEAK_CAP_KIB, f"peak RSS {peak} KiB"
    assert d.running
    assert d.terminate() == 0
    offered = published / flood_s
    rate = max(processed_during, 1) / flood_s
    record("5", "flood", f"{flood_s:.1f} s, {sent['messages']} messages of 500 readings, 1000 streams",
           "queue 2000, capacity 2000")  # fmt: skip
    record("5", "offered rate / processed rate during the flood", f"{offered:,.0f}/s / {rate:,.0f}/s "
           f"(x{offered / rate:.1f})", "processed < published during the flood (overloaded)")  # fmt: skip
    record("5", "largest intake queue seen", int(max(depths)),
           f"{OVERLOAD_QUEUE} while stepping; more while forecasts await PUBACKs (Mosquitto 2.0.11 then "
           "sends past its in-flight window); < published")  # fmt: skip
    record("5", "received / processed / dropped or rejected", f"{int(received)} / {int(processed)} / {int(rejected)}",
           "= published / = published / 0: the broker holds what the daemon has not read")  # fmt: skip
    record("5", "all processed after", f"{drain_s:.1f} s", "-")
    record("5", "daemon peak RSS", f"{peak / 1024:.0f} MB", f"< {OVERLOAD_PEAK_CAP_KIB // 1024} MB")


# -- 6: stream explosion ------------------------------------------------------------------------------------

EXPLOSION_STREAMS = 100_000
EXPLOSION_CAPACITY = 1000


def test_stream_explosion_holds_the_table_at_capacity(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(
        broker,
        overrides={
            "input": {"topics": ["bulk/#"], "stream_field": "id", "max_array_len": 1000},
            "state": {"capacity": EXPLOSION_CAPACITY},
            "engine": {"queue_size": 20000},
        },
    ).start()
    sampler = _PeakSampler(d.pid)
    r = subprocess.run(
        flood_command(broker.host, broker.port, total=EXPLOSION_STREAMS, array=1000, streams=0, prefix="dev-"),
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    assert json.loads(r.stdout.strip().splitlines()[-1])["readings"] == EXPLOSION_STREAMS
    outcomes = _drained(d, EXPLOSION_STREAMS, timeout=400)  # all are processed: minutes on a loaded machine
    peak = max(sampler.stop(), peak_rss_kib(d.pid))
    processed = outcomes.get("processed", 0)
    evictions = d.metric("edge_lstm_stream_evictions_total")
    active = d.metric("edge_lstm_streams_active")
    series = len(d.metrics())
    assert d.metric("edge_lstm_readings_received_total") == EXPLOSION_STREAMS
    assert processed == EXPLOSION_STREAMS, outcomes  # none dropped
    assert active == EXPLOSION_CAPACITY
    assert evictions == processed - EXPLOSION_CAPACITY  # every processed reading was a new stream
    assert series < 400, f"{series} metric series: stream ids leak into labels"
    assert peak < EXPLOSION_PEAK_CAP_KIB, f"peak RSS {peak} KiB"
    assert d.terminate() == 0
    record("6", "distinct stream ids published (100 messages x 1000)", EXPLOSION_STREAMS, "-")
    record("6", "processed", int(processed), "= 100 000 (nothing dropped)")
    record("6", "streams in the table at the end", int(active), f"= capacity {EXPLOSION_CAPACITY}")
    record("6", "evictions counted", int(evictions), "= processed - capacity")
    record("6", "metric series exported", series, "< 400 (no per-stream label growth)")
    record("6", "daemon peak RSS", f"{peak / 1024:.0f} MB", f"< {EXPLOSION_PEAK_CAP_KIB // 1024} MB")
