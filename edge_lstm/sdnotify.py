"""systemd notify protocol: ``READY=1``, ``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1``.

A datagram to the Unix socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the abstract namespace).  Without that variable every call is a no-op, so
the daemon runs the same way outside systemd.  No dependency on libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

_LOG = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to systemd (or does nothing when not run by it).

    ``environ`` is passed in (default: ``os.environ``) so tests can aim it at
    their own socket.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if raw:
            # Abstract namespace: '@name' on the wire is '\0name'.
            self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self.watchdog_interval_s = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of ``WATCHDOG_USEC`` in seconds (systemd's advice), when it is meant for this process."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec:
            return None
        if pid and pid != str(os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False when disabled or the send failed."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError as e:
            _LOG.warning("systemd notify failed: %s", e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
