"""Reads of the worker's tables, as coroutines.

Every query is a prepared statement on one partition (no ALLOW FILTERING, no
secondary index). ``session.execute_async`` runs on the driver's own I/O
thread; its callbacks complete an asyncio future on the API's loop through
``call_soon_threadsafe``, so a slow read never blocks the event loop and no
thread pool is needed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.query import PreparedStatement, dict_factory

from api.errors import StorageUnavailable
from api.settings import ApiSettings
from kit.cql import DRIVER_ERRORS, load_balancing, make_cluster

__all__ = ["FILL_COLUMNS", "HISTORY_COLUMNS", "MAX_BIGINT", "ORDER_COLUMNS", "Cursor", "Store", "connect"]

Row = dict[str, Any]
Cursor = tuple[int, int]
"""(epoch, seq) of a user update: a live stream's position."""

MAX_BIGINT = 2**63 - 1
"""Largest CQL bigint: ids above it are rejected as bad parameters before they reach the driver."""

ORDER_COLUMNS = (
    "user_id", "epoch", "order_id", "client_order_id", "symbol", "side", "order_type", "time_in_force", "price",
    "qty", "quote_budget", "filled_qty", "remaining_qty", "quote_filled", "status", "created_ns", "updated_ns",
    "expire_ns", "seq",
)  # fmt: skip
"""Every column of an order row the API shows (never ``events``: an order's map of events can be large)."""
HISTORY_COLUMNS = (*ORDER_COLUMNS, "reason")
FILL_COLUMNS = (
    "user_id", "ts_ns", "epoch", "seq", "liquidity", "trade_id", "order_id", "symbol", "side", "price", "qty",
    "quote_qty", "fee",
)  # fmt: skip
_PROBE = "epoch, order_id, created_ns"
TABLES = ("order_history", "active_orders")


def connect(s: ApiSettings) -> tuple[Cluster, Session]:
    profile = ExecutionProfile(
        # Token-aware: every read here is a single-partition read, so it can go straight to a replica.
        load_balancing_policy=load_balancing(s.cql_local_dc),
        consistency_level=ConsistencyLevel.name_to_value[s.cql_consistency],
        request_timeout=s.cql_request_timeout_s,
        row_factory=dict_factory,
    )
    cluster = make_cluster(s.hosts, s.cql_port, profile, auth=s.cql_auth)
    try:
        return cluster, cluster.connect()
    except Exception:
        cluster.shutdown()
        raise


def _aio(rf: ResponseFuture) -> asyncio.Future[list[Row]]:
    """All pages of ``rf`` as an asyncio future of the current loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[Row]] = loop.create_future()
    rows: list[Row] = []

    def settle(value: list[Row] | BaseException) -> None:
        if fut.done():  # the awaiting request was cancelled (client gone)
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    def on_page(page: list[Row]) -> None:
        rows.extend(page)
        if rf.has_more_pages:
            rf.start_fetching_next_page()  # the driver calls on_page again with the next page
        else:
            loop.call_soon_threadsafe(settle, rows)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(settle, exc)

    rf.add_callbacks(on_page, on_error)
    return fut


class Store:
    """Every read the API makes, each a prepared single-partition query (see ``docs/api.md``)."""

    def __init__(self, session: Session, keyspace: str) -> None:
        self.session = session
        ks = keyspace

        def prep(cql: str) -> PreparedStatement:
            stmt = session.prepare(cql)
            stmt.is_idempotent = True  # reads only: the driver may retry and speculate freely
            return stmt

        self._ping = prep("SELECT key FROM system.local")
        history, active = ", ".join(HISTORY_COLUMNS), ", ".join(ORDER_COLUMNS)
        self._order = prep(f"SELECT {history} FROM {ks}.order_history WHERE user_id = ? AND epoch = ? AND order_id = ?")
        self._by_id_newest = prep(f"SELECT order_id, epoch, user_id FROM {ks}.orders_by_id WHERE order_id = ? LIMIT 1")
        self._by_id_epoch = prep(
            f"SELECT order_id, epoch, user_id FROM {ks}.orders_by_id WHERE order_id = ? AND epoch = ?"
        )
        self._by_client_id = prep(
            f"SELECT epoch, order_id FROM {ks}.orders_by_client_id WHERE user_id = ? AND client_order_id = ? LIMIT 1"
        )
        self._events_map = prep(
            f"SELECT events FROM {ks}.order_history WHERE user_id = ? AND epoch = ? AND order_id = ?"
        )
        # Orders written before the events map (migration 002) keep their events in order_events.
        self._events_old = prep(f"SELECT seq, payload FROM {ks}.order_events WHERE epoch = ? AND order_id = ?")
        self._stats = prep(f"SELECT * FROM {ks}.order_statistics WHERE user_id = ?")
        # Order walks (api.query): per table, per direction, from the start or after / at a position.
        self._walk: dict[tuple[str, bool, str], PreparedStatement] = {}
        self._probe: dict[tuple[str, str], PreparedStatement] = {}
        for table, cols in (("order_history", history), ("active_orders", active)):
            base = f"SELECT {cols} FROM {ks}.{table} WHERE user_id = ?"
            asc = " ORDER BY epoch ASC, order_id ASC"
            for desc, order, lt, le in ((True, "", "<", "<="), (False, asc, ">", ">=")):
                self._walk[(table, desc, "start")] = prep(f"{base}{order} LIMIT ?")
                self._walk[(table, desc, "after")] = prep(f"{base} AND (epoch, order_id) {lt} (?, ?){order} LIMIT ?")
                self._walk[(table, desc, "at")] = prep(f"{base} AND (epoch, order_id) {le} (?, ?){order} LIMIT ?")
            probe = f"SELECT {_PROBE} FROM {ks}.{table} WHERE user_id = ?"
            self._probe[(table, "newest")] = prep(f"{probe} LIMIT 1")
            self._probe[(table, "oldest_in")] = prep(f"{probe} AND epoch = ? ORDER BY epoch ASC, order_id ASC LIMIT 1")
            self._probe[(table, "newest_before")] = prep(f"{probe} AND epoch < ? LIMIT 1")
            self._probe[(table, "at_or_below")] = prep(f"{probe} AND epoch = ? AND order_id <= ? LIMIT 1")
        self._order_window = prep(
            f"SELECT user_id, created_ns, updated_ns FROM {ks}.order_history "
            "WHERE user_id = ? AND epoch = ? AND order_id = ?"
        )
        fills = ", ".join(FILL_COLUMNS)
        self._months = prep(f"SELECT month FROM {ks}.user_trade_months WHERE user_id = ?")
        fbase = f"SELECT {fills} FROM {ks}.user_trades WHERE user_id = ? AND month = ?"
        fasc = " ORDER BY ts_ns ASC, epoch ASC, seq ASC, liquidity ASC"
        self._fills = {
            (True, False): prep(f"{fbase} LIMIT ?"),
            (True, True): prep(f"{fbase} AND (ts_ns, epoch, seq, liquidity) < (?, ?, ?, ?) LIMIT ?"),
            (False, False): prep(f"{fbase}{fasc} LIMIT ?"),
            (False, True): prep(f"{fbase} AND (ts_ns, epoch, seq, liquidity) > (?, ?, ?, ?){fasc} LIMIT ?"),
        }
        self._updates_first = prep(f"SELECT epoch, seq FROM {ks}.user_updates WHERE user_id = ? AND day = ? LIMIT 1")
        self._updates_last = prep(
            f"SELECT epoch, seq FROM {ks}.user_updates WHERE user_id = ? AND day = ? "
            "ORDER BY epoch DESC, seq DESC LIMIT 1"
        )
        self._updates_after = prep(
            f"SELECT epoch, seq, payload FROM {ks}.user_updates WHERE user_id = ? AND day = ? "
            "AND (epoch, seq) > (?, ?) LIMIT ?"
        )
        self._updates_at_or_before = prep(
            f"SELECT epoch, seq, payload FROM {ks}.user_updates WHERE user_id = ? AND day = ? "
            "AND (epoch, seq) <= (?, ?) ORDER BY epoch DESC, seq DESC LIMIT 1"
        )

    async def _rows(self, stmt: PreparedStatement, params: tuple[Any, ...]) -> list[Row]:
        # The one place driver errors become the API's: every caller sees StorageUnavailable.
        try:
            return await _aio(self.session.execute_async(stmt, params))
        except DRIVER_ERRORS as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Readiness: returns when Cassandra answers a trivial read; StorageUnavailable otherwise."""
        await self._rows(self._ping, ())

    # ------------------------------------------------------------------ orders
    async def order_rows(
        self, table: str, user_id: int, desc: bool, after: tuple[int, int] | None, inclusive: bool, limit: int
    ) -> list[Row]:
        """A user's orders of ``table`` in key order (``desc``: newest first) after ``after``."""
        if after is None:
            return await self._rows(self._walk[(table, desc, "start")], (user_id, limit))
        return await self._rows(self._walk[(table, desc, "at" if inclusive else "after")], (user_id, *after, limit))

    async def order_probe(self, table: str, user_id: int, kind: str, epoch: int = 0, order_id: int = 0) -> Row | None:
        """One (epoch, order_id, created_ns) row of the user's partition (``api.query.bound_at``)."""
        params: tuple[Any, ...] = {
            "newest": (user_id,),
            "oldest_in": (user_id, epoch),
            "newest_before": (user_id, epoch),
            "at_or_below": (user_id, epoch, order_id),
        }[kind]
        rows = await self._rows(self._probe[(table, kind)], params)
        return rows[0] if rows else None

    async def order_ref(self, order_id: int, epoch: int | None) -> Row | None:
        """The orders_by_id row of an order: its newest epoch unless one is given."""
        if epoch is None:
            rows = await self._rows(self._by_id_newest, (order_id,))
        else:
            rows = await self._rows(self._by_id_epoch, (order_id, epoch))
        return rows[0] if rows else None

    async def order(self, user_id: int, epoch: int, order_id: int) -> Row | None:
        rows = await self._rows(self._order, (user_id, epoch, order_id))
        return rows[0] if rows else None

    async def order_by_client_id(self, user_id: int, client_order_id: str) -> Row | None:
        """The user's newest order placed with ``client_order_id``, or None."""
        rows = await self._rows(self._by_client_id, (user_id, client_order_id))
        return await self.order(user_id, rows[0]["epoch"], rows[0]["order_id"]) if rows else None

    async def order_window(self, user_id: int, epoch: int, order_id: int) -> Row | None:
        """(created_ns, updated_ns) of one order of the user: when its fills can have happened."""
        rows = await self._rows(self._order_window, (user_id, epoch, order_id))
        return rows[0] if rows else None

    async def order_events(self, user_id: int, epoch: int, order_id: int) -> list[bytes]:
        """Encoded payloads of an order's events, in seq order: its order_history row's map."""
        rows = await self._rows(self._events_map, (user_id, epoch, order_id))
        events = rows[0]["events"] if rows else None
        if events:
            return [events[seq] for seq in sorted(events)]
        return [row["payload"] for row in await self._rows(self._events_old, (epoch, order_id))]

    async def statistics(self, user_id: int) -> list[Row]:
        return await self._rows(self._stats, (user_id,))

    # ------------------------------------------------------------------- fills
    async def trade_months(self, user_id: int) -> list[int]:
        return [row["month"] for row in await self._rows(self._months, (user_id,))]

    async def fill_rows(
        self, user_id: int, month: int, desc: bool, after: tuple[int, int, int, str] | None, limit: int
    ) -> list[Row]:
        if after is None:
            return await self._rows(self._fills[(desc, False)], (user_id, month, limit))
        return await self._rows(self._fills[(desc, True)], (user_id, month, *after, limit))

    # ------------------------------------------------------------- the stream
    async def user_update_first(self, user_id: int, day: dt.date) -> Cursor | None:
        """The lowest (epoch, seq) of a user's day partition, or None when it is empty."""
        rows = await self._rows(self._updates_first, (user_id, day))
        return (rows[0]["epoch"], rows[0]["seq"]) if rows else None

    async def user_update_last(self, user_id: int, day: dt.date) -> Cursor | None:
        """The highest (epoch, seq) of a user's day partition, or None when it is empty."""
        rows = await self._rows(self._updates_last, (user_id, day))
        return (rows[0]["epoch"], rows[0]["seq"]) if rows else None

    async def user_updates_after(self, user_id: int, day: dt.date, after: Cursor, limit: int) -> list[Row]:
        """Up to ``limit`` of a user's updates of one day with (epoch, seq) > ``after``, ascending."""
        return await self._rows(self._updates_after, (user_id, day, *after, limit))

    async def user_update_at_or_before(self, user_id: int, day: dt.date, at: Cursor) -> Row | None:
        """The newest of a user's updates of one day with (epoch, seq) <= ``at`` (epoch, seq, payload), or None."""
        rows = await self._rows(self._updates_at_or_before, (user_id, day, *at))
        return rows[0] if rows else None
