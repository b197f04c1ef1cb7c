"""A running process's system calls, traced with strace, as data: what a power cut would have found on disk.

:class:`SyscallTrace` attaches ``strace`` to every thread of a process for the length of a ``with`` block;
:func:`calls` reads its output into :class:`Call` records (lines of entry and return, thread, name, file
descriptor, path or bytes, result), joining the halves strace prints when threads interleave.
:func:`acknowledgements`, :func:`journaled` and :func:`uncovered` tell which PUBACKs went out before the
journal record they vouch for was on disk.
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from bench.wire import split
from edge_lstm import journal


@dataclasses.dataclass(frozen=True)
class Call:
    """One completed call.  ``entered`` and ``returned`` are line positions in strace's output: strace handles
    one thread's stop at a time, and a call only runs once its entry has been handled, so a call that
    returned on an earlier line than another was entered had finished before that one began."""

    tid: int
    name: str
    entered: int
    returned: int
    start: float  # epoch seconds at entry (for reading; order by the line positions)
    fd: int | None
    path: bytes | None  # openat
    data: bytes | None  # write, sendto: the bytes the call moved (its result says how many)
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
                self._proc.wait()
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
    """The completed calls of an ``strace -f -ttt -T -xx`` output, in the order they returned."""
    pending: dict[int, tuple[str, int, float, str]] = {}
    for pos, line in enumerate(lines):
        m = _LINE.match(line)
        if m is None:
            continue
        tid, when, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if (r := _RESUMED.match(rest)) is not None:
            if tid not in pending:
                continue
            name, entered, start, head = pending.pop(tid)
            text = head + r.group(2)
        elif rest.endswith("<unfinished ...>"):
            pending[tid] = (rest.split("(", 1)[0], pos, when, rest[: -len("<unfinished ...>")])
            continue
        elif "(" in rest and not rest.startswith(("+++", "---")):
            name, entered, start, text = rest.split("(", 1)[0], pos, when, rest
        else:
            continue
        end = _ENDING.search(text)
        result = int(end.group(1)) if end else None
        args = text.split("(", 1)[1]
        first = args.split(",", 1)[0].split(")", 1)[0].strip()
        fd = int(first) if first.lstrip("-").isdigit() else None
        strings = _STRING.findall(args)
        path = _unescape(strings[0]) if name == "openat" and strings else None
        data = None
        if name in ("write", "sendto") and strings:
            data = _unescape(strings[0])[: max(0, result or 0)]  # a short or failed call moved only part, or none
        yield Call(tid, name, entered, pos, start, fd, path, data, result)


def tcp_sockets() -> Iterator[list[str]]:
    """The rows of /proc/net/tcp and /proc/net/tcp6, split into their columns (local and remote address as
    hex ``addr:port``, state, ..., inode in column 9)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        yield from (row.split() for row in rows)


def socket_fds(pid: int, remote_port: int) -> set[int]:
    """The descriptors of ``pid`` that are TCP connections to ``remote_port`` (from /proc)."""
    inodes = {cols[9] for cols in tcp_sockets() if int(cols[2].rsplit(":", 1)[1], 16) == remote_port}
    fds = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            fds.add(int(link.name))
    return fds


def acknowledgements(trace: Sequence[Call], broker_fds: set[int]) -> dict[int, int]:
    """Packet id -> the line where the ``sendto`` that wrote the last byte of its first PUBACK was entered."""
    acks: dict[int, int] = {}
    for fd in broker_fds:
        sent = sorted((c for c in trace if c.name == "sendto" and c.fd == fd and c.data), key=lambda c: c.entered)
        stream = b"".join(c.data or b"" for c in sent)
        ends, total = [], 0
        for c in sent:
            total += len(c.data or b"")
            ends.append(total)
        k = 0
        for first, start, end in split(stream)[0]:
            while ends[k] < end:
                k += 1
            if first >> 4 == 4:  # PUBACK
                acks.setdefault(int.from_bytes(stream[start : start + 2], "big"), sent[k].entered)
    return acks


def journaled(trace: Sequence[Call], name: bytes) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """From a trace: packet id -> the line where the journal write holding its record returned (the first),
    and the (entered, returned) lines of every fdatasync of the journal that succeeded.

    A descriptor belongs to the journal (a file whose path ends in ``name``) from the openat that
    returned it to the close that ended it."""
    fds: set[int] = set()
    written: dict[int, int] = {}
    syncs: list[tuple[int, int]] = []
    for c in sorted(trace, key=lambda c: c.returned if c.name == "openat" else c.entered):
        if c.name == "openat" and c.path is not None and c.path.endswith(name):
            if c.result is not None and c.result >= 0:
                fds.add(c.result)
        elif c.name == "close" and c.fd is not None:
            fds.discard(c.fd)
        elif c.name == "write" and c.fd in fds and c.data:
            for mid in journal_mids(c.data):
                written.setdefault(mid, c.returned)
        elif c.name == "fdatasync" and c.fd in fds and c.result == 0:
            syncs.append((c.entered, c.returned))
    return written, syncs


def uncovered(acks: dict[int, int], written: dict[int, int], syncs: Sequence[tuple[int, int]]) -> list[int]:
    """Packet ids acknowledged without an fdatasync that began after their record's write returned and
    returned before the acknowledgement was sent (or never journaled at all)."""
    return [
        mid
        for mid, sent in acks.items()
        if mid not in written or not any(s0 > written[mid] and s1 < sent for s0, s1 in syncs)
    ]


def journal_mids(data: bytes) -> list[int]:
    """Packet ids of the QoS 1 message records in bytes written to the journal."""
    return [r.mid for r in journal.records_in(data)[0] if r.payload is not None and r.qos > 0]
