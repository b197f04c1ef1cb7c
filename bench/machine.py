"""What the benchmarks ran on: CPU, cores, memory, OS, Python and the versions that matter."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

PACKAGES = ("numpy", "ai-edge-litert", "paho-mqtt", "prometheus-client", "edge-lstm", "py-spy", "pyinstrument")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) // 1024 if m else None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def mosquitto_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def blas() -> str | None:
    """Name and version of the BLAS numpy uses (the numpy reference's matrix products)."""
    try:
        import numpy as np

        cfg: Any = np.show_config(mode="dicts")  # type: ignore[call-arg]
        info = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        return None


def details(mosquitto: str | None = None) -> dict[str, Any]:
    """Machine details recorded with every result file."""
    load: list[float] | None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_mb": memory_mb(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "blas": blas(),
        "mosquitto": mosquitto_version(mosquitto),
        "loadavg_at_start": load,
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ},
    }
