"""The benchmark's placement of processes (bench/cores.py): the system under test alone on a core."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import cores

many_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")


@many_cores
def test_split_gives_the_last_core_to_the_system_under_test_and_the_rest_to_the_others() -> None:
    plan = cores.split()
    assert plan is not None
    sut, others = plan
    allowed = os.sched_getaffinity(0)
    assert sut == {max(allowed)} and others == allowed - sut
    assert cores.describe(plan) == {"system_under_test": [max(allowed)], "others": sorted(allowed - sut)}


@many_cores
def test_pin_moves_every_thread_of_a_running_process_and_its_later_threads() -> None:
    target = frozenset({min(os.sched_getaffinity(0))})
    # A child that starts a thread before it is pinned and one after, and reports both threads' cores.
    code = (
        "import os, sys, threading, time\n"
        "ev = threading.Event()\n"
        "def early(): ev.wait(); print('early', sorted(os.sched_getaffinity(0)), flush=True)\n"
        "t = threading.Thread(target=early); t.start()\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "late = threading.Thread(target=lambda: print('late', sorted(os.sched_getaffinity(0)), flush=True))\n"
        "late.start(); late.join(); ev.set(); t.join()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        cores.pin(child.pid, target)
        assert os.sched_getaffinity(child.pid) == target
        child.stdin.write("go\n")
        child.stdin.flush()
        lines = sorted(child.stdout.read().split("\n")[:2])
        assert lines == [f"early {sorted(target)}", f"late {sorted(target)}"]
    finally:
        child.kill()
        child.wait()


def test_pin_of_a_process_that_is_gone_does_not_raise() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    cores.pin(child.pid, frozenset(os.sched_getaffinity(0)))
