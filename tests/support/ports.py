"""Free loopback ports and waiting for a listener."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

# Ports handed out here lie below the range the OS takes ports for outgoing connections from, so that
# no client connection (a test's, the daemon's, the broker's) can take one between the pick and the bind.
_LOWEST = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, chosen at random below the OS's ephemeral range."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    tries = 200 if low > _LOWEST + 1000 else 0
    for _ in range(tries):
        port = pick.randrange(_LOWEST, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: let the OS pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False
