"""Commands the matching engine accepts, and the value it returns for each.

Every command carries ``ts_ns``, the engine time at which it is applied. The
gateway stamps it on arrival and the journal stores it, so re-running the
journal's commands reproduces exactly the same events (same timestamps, same
seqs, same ids): determinism is what makes recovery checkable.

``AdvanceTime`` is how GTT expiry happens: the engine never reads a clock, the
edge sends it a tick and orders whose ``expire_ns <= ts_ns`` expire then.

Wire ranges: everything a command carries must be representable where its
events go (an Avro ``long`` and a CQL ``bigint`` are signed 64-bit; the feed
header's user keys are unsigned), and every amount small enough that nothing
derived from it can overflow. The bounds are here (the wire ranges defined by the
contract, ``schemas.events``, re-exported) so the core, the reference engine and
the gateway use the same numbers; the rules that apply them are in
``engine.core``'s docstring.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

# The wire ranges are the contract's (schemas.events); re-exported here beside the engine's own bound.
from schemas.events import (
    INT64_MAX,
    INT64_MIN,
    MAX_CLIENT_ORDER_ID,
    MAX_NAME,
    Event,
    OrderType,
    RejectReason,
    Side,
    TimeInForce,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_AMOUNT",
    "MAX_CLIENT_ORDER_ID",
    "MAX_NAME",
    "AdvanceTime",
    "CancelOrder",
    "Command",
    "CommandResult",
    "Deposit",
    "PlaceOrder",
    "Withdraw",
]

MAX_AMOUNT = 2**62 - 1
"""Largest price, quantity, quote budget, deposit or withdrawal, limit-order notional (price * qty)
and total supply of an asset (deposits - withdrawals). Half the long range, so that the largest
derived sum, an order's ``quote_filled`` (at most the supply it swept as a taker plus its own
price * qty once resting), still fits in a signed 64-bit integer."""


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    ts_ns: int
    user_id: int
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    qty: int
    """Lots; positive multiple of the symbol's lot size (market orders too)."""
    price: int = 0
    """Ticks; must be 0 for market orders."""
    quote_budget: int = 0
    """Market buy only, and required there: the most quote it may spend, which is
    what gets locked (a market buy has no price to compute a lock from)."""
    client_order_id: str = ""
    expire_ns: int = 0
    """GTT only."""


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """Cancel by ``order_id`` (when non-zero) or else by ``client_order_id``."""

    ts_ns: int
    user_id: int
    order_id: int = 0
    client_order_id: str = ""


@dataclass(frozen=True, slots=True)
class Deposit:
    ts_ns: int
    user_id: int
    asset: str
    amount: int


@dataclass(frozen=True, slots=True)
class Withdraw:
    ts_ns: int
    user_id: int
    asset: str
    amount: int


@dataclass(frozen=True, slots=True)
class AdvanceTime:
    """Expire every GTT order whose expiry is at or before ``ts_ns``."""

    ts_ns: int


Command: TypeAlias = PlaceOrder | CancelOrder | Deposit | Withdraw | AdvanceTime


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did. Rejections are values, never exceptions.

    ``accepted`` is False when the command changed nothing in the book or the
    ledger. A rejected *PlaceOrder* still yields one OrderUpdate with status
    REJECTED (the order got an id and clients must see its fate); a rejected
    cancel, deposit or withdraw yields no event, only this result.
    """

    accepted: bool
    reason: RejectReason = RejectReason.NONE
    order_id: int = 0
    """Id assigned to a placed order (also when rejected), or the cancelled one."""
    events: tuple[Event, ...] = field(default_factory=tuple)
