"""Per-user state of the worker: last applied (epoch, seq), open orders and statistics.

Pure (standard library only). The worker keeps one ``UserState`` per user in a
Faust table (changelogged, so it survives restarts) as the plain dict of
``to_dict``. ``apply`` is the only way state changes:

* An event at or below the user's last applied (epoch, seq) is a duplicate
  (a re-send after a bridge crash, a replayed record) and changes nothing.
  That rule is sound because the bridge writes each user's events to their
  partition in seq order, so nothing older can arrive after something newer
  except as a re-send.
* An event of a newer epoch (an engine started on a new journal) starts the
  user afresh for that epoch: its open orders are gone; statistics go on.

Statistics are sums, so they are not idempotent by themselves: the dedup
above, and writing the table only after Cassandra has the batch (then
flushing it before the batch's offsets can be committed), is what makes
re-applying a batch after a crash produce the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.events import OrderStatus, OrderUpdate

__all__ = ["ALL_SYMBOLS", "STAT_FIELDS", "UserState"]

ALL_SYMBOLS = "*"
STAT_FIELDS = (
    "orders_new",
    "orders_partially_filled",
    "orders_filled",
    "orders_cancelled",
    "orders_rejected",
    "orders_expired",
    "fills",
    "filled_qty",
    "filled_notional",
)
_STATUS_FIELD = {s: f"orders_{s.value.lower()}" for s in OrderStatus}
_OPEN = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)


@dataclass
class UserState:
    epoch: int = 0
    last_seq: int = 0
    open_orders: dict[int, int] = field(default_factory=dict)
    """order_id -> seq of its last update, for orders still open."""
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    """symbol (and '*') -> STAT_FIELDS -> value."""
    stats_version: dict[str, tuple[int, int]] = field(default_factory=dict)
    """symbol -> (epoch, seq) of the last event that changed its statistics."""

    def apply(self, ev: OrderUpdate) -> bool:
        """Apply one order update; False (and no change) for a duplicate or stale event."""
        if (ev.epoch, ev.seq) <= (self.epoch, self.last_seq):
            return False
        if ev.epoch != self.epoch:
            self.open_orders.clear()
        self.epoch, self.last_seq = ev.epoch, ev.seq
        if ev.status in _OPEN:
            self.open_orders[ev.order_id] = ev.seq
        else:
            self.open_orders.pop(ev.order_id, None)
        for symbol in (ev.symbol, ALL_SYMBOLS):
            st = self.stats.setdefault(symbol, dict.fromkeys(STAT_FIELDS, 0))
            st[_STATUS_FIELD[ev.status]] += 1
            if ev.last_fill_qty:
                st["fills"] += 1
                st["filled_qty"] += ev.last_fill_qty
                st["filled_notional"] += ev.last_fill_qty * ev.last_fill_price
            self.stats_version[symbol] = (ev.epoch, ev.seq)
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            # JSON object keys are strings; order ids are restored as ints by from_dict.
            "open_orders": {str(k): v for k, v in self.open_orders.items()},
            "stats": self.stats,
            "stats_version": {k: list(v) for k, v in self.stats_version.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> UserState:
        if not d:
            return cls()
        return cls(
            d["epoch"],
            d["last_seq"],
            {int(k): v for k, v in d["open_orders"].items()},
            {k: dict(v) for k, v in d["stats"].items()},
            {k: (v[0], v[1]) for k, v in d["stats_version"].items()},
        )
