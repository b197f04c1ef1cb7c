"""``python -m bench.against REV [NAME ...] --out DIR``: run this suite against an older daemon.

Before/after figures only mean something when both sides are measured the same way, on the same
machine, close in time.  This checks out ``REV`` (any git revision) into a temporary worktree,
puts the current ``bench/`` (and the test helpers it uses) into it, and runs
``python -m bench NAME ... --out DIR`` there, so the daemon under test is the old code and
everything that measures it is today's.  Only the benchmarks that run the daemon as a process
make sense against old code (default: ``ceiling daemon cpu``); ``pipeline`` drives the daemon's
classes directly and needs them as they are now.  With ``--out bench/results/before`` the
suite's summary (``docs/performance.md``) shows those figures beside today's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NAMES = ("ceiling", "daemon", "cpu")
CARRIED = ("bench", "tests/support", "tests/__init__.py")  # today's measuring code, put into the old tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.against", description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="git revision of the daemon to measure")
    p.add_argument("names", nargs="*", default=list(DEFAULT_NAMES), help="benchmarks (default: ceiling daemon cpu)")
    p.add_argument("--out", type=Path, required=True, help="results directory for the old revision")
    p.add_argument("--repeat", type=int, default=3, help="searches per stream count (default 3)")
    args, passthrough = p.parse_known_args(argv)
    if "pipeline" in args.names:
        p.error("pipeline drives today's classes directly: it cannot run against an old revision")
    work = Path(tempfile.mkdtemp(prefix="edge-lstm-against-"))
    tree = work / "tree"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.rev], check=True)
        for rel in CARRIED:
            src, dst = REPO / rel, tree / rel
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("results", ".cache", ".venvs", "__pycache__"))
            else:
                shutil.copy2(src, dst)
        out = args.out.resolve()
        cmd = [sys.executable, "-m", "bench", *args.names, "--repeat", str(args.repeat), "--out", str(out)]
        cmd += ["--doc", str(out / "performance.md"), *passthrough]
        env = {**os.environ, "PYTHONPATH": str(tree)}  # the old edge_lstm before the installed one
        print("running", " ".join(cmd[1:]), "against", args.rev, flush=True)
        rc = subprocess.run(cmd, cwd=tree, env=env).returncode
        if rc == 0:
            _mark(out, args.names, _short(args.rev), argv if argv is not None else sys.argv[1:])
        return rc
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _short(rev: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True)
    return proc.stdout.strip() or rev


def _mark(out: Path, names: list[str], rev: str, argv: list[str]) -> None:
    """Record in each result file which revision was measured, and the command that did it."""
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        doc["against"] = rev
        doc["command"] = results.portable("python -m bench.against " + " ".join(argv))
        path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
