"""Per-user state: duplicates and stale events change nothing, statistics are exact."""

from __future__ import annotations

from engine.commands import CancelOrder, Deposit, PlaceOrder
from engine.core import Engine
from engine.events import OrderStatus, OrderType, OrderUpdate, Side, TimeInForce
from engine.interfaces import SymbolSpec
from streams.migrate import statements
from streams.state import ALL_SYMBOLS, UserState


def _updates():
    engine = Engine([SymbolSpec("BTC-USD", "BTC", "USD")], epoch=5)
    cmds = [Deposit(1, 1, "USD", 10**6), Deposit(2, 2, "BTC", 10**3)]
    cmds += [PlaceOrder(3, 2, "BTC-USD", Side.SELL, OrderType.LIMIT, TimeInForce.GTC, 10, 100)]
    cmds += [PlaceOrder(4, 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 4, 100)]
    cmds += [PlaceOrder(5, 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 3, 90)]
    cmds += [
        CancelOrder(6, 1, order_id=3),
        PlaceOrder(7, 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 0, 9),
    ]
    return [e for c in cmds for e in engine.execute(c).events if isinstance(e, OrderUpdate)]


def test_statistics_are_exact_and_duplicates_change_nothing():
    events = [e for e in _updates() if e.user_id == 1]
    state = UserState()
    assert all(state.apply(e) for e in events)
    snapshot = state.to_dict()
    for e in events:  # every event again, and in reverse: all duplicates now
        assert not state.apply(e)
    for e in reversed(events):
        assert not state.apply(e)
    assert state.to_dict() == snapshot
    total = state.stats[ALL_SYMBOLS]
    assert total["orders_new"] == 2 and total["orders_filled"] == 1 and total["orders_cancelled"] == 1
    assert total["orders_rejected"] == 1
    assert (total["fills"], total["filled_qty"], total["filled_notional"]) == (1, 4, 400)
    assert state.open_orders == {}
    assert UserState.from_dict(snapshot).to_dict() == snapshot


def test_open_orders_follow_the_lifecycle_and_a_new_epoch_clears_them():
    events = [e for e in _updates() if e.user_id == 2]
    state = UserState()
    for e in events:
        state.apply(e)
    (sell,) = [e for e in events if e.status is OrderStatus.PARTIALLY_FILLED]
    assert state.open_orders == {sell.order_id: sell.seq}
    from dataclasses import replace

    assert state.apply(replace(events[0], epoch=6, seq=1))
    assert list(state.open_orders) == [events[0].order_id] and state.epoch == 6
    assert not state.apply(replace(events[0], epoch=5, seq=10**6))  # an older epoch is stale


def test_cql_migration_files_split_into_statements():
    text = "-- comment\nCREATE TABLE {ks}.a (x int PRIMARY KEY);\n-- more\nCREATE TABLE {ks}.b (y int PRIMARY KEY);\n"
    assert statements(text, "ks1") == [
        "CREATE TABLE ks1.a (x int PRIMARY KEY)",
        "CREATE TABLE ks1.b (y int PRIMARY KEY)",
    ]
