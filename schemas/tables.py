"""What the worker writes and the query API reads, table by table: the shared row-level contract.

The worker (``streams``) fills these tables and the API (``api``) serves them; both take the
names, the partitioning rules and the row shapes from here, so neither reaches into the other.
The CQL itself is in ``streams/cql/`` (the worker owns the schema's migrations).

Standard library only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from schemas.events import Side, Trade

__all__ = [
    "ALL_SYMBOLS",
    "MAKER",
    "MAX_TS_NS",
    "STAT_FIELDS",
    "TAKER",
    "Fill",
    "FillMonth",
    "fills_of",
    "month_of",
    "month_start_ns",
]

# --- order_statistics ---------------------------------------------------------------------------
ALL_SYMBOLS = "*"
"""The ``symbol`` of a user's order_statistics row over every symbol."""
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
"""The value columns of an order_statistics row, in the order the worker keeps them."""

# --- user_trades, user_trade_months -------------------------------------------------------------
MAKER, TAKER = "MAKER", "TAKER"
MAX_TS_NS = 253_402_300_799 * 10**9
"""9999-12-31T23:59:59Z: beyond it a time has no calendar month (and no engine emits it)."""


@dataclass(frozen=True, slots=True)
class Fill:
    """One side of a trade as the user who took it sees it: a ``user_trades`` row."""

    user_id: int
    month: int
    """YYYYMM of ts_ns in UTC: the row's partition, with user_id."""
    ts_ns: int
    epoch: int
    seq: int
    liquidity: str
    """"MAKER" or "TAKER"."""
    trade_id: int
    order_id: int
    """The user's order on this side."""
    symbol: str
    side: str
    """The user's side, "BUY" or "SELL"."""
    price: int
    qty: int
    quote_qty: int
    fee: int
    """Charged in the asset this side receives."""


FillMonth = tuple[int, int, int]
"""(user_id, month, write timestamp) of a user_trade_months row."""


def month_of(ts_ns: int) -> int:
    """YYYYMM of an engine time in UTC: the user_trades partition of a fill at that time."""
    day = dt.datetime.fromtimestamp(ts_ns // 10**9, tz=dt.UTC)
    return day.year * 100 + day.month


def month_start_ns(month: int) -> int:
    """The first nanosecond of a YYYYMM month (UTC)."""
    start = dt.datetime(month // 100, month % 100, 1, tzinfo=dt.UTC)
    return int(start.timestamp()) * 10**9


def fills_of(trade: Trade, user_id: int, month: int | None = None) -> list[Fill]:
    """``user_id``'s fills of ``trade``: one per side the user took (two for a self-trade), taker first."""
    month = month_of(trade.ts_ns) if month is None else month
    maker_side = Side.SELL if trade.taker_side is Side.BUY else Side.BUY
    out = []
    for liquidity, user, order, side, fee in (
        (TAKER, trade.taker_user_id, trade.taker_order_id, trade.taker_side, trade.taker_fee),
        (MAKER, trade.maker_user_id, trade.maker_order_id, maker_side, trade.maker_fee),
    ):
        if user == user_id:
            values = (trade.symbol, side.value, trade.price, trade.qty, trade.quote_qty, fee)
            out.append(
                Fill(user_id, month, trade.ts_ns, trade.epoch, trade.seq, liquidity, trade.trade_id, order, *values)
            )
    return out
