"""The reading of strace output that the power-cut check in tests/test_delivery.py relies on, on hand-written
traces: interleaved threads, a sync that overlaps the write, a PUBACK sent before the sync returned, a
descriptor reused after the journal's close, and a send the socket took only part of."""

from __future__ import annotations

from edge_lstm.journal import JOURNAL_NAME, Record
from tests.support.syscalls import acknowledgements, calls, journaled, uncovered

LOOP, SYNC = 100, 101
PATH = "/state/" + JOURNAL_NAME


def _hex(data: bytes) -> str:
    return '"' + "".join(f"\\x{b:02x}" for b in data) + '"'


def _record(mid: int) -> bytes:
    return Record.message(mid, mid, 1, 0.0, "sensors/a/value", b'{"v": 1}').encode()


def _puback(mid: int) -> bytes:
    return bytes([0x40, 2]) + mid.to_bytes(2, "big")


class Trace:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t = 1_700_000_000.0

    def add(self, tid: int, text: str) -> Trace:
        self.t += 1e-5
        self.lines.append(f"{tid} {self.t:.6f} {text}")
        return self

    def open(self, tid: int, fd: int, path: str = PATH) -> Trace:
        return self.add(tid, f"openat(AT_FDCWD, {_hex(path.encode())}, O_WRONLY|O_APPEND|O_CLOEXEC) = {fd} <0.000010>")

    def write(self, tid: int, fd: int, data: bytes, result: int | None = None) -> Trace:
        n = len(data) if result is None else result
        return self.add(tid, f"write({fd}, {_hex(data)}, {len(data)}) = {n} <0.000010>")

    def send(self, fd: int, data: bytes, result: int | None = None) -> Trace:
        n = len(data) if result is None else result
        return self.add(LOOP, f"sendto({fd}, {_hex(data)}, {len(data)}, 0, NULL, 0) = {n} <0.000010>")

    def sync(self, fd: int) -> Trace:
        return self.add(SYNC, f"fdatasync({fd}) = 0 <0.000300>")

    def check(self, broker_fd: int = 7) -> tuple[dict[int, int], list[int]]:
        trace = list(calls(self.lines))
        acks = acknowledgements(trace, {broker_fd})
        written, syncs = journaled(trace, JOURNAL_NAME.encode())
        return acks, uncovered(acks, written, syncs)


def test_an_acknowledgement_after_a_sync_that_began_after_the_write_is_covered() -> None:
    t = Trace().open(LOOP, 8).write(LOOP, 8, _record(1) + _record(2)).add(LOOP, "close(8) = 0 <0.000005>")
    t.add(SYNC, "openat(AT_FDCWD, " + _hex(PATH.encode()) + ", O_RDONLY|O_CLOEXEC) = 9 <0.000010>").sync(9)
    t.send(7, _puback(1) + _puback(2))
    acks, missed = t.check()
    assert sorted(acks) == [1, 2] and missed == []


def test_a_sync_that_overlaps_the_write_or_returns_after_the_ack_does_not_cover_it() -> None:
    t = Trace().open(LOOP, 8)
    t.add(SYNC, "openat(AT_FDCWD, " + _hex(PATH.encode()) + ", O_RDONLY|O_CLOEXEC) = 9 <0.000010>")
    t.add(SYNC, "fdatasync(9 <unfinished ...>")  # entered before the write returned
    t.write(LOOP, 8, _record(1))
    t.add(SYNC, "<... fdatasync resumed>) = 0 <0.000300>")
    t.send(7, _puback(1))
    t.add(SYNC, "fdatasync(9 <unfinished ...>")  # began after the write, but returns after the PUBACK
    t.send(7, _puback(3))
    t.add(SYNC, "<... fdatasync resumed>) = 0 <0.000300>")
    acks, missed = t.check()
    assert sorted(acks) == [1, 3] and sorted(missed) == [1, 3]  # 3 was never journaled at all


def test_a_descriptor_reused_after_the_journal_closed_is_not_the_journal() -> None:
    t = Trace().open(LOOP, 8).add(LOOP, "close(8) = 0 <0.000005>")
    t.open(LOOP, 8, "/state/other.bin").write(LOOP, 8, _record(5)).sync(8)  # fd 8 is another file now
    t.send(7, _puback(5))
    _, missed = t.check()
    assert missed == [5]


def test_a_short_send_counts_only_the_bytes_the_socket_took() -> None:
    t = Trace().open(LOOP, 8).write(LOOP, 8, _record(1) + _record(2)).sync(8)
    both = _puback(1) + _puback(2)
    t.send(7, both, result=6)  # the socket took 6 of 8 bytes: PUBACK 2 is not complete yet
    t.send(7, both[6:])
    t.send(6, b"\x00")  # the wake-up socket: not the broker's
    acks, missed = t.check()
    trace = list(calls(t.lines))
    second = [c for c in trace if c.name == "sendto" and c.fd == 7][1]
    assert acks == {1: acks[1], 2: second.entered} and missed == []
