"""The project's wheel and a wheelhouse of its dependencies, for the install tests.

:func:`build_wheel` builds ``edge_lstm-*.whl`` from this checkout (as ``pip wheel`` does for a
user). :func:`wheelhouse` fills a cached folder with binary wheels of the runtime dependencies
for one target (Python version, machine), so that ``pip install --no-index --find-links`` works
in a fresh virtual environment or an offline container: the first run downloads them from the
package index, later runs reuse the folder and need no network.

The cache lives in ``$EDGE_LSTM_CACHE`` (default ``$XDG_CACHE_HOME/edge-lstm``, else
``~/.cache/edge-lstm``); deleting it only costs the next run a download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    explicit = os.environ.get("EDGE_LSTM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-lstm"


def project_metadata() -> dict[str, Any]:
    """The ``[project]`` table of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"])


def runtime_requirements() -> list[str]:
    """The ``[project] dependencies`` (environment markers included)."""
    return list(project_metadata()["dependencies"])


def clean_env() -> dict[str, str]:
    """The environment without this checkout on ``PYTHONPATH``, so a new venv sees only what it installed."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def build_wheel(dest: Path) -> tuple[Path, str]:
    """``(wheel path, build log)``: ``pip wheel`` of this checkout, verbose so the backend's warnings show.

    The build runs on a copy of the source tree: setuptools writes ``build/`` and ``*.egg-info``
    next to the sources, which would then shadow the installed package in later tests.
    """
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / "src"
    skip = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "results")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(dest), str(src)],
        capture_output=True, text=True, timeout=600, check=False, cwd=dest, env=clean_env(),
    )  # fmt: skip
    shutil.rmtree(src)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    wheels = sorted(dest.glob("edge_lstm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], log


def wheelhouse(python_version: str = "3.11", machine: str = "x86_64", extra: list[str] | None = None) -> Path:
    """A folder of binary wheels of the runtime dependencies (and ``extra`` requirements) for
    CPython ``python_version`` on Linux ``machine``."""
    where = cache_dir() / f"wheels-cp{python_version.replace('.', '')}-{machine}"
    where.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    # Debian 12 and Raspberry Pi OS 12 have glibc 2.36. pip takes --platform tags literally, so
    # every manylinux tag such a system accepts is listed.
    for minor in range(17, 37):
        target += ["--platform", f"manylinux_2_{minor}_{machine}"]
    target += ["--platform", f"manylinux2014_{machine}"]
    base = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(where), "--find-links", str(where), *target]
    reqs = runtime_requirements() + list(extra or [])
    run = {"capture_output": True, "text": True, "check": False, "cwd": where, "env": clean_env()}
    offline = subprocess.run([*base, "--no-index", *reqs], timeout=600, **run)  # type: ignore[call-overload]
    if offline.returncode != 0:
        online = subprocess.run([*base, *reqs], timeout=900, **run)  # type: ignore[call-overload]
        assert online.returncode == 0, f"cannot fetch the runtime wheels into {where}:\n{online.stderr[-3000:]}"
    return where
