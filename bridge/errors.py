"""The bridge package's exception root."""

from __future__ import annotations

__all__ = ["BridgeError"]


class BridgeError(Exception):
    """The bridge cannot continue (Kafka refused a setting, the replay service cannot help)."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable
