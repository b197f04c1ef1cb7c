"""The daemon's MQTT connection (paho-mqtt 2.x), driven by its owner's loop.

:class:`MqttLink` wraps one paho client and runs no thread of its own: the
caller's loop calls :meth:`MqttLink.poll`, which waits on the socket, reads
what arrived, writes what is queued, keeps the connection alive and
reconnects.  Everything the link reports, it reports through callbacks made
from inside ``poll``:

* ``on_message(Inbound)`` for each message; acknowledgement is **manual**: a
  QoS 1 message stays unacknowledged until the owner calls :meth:`ack`
  (in the order the messages arrived), so the broker delivers it again after a
  reconnect or to the next run;
* ``on_published(token, ok)`` once per :meth:`publish` with a token: for QoS 1
  when the broker's PUBACK arrives (``ok`` False when an MQTT 5 broker refuses
  it), for QoS 0 when it was written to the socket;
* ``on_connection(connected)`` on each connect and disconnect.

Publishing never blocks: QoS 1 messages wait in paho's queue while
disconnected and go out after the reconnect.  The owner bounds that queue by
not reading more input while too many forecasts are outstanding (TCP then
pushes back on the broker).

The hot path is lean (:class:`LeanClient`, :class:`BufferedSocket`): one
``recv`` fills a buffer from which whole PUBLISH and PUBACK packets are taken
without paho's per-packet objects and locks; acknowledgements go straight to a
write buffer; everything a poll wrote goes out in one ``send``.  A QoS 0
forecast counts as published once the socket took it from that buffer; what
is left in it when the connection breaks is reported as failed.

The rest is as a long-running client should be: MQTT 5 or 3.1.1, a stable
client id and a persistent session (MQTT 5: ``clean_start=False`` plus a
session expiry interval; 3.1.1: ``clean_session=False``); QoS 1 subscriptions
made again on every connect; reconnects with exponential backoff; a retained
status topic (last will ``offline``, ``online`` once ready and after every
reconnect, ``offline`` on a clean stop); ``TCP_NODELAY`` on the socket (paho
leaves Nagle's algorithm on, which delays small publishes by up to ~40 ms);
connect failures logged with the broker's reason.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_lstm.config import MqttConfig, MqttProtocol

_LOG = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
SUBSCRIBE_QOS = 1
MAX_INFLIGHT = 1000  # outgoing QoS 1 messages paho keeps unacknowledged on the wire at once
CONNACK_TIMEOUT_S = 10.0  # a TCP connection without a CONNACK this long is dropped and retried
REFUSAL_LOG_EVERY_S = 60.0  # a broker refusing every forecast logs once a minute, not per forecast
READ_BUDGET = 4096  # most packets one poll reads before it returns to its owner
TAKEOVER_HINT_S = 10.0  # a connection lost this soon after its CONNACK: logged with the client-id hint, backs off


@dataclasses.dataclass(frozen=True, slots=True)
class Inbound:
    """One message as the broker delivered it."""

    topic: str | None  # None when the topic is not valid UTF-8
    payload: bytes
    mid: int
    qos: int
    dup: bool  # the broker sent it before (a redelivery after a reconnect)
    retain: bool  # a retained message, sent because of a (re)subscription
    arrived: float  # time.monotonic() when it was read


def _ignore(*_args: Any) -> None:
    return None


def share_property_tables() -> bool:
    """Stop paho from building its MQTT 5 property tables for every packet; True when done.

    paho's ``Properties`` builds the same three lookup tables (types, names,
    identifiers; ~30 entries each) in ``__init__`` for every PUBLISH it decodes
    and every PUBACK, and its ``clear`` (run by every ``unpack``) probes all 27
    names.  Together ~40 us per reading in the daemon, more than the model step
    at batch 100.  paho only reads those tables, so every instance can share one
    copy; ``clear`` then has nothing to delete unless a property was set.  The
    classes' behaviour is otherwise unchanged (tested in tests/test_mqtt.py).
    Applied once, in this process only, and only when paho's ``Properties``
    looks as expected (else paho's own code runs, slower).
    """
    cls = Properties
    if getattr(cls, "_edge_lstm_shared", False):
        return True
    try:
        proto = cls(PacketTypes.PUBLISH)
    except Exception:  # another paho layout: leave it alone
        return False
    if set(proto.__dict__) != {"packetType", "types", "names", "properties"}:
        return False  # an __init__ that sets more than the tables: leave it alone
    tables = {k: proto.__dict__[k] for k in ("types", "names", "properties")}
    own_clear = cls.clear
    base = len(tables) + 1  # the tables and packetType

    def init(self: Properties, packetType: int) -> None:
        d = self.__dict__
        d["packetType"] = packetType
        d.update(tables)

    def clear(self: Properties) -> None:
        if len(self.__dict__) > base:  # some property is set
            own_clear(self)

    cls.__init__ = init  # type: ignore[method-assign]
    cls.clear = clear  # type: ignore[method-assign]
    cls._edge_lstm_shared = True  # type: ignore[attr-defined]
    return True


class BufferedSocket:
    """The broker's socket with a read buffer and a write buffer.

    paho reads each packet in at least three ``recv`` calls (the command byte,
    each byte of the remaining length, then the body) and writes each packet
    with its own ``send``.  This wrapper fills a buffer with one ``recv`` of up
    to 64 KiB and serves paho's small reads from it (or whole packets, through
    :meth:`packet`); what paho sends is gathered and written with one ``send``
    by :meth:`flush_out`.  :meth:`pending` and :attr:`out_pending` tell the
    owner's ``select`` what waits on either side.
    """

    __slots__ = ("_buf", "_out", "_pos", "_sock", "error", "sent", "taken")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._out = bytearray()
        self.taken = 0  # bytes taken by send since the connection opened
        self.sent = 0  # of them, bytes written to the socket
        self.error: OSError | None = None  # what ended the connection on a read (paho only says "lost")

    def _fill(self) -> bytes:
        """One ``recv`` into the emptied buffer; b"" when the broker closed the connection."""
        try:
            data = self._sock.recv(65536)  # BlockingIOError (or TLS's want-read) when nothing is there
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except OSError as e:  # e.g. the broker's TLS alert: certificate expired, unknown CA
            self.error = e
            raise
        if data:
            self._buf, self._pos = data, 0
        return data

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf) and not self._fill():
            return b""  # closed by the broker
        pos = self._pos
        chunk = self._buf[pos : pos + n]
        self._pos = pos + len(chunk)
        return chunk

    def packet(self) -> tuple[int, bytes] | None:
        """The next whole packet in the buffer: its first byte and its body (after the remaining length).

        Reads the socket first when the buffer is empty (raising as ``recv``
        does when nothing is there).  None when the buffer holds only part of a
        packet or the connection closed: paho's own reader takes it from there.
        """
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            if not self._fill():
                return None
            buf, pos = self._buf, 0
        end = len(buf)
        length, mult, i = 0, 1, pos + 1
        while True:  # the remaining length: 1 to 4 bytes, 7 bits each, least significant first
            if i >= end or i > pos + 4:
                return None  # not all here (or malformed: paho's reader reports it)
            byte = buf[i]
            length += (byte & 0x7F) * mult
            i += 1
            if byte < 0x80:
                break
            mult <<= 7
        if i + length > end:
            return None
        self._pos = i + length
        return buf[pos], buf[i : i + length]

    def pending(self) -> int:
        inner = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        return len(self._buf) - self._pos + inner

    def send(self, data: bytes | bytearray) -> int:
        """Take ``data`` to write at the next :meth:`flush_out` (all of it, at once)."""
        self._out += data
        self.taken += len(data)
        return len(data)

    @property
    def out_pending(self) -> int:
        return len(self._out)

    def flush_out(self) -> None:
        """Write what was gathered with one ``send``, as far as the socket takes it now.

        Raises what ``send`` raises: BlockingIOError (or TLS's want-write) when
        the socket takes nothing, OSError when the connection is gone.
        """
        if self._out:
            sent = self._sock.send(self._out)
            del self._out[:sent]
            self.sent += sent

    def close(self) -> None:
        with contextlib.suppress(OSError):  # paho closes right after a DISCONNECT: let it go out first
            self.flush_out()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_MESSAGE_SLOTS = {"_topic", "dup", "info", "mid", "payload", "properties", "qos", "retain", "state", "timestamp"}
_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_SUCCESS = (0x00, 0x10)  # MQTT 5 reason codes of an accepted publish: success, no matching subscribers
_LEAN_NEEDS = ("_in_packet", "_out_messages", "_inflight_messages", "_max_inflight_messages", "_last_bytes_received",
               "_last_msg_out", "_sock", "_packet_read", "_update_inflight", "_mid_generate", "_protocol")  # fmt: skip


class LeanClient(paho.Client):
    """paho's client with the two packets a forecasting daemon lives on, PUBLISH in and PUBACK in, taken cheaply.

    For each reading paho decodes into a dataclass, builds an ``MQTTMessage``
    (with a ``threading.Condition``), takes three locks and matches the topic
    against per-filter callbacks; for each PUBACK it builds a ``ReasonCode``
    and then walks *every* unacknowledged publish looking for one queued
    behind the in-flight limit.  Here a whole PUBLISH (QoS 0 or 1, no MQTT 5
    properties) or a successful PUBACK found in the :class:`BufferedSocket`'s
    buffer goes straight to ``lean_message`` / ``lean_acked`` with paho's
    bookkeeping done as paho does it; every other packet (and any packet not
    yet whole, or with properties, or a refusal) is handed to paho's own reader
    and handlers.  The in-flight walk runs only when some publish waits for a
    slot.  The owner's QoS 1 forecasts go out the same way
    (:meth:`lean_publish`): the packet written into the buffer, the message
    registered in paho's table so that paho sends it again after a reconnect.
    Used only when paho has the internals this relies on
    (:func:`lean_supported`); tested against paho's own reader and writer.
    """

    lean_message: Callable[[bytes, bytes, int, int, bool, bool], None] = staticmethod(_ignore)  # type: ignore[assignment]
    lean_acked: Callable[[int], None] = staticmethod(_ignore)  # type: ignore[assignment]
    lean_packets = 0  # packets taken by the lean path (for tests and the curious)

    def _packet_read(self) -> MQTTErrorCode:
        sock = self._sock
        if self._in_packet["command"] == 0 and type(sock) is BufferedSocket:
            try:
                got = sock.packet()
            except (BlockingIOError, ssl.SSLWantReadError):
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:  # paho's reader meets it again and reports it its way
                got = None
            if got is not None:
                cmd, body = got
                kind = cmd & 0xF0
                rc = (
                    self._lean_publish(cmd, body) if kind == _PUBLISH
                    else self._lean_puback(body) if kind == _PUBACK
                    else None
                )  # fmt: skip
                if rc is not None:
                    self.lean_packets += 1
                    self._last_bytes_received = time.monotonic()
                    return rc
                packet = self._in_packet  # whole but not ours: paho handles it as if it had read it
                packet["command"] = cmd
                packet["have_remaining"] = 1
                packet["remaining_length"] = len(body)
                packet["to_process"] = 0
                packet["packet"] = bytearray(body)
        return super()._packet_read()

    def _lean_publish(self, cmd: int, body: bytes) -> MQTTErrorCode | None:
        qos = (cmd >> 1) & 3
        size = len(body)
        if qos > 1 or size < 2:
            return None
        end = 2 + ((body[0] << 8) | body[1])
        if end > size or (end == 2 and self._protocol != MQTTProtocolVersion.MQTTv5):
            return None  # malformed (an empty topic is, before MQTT 5): paho says so
        pos = end
        mid = 0
        if qos:
            if pos + 2 > size:
                return None
            mid = (body[pos] << 8) | body[pos + 1]
            pos += 2
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            if pos >= size or body[pos]:
                return None  # properties: paho decodes them
            pos += 1
        try:
            self.lean_message(body[2:end], body[pos:], mid, qos, bool(cmd & 0x08), bool(cmd & 0x01))
        except Exception:  # as paho's suppress_exceptions: a callback that raises does not end the loop
            _LOG.exception("handling a message")
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _lean_puback(self, body: bytes) -> MQTTErrorCode | None:
        size = len(body)
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        if size != 2 and not (v5 and size == 3 and body[2] in _PUBACK_SUCCESS):
            return None  # a refusal, properties or a malformed packet: paho decides
        mid = (body[0] << 8) | body[1]
        msg = self._out_messages.pop(mid, None)
        if msg is None:
            return MQTTErrorCode.MQTT_ERR_SUCCESS  # not ours (any more): paho ignores it too
        msg.info._set_as_published()
        self._inflight_messages -= 1  # only QoS > 0 messages wait for a PUBACK
        try:
            self.lean_acked(mid)
        except Exception:
            _LOG.exception("handling an acknowledgement")
        if self._max_inflight_messages > 0:
            return self._update_inflight()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> MQTTErrorCode:
        if len(self._out_messages) <= self._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS  # every unacknowledged publish is on the wire: none waits
        return super()._update_inflight()

    def lean_publish(self, topic: bytes, payload: bytes, retain: bool) -> int | None:
        """Write a QoS 1 PUBLISH into the socket's buffer and register it as paho's ``publish`` would; its mid.

        For a connected owner only.  None when paho's ``publish`` must decide
        (no buffered socket, the in-flight limit reached, a topic paho refuses,
        a packet id still in use): the owner calls it instead.
        """
        sock = self._sock
        if (
            type(sock) is not BufferedSocket
            or (self._max_inflight_messages and self._inflight_messages >= self._max_inflight_messages)
            or not topic
            or len(topic) > 65535
            or b"+" in topic
            or b"#" in topic
        ):
            return None
        mid = self._mid_generate()
        if mid in self._out_messages:
            return None
        head = (0x31 if retain else 0x30) | 0x02  # PUBLISH, QoS 1
        props = b"\x00" if self._protocol == MQTTProtocolVersion.MQTTv5 else b""  # MQTT 5: no properties
        remaining = 4 + len(topic) + len(props) + len(payload)
        out = sock._out
        out.append(head)
        while remaining > 0x7F:
            out.append((remaining & 0x7F) | 0x80)
            remaining >>= 7
        out.append(remaining)
        out += len(topic).to_bytes(2, "big")
        out += topic
        out += mid.to_bytes(2, "big")
        out += props
        out += payload
        msg = paho.MQTTMessage.__new__(paho.MQTTMessage)  # kept until its PUBACK, sent again after a reconnect
        msg.timestamp = self._last_msg_out = time.monotonic()
        msg.state = paho.mqtt_ms_wait_for_puback
        msg.dup = False
        msg.mid = mid
        msg._topic = topic
        msg.payload = payload
        msg.qos = 1
        msg.retain = retain
        msg.info = _Sent(mid)
        msg.properties = None
        self._out_messages[mid] = msg
        self._inflight_messages += 1
        return mid


class _Sent(paho.MQTTMessageInfo):
    """paho's handle of a publish without its ``threading.Condition``: no other thread waits for it here."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        self._published = True


@functools.cache
def lean_supported() -> bool:
    """paho (this version) has what :class:`LeanClient` relies on."""
    try:
        probe = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    except Exception:
        return False
    message = paho.MQTTMessage(1, b"t")
    return (
        all(hasattr(probe, name) for name in _LEAN_NEEDS)
        and isinstance(probe._in_packet, dict)
        and set(paho.MQTTMessage.__slots__) == _MESSAGE_SLOTS
        and set(paho.MQTTMessageInfo.__slots__) == {"_condition", "_iterpos", "_published", "mid", "rc"}
        and hasattr(paho, "mqtt_ms_wait_for_puback")
        and hasattr(message.info, "_set_as_published")
    )


class MqttLink:
    """One MQTT connection, driven by :meth:`poll` from its owner's loop."""

    def __init__(
        self,
        cfg: MqttConfig,
        status_topic: str,
        *,
        on_message: Callable[[Inbound], None] = _ignore,
        on_published: Callable[[object, bool], None] = _ignore,
        on_connection: Callable[[bool], None] = _ignore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.status_topic = status_topic
        self.on_message = on_message
        self.on_published = on_published
        self.on_connection = on_connection
        self._clock = clock
        self.subscriptions: list[str] = []
        self._tokens: dict[int, object] = {}  # mid of an outstanding publish -> its owner's token
        self._qos0: set[int] = set()  # mids of QoS 0 publishes with a token
        # QoS 0 publishes in the write buffer, not yet written to the socket: (the buffer's byte count at
        # their end, token); reported when the socket took them, as failures when the connection ended first.
        self._unwritten: collections.deque[tuple[int, object]] = collections.deque()
        self._ready = False
        self._connected = False
        self._closing = False
        self._began = False
        self.connects = 0
        self._connected_at = 0.0  # clock time of the last CONNACK
        self.last_error: str = ""
        self.publish_refusals = 0  # QoS 1 publishes the broker acknowledged with a failure (MQTT 5)
        self._refusal_logged_at = -REFUSAL_LOG_EVERY_S
        self._next_attempt = 0.0
        self._delay = float(cfg.reconnect_min_s)
        self._tcp_since: float | None = None  # TCP up, CONNACK not yet seen
        self.hold = False  # set by the owner inside on_message to end the current read early
        self._wrapped: BufferedSocket | None = None
        self._fail_logged_at = -REFUSAL_LOG_EVERY_S
        self.unsendable = 0  # publishes paho refused to send (counted by the owner as failures)
        # The broker's Maximum Packet Size from its MQTT 5 CONNACK (None: not given): a larger publish would
        # make the broker close the connection, and paho would send it again on every reconnect.
        self.max_packet: int | None = None
        self._unsendable_logged_at = -REFUSAL_LOG_EVERY_S
        v5 = cfg.protocol is MqttProtocol.V5
        self._v5 = v5
        share_property_tables()
        client_class = LeanClient if lean_supported() else paho.Client
        self.client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        c = self.client
        if isinstance(c, LeanClient):
            c.lean_message = self._lean_message
            c.lean_acked = self._acked
        if logging.getLogger("paho.mqtt").isEnabledFor(logging.DEBUG):
            c.enable_logger(logging.getLogger("paho.mqtt"))  # paho formats a line per packet otherwise
        c.suppress_exceptions = True  # a callback that raises must not end the loop (ours do not raise)
        c.max_queued_messages_set(0)  # unbounded here: the owner bounds what it has outstanding
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.will_set(status_topic, OFFLINE, qos=1, retain=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            c.tls_set(
                ca_certs=cfg.ca_file or None,
                certfile=cfg.cert_file or None,
                keyfile=cfg.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if cfg.tls_insecure:
                c.tls_insecure_set(True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_message = self._on_message
        # With a write callback registered, paho queues packets instead of writing each one at once:
        # poll() writes them together.
        c.on_socket_register_write = _ignore
        c.on_socket_unregister_write = _ignore

    # -- set-up ---------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe to ``topic_filter`` (QoS 1) on every connect."""
        self.subscriptions.append(topic_filter)

    def begin(self) -> None:
        """Make the first connection attempt at the next :meth:`poll`, and keep reconnecting after."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._began = True
        self._next_attempt = 0.0

    @property
    def connected(self) -> bool:
        return self._connected

    def set_ready(self) -> None:
        """Publish ``online`` now and after every later (re)connect."""
        self._ready = True
        if self._connected:
            self.client.publish(self.status_topic, ONLINE, qos=1, retain=True)

    # -- the owner's loop -----------------------------------------------------------------------

    def poll(self, timeout: float, *, read: int = READ_BUDGET, wake: socket.socket | None = None) -> bool:
        """Wait up to ``timeout`` s for the network (and ``wake``), then handle what is ready.

        Reads at most ``read`` packets (0: none, the owner's backpressure), writes
        whatever is queued, sends keepalives and reconnects when it is time.
        Returns True when ``wake`` became readable (the caller drains it).
        """
        c = self.client
        now = self._clock()
        if c.socket() is None:
            if self._began and not self._closing and now >= self._next_attempt:
                self._attempt(now)
            timeout = min(timeout, max(0.0, self._next_attempt - now)) if self._began else timeout
        sock = c.socket()
        rlist: list[Any] = [wake] if wake is not None else []
        wlist: list[Any] = []
        buffered = False  # bytes already read (or decrypted by TLS) that select cannot see
        if sock is not None:
            if read:
                rlist.append(sock)
                if isinstance(sock, BufferedSocket) and sock.pending():
                    buffered = True
                    timeout = 0.0
            if self._wants_write():
                wlist.append(sock)
        woken = False
        if rlist or wlist:
            try:
                readable = select.select(rlist, wlist, [], max(0.0, timeout))[0]
            except (OSError, ValueError):  # the socket closed under us: handled below
                readable = []
            woken = wake is not None and wake in readable
            if read > 0 and sock is not None and (sock in readable or buffered):
                self._read(read)
        elif timeout > 0:
            time.sleep(timeout)
        self.flush()
        if c.socket() is not None:
            c.loop_misc()
            if self._tcp_since is not None and self._clock() - self._tcp_since > CONNACK_TIMEOUT_S:
                _LOG.warning("MQTT broker %s:%d sent no CONNACK; retrying", self.cfg.host, self.cfg.port)
                self._drop()
        return woken

    def _read(self, budget: int) -> int:
        """Read packets one at a time until the socket is drained, ``budget`` is spent or the owner holds.

        paho's public ``loop_read`` reads as many packets per call as there are
        publishes in flight (thousands under load), so an owner could not bound
        what one call delivers; ``_packet_read`` is the step it repeats (paho 2.x).
        """
        c = self.client
        self.hold = False
        handled = 0
        while handled < budget and not self.hold and c.socket() is not None:
            rc = c._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break  # drained, or a packet only partly arrived
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                c._loop_rc_handle(rc)  # closes the socket and reports the disconnect
                break
            handled += 1
        return handled

    def _buffer(self) -> BufferedSocket | None:
        """The buffered socket of the current connection; None between connections (or before paho's own)."""
        w = self._wrapped
        return w if w is not None and self.client.socket() is w else None

    def _wants_write(self) -> bool:
        w = self._buffer()
        return self.client.want_write() or (w is not None and w.out_pending > 0)

    def flush(self) -> None:
        """Write what is queued, as far as the socket takes it now (one ``send`` for all of it)."""
        c = self.client
        if c.socket() is None:
            return
        if c.want_write():
            c.loop_write()  # paho's queue into the socket's write buffer
        w = self._buffer()
        if w is None or not w.out_pending:
            return
        try:
            w.flush_out()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # the socket is full: select waits until it takes more
        except OSError as e:
            w.error = e
            c._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)  # closes the socket, reports the disconnect
        else:
            self._report_written(w)

    def _report_written(self, w: BufferedSocket, *, ended: bool = False) -> None:
        """QoS 0 publishes the socket took: published; with ``ended``, the rest failed (the connection is gone)."""
        unwritten = self._unwritten
        while unwritten and (ended or unwritten[0][0] <= w.sent):
            end, token = unwritten.popleft()
            self.on_published(token, end <= w.sent)

    def _attempt(self, now: float) -> None:
        try:
            self.client.reconnect()
        except (OSError, ValueError) as e:  # ssl.SSLError and socket errors are OSErrors
            self.last_error = describe_connect_error(e)
            if now - self._fail_logged_at >= CONNACK_TIMEOUT_S or (self.connects == 0 and self._delay <= 1):
                self._fail_logged_at = now
                _LOG.warning("MQTT broker %s:%d: %s; retrying in %.0f s", self.cfg.host, self.cfg.port,
                             self.last_error, self._delay)  # fmt: skip
            self._retry_after_delay(now)
            return
        self._tcp_since = now
        self._next_attempt = now + self._delay

    def _retry_after_delay(self, now: float, grow: bool = True) -> None:
        """The next attempt one delay from ``now``; ``grow``: the delay after it doubles (to reconnect_max_s)."""
        self._next_attempt = now + self._delay
        if grow:
            self._delay = min(self._delay * 2, float(self.cfg.reconnect_max_s))

    def _drop(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            # paho notices the closed socket on its next read and reports the disconnect
            self.client.loop_read()

    # -- publishing and acknowledging -----------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, token: object = None) -> bool:
        """Queue one message; never blocks.  False when it cannot go out at all (QoS 0 while disconnected).

        With a ``token``, ``on_published(token, ok)`` follows once the broker
        acknowledged it (QoS 1) or it was written (QoS 0).
        """
        if self.max_packet is not None and (size := publish_packet_size(topic, payload, qos)) > self.max_packet:
            return self._unsendable(topic, f"a {size}-byte packet, over the broker's maximum packet size of "
                                           f"{self.max_packet} bytes")  # fmt: skip
        c = self.client
        try:
            if qos == 1 and self._connected and isinstance(c, LeanClient) and type(payload) is bytes:
                mid = c.lean_publish(topic.encode(), payload, retain)
                if mid is not None:
                    if token is not None:
                        self._tokens[mid] = token
                    return True
            info = c.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as e:  # what MQTT cannot carry (a topic over 65,535 bytes): paho refuses before sending
            return self._unsendable(topic, str(e))
        ok = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)
        if not ok:
            _LOG.debug("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return False
        if token is not None:
            self._tokens[info.mid] = token
            if qos == 0:
                self._qos0.add(info.mid)
        return True

    def _unsendable(self, topic: str, why: str) -> bool:
        self.unsendable += 1
        now = self._clock()
        if now - self._unsendable_logged_at >= REFUSAL_LOG_EVERY_S:
            self._unsendable_logged_at = now
            _LOG.error("cannot publish to %.80r: %s (%d such publishes so far)", topic, why, self.unsendable)
        return False

    @property
    def backlogged(self) -> bool:
        """Bytes wait for the socket: the broker reads slower than we write (the owner stops reading)."""
        return self.client.socket() is not None and self._wants_write()

    @property
    def outstanding(self) -> int:
        """Publishes with a token not yet acknowledged (or written to the socket, for QoS 0)."""
        return len(self._tokens) + len(self._unwritten)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (written at the next flush, in the order of the calls).

        QoS 1: a PUBACK.  QoS 2 (a subscription some older setup left in the session): paho's PUBCOMP,
        never a PUBACK, which the broker would take as a protocol error.  Only while connected: between
        a lost connection and the next CONNACK, paho may already have a new socket, and a PUBACK of the
        old connection's packet id written there would belong to a session that may have given the id to
        another message.  A broker that kept the session sends the message again.
        """
        if qos > 0 and self._connected:
            w = self._buffer()
            if qos == 1 and w is not None:
                w.send(b"\x40\x02" + mid.to_bytes(2, "big"))  # PUBACK: straight to the write buffer
            else:
                self.client.ack(mid, qos)
                if w is not None:
                    self.client.loop_write()  # paho's packet into the write buffer now, behind earlier acks

    def close(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (when connected), flush, disconnect."""
        self._ready = False
        self._closing = True
        c = self.client
        if self._connected:
            info = c.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            deadline = self._clock() + timeout
            while not info.is_published() and self._connected and self._clock() < deadline:
                self.poll(0.05)
            if not info.is_published():
                _LOG.warning("could not publish the offline status within %.1f s", timeout)
        c.disconnect()
        self.flush()
        sock = c.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._set_connected(False)

    # -- paho callbacks (inside poll) -----------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self.on_connection(connected)

    def _on_socket_open(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as e:
            _LOG.debug("cannot set TCP_NODELAY: %s", e)
        # paho keeps the socket in ``_sock`` (2.x) and uses only recv, send, close and fileno on it.
        self._wrapped = BufferedSocket(sock)
        client._sock = self._wrapped

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._tcp_since = None
        limit = getattr(properties, "MaximumPacketSize", None)
        self.max_packet = int(limit) if limit else None
        if reason_code.is_failure:
            self.last_error = describe_connack(reason_code)
            _LOG.error("MQTT broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, self.last_error)
            self._retry_after_delay(self._clock())  # refused again and again: back off
            self._set_connected(False)
            return
        self.last_error = ""
        self.connects += 1
        self._connected_at = self._clock()
        _LOG.info("MQTT connected to %s:%d as %s (session present: %s)",
                  self.cfg.host, self.cfg.port, self.cfg.client_id, flags.session_present)  # fmt: skip
        if self.connects > 1 and not flags.session_present:
            _LOG.warning("MQTT broker kept no session for client id %r: readings it held for the daemon while it "
                         "was away are gone (broker restarted without persistence, session expired, or another "
                         "client connected with this id and a clean session)", self.cfg.client_id)  # fmt: skip
        if self.subscriptions:
            client.subscribe([(f, SUBSCRIBE_QOS) for f in self.subscriptions])
        if self._ready:
            client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._set_connected(True)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was = self._connected
        self._tcp_since = None
        w = self._wrapped
        if w is not None and self._unwritten:
            with contextlib.suppress(OSError, ValueError):
                w.flush_out()  # paho may report the disconnect before it closes the socket
            self._report_written(w, ended=True)
        now = self._clock()
        if was and now - self._connected_at >= TAKEOVER_HINT_S:
            self._delay = float(self.cfg.reconnect_min_s)  # the connection held: the backoff starts over
        # A connection that was up doubles the delay after this attempt: lost again soon after connecting (a
        # client taking the id over, a packet refused), the backoff keeps growing.
        self._retry_after_delay(now, grow=was)
        self._set_connected(False)
        err = self._wrapped.error if self._wrapped is not None else None
        if err is not None:
            self._wrapped.error = None  # type: ignore[union-attr]
            self.last_error = describe_connect_error(err)
            _LOG.warning("MQTT connection to %s:%d ended: %s [%s]; retrying",
                         self.cfg.host, self.cfg.port, self.last_error, err)  # fmt: skip
            return
        if was and not self._closing:
            if reason_code.is_failure:
                lasted = self._clock() - self._connected_at
                hint = ""
                if lasted < TAKEOVER_HINT_S:
                    # Brokers close the older of two connections with one client id, often without a reason.
                    hint = (f" {lasted:.1f} s after connecting: if this repeats, another client may be using "
                            f"client id {self.cfg.client_id!r}, or the broker refuses a packet the daemon sends "
                            "(over its max_packet_size or message_size_limit)")  # fmt: skip
                _LOG.warning("MQTT connection lost (%s)%s; reconnecting", reason_code, hint)
            else:
                _LOG.info("MQTT disconnected")

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        for topic, rc in zip(self.subscriptions, reason_codes, strict=False):
            if rc.is_failure:
                _LOG.error("MQTT subscription to %r refused by the broker: %s", topic, rc)
            else:
                _LOG.info("subscribed to %r (QoS %d)", topic, rc.value)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason_code: ReasonCode, _properties: Properties | None
    ) -> None:
        token = self._tokens.pop(mid, None)
        if mid in self._qos0:  # QoS 0, now in the write buffer: published once the socket takes it
            self._qos0.discard(mid)
            w = self._buffer()
            if token is not None and w is not None:
                self._unwritten.append((w.taken, token))
                return
        # MQTT 5 brokers say in the PUBACK when they refuse a publish (e.g. 0x87 Not authorized by an ACL);
        # MQTT 3.1.1 brokers drop it silently.
        ok = not reason_code.is_failure
        if token is not None:
            self.on_published(token, ok)
        if ok:
            return
        self.publish_refusals += 1
        now = self._clock()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
            self._refusal_logged_at = now
            _LOG.error(
                "MQTT broker refused a publish: %s (%d refused so far; check the broker's ACL for the output "
                "and status topics of user %r)",
                reason_code,
                self.publish_refusals,
                self.cfg.username or "anonymous",
            )

    def _lean_message(self, topic: bytes, payload: bytes, mid: int, qos: int, dup: bool, retain: bool) -> None:
        try:
            name: str | None = topic.decode()
        except UnicodeDecodeError:  # not valid UTF-8: no filter can match it
            name = None
        self.on_message(Inbound(name, payload, mid, qos, dup, retain, self._clock()))

    def _acked(self, mid: int) -> None:
        token = self._tokens.pop(mid, None)
        if token is not None:
            self.on_published(token, True)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic: str | None = msg.topic
        except UnicodeDecodeError:  # not valid UTF-8: no filter can match it
            topic = None
        self.on_message(Inbound(topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.dup), bool(msg.retain),
                                self._clock()))  # fmt: skip


def publish_packet_size(topic: str, payload: bytes, qos: int) -> int:
    """Bytes of an MQTT 5 PUBLISH without properties: fixed header, topic, packet id (QoS > 0), payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + 1 + len(payload)
    return 1 + (1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4) + remaining


def filter_pattern(topic_filter: str) -> re.Pattern[str]:
    """A regular expression that fully matches the topics an MQTT filter matches.

    ``+`` is one level (possibly empty), a final ``#`` any number of levels
    (``a/#`` matches ``a`` too); a filter starting with a wildcard does not
    match topics starting with ``$`` (MQTT 3.1.1 section 4.7.2).
    """
    levels = topic_filter.split("/")
    out = r"(?!\$)" if levels[0] in ("+", "#") else ""
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            out += f"(?:{sep}.*)?" if i else ".*"
            break
        out += sep + ("[^/]*" if level == "+" else re.escape(level))
    return re.compile(out, re.DOTALL)


def describe_connack(reason_code: ReasonCode) -> str:
    """A CONNACK failure in words an operator can act on."""
    name = str(reason_code)
    hints = {
        "Bad user name or password": "check mqtt.username and the password",
        "Not authorized": "the broker does not allow this user, password or client id",
        "Client identifier not valid": "the broker rejects mqtt.client_id",
        "Unsupported protocol version": 'try mqtt.protocol = "3.1.1"',
        "Server unavailable": "the broker is not accepting connections",
    }
    for key, hint in hints.items():
        if key.lower() in name.lower():
            return f"{name} ({hint})"
    return name


def describe_connect_error(err: BaseException) -> str:
    """A failed connection attempt (socket or TLS error) in words an operator can act on."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate was not accepted: {err.verify_message or err.reason} "
            "(check mqtt.ca_file and that the broker's certificate is current and names this host)"
        )
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or err).lower()
        if "certificate" in reason or "unknown ca" in reason or "alert" in reason:
            return (
                f"TLS: the broker refused the handshake ({err.reason or err}): check mqtt.cert_file and "
                "mqtt.key_file (client certificate signed by a CA the broker trusts, and not expired)"
            )
        return f"TLS handshake failed: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name: {err.strerror or err}"
    if isinstance(err, TimeoutError):
        return "connection timed out"
    return f"not reachable: {getattr(err, 'strerror', None) or err}"
