"""A Debian 12 system booted with ``systemd-nspawn``: systemd as PID 1, its own loopback, no network.

:func:`debian_rootfs` builds (once, then reuses) the root file system with
``scripts/debian-rootfs.sh``. :class:`BootedContainer` boots it with ``--volatile=overlay``,
so every change made in the container lands in memory and the cached tree stays clean;
``--register=no --keep-unit`` let it run on a host whose own init is not systemd (no system bus
to register with), ``--private-network`` gives it a loopback of its own. Commands run inside
with ``nsenter`` into all of the container's namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.wheels import ROOT, cache_dir

SCRIPT = ROOT / "scripts" / "debian-rootfs.sh"
CONTAINER_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]


def nspawn_unavailable() -> str | None:
    """Why this machine cannot run ``systemd-nspawn`` at all, or None."""
    if not os.path.exists("/proc/self/ns/pid"):
        return "not Linux: systemd-nspawn needs Linux namespaces"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root (run the suite as root, as CI does)"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/os-deps.sh test installs it)"
    if shutil.which("debootstrap") is None and not os.path.exists("/usr/sbin/debootstrap"):
        return "debootstrap is not installed (scripts/os-deps.sh test installs it)"
    return None


def debian_rootfs(arch: str = "amd64") -> Path:
    """The cached Debian 12 tree for ``arch`` (built on first use: about 2 minutes natively)."""
    dest = cache_dir() / f"rootfs-bookworm-{arch}"
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    r = subprocess.run([str(SCRIPT), arch, str(dest)], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, f"{SCRIPT.name} {arch} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    return dest


def probe_nspawn(rootfs: Path) -> str | None:
    """None when ``systemd-nspawn`` can start a process in ``rootfs``, else its complaint."""
    r = subprocess.run(
        ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--volatile=overlay", "-D", str(rootfs), "/bin/true"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit status {r.returncode}")


class BootedContainer:
    """``rootfs`` booted under systemd; ``binds`` maps host paths to read-only container paths."""

    def __init__(self, rootfs: Path, binds: dict[Path, str], log: Path) -> None:
        self.rootfs = rootfs
        self.binds = binds
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self, timeout: float = 120.0) -> BootedContainer:
        args = ["systemd-nspawn", "-D", str(self.rootfs), "--boot", "--volatile=overlay", "--register=no",
                "--keep-unit", "--private-network", "--console=read-only", "--machine=edge-lstm-test"]  # fmt: skip
        args += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot:\n{self.log.read_text(errors='replace')[-3000:]}")
            self.leader = self._init_pid()
            time.sleep(0.1)
        while True:  # until systemd has finished booting (running, or degraded: a unit failed)
            left = max(1.0, deadline - time.monotonic())
            r = self.run("systemctl is-system-running --wait", check=False, timeout=left)
            if r.stdout.strip() in ("running", "degraded"):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not finish booting: {r.stdout} {r.stderr}")
            time.sleep(0.2)

    def _init_pid(self) -> int:
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid and (entry / "comm").read_text().strip() == "systemd":
                    return int(entry.name)
        return 0

    def run(
        self,
        script: str,
        check: bool = True,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        stdin: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script as root in the container (a clean environment plus ``env``), ``stdin`` as its input."""
        r = subprocess.run(
            self.command(script, env), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check:
            assert r.returncode == 0, (
                f"in the container: {script}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        return r

    def command(self, script: str, env: dict[str, str] | None = None) -> list[str]:
        """The host command line that runs ``script`` in the container (for ``subprocess.Popen``)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *CONTAINER_ENV, *extra, "bash", "-c", script]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # systemd-nspawn asks the container's systemd to power off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
