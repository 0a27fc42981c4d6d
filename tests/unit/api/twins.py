"""In-memory twins for the API: ``StoreTwin`` answers every read ``api.routes`` and ``api.query`` make
of ``api.store.Store`` from plain tables with the same key order as Cassandra's; ``SessionTwin``
stands in for cassandra-driver's ``Session`` under ``api.store.Store`` itself (pages, errors)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from api.store import HISTORY_COLUMNS

Row = dict[str, Any]
_OPEN = ("NEW", "PARTIALLY_FILLED")


def order_row(user_id: int, epoch: int, order_id: int, created_ns: int, **kw: Any) -> Row:
    """An order_history row with every column the API reads."""
    row: Row = {
        "user_id": user_id, "epoch": epoch, "order_id": order_id, "client_order_id": "", "symbol": "BTC-USD",
        "side": "BUY", "order_type": "LIMIT", "time_in_force": "GTC", "price": 100, "qty": 1, "quote_budget": 0,
        "filled_qty": 0, "remaining_qty": 1, "quote_filled": 0, "status": "NEW", "created_ns": created_ns,
        "updated_ns": created_ns, "expire_ns": 0, "seq": order_id, "reason": "NONE",
    }  # fmt: skip
    row.update(kw)
    assert set(row) == set(HISTORY_COLUMNS)
    return row


def fill_row(user_id: int, ts_ns: int, seq: int, order_id: int, **kw: Any) -> Row:
    row: Row = {
        "user_id": user_id, "ts_ns": ts_ns, "epoch": 100, "seq": seq, "liquidity": "TAKER", "trade_id": seq,
        "order_id": order_id, "symbol": "BTC-USD", "side": "BUY", "price": 100, "qty": 1, "quote_qty": 100, "fee": 1,
    }  # fmt: skip
    row.update(kw)
    return row


def _month(ts_ns: int) -> int:
    import datetime as dt

    d = dt.datetime.fromtimestamp(ts_ns / 1e9, tz=dt.UTC)
    return d.year * 100 + d.month


@dataclass
class StoreTwin:
    """The worker's tables as lists; reads keep Cassandra's clustering order and LIMIT."""

    history: list[Row] = field(default_factory=list)
    events: dict[tuple[int, int, int], dict[int, bytes]] = field(default_factory=dict)
    stats: dict[int, list[Row]] = field(default_factory=dict)
    fills: list[Row] = field(default_factory=list)
    by_client_id: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    reads: list[tuple[Any, ...]] = field(default_factory=list)
    missing_history: set[tuple[int, int]] = field(default_factory=set)
    """(epoch, order_id) whose orders_by_id row exists but whose history row is not written yet."""

    # ------------------------------------------------------------------ orders
    def _table(self, table: str, user_id: int) -> list[Row]:
        rows = [r for r in self.history if r["user_id"] == user_id]
        if table == "active_orders":
            rows = [{k: v for k, v in r.items() if k != "reason"} for r in rows if r["status"] in _OPEN]
        return sorted(rows, key=lambda r: (r["epoch"], r["order_id"]))

    async def ping(self) -> None:
        self.reads.append(("ping",))

    async def order_rows(
        self, table: str, user_id: int, desc: bool, after: tuple[int, int] | None, inclusive: bool, limit: int
    ) -> list[Row]:
        self.reads.append(("order_rows", table, user_id, desc, after, inclusive, limit))
        rows = self._table(table, user_id)
        if desc:
            rows.reverse()
        if after is not None:

            def beyond(r: Row) -> bool:
                key = (r["epoch"], r["order_id"])
                if inclusive and key == after:
                    return True
                return key < after if desc else key > after

            rows = [r for r in rows if beyond(r)]
        return rows[:limit]

    async def order_probe(self, table: str, user_id: int, kind: str, epoch: int = 0, order_id: int = 0) -> Row | None:
        self.reads.append(("order_probe", table, kind))
        rows = self._table(table, user_id)
        pick: list[Row] = {
            "newest": rows[-1:],
            "oldest_in": [r for r in rows if r["epoch"] == epoch][:1],
            "newest_before": [r for r in rows if r["epoch"] < epoch][-1:],
            "at_or_below": [r for r in rows if r["epoch"] == epoch and r["order_id"] <= order_id][-1:],
        }[kind]
        return {k: pick[0][k] for k in ("epoch", "order_id", "created_ns")} if pick else None

    def _find(self, epoch: int | None, order_id: int) -> Row | None:
        rows = [r for r in self.history if r["order_id"] == order_id and (epoch is None or r["epoch"] == epoch)]
        return max(rows, key=lambda r: r["epoch"]) if rows else None

    async def order_ref(self, order_id: int, epoch: int | None) -> Row | None:
        self.reads.append(("order_ref", order_id, epoch))
        row = self._find(epoch, order_id)
        return None if row is None else {"order_id": order_id, "epoch": row["epoch"], "user_id": row["user_id"]}

    async def order(self, user_id: int, epoch: int, order_id: int) -> Row | None:
        self.reads.append(("order", user_id, epoch, order_id))
        if (epoch, order_id) in self.missing_history:
            return None
        row = self._find(epoch, order_id)
        return dict(row) if row is not None and row["user_id"] == user_id else None

    async def order_by_client_id(self, user_id: int, client_order_id: str) -> Row | None:
        self.reads.append(("order_by_client_id", user_id, client_order_id))
        key = self.by_client_id.get((user_id, client_order_id))
        return None if key is None else await self.order(user_id, *key)

    async def order_window(self, user_id: int, epoch: int, order_id: int) -> Row | None:
        self.reads.append(("order_window", user_id, epoch, order_id))
        row = self._find(epoch, order_id)
        if row is None or row["user_id"] != user_id:
            return None
        return {"user_id": user_id, "created_ns": row["created_ns"], "updated_ns": row["updated_ns"]}

    async def order_events(self, user_id: int, epoch: int, order_id: int) -> list[bytes]:
        self.reads.append(("order_events", user_id, epoch, order_id))
        events = self.events.get((user_id, epoch, order_id), {})
        return [events[seq] for seq in sorted(events)]

    async def statistics(self, user_id: int) -> list[Row]:
        self.reads.append(("statistics", user_id))
        return [dict(r) for r in self.stats.get(user_id, [])]

    # ------------------------------------------------------------------- fills
    async def trade_months(self, user_id: int) -> list[int]:
        self.reads.append(("trade_months", user_id))
        return sorted({_month(f["ts_ns"]) for f in self.fills if f["user_id"] == user_id})

    async def fill_rows(
        self, user_id: int, month: int, desc: bool, after: tuple[int, int, int, str] | None, limit: int
    ) -> list[Row]:
        self.reads.append(("fill_rows", user_id, month, desc, after, limit))

        def key(f: Row) -> tuple[int, int, int, str]:
            return f["ts_ns"], f["epoch"], f["seq"], f["liquidity"]

        rows = sorted((f for f in self.fills if f["user_id"] == user_id and _month(f["ts_ns"]) == month), key=key)
        if desc:
            rows.reverse()
        if after is not None:
            rows = [f for f in rows if (key(f) < after if desc else key(f) > after)]
        return rows[:limit]


# ------------------------------------------------------------------ the driver's session
class _ResponseFuture:
    """Pages of one query, delivered from another thread as the driver's I/O thread does."""

    def __init__(self, pages: list[Any] | BaseException, sync: bool) -> None:
        self._pages = pages
        self._at = 0
        self._sync = sync
        self._ok: Callable[[list[Row]], None] | None = None
        self._err: Callable[[BaseException], None] | None = None
        self.fetches = 0

    @property
    def has_more_pages(self) -> bool:
        return not isinstance(self._pages, BaseException) and self._at < len(self._pages)

    def _deliver(self) -> None:
        assert self._ok is not None and self._err is not None
        if isinstance(self._pages, BaseException):
            self._err(self._pages)
            return
        page = self._pages[self._at] if self._pages else []
        self._at += 1
        if isinstance(page, BaseException):  # a later page that fails
            self._err(page)
        else:
            self._ok(page)

    def _later(self) -> None:
        if self._sync:
            self._deliver()
        else:
            threading.Thread(target=self._deliver, daemon=True).start()

    def add_callbacks(self, ok: Callable[[list[Row]], None], err: Callable[[BaseException], None]) -> None:
        self._ok, self._err = ok, err
        self._later()

    def start_fetching_next_page(self) -> None:
        self.fetches += 1
        self._later()


class SessionTwin:
    """``prepare`` keeps the CQL; ``execute_async`` answers with ``answer(cql, params)``: the pages of
    rows (a page may be an exception: that page fails), or an exception to report at once."""

    def __init__(self, answer: Callable[[str, tuple[Any, ...]], list[Any] | BaseException]) -> None:
        self.answer = answer
        self.prepared: list[Any] = []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.futures: list[_ResponseFuture] = []
        self.sync = False

    def prepare(self, cql: str) -> Any:
        stmt = SimpleNamespace(cql=cql, is_idempotent=False)
        self.prepared.append(stmt)
        return stmt

    def execute_async(self, stmt: Any, params: tuple[Any, ...]) -> _ResponseFuture:
        self.executed.append((stmt.cql, params))
        rf = _ResponseFuture(self.answer(stmt.cql, params), self.sync)
        self.futures.append(rf)
        return rf
