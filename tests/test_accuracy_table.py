"""The accuracy table's interval section: which coverages miss the bar, and what the misses rest on."""

from __future__ import annotations

from typing import Any

from converter.accuracy import coverage_misses, coverage_section


def _result(cov80: list[float], cov95: list[float], pairs: list[int]) -> dict[str, Any]:
    return {"horizon": len(pairs), "pairs": pairs, "interval_coverage": {"80": cov80, "95": cov95}}


def test_coverage_misses_check_the_first_and_last_horizon_against_their_own_bars() -> None:
    results = {
        # h=1 within 4 points, h=3 within 6 (the middle horizon is not judged)
        "calm": _result([0.77, 0.50, 0.745], [0.92, 0.50, 0.90], [400, 400, 400]),
        # 80 % at h=1 off by 4.5 points, 95 % at h=3 off by 6.5: both miss
        "off": _result([0.845, 0.80, 0.80], [0.95, 0.95, 0.885], [100, 100, 25]),
    }
    misses = coverage_misses(results)
    assert misses == [
        "off 80 % h=1: 84.5 % (+4.5 points; 100 pairs, sampling s.e. 4.0)",
        "off 95 % h=3: 88.5 % (-6.5 points; 25 pairs, sampling s.e. 4.4)",
    ]
    text = "\n".join(coverage_section(results))
    assert "| calm | 3 | 77.0 | 74.5 | 92.0 | 90.0 |" in text
    assert "Outside the bar: " + "; ".join(misses) + "." in text
    assert coverage_section({"none": {"horizon": 1, "pairs": [5]}}) == []
