"""The pipeline: acknowledgement order, redelivery, journal replay, and faults that must not stop intake.

The in-process tests run the real daemon (``Daemon`` on its own loop thread) against a real Mosquitto; the
unit tests drive :class:`~edge_lstm.pipeline.Pipeline` with a stand-in link that records what would be
published and acknowledged (which acknowledgements go out, and when, is what they check).
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_lstm.config import Config, parse_config
from edge_lstm.daemon import Daemon, load_serving_model, make_decoder
from edge_lstm.engine import Engine
from edge_lstm.forecast import ForecastEncoder
from edge_lstm.journal import Journal, read_journal
from edge_lstm.metrics import Metrics
from edge_lstm.mqtt import READ_BUDGET, Inbound
from edge_lstm.payload import PayloadDecoder
from edge_lstm.pipeline import (
    FLUSH_EVERY,
    GATHER_SLICE_S,
    REDELIVERY_WINDOW,
    Pipeline,
    open_journal,
    replay_journal,
    routes_of,
    settle_heap,
)
from edge_lstm.state import StateTable
from tests.support.broker import Broker
from tests.support.collector import Collector, publisher
from tests.support.daemon import TAYLOR_MODEL
from tests.support.ports import free_port


def _config(tmp_path: Path, broker: Broker | None = None, **sections: dict[str, Any]) -> Config:
    data: dict[str, dict[str, Any]] = {
        "model": {"path": str(TAYLOR_MODEL)},
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port if broker else 1,
            "client_id": f"pipe-{tmp_path.name}"[:60],
            "reconnect_min_s": 1,
            "reconnect_max_s": 1,
        },
        "input": {"topics": ["sensors/{stream}/value"], "max_clock_skew_s": 0},
        "output": {"topic": "forecasts/{stream}"},
        "state": {"dir": str(tmp_path / "state"), "checkpoint_interval_s": 3600},
        "metrics": {"enabled": False, "port": free_port()},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def _reading(ts: float, v: float) -> bytes:
    return json.dumps({"ts": ts, "demand_mw": v}).encode()


def test_an_exception_in_a_handler_or_a_batch_is_counted_and_intake_goes_on(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taylor_series: tuple[np.ndarray, np.ndarray]
) -> None:
    decode, process = PayloadDecoder.decode, Engine.process

    def bad_decode(self: PayloadDecoder, payload: bytes, *a: Any, **k: Any) -> Any:
        if payload == b'"boom"':
            raise RuntimeError("injected fault in the decoder")
        return decode(self, payload, *a, **k)

    def bad_process(self: Engine, readings: Any) -> Any:
        if any(r.stream == "explode" for r in readings):
            raise ZeroDivisionError("injected fault in the engine")
        return process(self, readings)

    monkeypatch.setattr(PayloadDecoder, "decode", bad_decode)
    monkeypatch.setattr(Engine, "process", bad_process)
    ts, values = taylor_series
    cfg = _config(tmp_path, broker)
    daemon = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
    try:
        with publisher(broker.host, broker.port) as pub, Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            daemon.start()
            sent = [
                ("sensors/a/value", _reading(float(ts[0]), float(values[0]))),
                ("sensors/a/value", b'"boom"'),
                ("sensors/explode/value", _reading(float(ts[0]), float(values[0]))),
                ("sensors/a/value", _reading(float(ts[1]), float(values[1]))),
                ("sensors/a/value", b'"boom"'),
                ("sensors/a/value", _reading(float(ts[2]), float(values[2]))),
            ]
            for topic, payload in sent:
                pub.publish(topic, payload, qos=1).wait_for_publish(10)
            got = col.wait_for(3, "forecasts/#", timeout=20, retained=False)
            assert [m.json()["ts_epoch"] for m in got] == [float(ts[0]), float(ts[1]), float(ts[2])]
            reg = daemon.registry

            def sample(name: str, **labels: str) -> float:
                return reg.get_sample_value(name, labels) or 0.0

            deadline = time.monotonic() + 10
            while sample("edge_lstm_readings_total", outcome="internal_error") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            # 2 decodes + the one reading the engine fails on (its batch is stepped again one by one)
            assert sample("edge_lstm_readings_total", outcome="internal_error") == 3
            assert sample("edge_lstm_readings_total", outcome="processed") == 3
            assert sample("edge_lstm_readings_received_total") == 6
            assert daemon.pipeline is not None and daemon.pipeline.errors >= 3
            assert daemon._thread is not None and daemon._thread.is_alive()
        daemon.stop()
        # Every message was settled and acknowledged, faulty ones included: nothing comes back.
        again = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
        again.start()
        time.sleep(1.0)
        assert (again.registry.get_sample_value("edge_lstm_readings_received_total") or 0) == 0
        again.stop()
    finally:
        daemon.stop()


class FakeLink:
    """Records publishes and acknowledgements; the test plays the broker's PUBACKs."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, object]] = []
        self.acks: list[int] = []
        self.outstanding = 0
        self.hold = False
        self.connects = 1  # the link's connection number
        self.flushed_at: list[int] = []  # forecasts published when each flush came

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, token: object = None) -> bool:
        self.published.append((topic, payload, token))
        return True

    def flush(self) -> None:
        self.flushed_at.append(len(self.published))

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)


def _pipeline(tmp_path: Path, **sections: dict[str, Any]) -> tuple[Pipeline, FakeLink]:
    cfg = _config(tmp_path, **sections)
    model = load_serving_model(cfg)
    m = model.manifest
    engine = Engine(model, StateTable(m.layers, len(m.pipeline.columns), 100))
    link = FakeLink()
    journal = Journal(tmp_path / "state", m.sha256, sync=False)
    journal.reset([])
    p = Pipeline(cfg, engine, make_decoder(cfg, m), ForecastEncoder.for_manifest(m), link,  # type: ignore[arg-type]
                 Metrics(CollectorRegistry(), process_collectors=False), journal)  # fmt: skip
    return p, link


def _msg(mid: int, payload: bytes, *, stream: str = "a", dup: bool = False, retain: bool = False) -> Inbound:
    return Inbound(f"sensors/{stream}/value", payload, mid, 1, dup, retain, time.monotonic())


def test_acknowledgements_wait_for_the_forecasts_puback_and_go_out_in_arrival_order(tmp_path: Path) -> None:
    p, link = _pipeline(tmp_path)
    p.accept(_msg(1, _reading(1e9, 25000)))
    p.accept(_msg(2, b"not json"))  # rejected: no forecast due, but it waits behind message 1
    p.accept(_msg(3, _reading(1e9, 25000), stream="b"))
    p.step(1)  # only message 1's reading
    assert p.commit() == 0 and link.acks == []  # its forecast is not acknowledged yet
    (_, _, batch1), = link.published
    p.step(10)
    (_, _, batch3) = link.published[1]
    p.on_published(batch3, True)
    assert p.commit() == 0 and link.acks == []  # 3 is settled, but 1 is not: order holds
    p.on_published(batch1, True)
    assert p.commit() == 3 and link.acks == [1, 2, 3]
    assert p.quiescent
    # Messages 1 and 3 are journaled (they changed the state); the rejected one is not.
    found = read_journal(tmp_path / "state", p.engine.model.manifest.sha256)
    assert [(r.mid, r.payload) for r in found.records] == [(1, _reading(1e9, 25000)), (3, _reading(1e9, 25000))]


def test_a_large_step_writes_its_forecasts_to_the_socket_as_it_goes(tmp_path: Path) -> None:
    # A backlog after a pause is stepped at once; the oldest readings (first in the step) must not
    # also wait for the encoding of all the others before their forecasts leave.
    p, link = _pipeline(tmp_path)
    for i in range(40):
        p.accept(_msg(i + 1, _reading(1e9, 25000), stream=f"s{i}"))
    assert p.step(256) == 40
    assert len(link.published) == 40 and link.flushed_at == [FLUSH_EVERY, 2 * FLUSH_EVERY] == [16, 32]
    p.step(256)  # nothing queued: no write
    assert link.flushed_at == [16, 32]


def test_a_redelivered_message_is_recognised_and_not_processed_twice(tmp_path: Path) -> None:
    p, link = _pipeline(tmp_path)
    p.accept(_msg(7, _reading(1e9, 25000)))
    p.step(10)
    p.accept(_msg(7, _reading(1e9, 25000), dup=True))  # a reconnect while the first copy is in flight
    assert len(p.queue) == 0 and len(link.published) == 1
    p.on_published(link.published[0][2], True)
    assert p.commit() == 1 and link.acks == [7]
    p.accept(_msg(7, _reading(1e9, 25000), dup=True))  # our acknowledgement was lost: acknowledge again only
    assert len(p.queue) == 0
    assert p.commit() == 1 and link.acks == [7, 7]
    assert p.metrics.messages_redelivered._value.get() == 2  # type: ignore[attr-defined]
    p.accept(_msg(7, _reading(1e9 + 1800, 25100), dup=True))  # same id, other content: a new message
    assert len(p.queue) == 1
    # Forecasts made from redelivered messages are counted as they are made (a subscriber may have them),
    # and only those: a redelivered reading that makes none (late) counts nothing.
    before = len(link.published)
    p.step(10)
    made = len(link.published) - before
    assert made >= 1 and p.metrics.forecasts_redelivered._value.get() == made  # type: ignore[attr-defined]
    p.accept(_msg(8, _reading(1e9 - 3600, 24000), dup=True))  # older than the stream's newest: late
    p.step(10)
    assert p.metrics.readings.labels("late")._value.get() == 1  # type: ignore[attr-defined]
    assert p.metrics.forecasts_redelivered._value.get() == made  # type: ignore[attr-defined]


def test_a_repeated_message_is_new_once_its_packet_id_has_gone_round(tmp_path: Path) -> None:
    """A sensor sending the same bare value: after 65,535 messages the broker gives a packet id to a message
    with the same topic and body as the last one that had it. If that message is lost in a dropped connection
    and redelivered, it is a new message and must be processed, not taken for a redelivery."""
    p, link = _pipeline(tmp_path)
    p.accept(_msg(9, b"25000"))
    _step_and_settle_all(p, link, 10)  # processed and acknowledged long ago
    p.accept(_msg(3, b"24000", stream="slow"))  # taken in, not yet acknowledged (a deep backlog)
    for i in range(REDELIVERY_WINDOW):  # the ids go round: many other messages since
        p.accept(_msg(10 + i % 60_000, _reading(1e9 + 1800 * i, 25000), stream="other"))
    p.queue.clear()
    p.accept(_msg(9, b"25000", dup=True))
    assert len(p.queue) == 1
    assert p.metrics.messages_redelivered._value.get() == 0  # type: ignore[attr-defined]
    # A message still waiting for its acknowledgement is recognised however many came since.
    p.accept(_msg(3, b"24000", stream="slow", dup=True))
    assert len(p.queue) == 1 and p.metrics.messages_redelivered._value.get() == 1  # type: ignore[attr-defined]
    # One of the latest messages is still recognised.
    p.accept(_msg(10 + (REDELIVERY_WINDOW - 1) % 60_000, _reading(1e9 + 1800 * (REDELIVERY_WINDOW - 1), 25000),
                  stream="other", dup=True))  # fmt: skip
    assert len(p.queue) == 1
    assert p.metrics.messages_redelivered._value.get() == 2  # type: ignore[attr-defined]


def test_a_message_from_an_earlier_connection_is_not_acknowledged_on_a_new_one(tmp_path: Path) -> None:
    """After a reconnect a packet id may name another message (the broker restarted, or the session is new):
    the PUBACK of a message read on the old connection would settle the new one unread, and a kill before
    its forecast would lose it."""
    p, link = _pipeline(tmp_path)
    p.accept(_msg(6, _reading(1e9, 25000)))  # connection 1
    p.step(10)
    link.connects = 2  # the broker came back without the session, and gives packet id 6 to a new message
    p.accept(_msg(6, _reading(1e9, 26000), stream="z"))
    _step_and_settle_all(p, link, 10)
    assert link.acks == [6]  # once: the new message's
    assert p.quiescent and len(link.published) == 2
    found = read_journal(tmp_path / "state", p.engine.model.manifest.sha256)
    assert [r.mid for r in found.records] == [6, 6]  # both are in the state


def test_a_message_the_broker_sends_again_on_a_new_connection_is_acknowledged_there(tmp_path: Path) -> None:
    p, link = _pipeline(tmp_path)
    p.accept(_msg(7, _reading(1e9, 25000)))  # connection 1
    p.step(10)
    link.connects = 2  # the broker kept the session and sends message 7 again
    p.accept(_msg(7, _reading(1e9, 25000), dup=True))
    _step_and_settle_all(p, link, 10)
    assert link.acks == [7] and len(link.published) == 1  # processed once, acknowledged on this connection
    assert p.metrics.messages_redelivered._value.get() == 1  # type: ignore[attr-defined]


def _step_and_settle_all(p: Pipeline, link: FakeLink, max_batch: int) -> None:
    """Step everything queued, let the broker acknowledge every forecast, commit."""
    while p.queue:
        p.step(max_batch)
    for _, _, batch in link.published:
        while batch.outstanding > 0:  # type: ignore[attr-defined]
            p.on_published(batch, True)
    p.commit()


def test_journal_replay_rebuilds_the_state_the_messages_built(
    tmp_path: Path, taylor_series: tuple[np.ndarray, np.ndarray]
) -> None:
    ts, values = taylor_series
    p, link = _pipeline(tmp_path)
    for i in range(60):
        p.accept(_msg(i + 1, _reading(float(ts[i]), float(values[i])), stream=f"s{i % 3}"))
        p.step(7)
        for _, _, batch in link.published[-7:]:
            if batch.outstanding:  # type: ignore[attr-defined]
                p.on_published(batch, True)
        p.commit()
    _step_and_settle_all(p, link, 7)
    assert len(link.acks) == 60
    m = p.engine.model.manifest
    fresh = Engine(p.engine.model, StateTable(m.layers, 1, 100))
    found = read_journal(tmp_path / "state", m.sha256)
    assert replay_journal(found.records, 0, fresh, p.decoder, routes_of(p.cfg)) == 60
    for s in ("s0", "s1", "s2"):
        a, b = p.engine.table.row(s), fresh.table.row(s)
        assert a is not None and b is not None
        for x, y in zip(p.engine.table.gather(np.array([a])), fresh.table.gather(np.array([b])), strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_damaged_journal_is_kept_aside_and_its_unreadable_bytes_reported(tmp_path: Path) -> None:
    p, link = _pipeline(tmp_path)
    for i in range(30):
        p.accept(_msg(i + 1, _reading(1e9 + 1800 * i, 25000 + i)))
    _step_and_settle_all(p, link, 5)
    state, fp = tmp_path / "state", p.engine.model.manifest.sha256
    path = state / "journal.wal"
    data = bytearray(path.read_bytes())
    assert len(read_journal(state, fp).records) == 30
    data[len(data) // 3] ^= 0xFF  # a flipped byte a third of the way in: every record from there on is lost
    path.write_bytes(bytes(data))
    journal, records, dropped = open_journal(state, fp, sync=False)
    assert 0 < len(records) < 30
    assert dropped == len(data) - journal.size > 0 and path.stat().st_size == journal.size
    assert (state / "journal.wal.damaged").read_bytes() == bytes(data)  # the evidence, as found
    # Another model's journal: nothing replayed, and nothing reported lost (its messages were forecast by
    # that model, whose state this one does not start from), no copy kept as damaged.
    (state / "journal.wal.damaged").unlink()
    _, records, dropped = open_journal(state, "0" * 64, sync=False)
    assert records == [] and dropped == 0 and not (state / "journal.wal.damaged").exists()
    # This model's journal with its fingerprint bytes damaged: reported and kept, not taken for another model's.
    Journal(state, fp, sync=False).reset([])
    good = bytearray(path.read_bytes())
    good[20] = ord("!")  # inside the 64 fingerprint characters
    path.write_bytes(bytes(good))
    (state / "journal.wal.damaged").unlink(missing_ok=True)
    _, records, dropped = open_journal(state, fp, sync=False)
    assert records == [] and dropped == len(good) and (state / "journal.wal.damaged").exists()
    # A file that is no journal of this format: reported and kept.
    path.write_bytes(b"not a journal at all, " * 10)
    _, records, dropped = open_journal(state, "0" * 64, sync=False)
    assert records == [] and dropped == 220 and (state / "journal.wal.damaged").exists()
    # An intact journal: nothing dropped.
    assert open_journal(state, "0" * 64, sync=False)[2] == 0


def test_retained_messages_are_left_out_and_counted_unless_asked_for(tmp_path: Path) -> None:
    p, _ = _pipeline(tmp_path)
    p.accept(_msg(1, _reading(1e9, 25000), retain=True))
    assert len(p.queue) == 0
    assert p.metrics.readings.labels("retained")._value.get() == 1  # type: ignore[attr-defined]
    q, _ = _pipeline(tmp_path / "b", input={"retained": "process"})
    q.accept(_msg(1, _reading(1e9, 25000), retain=True))
    assert len(q.queue) == 1


def test_a_failing_journal_sync_is_counted_once_per_failed_sync_and_holds_the_acknowledgement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses fdatasync (EIO): the acknowledgement waits, and the failures counted are the sync
    thread's failed attempts (one every 0.5 s), not the loop's many commits meanwhile."""
    import errno
    import os

    p, link = _pipeline(tmp_path)
    p.journal.sync = True
    p.journal.start_syncing(lambda: None)

    def refuse(fd: int) -> None:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(os, "fdatasync", refuse)
    try:
        p.accept(_msg(1, _reading(1e9, 25000)))
        p.step(10)
        p.on_published(link.published[0][2], True)
        commits = 0
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert p.commit() == 0  # not on disk: not acknowledged
            commits += 1
            time.sleep(0.002)
        failures = p.metrics.journal_failures._value.get()  # type: ignore[attr-defined]
        assert link.acks == [] and commits > 100
        assert 1 <= failures == p.journal.sync_failures <= 4  # the thread retries every 0.5 s
    finally:
        monkeypatch.undo()
        p.journal.stop_syncing()
    assert p.commit() == 1 and link.acks == [1]  # the disk is back: the acknowledgement goes out


def test_after_a_failed_sync_the_unsynced_bytes_are_written_again_before_a_sync_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a writeback error once: after a failed fdatasync the kernel's copy of the pages can be
    clean but not on disk, and the next fdatasync succeeds without writing them.  So the bytes written
    since the last good sync are written again, where they were, before a sync may count them; until then
    nothing counts as synced, however long the sync thread waits."""
    import errno
    import os

    from edge_lstm.journal import Journal, Record

    j = Journal(tmp_path, "f" * 64, sync=True)
    j.reset([])
    real_sync, real_pwrite = os.fdatasync, os.pwrite
    events: list[object] = []

    def sync(fd: int) -> None:
        events.append("sync")
        if events.count("sync") == 1:
            raise OSError(errno.EIO, "input/output error")
        real_sync(fd)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        events.append(("pwrite", offset, bytes(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fdatasync", sync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    j.start_syncing(lambda: None)
    try:
        rec = Record.message(1, 7, 1, 0.0, "sensors/a/value", b'{"v": 1}')
        offset = j.size
        j.append(rec)
        assert j.commit() == len(rec.encode())
        deadline = time.monotonic() + 5
        while j.sync_failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.2)  # past the thread's retry time: without the bytes written again nothing may count
        assert j.synced < j.written, "counted as synced without the bytes written again"
        assert j.sync_failures == 1 and j.needs_rewrite
        assert j.commit() == 0  # nothing new to write: the unsynced bytes go again, then the sync
        deadline = time.monotonic() + 5
        while j.synced < j.written and time.monotonic() < deadline:
            time.sleep(0.01)
        assert j.synced == j.written
        assert events == ["sync", ("pwrite", offset, rec.encode()), "sync"]
        assert (tmp_path / "journal.wal").read_bytes()[offset:] == rec.encode()
    finally:
        j.stop_syncing()


def test_the_latest_digests_are_carried_in_order_and_recognise_a_redelivery_after_a_restart(tmp_path: Path) -> None:
    """What a checkpoint's new journal carries: the digests of the latest CARRY_DIGESTS messages, oldest
    first (the ring wraps); a pipeline that replays them knows a redelivered message as seen."""
    from edge_lstm.pipeline import CARRY_DIGESTS, _DigestRing

    ring = _DigestRing(3)
    for seq in range(1, 6):
        ring.append(seq, 65535 - seq, seq % 2, 1000 + seq)
    assert [(r.seq, r.mid, r.qos, r.digest, r.payload) for r in ring.records()] == [
        (3, 65532, 1, 1003, None), (4, 65531, 0, 1004, None), (5, 65530, 1, 1005, None),
    ]  # fmt: skip

    p, link = _pipeline(tmp_path)
    n = CARRY_DIGESTS + 5
    for i in range(n):
        mid = i % 65535 + 1
        p.accept(_msg(mid, _reading(1e9 + 1800 * i, 25000 + i)))
        p.step(10)
        p.on_published(link.published[-1][2], True)
        p.commit()
    carried = p.carry()
    assert [r.seq for r in carried] == list(range(n - CARRY_DIGESTS + 1, n + 1))
    assert all(r.payload is None and r.qos == 1 for r in carried)
    p.journal.reset(carried)
    after, _ = _pipeline(tmp_path / "restart")
    after.replay(read_journal(tmp_path / "state", p.engine.model.manifest.sha256).records, p.seq)
    last = n - 1
    after.accept(_msg(last % 65535 + 1, _reading(1e9 + 1800 * last, 25000 + last), dup=True))
    assert len(after.queue) == 0 and after.metrics.messages_redelivered._value.get() == 1  # type: ignore[attr-defined]


def test_one_streams_run_ends_the_wait_for_a_wider_batch(tmp_path: Path) -> None:
    """The loop waits up to engine.max_wait_ms for other streams to share a model step; when every reading
    queued since the last step is of one stream and it has sent twice (a single sensor, or its backlog), it
    steps at once.  With several streams queued the wait stays, and with max_wait_ms = 0 nothing is kept."""
    p, _ = _pipeline(tmp_path, engine={"max_wait_ms": 2})
    p.accept(_msg(1, _reading(1e9, 25000), stream="a"))
    assert not p.repeated
    p.accept(_msg(2, _reading(1e9 + 1800, 25100), stream="a"))
    assert p.repeated
    p.step(1)  # a reading is left behind: still no reason to wait
    assert p.repeated and len(p.queue) == 1
    p.step(10)
    assert not p.repeated and not p.queue
    for mid, stream in ((3, "a"), (4, "b"), (5, "a"), (6, "a")):
        p.accept(_msg(mid, _reading(1e9 + 1800 * mid, 25000), stream=stream))
    assert not p.repeated  # two streams: others may still join their step
    q, _ = _pipeline(tmp_path / "nowait", engine={"max_wait_ms": 0})
    for mid in (1, 2):
        q.accept(_msg(mid, _reading(1e9 + 1800 * mid, 25000), stream="a"))
    assert not q.repeated and q._run_stream is None


def test_readings_further_apart_than_the_wait_are_stepped_without_it(tmp_path: Path) -> None:
    """A wait for other streams pays off only when readings come closer together than the wait: a
    message that came longer than engine.max_wait_ms (2 ms) after the one before is stepped at once."""
    p, _ = _pipeline(tmp_path, engine={"max_wait_ms": 2})
    t = time.monotonic()
    for mid, stream, at, sparse in ((1, "a", t, True), (2, "b", t + 0.0005, False), (3, "c", t + 0.0105, True)):
        p.accept(Inbound(f"sensors/{stream}/value", _reading(1e9, 25000), mid, 1, False, False, at))
        assert p.sparse is sparse, (stream, p.sparse)
    p.accept(_msg(4, b"not json"))  # rejected: brings no reading, says nothing of the rate
    assert p.sparse


def test_the_loop_steps_at_once_when_a_stream_repeats_and_waits_for_other_streams(
    broker: Broker, tmp_path: Path, taylor_series: tuple[np.ndarray, np.ndarray]
) -> None:
    """With a long engine.max_wait_ms (1 s), a lone reading that follows another within the second waits
    for company; when a lone stream sends a second reading the wait ends (one stream's run: no other
    stream to share the step), so both forecasts come out at once; and a reading that comes after more
    than a second of quiet (readings further apart than the wait) is stepped at once."""
    ts, values = taylor_series
    cfg = _config(tmp_path, broker, engine={"max_wait_ms": 1000})
    daemon = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
    try:
        with publisher(broker.host, broker.port) as pub, Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            daemon.start()
            pub.publish("sensors/c/value", _reading(float(ts[0]), float(values[0])), qos=1).wait_for_publish(10)
            col.wait_for(1, "forecasts/c", timeout=20, retained=False)
            t0 = time.monotonic()
            pub.publish("sensors/b/value", _reading(float(ts[0]), float(values[0])), qos=1).wait_for_publish(10)
            col.wait_for(1, "forecasts/b", timeout=20, retained=False)
            assert time.monotonic() - t0 >= 0.9  # alone, within a second of c's: held back for up to a second
            # c again, a second after b (stepped at once), so that a's run starts within the second.
            pub.publish("sensors/c/value", _reading(float(ts[1]), float(values[1])), qos=1).wait_for_publish(10)
            col.wait_for(2, "forecasts/c", timeout=20, retained=False)
            t0 = time.monotonic()
            for i in (0, 1):
                pub.publish("sensors/a/value", _reading(float(ts[i]), float(values[i])), qos=1).wait_for_publish(10)
            got = col.wait_for(2, "forecasts/a", timeout=20, retained=False)
            assert time.monotonic() - t0 < 0.6  # the repeat ended the wait
            assert [m.json()["ts_epoch"] for m in got] == [float(ts[0]), float(ts[1])]
            time.sleep(1.5)
            t0 = time.monotonic()
            pub.publish("sensors/d/value", _reading(float(ts[0]), float(values[0])), qos=1).wait_for_publish(10)
            col.wait_for(1, "forecasts/d", timeout=20, retained=False)
            assert time.monotonic() - t0 < 0.6  # after 1.5 s of quiet: no wait
    finally:
        daemon.stop()


def test_a_wait_for_a_shared_step_reads_in_slices_and_ends_at_max_batch(
    broker: Broker, tmp_path: Path, taylor_series: tuple[np.ndarray, np.ndarray]
) -> None:
    """Once readings of two streams wait (engine.max_wait_ms, here 1 s) for a shared model step, the loop
    polls without reading the socket for at most GATHER_SLICE_S at a time and then reads what came: no
    wake-up per packet under load.  A queue that reaches engine.max_batch (4) still ends the wait: a and b,
    then c and d 0.3 s later, come out together at once, not a second after a and b."""
    ts, values = taylor_series
    cfg = _config(tmp_path, broker, engine={"max_wait_ms": 1000, "max_batch": 4, "queue_size": 100})
    daemon = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
    reg = daemon.registry
    polls: list[tuple[float, int]] = []
    try:
        with publisher(broker.host, broker.port) as pub, Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            daemon.start()
            link = daemon.link
            assert link is not None
            real_poll = link.poll

            def poll(timeout: float, *, read: int = READ_BUDGET, wake: Any = None) -> bool:
                polls.append((timeout, read))
                return real_poll(timeout, read=read, wake=wake)

            link.poll = poll  # type: ignore[method-assign]
            time.sleep(1.2)
            t0, before = time.monotonic(), len(polls)
            # x after a quiet second is stepped at once (readings further apart than the wait); a and b
            # follow it closely, so they wait, and as two streams they gather for a shared step.
            for stream in ("x", "a", "b"):
                pub.publish(f"sensors/{stream}/value", _reading(float(ts[0]), float(values[0])), qos=1)
            time.sleep(0.3)
            waiting = polls[before:]
            gathering = [t for t, read in waiting if read == 0 and t > 0]
            assert len(gathering) >= 10  # 0.3 s of the wait, in slices
            assert max(gathering) <= GATHER_SLICE_S
            assert not [t for t, read in waiting[-20:] if read > 0 and t > GATHER_SLICE_S]
            for stream in ("c", "d"):
                pub.publish(f"sensors/{stream}/value", _reading(float(ts[0]), float(values[0])), qos=1)
            got = col.wait_for(5, "forecasts/#", timeout=20, retained=False)
            assert time.monotonic() - t0 < 0.9  # max_batch ended the wait (it would have lasted until 1.0 s)
            assert sorted(m.topic for m in got) == [f"forecasts/{s}" for s in "abcdx"]
            assert (reg.get_sample_value("edge_lstm_batch_size_count") or 0) == 2  # x alone, then a-d in one step
            assert (reg.get_sample_value("edge_lstm_batch_size_sum") or 0) == 5
    finally:
        daemon.stop()


def test_the_heap_is_settled_so_collections_while_serving_skip_what_start_up_built(
    broker: Broker, tmp_path: Path
) -> None:
    """Once serving, the objects start-up made are frozen (a full collection does not scan them); a reference
    cycle among frozen objects is still freed by the next settling (the loop's idle trim)."""

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    cfg = _config(tmp_path, broker)
    daemon = Daemon(cfg, registry=CollectorRegistry(), handle_signals=False)
    try:
        daemon.start()
        deadline = time.monotonic() + 10
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the modules, the model, the configuration
        assert len(gc.get_objects()) < frozen  # what the collections still scan
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: the cycle outlives a full collection
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > 10_000
    finally:
        daemon.stop()
        gc.unfreeze()
