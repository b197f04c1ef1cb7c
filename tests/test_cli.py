"""The ``edge-lstm`` command: usage, check-config, config-docs, start failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_lstm import __version__
from edge_lstm import checkpoint as ckpt
from edge_lstm.cli import main
from edge_lstm.config import reference_markdown
from tests.support.daemon import TAYLOR_MODEL, to_toml
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def config_file(tmp_path: Path, sections: dict, mode: int = 0o600) -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(to_toml(sections))
    p.chmod(mode)
    return p


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edge-lstm {__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("run", "check-config", "demo", "config-docs"):
        assert cmd in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["run"]) == 2  # --config is required
    assert "--config" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "edge-lstm"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"edge-lstm {__version__}"


def test_check_config_explains_and_hides_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_TEST_PW", "pa55-from-env")
    p = config_file(
        tmp_path,
        {
            "model": {"path": str(TAYLOR_MODEL)},
            "mqtt": {"host": "broker.example", "username": "dev", "password_env": "EDGE_TEST_PW"},
            "input": {"topics": ["site/+/{stream}/power"]},
            "state": {"dir": str(tmp_path / "state")},
        },
    )
    assert main(["check-config", str(p)]) == 0
    cap = capsys.readouterr()
    assert "pa55-from-env" not in cap.out + cap.err
    assert 'password = "***"' in cap.out
    assert "taylor@" in cap.out and "ai-edge-litert" in cap.out  # the model was loaded and verified
    assert "history" not in cap.out  # the bundled model keeps no targets per stream
    assert "state       648 bytes per stream; 6.2 MiB at state.capacity 10,000 streams" in cap.out  # 2 x 64 x 4 + 136
    assert "site/+/+/power" in cap.out and "topic level 3" in cap.out  # what it would subscribe to
    assert "forecasts/{stream}" in cap.out
    assert not (tmp_path / "state").exists()  # starts nothing, creates nothing


def test_check_config_literal_password_is_hidden_and_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = config_file(
        tmp_path,
        {"model": {"path": str(TAYLOR_MODEL)}, "mqtt": {"username": "dev", "password": "inline-pa55"}},
        mode=0o644,
    )
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "check-config", str(p)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "inline-pa55" not in r.stdout + r.stderr
    assert "readable by everyone" in r.stderr


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"mqtt": {"prot": 1883}}, "unknown key 'prot' in section [mqtt]"),
        ({"model": {"path": "/nonexistent/model"}}, "model directory not found: /nonexistent/model"),
        ({"input": {"fields": {"temperature": "t"}}}, "input.fields"),
    ],
)
def test_check_config_rejects_bad_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict, message: str
) -> None:
    sections = {"model": {"path": str(TAYLOR_MODEL)}, **sections}
    assert main(["check-config", str(config_file(tmp_path, sections))]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("edge-lstm: error:")


def test_check_config_says_whether_the_state_directory_can_be_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "there").mkdir()
    (tmp_path / "held").mkdir()
    lock = ckpt.lock_state_dir(tmp_path / "held")  # as a running daemon holds it
    try:
        for state_dir, code, says in (
            (tmp_path / "there", 0, "(writable)"),
            (tmp_path / "held", 0, f"(writable; held by a running daemon, pid {os.getpid()}: a second one"),
            (tmp_path / "new" / "state", 0, "(will be created)"),
            (tmp_path / "a-file", 1, "(NOT a directory)"),
            (tmp_path / "a-file" / "state", 1, f"(CANNOT be created: {tmp_path / 'a-file'} is not a directory)"),
        ):
            sections = {"model": {"path": str(TAYLOR_MODEL)}, "state": {"dir": str(state_dir)}}
            assert main(["check-config", str(config_file(tmp_path, sections))]) == code
            out = capsys.readouterr().out
            assert f"state       {state_dir} {says}" in out
            assert out.rstrip().endswith("nothing was started")
    finally:
        os.close(lock)


def test_check_config_says_whether_the_metrics_port_is_free(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for port, says in ((free_port(), "(free)"), (taken, "(NOT free now: Address already in use;")):
            sections = {"model": {"path": str(TAYLOR_MODEL)}, "state": {"dir": str(tmp_path / "state")},
                        "metrics": {"bind": "127.0.0.1", "port": port}}  # fmt: skip
            assert main(["check-config", str(config_file(tmp_path, sections))]) == 0
            assert f"metrics     http://127.0.0.1:{port}/metrics {says}" in capsys.readouterr().out


def test_check_config_rejects_a_tampered_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_bytes((TAYLOR_MODEL / "manifest.json").read_bytes())
    data = bytearray((TAYLOR_MODEL / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model / "model.tflite").write_bytes(bytes(data))
    assert main(["check-config", str(config_file(tmp_path, {"model": {"path": str(model)}}))]) == 1
    assert "does not match its manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"engine": {"max_batch": "big"}}, "engine.max_batch: expected an integer"),
        ({"model": {"path": "/nonexistent/model"}}, "model directory not found: /nonexistent/model"),
    ],
)
def test_run_with_bad_config_or_model_fails_at_start_with_one_clear_line(
    tmp_path: Path, sections: dict, message: str
) -> None:
    sections = {"model": {"path": str(TAYLOR_MODEL)}, "mqtt": {"port": 1}, **sections}
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "run", "--config", str(config_file(tmp_path, sections))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_run_with_missing_config_file(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edge_lstm", "run", "--config", str(tmp_path / "none.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "config file not found" in r.stderr


def test_config_docs_command_writes_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    out = tmp_path / "c.md"
    assert main(["config-docs", "--output", str(out)]) == 0
    assert out.read_text() == (REPO / "docs" / "configuration.md").read_text()


def test_check_config_says_what_a_seasonal_model_keeps_per_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "seasonal"
    shutil.copytree(TAYLOR_MODEL, model_dir)
    raw = json.loads((model_dir / "manifest.json").read_text())
    raw["features"][-1] = {"name": "demand_mw_season_1", "kind": "seasonal", "column": "demand_mw", "scale": 900.0,
                           "season": 48, "lead": 1}  # fmt: skip
    raw["format_version"] = 2
    (model_dir / "manifest.json").write_text(json.dumps(raw))
    p = config_file(tmp_path, {"model": {"path": str(model_dir)}, "state": {"dir": str(tmp_path / "state")}})
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "history     48 targets per stream (384 bytes) for the seasonal inputs" in out  # no blend
    assert "(at state.capacity 10,000 streams the targets take up to 3.7 MiB)" in out
    assert "demand_mw_season_1" in out
