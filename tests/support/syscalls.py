"""A running process's system calls, traced with strace, as data: what a power cut would have found on disk.

:class:`SyscallTrace` attaches ``strace`` to every thread of a process for the length of a ``with`` block;
:func:`calls` reads its output into :class:`Call` records (start and end time, thread, name, file
descriptor, path or bytes, result), joining the halves strace prints when threads interleave.
:func:`mqtt_packets` splits the bytes a process sent into MQTT control packets.
"""

from __future__ import annotations

import dataclasses
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType


@dataclasses.dataclass(frozen=True)
class Call:
    tid: int
    name: str
    start: float  # epoch seconds at entry
    end: float  # entry + time spent in the call
    fd: int | None
    path: bytes | None  # openat
    data: bytes | None  # write, sendto
    result: int | None  # None: unknown (the process went away inside the call)


class TraceUnavailable(RuntimeError):
    """strace is missing or may not attach (ptrace not permitted)."""


class SyscallTrace:
    """``strace -f -p PID`` for the length of a ``with`` block, writing to ``out``."""

    def __init__(self, pid: int, out: Path, calls: Sequence[str]) -> None:
        exe = shutil.which("strace")
        if exe is None:
            raise TraceUnavailable("strace is not installed (scripts/os-deps.sh test installs it)")
        self.out = out
        self._argv = [exe, "-f", "-ttt", "-T", "-xx", "-s", "16777216", "-e", "trace=" + ",".join(calls),
                      "-o", str(out), "-p", str(pid)]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SyscallTrace:
        self._proc = subprocess.Popen(self._argv, stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        said = b""
        deadline = time.monotonic() + 20
        while b"attached" not in said:  # "Process N attached with K threads": every thread is traced now
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._proc.kill()
                said += self._proc.stderr.read() or b""
                raise TraceUnavailable(f"strace could not attach: {said.decode(errors='replace').strip()}")
            if select.select([self._proc.stderr], [], [], 0.2)[0]:
                said += self._proc.stderr.read1(4096)  # type: ignore[attr-defined]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)  # detaches; the traced process goes on
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def calls(self) -> list[Call]:
        return list(calls(self.out.read_text("ascii", errors="replace").splitlines()))


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_ENDING = re.compile(r"=\s*(-?\d+)[^<]*<(\d+\.\d+)>\s*$")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f", "\\": b"\\", '"': b'"'}


def _unescape(s: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
        elif s[i + 1] == "x":
            out.append(int(s[i + 2 : i + 4], 16))
            i += 4
        else:
            out += _ESCAPES.get(s[i + 1], s[i + 1].encode("latin-1"))
            i += 2
    return bytes(out)


def calls(lines: Sequence[str]) -> Iterator[Call]:
    """The completed calls of an ``strace -f -ttt -T -xx`` output, in the order they ended."""
    pending: dict[int, tuple[str, float, str]] = {}
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        tid, when, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if (r := _RESUMED.match(rest)) is not None:
            if tid not in pending:
                continue
            name, start, head = pending.pop(tid)
            text = head + r.group(2)
        elif rest.endswith("<unfinished ...>"):
            name = rest.split("(", 1)[0]
            pending[tid] = (name, when, rest[: -len("<unfinished ...>")])
            continue
        elif "(" in rest and not rest.startswith(("+++", "---")):
            name, start, text = rest.split("(", 1)[0], when, rest
        else:
            continue
        end = _ENDING.search(text)
        result = int(end.group(1)) if end else None
        args = text.split("(", 1)[1]
        first = args.split(",", 1)[0].split(")", 1)[0].strip()
        fd = int(first) if first.lstrip("-").isdigit() else None
        strings = _STRING.findall(args)
        path = _unescape(strings[0]) if name == "openat" and strings else None
        data = _unescape(strings[0]) if name in ("write", "sendto") and strings else None
        yield Call(tid, name, start, start + (float(end.group(2)) if end else 0.0), fd, path, data, result)


def mqtt_packets(stream: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(offset of the packet's end, packet type, variable header and payload) for each whole packet."""
    pos = 0
    while pos + 2 <= len(stream):
        kind = stream[pos] >> 4
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= len(stream):
                return
            byte = stream[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        if i + length > len(stream):
            return
        yield i + length, kind, stream[i : i + length]
        pos = i + length
