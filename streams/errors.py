"""The streams package's exception root: everything the worker, the sink and replay raise.

``retriable`` is declared per class: whether trying the same thing again can
succeed. Driver exceptions are translated into these once, in
``streams.sink.translate``.
"""

from __future__ import annotations

__all__ = ["SinkError", "SinkRejected", "SinkUnavailable", "StreamsError"]


class StreamsError(Exception):
    """Root of the streams package's errors."""

    retriable = False


class SinkError(StreamsError):
    """A write to (or read from) Cassandra failed."""

    retriable = False


class SinkUnavailable(SinkError):
    """Cassandra did not answer in time, or no replica was up: try again later."""

    retriable = True


class SinkRejected(SinkError):
    """Cassandra refused the request (schema, size, bad value): retrying the same request fails again."""

    retriable = False
