"""One symbol's order book: price levels with FIFO queues (price-time priority).

Each side keeps a dict ``price -> deque[Order]`` and a sorted list of its
prices, so the best price is ``prices[0]`` in O(1), a new level costs one
``bisect.insort`` and removing an order from the front of a level (the common
case: it was filled) is O(1). Cancelling from the middle of a level is
O(level length), which is short in practice and keeps the structure simple.

Standard library only.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from engine.events import OrderStatus, OrderType, OrderUpdate, Side, TimeInForce

__all__ = ["Order", "OrderBook"]


class Order:
    """The mutable, live state of one order inside the engine."""

    __slots__ = (
        "client_order_id",
        "created_ns",
        "expire_ns",
        "filled_qty",
        "last_event",
        "lock_asset",
        "locked",
        "order_id",
        "order_type",
        "price",
        "qty",
        "quote_budget",
        "quote_filled",
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
        self.status = OrderStatus.NEW
        self.created_ns = created_ns
        self.updated_ns = created_ns
        self.expire_ns = expire_ns
        self.lock_asset = lock_asset
        self.locked = 0
        """What this order still holds locked, in ``lock_asset``."""
        self.last_event: OrderUpdate | None = None
        """The last OrderUpdate emitted for this order (its state as consumers know it)."""

    @property
    def remaining(self) -> int:
        return self.qty - self.filled_qty


class _Side:
    __slots__ = ("levels", "prices", "sign")

    def __init__(self, sign: int) -> None:
        # Prices are stored as sign * price so that both sides sort ascending
        # with the best price first: bids use -price, asks use +price.
        self.sign = sign
        self.prices: list[int] = []
        self.levels: dict[int, deque[Order]] = {}

    def add(self, order: Order) -> None:
        key = self.sign * order.price
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = deque()
            bisect.insort(self.prices, key)
        level.append(order)

    def remove(self, order: Order) -> None:
        key = self.sign * order.price
        level = self.levels[key]
        if level[0] is order:
            level.popleft()
        else:
            level.remove(order)
        if not level:
            del self.levels[key]
            del self.prices[bisect.bisect_left(self.prices, key)]

    def best(self) -> Order | None:
        if not self.prices:
            return None
        return self.levels[self.prices[0]][0]

    def iter_orders(self) -> Iterator[Order]:
        """Every resting order, best price first, FIFO within a price."""
        for key in self.prices:
            yield from self.levels[key]


class OrderBook:
    """Bids and asks of one symbol."""

    __slots__ = ("asks", "bids", "symbol")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids = _Side(-1)
        self.asks = _Side(+1)

    def side(self, side: Side) -> _Side:
        return self.bids if side is Side.BUY else self.asks

    def opposite(self, side: Side) -> _Side:
        return self.asks if side is Side.BUY else self.bids

    def add(self, order: Order) -> None:
        self.side(order.side).add(order)

    def remove(self, order: Order) -> None:
        self.side(order.side).remove(order)

    def snapshot(self) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
        """(bids, asks) as [(price, [order_id, ...]), ...], best first: for state hashes."""
        out = []
        for s in (self.bids, self.asks):
            out.append([(s.sign * key, [o.order_id for o in s.levels[key]]) for key in s.prices])
        return out[0], out[1]
