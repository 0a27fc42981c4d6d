"""The original service's balance scenarios, every field of both sides checked.

Each helper runs ``check_invariants()`` after every command, so a scenario
that passes also proves conservation, non-negativity and lock accounting at
every step.
"""

from __future__ import annotations

import pytest

from engine.commands import AdvanceTime, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import Balance, SymbolSpec
from engine.reference import ReferenceEngine
from schemas.events import (
    BalanceReason,
    BalanceUpdate,
    OrderStatus,
    OrderType,
    OrderUpdate,
    RejectReason,
    Side,
    TimeInForce,
    Trade,
)

BUY, SELL, LIMIT, MARKET = Side.BUY, Side.SELL, OrderType.LIMIT, OrderType.MARKET
GTC, IOC, FOK, GTT = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTT
ALICE, BOB = 1, 2


@pytest.fixture(params=[Engine, ReferenceEngine], ids=["fast", "reference"])
def ex(request):
    engine = request.param([SymbolSpec("BTC-USD", "BTC", "USD")], epoch=1)
    return _Exchange(engine)


class _Exchange:
    def __init__(self, engine):
        self.engine = engine
        self.ts = 0
        self.events = []

    def do(self, cmd_cls, *args, **kw):
        self.ts += 1
        result = self.engine.execute(cmd_cls(self.ts, *args, **kw))
        assert self.engine.check_invariants() == []
        self.events.extend(result.events)
        return result

    def place(self, user, side, qty, price=0, otype=LIMIT, tif=GTC, **kw):
        return self.do(PlaceOrder, user, "BTC-USD", side, otype, tif, qty, price, **kw)

    def bal(self, user):
        return self.engine.balance(user, "BTC"), self.engine.balance(user, "USD")

    def statuses(self, order_id):
        return [e.status for e in self.events if isinstance(e, OrderUpdate) and e.order_id == order_id]


def test_deposit_and_withdraw(ex):
    ex.do(Deposit, ALICE, "USD", 1_000)
    assert ex.bal(ALICE) == (Balance(0, 0), Balance(1_000, 0))
    assert ex.do(Withdraw, ALICE, "USD", 1_001).reason is RejectReason.INSUFFICIENT_FUNDS
    assert ex.do(Withdraw, ALICE, "USD", 400).accepted
    assert ex.bal(ALICE) == (Balance(0, 0), Balance(600, 0))
    assert ex.do(Deposit, ALICE, "DOGE", 5).reason is RejectReason.UNKNOWN_ASSET
    assert ex.do(Deposit, ALICE, "USD", 0).reason is RejectReason.INVALID_AMOUNT
    reasons = [e.reason for e in ex.events if isinstance(e, BalanceUpdate)]
    assert reasons == [BalanceReason.DEPOSIT, BalanceReason.WITHDRAW]


def test_lock_on_buy_and_on_sell(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    ex.place(ALICE, BUY, 10, 100)
    ex.place(BOB, SELL, 20, 200)
    assert ex.bal(ALICE) == (Balance(0, 0), Balance(9_000, 1_000))
    assert ex.bal(BOB) == (Balance(30, 20), Balance(0, 0))


def test_full_trade_settles_both_sides(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    sell = ex.place(BOB, SELL, 10, 100).order_id
    buy = ex.place(ALICE, BUY, 10, 100).order_id
    assert ex.bal(ALICE) == (Balance(10, 0), Balance(9_000, 0))
    assert ex.bal(BOB) == (Balance(40, 0), Balance(1_000, 0))
    assert ex.statuses(sell) == [OrderStatus.NEW, OrderStatus.FILLED]
    assert ex.statuses(buy) == [OrderStatus.NEW, OrderStatus.FILLED]
    (trade,) = [e for e in ex.events if isinstance(e, Trade)]
    assert (trade.price, trade.qty, trade.quote_qty, trade.taker_side) == (100, 10, 1_000, BUY)
    assert (trade.maker_order_id, trade.taker_order_id, trade.maker_user_id, trade.taker_user_id) == (
        sell,
        buy,
        BOB,
        ALICE,
    )
    assert ex.engine.open_orders(ALICE) == [] and ex.engine.open_orders(BOB) == []


def test_partial_fill_then_fill(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    buy = ex.place(ALICE, BUY, 10, 100).order_id
    ex.place(BOB, SELL, 4, 100)
    assert ex.bal(ALICE) == (Balance(4, 0), Balance(9_000, 600))
    (open_order,) = ex.engine.open_orders(ALICE)
    assert (open_order.filled_qty, open_order.remaining_qty, open_order.quote_filled) == (4, 6, 400)
    assert open_order.status is OrderStatus.PARTIALLY_FILLED
    ex.place(BOB, SELL, 6, 100)
    assert ex.bal(ALICE) == (Balance(10, 0), Balance(9_000, 0))
    assert ex.bal(BOB) == (Balance(40, 0), Balance(1_000, 0))
    assert ex.statuses(buy) == [OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED]


def test_partial_fill_then_cancel_unlocks_the_rest(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    buy = ex.place(ALICE, BUY, 10, 100, client_order_id="mine").order_id
    ex.place(BOB, SELL, 3, 100)
    assert ex.do(CancelOrder, ALICE, client_order_id="mine").accepted
    assert ex.bal(ALICE) == (Balance(3, 0), Balance(9_700, 0))
    assert ex.statuses(buy)[-1] is OrderStatus.CANCELLED
    last = [e for e in ex.events if isinstance(e, BalanceUpdate)][-1]
    assert (last.user_id, last.asset, last.reason, last.delta_available, last.delta_locked) == (
        ALICE,
        "USD",
        BalanceReason.ORDER_UNLOCK,
        700,
        -700,
    )
    assert ex.do(CancelOrder, ALICE, order_id=buy).reason is RejectReason.UNKNOWN_ORDER


def test_price_improvement_is_refunded_to_the_buyer(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    ex.place(BOB, SELL, 10, 90)
    ex.place(ALICE, BUY, 10, 100)
    assert ex.bal(ALICE) == (Balance(10, 0), Balance(9_100, 0))
    assert ex.bal(BOB) == (Balance(40, 0), Balance(900, 0))


def test_failed_orders_leave_balances_untouched(ex):
    ex.do(Deposit, ALICE, "USD", 500)
    before = ex.bal(ALICE)
    cases = [
        (dict(side=BUY, qty=10, price=100), RejectReason.INSUFFICIENT_FUNDS),
        (dict(side=BUY, qty=0, price=10), RejectReason.INVALID_QUANTITY),
        (dict(side=BUY, qty=1, price=0), RejectReason.INVALID_PRICE),
        (dict(side=BUY, qty=1, price=0, otype=MARKET, tif=GTC), RejectReason.INVALID_TIME_IN_FORCE),
        (dict(side=BUY, qty=1, price=0, otype=MARKET, tif=IOC), RejectReason.INVALID_BUDGET),
        (dict(side=BUY, qty=1, price=10, tif=GTT, expire_ns=1), RejectReason.INVALID_EXPIRY),
    ]
    for kw, reason in cases:
        result = ex.place(ALICE, **kw)
        assert (result.accepted, result.reason) == (False, reason)
        (ev,) = result.events
        assert (ev.status, ev.reason, ev.order_id) == (OrderStatus.REJECTED, reason, result.order_id)
    assert ex.place(0, BUY, 1, 10).reason is RejectReason.INVALID_USER
    bad_symbol = ex.do(PlaceOrder, ALICE, "XRP-USD", BUY, LIMIT, GTC, 1, 10)
    assert bad_symbol.reason is RejectReason.UNKNOWN_SYMBOL
    ex.place(ALICE, BUY, 1, 10, client_order_id="x")
    assert ex.place(ALICE, BUY, 1, 10, client_order_id="x").reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID
    ex.do(CancelOrder, ALICE, client_order_id="x")
    assert ex.bal(ALICE) == before
    assert not any(
        isinstance(e, BalanceUpdate) and e.reason is BalanceReason.ORDER_LOCK and e.locked > 10 for e in ex.events
    )


def test_many_orders_and_cancels_interleaved_end_at_zero_locked(ex):
    ex.do(Deposit, ALICE, "USD", 100_000)
    ex.do(Deposit, BOB, "BTC", 1_000)
    ids = []
    for i in range(40):
        ids.append(ex.place(ALICE, BUY, 1 + i % 3, 90 + i % 7).order_id)
        ids.append(ex.place(BOB, SELL, 1 + i % 4, 95 + i % 9).order_id)
        if i % 3 == 0:
            ex.do(CancelOrder, ALICE, order_id=ids[-2])
    for user in (ALICE, BOB):
        for o in ex.engine.open_orders(user):
            assert ex.do(CancelOrder, user, order_id=o.order_id).accepted
    alice, bob = ex.bal(ALICE), ex.bal(BOB)
    assert alice[0].locked == alice[1].locked == bob[0].locked == bob[1].locked == 0
    assert alice[0].available + bob[0].available == 1_000
    assert alice[1].available + bob[1].available == 100_000


def test_ioc_fok_and_gtt_expire_and_unlock(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    ex.place(BOB, SELL, 5, 100)
    ioc = ex.place(ALICE, BUY, 8, 100, tif=IOC).order_id
    assert ex.statuses(ioc) == [OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED, OrderStatus.EXPIRED]
    assert ex.bal(ALICE) == (Balance(5, 0), Balance(9_500, 0))
    fok = ex.place(ALICE, BUY, 8, 100, tif=FOK)
    assert ex.statuses(fok.order_id) == [OrderStatus.EXPIRED] and len(fok.events) == 1
    gtt = ex.place(ALICE, BUY, 2, 50, tif=GTT, expire_ns=ex.ts + 10).order_id
    assert ex.bal(ALICE)[1] == Balance(9_400, 100)
    ex.ts += 20
    ex.do(AdvanceTime)
    assert ex.statuses(gtt) == [OrderStatus.NEW, OrderStatus.EXPIRED]
    assert ex.bal(ALICE) == (Balance(5, 0), Balance(9_500, 0))


def test_market_buy_spends_within_budget_and_returns_the_rest(ex):
    ex.do(Deposit, ALICE, "USD", 1_000)
    ex.do(Deposit, BOB, "BTC", 50)
    ex.place(BOB, SELL, 3, 100)
    ex.place(BOB, SELL, 3, 120)
    mkt = ex.place(ALICE, BUY, 10, 0, otype=MARKET, tif=IOC, quote_budget=600).order_id
    # 3 @ 100 = 300, then 2 @ 120 = 240 (a third would exceed the budget): 540 spent.
    assert ex.bal(ALICE) == (Balance(5, 0), Balance(460, 0))
    assert ex.statuses(mkt)[-1] is OrderStatus.EXPIRED


def test_fees_are_floored_and_credited_to_the_fee_account():
    engine = Engine([SymbolSpec("BTC-USD", "BTC", "USD")], epoch=1, maker_fee_bps=10, taker_fee_bps=25, fee_account=99)
    engine.execute(Deposit(1, ALICE, "USD", 100_000))
    engine.execute(Deposit(2, BOB, "BTC", 1_000))
    engine.execute(PlaceOrder(3, BOB, "BTC-USD", SELL, LIMIT, GTC, 399, 101))
    result = engine.execute(PlaceOrder(4, ALICE, "BTC-USD", BUY, LIMIT, GTC, 399, 101))
    (trade,) = [e for e in result.events if isinstance(e, Trade)]
    # taker (buyer) receives 399 BTC: fee floor(399*25/10000) = 0; maker (seller) receives
    # 40299 USD: fee floor(40299*10/10000) = 40.
    assert (trade.taker_fee, trade.maker_fee) == (0, 40)
    assert engine.balance(BOB, "USD") == Balance(40_259, 0)
    assert engine.balance(99, "USD") == Balance(40, 0)
    assert engine.check_invariants() == []


def test_every_status_is_emitted(ex):
    ex.do(Deposit, ALICE, "USD", 10_000)
    ex.do(Deposit, BOB, "BTC", 50)
    ex.place(BOB, SELL, 4, 100)
    ex.place(ALICE, BUY, 2, 100)
    ex.place(ALICE, BUY, 2, 100)
    o = ex.place(ALICE, BUY, 1, 10).order_id
    ex.do(CancelOrder, ALICE, order_id=o)
    ex.place(ALICE, BUY, 1_000, 100)
    ex.place(ALICE, BUY, 1, 100, tif=IOC)
    seen = {e.status for e in ex.events if isinstance(e, OrderUpdate)}
    assert seen == set(OrderStatus)
