"""Reads of the worker's tables, as coroutines.

Every query is a prepared statement on one partition (no ALLOW FILTERING, no
secondary index). ``session.execute_async`` runs on the driver's own I/O
thread; its callbacks complete an asyncio future on the API's loop through
``call_soon_threadsafe``, so a slow read never blocks the event loop and no
thread pool is needed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import struct
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import PreparedStatement, dict_factory

from api.settings import ApiSettings
from streams.sink import make_cluster

__all__ = ["MAX_BIGINT", "Cursor", "Store", "connect", "decode_cursor", "encode_cursor"]

Row = dict[str, Any]
Cursor = tuple[int, int]
"""(epoch, order_id) of the last order of a history page, or (epoch, seq) of a user update."""

_CURSOR = struct.Struct(">Bqq")
_CURSOR_VERSION = 1
MAX_BIGINT = 2**63 - 1
"""Largest CQL bigint: ids above it are rejected as bad parameters before they reach the driver."""


def encode_cursor(cursor: Cursor) -> str:
    """Opaque to clients: the version byte lets the format change without breaking cursors in flight."""
    return base64.urlsafe_b64encode(_CURSOR.pack(_CURSOR_VERSION, *cursor)).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """The (epoch, order_id) of a cursor from ``encode_cursor``; ValueError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not a cursor") from exc
    if len(raw) != _CURSOR.size:
        raise ValueError("not a cursor")
    version, epoch, order_id = _CURSOR.unpack(raw)
    if version != _CURSOR_VERSION or epoch < 0 or order_id < 0:
        raise ValueError("not a cursor")
    return epoch, order_id


def connect(s: ApiSettings) -> tuple[Cluster, Session]:
    profile = ExecutionProfile(
        # Token-aware: every read here is a single-partition read, so it can go straight to a replica.
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        consistency_level=ConsistencyLevel.name_to_value[s.cql_consistency],
        request_timeout=s.cql_request_timeout_s,
        row_factory=dict_factory,
    )
    cluster = make_cluster(s.hosts, s.cql_port, profile)
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
    def __init__(self, session: Session, keyspace: str) -> None:
        self.session = session
        ks = keyspace

        def prep(cql: str) -> PreparedStatement:
            stmt = session.prepare(cql)
            stmt.is_idempotent = True  # reads only: the driver may retry and speculate freely
            return stmt

        self._release = prep("SELECT release_version FROM system.local")
        self._active = prep(f"SELECT * FROM {ks}.active_orders WHERE user_id = ?")
        self._history_first = prep(f"SELECT * FROM {ks}.order_history WHERE user_id = ? LIMIT ?")
        self._history_after = prep(
            f"SELECT * FROM {ks}.order_history WHERE user_id = ? AND (epoch, order_id) < (?, ?) LIMIT ?"
        )
        self._order = prep(f"SELECT * FROM {ks}.order_history WHERE user_id = ? AND epoch = ? AND order_id = ?")
        self._by_id_newest = prep(f"SELECT * FROM {ks}.orders_by_id WHERE order_id = ? LIMIT 1")
        self._by_id_epoch = prep(f"SELECT * FROM {ks}.orders_by_id WHERE order_id = ? AND epoch = ?")
        self._events = prep(f"SELECT seq, payload FROM {ks}.order_events WHERE epoch = ? AND order_id = ?")
        self._stats = prep(f"SELECT * FROM {ks}.order_statistics WHERE user_id = ?")
        self._updates_first = prep(f"SELECT epoch, seq FROM {ks}.user_updates WHERE user_id = ? AND day = ? LIMIT 1")
        self._updates_last = prep(
            f"SELECT epoch, seq FROM {ks}.user_updates WHERE user_id = ? AND day = ? "
            "ORDER BY epoch DESC, seq DESC LIMIT 1"
        )
        self._updates_after = prep(
            f"SELECT epoch, seq, payload FROM {ks}.user_updates WHERE user_id = ? AND day = ? "
            "AND (epoch, seq) > (?, ?) LIMIT ?"
        )

    async def _rows(self, stmt: PreparedStatement, params: tuple[Any, ...]) -> list[Row]:
        return await _aio(self.session.execute_async(stmt, params))

    async def release_version(self) -> str:
        rows = await self._rows(self._release, ())
        return str(rows[0]["release_version"])

    async def active_orders(self, user_id: int) -> list[Row]:
        return await self._rows(self._active, (user_id,))

    async def history(self, user_id: int, limit: int, before: Cursor | None) -> tuple[list[Row], Cursor | None]:
        """One page newest first, and the cursor of the next page (None on the last one)."""
        # One row more than asked tells whether a next page exists without an extra query.
        if before is None:
            rows = await self._rows(self._history_first, (user_id, limit + 1))
        else:
            rows = await self._rows(self._history_after, (user_id, *before, limit + 1))
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, (rows[-1]["epoch"], rows[-1]["order_id"])

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

    async def order_events(self, epoch: int, order_id: int) -> list[bytes]:
        """Encoded payloads of an order's events, in seq order."""
        return [row["payload"] for row in await self._rows(self._events, (epoch, order_id))]

    async def statistics(self, user_id: int) -> list[Row]:
        return await self._rows(self._stats, (user_id,))

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
