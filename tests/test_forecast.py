"""Forecast payloads: valid JSON, every field, timestamps per step."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_lstm.engine import Forecast
from edge_lstm.forecast import RESOLUTION, ForecastEncoder, decimals_for, iso_utc
from edge_lstm.intervals import Intervals
from edge_lstm.modelspec import load_manifest

REPO = Path(__file__).resolve().parents[1]


def _strict(body: bytes) -> dict[str, object]:
    def no_constants(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")

    doc = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    assert isinstance(doc, dict)
    return doc


def make(values: list[float], ts: float = 1716998400.0, warming_up: bool = False) -> Forecast:
    return Forecast("kitchen", ts, np.asarray(values, dtype=np.float64), warming_up, 1.0, "taylor@0123456789ab")


def test_payload_fields_and_step_timestamps() -> None:
    enc = ForecastEncoder(1800.0, "MW")
    doc = _strict(enc.encode(make([31012.5, 30000.25, -1.0])))
    assert doc == {
        "stream": "kitchen",
        "model": "taylor@0123456789ab",
        "ts": "2024-05-29T16:00:00Z",
        "ts_epoch": 1716998400.0,
        "units": "MW",
        "warming_up": False,
        "forecasts": [
            {"ts": "2024-05-29T16:30:00Z", "value": 31012.5},
            {"ts": "2024-05-29T17:00:00Z", "value": 30000.25},
            {"ts": "2024-05-29T17:30:00Z", "value": -1.0},
        ],
    }


def test_values_round_trip_exactly_by_default_and_round_with_precision() -> None:
    v = [1 / 3, 2.0 / 7.0 * 1e5]
    doc = _strict(ForecastEncoder(60.0).encode(make(v)))
    assert [item["value"] for item in doc["forecasts"]] == v  # type: ignore[index, union-attr]
    doc = _strict(ForecastEncoder(60.0, precision=4).encode(make(v)))
    assert [item["value"] for item in doc["forecasts"]] == [0.3333, 28570.0]  # type: ignore[index, union-attr]


def test_decimals_reach_the_resolution() -> None:
    assert decimals_for(0.006) == 3 and decimals_for(0.001) == 3 and decimals_for(0.0011) == 3
    assert decimals_for(0.01) == 2 and decimals_for(5e-5) == 5
    assert decimals_for(1e3) == 1  # at least one: a value stays a float in every JSON reader
    assert decimals_for(1e-17) == 17 and decimals_for(1e-18) is None  # finer than 17 decimals: exact floats
    assert decimals_for(0.0) is None and decimals_for(float("nan")) is None and decimals_for(-1.0) is None


def test_a_model_writes_values_and_bounds_to_a_millionth_of_its_output_scale() -> None:
    """Near zero and in the billions alike: the bounds keep their distance from the value.

    A meter reading of 1.7e9 with an interval of +-37.5 was written with 7 significant digits
    before (``1.716998e+09`` for the value's bounds, both sides alike).
    """
    man = load_manifest(REPO / "models" / "taylor")
    iv = Intervals((0.8,), [[-37.5, -40.0]], [[37.5, 40.0]])
    man = dataclasses.replace(man, intervals=iv, pipeline=dataclasses.replace(
        man.pipeline, output=dataclasses.replace(man.pipeline.output, scale=50.0)))  # fmt: skip
    enc = ForecastEncoder.for_manifest(man)
    for base in (1_716_998_400.123456, 0.000123456, -31012.987654321):
        values = [base, base + 1.0]
        doc = _strict(enc.encode(make(values)))
        items = doc["forecasts"]
        assert isinstance(items, list)
        step = RESOLUTION * 50.0
        for item, v, lo, hi in zip(items, values, (-37.5, -40.0), (37.5, 40.0), strict=True):
            assert abs(item["value"] - v) <= step / 2
            assert abs(item["lo80"] - (v + lo)) <= step / 2 and abs(item["hi80"] - (v + hi)) <= step / 2
            assert isinstance(item["value"], float)
    body = enc.encode(make([1_716_998_400.123456, 0.0]))
    assert b'"value":1716998400.12346,"lo80":1716998362.62346,"hi80":1716998437.62346' in body
    # The bundled model (output scale ~6,000 MW): three decimals; a precision still overrides it.
    taylor = load_manifest(REPO / "models" / "taylor")
    # A series near 1e-9 that never changed (the converter sets its output scale to 1): its level decides.
    tiny = dataclasses.replace(man, pipeline=dataclasses.replace(man.pipeline, features=[
        dataclasses.replace(f, center=3.2e-9) if f.kind.value == "level" else f for f in man.pipeline.features],
        output=dataclasses.replace(man.pipeline.output, scale=1.0)))  # fmt: skip
    doc = _strict(ForecastEncoder.for_manifest(tiny).encode(make([3.2e-9, 3.3e-9])))
    assert [it["value"] for it in doc["forecasts"]] == [3.2e-9, 3.3e-9]  # type: ignore[index, union-attr]
    values = [31012.51264] * taylor.horizon
    assert b'"value":31012.513,' in ForecastEncoder.for_manifest(taylor).encode(make(values))
    assert b'"value":3.101e+04,' in ForecastEncoder.for_manifest(taylor, precision=4).encode(make(values))


def test_non_finite_values_become_null_and_flags_are_json_booleans() -> None:
    doc = _strict(ForecastEncoder(60.0).encode(make([float("nan"), float("inf"), 1.0], warming_up=True)))
    assert [item["value"] for item in doc["forecasts"]] == [None, None, 1.0]  # type: ignore[index, union-attr]
    assert doc["warming_up"] is True


def test_units_and_model_are_escaped() -> None:
    f = make([1.0])
    f.model_id = 'we"ird\\name'
    doc = _strict(ForecastEncoder(60.0, units='°C "dry"').encode(f))
    assert doc["model"] == 'we"ird\\name'
    assert doc["units"] == '°C "dry"'


def test_rejects_bad_cadence() -> None:
    with pytest.raises(ValueError):
        ForecastEncoder(0.0)


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_utc_matches_datetime(t: float) -> None:
    expected = dt.datetime.fromtimestamp(round(t * 1000) / 1000, dt.timezone.utc)
    assert dt.datetime.fromisoformat(iso_utc(t).replace("Z", "+00:00")) == expected


def test_iso_utc_millisecond_and_day_boundaries() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00Z"
    assert iso_utc(86_399.9996) == "1970-01-02T00:00:00Z"
    assert iso_utc(1716998400.25) == "2024-05-29T16:00:00.250Z"


@given(
    st.sampled_from([1800.0, 60.0, 0.25, 1 / 3, 86_400.0]),
    st.integers(1, 5),
    st.lists(st.sampled_from([1, 1, 1, 2, 0, -1, 7]), min_size=1, max_size=30),
    st.sampled_from([0.0, 0.5, 0.0004]),
    st.sampled_from([None, 1e-3, 0.5]),
)
def test_a_reading_one_cadence_on_is_encoded_as_from_scratch(
    cadence: float, horizon: int, steps: list[int], offset: float, resolution: float | None
) -> None:
    """The template shifted from the previous reading time (one stream's next tick) gives the same bytes
    as an encoder that formats that reading time afresh, for exact and inexact millisecond cadences,
    exact floats and fixed decimals."""
    shifting = ForecastEncoder(cadence, "W", resolution=resolution)
    t, k = 1716998400.0 + offset, 0
    for step in steps:
        k += step
        f = make([float(i) + 0.125 for i in range(horizon)], ts=t + k * cadence)
        assert shifting.encode(f) == ForecastEncoder(cadence, "W", resolution=resolution).encode(f)
