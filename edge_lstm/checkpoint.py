"""Atomic, checksummed state checkpoints, and the set-aside of bad ones.

One file, ``state.ckpt`` in the state directory::

    offset  size  field
    0       8     magic b"ELSTMCK\\0"
    8       4     format version, big-endian (this build writes and reads 1)
    12      64    fingerprint: the model's SHA-256, hex ASCII
    76      8     payload length N, big-endian
    84      N     payload: numpy .npz (no pickles) of StateTable.to_arrays()
    84+N    32    SHA-256 of bytes [0, 84+N)

It is written to a temporary file in the same directory, fsynced, renamed over
the old one and the directory fsynced, so a crash leaves either the old or the
new file.  On start a file that is truncated, corrupt, from another model or
from a newer format is renamed aside (``state.ckpt.rejected-<UTC time>``, the
newest few kept) and the daemon starts cold: bad content never raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import io
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_lstm.state import StateTable

_LOG = logging.getLogger(__name__)

CHECKPOINT_NAME = "state.ckpt"
LOCK_NAME = "daemon.lock"
MAGIC = b"ELSTMCK\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sI64sQ")
_DIGEST_LEN = 32
_TMP_PREFIX = f".{CHECKPOINT_NAME}.tmp-"
_REJECTED_PREFIX = f"{CHECKPOINT_NAME}.rejected-"
JOURNAL_SEQ = "journal_seq"


class LoadStatus(str, enum.Enum):
    """What :func:`load_checkpoint` made of the state directory."""

    RESTORED = "restored"
    MISSING = "missing"  # no checkpoint: a normal cold start
    REJECTED = "rejected"  # bad or foreign content: set aside, cold start
    UNREADABLE = "unreadable"  # could not be read (I/O error): cold start, file left in place


@dataclasses.dataclass(frozen=True)
class SaveResult:
    path: Path
    size: int  # bytes
    seconds: float
    streams: int


@dataclasses.dataclass(frozen=True)
class LoadResult:
    table: StateTable | None  # None: start cold
    status: LoadStatus
    reason: str
    path: Path
    set_aside: Path | None = None  # where a rejected file went
    size: int = 0
    seconds: float = 0.0
    journal_seq: int = 0  # the last journal record the restored state includes

    @property
    def streams(self) -> int:
        return 0 if self.table is None else len(self.table)


def encode_checkpoint(arrays: Mapping[str, npt.NDArray[np.generic]], fingerprint: str) -> bytes:
    """The bytes of a checkpoint file for the given table arrays."""
    fp = fingerprint.encode("ascii")
    if len(fp) > 64:
        raise ValueError("fingerprint longer than 64 characters")
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    payload = buf.getvalue()
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, fp.ljust(64, b"\0"), len(payload)) + payload
    return body + hashlib.sha256(body).digest()


class _Rejected(Exception):
    pass


def decode_checkpoint(data: bytes, fingerprint: str) -> dict[str, npt.NDArray[np.generic]]:
    """The arrays of a checkpoint file's bytes; raises ``_Rejected`` with the reason."""
    if len(data) < _HEADER.size:
        raise _Rejected(f"truncated ({len(data)} bytes)")
    magic, version, fp, n = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _Rejected("not a state checkpoint (bad magic)")
    if version > FORMAT_VERSION:
        raise _Rejected(f"format version {version} is newer than this build's {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise _Rejected(f"format version {version} is not supported")
    if len(data) != _HEADER.size + n + _DIGEST_LEN:
        raise _Rejected(f"truncated or padded ({len(data)} bytes, header promises {_HEADER.size + n + _DIGEST_LEN})")
    body, digest = data[:-_DIGEST_LEN], data[-_DIGEST_LEN:]
    if hashlib.sha256(body).digest() != digest:
        raise _Rejected("checksum mismatch (corrupt file)")
    stored = fp.rstrip(b"\0").decode("ascii", "replace")
    if stored != fingerprint:
        raise _Rejected(f"written for another model (fingerprint {stored[:12]}, model {fingerprint[:12]})")
    try:
        with np.load(io.BytesIO(body[_HEADER.size :]), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # any failure to parse the payload is bad content
        raise _Rejected(f"unreadable payload: {e}") from None


def fsync_dir(directory: Path) -> None:
    """Sync a directory's entries (a rename in it), where the file system can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _remove_stale_temps(directory: Path) -> None:
    for p in directory.glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            p.unlink()


def save_checkpoint(
    table: StateTable | Mapping[str, npt.NDArray[np.generic]],
    directory: Path | str,
    fingerprint: str,
    *,
    clock: Callable[[], float] = time.perf_counter,
    journal_seq: int = 0,
) -> SaveResult:
    """Write the table (or a snapshot from ``StateTable.to_arrays()``) atomically.

    ``journal_seq`` is the last journal record the state includes (stored as
    the array ``journal_seq``; a restart replays the records after it).

    Raises ``OSError`` when the file cannot be written (the old checkpoint is
    then untouched).  Take the snapshot on the thread that owns the table.
    """
    t0 = clock()
    arrays = dict(table.to_arrays() if isinstance(table, StateTable) else table)
    arrays[JOURNAL_SEQ] = np.asarray(journal_seq, dtype=np.uint64)
    data = encode_checkpoint(arrays, fingerprint)
    d = Path(directory)
    final = d / CHECKPOINT_NAME
    if not os.path.lexists(d):  # removed while running: recreate it (a file in its place still fails below)
        d.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(d)
    tmp = d / f"{_TMP_PREFIX}{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(d)
    n = int(np.asarray(arrays["streams"]).shape[0])
    return SaveResult(final, len(data), clock() - t0, n)


def _set_aside(path: Path, wall: Callable[[], float], keep: int) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall()))
    target = path.with_name(f"{_REJECTED_PREFIX}{stamp}")
    k = 1
    while target.exists():
        target = path.with_name(f"{_REJECTED_PREFIX}{stamp}-{k}")
        k += 1
    try:
        os.replace(path, target)
    except OSError as e:
        _LOG.error("cannot set the rejected checkpoint %s aside: %s", path, e)
        return None
    fsync_dir(path.parent)
    old = sorted(path.parent.glob(f"{_REJECTED_PREFIX}*"))  # names sort by time
    for p in old[: max(0, len(old) - keep)]:
        with contextlib.suppress(OSError):
            p.unlink()
    return target


def load_checkpoint(
    directory: Path | str,
    fingerprint: str,
    layers: Sequence[int],
    n_values: int,
    capacity: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    wall: Callable[[], float] = time.time,
    keep_rejected: int = 5,
) -> LoadResult:
    """Restore the state table for a model, or say why the daemon starts cold.

    Never raises for bad content: a rejected file is renamed aside and reported.
    """
    t0 = clock()
    d = Path(directory)
    path = d / CHECKPOINT_NAME
    _remove_stale_temps(d)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadResult(None, LoadStatus.MISSING, "no checkpoint", path, seconds=clock() - t0)
    except OSError as e:
        _LOG.error("cannot read the checkpoint %s: %s; starting cold", path, e)
        return LoadResult(None, LoadStatus.UNREADABLE, f"cannot read: {e}", path, seconds=clock() - t0)
    try:
        arrays = decode_checkpoint(data, fingerprint)
        try:
            table = StateTable.from_arrays(arrays, layers, n_values, capacity)
        except (KeyError, ValueError, TypeError) as e:
            raise _Rejected(f"state layout does not fit the model: {e}") from None
    except _Rejected as e:
        reason = str(e)
        aside = _set_aside(path, wall, keep_rejected)
        _LOG.warning("checkpoint %s rejected (%s), set aside as %s; starting cold", path, reason, aside)
        return LoadResult(None, LoadStatus.REJECTED, reason, path, aside, len(data), clock() - t0)
    _LOG.info("restored the state of %d stream(s) from %s", len(table), path)
    seq = int(np.asarray(arrays[JOURNAL_SEQ])) if JOURNAL_SEQ in arrays else 0
    return LoadResult(table, LoadStatus.RESTORED, "restored", path, None, len(data), clock() - t0, seq)


def state_dir_holder(directory: Path) -> str | None:
    """The pid in ``daemon.lock`` when another process holds the lock (``"unknown"`` without one); None when
    it is free or there is no lock file.  A probe that creates nothing and lets go at once."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(fd)
    except OSError:  # no flock on this file system: the daemon runs unguarded there too
        return None
    finally:
        os.close(fd)  # and with it the probe's shared lock
    return None


def _holder_pid(fd: int) -> str:
    """The pid the lock's holder wrote into ``daemon.lock`` (``"unknown"`` before it has)."""
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"


class StateDirBusy(Exception):
    """Another process holds the state directory's lock."""


def lock_state_dir(directory: Path) -> int:
    """Take the state directory for this process: an exclusive ``flock`` on ``daemon.lock``, which holds the pid.

    Returns the lock's file descriptor (closing it lets go).  Two daemons on one directory would write
    one journal and overwrite each other's checkpoints, and a start would restore the other's state:
    :class:`StateDirBusy` names the holder instead.  A file system without ``flock`` gives no lock
    (logged), as before.
    """
    path = directory / LOCK_NAME
    # Held open read-only: a file open for writing would keep the disk from being remounted read-only.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise StateDirBusy(f"another process holds {path} (pid {holder})") from None
    except OSError as e:
        _LOG.warning("cannot lock %s (%s): not guarding the state directory against a second daemon",
                     path, e.strerror or e)  # fmt: skip
        return fd
    with contextlib.suppress(OSError):  # only for the message a second daemon gives
        path.write_text(f"{os.getpid()}\n")
    return fd
