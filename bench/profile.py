"""Profile of the daemon's hot path at its sustained maximum, sampled from outside with py-spy.

py-spy samples every thread of the running daemon (``--threads``, idle frames left out, so a
sample is a moment the thread was running or waiting for the GIL) without changing its code.
The collapsed stacks are summarised here: the share of samples per thread, and per function
its *own* share (leaf frame) and its *inclusive* share (anywhere on the stack), relative to all
active samples of that thread.  The daemon's CPU use over the same window comes from ``/proc``.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")
TOP = 25


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record_command(binary: str, pid: int, duration: int, out: Path, rate: int = 100) -> list[str]:
    return [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--gil",
        "--output",
        str(out),
    ]


def _frame_name(frame: str) -> str:
    """``func (path/module.py:12)`` -> ``path/module.py:func`` with the path shortened."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{m.group('func')}"


def summarise(collapsed: str, top: int = TOP) -> dict[str, Any]:
    """Per-thread sample shares, top functions by own and inclusive share, per-package shares."""
    threads: collections.Counter[str] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    package: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in collapsed.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        frames = m.group("stack").split(";")
        count = int(m.group("count"))
        head = frames[0]
        thread = head.split(":", 1)[1].strip() if head.startswith("thread") and ":" in head else head
        thread = thread or "unnamed"
        names = [_frame_name(f) for f in frames[1:]]
        if not names:
            continue
        threads[thread] += count
        own[thread][names[-1]] += count
        for name in set(names):
            incl[thread][name] += count
        package[thread][_package(names[-1])] += count
    total = sum(threads.values())
    out: dict[str, Any] = {"samples": total, "threads": {}}
    for thread, n in threads.most_common():
        out["threads"][thread] = {
            "samples": n,
            "share_of_all": n / total if total else 0.0,
            "own": [{"function": f, "share": c / n} for f, c in own[thread].most_common(top)],
            "inclusive": [{"function": f, "share": c / n} for f, c in incl[thread].most_common(top)],
            "own_by_package": [{"package": p, "share": c / n} for p, c in package[thread].most_common()],
        }
    return out


def _package(name: str) -> str:
    path = name.split(":", 1)[0]
    if path.startswith("edge_lstm/"):
        return path.removesuffix(".py").replace("/", ".")
    top = path.split("/", 1)[0].removesuffix(".py")
    return top or "?"


def record(pid: int, duration: int, out: Path) -> tuple[str | None, str]:
    """Run py-spy on ``pid`` for ``duration`` seconds; returns (collapsed stacks, note)."""
    binary = py_spy()
    if binary is None:
        return None, "py-spy is not installed (pip install py-spy)"
    proc = subprocess.run(record_command(binary, pid, duration, out), capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return None, f"py-spy failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
    return out.read_text(), f"py-spy {_version(binary)}"


def _version(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[-1]
    except (OSError, IndexError):
        return "?"
