"""From socket to forecast: the path every message takes, and the one loop that drives it.

::

    Loop.run, one thread, one iteration:
      MqttLink.poll            read what arrived -> on_message -> Pipeline.accept
      Pipeline.accept          route -> recognise a redelivery -> decode -> intake queue
      Pipeline.step            a batch from the queue -> Engine.process -> ForecastEncoder -> MqttLink.publish
      MqttLink.poll            the broker's PUBACKs -> on_published -> Pipeline.on_published
      Pipeline.commit          settled messages, in arrival order -> Journal (one fsync) -> MqttLink.ack
      Loop                     checkpoints at quiescent points, model swaps, watchdog, status

**Delivery.** A QoS 1 message is acknowledged to the broker only when its
effect cannot be lost: every forecast made from its readings has been
acknowledged by the broker (QoS 1 output; written to the socket for QoS 0),
and the message is in the journal on disk.  Acknowledgements go out in the
order the messages arrived.  A restart restores the last checkpoint and steps
the journaled messages after it through the same decoder and engine; the
broker delivers every unacknowledged message again, so the restarted state
and every later forecast equal an uninterrupted run's.  A message the broker
delivers again that is already in the state (its acknowledgement was lost) is
recognised by its packet id and content and acknowledged without being
processed twice.  Checkpoints are taken only at a quiescent point (nothing
processed that is not yet journaled), so a checkpoint never holds a reading
the broker could deliver again.

**Backpressure.** Intake stops reading the socket while the intake queue is
full or the broker reads our writes slower than we make them; unacknowledged
input is further bounded by the broker's own in-flight window (which
Mosquitto 2.0.11 does not hold once messages queue up: see
docs/architecture.md).  Nothing sleeps: every wait is the ``select`` in
:meth:`MqttLink.poll`.

**Faults.** An exception while handling one message or one batch is counted
(``internal_error``), logged with its traceback (rate-limited) and the loop
goes on (a batch that fails is stepped again one reading at a time, so only
the reading that fails is lost); the watchdog is pinged only from this loop, after real work or an
idle wait, so a loop that stops turning is restarted by systemd.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import gc
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_lstm import checkpoint as ckpt
from edge_lstm.config import Config, TopicFilter
from edge_lstm.engine import BatchResult, Engine, Forecast
from edge_lstm.forecast import ForecastEncoder
from edge_lstm.homeassistant import Discovery
from edge_lstm.journal import Journal, Record, message_digest
from edge_lstm.metrics import Metrics
from edge_lstm.mqtt import READ_BUDGET, Inbound, MqttLink, filter_pattern
from edge_lstm.outcomes import Outcome
from edge_lstm.payload import PayloadDecoder, PayloadError, Reading
from edge_lstm.runtime import StepModel
from edge_lstm.sdnotify import Notifier
from edge_lstm.state import release_free_memory

_LOG = logging.getLogger(__name__)

CARRY_DIGESTS = 4096  # digests of the latest messages a new journal carries (to recognise their redelivery)
# A redelivery is recognised only for the latest this many QoS 1 messages (all of them carry across a
# restart). Between a message and its redelivery come at most twice the broker's in-flight window (the rest
# of the old connection, then the resent ones): keep that window at most half of this, 2,048 (Mosquitto's
# max_inflight_messages is 20 by default); a message still unacknowledged is recognised however long ago it
# came. The bound is not sent as the MQTT 5 Receive Maximum: Mosquitto 2.0 then takes it as the window (500
# unacknowledged messages sent where its default sends 20), a far larger backlog in the daemon.
REDELIVERY_WINDOW = CARRY_DIGESTS
_U32 = 0xFFFF_FFFF
ERROR_LOG_EVERY_S = 10.0
GATHER_SLICE_S = 0.005  # longest a wait for a shared step goes without reading the socket
IDLE_WAIT_S = 0.5  # longest poll without work (the watchdog and timers run after each)
HA_REANNOUNCE_EVERY_S = 5.0  # Home Assistant's `online` answered at most this often (the rest at the end)
BARRIER_TIMEOUT_S = 5.0  # how long a checkpoint may hold intake back waiting for a quiescent point
STATUS_EVERY_S = 10.0
TRIM_AFTER_IDLE_S = 1.0  # after work and this long without a step, hand the freed heap pages back
TRIM_EVERY_S = 60.0  # but at most this often (a sensor every few seconds must not pay it per reading)
MID_SPACE = 65536
OUTSTANDING_PER_BATCH = 4  # forecasts awaiting the broker's PUBACK: at most this many batches' worth
# A large step (a backlog after a pause) writes its forecasts to the socket this many at a time, so the
# oldest readings, first in the step and the ones that have waited longest, do not also wait for the
# encoding of the rest (about 25 µs a forecast).
FLUSH_EVERY = 16


class _DigestRing:
    """The packet id, QoS and digest of the latest ``size`` messages with their sequence numbers, in a ring
    of int64 (24 bytes a message, where one digest-only :class:`Record` each held ~130 bytes)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the digest ring needs room for at least one message")
        self._size = size
        self._ring = array.array("q", [0]) * (3 * size)
        self._count = 0

    def append(self, seq: int, mid: int, qos: int, digest: int) -> None:
        i = 3 * (self._count % self._size)
        ring = self._ring
        ring[i], ring[i + 1], ring[i + 2] = seq, mid | qos << 16, digest
        self._count += 1

    def records(self) -> list[Record]:
        """Digest-only records, oldest first."""
        ring, n = self._ring, min(self._count, self._size)
        first = self._count - n
        out = []
        for j in range(first, self._count):
            i = 3 * (j % self._size)
            out.append(Record(ring[i], ring[i + 1] & 0xFFFF, ring[i + 1] >> 16, 0.0, "", None, ring[i + 2]))
        return out


@dataclasses.dataclass(slots=True)
class _Message:
    """An accepted message not yet acknowledged: its readings are ``[start, end)`` in intake order."""

    mid: int
    qos: int
    start: int
    end: int
    topic: str
    payload: bytes | None  # None: nothing to journal (rejected, ignored, or already in the state)
    arrival: float  # epoch seconds (the decoder's "now")
    digest: int
    connection: int  # the link's connection it came on (its packet id means nothing on another)


@dataclasses.dataclass(slots=True)
class _Batch:
    """Readings ``[.., end)`` stepped together and how many of their forecasts await the broker."""

    end: int
    outstanding: int = 0


class Pipeline:
    """Decode -> queue -> engine -> encode -> publish -> settle -> journal -> acknowledge, without threads.

    The owner's loop calls :meth:`accept` (from the link's ``on_message``),
    :meth:`step`, :meth:`on_published` (from the link) and :meth:`commit`.
    """

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        decoder: PayloadDecoder,
        encoder: ForecastEncoder,
        link: MqttLink,
        metrics: Metrics,
        journal: Journal,
        *,
        clock: Callable[[], float] = time.time,
        seq: int = 0,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.decoder = decoder
        self.encoder = encoder
        self.link = link
        self.metrics = metrics
        self.journal = journal
        self.clock = clock
        self._ha_announced_at = -HA_REANNOUNCE_EVERY_S  # monotonic time of the last answer to Home Assistant
        self._ha_announce_due: float | None = None
        self.seq = seq  # last journal sequence number used
        self._route = routes_of(cfg)
        self.process_retained = cfg.input.retained == "process"
        self.queue_limit = cfg.engine.queue_size
        self.max_outstanding = OUTSTANDING_PER_BATCH * cfg.engine.max_batch
        self.queue: collections.deque[Reading] = collections.deque()
        # Whether every reading queued since the last step is of one stream, and it has sent twice: the
        # input looks like one stream's run (a single sensor, or its backlog), where a wait for other
        # streams to share the model step gathers none and holds the acknowledgements back (a heuristic;
        # see Loop.run).  Tracked only while the loop may wait (engine.max_wait_ms > 0).
        self._linger = cfg.engine.max_wait_ms / 1000.0
        self._track_repeats = self._linger > 0
        self._run_stream: str | None = None  # the one stream queued since the last step, if only one
        self.mixed = False  # a second stream came since the last step: tracking stops, the wait gathers
        self.repeated = False
        # Whether the latest message with readings came longer than the wait after the one before it: at
        # that rate a wait would most likely gather nothing, and only add its length to the latency.
        self._last_arrival = -math.inf
        self.sparse = True
        self.messages: collections.deque[_Message] = collections.deque()
        self.batches: collections.deque[_Batch] = collections.deque()
        self.enqueued = 0  # readings ever put in the queue
        self.taken = 0  # readings ever taken from it into a batch
        self.settled = 0  # readings whose batches are settled, in order
        self._to_ack: list[_Message] = []  # settled, waiting for the journal's write
        # written to the journal, waiting for its sync: (journal bytes written after them, the messages)
        self._syncing: collections.deque[tuple[int, list[_Message]]] = collections.deque()
        self._window: dict[int, _Message] = {}  # unacknowledged QoS 1 messages by packet id
        self._digest = array.array("I", [0]) * MID_SPACE  # CRC-32 of the last message seen with each packet id
        # ... and when: its number among the QoS 1 messages seen, modulo 2**32 (a redelivery is one of the
        # latest few); "never" lies outside the window
        self._seen_at = array.array("I", [(-REDELIVERY_WINDOW - 1) & _U32]) * MID_SPACE
        self._seen = 0
        self._recent = _DigestRing(CARRY_DIGESTS)
        self._redelivered: set[float] = set()  # arrival times of queued readings of redelivered messages
        self._error_logged_at = -ERROR_LOG_EVERY_S
        self.errors = 0
        self.journal_failing = False  # the last journal write failed (the disk is in trouble)
        self._sync_failures_seen = 0  # the journal's failed syncs already counted in the metrics
        out = cfg.output
        self._out_qos, self._out_retain, self._out_template = out.qos, out.retain, out.topic
        self.discovery: Discovery | None = None
        if cfg.homeassistant.enabled:
            self.discovery = Discovery.from_config(cfg, engine.model.manifest)
            engine.table.evicted_ids = []

    @property
    def ha_status_topic(self) -> str | None:
        """Home Assistant's birth topic, when discovery is on (the daemon subscribes to it)."""
        return self.discovery.ha_status_topic if self.discovery is not None else None

    # -- restart --------------------------------------------------------------------------------

    def replay(self, records: Sequence[Record], after: int) -> int:
        """Rebuild the state from the journal (see :func:`replay_journal`) and learn its packet ids.

        Every record (also those a checkpoint already holds) teaches the
        pipeline its message's packet id, so the broker's redelivery of a
        message whose acknowledgement was lost is recognised.
        """
        for r in records:
            self.seq = max(self.seq, r.seq)
            if r.qos > 0:
                self._remember(r.mid, r.digest)
            self._recent.append(r.seq, r.mid, r.qos, r.digest)
        return replay_journal(records, after, self.engine, self.decoder, self._route)

    def _remember(self, mid: int, digest: int) -> None:
        self._digest[mid] = digest
        self._seen += 1
        self._seen_at[mid] = self._seen & _U32

    def _seen_lately(self, mid: int, digest: int) -> bool:
        """Whether a message with this packet id and digest is among the latest ``REDELIVERY_WINDOW`` seen.

        Only those can come back as redeliveries (the broker sends no more than its in-flight window
        ahead of our acknowledgements); an older message with the same id and content (a bare reading
        repeated, ids wrapped after 65,535 messages) is another message, which must be processed.
        """
        if self._digest[mid] != digest:
            return False
        if (self._seen - self._seen_at[mid]) & _U32 < REDELIVERY_WINDOW:
            return True
        first = self._window.get(mid)  # still unacknowledged here, however long ago it came: the same message
        return first is not None and first.digest == digest

    # -- intake (inside MqttLink.poll) ----------------------------------------------------------

    def accept(self, m: Inbound) -> None:
        """Take one message in; it ends in the queue or in exactly one counted outcome."""
        metrics = self.metrics
        topic = m.topic if m.topic is not None else ""
        digest = message_digest(topic, m.payload) if m.qos > 0 else 0
        if m.dup and m.qos > 0 and self._seen_lately(m.mid, digest):
            # Delivered again: after a reconnect, the broker resends what it has no PUBACK for.
            metrics.messages_redelivered.inc()
            first = self._window.get(m.mid)
            if first is None:  # already in the state: acknowledge it again, in order
                self._hold(m.mid, m.qos, self.enqueued, topic, None, 0.0, digest)
            else:  # the first copy is still on its way: its acknowledgement covers both, on this connection
                first.connection = self.link.connects
            return
        if self.discovery is not None and m.topic == self.discovery.ha_status_topic:
            if m.payload == b"online":  # Home Assistant (re)started: announce every stream again
                self._ha_online()
            self._hold(m.mid, m.qos, self.enqueued, topic, None, 0.0, digest)
            return
        now = self.clock()
        metrics.mqtt_last_message.set(now)
        start = self.enqueued
        payload: bytes | None = None
        try:
            route = self._route(m.topic)
            if route is None:
                _LOG.debug("message on unexpected topic %r ignored", m.topic)
            elif m.retain and not self.process_retained:
                metrics.received.inc()
                metrics.outcome(Outcome.RETAINED)
            else:
                result = self.decoder.decode(m.payload, route.stream_of(topic), now, m.arrived)
                metrics.received.inc(result.count)
                for outcome in result.rejected:
                    metrics.outcome(outcome)
                if result.readings:
                    if self._track_repeats:
                        self.sparse = m.arrived - self._last_arrival >= self._linger
                        self._last_arrival = m.arrived
                        if not self.repeated and not self.mixed:
                            for r in result.readings:
                                if self._run_stream is None:
                                    self._run_stream = r.stream
                                elif r.stream == self._run_stream:  # the only stream so far, a second time
                                    self.repeated = True
                                    break
                                else:  # streams to share a step: the wait is worth it
                                    self.mixed = True
                                    break
                    self.queue.extend(result.readings)
                    self.enqueued += len(result.readings)
                    if len(self.queue) >= self.queue_limit and not self.starved:
                        self.link.hold = True  # full: read no more until steps make room
                    payload = m.payload
                    if m.dup:  # its forecasts may have gone out before (counted as they are made)
                        self._redelivered.add(m.arrived)
        except PayloadError as e:
            metrics.received.inc()
            metrics.outcome(e.outcome)
            if _LOG.isEnabledFor(logging.DEBUG):
                _LOG.debug("rejected message on %s (%s): %s", topic, e.outcome.value, e)
        except Exception:
            metrics.received.inc()
            metrics.outcome(Outcome.INTERNAL_ERROR)
            self._log_error(f"handling a message on {topic!r}")
        self._hold(m.mid, m.qos, start, topic, payload, now, digest)

    def _hold(
        self, mid: int, qos: int, start: int, topic: str, payload: bytes | None, arrival: float, digest: int
    ) -> None:
        msg = _Message(mid, qos, start, self.enqueued, topic, payload, arrival, digest, self.link.connects)
        self.messages.append(msg)
        if qos > 0:
            self._window[mid] = msg
            self._remember(mid, digest)

    # -- model steps ----------------------------------------------------------------------------

    def step(self, max_batch: int) -> int:
        """Step one batch of queued readings and publish its forecasts; returns the readings taken."""
        q = self.queue
        if not q:
            return 0
        n = min(len(q), max_batch)
        readings = [q.popleft() for _ in range(n)]
        self._run_stream, self.mixed = None, False
        self.repeated = bool(q)  # readings left behind: the loop is behind, no reason to wait for more
        self.taken += n
        batch = _Batch(self.taken)
        self.batches.append(batch)
        try:
            result = self.engine.process(readings)
        except Exception:
            self._log_error(f"stepping a batch of {n} reading(s); stepping them one by one")
            for r in readings:  # only the reading that fails is lost, not its batch
                try:
                    self._publish(self.engine.process([r]), batch)
                except Exception:
                    self.metrics.outcome(Outcome.INTERNAL_ERROR)
                    self._log_error(f"stepping a reading of {r.stream!r}")
        else:
            self._publish(result, batch)
        if not q:
            self._redelivered.clear()  # all of them stepped
        return n

    def _publish(self, result: BatchResult, batch: _Batch) -> None:
        link, encode, template = self.link, self.encoder.encode, self._out_template
        qos, retain = self._out_qos, self._out_retain
        failed = 0
        if self.discovery is not None:
            self._discover(result.forecasts)
        for k, f in enumerate(result.forecasts, 1):
            try:
                payload = encode(f)
            except Exception:
                failed += 1
                self._log_error(f"encoding a forecast of {f.stream!r}")
                continue
            if link.publish(template.replace("{stream}", f.stream), payload, qos, retain, batch):
                batch.outstanding += 1
            else:
                failed += 1
            if k % FLUSH_EVERY == 0:
                link.flush()
        if failed:
            self.metrics.publish_failures.inc(failed)
        if self._redelivered:
            again = sum(f.received in self._redelivered for f in result.forecasts)
            if again:
                self.metrics.forecasts_redelivered.inc(again)
        self.metrics.record_batch(result, time.monotonic(), len(self.engine.table))

    def _discover(self, forecasts: Sequence[Forecast]) -> None:
        """Home Assistant discovery: configs of streams seen for the first time, removal of evicted ones."""
        d = self.discovery
        assert d is not None
        evicted = self.engine.table.evicted_ids
        if evicted:
            self._announce([m for s in evicted for m in d.on_evicted(s)])
            evicted.clear()
        fresh = [f.stream for f in forecasts if f.stream not in d.announced]
        if fresh:
            self._announce(d.on_new_streams(fresh))

    def _announce(self, messages: Sequence[tuple[str, bytes, bool]]) -> None:
        for topic, payload, retain in messages:
            if not self.link.publish(topic, payload, 1, retain):
                self.metrics.publish_failures.inc()

    def _ha_online(self) -> None:
        """Answer Home Assistant's ``online``: at once, or, within ``HA_REANNOUNCE_EVERY_S`` of the last answer,
        once at the end of that time (a burst of ``online``s would otherwise resend every config per message)."""
        now = time.monotonic()
        if now - self._ha_announced_at >= HA_REANNOUNCE_EVERY_S:
            self._ha_answer(now)
        elif self._ha_announce_due is None:
            self._ha_announce_due = self._ha_announced_at + HA_REANNOUNCE_EVERY_S

    def announce_due(self) -> bool:
        """Send the answer to Home Assistant that :meth:`_ha_online` put off, once it is due; True when sent."""
        due, now = self._ha_announce_due, time.monotonic()
        if due is None or now < due:
            return False
        self._ha_announce_due = None
        self._ha_answer(now)
        return True

    def _ha_answer(self, now: float) -> None:
        assert self.discovery is not None
        self._ha_announced_at = now
        self._announce(self.discovery.on_ha_online())

    def on_published(self, token: object, ok: bool) -> None:
        """The broker acknowledged (or refused) one forecast of a batch."""
        assert isinstance(token, _Batch)
        token.outstanding -= 1
        if ok:
            self.metrics.forecasts_published.inc()
        else:
            self.metrics.publish_failures.inc()

    # -- settle, journal, acknowledge -----------------------------------------------------------

    def commit(self) -> int:
        """Write the settled messages to the journal (one group commit); acknowledge, in order, those on disk.

        Returns how many messages were acknowledged (or settled without one, for QoS 0).
        """
        batches = self.batches
        while batches and batches[0].outstanding <= 0:
            self.settled = batches.popleft().end
        messages, to_ack, journal = self.messages, self._to_ack, self.journal
        while messages and messages[0].end <= self.settled:
            m = messages.popleft()
            if m.payload is not None:
                self.seq += 1
                journal.append(Record(self.seq, m.mid, m.qos, m.arrival, m.topic, m.payload, m.digest))
                self._recent.append(self.seq, m.mid, m.qos, m.digest)
            to_ack.append(m)
        if to_ack or journal.needs_rewrite:
            try:
                written = journal.commit()
            except OSError as e:
                self.journal_failing = True
                self.metrics.journal_failures.inc()
                self._log_error(f"writing the journal ({e.strerror or e}); acknowledgements wait", exc=False)
                return 0
            self.journal_failing = False
            if written:
                self.metrics.journal_commits.inc()
                self.metrics.journal_bytes.inc(written)
            if to_ack:
                self._syncing.append((journal.written, to_ack))
                self._to_ack = []
        failed_syncs = journal.sync_failures - self._sync_failures_seen
        if failed_syncs:  # counted once per failed fdatasync, not once per loop iteration while they fail
            self._sync_failures_seen += failed_syncs
            self.metrics.journal_failures.inc(failed_syncs)
            self._log_error(f"syncing the journal ({journal.sync_error}); acknowledgements wait", exc=False)
        # Acknowledge, in order, the groups the disk holds now.  A message that came on an earlier connection
        # is not acknowledged: on this one its packet id may name another message (the broker restarted, or
        # the session is new), and a PUBACK would settle that one unread.  A broker that kept the session
        # sends the message again, and the copy is acknowledged (see accept).
        n = 0
        link, window, synced, syncing = self.link, self._window, journal.synced, self._syncing
        connection = link.connects
        while syncing and syncing[0][0] <= synced:
            for m in syncing.popleft()[1]:
                if m.qos > 0:
                    if m.connection == connection:
                        link.ack(m.mid, m.qos)
                    if window.get(m.mid) is m:
                        del window[m.mid]
                n += 1
        return n

    @property
    def no_wait(self) -> bool:
        """Waiting for other streams to share the next step would gather none: one stream's run, or
        readings further apart than the wait."""
        return self.repeated or self.sparse

    @property
    def starved(self) -> bool:
        """Too many forecasts await the broker: no steps until its PUBACKs are read."""
        return self.link.outstanding >= self.max_outstanding

    @property
    def quiescent(self) -> bool:
        """Nothing stepped that is not yet journaled: the state equals checkpoint + journal."""
        if self.batches or self._to_ack or self._syncing or self.journal.pending:
            return False
        return not self.messages or self.messages[0].start >= self.taken

    def partial(self) -> int:
        """Readings still queued of the message that has readings both stepped and queued (0: none)."""
        for m in reversed(self.messages):
            if m.start < self.taken:
                return max(0, m.end - self.taken)
        return 0

    @property
    def unacknowledged(self) -> int:
        return len(self.messages) + len(self._to_ack) + sum(len(g) for _, g in self._syncing)

    def carry(self) -> list[Record]:
        """Digests of the latest messages, for a new journal after a checkpoint."""
        return self._recent.records()

    def leave_queued(self) -> int:
        """Stop: the readings still queued stay with the broker (their messages are not acknowledged)."""
        n = len(self.queue)
        if n:
            self.metrics.outcome(Outcome.SHUTDOWN, n)
            self.queue.clear()
        return n

    def _log_error(self, what: str, *, exc: bool = True) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            self._error_logged_at = now
            _LOG.error("error while %s (%d so far); the daemon goes on", what, self.errors, exc_info=exc)


def settle_heap() -> None:
    """Collect every generation, then move what survives out of the collector's sight (``gc.freeze``).

    Python's cyclic collector runs a full collection once enough objects have
    survived into its oldest generation, and a full collection scans every
    container alive: the modules, the model, the configuration (some 33,000
    objects).  Meanwhile no reading moves: at 1,000 readings/s on one stream
    the loop paused for four of them in 70 s, 22-36 ms each, on the benchmark
    machine.  Frozen objects are not scanned; the collections while serving then
    see only what was made since (none took over 3 ms in the same test).  The
    loop settles the heap when it starts and, with the idle trim, when it has
    been idle after work: each time it first unfreezes, so cycles among the
    frozen objects (a replaced model's, say) are still collected, in a moment
    when nothing waits.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Loop:
    """The one loop: network I/O, model steps, acknowledgements, checkpoints and the watchdog.

    Runs on one thread (:meth:`run`); other threads only :meth:`request_stop`,
    :meth:`request_checkpoint` and :meth:`offer_model`, which wake it.
    """

    def __init__(
        self,
        cfg: Config,
        pipeline: Pipeline,
        link: MqttLink,
        metrics: Metrics,
        notifier: Notifier,
        *,
        on_model_swapped: Callable[[StepModel, bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.link = link
        self.metrics = metrics
        self.notifier = notifier
        self.on_model_swapped = on_model_swapped
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = False
        self._ready_requested = False
        self._pending_model: StepModel | None = None
        self._checkpoint_due = time.monotonic() + cfg.state.checkpoint_interval_s
        self._barrier_since: float | None = None
        self._force_checkpoint = False
        self._journal_reopened = 0
        self._last_watchdog = 0.0
        self._status_at = time.monotonic()
        self._status_count = 0
        self._last_step = 0.0
        self._worked = False  # readings stepped since the last trim
        self._trimmed_at = -TRIM_EVERY_S
        self.fingerprint = pipeline.engine.model.manifest.sha256

    # -- requests from other threads ------------------------------------------------------------

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer means it is awake already; or it is closing
            self._wake_w.send(b"\0")

    def request_stop(self) -> None:
        self._stop = True
        self.wake()

    def request_ready(self) -> None:
        """Publish ``online`` now and after every reconnect (the daemon is ready)."""
        self._ready_requested = True
        self.wake()

    def request_checkpoint(self) -> None:
        self._force_checkpoint = True
        self.wake()

    def offer_model(self, model: StepModel) -> None:
        """Swap to ``model`` at the next quiescent point."""
        self._pending_model = model
        self.wake()

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`request_stop`; then stop cleanly (see :meth:`_finish`)."""
        p, link, cfg = self.pipeline, self.link, self.cfg
        max_batch = cfg.engine.max_batch
        queue_size = cfg.engine.queue_size
        linger = cfg.engine.max_wait_ms / 1000.0
        p.journal.start_syncing(self.wake)  # the disk's sync never holds this loop up; acks wait for it
        settle_heap()  # what start-up built is not scanned again by the collections while serving
        while not self._stop:
            barrier = self._barrier_wanted()
            starved = p.starved
            # Read while there is room; while too many forecasts await their PUBACKs, read anyway: only
            # those PUBACKs make room (QoS 1 input is meant to be bounded by the broker's in-flight window).
            read = READ_BUDGET if starved or (len(p.queue) < queue_size and not link.backlogged) else 0
            timeout = IDLE_WAIT_S
            gathering = False
            if p.queue and not barrier and not starved:
                timeout = 0.0
                if linger > 0 and len(p.queue) < max_batch and not p.no_wait:
                    timeout = max(0.0, p.queue[0].received + linger - time.monotonic())
                    # Streams already share the next step: what comes during the wait is read in slices of
                    # the wait, not packet by packet (half the wake-ups under load); a queue that reaches
                    # max_batch still ends the wait, within one slice.
                    gathering = timeout > 0.0 and p.mixed
                    if gathering:
                        timeout = min(timeout, GATHER_SLICE_S)
            if link.poll(timeout, read=0 if gathering else read, wake=self._wake_r):
                self._drain_wake()
                if self._ready_requested:
                    self._ready_requested = False
                    link.set_ready()
            if gathering and read and not self._stop:
                link.poll(0.0, read=read)  # what came during the wait joins this step
            if p.queue and not p.starved:
                # At a barrier only the rest of a message split across batches is stepped.
                limit = min(max_batch, p.partial()) if barrier else max_batch
                ready = (
                    linger <= 0
                    or len(p.queue) >= max_batch
                    or p.no_wait
                    or time.monotonic() - p.queue[0].received >= linger
                )
                if limit > 0 and (ready or barrier):
                    self._status_count += p.step(limit)
                    self._worked = True
                    self._last_step = time.monotonic()
                    link.flush()
            if p.announce_due():
                link.flush()
            if p.commit():
                link.flush()
                if p.journal.reopened != self._journal_reopened:
                    self._journal_reopened = p.journal.reopened
                    self._force_checkpoint = True  # the records since the last checkpoint went with the old file
            self.metrics.queue_depth.set(len(p.queue))
            if barrier:
                self._at_barrier()
            self._watchdog()
            self._status()
            self._trim()
        self._finish()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _barrier_wanted(self) -> bool:
        now = time.monotonic()
        wanted = self._force_checkpoint or self._pending_model is not None or now >= self._checkpoint_due
        if wanted and self._barrier_since is None:
            self._barrier_since = now
        return wanted

    def _at_barrier(self) -> None:
        """Intake is held: once nothing stepped is unjournaled, checkpoint (and swap a pending model)."""
        p = self.pipeline
        assert self._barrier_since is not None
        if not p.quiescent:
            if p.journal_failing or p.journal.sync_error is not None:
                # The state directory cannot take the journal: a checkpoint cannot be written either.
                self.metrics.checkpoint_failures.inc()
                _LOG.error("checkpoint failed: the journal in %s cannot be written", self.cfg.state.dir)
                self._end_barrier(retry_s=self.cfg.state.checkpoint_interval_s)
                return
            if time.monotonic() - self._barrier_since > BARRIER_TIMEOUT_S:
                _LOG.warning("checkpoint deferred: %d message(s) still wait for the broker", p.unacknowledged)
                self._end_barrier(retry_s=min(self.cfg.state.checkpoint_interval_s, 30.0))
            return
        model = self._pending_model
        if model is not None:
            self._pending_model = None
            self._swap(model)
        self.checkpoint()
        self._end_barrier(retry_s=self.cfg.state.checkpoint_interval_s)

    def _end_barrier(self, retry_s: float) -> None:
        self._barrier_since = None
        self._force_checkpoint = False
        self._checkpoint_due = time.monotonic() + retry_s

    def _swap(self, model: StepModel) -> None:
        p = self.pipeline
        try:
            if tuple(model.manifest.pipeline.columns) != tuple(p.decoder.columns):
                raise ValueError(
                    f"new model reads columns {list(model.manifest.pipeline.columns)}, not the current ones"
                )
            kept = p.engine.replace_model(model)
        except ValueError as e:
            self.metrics.model_reloads.labels("failed").inc()
            _LOG.error("model reload failed, keeping %s: %s", p.engine.model.manifest.model_id, e)
            return
        p.encoder = ForecastEncoder.for_manifest(model.manifest, precision=self.cfg.output.precision or None)
        if p.discovery is not None:  # the entities follow the new model (its id, its intervals)
            announced = p.discovery.announced
            p.discovery = Discovery.from_config(self.cfg, model.manifest)
            p.engine.table.evicted_ids = []
            p._announce(p.discovery.on_new_streams(sorted(announced)))
        self.fingerprint = model.manifest.sha256
        if self.on_model_swapped is not None:
            self.on_model_swapped(model, kept)

    def checkpoint(self) -> bool:
        """Write the state (at a quiescent point) and start a new journal; False when it failed."""
        p = self.pipeline
        start = time.monotonic()
        directory = Path(self.cfg.state.dir)
        try:
            if not directory.exists():
                _LOG.warning("state.dir %s is gone: creating it again", directory)
                directory.mkdir(parents=True)
            saved = ckpt.save_checkpoint(p.engine.table, directory, self.fingerprint, journal_seq=p.seq)
            p.journal.reset(p.carry(), fingerprint=self.fingerprint)
        except OSError as e:
            self.metrics.checkpoint_failures.inc()
            _LOG.error("checkpoint failed: %s", e)
            return False
        self.metrics.checkpoint_duration.observe(time.monotonic() - start)
        self.metrics.checkpoint_size.set(saved.size)
        self.metrics.checkpoint_last_success.set(p.clock())
        _LOG.debug("checkpoint: %d stream(s), %d bytes, journal at %d", saved.streams, saved.size, p.seq)
        return True

    def _finish(self) -> None:
        """Stop: no more intake; wait (up to ``engine.drain_timeout_s``) for the broker to acknowledge what
        was published, acknowledge what is settled, checkpoint when quiescent."""
        p, link = self.pipeline, self.link
        left = p.leave_queued()
        deadline = time.monotonic() + self.cfg.engine.drain_timeout_s
        while (p.batches or p._syncing) and time.monotonic() < deadline:
            link.poll(0.05, read=READ_BUDGET if link.connected else 0, wake=self._wake_r)
            if p.commit():
                link.flush()
            self._watchdog()
        p.commit()
        p.journal.stop_syncing()  # what was written is synced before the last acknowledgements
        p.commit()
        link.flush()
        unsettled = sum(b.outstanding for b in p.batches)
        if unsettled or left:
            _LOG.warning(
                "stopping with %d forecast(s) the broker has not acknowledged and %d reading(s) not processed: "
                "their %d message(s) stay unacknowledged, the broker delivers them again to the next run",
                unsettled, left, p.unacknowledged,
            )  # fmt: skip
        if p.quiescent:
            self.checkpoint()
        else:
            _LOG.info("state not checkpointed at stop: the journal holds what was acknowledged")

    # -- liveness and status --------------------------------------------------------------------

    def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= min(interval, 5.0):
            self._last_watchdog = now
            self.notifier.watchdog()

    def _trim(self) -> None:
        """Once idle after work (at most every ``TRIM_EVERY_S``), return what a burst left to the system.

        A full garbage collection first (the burst's reference cycles, and those
        among the objects frozen before: :func:`settle_heap`), then the heap's
        free pages; 10-50 ms while nothing waits.  Measured with 10,000 new
        streams: 64.1 MB resident afterwards without it, 63.7 MB with it.
        """
        now = time.monotonic()
        if self._worked and now - self._last_step >= TRIM_AFTER_IDLE_S and now - self._trimmed_at >= TRIM_EVERY_S:
            settle_heap()
            release_free_memory()
            self._worked, self._trimmed_at = False, now

    def _status(self) -> None:
        """A ``STATUS=`` line for ``systemctl status`` every ``STATUS_EVERY_S``."""
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if now - self._status_at >= STATUS_EVERY_S:
            rate = self._status_count / (now - self._status_at)
            p = self.pipeline
            self.notifier.status(
                f"serving {p.engine.model.manifest.model_id}: {len(p.engine.table)} streams, {rate:.1f} readings/s"
            )
            self._status_at, self._status_count = now, 0

    def close(self) -> None:
        for s in (self._wake_r, self._wake_w):
            s.close()


def replay_journal(
    records: Sequence[Record],
    after: int,
    engine: Engine,
    decoder: PayloadDecoder,
    route: Callable[[str | None], TopicFilter | None],
) -> int:
    """Step the journaled messages after sequence ``after`` through decoder and engine, publishing nothing.

    The same calls, in the same order, as when the messages first arrived
    (the decoder gets each message's recorded arrival time), so the engine
    ends in the state it held then.  Returns how many messages were stepped.
    """
    stepped = 0
    for r in records:
        if r.seq <= after or r.payload is None:
            continue
        tf = route(r.topic)
        if tf is None:
            continue
        try:
            result = decoder.decode(r.payload, tf.stream_of(r.topic), r.arrival, time.monotonic())
        except Exception:  # rejected (or failed) the same way when it first arrived
            continue
        if result.readings:
            try:
                engine.process(result.readings)
            except Exception:
                _LOG.exception("replaying journal record %d", r.seq)
        stepped += 1
    return stepped


def routes_of(cfg: Config) -> Callable[[str | None], TopicFilter | None]:
    """The router of a configuration: the first input filter that matches a topic."""
    routes = [(filter_pattern(f.filter), f) for f in cfg.subscriptions()]

    def route(topic: str | None) -> TopicFilter | None:
        if topic is None:
            return None
        for pattern, tf in routes:
            if pattern.fullmatch(topic):
                return tf
        return None

    return route


def open_journal(directory: Path, fingerprint: str, sync: bool) -> tuple[Journal, list[Record], int]:
    """Open the state directory's journal for a model; returns it with the records it holds and the bytes
    of the file that could not be replayed (see :meth:`Journal.open`)."""
    from edge_lstm.journal import read_journal

    found = read_journal(directory, fingerprint)
    journal = Journal(directory, fingerprint, sync=sync)
    dropped = journal.open(found)
    return journal, found.records if found.status in ("ok", "torn") else [], dropped
