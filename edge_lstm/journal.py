"""The write-ahead journal of accepted messages: what makes an acknowledgement a promise.

The daemon acknowledges a QoS 1 reading to the broker only once its effect
cannot be lost (docs/architecture.md, "Delivery"): its forecast was
acknowledged by the broker, and the message is in this journal, on disk
(``fsync``).  The state a restart restores is the last checkpoint plus the
journal's messages after it, stepped through the same decoder and engine: the
state an uninterrupted run would hold.  Messages that were not journaled were
not acknowledged either, so the broker delivers them again.

One file, ``journal.wal`` in the state directory::

    header  8 bytes magic b"ELSTMWAL", 4 bytes format version, 64 bytes model fingerprint (hex ASCII)
    record  4 bytes body length N, 4 bytes CRC-32 of the body, N bytes body

    body of a message record  b"M", seq u64, mid u16, qos u8, arrival f64 (epoch s), topic length u16,
                              topic (UTF-8), payload (the rest)
    body of a digest record   b"D", seq u64, mid u16, digest u32: a message that an older checkpoint
                              already holds, kept only so that its redelivery is recognised

All integers big-endian.  Records are appended in groups, one ``write`` per
group (group commit); a sync thread runs ``fdatasync`` and reports how far the
file is on disk, so that the owner's loop never waits for the disk.  A torn or
corrupt tail (a crash during a write) ends the journal: it is cut off when the
file is opened again.  After each checkpoint the journal starts afresh (a new
file renamed over the old one), carrying the digests of the most recent
messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_lstm.checkpoint import fsync_dir

_LOG = logging.getLogger(__name__)

JOURNAL_NAME = "journal.wal"
DAMAGED_SUFFIX = ".damaged"  # the journal as found, when bytes of it could not be replayed
MAGIC = b"ELSTMWAL"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sI64s")
_FRAME = struct.Struct(">II")
_MESSAGE = struct.Struct(">cQHBdH")
_DIGEST = struct.Struct(">cQHI")
MAX_RECORD = 16 * 1024 * 1024  # larger length fields are corruption, not records
SYNC_RETRY_S = 0.5  # a failed fdatasync is tried again after this long


def message_digest(topic: str, payload: bytes) -> int:
    """A 32-bit digest of a message's topic and body (CRC-32), to recognise a redelivery."""
    return zlib.crc32(payload, zlib.crc32(topic.encode("utf-8", "surrogateescape")))


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One journaled message (``payload`` is None for a digest-only record)."""

    seq: int
    mid: int
    qos: int
    arrival: float
    topic: str
    payload: bytes | None
    digest: int

    @classmethod
    def message(cls, seq: int, mid: int, qos: int, arrival: float, topic: str, payload: bytes) -> Record:
        return cls(seq, mid, qos, arrival, topic, payload, message_digest(topic, payload))

    def digest_only(self) -> Record:
        """The same message without its body: what is kept to recognise its redelivery."""
        return Record(self.seq, self.mid, self.qos, 0.0, "", None, self.digest)

    def encode(self) -> bytes:
        if self.payload is None:
            body = _DIGEST.pack(b"D", self.seq, self.mid, self.digest)
        else:
            t = self.topic.encode("utf-8", "surrogateescape")
            body = _MESSAGE.pack(b"M", self.seq, self.mid, self.qos, self.arrival, len(t)) + t + self.payload
        return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> Record | None:
    kind = body[:1]
    if kind == b"M" and len(body) >= _MESSAGE.size:
        _, seq, mid, qos, arrival, tlen = _MESSAGE.unpack_from(body)
        end = _MESSAGE.size + tlen
        if len(body) < end:
            return None
        topic = body[_MESSAGE.size : end].decode("utf-8", "surrogateescape")
        payload = body[end:]
        return Record(seq, mid, qos, arrival, topic, payload, message_digest(topic, payload))
    if kind == b"D" and len(body) == _DIGEST.size:
        _, seq, mid, digest = _DIGEST.unpack(body)
        return Record(seq, mid, 1, 0.0, "", None, digest)
    return None


@dataclasses.dataclass
class ReadResult:
    """What :func:`read_journal` found."""

    records: list[Record]
    valid_bytes: int  # length of the file up to the end of the last good record
    status: str  # "ok", "missing", "torn" (a bad tail was found), "other model", "foreign" (other format)
    file_bytes: int = 0  # length of the file as found


def read_journal(directory: Path | str, fingerprint: str) -> ReadResult:
    """All good records of the journal, in order; never raises for bad content."""
    path = Path(directory) / JOURNAL_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ReadResult([], 0, "missing")
    except OSError as e:
        _LOG.error("cannot read the journal %s: %s", path, e)
        return ReadResult([], 0, "foreign")
    if len(data) < _HEADER.size:
        return ReadResult([], 0, "torn", len(data))
    magic, version, fp = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        return ReadResult([], 0, "foreign", len(data))
    stored = fp.rstrip(b"\0").decode("ascii", "replace")
    if stored != fingerprint:
        # Another model's SHA-256; anything else in the header is damage to this journal.
        other = len(stored) == 64 and all(c in "0123456789abcdef" for c in stored)
        return ReadResult([], 0, "other model" if other else "foreign", len(data))
    records, pos = records_in(data, _HEADER.size)
    return ReadResult(records, pos, "ok" if pos == len(data) else "torn", len(data))


def records_in(data: bytes, pos: int = 0) -> tuple[list[Record], int]:
    """The good records in ``data`` from ``pos`` on, and where they end: at the end of ``data``, or at the
    first frame that is cut short, too long, fails its CRC or holds no record."""
    records: list[Record] = []
    while pos + _FRAME.size <= len(data):
        n, crc = _FRAME.unpack_from(data, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + n
        if n > MAX_RECORD or end > len(data):
            break
        body = data[start:end]
        rec = _decode_body(body) if zlib.crc32(body) == crc else None
        if rec is None:
            break
        records.append(rec)
        pos = end
    return records, pos


class Journal:
    """The journal: :meth:`append` buffers records, :meth:`commit` writes and syncs them in one go.

    The file is opened for each commit and closed after it (a few microseconds
    beside the sync), so the daemon holds no file open in the state directory:
    a directory removed or replaced at run time is noticed at the next commit,
    and an operator can remount the disk.  ``sync`` False skips the
    ``fdatasync`` (survives a killed process, not a power loss).
    """

    def __init__(self, directory: Path | str, fingerprint: str, *, sync: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_NAME  # opened by every commit: built once
        self.fingerprint = fingerprint
        self.sync = sync
        self._buf: list[bytes] = []
        self.size = 0  # bytes on disk
        self.reopened = 0  # times the file was found missing and started anew
        # Bytes ever written and bytes known to be on disk (across resets): what was written up to
        # `synced` survives a power loss.  A sync thread (start_syncing) moves `synced` on, so that the
        # owner's loop never waits for the disk.
        self.written = 0
        self.synced = 0
        self.sync_error: OSError | None = None
        self.sync_failures = 0  # fdatasync calls of the sync thread that failed (it retries every 0.5 s)
        # What was written since the last sync that succeeded, as (file offset, `written` at its end, bytes).
        # A failed fdatasync can leave the kernel's copy of these pages marked clean but not on disk, and a
        # later fdatasync then succeeds without writing them (Linux reports a writeback error once): so after
        # a failure they are written again (`_rewrite`) before a sync may count them.
        self._unsynced: list[tuple[int, int, bytes]] = []
        self._rewrite = False
        self._retry_at = 0.0  # after a failed sync, the next attempt waits until then (monotonic clock)
        self._cond = threading.Condition()
        self._want = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._on_synced: Callable[[], None] | None = None

    def _header(self) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT_VERSION, self.fingerprint.encode("ascii").ljust(64, b"\0"))

    def open(self, found: ReadResult) -> int:
        """Prepare for appending after :func:`read_journal`: cut a bad tail, start afresh on a foreign file.

        Returns the bytes of the file that are not replayed (0 normally).  A write cut short by a
        crash leaves a bad tail; so does damage anywhere in the file, which also loses every record
        after it.  The two cannot be told apart, so whenever bytes are dropped the file as found is
        first copied to ``journal.wal.damaged`` (the last such copy), for an operator to inspect.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if found.status == "missing":
            self.reset([])
            return 0
        if found.status == "other model":
            # Its messages were forecast by that model before they were journaled; their state is that
            # model's, which this one does not start from: nothing this model could replay is lost.
            _LOG.info("journal %s belongs to another model: not replayed (this model starts from its own "
                      "checkpoint or a cold state); starting a new one", self.path)  # fmt: skip
            self.reset([])
            return 0
        if found.status == "foreign" or found.valid_bytes < _HEADER.size:
            if found.file_bytes:
                kept = self._keep_aside()
                _LOG.warning("journal %s (%d bytes) belongs to another model or format, or its header is damaged: "
                             "its records are not replayed; %s; starting a new one",
                             self.path, found.file_bytes, kept)  # fmt: skip
            self.reset([])
            return found.file_bytes
        fd = os.open(self.path, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            if size != found.valid_bytes:
                kept = self._keep_aside()
                _LOG.error(
                    "journal %s: %d byte(s) from byte %d on are unreadable (a write cut short by a crash, or damage): "
                    "the %d record(s) before are replayed, the rest cannot be; %s",
                    self.path, size - found.valid_bytes, found.valid_bytes, len(found.records), kept,
                )  # fmt: skip
                os.ftruncate(fd, found.valid_bytes)
                os.fsync(fd)
        finally:
            os.close(fd)
        self.size = found.valid_bytes
        return size - found.valid_bytes

    def _keep_aside(self) -> str:
        """Copy the journal as found to ``journal.wal.damaged``; says where it went (or why not)."""
        aside = self.path.with_name(JOURNAL_NAME + DAMAGED_SUFFIX)
        try:
            shutil.copyfile(self.path, aside)
        except OSError as e:
            return f"it could not be copied aside ({e.strerror or e})"
        return f"a copy is kept in {aside}"

    def append(self, record: Record) -> None:
        self._buf.append(record.encode())

    @property
    def pending(self) -> int:
        """Records appended but not yet committed."""
        return len(self._buf)

    @property
    def needs_rewrite(self) -> bool:
        """A sync failed: :meth:`commit` must write the unsynced bytes again before they can be synced."""
        return self._rewrite

    def commit(self) -> int:
        """Write the appended records; returns the bytes written.  :attr:`synced` says when they are on disk.

        Without a sync thread the records are synced here; with one, the
        thread syncs them and calls ``on_synced``.  Raises ``OSError`` (the
        records stay buffered, so a later commit retries them).
        """
        if self._rewrite:
            self._write_again()
        if not self._buf:
            return 0
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            # Removed under us (the state directory deleted at run time): the records since the last
            # checkpoint went with it.  Start a new file; the owner checkpoints as soon as it can.
            _LOG.error("journal %s is gone: starting a new one", self.path)
            self.reopened += 1
            self.reset([], keep_pending=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        data = b"".join(self._buf)
        try:
            _write_all(fd, data)
            if self.sync and self._thread is None:
                os.fdatasync(fd)
        except OSError:
            # A partial write leaves a torn record that would end the journal: cut it off again.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size)
            raise
        finally:
            os.close(fd)
        self._buf.clear()
        offset = self.size
        self.size += len(data)
        self.written += len(data)
        if not self.sync or self._thread is None:
            self.synced = self.written
        else:
            with self._cond:
                self._unsynced.append((offset, self.written, data))
                self._want = self.written
                self._cond.notify()
        return len(data)

    def _write_again(self) -> None:
        """After a failed sync: write the bytes not known to be on disk again, where they were (raises
        ``OSError``, the rewrite then stays due), and sync them here when there is no sync thread."""
        with self._cond:
            chunks = list(self._unsynced)
        fd = os.open(self.path, os.O_WRONLY)  # no O_APPEND: each chunk goes back to its own offset
        try:
            for offset, _, data in chunks:
                _write_all(fd, data, offset)
            if self._thread is None:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._cond:
            self._rewrite = False
            if self._thread is None:
                self._unsynced.clear()
                self.synced = self.written
            self._cond.notify()

    # -- the sync thread --------------------------------------------------------------------------

    def start_syncing(self, on_synced: Callable[[], None]) -> None:
        """Sync in a thread of its own (``journal-sync``); ``on_synced`` is called after each sync."""
        if not self.sync or self._thread is not None:
            return
        self._on_synced = on_synced
        self._stopping = False
        self._thread = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._thread.start()

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if self._want <= self.synced or self._rewrite:
                        self._cond.wait()
                    elif (delay := self._retry_at - time.monotonic()) > 0:
                        self._cond.wait(delay)  # the disk failed lately: not before the retry time
                    else:
                        break
                if self._stopping and (self._want <= self.synced or self._rewrite):
                    return  # a rewrite still due: the owner syncs it once the thread is gone
                target = self._want
            try:
                # fdatasync flushes the file's data whatever descriptor asks; a read-only one keeps no
                # file open for writing (the disk can still be remounted).
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                self.sync_error = e
                self.sync_failures += 1
                with self._cond:
                    self._rewrite = True  # the bytes since the last good sync may not be on disk: write again
                    self._retry_at = time.monotonic() + SYNC_RETRY_S  # the disk is in trouble: not at once
            else:
                self.sync_error = None
                with self._cond:
                    self.synced = max(self.synced, target)
                    self._unsynced = [c for c in self._unsynced if c[1] > target]
            if self._on_synced is not None:
                self._on_synced()

    def stop_syncing(self, timeout: float = 10.0) -> None:
        """Finish the syncs asked for, then end the thread."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self._thread = None

    def reset(self, carry: Iterable[Record], fingerprint: str | None = None, *, keep_pending: bool = False) -> None:
        """Start a new journal holding only ``carry`` (as digest records), atomically replacing the old one.

        Called right after a checkpoint that holds every journaled message
        (records appended but not committed are dropped unless ``keep_pending``).
        """
        if fingerprint is not None:
            self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        kept = [r.digest_only().encode() for r in carry if r.qos > 0]
        data = self._header() + b"".join(kept)
        tmp = self.directory / f".{JOURNAL_NAME}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data)
                if self.sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.sync:
            fsync_dir(self.directory)
        self.size = len(data)
        with self._cond:
            self.synced = self.written  # what the old file held is in the checkpoint (or lost with the file)
            self._unsynced.clear()
            self._rewrite = False
        if not keep_pending:
            self._buf.clear()


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """All of ``data``: at the file's position (its end with ``O_APPEND``), or at ``offset``."""
    view = memoryview(data)
    while view:
        if offset is None:
            view = view[os.write(fd, view) :]
        else:
            view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]
