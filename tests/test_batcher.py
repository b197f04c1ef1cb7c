"""Batcher: drop-oldest bound, batches in arrival order, order per stream, threads."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_lstm.batcher import Batcher
from edge_lstm.payload import Reading


def rd(stream: str, seq: int) -> Reading:
    return Reading(stream, (float(seq),), float(seq), 0.0)


def seqs(batch: list[Reading]) -> list[tuple[str, int]]:
    return [(r.stream, int(r.values[0])) for r in batch]


def test_full_queue_drops_the_oldest_and_counts() -> None:
    b = Batcher(max_queue=3)
    assert [b.put(rd("s", i)) for i in range(5)] == [0, 0, 0, 1, 1]
    assert b.dropped == 2 and len(b) == 3
    assert seqs(b.drain()) == [("s", 2), ("s", 3), ("s", 4)]


def test_put_many_drops_oldest_first() -> None:
    b = Batcher(max_queue=4)
    b.put_many([rd("a", 0), rd("b", 1)])
    assert b.put_many([rd(str(i), i) for i in range(2, 5)]) == 1
    assert b.put_many([rd("x", i) for i in range(10, 16)]) == 6
    assert b.dropped == 7
    assert seqs(b.drain()) == [("x", 12), ("x", 13), ("x", 14), ("x", 15)]
    assert b.put_many([]) == 0


def test_batches_are_the_oldest_readings_in_arrival_order() -> None:
    b = Batcher(max_queue=100)
    b.put_many([rd("a", 0), rd("b", 1), rd("a", 2), rd("c", 3), rd("a", 4), rd("b", 5)])
    assert seqs(b.take_batch(4, 0)) == [("a", 0), ("b", 1), ("a", 2), ("c", 3)]
    b.put(rd("a", 6))
    assert seqs(b.take_batch(10, 0)) == [("a", 4), ("b", 5), ("a", 6)]
    assert b.take_batch(10, 0) == []


def test_max_batch_limits_the_batch() -> None:
    b = Batcher(max_queue=100)
    b.put_many([rd(str(i), i) for i in range(10)])
    assert [r.stream for r in b.take_batch(4, 0)] == ["0", "1", "2", "3"]
    assert len(b) == 6


def test_one_flooding_stream_is_handed_out_in_order() -> None:
    b = Batcher(max_queue=10_000)
    b.put_many([rd("flood", i) for i in range(5_000)] + [rd("other", 0)])
    assert seqs(b.take_batch(10, 0)) == [("flood", i) for i in range(10)]
    assert len(b) == 4_991
    assert seqs(b.drain()[-2:]) == [("flood", 4_999), ("other", 0)]


def test_timeout_returns_an_empty_batch() -> None:
    assert Batcher(max_queue=10).take_batch(5, 0.01) == []


def test_a_waiting_taker_is_woken_by_put_and_by_close() -> None:
    b = Batcher(max_queue=10)
    got: list[list[Reading]] = []
    taker = threading.Thread(target=lambda: got.append(b.take_batch(5, 60.0)))
    taker.start()
    b.put(rd("s", 1))
    taker.join(10)
    assert not taker.is_alive() and seqs(got[0]) == [("s", 1)]
    taker = threading.Thread(target=lambda: got.append(b.take_batch(5, 60.0)))
    taker.start()
    b.close()
    taker.join(10)
    assert not taker.is_alive() and got[1] == [] and b.closed


def arrived_now(stream: str, seq: int) -> Reading:
    return Reading(stream, (float(seq),), float(seq), time.monotonic())


def test_linger_waits_for_a_full_batch_and_is_woken_when_it_fills() -> None:
    b = Batcher(max_queue=10)
    b.put(arrived_now("a", 0))
    got: list[list[Reading]] = []
    taker = threading.Thread(target=lambda: got.append(b.take_batch(3, 1.0, linger_s=60.0)))
    taker.start()
    b.put(arrived_now("b", 1))  # not enough: the taker keeps waiting
    time.sleep(0.05)
    assert taker.is_alive()
    b.put(arrived_now("c", 2))  # the third reading fills the batch and wakes it
    taker.join(10)
    assert not taker.is_alive() and seqs(got[0]) == [("a", 0), ("b", 1), ("c", 2)]


def test_linger_ends_when_the_oldest_reading_is_old_enough_or_on_close() -> None:
    b = Batcher(max_queue=10)
    b.put(arrived_now("a", 0))
    assert seqs(b.take_batch(5, 1.0, linger_s=0.02)) == [("a", 0)]  # no more came: the one reading
    b.put(Reading("old", (1.0,), 1.0, time.monotonic() - 60.0))  # already older than the linger
    assert seqs(b.take_batch(5, 1.0, linger_s=1.0)) == [("old", 1)]
    b.put(arrived_now("a", 2))
    got: list[list[Reading]] = []
    taker = threading.Thread(target=lambda: got.append(b.take_batch(5, 1.0, linger_s=60.0)))
    taker.start()
    time.sleep(0.05)
    b.close()
    taker.join(10)
    assert not taker.is_alive() and seqs(got[0]) == [("a", 2)]


def test_close_still_hands_out_what_is_queued() -> None:
    b = Batcher(max_queue=10)
    b.put_many([rd("a", 0), rd("a", 1)])
    b.close()
    assert seqs(b.take_batch(1, 1.0)) == [("a", 0)]
    assert seqs(b.take_batch(5, 1.0)) == [("a", 1)]
    assert b.take_batch(5, 1.0) == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Batcher(max_queue=0)
    with pytest.raises(ValueError):
        Batcher(max_queue=1).take_batch(0, 0)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(st.sampled_from("abcde"), min_size=1, max_size=6)),
        st.tuples(st.just("take"), st.integers(1, 6)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_ops, st.integers(1, 8))
def test_properties_against_a_reference_queue(ops: list[tuple[str, object]], cap: int) -> None:
    b = Batcher(max_queue=cap)
    model: list[Reading] = []  # what should be queued, in order
    seq = 0
    dropped = 0
    taken: list[Reading] = []
    for op, arg in ops:
        if op == "put":
            items = []
            for s in arg:  # type: ignore[union-attr]
                items.append(rd(s, seq))
                seq += 1
            d = b.put(items[0]) if len(items) == 1 else b.put_many(items)
            model.extend(items)
            over = max(0, len(model) - cap)
            assert d == over  # exactly the overflow, oldest first
            dropped += over
            del model[:over]
        else:
            batch = b.take_batch(arg, 0)  # type: ignore[arg-type]
            # the oldest min(arg, queued) readings, in order
            want = model[: arg]  # type: ignore[misc]
            assert [id(r) for r in batch] == [id(r) for r in want]
            del model[: len(batch)]
            taken.extend(batch)
        assert len(b) == len(model) <= cap
    assert b.dropped == dropped
    assert seqs(b.drain()) == seqs(model)
    assert len(taken) + dropped + len(model) == seq


def test_threads_conserve_readings_and_per_stream_order() -> None:
    b = Batcher(max_queue=500)
    n_producers, per_producer = 4, 3_000
    done = threading.Event()
    taken: list[Reading] = []

    def produce(p: int) -> None:
        for i in range(per_producer):
            b.put(rd(f"p{p}-{i % 7}", i))

    def consume() -> None:
        while True:
            batch = b.take_batch(64, 0.05)
            taken.extend(batch)
            if not batch and done.is_set():
                return

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    consumer.join(30)
    assert not consumer.is_alive()
    assert len(taken) + b.dropped == n_producers * per_producer
    last: dict[str, int] = {}
    for r in taken:
        assert last.get(r.stream, -1) < r.values[0]
        last[r.stream] = int(r.values[0])
