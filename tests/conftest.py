"""Shared fixtures: a real Mosquitto, the daemon in a subprocess, MQTT collectors.

Fixtures (all clean up after the test):

``broker``            a running :class:`~tests.support.broker.Broker` on a free loopback port
``broker_factory``    ``broker_factory(persistence=False, extra_config=(), listener_config=None)``
                      for more brokers or special ones (not started: call ``.start()``)
``daemon_factory``    ``daemon_factory(broker, overrides=None, env=None)`` ->
                      :class:`~tests.support.daemon.DaemonProcess` (not started)
``collector_factory`` ``collector_factory(broker, topics)`` -> a subscribed
                      :class:`~tests.support.collector.Collector`
``taylor_model``      path of the bundled model directory
``taylor_series``     ``(timestamps, values)`` of ``data/taylor.csv`` as numpy arrays

Tests that need Mosquitto fail with a clear message when it is not installed
(``apt-get install mosquitto mosquitto-clients``).
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.broker import Broker, find_mosquitto
from tests.support.collector import Collector
from tests.support.daemon import TAYLOR_CSV, TAYLOR_MODEL, DaemonProcess


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto mosquitto-clients")


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(**kwargs: Any) -> Broker:
        _require_mosquitto()
        b = Broker(tmp_path / f"broker{len(made)}", **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory().start()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(broker: Broker, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"daemon{len(made)}", broker, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(broker: Broker, topics: list[str], **kwargs: Any) -> Collector:
        c = Collector(broker.host, broker.port, topics, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def taylor_model() -> Path:
    return TAYLOR_MODEL


def load_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(epoch seconds, values)`` of a two-column CSV with an ISO timestamp column."""
    ts, vs = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            ts.append(dt.datetime.fromisoformat(row[0].replace("Z", "+00:00")).timestamp())
            vs.append(float(row[1]))
    return np.asarray(ts), np.asarray(vs)


@pytest.fixture(scope="session")
def taylor_series() -> tuple[np.ndarray, np.ndarray]:
    return load_series(TAYLOR_CSV)
