"""Events the matching engine emits: the contract of the whole pipeline.

Every event carries the engine's ``epoch`` and a global ``seq``. Within one
epoch ``seq`` is gapless and strictly increasing across *all* event types, so
any consumer can detect a lost or duplicated event by arithmetic alone. A new
epoch starts only when an engine is started on an empty journal; a restarted
engine recovers its journal and keeps both epoch and seq.

Prices are integer ticks, quantities integer lots, amounts integer units of an
asset (quote amount = price * qty, in quote units). Nothing here is a float.

This module is part of the pure core: standard library only (``fast_constructor`` uses the optional
C build of ``schemas._avroc`` when it is there, and the standard-library twin when not).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_CLIENT_ORDER_ID",
    "MAX_NAME",
    "TERMINAL_STATUSES",
    "BalanceReason",
    "BalanceUpdate",
    "Event",
    "EventType",
    "OrderStatus",
    "OrderType",
    "OrderUpdate",
    "RejectReason",
    "Side",
    "TimeInForce",
    "Trade",
    "enum_fields",
    "event_from_plain",
    "fast_constructor",
    "field_enums",
    "python_constructor",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""Range of every integer on the wire (Avro long, CQL bigint)."""
MAX_CLIENT_ORDER_ID = 64
"""Most characters in a ``client_order_id`` (it travels in every update of its order)."""
MAX_NAME = 32
"""Most characters in a symbol or asset name."""


class Side(enum.Enum):
    BUY = "BUY"
    SELL = "SELL"


class OrderType(enum.Enum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"


class TimeInForce(enum.Enum):
    GTC = "GTC"
    """Good till cancelled."""
    IOC = "IOC"
    """Immediate or cancel: what does not fill at once expires."""
    FOK = "FOK"
    """Fill or kill: fills completely at once or expires without any fill."""
    GTT = "GTT"
    """Good till time: rests until ``expire_ns`` then expires."""


class OrderStatus(enum.Enum):
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"


TERMINAL_STATUSES = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED})


class RejectReason(enum.Enum):
    NONE = "NONE"
    """Not a rejection (the reason field of every non-rejected update)."""
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    INVALID_PRICE = "INVALID_PRICE"
    """Non-positive, not a multiple of the tick size, or set on a market order."""
    INVALID_QUANTITY = "INVALID_QUANTITY"
    """Non-positive or not a multiple of the lot size."""
    INVALID_BUDGET = "INVALID_BUDGET"
    """Market buy without a positive quote budget, or a budget on any other order."""
    INVALID_EXPIRY = "INVALID_EXPIRY"
    """GTT without an expiry in the future, or an expiry on a non-GTT order."""
    INVALID_TIME_IN_FORCE = "INVALID_TIME_IN_FORCE"
    """E.g. a market order that asks to rest (GTC/GTT)."""
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    DUPLICATE_CLIENT_ORDER_ID = "DUPLICATE_CLIENT_ORDER_ID"
    """The user already has an open order with this client_order_id."""
    INVALID_USER = "INVALID_USER"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    """Cancel of an order that is not open (command result only)."""
    INVALID_AMOUNT = "INVALID_AMOUNT"
    """Deposit/withdraw of a non-positive amount, or one beyond the amount bounds (command result only)."""
    UNKNOWN_ASSET = "UNKNOWN_ASSET"
    """Deposit/withdraw of an asset no symbol uses (command result only)."""
    INVALID_CLIENT_ORDER_ID = "INVALID_CLIENT_ORDER_ID"
    """Longer than ``MAX_CLIENT_ORDER_ID`` characters or not valid Unicode text (command result only)."""
    OTHER = "OTHER"
    """Never emitted: what a reader with an older schema sees for a newer reason."""


class BalanceReason(enum.Enum):
    DEPOSIT = "DEPOSIT"
    WITHDRAW = "WITHDRAW"
    ORDER_LOCK = "ORDER_LOCK"
    ORDER_UNLOCK = "ORDER_UNLOCK"
    """Cancel, expiry, rejection after lock, or the unused rest of a filled order."""
    TRADE = "TRADE"
    """Settlement of a trade, net of fees."""
    OTHER = "OTHER"
    """Never emitted: what a reader with an older schema sees for a newer reason."""


class EventType(enum.IntEnum):
    """Stable numeric codes; they travel in the ZeroMQ frame header."""

    ORDER_UPDATE = 1
    TRADE = 2
    BALANCE_UPDATE = 3


@dataclass(frozen=True, slots=True)
class OrderUpdate:
    """One transition of one order's lifecycle (the full order state after it)."""

    epoch: int
    """Engine epoch (see module docstring)."""
    seq: int
    """Global, gapless sequence number within the epoch."""
    ts_ns: int
    """Engine time of the command that caused this event (ns since Unix epoch)."""
    order_id: int
    """Engine-assigned, unique per epoch, also for rejected orders."""
    client_order_id: str
    """The client's own id; may be empty."""
    user_id: int
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    price: int
    """Limit price in ticks; 0 for market orders."""
    qty: int
    """Ordered quantity in lots."""
    quote_budget: int
    """Market buy: maximum quote amount to spend; 0 otherwise."""
    filled_qty: int
    remaining_qty: int
    """qty - filled_qty while open; 0 once terminal."""
    quote_filled: int
    """Cumulative sum of price * qty over fills: average price is exact."""
    status: OrderStatus
    reason: RejectReason
    last_fill_qty: int
    """Quantity of the fill that caused this update; 0 if none."""
    last_fill_price: int
    trade_id: int
    """Trade that caused this update; 0 if none."""
    created_ns: int
    updated_ns: int
    expire_ns: int
    """GTT expiry time; 0 otherwise."""
    user_seq: int = 0
    """This user's order updates within the epoch, counted gaplessly from 1: the n-th update of
    a user has user_seq n. A consumer of one user's updates can tell exactly which it has
    applied, in whatever order they arrive (0 only in records written before the field)."""


@dataclass(frozen=True, slots=True)
class Trade:
    """One match between a resting (maker) and an incoming (taker) order."""

    epoch: int
    seq: int
    ts_ns: int
    trade_id: int
    symbol: str
    price: int
    """The maker's price, in ticks."""
    qty: int
    quote_qty: int
    """price * qty."""
    taker_side: Side
    maker_order_id: int
    taker_order_id: int
    maker_user_id: int
    taker_user_id: int
    maker_fee: int
    """Charged in the asset the maker receives."""
    taker_fee: int
    """Charged in the asset the taker receives."""


@dataclass(frozen=True, slots=True)
class BalanceUpdate:
    """A user's balance of one asset after a change (absolute values: idempotent)."""

    epoch: int
    seq: int
    ts_ns: int
    user_id: int
    asset: str
    available: int
    locked: int
    delta_available: int
    delta_locked: int
    reason: BalanceReason
    ref_id: int
    """order_id or trade_id that caused the change; 0 for deposit/withdraw."""


Event: TypeAlias = OrderUpdate | Trade | BalanceUpdate


def enum_fields(cls: type[Event]) -> frozenset[str]:
    """Names of ``cls``'s fields whose values are enums (serialized by their ``.value``)."""
    return frozenset(name for name in _field_enums(cls))


def field_enums(cls: type[Event]) -> dict[str, type[enum.Enum]]:
    """Field name -> enum class, of ``cls``'s enum fields."""
    return dict(_field_enums(cls))


def event_from_plain(cls: type[Event], values: dict[str, object]) -> Event:
    """Build an event from plain values (enums given by their ``.value``), as decoders read them.

    Raises ValueError (an unknown enum value), KeyError (a missing field) or TypeError."""
    build = _BUILDERS.get(cls)
    if build is None:
        build = _BUILDERS[cls] = _builder(cls)
    return build(values)


def _builder(cls: type[Event]) -> Callable[[dict[str, object]], Event]:
    """A straight-line constructor from a dict, generated once per class (as dataclasses generate
    their __init__): decoding is on every consumer's hot path, and a loop over the fields with an
    enum lookup each costs twice as much."""
    enums = _field_enums(cls)
    env: dict[str, object] = {"cls": cls}
    args = []
    for name in cls.__dataclass_fields__:
        if name in enums:
            env[f"_{name}"] = enums[name]
            env[f"_{name}_map"] = enums[name]._value2member_map_
            args.append(f"_{name}_map.get(v[{name!r}]) or _{name}(v[{name!r}])")
        else:
            args.append(f"v[{name!r}]")
    src = "def build(v):\n    return cls(" + ", ".join(args) + ")\n"
    exec(src, env)
    build: Callable[[dict[str, object]], Event] = env["build"]  # type: ignore[assignment]
    return build


_BUILDERS: dict[type[Event], Callable[[dict[str, object]], Event]] = {}


def _field_enums(cls: type[Event]) -> dict[str, type[enum.Enum]]:
    common: dict[str, type[enum.Enum]] = {"side": Side, "taker_side": Side, "order_type": OrderType}
    common.update({"time_in_force": TimeInForce, "status": OrderStatus})
    if cls is OrderUpdate:
        common["reason"] = RejectReason
    elif cls is BalanceUpdate:
        common["reason"] = BalanceReason
    names = set(cls.__dataclass_fields__)
    return {name: enum_cls for name, enum_cls in common.items() if name in names}


_T = TypeVar("_T")

try:  # the optional C build (schemas/_avroc.c); the standard-library path below is the fallback
    from schemas._avroc import slots_constructor as _slots_constructor
except ImportError:  # pragma: no cover - depends on the build
    _slots_constructor = None  # type: ignore[assignment]


def _slot_fields(cls: type[object]) -> tuple[str, ...]:
    """The fields of ``cls``, which must be a slots dataclass whose slots are exactly its fields."""
    names = tuple(getattr(cls, "__dataclass_fields__", ()))
    if not names or getattr(cls, "__slots__", None) != names:
        raise TypeError(f"{cls.__name__} is not a slots dataclass of its fields")
    return names


def fast_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A positional constructor of the frozen slots dataclass ``cls`` (every field, in order), for
    the engine's hot path.

    A frozen dataclass's ``__init__`` stores each field with ``object.__setattr__``, about ten
    times the cost of a plain slot store, and the engine builds millions of events. This builds
    the same object through a mutable twin with the identical slot layout, whose ``__init__``
    stores the slots directly and then re-types the instance as ``cls`` (``__class__``
    assignment between classes of one layout is what CPython allows for exactly this). The
    result is an ordinary ``cls`` instance: equal, hashable and frozen as any other.

    With the optional C build (``schemas/_avroc.c``, setup.py) the same is done in C: the
    instance is allocated and each argument stored in its slot (~0.5 us less per OrderUpdate,
    docs/benchmarks.md). Without it, the Python twin below; tests build with both and compare.
    The engine's logic stays Python: only how an event object is filled differs."""
    names = _slot_fields(cls)
    if _slots_constructor is not None:
        built: Callable[..., _T] = _slots_constructor(cls, names)
        return built
    return python_constructor(cls)


def python_constructor(cls: type[_T]) -> Callable[..., _T]:
    """``fast_constructor`` in Python alone (what it is without the optional C build)."""
    names = _slot_fields(cls)
    body = "".join(f"    self.{n} = {n}\n" for n in names)
    src = f"def __init__(self, {', '.join(names)}):\n{body}    self.__class__ = cls\n"
    env: dict[str, object] = {"cls": cls}
    exec(src, env)
    twin = type(f"_Building{cls.__name__}", (), {"__slots__": names, "__init__": env["__init__"]})
    build: Callable[..., _T] = twin
    return build
