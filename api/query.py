"""Filtered, paged reads of one user's orders and fills: every one a bounded walk of single partitions.

Orders (``order_history``, or ``active_orders`` when only open statuses are asked for) are one
partition per user, clustered by ``(epoch, order_id)``, newest first. The engine stamps commands with a
time that never decreases and hands out order ids in command order, and a new epoch starts later
than the last one ended, so a user's orders in key order are also in creation order. A time bound
is therefore a position in the partition, found by bisection (``bound_at``: at most ``MAX_PROBES``
one-row reads, each a seek in the partition's index), and a time range is the slice between two
positions. Symbol, side and status are filters on the rows of that slice: a page reads at most
``scan_max`` rows; when the budget runs out first, it ends early with a ``next`` cursor (a page may
then hold fewer than ``limit`` orders, even none, with more to come).

Fills (``user_trades``) are one partition per user and month, clustered by ``ts_ns`` first: a time
range is a slice of each month, and ``user_trade_months`` names the months that hold any. An
``order_id`` filter reads the fills between the order's creation and its last update.

Cursors are positions (exclusive), not offsets: a page's ``next`` is the key of its last row (or of
the last row read), so pages never skip or repeat a row however the data grows meanwhile. Their
text has a fixed shape (digits and dots) that the OpenAPI document states, and every text of that
shape is a position: a request can never be schema-valid and still rejected for its cursor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.tables import MAX_TS_NS, month_of

__all__ = [
    "FILL_CURSOR",
    "MAX_PROBES",
    "ORDER_CURSOR",
    "FillCursor",
    "OrderCursor",
    "Page",
    "bound_at",
    "decode_fill_cursor",
    "decode_order_cursor",
    "encode_fill_cursor",
    "encode_order_cursor",
    "scan_fills",
    "scan_orders",
]

MAX_BIGINT = 2**63 - 1
MAX_PROBES = 96
"""One-row reads a time bound may cost: enough to bisect 64-bit order ids in a few epochs."""
_CHUNK = 500

ORDER_CURSOR = r"^[0-9]{1,19}\.[0-9]{1,19}$"
FILL_CURSOR = r"^[0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19}\.[MT]$"
OrderCursor = tuple[int, int]
"""(epoch, order_id)."""
FillCursor = tuple[int, int, int, str]
"""(ts_ns, epoch, seq, liquidity)."""
Row = dict[str, Any]


def _clamp(text: str) -> int:
    return min(int(text), MAX_BIGINT)


def encode_order_cursor(pos: OrderCursor) -> str:
    return f"{pos[0]}.{pos[1]}"


def decode_order_cursor(text: str) -> OrderCursor:
    """The position of a cursor of ``ORDER_CURSOR``'s shape (numbers beyond a bigint mean the largest one)."""
    if not re.fullmatch(ORDER_CURSOR, text):
        raise ValueError("not an order cursor")
    epoch, order_id = text.split(".")
    return _clamp(epoch), _clamp(order_id)


def encode_fill_cursor(pos: FillCursor) -> str:
    return f"{pos[0]}.{pos[1]}.{pos[2]}.{pos[3][0]}"


def decode_fill_cursor(text: str) -> FillCursor:
    if not re.fullmatch(FILL_CURSOR, text):
        raise ValueError("not a fill cursor")
    ts, epoch, seq, liquidity = text.split(".")
    return _clamp(ts), _clamp(epoch), _clamp(seq), "MAKER" if liquidity == "M" else "TAKER"


@dataclass
class Page:
    rows: list[Row]
    next: str | None
    scanned: int = 0
    """Rows read to make the page (the work bound's measure)."""


class OrderReads(Protocol):
    """What the order walks need of ``api.store.Store`` (a fake in unit tests)."""

    async def order_rows(
        self, table: str, user_id: int, desc: bool, after: OrderCursor | None, inclusive: bool, limit: int
    ) -> list[Row]:
        """Rows of ``table`` in key order (``desc``: newest first) strictly after ``after`` in that
        order (or at it, when ``inclusive``), from the partition's start when None."""
        ...

    async def order_probe(self, table: str, user_id: int, kind: str, epoch: int = 0, order_id: int = 0) -> Row | None:
        """One (epoch, order_id, created_ns) row: ``newest``; ``oldest_in`` epoch; ``newest_before``
        epoch; ``at_or_below`` (epoch, order_id) within that epoch."""
        ...


async def bound_at(store: OrderReads, table: str, user_id: int, t: int) -> tuple[Row | None, Row | None]:
    """(lo, hi) around time ``t`` in the user's partition: every row at or before ``lo`` was created
    before ``t``, every row at or after ``hi`` at or after it (None: no such row known). Exact (no
    row between them) unless the probe budget ran out, in which case they are still safe bounds."""
    probes = 1
    newest = await store.order_probe(table, user_id, "newest")
    if newest is None:
        return None, None
    if newest["created_ns"] < t:
        return newest, None
    hi = newest
    while probes < MAX_PROBES:
        epoch = hi["epoch"]
        oldest = await store.order_probe(table, user_id, "oldest_in", epoch)
        probes += 1
        if oldest is None:  # an active_orders row closed meanwhile: what is left is above hi's bound
            oldest = hi
        if oldest["created_ns"] >= t:
            hi = oldest
            prev = await store.order_probe(table, user_id, "newest_before", epoch)
            probes += 1
            if prev is None:
                return None, hi
            if prev["created_ns"] < t:
                return prev, hi
            hi = prev
            continue
        lo, floor = oldest, oldest["order_id"]
        while hi["order_id"] - floor > 1 and probes < MAX_PROBES:
            mid = (floor + hi["order_id"]) // 2
            row = await store.order_probe(table, user_id, "at_or_below", epoch, mid)
            probes += 1
            if row is None or row["created_ns"] < t:
                # No row in (row, mid]: the answer lies above mid.
                if row is not None:
                    lo = row
                floor = mid
            else:
                hi = row
        return lo, hi
    return None, hi


def _pos(row: Row) -> OrderCursor:
    return row["epoch"], row["order_id"]


async def scan_orders(
    store: OrderReads,
    table: str,
    user_id: int,
    *,
    limit: int,
    desc: bool,
    cursor: OrderCursor | None,
    since_ns: int | None,
    until_ns: int | None,
    match: Callable[[Row], bool] | None,
    scan_max: int,
) -> Page:
    """Up to ``limit`` rows created in [since_ns, until_ns) that ``match``, in key order from ``cursor``."""
    since = since_ns if since_ns is not None else 0
    until = until_ns if until_ns is not None else MAX_BIGINT + 1
    after, inclusive = cursor, False
    if cursor is None and desc and until_ns is not None:
        _lo, hi = await bound_at(store, table, user_id, until)
        if hi is not None:
            after = _pos(hi)  # hi itself is at or after `until`: excluded
    elif cursor is None and not desc and since_ns is not None:
        lo, _hi = await bound_at(store, table, user_id, since)
        if lo is not None:
            after = _pos(lo)
    out: list[Row] = []
    scanned = 0
    scan_max = max(scan_max, limit + 1)  # the budget bounds filtering: an unfiltered page is always whole
    while True:
        room = scan_max - scanned
        chunk = min(limit + 1 - len(out), room) if match is None else min(max(limit + 1, _CHUNK), room)
        rows = await store.order_rows(table, user_id, desc, after, inclusive, max(chunk, 1))
        for row in rows:
            scanned += 1
            created = row["created_ns"]
            if (desc and created < since) or (not desc and created >= until):
                return Page(out, None, scanned)  # every later row is outside the range
            if since <= created < until and (match is None or match(row)):
                if len(out) == limit:
                    return Page(out, encode_order_cursor(_pos(out[-1])), scanned)
                out.append(row)
            after = _pos(row)
        if len(rows) < chunk:
            return Page(out, None, scanned)  # the partition's end
        if len(out) == limit:  # full: whether more match is not known yet (the next page may be empty)
            return Page(out, encode_order_cursor(_pos(out[-1])), scanned)
        if scanned >= scan_max and after is not None:
            # Out of budget: go on from the last row read (a short page, perhaps an empty one).
            return Page(out, encode_order_cursor(after), scanned)


class FillReads(Protocol):
    async def trade_months(self, user_id: int) -> list[int]: ...

    async def fill_rows(self, user_id: int, month: int, desc: bool, after: FillCursor | None, limit: int) -> list[Row]:
        """Rows of one month in key order (``desc``: newest first), strictly after ``after``."""
        ...


def _fill_pos(row: Row) -> FillCursor:
    return row["ts_ns"], row["epoch"], row["seq"], row["liquidity"]


async def scan_fills(
    store: FillReads,
    user_id: int,
    *,
    limit: int,
    desc: bool,
    cursor: FillCursor | None,
    since_ns: int | None,
    until_ns: int | None,
    match: Callable[[Row], bool] | None,
    scan_max: int,
) -> Page:
    """Up to ``limit`` fills with ts_ns in [since_ns, until_ns) that ``match``, in key order from ``cursor``."""
    since = since_ns if since_ns is not None else 0
    until = until_ns if until_ns is not None else MAX_BIGINT + 1
    if since >= until:
        return Page([], None)
    first, last = month_of(min(since, MAX_TS_NS)), month_of(min(until - 1, MAX_TS_NS))
    months = sorted((m for m in await store.trade_months(user_id) if first <= m <= last), reverse=desc)
    at = month_of(min(cursor[0], MAX_TS_NS)) if cursor is not None else None
    if at is not None:
        months = [m for m in months if (m <= at if desc else m >= at)]
    # Each month's slice starts at the cursor in the cursor's month, else at the range's edge (a
    # position before every row at or after `until`, or after every row before `since`).
    edge: FillCursor | None = (until, -1, -1, "") if desc else (since, -1, -1, "")
    if until > MAX_BIGINT and desc:
        edge = None  # no upper bound: each month from its newest fill
    out: list[Row] = []
    scanned = 0
    scan_max = max(scan_max, limit + 1)
    last_pos: FillCursor | None = None
    for month in months:
        after: FillCursor | None = cursor if cursor is not None and month == at else edge
        while True:
            room = scan_max - scanned
            if room <= 0:
                return Page(out, encode_fill_cursor(last_pos) if last_pos else None, scanned)
            chunk = min(limit + 1 - len(out), room) if match is None else min(max(limit + 1, _CHUNK), room)
            rows = await store.fill_rows(user_id, month, desc, after, max(chunk, 1))
            for row in rows:
                scanned += 1
                ts = row["ts_ns"]
                if (desc and ts < since) or (not desc and ts >= until):
                    return Page(out, None, scanned)
                if since <= ts < until and (match is None or match(row)):
                    if len(out) == limit:
                        return Page(out, encode_fill_cursor(_fill_pos(out[-1])), scanned)
                    out.append(row)
                after = last_pos = _fill_pos(row)
            if len(rows) < chunk:
                break  # this month is done
            if len(out) == limit:
                return Page(out, encode_fill_cursor(_fill_pos(out[-1])), scanned)
    return Page(out, None, scanned)
