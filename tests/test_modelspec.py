"""The model directory contract: manifest round trip, validation and the SHA-256 check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from edge_lstm.features import FeatureKind, FeaturePipeline, FeatureSpec, OutputSpec
from edge_lstm.modelspec import (
    MANIFEST_NAME,
    MODEL_NAME,
    Manifest,
    ModelError,
    Quantization,
    load_manifest,
    load_model,
    sha256_file,
    state_names,
)


def _manifest(content: bytes, **kw: object) -> Manifest:
    pipe = FeaturePipeline(
        columns=("v",),
        features=(FeatureSpec("v_diff", FeatureKind.DIFF, "v", scale=2.0), FeatureSpec("tod_sin", FeatureKind.TOD_SIN)),
        output=OutputSpec(target="v", horizon=4, scale=3.0),
    )
    args: dict[str, object] = dict(
        name="m",
        sha256=hashlib.sha256(content).hexdigest(),
        quantization=Quantization.DYNAMIC,
        pipeline=pipe,
        cadence_s=60.0,
        layers=(8, 4),
        target_units="W",
        warmup_ticks=10,
        max_gap_ticks=3,
        extra={"metrics": {"holdout_mae_1": 1.5}},
    )
    args.update(kw)
    return Manifest(**args)  # type: ignore[arg-type]


def _model_dir(tmp_path: Path, content: bytes = b"model bytes") -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / MODEL_NAME).write_bytes(content)
    _manifest(content).write(d)
    return d


def test_state_names_and_tensor_names() -> None:
    assert state_names((8, 4)) == ["h_0", "c_0", "h_1", "c_1"]
    m = _manifest(b"x")
    assert m.input_names == ["x", "h_0", "c_0", "h_1", "c_1"]
    assert m.output_names == ["y", "h_0", "c_0", "h_1", "c_1"]
    assert m.horizon == 4 and m.model_id == f"m@{m.sha256[:12]}"


def test_round_trip_keeps_everything_including_extra(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    m = load_manifest(d)
    assert m == _manifest(b"model bytes")
    assert m.extra["metrics"]["holdout_mae_1"] == 1.5
    assert load_manifest(d / MANIFEST_NAME) == m


def test_a_differenced_seasonal_blend_is_written_as_format_version_2_and_read_back(tmp_path: Path) -> None:
    """Builds that read only version 1 refuse such a model instead of forecasting without the differencing."""
    plain = _manifest(b"x")
    assert plain.to_dict()["format_version"] == 1
    out = OutputSpec(target="v", horizon=4, scale=3.0, season_ticks=24, seasonal_weights=(0.0, 0.5, 1.0, 1.0),
                     seasonal_differenced=(False, True, True, False))  # fmt: skip
    m = dataclasses.replace(plain, pipeline=dataclasses.replace(plain.pipeline, output=out))
    d = m.to_dict()
    assert d["format_version"] == 2 and d["output"]["seasonal_differenced"] == [False, True, True, False]
    back = Manifest.from_dict(json.loads(json.dumps(d)))
    assert back == m and back.pipeline.output.history_ticks == 25
    d["format_version"] = 3
    with pytest.raises(ModelError, match="format_version 3"):
        Manifest.from_dict(d)
    d["format_version"] = 1  # a version-1 reader would ignore the flags: such a manifest is not valid
    with pytest.raises(ModelError, match="needs format_version 2"):
        Manifest.from_dict(d)


def test_a_model_with_seasonal_inputs_is_written_as_format_version_2() -> None:
    """A build that does not know the input kind refuses the manifest (unknown kind) rather than run it."""
    plain = _manifest(b"x")
    spec = FeatureSpec("v_season_1", FeatureKind.SEASONAL, "v", scale=2.0, season=24, lead=1)
    features = (*plain.pipeline.features, spec)
    m = dataclasses.replace(plain, pipeline=dataclasses.replace(plain.pipeline, features=features))
    d = m.to_dict()
    assert d["format_version"] == 2 and d["features"][-1] == {
        "name": "v_season_1", "kind": "seasonal", "column": "v", "center": 0.0, "scale": 2.0, "season": 24, "lead": 1,
    }  # fmt: skip
    back = Manifest.from_dict(json.loads(json.dumps(d)))
    assert back == m and back.pipeline.history_ticks == 24
    d["format_version"] = 1
    with pytest.raises(ModelError, match="a seasonal input needs format_version 2"):
        Manifest.from_dict(d)
    d["format_version"] = 2
    d["features"][-1]["season"] = 100_001  # a ring the daemon would have to keep per stream: refused
    with pytest.raises(ModelError, match="above 100000 ticks"):
        Manifest.from_dict(d)
    d["features"].pop()
    d["output"].update(season_ticks=200_000, seasonal_weights=[0.5] * 4)
    with pytest.raises(ModelError, match="season_ticks 200000 is above 100000 ticks"):
        Manifest.from_dict(d)
    # the ring the daemon would keep decides: a differenced blend over two seasons is refused, the
    # same season as seasonal naive (a ring of one season) and a differenced one within a season are not
    d["output"].update(season_ticks=60_000, seasonal_weights=[0.5] * 4, horizon=4)
    assert Manifest.from_dict(d).pipeline.history_ticks == 60_000
    d["output"]["seasonal_differenced"] = [True] * 4
    assert Manifest.from_dict(d).pipeline.history_ticks == 60_001
    big = OutputSpec(target="v", horizon=70_000, season_ticks=60_000, seasonal_weights=(0.5,) * 70_000)
    assert big.history_ticks == 60_000
    with pytest.raises(ValueError, match="would keep 120001 targets per stream, more than 100001"):
        dataclasses.replace(big, seasonal_differenced=(True,) * 70_000)


def test_load_model_checks_the_hash(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    bundle = load_model(d)
    assert bundle.content == b"model bytes" and sha256_file(bundle.model_path) == bundle.manifest.sha256
    (d / MODEL_NAME).write_bytes(b"model bytez")
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_model(d)
    (d / MODEL_NAME).unlink()
    with pytest.raises(ModelError, match="model file not found"):
        load_model(d)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("layers"), "missing the field 'layers'"),
        (lambda d: d.update(format="other"), "not an edge-lstm manifest"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(layers=[]), "layers"),
        (lambda d: d.update(cadence_seconds=0), "cadence_seconds"),
        (lambda d: d.update(cadence_seconds=1e-300), "'cadence_seconds' must be 0.001..1e[+]09"),
        (lambda d: d.update(max_gap_ticks=200_000), "'max_gap_ticks' must be 1..10000"),
        (lambda d: d.update(utc_offset_seconds=float("nan")), "utc_offset_seconds must be a finite offset"),
        (lambda d: d.update(sha256="abc"), "sha256"),
        (lambda d: d.update(quantization="int4"), "invalid"),
        # a blend's season as loose as a seasonal input's is refused (24.7 had served as 24, true as 1)
        *[(lambda d, m=m: d["output"].update(season_ticks=m, seasonal_weights=[0.5] * 4),
           "output season_ticks must be a whole number of ticks") for m in (24.7, 24.0, "24", True)],
        # a NaN level center made every forecast NaN; an infinite one pinned the level at its clip
        *[(lambda d, c=c: d["features"][0].update(kind="level", center=c), "'v_diff': center must be a finite")
          for c in (float("nan"), float("inf"))],
        (lambda d: d["output"].update(kind="level", center=float("nan")), "output center must be a finite number"),
        (lambda d: d["features"][1].update(kind="seasonality"),
         "'tod_sin': unknown kind 'seasonality' [(]this build knows diff, level, seasonal, tod_sin"),
    ],
)
def test_invalid_manifests_are_refused(tmp_path: Path, change: object, needle: str) -> None:
    d = _model_dir(tmp_path)
    raw = json.loads((d / MANIFEST_NAME).read_text())
    change(raw)  # type: ignore[operator]
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=needle):
        load_manifest(d)


def test_unreadable_manifests(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        load_manifest(tmp_path)
