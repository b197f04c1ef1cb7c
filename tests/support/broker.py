"""A private Mosquitto broker for tests: free loopback port, stop and restart on the same port.

Usage::

    broker = Broker(tmp_path, persistence=True, extra_config=["max_queued_messages 100000"])
    broker.start()
    ...  # broker.host, broker.port
    broker.stop(); broker.start()       # a broker restart, same port, same persistence file
    broker.close()

``extra_config`` lines are appended to the generated ``mosquitto.conf`` (after a default
``listener PORT 127.0.0.1`` with ``allow_anonymous true``); pass ``listener_config`` to replace
the listener block entirely (for TLS or password listeners; use ``{port}`` in it).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .ports import free_port, wait_listening

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in MOSQUITTO_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


class Broker:
    """A Mosquitto process owned by a test."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        listener_config: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = list(extra_config)
        self.listener_config = listener_config
        binary = binary or find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.starts = 0

    def _write_config(self) -> None:
        lines = []
        if self.listener_config is not None:
            lines.append(self.listener_config.format(port=self.port))
        else:
            lines += [f"listener {self.port} {self.host}", "allow_anonymous true"]
        if self.persistence:
            pdir = self.workdir / "persistence"
            pdir.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {pdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines += [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 100000",
        ]
        lines += self.extra_config
        if not any(line.strip().startswith("user ") for line in "\n".join(lines).splitlines()):
            # As root, Mosquitto switches to the "mosquitto" user, which cannot read the test's files.
            lines.append(f"user {getpass.getuser()}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Broker:
        """Start (or start again) on the same port; returns once it accepts connections."""
        if self.running:
            return self
        self._write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        finally:
            log.close()
        self.starts += 1
        if not wait_listening(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{self.log()}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: a persistent broker saves its sessions)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


SENSOR_PASSWORD = "sensor-pw"


def password_acl_listener(directory: Path, edge_password: str) -> str:
    """``listener_config`` for a broker with a password file and an ACL, written into ``directory``.

    User ``edge`` (the daemon, password ``edge_password``) reads ``sensors/#``, writes
    ``forecasts/#`` and owns ``edge-lstm/#``; user ``sensor`` (``SENSOR_PASSWORD``) writes
    ``sensors/#`` and reads ``forecasts/#``; anonymous clients are refused.
    """
    pwfile = directory / "passwd"
    pwfile.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "edge", edge_password], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "sensor", SENSOR_PASSWORD], check=True)
    pwfile.chmod(0o600)
    acl = directory / "acl"
    acl.write_text(
        "user edge\ntopic read sensors/#\ntopic write forecasts/#\ntopic readwrite edge-lstm/#\n"
        "user sensor\ntopic write sensors/#\ntopic read forecasts/#\n"
    )
    acl.chmod(0o600)
    return f"listener {{port}} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\nacl_file {acl}"
