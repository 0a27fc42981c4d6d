"""What a batch of the worker writes, as rows: one shape for every driver.

Why re-applying anything converges to the same rows: every statement is
``USING TIMESTAMP`` of the event that determined the values it writes
(``epoch + seq``, see ``docs/architecture.md``: later events always have
larger timestamps), and one seq always carries the same payload. So a
duplicate, a replayed event or a whole batch written twice (a crash between
the write and the offset commit) rewrites identical cells with identical
timestamps, and an older event arriving after a newer one loses to it cell by
cell. A terminal status deletes the ``active_orders`` row with a tombstone at
its timestamp, which an older NEW (lower timestamp) cannot resurrect.
Statistics are full values written with a per-user timestamp that grows with
every applied event (``UserState.stats_timestamp``). No counters, no list
appends: those are not idempotent (a map entry keyed by seq is).

Rows per order update (which query each serves is in ``docs/architecture.md``):
``order_history`` (latest state, plus the event in its ``events`` map),
``active_orders`` (upsert while open, tombstone once terminal), ``user_updates``
(the user's event log) and, only for the events of the command that created
the order, ``orders_by_id``. Within one batch an order's history and active
rows are written once, for its newest event: the cells of the older ones
would lose to it anyway.

``RowBuilder.rows`` gives each row as (partition, statement handle, values, estimated bytes);
``streams.planning`` groups them into requests, and each sink (``streams.sink`` for
cassandra-driver, ``streams.acsylla_sink``) binds and sends them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.events import OrderStatus, OrderUpdate, RejectReason
from schemas.tables import STAT_FIELDS, Fill, FillMonth
from streams.state import UserState

__all__ = ["Applied", "Fill", "FillMonth", "RowBuilder", "StatsRow", "statement_cql", "stats_rows", "write_timestamp"]

_OPEN = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)

Applied = tuple[OrderUpdate, bytes]
"""An order update to write, with its single-object encoded payload."""


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One order_statistics row: full values, written with the user's statistics timestamp."""

    user_id: int
    symbol: str
    values: Sequence[int]
    """STAT_FIELDS, in order."""
    last_epoch: int
    last_seq: int
    timestamp: int


def stats_rows(user_id: int, state: UserState, symbols: Iterable[str] | None = None) -> list[StatsRow]:
    """The order_statistics rows of ``symbols`` (default: all) of one user's state, with its timestamp."""
    ts = state.stats_timestamp()
    out = []
    for symbol in state.stats if symbols is None else symbols:
        epoch, seq = state.last_counted(symbol)
        out.append(StatsRow(user_id, symbol, state.stats[symbol][: len(STAT_FIELDS)], epoch, seq, ts))
    return out


def write_timestamp(epoch: int, seq: int) -> int:
    """Cassandra write timestamp (microseconds) of an event: see docs/architecture.md."""
    return epoch + seq


def statement_cql(ks: str) -> dict[str, str]:
    """The CQL of every statement the sink writes, by name (the same for every driver)."""
    cols = ", ".join(STAT_FIELDS)
    marks = ", ".join("?" for _ in STAT_FIELDS)
    return {
        "history": (
            f"UPDATE {ks}.order_history USING TIMESTAMP ? SET client_order_id = ?, symbol = ?, side = ?, "
            "order_type = ?, time_in_force = ?, price = ?, qty = ?, quote_budget = ?, filled_qty = ?, "
            "remaining_qty = ?, quote_filled = ?, status = ?, reason = ?, created_ns = ?, updated_ns = ?, "
            "expire_ns = ?, seq = ?, events = events + ? WHERE user_id = ? AND epoch = ? AND order_id = ?"
        ),
        "active_upsert": (
            f"INSERT INTO {ks}.active_orders (user_id, epoch, order_id, client_order_id, symbol, side, order_type, "
            "time_in_force, price, qty, quote_budget, filled_qty, remaining_qty, quote_filled, status, created_ns, "
            "updated_ns, expire_ns, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        ),
        "active_delete": (
            f"DELETE FROM {ks}.active_orders USING TIMESTAMP ? WHERE user_id = ? AND epoch = ? AND order_id = ?"
        ),
        "by_id": (
            f"INSERT INTO {ks}.orders_by_id (order_id, epoch, user_id, symbol) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "user_updates": (
            f"INSERT INTO {ks}.user_updates (user_id, day, epoch, seq, order_id, status, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "stats": (
            f"INSERT INTO {ks}.order_statistics (user_id, symbol, {cols}, last_epoch, last_seq) "
            f"VALUES (?, ?, {marks}, ?, ?) USING TIMESTAMP ?"
        ),
        # streams.trades and the query API's lookups (streams/cql/003_fills_and_lookups.cql)
        "by_client_id": (
            f"INSERT INTO {ks}.orders_by_client_id (user_id, client_order_id, epoch, order_id) "
            "VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "fill": (
            f"INSERT INTO {ks}.user_trades (user_id, month, ts_ns, epoch, seq, liquidity, trade_id, order_id, "
            "symbol, side, price, qty, quote_qty, fee) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        ),
        "fill_month": f"INSERT INTO {ks}.user_trade_months (user_id, month) VALUES (?, ?) USING TIMESTAMP ?",
    }


class RowBuilder:
    """The rows of a batch, for any driver: ``self.handles[name]`` is the driver's statement."""

    handles: dict[str, Any]
    _days: dict[int, dt.date]

    # --------------------------------------------------------------- statements
    def _day(self, ts_ns: int) -> dt.date:
        # Events of one batch fall on very few days: one datetime per hour of engine time.
        hour = ts_ns // 3_600_000_000_000
        day = self._days.get(hour)
        if day is None:
            if len(self._days) > 1024:
                self._days.clear()
            day = self._days[hour] = dt.datetime.fromtimestamp(hour * 3600, tz=dt.UTC).date()
        return day

    def rows(
        self, applied: Sequence[Applied], stats: Sequence[StatsRow]
    ) -> list[tuple[Hashable, Any, tuple[Any, ...], int]]:
        """Every row of a batch as (partition, statement, values, estimated bytes), before binding."""
        out: list[tuple[Hashable, Any, tuple[Any, ...], int]] = []
        h = self.handles
        newest: dict[tuple[int, int], OrderUpdate] = {}
        events: dict[tuple[int, int], dict[int, bytes]] = {}
        cids: set[tuple[int, int]] = set()
        for ev, payload in applied:
            key = (ev.epoch, ev.order_id)
            seen = newest.get(key)
            if seen is None:
                newest[key] = ev
                events[key] = {ev.seq: payload}
            else:
                events[key][ev.seq] = payload
                if ev.seq > seen.seq:
                    newest[key] = ev
            ts = ev.epoch + ev.seq
            user = ev.user_id
            day = self._day(ev.ts_ns)
            out.append(
                (
                    ("d", user, day),
                    h["user_updates"],
                    (user, day, ev.epoch, ev.seq, ev.order_id, ev.status.value, payload, ts),
                    80 + len(payload),
                )
            )
            if ev.created_ns == ev.updated_ns:
                # An event of the command that placed the order: its (user, epoch) never change.
                out.append((("i", ev.order_id), h["by_id"], (ev.order_id, ev.epoch, user, ev.symbol, ts), 60))
                # The query API's lookup by client id: once per order (a dict test, not a row per event),
                # never for a duplicate's rejection (it would shadow the open order that owns the id).
                if ev.client_order_id and key not in cids and ev.reason is not RejectReason.DUPLICATE_CLIENT_ORDER_ID:
                    cids.add(key)
                    cid = ev.client_order_id
                    out.append(
                        (("c", user, cid), h["by_client_id"], (user, cid, ev.epoch, ev.order_id, ts), 40 + len(cid))
                    )
        for key, ev in newest.items():
            ts = ev.epoch + ev.seq
            user = ev.user_id
            group = ("u", user)
            common = (
                ev.client_order_id,
                ev.symbol,
                ev.side.value,
                ev.order_type.value,
                ev.time_in_force.value,
                ev.price,
                ev.qty,
                ev.quote_budget,
                ev.filled_qty,
                ev.remaining_qty,
                ev.quote_filled,
                ev.status.value,
            )
            out.append(
                (
                    group,
                    h["history"],
                    (
                        ts,
                        *common,
                        ev.reason.value,
                        ev.created_ns,
                        ev.updated_ns,
                        ev.expire_ns,
                        ev.seq,
                        events[key],
                        user,
                        ev.epoch,
                        ev.order_id,
                    ),
                    200 + sum(len(p) + 16 for p in events[key].values()),
                )
            )
            if ev.status in _OPEN:
                out.append(
                    (
                        group,
                        h["active_upsert"],
                        (user, ev.epoch, ev.order_id, *common, ev.created_ns, ev.updated_ns, ev.expire_ns, ev.seq, ts),
                        200,
                    )
                )
            else:
                out.append((group, h["active_delete"], (ts, user, ev.epoch, ev.order_id), 40))
        for row in stats:
            out.append(
                (
                    ("u", row.user_id),
                    h["stats"],
                    (row.user_id, row.symbol, *row.values, row.last_epoch, row.last_seq, row.timestamp),
                    140,
                )
            )
        return out

    def fill_rows(
        self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()
    ) -> list[tuple[Hashable, Any, tuple[Any, ...], int]]:
        """The rows of a batch of fills (``streams.trades``): a user_trades row each, and the
        user_trade_months rows asked for (they share the user's partition token with the user's
        other rows)."""
        h = self.handles
        fill, month_row = h["fill"], h["fill_month"]
        out: list[tuple[Hashable, Any, tuple[Any, ...], int]] = []
        for f in fills:
            values = (
                f.user_id, f.month, f.ts_ns, f.epoch, f.seq, f.liquidity, f.trade_id, f.order_id, f.symbol,
                f.side, f.price, f.qty, f.quote_qty, f.fee, f.epoch + f.seq,
            )  # fmt: skip
            out.append((("m", f.user_id, f.month), fill, values, 120 + len(f.symbol)))
        for user_id, month, ts in months:
            out.append((("u", user_id), month_row, (user_id, month, ts), 30))
        return out
