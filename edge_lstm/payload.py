"""Message bodies to readings: decoding, validation and stream ids.

Accepted bodies (UTF-8):

* a bare number, e.g. ``21.5`` - for a model with a single value column;
* a JSON object with the model's value field(s) and an optional timestamp,
  e.g. ``{"ts": 1717000000, "temp": 21.5}``;
* a JSON array of such objects or numbers (at most ``max_array_len``).

A timestamp is epoch seconds, milliseconds, microseconds or nanoseconds (told
apart by magnitude) or an ISO 8601 string (UTC when it has no offset), and must
lie in ``[1970-01-01T00:00:00Z, 1e11 s)`` (the year 5138, where the magnitude
rule turns to milliseconds); a reading without one takes its arrival time.  The stream id comes from the
payload's ``stream_field`` when configured and present, else from the topic.

Nothing here raises anything but :class:`PayloadError`.  A body that cannot be
read at all raises it (one rejected reading); inside an array, a bad element
rejects only itself, and :class:`DecodeResult` lists an outcome for every
element, so the caller can count every reading exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from edge_lstm.outcomes import Outcome

_LOG = logging.getLogger(__name__)

MAX_STREAM_ID_LEN = 64
_HASH_SUFFIX_LEN = 8
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# What a changed id ends with; a raw id that already ends so is changed too, or it could meet one.
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}\Z")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_DOT_BEFORE_DOT = re.compile(r"\.(?=\.)")
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*")
_NON_FINITE_WORD = re.compile(r"\s*[-+]?(?:nan|inf|infinity)\s*", re.IGNORECASE)
# Tokens that matter for nesting: escapes (skipped), quotes (string bounds) and brackets.
_NESTING_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)
_MAX_TS_STRING = 64
_VECTOR_SCAN_MIN = 2048  # longer bodies are scanned for nesting with numpy

# Epoch magnitudes: below 1e11 seconds (the year 5138), below 1e14 ms, 1e17 us, else ns.
_EPOCH_SCALES = ((1e11, 1.0), (1e14, 1e-3), (1e17, 1e-6))
_NS = 1e-9
# Representable instants: from the epoch up to where the magnitude rule turns to milliseconds.
MIN_EPOCH_S = 0.0
MAX_EPOCH_S = 1e11
# Readings further from 0 are refused (`non_finite`) unless input.max_abs_value says otherwise.
DEFAULT_MAX_ABS_VALUE = 1e12


class PayloadError(ValueError):
    """A body or element that cannot become a reading; ``outcome`` says why."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """One validated reading of one stream."""

    stream: str  # sanitised stream id
    values: tuple[float, ...]  # in the model's column order
    ts: float  # epoch seconds (reading's own, else arrival)
    received: float  # time.monotonic() at arrival, for latency


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeResult:
    """The readings of one body and the outcome of every element that was rejected.

    ``len(readings) + len(rejected)`` is the number of readings the body held.
    """

    readings: list[Reading]
    rejected: list[Outcome]

    @property
    def count(self) -> int:
        return len(self.readings) + len(self.rejected)


def sanitise_stream_id(raw: str) -> str:
    """A stream id safe for topics, file names and metric labels.

    Keeps ``[A-Za-z0-9_.-]`` and replaces every other character with ``_``; no
    ``..`` and no leading dot; at most 64 characters. An id that had to be
    changed (cut or cleaned) gets ``-`` and 8 hex digits of the SHA-256 of the
    whole raw id; so does a raw id that already ends like that, so that no raw
    id can meet a changed one: distinct raw ids stay distinct streams (``a+b``
    and ``a#b`` do not merge, nor ``a b`` and ``a_b-c8687a08``).
    An empty id raises :class:`PayloadError` (``BAD_STREAM``).
    """
    if _SAFE_ID.fullmatch(raw) and ".." not in raw and not _HASH_SUFFIX.search(raw):
        return raw
    return _cleaned_stream_id(raw)


# Only ids that need cleaning are cached: a safe id (the common case) is checked in ~0.7 us (a hit
# took ~0.15 us), and caching it cost an entry per stream that every reading churned once there were
# more streams than entries (with 10,000 streams every look-up missed, and the 4,096 entries left
# over from a burst of new streams held ~0.4 MB and kept the interpreter's emptied memory pools
# from being returned).
@functools.lru_cache(maxsize=4096)
def _cleaned_stream_id(raw: str) -> str:
    if not raw:
        raise PayloadError(Outcome.BAD_STREAM, "empty stream id")
    head = raw[: MAX_STREAM_ID_LEN + 1]
    s = _UNSAFE_CHAR.sub("_", head)
    s = _DOT_BEFORE_DOT.sub("_", s)
    if s.startswith("."):
        s = "_" + s[1:]
    if len(raw) > MAX_STREAM_ID_LEN or s != raw or _HASH_SUFFIX.search(raw):
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_SUFFIX_LEN]
        s = f"{s[: MAX_STREAM_ID_LEN - _HASH_SUFFIX_LEN - 1]}-{digest}"
    return s


def _nesting_exceeds(text: str, limit: int) -> bool:
    """True when the JSON text nests arrays/objects deeper than ``limit`` (linear time)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    if len(text) > _VECTOR_SCAN_MIN:
        return _nesting_exceeds_vector(text.encode("utf-8", "surrogatepass"), limit)
    return _nesting_exceeds_scan(text, limit)


def _nesting_exceeds_scan(text: str, limit: int) -> bool:
    """The nesting test token by token (fast for short bodies)."""
    depth = 0
    in_string = False
    for m in _NESTING_TOKEN.finditer(text):
        tok = m.group()
        if tok == '"':
            in_string = not in_string
        elif in_string or len(tok) == 2:
            continue
        elif tok in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _nesting_exceeds_vector(data: bytes, limit: int) -> bool:
    """The same test with numpy, for long bodies (all the bytes that matter are ASCII)."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return False
    quote = b == 0x22
    step = ((b == 0x5B) | (b == 0x7B)).astype(np.int32) - ((b == 0x5D) | (b == 0x7D))
    if b"\\" in data:
        # A byte after an odd number of backslashes is escaped: neither a quote nor a bracket.
        idx = np.arange(b.size, dtype=np.int32)
        last_plain = np.maximum.accumulate(np.where(b != 0x5C, idx, np.int32(-1)))
        before = np.empty_like(last_plain)
        before[0] = -1
        before[1:] = last_plain[:-1]
        plain = (idx - 1 - before) % 2 == 0
        quote &= plain
        step *= plain
    outside = (np.cumsum(quote, dtype=np.int32) - quote) % 2 == 0
    return bool(np.cumsum(np.where(outside, step, 0), dtype=np.int32).max() > limit)


def epoch_scale(magnitude: float) -> float:
    """Seconds per unit of an epoch number of this magnitude: seconds below 1e11 (the year 5138),
    milliseconds below 1e14, microseconds below 1e17, else nanoseconds (the converter reads its CSV
    files by the same rule)."""
    for limit, factor in _EPOCH_SCALES:
        if magnitude < limit:
            return factor
    return _NS


def _instant(t: float) -> float:
    if not MIN_EPOCH_S <= t < MAX_EPOCH_S:  # False for NaN
        raise PayloadError(Outcome.BAD_TIMESTAMP, f"timestamp {t!r} is outside 1970-01-01 .. the year 5138")
    return t


def parse_timestamp(raw: object) -> float:
    """Epoch seconds from a number (s/ms/us/ns by magnitude) or an ISO 8601 string.

    The result is a representable instant in ``[MIN_EPOCH_S, MAX_EPOCH_S)``;
    anything else raises :class:`PayloadError` (``BAD_TIMESTAMP``), and nothing else is raised.
    """
    if type(raw) is str:
        text = raw.strip()
        if len(text) > _MAX_TS_STRING:
            raise PayloadError(Outcome.BAD_TIMESTAMP, "timestamp string too long")
        if _NUMBER.fullmatch(text):
            raw = float(text)  # "1e999" is inf: rejected below
        else:
            if text.endswith(("Z", "z")):
                text = text[:-1] + "+00:00"
            try:
                t = dt.datetime.fromisoformat(text)
                if t.tzinfo is None:
                    t = t.replace(tzinfo=dt.timezone.utc)
                epoch = t.timestamp()
            except (ValueError, OverflowError):  # OverflowError: an offset pushing year 1 or 9999 out of range
                raise PayloadError(Outcome.BAD_TIMESTAMP, f"unparsable timestamp {raw[:32]!r}") from None
            return _instant(epoch)
    if type(raw) is int or type(raw) is float:
        try:
            v = float(raw)
        except OverflowError:
            raise PayloadError(Outcome.BAD_TIMESTAMP, "timestamp out of range") from None
        if not math.isfinite(v) or v < 0:
            raise PayloadError(Outcome.BAD_TIMESTAMP, f"timestamp {v!r} is not a valid epoch time")
        return _instant(v * epoch_scale(v))
    raise PayloadError(Outcome.BAD_TIMESTAMP, f"timestamp of type {type(raw).__name__}")


class PayloadDecoder:
    """Decodes message bodies into :class:`Reading` objects for one model's columns.

    ``fields`` maps a model column to its payload field (default: the column's
    own name).  For a single-column model a bare number, or a ``value`` field
    when the column's field is absent, feeds that column.
    """

    def __init__(
        self,
        columns: Sequence[str],
        *,
        fields: Mapping[str, str] | None = None,
        stream_field: str | None = None,
        timestamp_fields: Sequence[str] = ("ts", "timestamp", "time"),
        max_payload_bytes: int = 65_536,
        max_array_len: int = 1_024,
        max_depth: int = 4,
        max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
        max_clock_skew_s: float | None = 7 * 86_400.0,
    ) -> None:
        if not columns:
            raise ValueError("a decoder needs at least one column")
        fields = dict(fields or {})
        unknown = set(fields) - set(columns)
        if unknown:
            raise ValueError(f"field mapping names unknown column(s): {sorted(unknown)}")
        self.columns = tuple(columns)
        self._fields = tuple(fields.get(c, c) for c in self.columns)
        self._single = len(self.columns) == 1
        self.stream_field = stream_field
        self.timestamp_fields = tuple(timestamp_fields)
        self.max_payload_bytes = int(max_payload_bytes)
        self.max_array_len = int(max_array_len)
        self.max_depth = int(max_depth)
        self.max_abs_value = float(max_abs_value)
        self.max_clock_skew_s = max_clock_skew_s

    # -- public ---------------------------------------------------------------------------------

    def decode(self, payload: bytes, topic_stream: str | None, now: float, received: float) -> DecodeResult:
        """Decode one message body.

        ``topic_stream`` is the stream id taken from the topic (raw, sanitised
        here) or None; ``now`` is the arrival time in epoch seconds and
        ``received`` the arrival ``time.monotonic()``.  Raises
        :class:`PayloadError` when the body as a whole is unusable.
        """
        if len(payload) > self.max_payload_bytes:
            raise PayloadError(Outcome.TOO_LARGE, f"body of {len(payload)} bytes > {self.max_payload_bytes}")
        if payload.startswith(_BOM):  # written by some editors and Windows tools; JSON allows ignoring it
            payload = payload[len(_BOM) :]
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(Outcome.BAD_PAYLOAD, "body is not valid UTF-8") from None
        stripped = text.lstrip()
        if not stripped:
            raise PayloadError(Outcome.BAD_PAYLOAD, "empty body")
        if stripped[0] not in "[{":
            value = self._bare_number(text)
            return DecodeResult([Reading(self._stream(topic_stream, None), (value,), now, received)], [])
        if _nesting_exceeds(stripped, self.max_depth):
            raise PayloadError(Outcome.BAD_PAYLOAD, f"JSON nested deeper than {self.max_depth}")
        try:
            doc = json.loads(stripped)
        except (ValueError, RecursionError):
            # ValueError covers JSONDecodeError and integers too long to convert.
            raise PayloadError(Outcome.BAD_PAYLOAD, "body is not valid JSON") from None
        if isinstance(doc, dict):
            return DecodeResult([self._element(doc, topic_stream, now, received)], [])
        if not isinstance(doc, list):
            raise PayloadError(Outcome.BAD_PAYLOAD, "JSON body must be an object or an array")
        if not doc:
            raise PayloadError(Outcome.BAD_PAYLOAD, "empty JSON array")
        if len(doc) > self.max_array_len:
            raise PayloadError(Outcome.TOO_LARGE, f"array of {len(doc)} readings > {self.max_array_len}")
        readings: list[Reading] = []
        rejected: list[Outcome] = []
        for item in doc:
            try:
                readings.append(self._element(item, topic_stream, now, received))
            except PayloadError as e:
                rejected.append(e.outcome)
                if _LOG.isEnabledFor(logging.DEBUG):
                    _LOG.debug("array element rejected (%s): %s", e.outcome.value, e)
        return DecodeResult(readings, rejected)

    # -- helpers --------------------------------------------------------------------------------

    def _bare_number(self, text: str) -> float:
        if not self._single:
            raise PayloadError(Outcome.MISSING_FIELD, f"a bare number cannot feed the columns {list(self.columns)}")
        # Stripped first: the pattern's ``\s`` is str.isspace(), which float() does not all skip
        # (the separators U+001C-U+001F).
        text = text.strip()
        if _NUMBER.fullmatch(text):
            return self._check_value(float(text))
        if _NON_FINITE_WORD.fullmatch(text):
            raise PayloadError(Outcome.NON_FINITE, "value is not finite")
        raise PayloadError(Outcome.BAD_PAYLOAD, "body is neither a number nor JSON")

    def _check_value(self, v: float) -> float:
        if not math.isfinite(v) or abs(v) > self.max_abs_value:
            raise PayloadError(Outcome.NON_FINITE, f"value {v!r} is not finite or beyond {self.max_abs_value:g}")
        return v

    def _number(self, raw: object, name: str) -> float:
        if type(raw) is float:
            return self._check_value(raw)
        if type(raw) is int:
            try:
                return self._check_value(float(raw))
            except OverflowError:
                raise PayloadError(Outcome.NON_FINITE, f"field {name!r} is out of range") from None
        raise PayloadError(Outcome.BAD_PAYLOAD, f"field {name!r} is a {type(raw).__name__}, not a number")

    def _stream(self, topic_stream: str | None, doc: dict[str, object] | None) -> str:
        if doc is not None and self.stream_field is not None:
            raw = doc.get(self.stream_field)
            if raw is not None:
                if type(raw) is int:
                    raw = str(raw)
                if type(raw) is not str:
                    raise PayloadError(Outcome.BAD_STREAM, f"field {self.stream_field!r} is not a string")
                return sanitise_stream_id(raw)
        if topic_stream is None:
            raise PayloadError(Outcome.BAD_STREAM, "no stream id in the topic or the payload")
        return sanitise_stream_id(topic_stream)

    def _element(self, item: object, topic_stream: str | None, now: float, received: float) -> Reading:
        if type(item) is not dict:
            if type(item) is int or type(item) is float:
                if not self._single:
                    raise PayloadError(Outcome.MISSING_FIELD, "a bare number cannot feed several columns")
                return Reading(self._stream(topic_stream, None), (self._number(item, "value"),), now, received)
            raise PayloadError(Outcome.BAD_PAYLOAD, f"reading must be an object or a number, not {type(item).__name__}")
        stream = self._stream(topic_stream, item)
        values = []
        for name in self._fields:
            raw = item.get(name)
            if raw is None and self._single:
                raw = item.get("value")
            if raw is None:
                raise PayloadError(Outcome.MISSING_FIELD, f"field {name!r} is missing")
            values.append(self._number(raw, name))
        ts = now
        for tname in self.timestamp_fields:
            raw_ts = item.get(tname)
            if raw_ts is not None:
                ts = parse_timestamp(raw_ts)
                if self.max_clock_skew_s is not None and abs(ts - now) > self.max_clock_skew_s:
                    raise PayloadError(
                        Outcome.BAD_TIMESTAMP, f"timestamp {ts:.0f} is {ts - now:+.0f} s from the arrival time"
                    )
                break
        return Reading(stream, tuple(values), ts, received)
