"""Result files: one JSON document per benchmark, written atomically, with machine details."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import SCHEMA_VERSION

_LOG = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """Paths inside the checkout relative to it, temporary paths as ``$TMPDIR``: results travel between machines."""
    text = text.replace(str(REPO) + "/", "").replace(str(REPO), ".")
    return text.replace(tempfile.gettempdir().rstrip("/") + "/", "$TMPDIR/")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars plain numbers, tuples lists, paths portable."""
    if isinstance(value, str):
        return portable(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(directory: Path, name: str, run: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write ``directory/NAME.json``: ``run`` (id, quick, machine, settings) plus ``results``."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "schema": SCHEMA_VERSION,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **run,
        "results": results,
    }
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    _LOG.info("wrote %s", path)
    return path


def read(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        _LOG.warning("ignoring unreadable %s: %s", path, e)
        return None
    return doc if isinstance(doc, dict) else None


def read_all(directory: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        doc = read(directory, name)
        if doc is not None:
            out[name] = doc
    return out
