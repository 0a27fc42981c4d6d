"""``Engine.validate_internal_state`` finds every kind of damage to the engine's own structures.

The differential test calls it after every command and requires it empty; here each structure is
damaged on purpose, one at a time, and the check must name the damage (else the differential test's
call could not fail)."""

from __future__ import annotations

import heapq

import pytest

from engine.commands import Deposit, PlaceOrder
from engine.core import Engine
from engine.interfaces import SymbolSpec
from schemas.events import OrderType, Side, TimeInForce

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD")]
BUY, SELL, LIMIT, GTC, GTT = Side.BUY, Side.SELL, OrderType.LIMIT, TimeInForce.GTC, TimeInForce.GTT


def _engine() -> Engine:
    e = Engine(SYMBOLS, epoch=1)
    for user in (1, 2):
        e.execute(Deposit(1, user, "USD", 10**6))
        e.execute(Deposit(1, user, "BTC", 10**6))
    e.execute(PlaceOrder(2, 1, "BTC-USD", BUY, LIMIT, GTC, 5, 100, client_order_id="a"))
    e.execute(PlaceOrder(2, 1, "BTC-USD", BUY, LIMIT, GTC, 3, 100))
    e.execute(PlaceOrder(2, 1, "BTC-USD", BUY, LIMIT, GTC, 2, 99, client_order_id="b"))
    e.execute(PlaceOrder(2, 2, "BTC-USD", SELL, LIMIT, GTT, 4, 110, expire_ns=10**6))
    e.execute(PlaceOrder(3, 2, "BTC-USD", SELL, LIMIT, GTC, 1, 100))  # fills part of order 1
    assert e.validate_internal_state() == [] and e.check_invariants() == []
    return e


def _bids(e: Engine):
    return e._books["BTC-USD"].bids


def _asks(e: Engine):
    return e._books["BTC-USD"].asks


DAMAGE = {
    "level total": (lambda e: setattr(_bids(e).levels[-100], "total", 999), "level total 999"),
    "price index extra": (lambda e: _bids(e).prices.append(-50), "price index"),
    "price index order": (lambda e: _bids(e).prices.reverse(), "not strictly ascending"),
    "empty level": (lambda e: _bids(e).levels[-99].orders.clear(), "an empty level"),
    "misplaced order": (
        lambda e: _bids(e).levels[-99].orders.append(_asks(e).levels[110].orders[0]),
        "misplaced",
    ),
    "open index missing": (lambda e: e._open.pop(2), "open index differ"),
    "cid index missing": (lambda e: e._cids.pop((1, "a")), "client-order-id index"),
    "cid index stale": (lambda e: e._cids.__setitem__((1, "zz"), e._open[1]), "client-order-id index"),
    "expiry heap missing": (lambda e: e._expiry.clear(), "missing from the expiry heap"),
    "expiry heap order": (
        lambda e: (heapq.heappush(e._expiry, (5, 99)), heapq.heappush(e._expiry, (3, 98)), e._expiry.reverse()),
        "not a heap",
    ),
    "order cell": (lambda e: setattr(e._open[3], "recv_cell", e._open[4].recv_cell), "cell is not its user's"),
    "terminal resting": (lambda e: setattr(e._open[2], "filled_qty", 3), "rests with status"),
    "crossed": (lambda e: setattr(_asks(e).levels[110].orders[0], "price", 90), "misplaced"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_each_kind_of_damage_is_named(name):
    e = _engine()
    damage, words = DAMAGE[name]
    damage(e)
    problems = e.validate_internal_state()
    assert any(words in p for p in problems), problems


def test_a_crossed_book_is_named():
    e = _engine()
    asks = _asks(e)
    level = asks.levels.pop(110)
    for o in level.orders:
        o.price = 95
    asks.levels[95] = level
    asks.prices[:] = [95]
    assert any("crossed book" in p for p in e.validate_internal_state())
