"""Commands the matching engine accepts, and the value it returns for each.

Every command carries ``ts_ns``, the engine time at which it is applied. The
gateway stamps it on arrival and the journal stores it, so re-running the
journal's commands reproduces exactly the same events (same timestamps, same
seqs, same ids): determinism is what makes recovery checkable.

``AdvanceTime`` is how GTT expiry happens: the engine never reads a clock, the
edge sends it a tick and orders whose ``expire_ns <= ts_ns`` expire then.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from engine.events import Event, OrderType, RejectReason, Side, TimeInForce

__all__ = [
    "AdvanceTime",
    "CancelOrder",
    "Command",
    "CommandResult",
    "Deposit",
    "PlaceOrder",
    "Withdraw",
]


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
