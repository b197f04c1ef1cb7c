"""The load harness's hand-built MQTT packets (bench/wire.py): encoding, splitting a stream, parsing.

The live side (a real broker accepting the generator's packets and the receiver parsing the
broker's) is exercised by tests/test_bench_smoke.py.
"""

from __future__ import annotations

import pytest

from bench.wire import PUBLISH, packet, publish_fields, publish_packet, split, varint


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_matches_the_mqtt_specification_table(n: int, encoded: bytes) -> None:
    assert varint(n) == encoded


def test_split_returns_only_whole_packets_wherever_the_stream_is_cut() -> None:
    bodies = [b"", b"\x00\x01", b"x" * 127, b"y" * 128, b"z" * 20_000]
    stream = b"".join(packet(0x40 + i, body) for i, body in enumerate(bodies))
    ends = []
    pos = 0
    for body in bodies:
        pos += 1 + len(varint(len(body))) + len(body)
        ends.append(pos)
    for cut in range(0, len(stream) + 1, 7):
        found, used = split(stream[:cut])
        whole = [e for e in ends if e <= cut]
        assert used == (whole[-1] if whole else 0)
        assert [stream[s:e] for _f, s, e in found] == bodies[: len(whole)]
        assert [f for f, _s, _e in found] == [0x40 + i for i in range(len(whole))]


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_round_trip(v5: bool, qos: int) -> None:
    pid = 0xBEEF if qos else 0
    body = b'{"ts":1704067200,"value":30000.0}' * 10  # remaining length over 127: two length bytes
    data = publish_packet(b"sensors/p-7/value", body, qos, pid, v5)
    (found,), used = split(data)
    assert used == len(data)
    first, start, end = found
    assert first == PUBLISH | qos << 1
    assert publish_fields(data, first, start, end, v5) == (b"sensors/p-7/value", body, pid)


def test_publish_fields_skips_mqtt5_properties() -> None:
    props = b"\x01\x01" + b"\x03" + b"\x00\x10application/json"  # payload format, content type
    head = b"\x00\x0bforecasts/a" + b"\x00\x2a" + varint(len(props)) + props
    data = packet(PUBLISH | 0x02, head + b"{}")
    (found,), _used = split(data)
    assert publish_fields(data, *found, v5=True) == (b"forecasts/a", b"{}", 42)
