"""``docs/performance.md`` from the JSON result files (plus the hand-written ``bench/interpretation.md``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bench import results

_LOG = logging.getLogger(__name__)

NAMES = ("model", "pipeline", "ceiling", "naive", "daemon", "cpu", "latency", "footprint", "profile")
MQTT_NAMES = ("ceiling", "naive", "daemon", "cpu", "latency", "footprint", "profile")  # the benchmarks that speak MQTT
DEFAULT_PROTOCOL = "5"  # results written before the protocol was recorded were all MQTT 5
INTERPRETATION = Path(__file__).resolve().parent / "interpretation.md"
BATCH_TARGET = 64
BEFORE = "before"  # subdirectory of the results with an older revision's (python -m bench.against)
NOSYNC = "nosync"  # subdirectory: ceiling and daemon run with --set state.journal_sync=false
CEILING_TARGET = 0.9  # the daemon's sustained rate over the paho echo's, at every stream count
NAIVE_TARGET = 1.4  # the daemon's sustained rate over the naive script's, at 100 and 10,000 streams


def _f(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _machine(docs: dict[str, dict[str, Any]]) -> list[str]:
    doc = next(iter(docs.values()))
    m = doc["machine"]
    p = m.get("packages", {})
    rows = [
        ["CPU", f"{m.get('cpu')} ({m.get('arch')}), {m.get('cores')} cores, {_f(m.get('memory_mb'), 0)} MB"],
        ["OS", str(m.get("os"))],
        ["Python", str(m.get("python"))],
        ["numpy", f"{p.get('numpy')} ({m.get('blas') or 'BLAS unknown'})"],
        ["ai-edge-litert", str(p.get("ai-edge-litert"))],
        ["paho-mqtt", str(p.get("paho-mqtt"))],
        ["Mosquitto", str(m.get("mosquitto"))],
        ["load average at start", str(m.get("loadavg_at_start"))],
    ]
    tfl = docs.get("model", {}).get("results", {}).get("runtimes", {}).get("tflite-runtime", {})
    if tfl.get("version"):
        rows.insert(5, ["tflite-runtime", f"{tfl['version']} (own venv, numpy {tfl.get('numpy')})"])
    runs = sorted({(d["run_id"], d["benchmark"]) for d in docs.values()})
    out = ["## Machine", "", *_table(["", ""], rows)]
    out += ["", "Result files and runs: " + ", ".join(f"`{b}.json` ({r})" for r, b in runs) + "."]
    return out


def _settings(docs: dict[str, dict[str, Any]]) -> list[str]:
    """One line under the title: MQTT protocol, QoS and repeats of the MQTT benchmarks' runs."""
    mqtt = {n: docs[n] for n in MQTT_NAMES if n in docs}
    if not mqtt:
        return []
    parts = []
    for key, label, default in (("protocol", "MQTT", DEFAULT_PROTOCOL), ("qos", "QoS", None)):
        by_value: dict[str, list[str]] = {}
        for name, d in mqtt.items():
            by_value.setdefault(str(d.get(key, default)), []).append(name)
        if len(by_value) == 1:
            parts.append(f"{label} {next(iter(by_value))}")
        else:
            parts.append(f"{label} " + ", ".join(f"{v} ({', '.join(n)})" for v, n in by_value.items()))
    searched = [n for n in ("ceiling", "naive", "daemon") if n in docs]
    if searched:
        repeats = {int(docs[name].get("repeat", 1)) for name in searched}
        n = max(repeats)
        who = ", ".join(searched[:-1]) + " and " + searched[-1] if len(searched) > 1 else searched[0]
        parts.append(
            f"throughput searches repeated {n} times per stream count, {who} alternating (median, min–max)"
            if n > 1
            else "one throughput search per stream count"
        )
    changed = {
        f"{section}.{key} = {value!r}"
        for d in mqtt.values()
        for section, values in (d.get("daemon_settings") or {}).items()
        for key, value in values.items()
    }
    if changed:
        parts.append("daemon configured with " + ", ".join(sorted(changed)))
    plans = [d["cores"] for d in mqtt.values() if "cores" in d]
    if plans and all(p == plans[0] for p in plans):
        plan = plans[0]
        parts.append(
            f"system under test alone on core {', '.join(map(str, plan['system_under_test']))}, broker and load "
            f"clients on {', '.join(map(str, plan['others']))} (`bench/cores.py`)"
            if plan
            else "every process left to the scheduler (`--no-pin`)"
        )
    return ["Run settings: " + "; ".join(parts) + "."]


def _targets(docs: dict[str, dict[str, Any]]) -> list[str]:
    rows: list[list[str]] = []
    d = docs.get("daemon", {}).get("results", {}).get("streams", {})
    for s, v in d.items():
        ratio = v.get("ratio_to_ceiling")
        rows.append(
            [
                f"daemon ≥ {CEILING_TARGET * 100:.0f} % of the ceiling ({_streams(s)})",
                _f(ratio * 100 if ratio else None, 0, " %"),
                _ok(ratio is not None and ratio >= CEILING_TARGET),
            ]
        )
    nv = docs.get("naive", {}).get("results", {}).get("streams", {})
    for s, v in d.items():
        if int(s) >= 100 and s in nv:
            ratio = v.get("ratio_to_naive")
            rows.append(
                [
                    f"daemon ≥ {NAIVE_TARGET}× the naive script ({_streams(s)})",
                    _f(ratio, 2, "×"),
                    _ok(ratio is not None and ratio >= NAIVE_TARGET),
                ]
            )
    lat = docs.get("latency", {}).get("results", {}).get("daemon", {})
    for s, v in lat.items():
        half = v["levels"].get("50%")
        if half:
            p99 = half["latency_ms"].get("p99")
            steps = half.get("p99_steps") or []
            rows.append(
                [
                    f"p99 ≤ 10 ms at half the sustained max ({_streams(s)}"
                    + (f", median of {len(steps)} steps" if len(steps) > 1 else "")
                    + ")",
                    _f(p99, 2, " ms") + _p99_steps(half),
                    _ok(p99 is not None and p99 <= 10),
                ]
            )
    model = docs.get("model", {}).get("results", {})
    best = _best_row_cost(model)
    if best:
        label, cost = best
        rows.append(
            [
                f"model ≤ 1 µs per stream-tick at batch ≥ {BATCH_TARGET} (bundled model)",
                f"{cost:.2f} µs ({label})",
                _ok(cost <= 1.0),
            ]
        )
    fp = docs.get("footprint", {}).get("results", {})
    for m in fp.get("memory", []):
        if m["streams"] == 10_000:
            target = "RSS ≤ 64 MB with 10k streams (H=64), settled"
            rows.append([target, _f(m["rss_mb"], 1, " MB"), _ok(m["rss_mb"] <= 64)])
    st = fp.get("startup")
    if st:
        rows.append(["ready in ≤ 1 s", _f(st["ready_s_median"], 2, " s"), _ok(st["ready_s_median"] <= 1.0)])
    if not rows:
        return []
    return ["## Targets", "", *_table(["target", "measured", "met"], rows)]


def _streams(s: str | int) -> str:
    n = int(s)
    return f"{n:,} stream{'' if n == 1 else 's'}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _best_row_cost(model: dict[str, Any]) -> tuple[str, float] | None:
    """Cost per stream-tick of the bundled model through edge_lstm.runtime at batch 64 (else the smallest >= 64)."""
    rt = model.get("runtimes", {}).get("edge_lstm.runtime", {}).get("models", {}).get("bundled", {})
    batches = rt.get("batches", {})
    for b in sorted((int(k) for k in batches), key=lambda b: (b < BATCH_TARGET, b)):
        if b >= BATCH_TARGET:
            return f"batch {b}, edge_lstm.runtime", float(batches[str(b)]["us_per_row"])
    return None


def _throughput(docs: dict[str, dict[str, Any]]) -> list[str]:
    d = docs.get("daemon", {}).get("results", {}).get("streams", {})
    c = docs.get("ceiling", {}).get("results", {}).get("streams", {})
    n = docs.get("naive", {}).get("results", {}).get("streams", {})
    if not (d or c):
        return []
    rows = []
    for s in sorted({*d, *c}, key=int):
        dv, cv, nv = d.get(s, {}), c.get(s, {}), n.get(s, {})
        limited = [name for name, v in (("ceiling", cv), ("naive", nv), ("daemon", dv)) if v.get("generator_limited")]
        row = [f"{int(s):,}", _sustained(cv), _f(cv.get("peak_delivered_rate"), 0)]
        if n:
            row += [_sustained(nv), _f(nv.get("peak_delivered_rate"), 0)]
        row += [_sustained(dv), _f(dv.get("peak_delivered_rate"), 0), _ratio(dv)]
        if n:
            row += [_ratio(dv, "naive", percent=False)]
        rows.append([*row, ", ".join(limited) or "—"])
    title = "daemon against the ceiling and the naive script" if n else "daemon against the ceiling"
    out = [f"## Throughput: {title} (same run, same broker)", ""]
    head = ["streams", "ceiling sustained /s", "ceiling peak /s"]
    if n:
        head += ["naive sustained /s", "naive peak /s"]
    head += ["daemon sustained /s", "daemon peak /s", "daemon / ceiling"]
    if n:
        head += ["daemon / naive"]
    out += _table([*head, "generator-limited"], rows)
    if n:
        out += [
            "",
            "*Ceiling*: a paho client that republishes each reading unchanged (`bench/ceiling.py`). *Naive*: "
            "the script a user would write (`bench/naive.py`): per message, features by hand, one LiteRT "
            "invoke at batch 1 with the stream's state from a dict, one JSON forecast published at the same "
            "QoS; it acknowledges a reading when its callback returns and keeps nothing across a crash.",
        ]
    out += [
        "",
        "*Sustained*: highest offered rate with every output received, no drop reported, and the last "
        "output at most max(0.25 s, 5 % of the step) after the last reading. *Peak*: the most output "
        "messages per second seen in any step (failing ones included). With repeated searches: the "
        "median, and in brackets the lowest and highest search (for the ratio: of the ratios of "
        "the ceiling and daemon searches run one after the other).",
        "",
    ]
    for name, doc in (("ceiling", c), ("naive", n), ("daemon", d)):
        for s, v in doc.items():
            by_repeat: dict[int, list[str]] = {}
            for st in v.get("steps", []):
                by_repeat.setdefault(int(st.get("repeat", 0)), []).append(
                    f"{st['rate']:.0f}{'' if st['passed'] else '✗'}"
                )
            steps = " | ".join(", ".join(x) for _, x in sorted(by_repeat.items()))
            sep = ", | between searches" if len(by_repeat) > 1 else ""
            out.append(f"- {name}, {_streams(s)}, steps (readings/s, ✗ failed{sep}): {steps}")
    return out


def _sustained(v: dict[str, Any]) -> str:
    """Median sustained rate, with the range of the repeats when there were several."""
    cell = _f(v.get("sustained_rate"), 0)
    if int(v.get("repeats", 1)) > 1:
        cell += f" ({_f(v.get('sustained_min') or 0, 0)}–{_f(v.get('sustained_max') or 0, 0)})"
    return cell


def _ratio(v: dict[str, Any], to: str = "ceiling", *, percent: bool = True) -> str:
    """The ratio of the medians, and the range of the per-search ratios when repeated."""
    ratio = v.get(f"ratio_to_{to}")
    per = [r for r in v.get(f"ratio_to_{to}_per_repeat", []) if r is not None]
    if percent:
        cell = _f(ratio * 100 if ratio else None, 0, " %")
        return cell + (f" ({min(per) * 100:.0f}–{max(per) * 100:.0f} %)" if len(per) > 1 else "")
    cell = _f(ratio, 2, "×")
    return cell + (f" ({min(per):.2f}–{max(per):.2f}×)" if len(per) > 1 else "")


def _cpu(docs: dict[str, dict[str, Any]]) -> list[str]:
    res = docs.get("cpu", {}).get("results", {})
    by_streams = res.get("streams", {})
    if not by_streams:
        return []
    rows = []
    for s in sorted(by_streams, key=int):
        for rate, v in by_streams[s].items():
            d, c = v["daemon"], v["ceiling"]
            ratio = v.get("daemon_over_ceiling")
            rows.append(
                [
                    f"{int(s):,}",
                    _f(float(rate), 0),
                    _f(d.get("cpu_s_per_1k"), 3),
                    _f(c.get("cpu_s_per_1k"), 3),
                    _f(ratio, 2, "×"),
                    _f(100.0 / ratio if ratio else None, 0, " %"),
                    _f(d.get("p99_ms"), 2),
                ]
            )
    out = ["## CPU per reading at fixed rates", ""]
    out.append(
        "User + system CPU of each process per 1000 readings at a rate both keep up with (median of "
        "repeated steps; `bench/cpucost.py`). Steadier than the searches above on a shared machine; "
        "when the cores are the limit, the ceiling's share of the daemon's CPU is what the throughput "
        "ratio tends to."
    )
    out.append("")
    out += _table(
        [
            "streams",
            "rate /s",
            "daemon CPU s / 1k",
            "ceiling CPU s / 1k",
            "daemon / ceiling",
            "ceiling / daemon",
            "daemon p99 ms",
        ],
        rows,
    )
    return out


def _p99_steps(level: dict[str, Any]) -> str:
    """The p99 of each step, " (a / b / c)", of a level stepped more than once; "" otherwise."""
    steps = level.get("p99_steps") or []
    return " (" + " / ".join(_f(x, 1) for x in steps) + ")" if len(steps) > 1 else ""


def _latency(docs: dict[str, dict[str, Any]]) -> list[str]:
    lat = docs.get("latency", {}).get("results", {})
    if not lat:
        return []
    rows = []
    sources = (
        ("daemon", lat.get("daemon", {}), ""),
        ("ceiling", lat.get("ceiling_at_daemon_rates", {}), ""),
        ("naive", lat.get("naive", {}), " of its own"),
    )
    for who, data, whose in sources:
        for s, v in data.items():
            for level, r in v["levels"].items():
                q = r["latency_ms"]
                rows.append(
                    [
                        who,
                        f"{int(s):,}",
                        level + whose,
                        _f(r["rate"], 0),
                        _f(q.get("p50"), 2),
                        _f(q.get("p99"), 2) + _p99_steps(r),
                        _f(q.get("p99.9"), 2),
                        _f(q.get("max"), 1),
                        f"{r['received']:,}/{r['count']:,}",
                        _f(r.get("cpu_s_per_1k"), 3),
                    ]
                )
    out = ["## Latency: reading published → output received", ""]
    repeats = max((len(r.get("p99_steps") or []) for v in lat.get("daemon", {}).values() for r in v["levels"].values()),
                  default=0)  # fmt: skip
    if repeats > 1:
        out += [
            f"The daemon's steps at half its maximum are run {repeats} times in a row: the row is the step with "
            "the median p99, and the p99 of each step follows it in brackets.",
            "",
        ]
    if lat.get("naive"):
        out += [
            "The ceiling runs at the daemon's rates; the naive script at half of its own sustained maximum "
            "(the daemon's half is more than it keeps up with).",
            "",
        ]
    out += _table(
        [
            "system",
            "streams",
            "of the daemon's max",
            "rate /s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "received",
            "CPU s per 1k readings",
        ],
        rows,
    )
    return out


def _footprint(docs: dict[str, dict[str, Any]]) -> list[str]:
    fp = docs.get("footprint", {}).get("results", {})
    if not fp:
        return []
    out = ["## Footprint", ""]
    st = fp.get("startup")
    if st:
        runs = ", ".join(f"{r['ready_s']:.2f}/{r['first_forecast_s']:.2f}" for r in st["runs"])
        out.append(
            f"Start to `READY=1`: **{st['ready_s_median']:.2f} s**, to the first forecast: "
            f"**{st['first_forecast_s_median']:.2f} s** (medians; runs ready/first: {runs})."
        )
        out.append("")
    rows = [
        [
            f"{m['streams']:,}",
            f"{m['capacity']:,}",
            f"{m['streams_held']:,}",
            _f(m["rss_idle_mb"]),
            _f(m.get("rss_busy_mb")),
            _f(m["rss_mb"]),
            _f(m.get("rss_anon_mb")),
            _f(m.get("rss_file_mb")),
            _f(m["rss_peak_mb"]),
            _f(m.get("cpu_s_per_1k"), 3),
        ]
        for m in fp.get("memory", [])
    ]
    out += _table(
        [
            "streams fed",
            "capacity",
            "streams held",
            "RSS at start MB",
            "RSS right after MB",
            "RSS settled MB",
            "of it anonymous MB",
            "of it mapped files MB",
            "peak RSS MB",
            "CPU s per 1k readings",
        ],
        rows,
    )
    if any(m.get("rss_file_mb") is not None for m in fp.get("memory", [])):
        out += [
            "",
            "*Right after*: when the last forecast of the feed came back, with what the burst's buffers "
            "and objects still hold. *Settled*: 2 s later, after the loop's idle trim (a full collection "
            "and `malloc_trim`, once it has had no reading for 1 s), what holding the streams costs; the "
            "target is checked on this one. *Anonymous*: the process's own memory (Python objects, the "
            "state table, buffers). *Mapped "
            "files*: pages of the libraries and other files it maps, read from disk; the kernel can drop "
            "them when memory is short and read them again when they are next used. Shared memory, the "
            "third part of the resident set, is not shown (the daemon maps none of its own).",
        ]
    return out


def _pipeline(docs: dict[str, dict[str, Any]]) -> list[str]:
    res = docs.get("pipeline", {}).get("results", {})
    by_streams = res.get("streams", {})
    if not by_streams:
        return []
    stages = list(res.get("stages") or next(iter(by_streams.values()))["us_per_reading"])
    rows = []
    for s in sorted(by_streams, key=int):
        v = by_streams[s]
        us = v["us_per_reading"]
        rows.append(
            [
                f"{int(s):,}",
                _f(v.get("batch_size"), 0),
                *[_f(us.get(st), 2) for st in stages],
                _f(v.get("us_per_reading_total"), 2),
                _f(v.get("readings_per_s_one_core"), 0),
            ]
        )
    out = ["## Daemon's own code per reading (in-process, no broker)", ""]
    out.append(
        "The daemon's objects (payload decoder, batcher, engine, forecast encoder, metrics) driven "
        "directly in one process with the load generator's payloads (`bench/pipeline.py`): what a "
        "reading costs in edge-lstm's own code, without paho, the broker or sockets. Microseconds per "
        "reading, medians over rounds; `model` is the model step inside `engine`, so it is included in "
        "`engine` and not counted again in the total."
    )
    out.append("")
    out += _table(["streams", "batch size", *[f"{st} µs" for st in stages], "total µs", "readings/s on one core"], rows)
    return out


def _model(docs: dict[str, dict[str, Any]]) -> list[str]:
    model = docs.get("model", {}).get("results", {})
    if not model:
        return []
    batches = [str(b) for b in model["batches"]]
    out = ["## Model cost: one batched step (µs per step / µs per stream-tick)", ""]
    info = model["models"]
    out += _table(
        ["model", "quantization", "model.tflite bytes", "weights.npz bytes"],
        [[k, v["quantization"], f"{v['model_bytes']:,}", _f(v.get("weights_npz_bytes"), 0)] for k, v in info.items()],
    )
    out.append("")
    rows = []
    for runtime, data in model["runtimes"].items():
        if "models" not in data:
            rows.append([runtime, "—"] + ["—"] * len(batches) + [data.get("error", "")])
            continue
        for name, r in data["models"].items():
            if r.get("status") != "ok":
                rows.append([runtime, name] + ["—"] * len(batches) + [f"cannot load: {r.get('error', '')[:120]}"])
                continue
            cells = [f"{r['batches'][b]['us_per_step']:,.1f} / {r['batches'][b]['us_per_row']:.2f}" for b in batches]
            var = r.get("varying")
            note = f"varying 1..256: {var['us_per_row']:.2f} µs/row" if var else ""
            rows.append([runtime, name, *cells, note])
    out += _table(["runtime", "model", *[f"batch {b}" for b in batches], "notes"], rows)
    missing = model.get("modes_missing")
    if missing:
        out += ["", f"Not measured (models not built; `python -m bench model --build-models`): {', '.join(missing)}."]
    return out


def _profile(docs: dict[str, dict[str, Any]]) -> list[str]:
    profiles = docs.get("profile", {}).get("results", {}).get("profiles", {})
    out: list[str] = []
    for prof in profiles.values():
        out += _one_profile(prof)
    return ["## Profile of the daemon at its sustained maximum", "", *out] if out else []


def _one_profile(prof: dict[str, Any]) -> list[str]:
    summ = prof.get("summary")
    if not summ:
        return []
    out = [f"### {_streams(prof['streams'])}", ""]
    out.append(
        f"{prof['tool']}, {prof['streams']} streams at {prof['rate']:.0f} readings/s; the daemon used "
        f"{prof['daemon_cores_used']:.2f} cores. Samples of threads holding the GIL (`--gil`), "
        f"{summ['samples']:,} in all; collapsed stacks in `bench/results/{prof.get('stacks_file')}`."
    )
    out.append("")
    for thread, t in summ["threads"].items():
        out.append(
            f"**{thread}**: {t['share_of_all'] * 100:.0f} % of the samples. Own time by package: "
            + ", ".join(f"{p['package']} {p['share'] * 100:.0f} %" for p in t["own_by_package"][:8])
            + "."
        )
        out.append("")
        incl = [e for e in t["inclusive"] if not e["function"].startswith("threading.py")][:12]
        rows = [[f"`{e['function']}`", f"{e['share'] * 100:.0f} %"] for e in incl]
        own = [[f"`{e['function']}`", f"{e['share'] * 100:.0f} %"] for e in t["own"][:12]]
        n = max(len(rows), len(own))
        rows += [["", ""]] * (n - len(rows))
        own += [["", ""]] * (n - len(own))
        out += _table(["inclusive", "share", "own", "share"], [a + b for a, b in zip(rows, own, strict=True)])
        out.append("")
    return out


def _journal_sync(docs: dict[str, dict[str, Any]], nosync: dict[str, dict[str, Any]]) -> list[str]:
    """Throughput with the journal's fdatasync (the default) beside a run without it (``results/nosync``)."""
    off_d = nosync.get("daemon", {}).get("results", {}).get("streams", {})
    on_d = docs.get("daemon", {}).get("results", {}).get("streams", {})
    if not (off_d and on_d):
        return []
    rows = []
    for s in sorted(set(on_d) | set(off_d), key=int):
        on, off = on_d.get(s, {}), off_d.get(s, {})
        r_on, r_off = on.get("ratio_to_ceiling"), off.get("ratio_to_ceiling")
        rows.append(
            [
                _streams(s),
                _sustained(on),
                _ratio(on),
                _sustained(off),
                _ratio(off),
                _change(r_off, r_on),
            ]
        )
    run = nosync["daemon"]
    out = ["## What the delivery guarantee costs: the journal's fdatasync on and off", ""]
    out.append(
        "The default (`state.journal_sync = true`) acknowledges a QoS 1 reading only after its forecast's "
        "PUBACK and an fdatasync of the journal group that holds it; `false` still journals and still waits "
        "for the PUBACK, but leaves the data to the page cache (a power cut can lose acknowledged readings; a "
        f"crash of the process cannot). Two runs (sync off: `{results.portable(str(run.get('command', '')))}`), "
        "each with its own ceiling searches, so compare the ratios to the ceiling rather than the rates; the "
        "journal lives on this machine's disk, not an SD card."
    )
    out.append("")
    out += _table(
        [
            "streams",
            "sync on: sustained /s",
            "sync on: of ceiling",
            "sync off: sustained /s",
            "sync off: of ceiling",
            "ratio on vs off",
        ],
        rows,
    )
    return out


def _change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "—"
    return f"{(after / before - 1.0) * 100.0:+.0f} %"


def _before_after(docs: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> list[str]:
    """The optimisation's effect: today's results beside those of an older revision (``results/before``)."""
    if not before:
        return []
    revs = sorted({str(d.get("against", "?")) for d in before.values()})
    rows: list[list[str]] = []

    def sustained(doc: dict[str, Any] | None, s: str) -> float | None:
        v = (doc or {}).get("results", {}).get("streams", {}).get(s, {})
        return v.get("sustained_rate")

    for name in ("daemon", "ceiling"):
        for s in ("1", "100", "10000"):
            b, a = sustained(before.get(name), s), sustained(docs.get(name), s)
            if b is not None or a is not None:
                rows.append([f"{name} sustained readings/s", _streams(s), _f(b, 0), _f(a, 0), _change(b, a)])
    cb = before.get("cpu", {}).get("results", {}).get("streams", {})
    ca = docs.get("cpu", {}).get("results", {}).get("streams", {})
    for s in sorted(set(cb) | set(ca), key=int):
        for rate in sorted(set(cb.get(s, {})) | set(ca.get(s, {})), key=float):
            b = cb.get(s, {}).get(rate, {}).get("daemon", {}).get("cpu_s_per_1k")
            a = ca.get(s, {}).get(rate, {}).get("daemon", {}).get("cpu_s_per_1k")
            rows.append([f"daemon CPU s per 1k readings at {float(rate):,.0f}/s", _streams(s), _f(b, 3), _f(a, 3),
                         _change(b, a)])  # fmt: skip
    pb = before.get("pipeline", {}).get("results", {}).get("streams", {})
    pa = docs.get("pipeline", {}).get("results", {}).get("streams", {})
    for s in sorted(set(pb) | set(pa), key=int):
        b, a = pb.get(s, {}).get("us_per_reading_total"), pa.get(s, {}).get("us_per_reading_total")
        rows.append(["own code µs per reading (pipeline)", _streams(s), _f(b, 1), _f(a, 1), _change(b, a)])
    out = [f"## Before and after the optimisation (revision {', '.join(revs)} → this one)", ""]
    out.append(
        "The older daemon measured by today's suite (`python -m bench.against REV`, results in "
        "`bench/results/before/`), on the same machine; throughput figures are medians of repeated "
        "searches and move with the machine's load (see the ranges above), the CPU and pipeline "
        "figures much less."
    )
    out.append("")
    out += _table(["figure", "streams", "before", "after", "change"], rows)
    return out


def render(
    docs: dict[str, dict[str, Any]],
    interpretation: str = "",
    before: dict[str, dict[str, Any]] | None = None,
    nosync: dict[str, dict[str, Any]] | None = None,
) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `python -m bench` (`make bench`) from the JSON files in `bench/results/`; do not edit by "
        "hand: change `bench/interpretation.md` or the suite, and run it again.",
        "",
    ]
    if not docs:
        return "\n".join([*lines, "No results yet.", ""])
    settings = _settings(docs)
    if settings:
        lines += [*settings, ""]
    for part in (_machine, _targets, _throughput, _cpu, _latency, _footprint, _pipeline, _model, _profile):
        section = part(docs)
        if section:
            lines += [*section, ""]
    sync = _journal_sync(docs, nosync or {})
    if sync:
        lines += [*sync, ""]
    comparison = _before_after(docs, before or {})
    if comparison:
        lines += [*comparison, ""]
    if interpretation:
        lines += [interpretation.strip(), ""]
    return "\n".join(lines)


def write(directory: Path, doc_path: Path) -> Path:
    docs = results.read_all(directory, NAMES)
    before = results.read_all(directory / BEFORE, NAMES)
    nosync = results.read_all(directory / NOSYNC, NAMES)
    text = INTERPRETATION.read_text() if INTERPRETATION.exists() else ""
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render(docs, text, before, nosync))
    _LOG.info("wrote %s", doc_path)
    return doc_path
