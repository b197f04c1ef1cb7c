"""The wheel a user installs: what it carries, a clean install, and ``edge-lstm demo`` outside a checkout.

The wheel is built from this checkout and installed with ``pip install`` into a new virtual
environment, with the dependencies taken from a cached wheelhouse (``tests.support.wheels``)
so that the test needs the package index only on its first run. The demo then runs in an empty
directory, where it can find its model and data only inside the installed package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lstm.runtime import native_log_to_debug
from tests.support.wheels import build_wheel, clean_env, project_metadata, wheelhouse

ROOT = Path(__file__).resolve().parents[1]
VERSION = project_metadata()["version"]
BUNDLED = ("edge_lstm/bundled/models/taylor/manifest.json", "edge_lstm/bundled/models/taylor/model.tflite",
           "edge_lstm/bundled/data/taylor.csv")  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def installed(built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """``(venv, pip's output)``: a new virtual environment with the wheel installed by a plain ``pip install``."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse()), str(built[0])],
        capture_output=True, text=True, timeout=600, check=False, cwd=env_dir,
        env={**clean_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield env_dir, r.stdout + r.stderr


def test_wheel_carries_the_demo_model_data_and_licence(built: tuple[Path, str]) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in BUNDLED:
            assert name in names, f"{name} is not in {wheel.name}"
        # The bundled copies are the repository's files, byte for byte; the model passes its checksum.
        for name in BUNDLED:
            source = ROOT / name.removeprefix("edge_lstm/bundled/")
            assert z.read(name) == source.read_bytes(), name
        manifest = json.loads(z.read(BUNDLED[0]))
        assert hashlib.sha256(z.read(BUNDLED[1])).hexdigest() == manifest["sha256"]
        # Only what the demo needs: no training artefacts, no other data sets, no tests.
        assert not [n for n in names if n.endswith((".npz", ".png")) or "/tests/" in n or n.startswith("tests/")]
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert wheel.stat().st_size < 1_000_000  # small: the model is 35 KB, the series 110 KB


def test_build_prints_no_deprecation_warnings(built: tuple[Path, str]) -> None:
    _, log = built
    lowered = log.lower()
    assert "deprecat" not in lowered, [line for line in log.splitlines() if "eprecat" in line][:5]
    assert "project.license" not in log


def test_install_output_is_clean(installed: tuple[Path, str]) -> None:
    _, out = installed
    assert "Successfully installed" in out and f"edge-lstm-{VERSION}" in out.replace("edge_lstm", "edge-lstm")
    noise = [line for line in out.splitlines() if "warning" in line.lower() or "deprecat" in line.lower()]
    assert noise == []


def test_demo_runs_from_the_installed_wheel_in_an_empty_directory(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    env_dir, _ = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env()
    r = subprocess.run(
        [str(env_dir / "bin" / "edge-lstm"), "demo", "--ticks", "60", "--rate", "200", "--quiet"],
        capture_output=True, text=True, timeout=180, cwd=empty, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "readings published   60" in r.stdout and "forecasts received   60" in r.stdout
    assert "daemon: received 60, processed 60, published 60" in r.stdout
    # Nothing on stderr: LiteRT's native "INFO: Created TensorFlow Lite XNNPACK delegate" line is
    # only a debug log record now.
    assert "XNNPACK" not in r.stderr and "INFO:" not in r.stderr, r.stderr
    assert list(empty.iterdir()) == []  # the demo leaves nothing behind in the working directory
    # The package it ran is the installed one, not this checkout.
    where = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import edge_lstm.demo as d; print(d.find_bundled('models/taylor'))"],
        capture_output=True, text=True, cwd=empty, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(env_dir)) and where.endswith("edge_lstm/bundled/models/taylor"), where


def test_installed_version_matches_the_checkout(installed: tuple[Path, str]) -> None:
    env_dir, _ = installed
    r = subprocess.run([str(env_dir / "bin" / "edge-lstm"), "--version"], capture_output=True, text=True, check=True)
    assert VERSION in r.stdout + r.stderr


# --- start output -------------------------------------------------------------------------------

LOAD_MODEL = """
import logging, sys
logging.basicConfig(level=getattr(logging, sys.argv[1]), format="%(levelname)s %(name)s: %(message)s")
from edge_lstm.modelspec import load_model
from edge_lstm.runtime import load_step_model
load_step_model(load_model(sys.argv[2]))
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_runtime_info_line_only_at_debug_level(level: str) -> None:
    """LiteRT's native XNNPACK line (printed to descriptor 2 by C++ code) is a debug record, nothing more."""
    r = subprocess.run(
        [sys.executable, "-c", LOAD_MODEL, level, str(ROOT / "models" / "taylor")],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT,
    )  # fmt: skip
    assert "INFO: Created TensorFlow Lite" not in r.stderr  # never the raw native line
    assert "model taylor" in r.stderr  # the runtime's own INFO record still shows
    delegate = [line for line in r.stderr.splitlines() if "XNNPACK" in line]
    if level == "DEBUG":
        assert delegate == ["DEBUG edge_lstm.runtime: Created TensorFlow Lite XNNPACK delegate for CPU."]
    else:
        assert delegate == []


def test_model_loads_with_stderr_closed() -> None:
    """A daemon started with descriptor 2 closed (``2>&-``) still loads its model."""
    script = "import os, sys\nos.close(2)\nsys.stderr = None\n" + LOAD_MODEL + "\nprint('loaded')"
    r = subprocess.run(
        [sys.executable, "-c", script, "INFO", str(ROOT / "models" / "taylor")],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stdout + r.stderr


def test_native_output_before_a_crash_in_the_block_still_reaches_stderr() -> None:
    """A native abort inside the block (the converter wraps TensorFlow's whole conversion in it)."""
    script = (
        "import os, time\n"
        "from edge_lstm.runtime import native_log_to_debug\n"
        "with native_log_to_debug():\n"
        "    os.write(2, b'INFO: kept back\\nF0000 check failed: the converter gives up\\n')\n"
        "    time.sleep(0.5)\n"
        "    os.abort()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == -6  # SIGABRT
    assert "F0000 check failed: the converter gives up" in r.stderr and "kept back" not in r.stderr


def test_other_native_output_passes_through(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Only native INFO lines are taken; warnings, errors and anything else reach stderr unchanged."""
    caplog.set_level(logging.DEBUG, logger="edge_lstm.runtime")
    with native_log_to_debug():
        os.write(2, b"ERROR: the runtime is unhappy\nINFO: a native detail\nplain text\n")
    err = capfd.readouterr().err
    assert "ERROR: the runtime is unhappy\nplain text\n" in err
    assert "a native detail" not in err
    assert [r.getMessage() for r in caplog.records if r.name == "edge_lstm.runtime"] == ["a native detail"]
