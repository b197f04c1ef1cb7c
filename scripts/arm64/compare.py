"""Compare the arm64 run of ``make check-arm64`` with this machine's; exit 1 on a real difference.

    python scripts/arm64/compare.py OUT_DIR

Reads, from OUT_DIR: ``forecasts-{arm64,native}.npy`` (the model over the whole bundled series),
``demo-{arm64,native}.txt`` (the demo's live table and summary), ``demo-arm64.err`` and
``pytest-arm64.txt``. Prints a summary for docs/deploy.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

# Both machines run the same float32 model, but XNNPACK picks other kernels (NEON against
# AVX), so sums are rounded in another order: tiny differences are expected, not wrong ones.
MAX_RELATIVE = 1e-3
ROW = re.compile(r"^(taylor)\s+(\w{3} \d\d-\d\d \d\d:\d\d)\s+(-?\d+)\s+(-?\d+|-)\s")


def table(path: Path) -> list[tuple[str, str, str]]:
    return [(m.group(2), m.group(3), m.group(4)) for line in path.read_text().splitlines() if (m := ROW.match(line))]


def main(out: Path) -> int:
    failures = []
    arm = np.load(out / "forecasts-arm64.npy")
    native = np.load(out / "forecasts-native.npy")
    assert arm.shape == native.shape, (arm.shape, native.shape)
    diff = np.abs(arm - native)
    rel = diff / np.maximum(np.abs(native), 1e-9)
    print(f"forecasts: {arm.shape[0]} ticks x {arm.shape[1]} steps; arm64 vs native: "
          f"max |diff| {diff.max():.4g} MW, max relative {rel.max():.3g}, "
          f"identical values {np.mean(diff == 0) * 100:.1f}%")  # fmt: skip
    if not np.all(np.isfinite(arm)) or rel.max() > MAX_RELATIVE:
        failures.append(f"forecasts differ by more than {MAX_RELATIVE} relative")

    rows_arm, rows_native = table(out / "demo-arm64.txt"), table(out / "demo-native.txt")
    same = sum(a == b for a, b in zip(rows_arm, rows_native, strict=False))
    print(f"demo: {len(rows_arm)} table rows on arm64, {len(rows_native)} native, {same} printed identically")
    summary = [line.strip() for line in (out / "demo-arm64.txt").read_text().splitlines() if "MAE" in line]
    print("demo (arm64): " + "; ".join(summary))
    if len(rows_arm) != len(rows_native) or len(rows_arm) == 0:
        failures.append("the demo tables differ in length")
    err = (out / "demo-arm64.err").read_text().strip()
    if "INFO:" in err or "XNNPACK" in err:
        failures.append(f"the runtime's native INFO line reached stderr: {err[:300]}")
    elif err:
        print(f"demo (arm64) stderr: {err[:300]}")

    tests = (out / "pytest-arm64.txt").read_text().strip().splitlines()
    last = tests[-1] if tests else "(no pytest output)"
    print(f"tests (arm64, emulated): {last.strip('= ')}")
    if not re.search(r"\d+ passed", last) or re.search(r"\d+ (failed|error)", last):
        failures.append("tests failed on arm64")

    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
