"""Response models of the API: the OpenAPI document is generated from these.

Field names are the column names of the tables (and of ``engine.events.
OrderUpdate``), so a row maps onto a model without renaming. Prices are
integer ticks, quantities integer lots, times nanoseconds since the Unix
epoch, as everywhere in the pipeline.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from streams.state import STAT_FIELDS

__all__ = [
    "ActiveOrder",
    "ActiveOrders",
    "Health",
    "Order",
    "OrderEvent",
    "OrderEvents",
    "OrdersPage",
    "SymbolStatistics",
    "UserStatistics",
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


class OrdersPage(BaseModel):
    user_id: int
    orders: list[Order] = Field(description="Orders newest first (epoch, then order id, descending).")
    next: str | None = Field(description="Opaque cursor of the next page (pass as `before`); null on the last page.")


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


class Health(BaseModel):
    status: str = Field(description='"ok", or "unavailable" (with HTTP 503) when Cassandra does not answer.')
    cassandra: str | None = Field(description="Cassandra release_version, when it answered.")
    live_tail: bool = Field(description="Whether the live stream's Kafka tail is running.")
    subscribers: int = Field(description="Open live stream connections of this process.")


# The statistics model and the worker must agree on the counted fields: failing at import beats a silent gap.
if not set(STAT_FIELDS) <= set(SymbolStatistics.model_fields):
    raise RuntimeError(f"SymbolStatistics misses {sorted(set(STAT_FIELDS) - set(SymbolStatistics.model_fields))}")
