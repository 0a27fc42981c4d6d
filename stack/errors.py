"""The stack package's exception root."""

from __future__ import annotations

__all__ = ["StackError"]


class StackError(Exception):
    """The local stack cannot be fetched, started, checked or stopped; the message says why."""

    retriable = False
