"""The benchmark suite's quick mode runs end to end and writes valid results (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.support.broker import find_mosquitto
from tests.support.daemon import REPO


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_quick_suite_writes_valid_json_and_summary(tmp_path: Path) -> None:
    assert find_mosquitto() is not None, "mosquitto is not installed: apt-get install mosquitto"
    out, doc = tmp_path / "results", tmp_path / "performance.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--doc", str(doc)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    docs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(docs) == {"model", "ceiling", "daemon", "latency", "footprint", "profile"}
    for name, d in docs.items():
        assert d["benchmark"] == name and d["quick"] is True
        assert d["machine"]["cores"] >= 1 and d["machine"]["python"]

    # model cost: both runtimes stepped the bundled model at every batch size
    model = docs["model"]["results"]
    for runtime in ("ai-edge-litert", "edge_lstm.runtime"):
        bundled = model["runtimes"][runtime]["models"]["bundled"]
        assert bundled["status"] == "ok"
        assert all(_finite(bundled["batches"][str(b)]["us_per_row"]) for b in model["batches"])
    assert model["models"]["bundled"]["model_bytes"] == (REPO / "models/taylor/model.tflite").stat().st_size

    # throughput: the ceiling and the daemon each sustained a rate, every reading came back
    for name in ("ceiling", "daemon"):
        s100 = docs[name]["results"]["streams"]["100"]
        assert s100["sustained_rate"] and s100["sustained_rate"] > 0
        passed = [s for s in s100["steps"] if s["passed"]]
        assert passed and all(s["received"] == s["count"] and s["drops"] == 0 for s in passed)
    assert docs["daemon"]["results"]["streams"]["100"]["ratio_to_ceiling"] > 0

    # latency: every reading of the step matched to its forecast, percentiles ordered
    lat = docs["latency"]["results"]["daemon"]["100"]["levels"]["50%"]
    assert lat["received"] == lat["count"]
    q = lat["latency_ms"]
    assert 0 < q["p50"] <= q["p99"] <= q["p99.9"] <= q["max"]

    # footprint: ready and first forecast seen, memory read, every fed stream held
    fp = docs["footprint"]["results"]
    assert 0 < fp["startup"]["ready_s_median"] <= fp["startup"]["first_forecast_s_median"]
    for m in fp["memory"]:
        assert m["streams_held"] == m["streams"] and m["rss_mb"] > 10

    text = doc.read_text()
    assert "## Throughput: daemon against the ceiling" in text and "## Model cost" in text
