"""The lean hot path of the MQTT link against paho's own reader and writer, byte for byte, without a broker.

The same packets, cut into reads at arbitrary places, go into a link on paho's plain client and one on
:class:`LeanClient`; what each link reports to its owner must be the same.  The broker-facing behaviour
(sessions, refusals, reconnects) is tested against a real Mosquitto in tests/test_mqtt.py.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_lstm import mqtt
from edge_lstm.config import MqttConfig, MqttProtocol
from edge_lstm.mqtt import BufferedSocket, Inbound, LeanClient, MqttLink


class FakeSock:
    """A non-blocking socket: ``recv`` hands out the given chunks, then has nothing; ``send`` records."""

    def __init__(self, chunks: list[bytes] | None = None, take: int | None = None) -> None:
        self.chunks = list(chunks or [])
        self.sends: list[bytes] = []
        self.take = take  # bytes one send accepts (None: all)
        self.closed = False

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            self.chunks.insert(0, chunk[n:])
            chunk = chunk[:n]
        return chunk

    def send(self, data: bytes | bytearray) -> int:
        if self.take == 0:
            raise BlockingIOError  # full: a non-blocking socket takes nothing
        n = len(data) if self.take is None else min(self.take, len(data))
        self.sends.append(bytes(data[:n]))
        return n

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:
        return -1


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(
    topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool, props: bytes | None
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if props is not None:  # MQTT 5: the properties' length, then the properties
        body += varint(len(props)) + props
    body += payload
    return bytes([0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)]) + varint(len(body)) + body


def make_link(protocol: MqttProtocol, lean: bool, monkeypatch: pytest.MonkeyPatch) -> MqttLink:
    monkeypatch.setattr(mqtt, "lean_supported", lambda: lean)
    link = MqttLink(MqttConfig(client_id="lean-test", protocol=protocol), "t/status")
    assert isinstance(link.client, LeanClient) == lean
    return link


def read_all(link: MqttLink, chunks: list[bytes]) -> list[tuple[object, ...]]:
    got: list[Inbound] = []
    link.on_message = got.append
    sock = BufferedSocket(FakeSock(chunks))
    link.client._sock = sock  # type: ignore[attr-defined]
    for _ in range(10_000):
        before = len(got)
        link._read(4096)
        if not sock._sock.chunks and sock.pending() == 0 and len(got) == before:
            break
    return [(m.topic, m.payload, m.mid, m.qos, m.dup, m.retain) for m in got]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


_props = Properties(PacketTypes.PUBLISH)
_props.UserProperty = ("site", "kitchen")
_props.MessageExpiryInterval = 60
PROPS = _props.pack()[1:]  # without paho's own length byte (fewer than 128 bytes)

_message = st.tuples(
    st.one_of(st.text(min_size=1, max_size=40).map(str.encode), st.binary(min_size=1, max_size=8)),  # not always UTF-8
    st.one_of(st.binary(max_size=64), st.binary(min_size=120, max_size=20_000)),  # 1- to 3-byte lengths
    st.sampled_from([0, 1]),
    st.integers(1, 65535),
    st.booleans(),
    st.booleans(),
    st.booleans(),  # MQTT 5 only: with properties (paho's path)
)


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=12), points=st.lists(st.integers(0, 10**6), max_size=8))
def test_lean_reader_reports_what_pahos_reader_reports(
    protocol: MqttProtocol, messages: list[tuple[bytes, bytes, int, int, bool, bool, bool]], points: list[int]
) -> None:
    v5 = protocol is MqttProtocol.V5
    data = b"".join(
        publish_packet(t, p, q, m, d, r, (PROPS if props else b"") if v5 else None)
        for t, p, q, m, d, r, props in messages
    )
    with pytest.MonkeyPatch.context() as mp:
        want = read_all(make_link(protocol, False, mp), cut(data, points))
        lean_link = make_link(protocol, True, mp)
        got = read_all(lean_link, cut(data, points))
    assert got == want
    assert len(got) == len(messages)
    assert [(m[0], m[1]) for m in got] == [
        (t.decode() if t.decode(errors="replace") == t.decode(errors="ignore") else None, p) for t, p, *_ in messages
    ]
    if not points:  # whole packets in one read: the lean path takes every one without properties
        lean = sum(1 for *_, props in messages if not (v5 and props))
        assert lean_link.client.lean_packets == lean  # type: ignore[attr-defined]


def test_malformed_and_foreign_packets_take_pahos_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty topic before MQTT 5 is malformed (paho drops the connection); a PINGRESP is paho's to handle."""
    link = make_link(MqttProtocol.V311, True, monkeypatch)
    lost: list[bool] = []
    link.on_connection = lost.append
    link._connected = True
    good = publish_packet(b"a/b", b"1", 1, 7, False, False, None)
    pingresp = b"\xd0\x00"
    assert read_all(link, [good + pingresp + good]) == [("a/b", b"1", 7, 1, False, False)] * 2
    assert read_all(link, [publish_packet(b"", b"1", 1, 8, False, False, None)]) == []
    assert link.client.socket() is None  # paho closed it: a protocol error
    assert lost == [False]


def acked_link(protocol: MqttProtocol, lean: bool, mp: pytest.MonkeyPatch, inflight: int) -> tuple[MqttLink, FakeSock]:
    link = make_link(protocol, lean, mp)
    link.client.max_inflight_messages_set(inflight)
    fake = FakeSock()
    link._wrapped = BufferedSocket(fake)
    link.client._sock = link._wrapped  # type: ignore[attr-defined]
    link.client._state = mqtt.paho._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
    link._connected = True
    return link, fake


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
@pytest.mark.parametrize("inflight", [2, 1000])
def test_lean_acknowledgements_match_pahos(protocol: MqttProtocol, inflight: int) -> None:
    """Tokens come back once per PUBACK, refusals (MQTT 5) as failures; publishes held behind the in-flight
    limit go out as slots free up; and what the link writes is the same bytes as paho's own client writes."""
    v5 = protocol is MqttProtocol.V5
    results = []
    for lean in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            link, fake = acked_link(protocol, lean, mp, inflight)
            done: list[tuple[object, bool]] = []
            link.on_published = lambda token, ok: done.append((token, ok))  # noqa: B023
            mids = []
            for i in range(6):
                assert link.publish(f"out/{i}", b"x" * i, token=i)
                mids.append(link.client._out_messages and max(link.client._out_messages))  # type: ignore[attr-defined]
            link.flush()
            first = b"".join(fake.sends)
            acks = b"".join(
                b"\x40\x03" + struct.pack("!HB", mid, 0x87 if (v5 and i == 2) else 0x10 if (v5 and i == 3) else 0)
                if v5 and i in (2, 3) else b"\x40\x02" + struct.pack("!H", mid)
                for i, mid in enumerate(mids)
            )  # fmt: skip
            link.client._sock._sock.chunks = [acks[:5], acks[5:]]  # type: ignore[attr-defined]
            for _ in range(10):
                link._read(4096)
            link.flush()
            results.append((first, b"".join(fake.sends), done, link.outstanding, link.client._inflight_messages))  # type: ignore[attr-defined]
    assert results[0] == results[1]
    first, sent, done, outstanding, in_flight = results[1]
    assert [t for t, _ in done] == list(range(6)) and outstanding == 0 and in_flight == 0
    assert [ok for _, ok in done] == [True, True, not v5, True, True, True]
    assert sent.count(b"out/") == 6 and first.count(b"out/") == min(inflight, 6)


def test_one_send_per_flush_and_acknowledgements_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    link, fake = acked_link(MqttProtocol.V5, True, monkeypatch, 1000)
    for mid in (5, 3, 9):
        link.ack(mid, 1)
    for i in range(10):
        link.publish(f"out/{i}", b"forecast", token=i)
    link.flush()
    assert len(fake.sends) == 1  # 3 acknowledgements and 10 publishes: one system call
    assert fake.sends[0].startswith(b"\x40\x02\x00\x05\x40\x02\x00\x03\x40\x02\x00\x09")
    assert fake.sends[0].count(b"out/") == 10
    # a socket that takes a little at a time keeps the rest for later, and says so
    fake.take = 7
    link.publish("out/x", b"y" * 100)
    link.flush()
    assert link.backlogged
    while link.backlogged:
        link.flush()
    assert b"".join(fake.sends[1:]).endswith(b"y" * 100)


def test_no_acknowledgement_is_written_while_no_connection_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a lost connection and the next CONNACK paho may already hold a new socket: a PUBACK of the
    old connection's packet id must not be written there."""
    link, fake = acked_link(MqttProtocol.V5, True, monkeypatch, 1000)
    link._connected = False
    link.ack(5, 1)
    link.flush()
    assert fake.sends == []
    link._connected = True  # as after a CONNACK
    link.ack(6, 1)
    link.ack(7, 0)  # QoS 0 has no acknowledgement
    link.flush()
    assert fake.sends == [b"\x40\x02\x00\x06"]


@pytest.mark.parametrize(
    ("protocol", "puback"),
    [
        (MqttProtocol.V311, b"\x40\x03\x00\x01\x00"),  # 3.1.1 has no reason code: malformed
        (MqttProtocol.V5, b"\x40\x03\x00\x01\x05"),  # no such reason code
        (MqttProtocol.V5, b"\x40\x03\x00\x01\x87"),  # refused: not authorized
        (MqttProtocol.V5, b"\x40\x04\x00\x01\x00\x00"),  # success with an (empty) property block
        (MqttProtocol.V5, b"\x40\x03\x00\x01\x10"),  # no matching subscribers: a success
        (MqttProtocol.V311, b"\x40\x02\x00\x01"),
    ],
)
def test_odd_pubacks_end_as_pahos_do(protocol: MqttProtocol, puback: bytes) -> None:
    """A PUBACK the lean path does not take goes to paho: a malformed one drops the connection there (the
    forecast goes out again after the reconnect) instead of counting as published."""
    outcomes = []
    for lean in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            link, _fake = acked_link(protocol, lean, mp, 1000)
            done: list[tuple[object, bool]] = []
            link.on_published = lambda token, ok: done.append((token, ok))  # noqa: B023
            assert link.publish("out/a", b"1", token="t")
            link.client._sock._sock.chunks = [puback]  # type: ignore[attr-defined]
            link._read(10)
            outcomes.append((done, link.client.socket() is None, link.outstanding))
    assert outcomes[0] == outcomes[1]


def test_a_qos2_message_is_completed_not_acknowledged_as_qos1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session can hold a QoS 2 subscription an older setup left: its messages end with PUBCOMP (paho's
    flow), never with a PUBACK, which the broker would take as a protocol error."""
    link, fake = acked_link(MqttProtocol.V5, True, monkeypatch, 1000)
    link.ack(9, 2)
    link.ack(10, 1)
    link.flush()
    sent = b"".join(fake.sends)
    assert b"\x40\x02\x00\x09" not in sent
    assert sent.startswith(b"\x70\x02\x00\x09") and sent.endswith(b"\x40\x02\x00\x0a")


def test_a_qos0_forecast_counts_as_published_once_the_socket_took_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """QoS 0 has no acknowledgement: published means written to the socket. Forecasts still in the write
    buffer when the connection ends count as failures, not as published."""
    link, fake = acked_link(MqttProtocol.V5, True, monkeypatch, 1000)
    done: list[tuple[object, bool]] = []
    link.on_published = lambda token, ok: done.append((token, ok))
    fake.take = 0  # the socket is full
    for i in range(3):
        assert link.publish(f"out/{i}", b"forecast", qos=0, token=i)
    link.flush()
    assert done == [] and link.outstanding == 3 and link.backlogged
    fake.take = 30  # room for about one packet
    link.flush()
    assert done == [(0, True)] and link.outstanding == 2
    fake.take = None
    link.flush()
    assert done == [(0, True), (1, True), (2, True)] and link.outstanding == 0
    fake.take = 0
    for i in (3, 4):
        assert link.publish(f"out/{i}", b"forecast", qos=0, token=i)
    link.flush()
    link.client._loop_rc_handle(mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST)  # type: ignore[attr-defined]
    assert done[3:] == [(3, False), (4, False)] and link.outstanding == 0
