"""Forecast -> JSON payload for the output topic (pure; on the hot path).

One message per forecast, compact JSON in UTF-8::

    {"stream":"kitchen","model":"taylor@0123456789ab","ts":"2024-05-29T16:00:00Z",
     "ts_epoch":1716998400.0,"units":"MW","warming_up":false,
     "forecasts":[{"ts":"2024-05-29T16:30:00Z","value":31012.5}, ...]}

A model with prediction intervals adds each level's bounds to every item
(``"lo80"``, ``"hi80"``, ``"lo95"``, ``"hi95"``: value plus the manifest's
offsets) and, after ``warming_up``, the check of this reading against the
previous tick's 1-step interval: ``"anomaly":false,"anomaly_score":0.0``
(``null`` for both when it was not checked).

How numbers are written: for a model (:meth:`ForecastEncoder.for_manifest`), values
and bounds have a fixed number of decimals, enough that the last digit is at most
``RESOLUTION`` (a millionth) of the model's size (its output scale, the size of a
typical change it forecasts, or the series' level if smaller): the same resolution
for a sensor near zero and for a meter reading in the millions, far finer than any
forecast's error, and a third of the cost of writing exact floats.  ``precision``
asks for that many significant digits instead (17 reads back as the exact float).

``ts`` is the timestamp of the reading the forecast follows (ISO 8601 UTC, with
milliseconds when not whole seconds) and ``ts_epoch`` the same in epoch
seconds; item ``k`` (1-based) is the forecast for ``ts + k * cadence``.  A
value that is not finite is written as ``null``.  The format is documented in
``docs/formats.md``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re

import numpy as np

from edge_lstm.engine import Forecast
from edge_lstm.features import FeatureKind, OutputKind
from edge_lstm.intervals import Intervals, bound_keys
from edge_lstm.modelspec import Manifest

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
BOUND_DIGITS = 7  # significant digits of bounds when neither a resolution nor a precision is given
RESOLUTION = 1e-6  # a model's numbers are written to this fraction of its output scale (see decimals_for)
_MS_PER_DAY = 86_400_000


@functools.lru_cache(maxsize=64)
def _date(days: int) -> str:
    return dt.date.fromordinal(_EPOCH_ORDINAL + days).isoformat()


_NOTHING_TO_ESCAPE = re.compile(r'[^"\\\x00-\x1f]*')


def _json_str(s: str) -> str:
    """``s`` as a JSON string (UTF-8 kept); stream ids, the common case, need no escaping."""
    return f'"{s}"' if _NOTHING_TO_ESCAPE.fullmatch(s) else json.dumps(s, ensure_ascii=False)


def iso_utc(t: float) -> str:
    """``2024-05-29T16:00:00Z`` (``.123`` milliseconds added when not whole seconds)."""
    return _iso_ms(round(t * 1000.0))


def _iso_ms(total_ms: int) -> str:
    days, ms = divmod(total_ms, _MS_PER_DAY)
    secs, ms = divmod(ms, 1000)
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    if ms:
        return f"{_date(days)}T{h:02d}:{m:02d}:{s:02d}.{ms:03d}Z"
    return f"{_date(days)}T{h:02d}:{m:02d}:{s:02d}Z"


def decimals_for(resolution: float) -> int | None:
    """Decimals that write a number to ``resolution`` or finer (at least 1); None when that takes more than 17
    (or ``resolution`` is not positive): such numbers are written as exact floats instead."""
    if not (math.isfinite(resolution) and resolution > 0):
        return None
    decimals = max(1, math.ceil(-math.log10(resolution) - 1e-9))
    return decimals if decimals <= 17 else None


@functools.lru_cache(maxsize=1 << 12)
def _item_prefix(total_ms: int) -> str:
    """``{"ts":"<ISO>","value":`` for a step time in epoch milliseconds."""
    return f'{{"ts":"{_iso_ms(total_ms)}","value":'


class ForecastEncoder:
    """Encodes :class:`~edge_lstm.engine.Forecast` objects for one model.

    ``precision`` writes values, bounds and the anomaly score with that many
    significant digits.  Without it, ``resolution`` (target units) writes values
    and bounds with the decimals that reach it (:func:`decimals_for`); with
    neither, values are the shortest text that reads back as the same float64 and
    bounds have ``BOUND_DIGITS`` significant digits.

    On the hot path: the step timestamps of a reading time are formatted once
    and kept as a ``%``-template (streams on a common clock share it), and each
    step time's text is cached on its own.  A reading one cadence after the
    previous new reading time (one stream, or streams on a common clock) takes
    that time's template shifted by one step and adds the new last step.
    """

    def __init__(
        self,
        cadence_s: float,
        units: str = "",
        precision: int | None = None,
        intervals: Intervals | None = None,
        resolution: float | None = None,
    ) -> None:
        if not cadence_s > 0:
            raise ValueError("cadence must be positive")
        self.cadence_s = float(cadence_s)
        self._units = _json_str(units)
        decimals = decimals_for(resolution) if resolution is not None else None
        if precision is not None:
            self._value_fmt = self._bound_fmt = self._score_fmt = f"%.{int(precision)}g"
        elif decimals is not None:
            self._value_fmt = self._bound_fmt = f"%.{decimals}f"
            self._score_fmt = "%r"
        else:
            self._value_fmt, self._bound_fmt, self._score_fmt = "%r", f"%.{BOUND_DIGITS}g", "%r"
        self._items = functools.lru_cache(maxsize=256)(self._make_items)  # reading times in use
        self._intervals = intervals
        # After each value: the bounds' keys, in the order of the columns of _values().
        self._bound_keys = [f',"{key}":' for lv in intervals.levels for key in bound_keys(lv)] if intervals else []
        self._item_tail = self._value_fmt + "".join(k + self._bound_fmt for k in self._bound_keys)
        # Whole milliseconds: step times are then exact (t0_ms + k * cadence_ms), so shifting is exact too.
        cadence_ms = self.cadence_s * 1000.0
        self._cadence_ms = cadence_ms if cadence_ms.is_integer() else math.nan
        self._last_items: tuple[float, int, list[str], str] = (math.nan, 0, [], "")  # t0 in ms, K, prefixes, template
        if intervals is not None:
            self._offsets = np.empty((2 * len(intervals.levels), intervals.horizon))
            self._offsets[0::2], self._offsets[1::2] = intervals.lower, intervals.upper

    def _prefixes(self, t0: float, horizon: int) -> list[str]:
        c = self.cadence_s
        return [_item_prefix(round((t0 + k * c) * 1000.0)) for k in range(1, horizon + 1)]

    def _make_items(self, t0: float, horizon: int) -> tuple[str, list[str], str]:
        """For reading time ``t0``: its ``ts`` fields, the item prefixes, and the items as one template."""
        head = f'"ts":"{iso_utc(t0)}","ts_epoch":{t0!r}'
        tail = self._item_tail  # an item's value and bounds formats; the prefixes hold no "%"
        t0_ms = t0 * 1000.0
        last_ms, last_k, last_prefixes, last_template = self._last_items
        if last_ms == t0_ms - self._cadence_ms and last_k == horizon > 1 and t0_ms.is_integer():
            # The previous reading time's steps 2..K are this one's 1..K-1.
            prefixes = [*last_prefixes[1:], _item_prefix(int(t0_ms + horizon * self._cadence_ms))]
            template = f"{last_template[len(last_prefixes[0]) + len(tail) + 2 :]}}},{prefixes[-1]}{tail}"
        else:
            prefixes = self._prefixes(t0, horizon)
            template = "},".join([p + tail for p in prefixes])
        self._last_items = (t0_ms, horizon, prefixes, template)
        return head, prefixes, template

    @classmethod
    def for_manifest(cls, manifest: Manifest, precision: int | None = None) -> ForecastEncoder:
        """The encoder of a model's forecasts: to ``RESOLUTION`` of its size, unless ``precision`` is set.

        The size is the model's output scale (for the usual delta output, the size of a
        typical change over the horizon), or the series' typical level when that is smaller
        and the manifest has it: a series near 1e-9 that never changes (its scale is then
        set to 1) still keeps its digits.
        """
        out = manifest.pipeline.output
        sizes = [abs(out.scale)]
        features = manifest.pipeline.features
        levels = [f.center for f in features if f.kind is FeatureKind.LEVEL and f.column == out.target]
        if out.kind is OutputKind.LEVEL:
            levels.append(out.center)
        sizes += [abs(c) for c in levels if c != 0.0]
        resolution = RESOLUTION * min(sizes)
        return cls(manifest.cadence_s, manifest.target_units, precision, manifest.intervals, resolution)

    def encode(self, f: Forecast) -> bytes:
        t0 = float(f.ts)
        horizon = len(f.values)
        if self._intervals is None:
            values = f.values.tolist()
            flags = ""
        else:
            # Per item: the value, then each level's lower and upper bound (value + offset).
            cols = np.empty((1 + len(self._bound_keys), horizon))
            cols[0] = f.values
            cols[1:] = f.values + self._offsets
            values = cols.T.ravel().tolist()
            score = f.anomaly_score
            if score is None:
                flags = ',"anomaly":null,"anomaly_score":null'
            else:
                text = self._score_fmt % score if math.isfinite(score) else "null"
                flags = f',"anomaly":{"true" if score > 0 else "false"},"anomaly_score":{text}'
        head, prefixes, template = self._items(t0, horizon)
        if math.isfinite(sum(values)):  # the sum of finite values is finite, unless it overflows
            items = template % tuple(values)
        else:
            per = 1 + len(self._bound_keys)
            fmts = [self._value_fmt] + [self._bound_fmt] * (per - 1)
            texts = [fmts[i % per] % v if math.isfinite(v) else "null" for i, v in enumerate(values)]
            keys = self._bound_keys
            items = "},".join(
                p + "".join(k + t for k, t in zip(["", *keys], texts[i * per : (i + 1) * per], strict=True))
                for i, p in enumerate(prefixes)
            )
        return (
            f'{{"stream":{_json_str(f.stream)},"model":{_json_str(f.model_id)},{head},'
            f'"units":{self._units},"warming_up":{"true" if f.warming_up else "false"}{flags},'
            f'"forecasts":[{items}}}]}}'
        ).encode()
