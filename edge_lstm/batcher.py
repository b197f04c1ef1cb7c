"""Bounded intake queue between the MQTT thread and the worker, and batch forming (pure).

The MQTT thread :meth:`~Batcher.put` s readings; the worker calls
:meth:`~Batcher.take_batch`.  The queue holds at most ``max_queue`` readings:
when it is full, the OLDEST reading is dropped to make room (it would be the
stalest forecast anyway) and counted as ``Outcome.QUEUE_FULL``, so memory never
grows without bound.

A batch is the oldest ``max_batch`` readings, in arrival order: O(batch) to
form whatever the mix of streams.  A stream may appear in it more than once
(one stream sending faster than the worker steps, or a backlog after a
pause); the engine then steps through its readings in order, one model step
per repeat (:func:`edge_lstm.engine.Engine.process`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from edge_lstm.payload import Reading

_LOG = logging.getLogger(__name__)


class Batcher:
    """A thread-safe, bounded, drop-oldest queue of readings that hands them out in batches."""

    def __init__(self, max_queue: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = int(max_queue)
        self._clock = clock
        self._queue: deque[Reading] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._wake_at = 1  # put() wakes the taker once this many readings are queued
        self.dropped = 0  # cumulative readings dropped because the queue was full

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, reading: Reading) -> int:
        """Queue one reading; returns how many old readings were dropped to make room (0 or 1)."""
        with self._cond:
            dropped = 0
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                dropped = 1
                self.dropped += 1
            self._queue.append(reading)
            if len(self._queue) >= self._wake_at:
                self._cond.notify()
        return dropped

    def put_many(self, readings: Iterable[Reading]) -> int:
        """Queue several readings in order; returns how many readings were dropped (old ones first)."""
        items = list(readings)
        if not items:
            return 0
        with self._cond:
            q = self._queue
            dropped = 0
            if len(items) > self.max_queue:
                dropped += len(items) - self.max_queue
                items = items[-self.max_queue :]
            over = len(q) + len(items) - self.max_queue
            if over > 0:
                dropped += over
                for _ in range(over):
                    q.popleft()
            q.extend(items)
            self.dropped += dropped
            if len(q) >= self._wake_at:
                self._cond.notify()
        return dropped

    def take_batch(self, max_batch: int, max_wait_s: float, linger_s: float = 0.0) -> list[Reading]:
        """Wait up to ``max_wait_s`` for a first reading, then take up to ``max_batch`` readings.

        With ``linger_s`` > 0 and fewer than ``max_batch`` readings queued, wait
        for more until the oldest queued reading is ``linger_s`` old (by its
        ``received`` time): larger batches for at most that much latency.  The
        batch is in queue (arrival) order.  Returns an empty list on timeout or
        when the batcher is closed and empty.
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        with self._cond:
            q = self._queue
            if not q and not self._closed:
                deadline = self._clock() + max_wait_s
                while not q and not self._closed:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if linger_s > 0 and q and len(q) < max_batch and not self._closed:
                self._linger(max_batch, q[0].received + linger_s)
            if len(q) <= max_batch:
                batch = list(q)
                q.clear()
                return batch
            pop = q.popleft
            return [pop() for _ in range(max_batch)]

    def _linger(self, max_batch: int, deadline: float) -> None:
        """Wait (lock held) until ``max_batch`` readings are queued, the deadline passes or the queue closes."""
        self._wake_at = max_batch
        try:
            while len(self._queue) < max_batch and not self._closed:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        finally:
            self._wake_at = 1

    def drain(self) -> list[Reading]:
        """Remove and return everything queued (at shutdown, to count what was not processed)."""
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            return items

    def close(self) -> None:
        """Wake waiting takers; later takes return what is left, then empty batches at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
