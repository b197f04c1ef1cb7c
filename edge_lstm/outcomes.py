"""What became of every reading the daemon received.

Every reading ends in exactly one :class:`Outcome`, so the number of readings
received always equals the sum of the outcome counters.
"""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    """The fate of one reading; the value is the metric label."""

    PROCESSED = "processed"  # reading opened a tick; the model steps when the tick closes (one forecast)
    AGGREGATED = "aggregated"  # reading merged into a tick already opened by an earlier one
    BAD_PAYLOAD = "bad_payload"  # not decodable: bad UTF-8 / JSON / number, wrong shape
    NON_FINITE = "non_finite"  # NaN, Inf, or beyond the configured absolute limit
    MISSING_FIELD = "missing_field"  # a model column is absent from the payload
    TOO_LARGE = "too_large"  # body larger than input.max_payload_bytes
    BAD_TIMESTAMP = "bad_timestamp"  # unparsable or too far from the arrival time
    BAD_STREAM = "bad_stream"  # no stream id could be derived
    LATE = "late"  # its tick had already closed (older than the allowed lateness)
    DUPLICATE = "duplicate"  # same timestamp as the stream's newest reading
    # Not produced since ticks are explicit (a reading older than its closed tick is LATE); kept so
    # that dashboards and alerts naming the label keep a (zero) series.
    OUT_OF_ORDER = "out_of_order"
    RETAINED = "retained"  # a retained message, left out (input.retained = "ignore")
    INTERNAL_ERROR = "internal_error"  # handling it raised an unexpected exception (logged; intake goes on)
    SHUTDOWN = "shutdown"  # still queued at stop: left unacknowledged, the broker delivers it to the next run
