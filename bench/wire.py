"""A minimal MQTT client for the load harness: packets built and parsed by hand on a plain socket.

The generator and the receiver share the machine with the broker and the system under test.
Built on paho, together they took 0.8-0.9 of a core at 3,500 readings/s, most of it paho's
per-packet work, which on two cores left the system under test fighting for a core at what was
meant to be half its maximum.  This client does only what the harness needs (CONNECT, SUBSCRIBE,
PUBLISH at QoS 0 or 1, PUBACK, PINGREQ, DISCONNECT; MQTT 3.1.1 and 5 without properties), writes
each burst of packets with one ``send`` and parses whole read buffers, so that the harness costs a
small part of what it measures, as a load generator written in C would.

It is not a general client: it never reconnects, ignores packets it does not expect, and trusts
the broker to send well-formed packets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time

from edge_lstm.config import MqttProtocol

PUBLISH, PUBACK, SUBACK, CONNACK = 0x30, 0x40, 0x90, 0x20
PING_EVERY_S = 60.0  # a PINGREQ after this long without sending (the harness's keepalive is longer)


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def _varint_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """The variable byte integer at ``data[pos:]`` and where it ends; None when ``data`` ends inside it."""
    value, shift = 0, 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return None


def split(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The whole packets at the start of ``data`` as (first byte, body start, body end), and where they end."""
    out: list[tuple[int, int, int]] = []
    pos, end = 0, len(data)
    while pos + 2 <= end:
        found = _varint_at(data, pos + 1)
        if found is None:
            break
        length, start = found
        if start + length > end:
            break
        out.append((data[pos], start, start + length))
        pos = start + length
    return out, pos


class WireClient:
    """One connection to the broker, blocking, driven by its owner (no thread of its own)."""

    def __init__(self, host: str, port: int, client_id: str, protocol: MqttProtocol, keepalive: int) -> None:
        self.v5 = protocol is MqttProtocol.V5
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbuf = b""
        self.data = b""  # the buffer the last take() parsed
        self.last_send = time.monotonic()
        self._pid = 0
        props = b"\x00" if self.v5 else b""
        body = _string(b"MQTT") + bytes((5 if self.v5 else 4, 0x02)) + struct.pack("!H", keepalive) + props
        self.send(packet(0x10, body + _string(client_id.encode())))
        _first, ack = self.expect(CONNACK)
        if ack[1] != 0:
            raise ConnectionError(f"broker refused the connection (reason {ack[1]:#x})")
        self.sock.settimeout(None)

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def publish_packet(self, topic: bytes, payload: bytes, qos: int) -> bytes:
        return publish_packet(topic, payload, qos, self.next_pid() if qos else 0, self.v5)

    def subscribe(self, topic_filter: str, qos: int) -> None:
        body = struct.pack("!H", self.next_pid()) + (b"\x00" if self.v5 else b"")
        self.send(packet(0x82, body + _string(topic_filter.encode()) + bytes((qos,))))
        _first, ack = self.expect(SUBACK)
        granted = ack[-1]
        if granted >= 0x80:
            raise ConnectionError(f"broker refused the subscription to {topic_filter!r} ({granted:#x})")

    def send(self, data: bytes | bytearray) -> None:
        self.sock.sendall(data)
        self.last_send = time.monotonic()

    def read(self, timeout: float | None) -> bool:
        """Append what the socket has to ``inbuf``, waiting up to ``timeout`` s; False once it is closed."""
        if timeout is not None and not select.select([self.sock], [], [], max(timeout, 0.0))[0]:
            return True
        data = self.sock.recv(1 << 18)
        if not data:
            return False
        self.inbuf += data
        return True

    def take(self) -> list[tuple[int, int, int]]:
        """The whole packets read so far, as :func:`split` gives them over ``self.data``; consumed."""
        found, used = split(self.inbuf)
        self.data, self.inbuf = self.inbuf, self.inbuf[used:]
        return found

    def expect(self, kind: int) -> tuple[int, bytes]:
        """Read until a packet of ``kind`` arrives (others before it are dropped)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for first, start, end in self.take():
                if first & 0xF0 == kind:
                    return first, self.data[start:end]
            if not self.read(deadline - time.monotonic()):
                break
        raise ConnectionError(f"no packet of type {kind >> 4} from the broker")

    def keepalive(self) -> None:
        if time.monotonic() - self.last_send > PING_EVERY_S:
            self.send(b"\xc0\x00")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"\xe0\x00")
        self.sock.close()


def publish_packet(topic: bytes, payload: bytes, qos: int, pid: int, v5: bool) -> bytes:
    """A PUBLISH packet (no properties)."""
    head = _string(topic)
    if qos:
        head += struct.pack("!H", pid)
    if v5:
        head += b"\x00"
    return packet(PUBLISH | qos << 1, head + payload)


def publish_fields(data: bytes, first: int, start: int, end: int, v5: bool) -> tuple[bytes, bytes, int]:
    """(topic, payload, packet id or 0) of the PUBLISH packet at ``data[start:end]``."""
    n = data[start] << 8 | data[start + 1]
    pos = start + 2 + n
    topic = data[start + 2 : pos]
    pid = 0
    if first & 0x06:
        pid = data[pos] << 8 | data[pos + 1]
        pos += 2
    if v5:
        props = _varint_at(data, pos)
        if props is None:
            raise ValueError("a PUBLISH cut inside its property length")
        length, pos = props
        pos += length
    return topic, data[pos:end], pid
