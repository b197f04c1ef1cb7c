"""Reliability 2, 3, 7: SIGKILL at random points, corrupt state files, disk trouble."""

from __future__ import annotations

import json
import random
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_lstm import checkpoint as ckpt
from edge_lstm.modelspec import load_manifest
from edge_lstm.payload import Reading
from tests.support.broker import Broker
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_MODEL, DaemonProcess
from tests.support.faults import (  # noqa: F401
    can_mount,
    checkpoint_kill_loop,
    fill_disk,
    record,
    reliability_report,
    remount,
    tmpfs,
)
from tests.support.offline import open_model, restore_as_daemon

pytestmark = pytest.mark.usefixtures("reliability_report")

MANIFEST = load_manifest(TAYLOR_MODEL)
KILL_CYCLES = 200
DAEMON_KILL_CYCLES = 4
STREAMS = ("k1", "k2", "k3")


def _publisher(broker: Broker) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _reading(stream: str, ts: float, value: float) -> bytes:
    return json.dumps({"ts": ts, "demand_mw": value}).encode()


class Feeder:
    """Publishes consecutive ticks of the taylor series for a few streams from a thread."""

    def __init__(self, broker: Broker, series: tuple[np.ndarray, np.ndarray], start: int = 0) -> None:
        self.client = _publisher(broker)
        self.ts, self.values = series
        self.i = start
        self.published = 0  # readings the broker acknowledged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_tick(self) -> None:
        for s in STREAMS:
            info = self.client.publish(
                f"sensors/{s}/value", _reading(s, float(self.ts[self.i]), float(self.values[self.i])), qos=1
            )
            info.wait_for_publish(10)
            self.published += 1
        self.i += 1

    def start(self, interval: float = 0.01) -> None:
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                self.publish_tick()
                time.sleep(interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def feeder_factory(taylor_series: tuple[np.ndarray, np.ndarray]) -> Iterator[Callable[..., Feeder]]:
    made: list[Feeder] = []

    def make(broker: Broker, start: int = 2000) -> Feeder:
        f = Feeder(broker, taylor_series, start)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


# -- 2: SIGKILL at random points ---------------------------------------------------------------------


def test_checkpoint_writer_killed_at_random_points_always_leaves_a_loadable_file(tmp_path: Path) -> None:
    stats = checkpoint_kill_loop(
        tmp_path / "state", cycles=KILL_CYCLES, streams=3000, hidden=64, seed=20240601, max_delay_s=0.05
    )
    assert stats.cycles == KILL_CYCLES
    assert not stats.failures, stats.failures[:5]
    assert stats.rejected == 0
    assert stats.restored + stats.missing == KILL_CYCLES
    assert stats.newest == stats.restored
    assert stats.killed_mid_write > 0, "no kill landed inside a write: the loop does not test what it claims"
    assert not list((tmp_path / "state").glob(f"{ckpt._TMP_PREFIX}*")), "load did not clear partial temp files"
    record("2", "writer kill/load cycles (SIGKILL after a random 0-50 ms)", stats.cycles, f"= {KILL_CYCLES}")
    record("2", "checkpoint size (3000 streams, H=64)", f"{stats.file_bytes / 1e6:.2f} MB", "-")
    record("2", "saves completed before the kills", stats.saves_completed, "-")
    record("2", "kills that landed mid-write (partial temp file left)", stats.killed_mid_write, "> 0")
    record("2", "loads that restored the newest finished save", stats.newest, "= restored")
    record("2", "loads that found no file yet (before the first save)", stats.missing, "-")
    record("2", "loads rejected or with an older/unknown generation", stats.rejected + len(stats.failures), "0")


def test_daemon_killed_at_random_points_resumes_from_its_last_checkpoint(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], feeder_factory: Callable[..., Feeder], tmp_path: Path
) -> None:
    rng = random.Random(7)
    d = daemon_factory(broker, overrides={"state": {"checkpoint_interval_s": 0.1}})
    feeder = feeder_factory(broker)
    model = open_model(TAYLOR_MODEL)
    restored_streams: list[int] = []
    compared = 0
    redelivered = 0
    for cycle in range(DAEMON_KILL_CYCLES):
        d.start()
        if cycle:
            assert d.metric("edge_lstm_state_restores_total", result="restored") == 1, d.log()
            assert d.metric("edge_lstm_state_restores_total", result="rejected") == 0
            restored_streams.append(int(d.metric("edge_lstm_streams_active")))
        feeder.start()
        time.sleep(rng.uniform(0.3, 1.0))
        d.kill()
        feeder.stop()
        # What the killed daemon left (checkpoint + journal): loaded from a copy, so the daemon finds it untouched.
        copy = tmp_path / f"copy{cycle}"
        shutil.copytree(Path(d.config["state"]["dir"]), copy)
        res = ckpt.load_checkpoint(copy, MANIFEST.sha256, MANIFEST.layers, 1, 10000)
        assert res.status is ckpt.LoadStatus.RESTORED, res.reason
        engine, _ = restore_as_daemon(copy, d.config, model)
        assert len(engine.table) == len(STREAMS)
        # After the restart the broker redelivers what the killed daemon had not acknowledged, then a new
        # tick follows.  Every forecast of the restarted daemon must equal an engine restored from the
        # file the killed one left, fed the same readings in the same order.
        value_at = dict(zip(feeder.ts.tolist(), feeder.values.tolist(), strict=True))
        with Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            d.start()
            restored_streams.append(int(d.metric("edge_lstm_streams_active")))
            new_ts = float(feeder.ts[feeder.i])
            feeder.publish_tick()
            assert _wait(lambda t=new_ts: sum(m.json()["ts_epoch"] == t for m in col.select(retained=False)) == 3), (  # type: ignore[misc]
                d.log()
            )
            msgs = col.select("forecasts/#", retained=False)
        for m in msgs:
            doc = m.json()
            want = engine.process([Reading(doc["stream"], (value_at[doc["ts_epoch"]],), doc["ts_epoch"], 0.0)])
            assert len(want.forecasts) == 1
            got = np.array([f["value"] for f in doc["forecasts"]])
            np.testing.assert_allclose(got, want.forecasts[0].values, rtol=1e-5)
            compared += 1
        redelivered += len(msgs) - len(STREAMS)
        assert d.terminate() == 0
    assert d.runs == 2 * DAEMON_KILL_CYCLES
    record("2", "daemon SIGKILLs under traffic (random 0.3-1.0 s after start, checkpoints every 0.1 s)",
           DAEMON_KILL_CYCLES, f"= {DAEMON_KILL_CYCLES}")  # fmt: skip
    record("2", "restarts that restored the checkpoint and journal the killed daemon left", 2 * DAEMON_KILL_CYCLES - 1,
           "all: restores{result=\"restored\"} = 1, rejected = 0")  # fmt: skip
    record("2", "streams restored per restart", sorted(set(restored_streams)), f"= {len(STREAMS)}")
    record("2", "readings redelivered by the broker after the kills (unacknowledged), forecast", redelivered, "-")
    record("2", "forecasts after restart equal to an engine restored from that checkpoint + journal", compared,
           "all equal (rtol 1e-5)")  # fmt: skip


# -- 3: corrupt state -----------------------------------------------------------------------------------


def _valid_checkpoint(broker: Broker, daemon_factory: Callable[..., DaemonProcess], feeder: Feeder) -> bytes:
    d = daemon_factory(broker)
    d.start()
    for _ in range(3):
        feeder.publish_tick()
    assert d.wait_metric("edge_lstm_readings_total", 3 * len(STREAMS), outcome="processed") == 3 * len(STREAMS)
    assert d.terminate() == 0
    return (Path(d.config["state"]["dir"]) / ckpt.CHECKPOINT_NAME).read_bytes()


def _corruptions(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    newer = bytearray(good)
    newer[8:12] = struct.pack(">I", ckpt.FORMAT_VERSION + 1)
    arrays = ckpt.decode_checkpoint(good, MANIFEST.sha256)
    foreign = ckpt.encode_checkpoint(arrays, "0" * 64)
    return {
        "truncated": good[: len(good) // 2],
        "bit-flipped": bytes(flipped),
        "from another model": foreign,
        "newer format version": bytes(newer),
        "empty file": b"",
    }


def test_corrupt_state_is_set_aside_logged_counted_and_the_daemon_starts_cold(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], feeder_factory: Callable[..., Feeder]
) -> None:
    feeder = feeder_factory(broker)
    good = _valid_checkpoint(broker, daemon_factory, feeder)
    for kind, data in _corruptions(good).items():
        d = daemon_factory(broker)
        state = Path(d.config["state"]["dir"])
        state.mkdir(parents=True)
        (state / ckpt.CHECKPOINT_NAME).write_bytes(data)
        d.start()
        rejected = d.metric("edge_lstm_state_restores_total", result="rejected")
        active = d.metric("edge_lstm_streams_active")
        aside = list(state.glob(f"{ckpt.CHECKPOINT_NAME}.rejected-*"))
        with Collector(broker.host, broker.port, ["forecasts/#"]) as col:
            feeder.publish_tick()
            msgs = col.wait_for(len(STREAMS), "forecasts/#", timeout=20, retained=False)
        assert d.terminate() == 0
        log = d.log()
        assert rejected == 1, (kind, log)
        assert active == 0, kind
        assert len(aside) == 1 and aside[0].read_bytes() == data, kind
        assert "checkpoint" in log and "rejected" in log and "starting cold" in log, (kind, log)
        assert len(msgs) == len(STREAMS) and all(m.json()["warming_up"] for m in msgs), kind
        # the clean shutdown wrote a fresh, valid checkpoint in its place
        fresh = ckpt.load_checkpoint(state, MANIFEST.sha256, MANIFEST.layers, 1, 100)
        assert fresh.status is ckpt.LoadStatus.RESTORED and fresh.streams == len(STREAMS)
        reason = next(line for line in log.splitlines() if "rejected (" in line).split("rejected (", 1)[1]
        record("3", f"{kind}: restores{{result=\"rejected\"}}, streams after start, file set aside",
               f"{int(rejected)}, {int(active)}, yes", "1, 0 (cold), original bytes kept")  # fmt: skip
        record("3", f"{kind}: reason logged", reason.split("), set aside", 1)[0][:80], "logged with the set-aside path")
    record("3", "forecasts right after each cold start", f"{len(STREAMS)} per start, warming_up", "one per stream")


# -- 7: disk trouble --------------------------------------------------------------------------------------


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _disk_fault_cycle(
    scenario: str,
    d: DaemonProcess,
    feeder: Feeder,
    break_it: Callable[[], None],
    fix_it: Callable[[], None],
) -> None:
    """Break the disk, check forecasting goes on and failures are counted, fix it, check recovery."""
    assert _wait(lambda: d.metric("edge_lstm_checkpoint_last_success_timestamp_seconds") > 0), d.log()
    failures0 = d.metric("edge_lstm_checkpoint_failures_total")
    # Every reading published so far forecast first: one still in flight would be counted with the five below.
    processed0 = d.wait_metric("edge_lstm_readings_total", feeder.published, outcome="processed")
    assert processed0 == feeder.published, d.log()
    break_it()
    broke_at = time.time()
    assert _wait(lambda: d.metric("edge_lstm_checkpoint_failures_total") >= failures0 + 3), d.log()
    for _ in range(5):
        feeder.publish_tick()
    processed = d.wait_metric("edge_lstm_readings_total", processed0 + 5 * len(STREAMS), outcome="processed")
    assert processed == processed0 + 5 * len(STREAMS), "forecasting stopped while the disk was broken"
    last_ok_while_broken = d.metric("edge_lstm_checkpoint_last_success_timestamp_seconds")
    assert last_ok_while_broken < broke_at + 0.5  # no success while broken (one save may have been in flight)
    failed = d.metric("edge_lstm_checkpoint_failures_total") - failures0
    fix_it()
    fixed_at = time.time()
    assert _wait(lambda: d.metric("edge_lstm_checkpoint_last_success_timestamp_seconds") > fixed_at), d.log()
    settled = d.metric("edge_lstm_checkpoint_failures_total")
    time.sleep(0.5)
    assert d.metric("edge_lstm_checkpoint_failures_total") == settled, "failures continue after recovery"
    record("7", f"{scenario}: checkpoint failures counted while broken", int(failed), ">= 3, one per attempt")
    record("7", f"{scenario}: readings forecast while broken", int(processed - processed0),
           "all (15 of 15: below the broker's in-flight window of 20)")  # fmt: skip
    record("7", f"{scenario}: recovered", "yes", "a successful checkpoint after the fix, no more failures")


def test_state_directory_replaced_by_a_file_then_restored(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], feeder_factory: Callable[..., Feeder]
) -> None:
    d = daemon_factory(broker, overrides={"state": {"checkpoint_interval_s": 0.1}})
    state = Path(d.config["state"]["dir"])
    away = state.with_name("state.away")
    d.start()
    feeder = feeder_factory(broker)
    feeder.publish_tick()

    def break_it() -> None:
        state.rename(away)
        state.write_text("not a directory\n")

    def fix_it() -> None:
        state.unlink()
        away.rename(state)

    _disk_fault_cycle("state dir replaced by a file", d, feeder, break_it, fix_it)
    assert d.terminate() == 0
    log = d.log()
    assert "checkpoint failed" in log and "Not a directory" in log
    res = ckpt.load_checkpoint(state, MANIFEST.sha256, MANIFEST.layers, 1, 100)
    assert res.status is ckpt.LoadStatus.RESTORED and res.streams == len(STREAMS)


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root; the replaced-directory test covers the rest")
def test_state_on_a_full_then_read_only_disk(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess], feeder_factory: Callable[..., Feeder], tmp_path: Path
) -> None:
    mnt = tmp_path / "small-disk"
    with tmpfs(mnt, 256):
        d = daemon_factory(broker, overrides={"state": {"dir": str(mnt), "checkpoint_interval_s": 0.1}})
        d.start()
        feeder = feeder_factory(broker)
        feeder.publish_tick()
        filler: list[Path] = []

        def fill() -> None:
            filler.append(fill_disk(mnt))

        def free() -> None:
            filler.pop().unlink()

        _disk_fault_cycle("disk full (256 KiB tmpfs filled)", d, feeder, fill, free)
        _disk_fault_cycle("disk read-only (tmpfs remounted ro)", d, feeder, lambda: remount(mnt, "ro"),
                          lambda: remount(mnt, "rw"))  # fmt: skip
        assert d.terminate() == 0
        log = d.log()
        assert "No space left on device" in log and "Read-only file system" in log, log
        res = ckpt.load_checkpoint(mnt, MANIFEST.sha256, MANIFEST.layers, 1, 100)
        assert res.status is ckpt.LoadStatus.RESTORED and res.streams == len(STREAMS)
        assert not list(mnt.glob(f"{ckpt._TMP_PREFIX}*")), "a failed save left its temp file on the full disk"
