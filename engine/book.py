"""One symbol's order book: price levels with FIFO queues (price-time priority).

Each side keeps a dict ``key -> Level`` and a sorted list of its keys (``sign * price``, so both
sides sort ascending with the best price first): the best level is ``levels[prices[0]]`` in O(1),
a new level costs one ``bisect.insort``, and taking the front order of a level (the common case:
it was filled) is O(1). Cancelling from the middle of a level is O(level length), which is short
in practice and keeps the structure simple. A level also keeps the total remaining quantity of its
orders, so a fill-or-kill check looks at levels, not orders.

``validate`` is the book checking itself (as exchange-core's ``validateInternalState``): the price
index against the levels, each level's total and orders against what it holds, every order's side,
price and state; the engine adds what lies between books (``Engine.validate_internal_state``).

Standard library only.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import Final

from engine.ledger import Cell
from schemas.events import OrderStatus, OrderType, OrderUpdate, Side, TimeInForce

__all__ = ["Level", "Order", "OrderBook"]

_OPEN: Final = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)
# Final: the compiled build (mypyc) reads these as C statics, not through the module's dict.
_NEW: Final = OrderStatus.NEW
_BUY: Final = Side.BUY
_deque: Final = deque
_insort: Final = bisect.insort
_bisect_left: Final = bisect.bisect_left


class Order:
    """The mutable, live state of one order inside the engine."""

    __slots__ = (
        "client_order_id",
        "created_ns",
        "expire_ns",
        "filled_qty",
        "last_event",
        "lock_asset",
        "lock_cell",
        "locked",
        "order_id",
        "order_type",
        "price",
        "qty",
        "quote_budget",
        "quote_filled",
        "recv_cell",
        "side",
        "status",
        "symbol",
        "time_in_force",
        "updated_ns",
        "user_id",
    )

    def __init__(
        self,
        order_id: int,
        client_order_id: str,
        user_id: int,
        symbol: str,
        side: Side,
        order_type: OrderType,
        time_in_force: TimeInForce,
        price: int,
        qty: int,
        quote_budget: int,
        created_ns: int,
        expire_ns: int,
        lock_asset: str,
    ) -> None:
        self.order_id = order_id
        self.client_order_id = client_order_id
        self.user_id = user_id
        self.symbol = symbol
        self.side = side
        self.order_type = order_type
        self.time_in_force = time_in_force
        self.price = price
        self.qty = qty
        self.quote_budget = quote_budget
        self.filled_qty = 0
        self.quote_filled = 0
        self.status = _NEW
        self.created_ns = created_ns
        self.updated_ns = created_ns
        self.expire_ns = expire_ns
        self.lock_asset = lock_asset
        self.locked = 0
        """What this order still holds locked, in ``lock_asset``."""
        self.lock_cell: Cell | None = None
        """The ledger cell of (user, lock_asset), once the order is accepted."""
        self.recv_cell: Cell | None = None
        """The ledger cell of the asset its fills pay it (base for a buy, quote for a sell)."""
        self.last_event: OrderUpdate | None = None
        """The last OrderUpdate emitted for this order (its state as consumers know it)."""

    @property
    def remaining(self) -> int:
        return self.qty - self.filled_qty


class Level:
    """The orders resting at one price, in time priority, and their total remaining quantity."""

    __slots__ = ("orders", "total")

    def __init__(self) -> None:
        self.orders: deque[Order] = _deque()
        self.total = 0


class _Side:
    __slots__ = ("levels", "prices", "sign")

    def __init__(self, sign: int) -> None:
        # Prices are stored as sign * price so that both sides sort ascending
        # with the best price first: bids use -price, asks use +price.
        self.sign = sign
        self.prices: list[int] = []
        self.levels: dict[int, Level] = {}

    def add(self, order: Order) -> None:
        key = self.sign * order.price
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = Level()
            _insort(self.prices, key)
        level.orders.append(order)
        level.total += order.qty - order.filled_qty

    def remove(self, order: Order) -> None:
        key = self.sign * order.price
        level = self.levels[key]
        orders = level.orders
        if orders[0] is order:
            orders.popleft()
        else:
            orders.remove(order)
        level.total -= order.qty - order.filled_qty
        if not orders:
            del self.levels[key]
            del self.prices[_bisect_left(self.prices, key)]

    def filled_front(self, level: Level, qty: int, done: bool) -> None:
        """The best level's front order got ``qty`` filled; ``done``: it is filled and leaves."""
        level.total -= qty
        if done:
            level.orders.popleft()
            if not level.orders:
                del self.levels[self.prices[0]]
                del self.prices[0]

    def best(self) -> Order | None:
        if not self.prices:
            return None
        return self.levels[self.prices[0]].orders[0]

    def iter_orders(self) -> Iterator[Order]:
        """Every resting order, best price first, FIFO within a price."""
        for key in self.prices:
            yield from self.levels[key].orders

    def validate(self, name: str, side: Side) -> list[str]:
        problems: list[str] = []
        if any(a >= b for a, b in zip(self.prices, self.prices[1:], strict=False)):
            problems.append(f"{name}: price index not strictly ascending: {self.prices[:10]}")
        if set(self.prices) != set(self.levels):
            problems.append(f"{name}: price index {sorted(self.prices)[:10]} != levels {sorted(self.levels)[:10]}")
        for key, level in self.levels.items():
            if not level.orders:
                problems.append(f"{name} {self.sign * key}: an empty level")
            total = 0
            for o in level.orders:
                total += o.qty - o.filled_qty
                if o.side is not side or self.sign * o.price != key:
                    problems.append(f"{name} {self.sign * key}: order {o.order_id} ({o.side}, {o.price}) is misplaced")
                if o.status not in _OPEN or o.qty - o.filled_qty <= 0:
                    problems.append(f"{name}: order {o.order_id} rests with status {o.status}, remaining {o.remaining}")
                if o.order_type is not OrderType.LIMIT or o.time_in_force not in (TimeInForce.GTC, TimeInForce.GTT):
                    problems.append(f"{name}: order {o.order_id} ({o.order_type}, {o.time_in_force}) cannot rest")
            if total != level.total:
                problems.append(f"{name} {self.sign * key}: level total {level.total} but its orders hold {total}")
        return problems


class OrderBook:
    """Bids and asks of one symbol."""

    __slots__ = ("asks", "bids", "symbol")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids = _Side(-1)
        self.asks = _Side(+1)

    def side(self, side: Side) -> _Side:
        return self.bids if side is _BUY else self.asks

    def opposite(self, side: Side) -> _Side:
        return self.asks if side is _BUY else self.bids

    def add(self, order: Order) -> None:
        self.side(order.side).add(order)

    def remove(self, order: Order) -> None:
        self.side(order.side).remove(order)

    def orders(self) -> Iterator[Order]:
        """Every resting order, level by level (in no particular order: also when the price index is damaged)."""
        for side in (self.bids, self.asks):
            for level in side.levels.values():
                yield from level.orders

    def validate(self) -> list[str]:
        """Every inconsistency of the book's own structure, as a sentence; empty when there is none."""
        problems = self.bids.validate(f"{self.symbol} bids", Side.BUY) + self.asks.validate(
            f"{self.symbol} asks", Side.SELL
        )
        if self.bids.prices and self.asks.prices and -self.bids.prices[0] >= self.asks.prices[0]:
            problems.append(
                f"{self.symbol}: crossed book, best bid {-self.bids.prices[0]} >= best ask {self.asks.prices[0]}"
            )
        for o in self.orders():
            if o.symbol != self.symbol:
                problems.append(f"{self.symbol}: order {o.order_id} of {o.symbol} in this book")
        return problems

    def snapshot(self) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
        """(bids, asks) as [(price, [order_id, ...]), ...], best first: for state hashes."""
        out = []
        for s in (self.bids, self.asks):
            out.append([(s.sign * key, [o.order_id for o in s.levels[key].orders]) for key in s.prices])
        return out[0], out[1]
