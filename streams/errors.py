"""The streams package's exception root."""

from __future__ import annotations

__all__ = ["SinkError"]


class SinkError(Exception):
    """A write to Cassandra failed; ``retriable`` says whether trying again can help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable
