"""Response models of the API: the OpenAPI document is generated from these.

Field names are the column names of the tables (and of ``schemas.events.
OrderUpdate``), so a row maps onto a model without renaming. Prices are
integer ticks, quantities integer lots, times nanoseconds since the Unix
epoch, as everywhere in the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from schemas.symbols import SymbolSpec
from schemas.tables import STAT_FIELDS

__all__ = [
    "ActiveOrder",
    "ActiveOrders",
    "Error",
    "Fill",
    "FillsPage",
    "Health",
    "Order",
    "OrderEvent",
    "OrderEvents",
    "OrdersPage",
    "SymbolInfo",
    "SymbolStatistics",
    "Symbols",
    "UserStatistics",
    "fill_model",
    "update_dict",
]

_UPDATE_FIELDS = tuple(f.name for f in fields(OrderUpdate))


def update_dict(ev: OrderUpdate) -> dict[str, Any]:
    """An OrderUpdate as plain JSON values (enums by their value): what the stream sends and /events returns."""
    out: dict[str, Any] = {}
    for name in _UPDATE_FIELDS:
        value = getattr(ev, name)
        out[name] = getattr(value, "value", value)
    return out


class _Row(BaseModel):
    # Rows come from the driver as dicts with every column, some of which a model may not show.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ActiveOrder(_Row):
    user_id: int
    epoch: int = Field(description="Engine epoch; an order's identity is (epoch, order_id).")
    order_id: int
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    price: int = Field(description="Limit price in ticks; 0 for market orders.")
    qty: int
    quote_budget: int
    filled_qty: int
    remaining_qty: int
    quote_filled: int
    status: OrderStatus
    created_ns: int
    updated_ns: int
    expire_ns: int
    seq: int = Field(description="Seq of the event that produced this state.")


class Order(ActiveOrder):
    reason: RejectReason


class ActiveOrders(BaseModel):
    user_id: int
    orders: list[ActiveOrder] = Field(description="Open orders, newest first.")
    next: str | None = Field(
        default=None, description="Cursor of the next page (pass as `cursor`); null on the last page."
    )


class OrdersPage(BaseModel):
    user_id: int
    orders: list[Order] = Field(description="Orders in creation order (epoch, then order id): newest first by default.")
    next: str | None = Field(
        description="Cursor of the next page (pass as `cursor`, with the same filters); null on the last page. A "
        "filtered page may hold fewer orders than `limit`, even none, while `next` is not null."
    )


class Fill(_Row):
    user_id: int
    epoch: int
    seq: int = Field(description="Seq of the trade (both sides of a trade share it).")
    ts_ns: int = Field(description="Engine time of the trade, ns since the Unix epoch.")
    trade_id: int
    order_id: int = Field(description="The user's order on this side of the trade.")
    symbol: str
    side: Side = Field(description="The user's side.")
    liquidity: Literal["MAKER", "TAKER"] = Field(description="MAKER: the user's order rested; TAKER: it came in.")
    price: int = Field(description="In ticks (the maker's price).")
    qty: int = Field(description="In lots.")
    quote_qty: int = Field(description="price * qty, in quote units.")
    fee: int = Field(description="Charged in the asset this side receives (`fee_asset`).")
    fee_asset: str | None = Field(description="The asset this side receives; null for a symbol the API does not know.")


def fill_model(row: Mapping[str, Any], specs: Mapping[str, SymbolSpec]) -> Fill:
    """A user_trades row (or a ``schemas.tables.Fill`` as a dict) as the API shows it: what /trades returns
    and what the live stream sends, with the asset its fee is charged in (the one this side receives)."""
    spec = specs.get(row["symbol"])
    asset = None if spec is None else spec.base if row["side"] == Side.BUY.value else spec.quote
    return Fill.model_validate({**row, "fee_asset": asset})


class FillsPage(BaseModel):
    user_id: int
    fills: list[Fill] = Field(description="Fills by trade time, newest first by default.")
    next: str | None = Field(
        description="Cursor of the next page (pass as `cursor`, with the same filters); null on the last page. A "
        "filtered page may hold fewer fills than `limit`, even none, while `next` is not null."
    )


class SymbolInfo(BaseModel):
    symbol: str
    base: str = Field(description="Asset a buy order buys.")
    quote: str = Field(description="Asset a buy order pays.")
    tick_size: int = Field(description="Valid prices are positive multiples of this (in price units).")
    lot_size: int = Field(description="Valid quantities are positive multiples of this (in lots).")
    price_decimals: int = Field(description="A price of p reads p / 10**price_decimals.")
    qty_decimals: int = Field(description="A quantity of q reads q / 10**qty_decimals.")


class Symbols(BaseModel):
    symbols: list[SymbolInfo]


class OrderEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    epoch: int
    seq: int
    ts_ns: int
    order_id: int
    client_order_id: str
    user_id: int
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    price: int
    qty: int
    quote_budget: int
    filled_qty: int
    remaining_qty: int
    quote_filled: int
    status: OrderStatus
    reason: RejectReason
    last_fill_qty: int
    last_fill_price: int
    trade_id: int
    created_ns: int
    updated_ns: int
    expire_ns: int
    user_seq: int = Field(
        default=0, description="The update's number among the user's updates (1, 2, ...; 0 before the engine kept it)."
    )


class OrderEvents(BaseModel):
    epoch: int
    order_id: int
    events: list[OrderEvent] = Field(description="Every update of the order, in seq order.")


class SymbolStatistics(_Row):
    symbol: str = Field(description="A symbol, or '*' for all of the user's symbols together.")
    orders_new: int
    orders_partially_filled: int
    orders_filled: int
    orders_cancelled: int
    orders_rejected: int
    orders_expired: int
    fills: int
    filled_qty: int
    filled_notional: int = Field(description="Sum of fill qty * fill price, in quote units.")
    last_epoch: int
    last_seq: int = Field(description="Seq of the last event counted.")


class UserStatistics(BaseModel):
    user_id: int
    symbols: list[SymbolStatistics]


class Error(BaseModel):
    detail: str = Field(description="What went wrong, for humans; the HTTP status is the contract.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = Field(
        description='"ok", or "unavailable" (with HTTP 503) while Cassandra does not answer.'
    )
    cassandra: bool = Field(description="Whether Cassandra answered a trivial read just now.")
    live_tail: bool = Field(
        description="Whether the live stream's Kafka tail is reading (false during a broker outage: streams "
        "stay open and resume, without gap or duplicate, when it returns)."
    )


# The statistics model and the worker must agree on the counted fields: failing at import beats a silent gap.
if not set(STAT_FIELDS) <= set(SymbolStatistics.model_fields):
    raise RuntimeError(f"SymbolStatistics misses {sorted(set(STAT_FIELDS) - set(SymbolStatistics.model_fields))}")
