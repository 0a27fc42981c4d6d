"""A recording twin of the engine service's feed socket, and a log of journal and feed calls.

``install(svc)`` swaps the service's PUB socket for ``FeedTwin`` and wraps its journal's
``add``/``flush``/``sync`` so that one ``calls`` list shows the order in which the service
journals, flushes and publishes.
"""

from __future__ import annotations

from typing import Any

import zmq

from engine.service import EngineService


class FeedTwin:
    """``send`` of a PUB socket: records every message; ``refuse`` makes sends raise zmq.Again."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls
        self.messages: list[bytes] = []
        self.refuse = False

    def send(self, message: Any, flags: int = 0, copy: bool = True) -> None:
        if self.refuse:
            raise zmq.Again()
        data = bytes(message)
        self.messages.append(data)
        self.calls.append(("send", data))

    def close(self, linger: int | None = None) -> None:
        pass


def install(svc: EngineService) -> tuple[FeedTwin, list[tuple[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    svc.feed.close(linger=0)
    feed = FeedTwin(calls)
    svc.feed = feed  # type: ignore[assignment]
    journal = svc.journal
    add, flush, sync = journal.add, journal.flush, journal.sync

    def add_(cmd: Any, first_seq: int, count: int, entries: bytes, json_records: Any = ()) -> None:
        calls.append(("add", (cmd, first_seq, count, entries)))
        add(cmd, first_seq, count, entries, json_records)

    def flush_() -> None:
        calls.append(("flush", None))
        flush()

    def sync_() -> None:
        calls.append(("sync", None))
        sync()

    journal.add, journal.flush, journal.sync = add_, flush_, sync_  # type: ignore[method-assign]
    return feed, calls
