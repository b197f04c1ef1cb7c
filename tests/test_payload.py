"""Payload decoding: formats, rejections with the right outcome, stream ids."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.forecast import ForecastEncoder
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import (
    MAX_STREAM_ID_LEN,
    DecodeResult,
    PayloadDecoder,
    PayloadError,
    parse_timestamp,
    sanitise_stream_id,
)
from tests.test_engine import NumpyModel, engine_for, make_manifest

NOW = 1_717_000_000.0  # 2024-05-29T16:26:40Z


def single(**kw: object) -> PayloadDecoder:
    return PayloadDecoder(["demand"], **kw)  # type: ignore[arg-type]


def multi(**kw: object) -> PayloadDecoder:
    return PayloadDecoder(["temp", "hum"], **kw)  # type: ignore[arg-type]


def decode(dec: PayloadDecoder, body: bytes | str, stream: str | None = "s1") -> DecodeResult:
    raw = body.encode() if isinstance(body, str) else body
    return dec.decode(raw, stream, NOW, 5.0)


def outcome_of(dec: PayloadDecoder, body: bytes | str, stream: str | None = "s1") -> Outcome:
    with pytest.raises(PayloadError) as ei:
        decode(dec, body, stream)
    return ei.value.outcome


# -- accepted formats -----------------------------------------------------------------------------


def test_bare_number_uses_arrival_time_and_topic_stream() -> None:
    res = decode(single(), " 21.5\n", "kitchen")
    assert res.rejected == []
    (r,) = res.readings
    assert (r.stream, r.values, r.ts, r.received) == ("kitchen", (21.5,), NOW, 5.0)


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("body", [BOM + b"21.5", BOM + b'{"value": 21.5}', BOM + b' [{"value": 21.5}]'])
def test_a_utf8_byte_order_mark_is_ignored(body: bytes) -> None:
    """Some editors and Windows tools start a file with one (``mosquitto_pub -f`` sends it as it is)."""
    (r,) = decode(single(), body).readings
    assert r.values == (21.5,)


def test_a_byte_order_mark_is_ignored_only_at_the_start() -> None:
    assert outcome_of(single(), b"21" + BOM) is Outcome.BAD_PAYLOAD
    assert outcome_of(single(), BOM) is Outcome.BAD_PAYLOAD  # nothing else: an empty body


def test_object_with_value_field_and_epoch_seconds() -> None:
    (r,) = decode(single(), '{"value": 3, "ts": 1716999990}').readings
    assert r.values == (3.0,)
    assert r.ts == 1716999990.0


def test_column_field_name_wins_over_value() -> None:
    (r,) = decode(single(), '{"value": 3, "demand": 7}').readings
    assert r.values == (7.0,)


@pytest.mark.parametrize(
    "ts, expected",
    [
        (1716999990, 1716999990.0),
        (1716999990123, 1716999990.123),
        (1716999990123456, 1716999990.123456),
        (1716999990123456789, 1716999990.123456789),
        ("2024-05-29T16:26:30Z", 1716999990.0),
        ("2024-05-29T18:26:30+02:00", 1716999990.0),
        ("2024-05-29T16:26:30.5", 1716999990.5),
        ("2024-05-29 16:26:30", 1716999990.0),
        ("1716999990", 1716999990.0),
    ],
)
def test_timestamp_forms(ts: object, expected: float) -> None:
    (r,) = decode(single(), json.dumps({"value": 1.0, "ts": ts})).readings
    assert r.ts == pytest.approx(expected, abs=1e-6)


def test_timestamp_field_alternatives() -> None:
    (r,) = decode(single(), '{"value": 1, "timestamp": "2024-05-29T16:26:30Z"}').readings
    assert r.ts == 1716999990.0


def test_multi_column_mapping_by_name_and_config() -> None:
    dec = multi(fields={"hum": "rh"})
    (r,) = decode(dec, '{"rh": 40.5, "temp": 20, "other": "ignored"}').readings
    assert r.values == (20.0, 40.5)


def test_stream_from_payload_field_wins_over_topic() -> None:
    dec = single(stream_field="id")
    (r,) = decode(dec, '{"id": "dev/7", "value": 1}', "from-topic").readings
    assert r.stream == sanitise_stream_id("dev/7") and r.stream.startswith("dev_7-")
    (r,) = decode(dec, '{"value": 1}', "from-topic").readings
    assert r.stream == "from-topic"


def test_array_keeps_order_and_rejects_only_bad_elements() -> None:
    body = json.dumps(
        [
            {"value": 1, "ts": NOW - 30},
            {"value": "x"},
            {"ts": NOW - 20},
            2.5,
            {"value": 1e300},
            {"value": 3, "ts": "yesterday"},
            [1],
            {"value": 4, "ts": NOW - 10},
        ]
    )
    res = decode(single(), body)
    assert [r.values[0] for r in res.readings] == [1.0, 2.5, 4.0]
    assert res.rejected == [
        Outcome.BAD_PAYLOAD,
        Outcome.MISSING_FIELD,
        Outcome.NON_FINITE,
        Outcome.BAD_TIMESTAMP,
        Outcome.BAD_PAYLOAD,
    ]
    assert res.count == 8


# -- rejections -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, outcome",
    [
        (b"", Outcome.BAD_PAYLOAD),
        (b"   ", Outcome.BAD_PAYLOAD),
        (b"\xff\xfe21", Outcome.BAD_PAYLOAD),
        (b"hello", Outcome.BAD_PAYLOAD),
        (b"1_000", Outcome.BAD_PAYLOAD),
        (b"NaN", Outcome.NON_FINITE),
        (b"-inf", Outcome.NON_FINITE),
        (b"1e308", Outcome.NON_FINITE),
        (b"1e999", Outcome.NON_FINITE),
        (b'{"value": NaN}', Outcome.NON_FINITE),
        (b'{"value": Infinity}', Outcome.NON_FINITE),
        (b'{"value": 1' + b"0" * 400 + b"}", Outcome.NON_FINITE),
        (b'{"value": 1' + b"0" * 5000 + b"}", Outcome.BAD_PAYLOAD),
        (b'{"value": true}', Outcome.BAD_PAYLOAD),
        (b'{"value": "21"}', Outcome.BAD_PAYLOAD),
        (b'{"other": 1}', Outcome.MISSING_FIELD),
        (b'{"value": 1', Outcome.BAD_PAYLOAD),
        (b'"21"', Outcome.BAD_PAYLOAD),
        (b"null", Outcome.BAD_PAYLOAD),
        (b"[]", Outcome.BAD_PAYLOAD),
        (b'{"value": 1, "ts": -5}', Outcome.BAD_TIMESTAMP),
        (b'{"value": 1, "ts": "2024-13-01"}', Outcome.BAD_TIMESTAMP),
        (b'{"value": 1, "ts": true}', Outcome.BAD_TIMESTAMP),
        (b'{"value": 1, "ts": 1e400}', Outcome.BAD_TIMESTAMP),
        (b'{"value": 1, "ts": 0}', Outcome.BAD_TIMESTAMP),
        (b'{"value": 1, "ts": "2100-01-01T00:00:00Z"}', Outcome.BAD_TIMESTAMP),
    ],
)
def test_rejections(body: bytes, outcome: Outcome) -> None:
    assert outcome_of(single(), body) is outcome


def test_body_size_checked_before_decoding() -> None:
    dec = single(max_payload_bytes=100)
    assert outcome_of(dec, b"\xff" * 101) is Outcome.TOO_LARGE
    assert outcome_of(dec, b"1" * 1_000_000) is Outcome.TOO_LARGE
    assert decode(dec, b" " * 96 + b"1.5").readings[0].values == (1.5,)


def test_array_length_capped() -> None:
    dec = single(max_array_len=3)
    assert decode(dec, "[1, 2, 3]").count == 3
    assert outcome_of(dec, "[1, 2, 3, 4]") is Outcome.TOO_LARGE


def test_deep_nesting_rejected_before_parsing() -> None:
    dec = single(max_payload_bytes=1 << 20)
    assert outcome_of(dec, "[" * 100_000 + "]" * 100_000) is Outcome.BAD_PAYLOAD
    assert outcome_of(dec, '{"a": ' * 50 + "1" + "}" * 50) is Outcome.BAD_PAYLOAD
    # brackets inside strings do not count as nesting
    (r,) = decode(dec, json.dumps({"note": "[[[[[{{{{{", "value": 2})).readings
    assert r.values == (2.0,)
    res = decode(dec, json.dumps([{"value": i, "ts": NOW - 100 + i, "tag": '"]]]\\'} for i in range(50)]))
    assert len(res.readings) == 50


def test_missing_stream() -> None:
    assert outcome_of(single(), b"1", None) is Outcome.BAD_STREAM
    assert outcome_of(single(), b"1", "") is Outcome.BAD_STREAM
    assert outcome_of(single(stream_field="id"), b'{"id": 5.5, "value": 1}', None) is Outcome.BAD_STREAM


@pytest.mark.parametrize("body", ["\x1c5", "5\x1d", "\x1e5\x1f", "\xa05", " 5\u3000"])
def test_bare_number_with_any_whitespace_around_it(body: str) -> None:
    res = single().decode(body.encode(), "s1", NOW, 1.0)
    assert [r.values for r in res.readings] == [(5.0,)] and not res.rejected


def test_bare_number_for_multi_column_model_is_missing_fields() -> None:
    assert outcome_of(multi(), b"21.5") is Outcome.MISSING_FIELD
    assert outcome_of(multi(), b'{"temp": 1}') is Outcome.MISSING_FIELD
    assert outcome_of(multi(), b'{"value": 1}') is Outcome.MISSING_FIELD


def test_clock_skew_limit_can_be_disabled() -> None:
    dec = single(max_clock_skew_s=None)
    (r,) = decode(dec, '{"value": 1, "ts": "2000-01-01T00:00:00Z"}').readings
    assert r.ts == 946684800.0


def test_unknown_field_mapping_rejected() -> None:
    with pytest.raises(ValueError, match="unknown column"):
        PayloadDecoder(["a"], fields={"b": "x"})


def test_parse_timestamp_rejects_overlong_strings() -> None:
    with pytest.raises(PayloadError):
        parse_timestamp("2024-05-29T16:26:30" + " " * 100 + "Z")


# -- stream ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["kitchen-1", "a.b_c"])
def test_safe_ids_are_kept(raw: str) -> None:
    assert sanitise_stream_id(raw) == raw


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("sensors/+/#", "sensors____"),
        ("..", "_."),
        ("../../etc/passwd", "_.__._etc_passwd"),
        (".hidden", "_hidden"),
        ("a\x00b", "a_b"),
        ("température", "temp_rature"),
    ],
)
def test_unsafe_ids_are_cleaned_and_marked_with_a_hash(raw: str, cleaned: str) -> None:
    out = sanitise_stream_id(raw)
    assert re.fullmatch(re.escape(cleaned) + r"-[0-9a-f]{8}", out), out


def test_only_ids_that_need_cleaning_are_cached() -> None:
    """Safe ids (one per stream, thousands of them) take no cache entry; the cleaning of unsafe ones is cached."""
    from edge_lstm.payload import _cleaned_stream_id

    _cleaned_stream_id.cache_clear()
    for i in range(5000):
        assert sanitise_stream_id(f"sensor-{i}") == f"sensor-{i}"
    assert _cleaned_stream_id.cache_info().currsize == 0
    first = sanitise_stream_id("room/7")
    assert sanitise_stream_id("room/7") == first
    info = _cleaned_stream_id.cache_info()
    assert (info.currsize, info.hits) == (1, 1)


def test_ids_that_clean_alike_stay_distinct() -> None:
    ids = ["a+b", "a#b", "a\x00b", "a/b", "a_b"]
    assert len({sanitise_stream_id(i) for i in ids}) == len(ids)


def test_long_ids_are_cut_with_distinct_hash_suffixes() -> None:
    a = sanitise_stream_id("x" * 65_536)
    b = sanitise_stream_id("x" * 65_535 + "y")
    assert len(a) == len(b) == MAX_STREAM_ID_LEN
    assert a != b
    assert a.startswith("x" * 50)


_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@given(st.text(min_size=1, max_size=200))
def test_sanitised_ids_are_always_safe(raw: str) -> None:
    s = sanitise_stream_id(raw)
    assert _SAFE.fullmatch(s)
    assert ".." not in s
    assert 1 <= len(s) <= MAX_STREAM_ID_LEN
    assert (s == raw) != bool(re.search(r"-[0-9a-f]{8}$", s))  # kept as is, or marked: never both


# -- properties -----------------------------------------------------------------------------------

_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_element = st.one_of(
    _json_scalar,
    st.dictionaries(st.sampled_from(["value", "ts", "temp", "hum", "id", "x"]), _json_scalar, max_size=5),
    st.lists(_json_scalar, max_size=3),
)
# A number with whitespace around it, Unicode's included (float() itself skips only some of it).
_padded_number = st.tuples(
    st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2000\u2028\u3000", max_size=3),
    st.from_regex(r"[-+]?(\d{1,4}(\.\d{0,3})?|\.\d{1,3})([eE][-+]?\d{1,3})?", fullmatch=True),
    st.text(alphabet=" \t\n\x1c\x1f\x85\xa0\u3000", max_size=3),
).map(lambda t: "".join(t).encode())
_body = st.one_of(
    st.binary(max_size=200),
    _padded_number,
    _element.map(lambda e: json.dumps(e).encode()),
    st.lists(_element, max_size=12).map(lambda e: json.dumps(e).encode()),
)


@settings(max_examples=300, deadline=None)
@given(_body, st.sampled_from([None, "s1", "a/b", ""]), st.booleans())
def test_decode_never_raises_other_errors_and_counts_add_up(body: bytes, stream: str | None, multi_col: bool) -> None:
    dec = multi(stream_field="id", max_array_len=10) if multi_col else single(stream_field="id", max_array_len=10)
    try:
        res = dec.decode(body, stream, NOW, 1.0)
    except PayloadError as e:
        assert isinstance(e.outcome, Outcome)
        return
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    expected = len(doc) if isinstance(doc, list) else 1
    assert res.count == expected
    assert all(isinstance(o, Outcome) for o in res.rejected)
    for r in res.readings:
        assert len(r.values) == len(dec.columns)
        assert all(math.isfinite(v) and abs(v) <= dec.max_abs_value for v in r.values)
        assert math.isfinite(r.ts)
        assert _SAFE.fullmatch(r.stream)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
            st.integers(min_value=-3600, max_value=3600),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_valid_arrays_round_trip(items: list[tuple[float, int]]) -> None:
    body = json.dumps([{"value": v, "ts": NOW + d} for v, d in items]).encode()
    res = single().decode(body, "s", NOW, 0.0)
    assert res.rejected == []
    assert [(r.values[0], r.ts) for r in res.readings] == [(v, NOW + d) for v, d in items]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}"\\ a,:é', max_size=60), st.integers(0, 6))
def test_both_nesting_scans_agree(text: str, limit: int) -> None:
    from edge_lstm.payload import _nesting_exceeds_scan, _nesting_exceeds_vector

    assert _nesting_exceeds_scan(text, limit) == _nesting_exceeds_vector(text.encode(), limit)


def test_long_bodies_use_the_vector_scan_correctly() -> None:
    dec = single(max_payload_bytes=1 << 20, max_array_len=100_000)
    flat = json.dumps([{"value": 1, "note": ']]]}}\\\\"[[[[' * 3} for _ in range(200)])
    assert len(decode(dec, flat).readings) == 200
    deep = json.dumps([{"value": 1, "x": [[[[1]]]]}] * 200)
    assert outcome_of(dec, deep) is Outcome.BAD_PAYLOAD


# -- timestamps: a representable instant or bad_timestamp, never anything else ---------------------


def test_timestamp_fields_default_to_ts_then_timestamp_then_time() -> None:
    dec = single()
    assert dec.timestamp_fields == ("ts", "timestamp", "time")
    (r,) = decode(dec, '{"value": 1, "time": 1716999000}').readings
    assert r.ts == 1716999000.0
    (r,) = decode(dec, '{"value": 1, "time": 1716999000, "timestamp": 1716999100, "ts": 1716999200}').readings
    assert r.ts == 1716999200.0
    (r,) = decode(dec, '{"value": 1, "time": 1716999000, "timestamp": 1716999100}').readings
    assert r.ts == 1716999100.0
    (r,) = decode(dec, '{"value": 1}').readings
    assert r.ts == NOW  # none of them: the arrival time


@pytest.mark.parametrize(
    "raw",
    [
        -5,
        -0.001,
        "1969-12-31T23:59:59Z",  # before the epoch: rejected like a negative number
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC: not representable
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        "9999-12-31T23:59:59Z",  # beyond the year 5138
        "5138-11-16T09:46:40Z",  # exactly 1e11 s
        1e300,
        10**400,
        "1e999",
        "9" * 60,
        "nan",
        True,
        None,
        [1],
    ],
)
def test_unrepresentable_timestamps_are_bad(raw: object) -> None:
    with pytest.raises(PayloadError) as ei:
        parse_timestamp(raw)
    assert ei.value.outcome is Outcome.BAD_TIMESTAMP


def test_first_and_last_representable_instants() -> None:
    assert parse_timestamp("1970-01-01T00:00:00Z") == 0.0
    assert parse_timestamp(0) == 0.0
    assert parse_timestamp(99_999_999_999.0) == 99_999_999_999.0
    assert parse_timestamp("5138-11-16T09:46:39Z") == 99_999_999_999.0


_ts_text = st.one_of(
    st.text(max_size=40),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(lambda d: d.isoformat()),
    st.from_regex(r"[+-]?\d{1,25}(\.\d{0,9})?([eE][+-]?\d{1,4})?", fullmatch=True),
)
_ts_raw = st.one_of(
    _ts_text,
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)


@settings(max_examples=1000, deadline=None)
@given(_ts_raw)
def test_parse_timestamp_fuzz(raw: object) -> None:
    try:
        t = parse_timestamp(raw)
    except PayloadError as e:
        assert e.outcome is Outcome.BAD_TIMESTAMP
        return
    assert type(t) is float and 0.0 <= t < 1e11


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.fixed_dictionaries({"value": st.floats(-1e6, 1e6)}, optional={"ts": _ts_raw, "time": _ts_raw}),
             min_size=1, max_size=8),
    st.sampled_from([None, 86_400.0, 0.5]),
    st.floats(min_value=0, max_value=2e11),
)  # fmt: skip
def test_decoder_and_engine_never_raise_on_fuzzed_timestamps(
    items: list[dict[str, object]], skew: float | None, now: float
) -> None:
    """With the skew check on and off (``None``: ``max_clock_skew_s = 0``), whatever the arrival clock says."""
    dec = single(max_clock_skew_s=skew)
    try:
        body = json.dumps(items).encode()
    except ValueError:
        return
    try:
        res = dec.decode(body, "s", min(now, 99_999_999_999.0), 0.0)
    except PayloadError as e:
        assert e.outcome is not None
        return
    assert res.count == len(items)
    for r in res.readings:
        assert 0.0 <= r.ts < 1e11
        if skew is not None:
            assert abs(r.ts - min(now, 99_999_999_999.0)) <= skew
    model = NumpyModel(make_manifest(columns=("demand",), horizon=4))
    eng = engine_for(model)
    out = eng.process(res.readings)
    assert sum(out.outcomes.values()) == len(res.readings)
    enc = ForecastEncoder(model.manifest.cadence_s)
    for f in out.forecasts:
        json.loads(enc.encode(f))


def test_raw_ids_that_look_like_cleaned_ones_stay_distinct() -> None:
    a, b = sanitise_stream_id("a b"), sanitise_stream_id("a_b-c8687a08")
    assert a == "a_b-c8687a08"  # the cleaned form of "a b" ...
    assert b != a and b.startswith("a_b-c8687a08-")  # ... so a raw id of that form is marked too
    assert sanitise_stream_id("node-0A1B2C3D") == "node-0A1B2C3D"  # upper-case hex is never a mark


_id_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="ab _-.", max_size=12),
    st.text(alphabet="ab _", max_size=6).map(
        lambda s: s + "-" + __import__("hashlib").sha256(s.encode()).hexdigest()[:8]
    ),
)


@settings(max_examples=500, deadline=None)
@given(_id_text, _id_text)
def test_distinct_raw_ids_stay_distinct_streams(a: str, b: str) -> None:
    if not a or not b or a == b:
        return
    assert sanitise_stream_id(a) != sanitise_stream_id(b)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab _", max_size=6).filter(bool))
def test_a_raw_id_never_meets_the_cleaned_form_of_another(raw: str) -> None:
    cleaned = sanitise_stream_id(raw)
    if cleaned != raw:
        assert sanitise_stream_id(cleaned) != cleaned  # the cleaned text as a raw id is another stream
