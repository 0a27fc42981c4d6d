"""In-memory twin of the Cassandra sink, for unit tests of the processor (no server).

It keeps what the real sink's tables would hold with the same last-write-wins rule per row
(a write with a lower timestamp never replaces a newer one), and can be told to fail: retriably
(Cassandra away) a number of times, or with a rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.errors import SinkRejected, SinkUnavailable
from streams.rows import Applied, StatsRow

__all__ = ["MemorySink"]

_OPEN = ("NEW", "PARTIALLY_FILLED")


@dataclass
class MemorySink:
    fail_retriably: int = 0
    """Writes to fail with SinkUnavailable before one succeeds."""
    reject: bool = False
    history: dict[tuple[int, int, int], tuple[int, Any]] = field(default_factory=dict)
    """(user, epoch, order) -> (timestamp, latest event)."""
    active: dict[tuple[int, int, int], tuple[int, Any]] = field(default_factory=dict)
    """(user, epoch, order) -> (timestamp, event or None for a tombstone)."""
    events: dict[tuple[int, int], bytes] = field(default_factory=dict)
    """(epoch, seq) -> payload: the user_updates log."""
    stats: dict[tuple[int, str], tuple[int, StatsRow]] = field(default_factory=dict)
    writes: int = 0
    attempts: int = 0

    def statements(self, applied: Sequence[Applied], stats: Sequence[StatsRow]) -> list[Any]:
        return [("event", ev, payload) for ev, payload in applied] + [("stats", row) for row in stats]

    async def write(self, pending: list[Any]) -> None:
        self.attempts += 1
        if self.reject:
            raise SinkRejected("rejected (twin)")
        if self.fail_retriably:
            self.fail_retriably -= 1
            raise SinkUnavailable("unavailable (twin)")
        self.writes += 1
        for item in pending:
            if item[0] == "event":
                _, ev, payload = item
                ts, key = ev.epoch + ev.seq, (ev.user_id, ev.epoch, ev.order_id)
                self.events[(ev.epoch, ev.seq)] = payload
                _lww(self.history, key, ts, ev)
                _lww(self.active, key, ts, ev if ev.status.value in _OPEN else None)
            else:
                row = item[1]
                _lww(self.stats, (row.user_id, row.symbol), row.timestamp, row)

    def open_orders(self, user_id: int) -> set[int]:
        return {k[2] for k, (_ts, ev) in self.active.items() if k[0] == user_id and ev is not None}


def _lww(table: dict[Any, tuple[int, Any]], key: Any, ts: int, value: Any) -> None:
    old = table.get(key)
    if old is None or ts >= old[0]:
        table[key] = (ts, value)
