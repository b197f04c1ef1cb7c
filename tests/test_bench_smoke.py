"""The benchmark suite's quick mode runs end to end and writes valid results (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.throughput import combine, measure
from tests.support.broker import find_mosquitto
from tests.support.daemon import REPO

ROLES = ["ceiling", "daemon", "generator", "receiver"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, dict], str]:
    assert find_mosquitto() is not None, "mosquitto is not installed: apt-get install mosquitto"
    out, doc = tmp_path / "results", tmp_path / "performance.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--quick", "--out", str(out), "--doc", str(doc)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard: a quick suite takes ~1-2 min, more on a busy machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}, doc.read_text()


def test_quick_suite_writes_valid_json_and_summary(tmp_path: Path) -> None:
    docs, text = _run_bench(tmp_path)
    assert set(docs) == {"model", "pipeline", "ceiling", "naive", "daemon", "cpu", "latency", "footprint", "profile"}
    for name, d in docs.items():
        assert d["benchmark"] == name and d["quick"] is True
        assert d["machine"]["cores"] >= 1 and d["machine"]["python"]
        assert d["protocol"] == "5" and d["repeat"] == 1

    # pipeline: every stage of the daemon's own code cost something, at every stream count
    pipe = docs["pipeline"]["results"]
    assert set(pipe["streams"]) == {"1", "100"}
    for v in pipe["streams"].values():
        assert set(v["us_per_reading"]) == set(pipe["stages"])
        assert all(_finite(us) and us > 0 for us in v["us_per_reading"].values()), v["us_per_reading"]
        assert v["us_per_reading"]["model"] < v["us_per_reading"]["engine"]  # the model step is inside the engine
        assert v["us_per_reading_total"] > v["us_per_reading"]["engine"] and v["readings_per_s_one_core"] > 0
        assert v["batch_size"] >= 1

    # model cost: both runtimes stepped the bundled model at every batch size
    model = docs["model"]["results"]
    for runtime in ("ai-edge-litert", "edge_lstm.runtime"):
        bundled = model["runtimes"][runtime]["models"]["bundled"]
        assert bundled["status"] == "ok"
        assert all(_finite(bundled["batches"][str(b)]["us_per_row"]) for b in model["batches"])
    assert model["models"]["bundled"]["model_bytes"] == (REPO / "models/taylor/model.tflite").stat().st_size

    # throughput: the ceiling, the naive script and the daemon each sustained a rate, every reading came back
    for name in ("ceiling", "naive", "daemon"):
        s100 = docs[name]["results"]["streams"]["100"]
        assert s100["sustained_rate"] and s100["sustained_rate"] > 0
        passed = [s for s in s100["steps"] if s["passed"]]
        assert passed and all(s["received"] == s["count"] and s["drops"] == 0 for s in passed)
    d100 = docs["daemon"]["results"]["streams"]["100"]
    assert d100["ratio_to_ceiling"] > 0
    n100 = docs["naive"]["results"]["streams"]["100"]
    assert d100["ratio_to_naive"] == d100["sustained_rate"] / n100["sustained_rate"]

    # CPU at a fixed rate: both processes measured, their ratio from those numbers
    cpu = docs["cpu"]["results"]["streams"]["100"]["1000"]
    d_cpu, c_cpu = cpu["daemon"]["cpu_s_per_1k"], cpu["ceiling"]["cpu_s_per_1k"]
    assert _finite(d_cpu) and _finite(c_cpu) and d_cpu > 0 and c_cpu > 0
    assert cpu["daemon_over_ceiling"] == d_cpu / c_cpu
    assert "CPU per reading at fixed rates" in text

    # latency: every reading of the step matched to its forecast, percentiles ordered
    lat = docs["latency"]["results"]["daemon"]["100"]["levels"]["50%"]
    assert lat["received"] == lat["count"]
    q = lat["latency_ms"]
    assert 0 < q["p50"] <= q["p99"] <= q["p99.9"] <= q["max"]
    # the naive script at half of its own maximum: every reading got its forecast
    naive_lat = docs["latency"]["results"]["naive"]["100"]
    assert naive_lat["sustained_rate"] == docs["naive"]["results"]["streams"]["100"]["sustained_rate"]
    assert naive_lat["levels"]["50%"]["received"] == naive_lat["levels"]["50%"]["count"]

    # footprint: ready and first forecast seen, memory read, every fed stream held
    fp = docs["footprint"]["results"]
    assert 0 < fp["startup"]["ready_s_median"] <= fp["startup"]["first_forecast_s_median"]
    for m in fp["memory"]:
        assert m["streams_held"] == m["streams"] and m["rss_mb"] > 10
        # two of the resident set's three parts (the third, shared memory, is not reported)
        assert m["rss_anon_mb"] > 0 and m["rss_file_mb"] > 0
        assert m["rss_anon_mb"] + m["rss_file_mb"] <= m["rss_mb"] + 0.01

    # the broker saw every client of the throughput searches speak MQTT 5
    assert docs["daemon"]["results"]["client_protocols"] == {role: ["5"] for role in [*ROLES, "naive"]}

    assert "## Throughput: daemon against the ceiling and the naive script" in text and "## Model cost" in text
    assert "daemon ≥ 1.4× the naive script (100 streams)" in text
    assert "## Daemon's own code per reading" in text and "Run settings: MQTT 5;" in text


def test_quick_throughput_mqtt311_repeated(tmp_path: Path) -> None:
    """``--protocol 3.1.1 --repeat 2``: every client speaks 3.1.1, each stream count is searched twice."""
    docs, text = _run_bench(tmp_path, "ceiling", "daemon", "--protocol", "3.1.1", "--repeat", "2")
    assert set(docs) == {"ceiling", "daemon"}
    for d in docs.values():
        assert d["protocol"] == "3.1.1" and d["repeat"] == 2
        res = d["results"]
        assert res["client_protocols"] == {role: ["3.1.1"] for role in ROLES}  # what the broker saw
        s100 = res["streams"]["100"]
        assert s100["repeats"] == 2 and len(s100["sustained_rates"]) == 2
        assert s100["sustained_min"] <= s100["sustained_rate"] <= s100["sustained_max"]
        assert {st["repeat"] for st in s100["steps"]} == {0, 1}
    assert docs["daemon"]["results"]["config"]["mqtt"]["protocol"] == "3.1.1"
    d100 = docs["daemon"]["results"]["streams"]["100"]
    assert len(d100["ratio_to_ceiling_per_repeat"]) == 2 and d100["ratio_to_ceiling"] > 0
    assert "Run settings: MQTT 3.1.1;" in text and "repeated 2 times" in text


def test_combine_takes_the_median_and_range_of_repeated_searches() -> None:
    def run(sustained: float | None, failing: float | None, peak: float, steps: int) -> dict:
        return {
            "streams": 100,
            "sustained_rate": sustained,
            "first_failing_rate": failing,
            "peak_delivered_rate": peak,
            "generator_limited": False,
            "steps": [{"rate": 1.0, "passed": True}] * steps,
        }

    res = combine([run(1000.0, 1400.0, 1100.0, 2), run(None, 500.0, 300.0, 1), run(1200.0, 1700.0, 1250.0, 3)])
    assert res["sustained_rate"] == 1000.0  # a search that sustained nothing counts as 0
    assert (res["sustained_min"], res["sustained_max"]) == (None, 1200.0)
    assert res["sustained_rates"] == [1000.0, None, 1200.0]
    assert res["first_failing_rate"] == 1400.0 and res["peak_delivered_rate"] == 1250.0
    assert [st["repeat"] for st in res["steps"]] == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        measure([], (1,), quick=True, repeat=0)


def test_summary_sets_an_older_revision_beside_this_one() -> None:
    from bench import report

    def doc(name: str, results: dict, **extra: object) -> dict:
        return {"benchmark": name, "run_id": "r", "machine": {}, "results": results, **extra}

    after = {
        "daemon": doc("daemon", {"streams": {"1": {"sustained_rate": 3000.0}}}),
        "cpu": doc("cpu", {"streams": {"1": {"1000": {"daemon": {"cpu_s_per_1k": 0.5}}}}}),
    }
    before = {
        "daemon": doc("daemon", {"streams": {"1": {"sustained_rate": 1500.0}}}, against="abc123"),
        "cpu": doc("cpu", {"streams": {"1": {"1000": {"daemon": {"cpu_s_per_1k": 0.8}}}}}, against="abc123"),
    }
    lines = report._before_after(after, before)
    assert lines[0] == "## Before and after the optimisation (revision abc123 → this one)"
    assert "| daemon sustained readings/s | 1 stream | 1,500 | 3,000 | +100 % |" in lines
    assert "| daemon CPU s per 1k readings at 1,000/s | 1 stream | 0.800 | 0.500 | -38 % |" in lines
    assert report._before_after(after, {}) == []


def test_idlecost_times_the_real_pipeline_one_reading_at_a_time(tmp_path: Path) -> None:
    from bench.idlecost import measure as idle_measure
    from bench.pipeline import Whole

    whole = Whole(1, tmp_path)
    whole.round(20)
    acks = whole.link.acks
    times = idle_measure(whole, 0.001, 5)
    assert len(times) == 5 and all(_finite(t) and t > 0 for t in times)
    assert whole.link.acks == acks + 5  # each round took one reading through to its acknowledgement


def test_seasonalcost_compares_the_bundled_network_with_and_without_a_seasonal_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.seasonalcost import main as seasonal_main
    from bench.seasonalcost import variant

    plain, seasonal = variant(tmp_path, False), variant(tmp_path, True)
    assert plain.manifest.pipeline.history_ticks == 0 and seasonal.manifest.pipeline.history_ticks == 48
    assert seasonal_main(["--rounds", "1", "--ticks", "20"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1")]
    assert [r[1].strip() for r in rows] == ["1", "100"]
    assert all(_finite(float(r[2])) and _finite(float(r[3])) for r in rows)


def test_steady_runs_long_paced_steps_and_reports_every_output(tmp_path: Path) -> None:
    assert find_mosquitto() is not None, "mosquitto is not installed: apt-get install mosquitto"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.steady", "--rate", "200", "--seconds", "1", "--repeat", "2",
         "--set", "engine.max_wait_ms=0", "--windows", "0.5", "--dump", str(tmp_path / "stamps")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(":")[1].strip().split(";")[0] for s in steps] == ["200/200 received"] * 2, proc.stdout
    assert all("p99.9" in s and "max" in s for s in steps)
    slices = [line for line in proc.stdout.splitlines() if "p99 per 0.5-s slice:" in line]
    assert len(slices) == 2, proc.stdout
    for line in slices:  # a 1-s step is two or three 0.5-s slices (its last send may come after 1 s)
        values, _, counts = line.split(": ")[1].partition(" (")
        assert counts.endswith(f"of {len(values.split())} over 10 ms)") and len(values.split()) >= 2, line
    for k in (1, 2):
        with np.load(tmp_path / "stamps" / f"step-{k}.npz") as z:
            sends, arrivals = z["sends"], z["arrivals"]
        assert len(sends) == len(arrivals) == 200 and (arrivals > sends).all()
    bad = subprocess.run([sys.executable, "-m", "bench.steady", "--set", "nodot"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "SECTION.KEY=VALUE" in bad.stderr


def test_window_p99_shows_a_burst_of_slow_outputs_as_one_slice() -> None:
    from bench.steady import window_p99

    sends = np.arange(0.0, 2.0, 0.001)  # 2 s of readings, 1 ms apart
    arrivals = sends + 0.002
    arrivals[1200:1300] += 0.030  # 100 ms of them 30 ms late, in the third 0.5-s slice
    arrivals[1999] = np.nan  # one without an output: left out
    assert window_p99(sends, arrivals, 0.5) == "p99 per 0.5-s slice: 2 2 32 2 (1 of 4 over 10 ms)"


def test_latency_steps_the_half_maximum_three_times_and_reports_the_median_step() -> None:
    from bench import latency, report
    from bench.mqttload import StepResult

    p99s = iter([2.0, 0.9, 12.0, 4.0, 7.0, 30.0])  # warm-up, 10 %, three steps at 50 %, 90 %
    rates: list[float] = []

    class FakeLoad:
        def step(self, prefix: str, streams: int, rate: float, count: int, *_: object, **__: object) -> StepResult:
            rates.append(rate)
            p99 = next(p99s)
            return StepResult(streams, rate, count, count, 0, rate, rate, 0.0, {"p50": 1.0, "p99": p99},
                              {"daemon": count * 1e-4}, 0, True, "")  # fmt: skip

    class Sut:
        name, out_filter, in_root, pid = "daemon", "f/#", "sensors", 1

        def drops(self) -> int:
            return 0

    res = latency.run(FakeLoad(), Sut(), {100: 10_000.0}, quick=False, repeats=None)  # type: ignore[arg-type]
    levels = res["100"]["levels"]
    assert rates[1:] == [1000.0, 5000.0, 5000.0, 5000.0, 9000.0]  # after the warm-up: 10 %, 3 x 50 %, 90 %
    assert levels["50%"]["latency_ms"]["p99"] == 7.0 and levels["50%"]["p99_steps"] == [12.0, 4.0, 7.0]
    assert levels["10%"]["p99_steps"] == [0.9] and levels["90%"]["latency_ms"]["p99"] == 30.0
    docs = {"latency": {"results": {"daemon": res}}}
    row = "| p99 ≤ 10 ms at half the sustained max (100 streams, median of 3 steps) | 7.00 ms (12.0 / 4.0 / 7.0) |"
    assert any(line.startswith(row) for line in report._targets(docs))
    assert any("| 5,000 | 1.00 | 7.00 (12.0 / 4.0 / 7.0) |" in line for line in report._latency(docs))
