"""The wire-range rules (issue 12, item 4): what the wire cannot carry is rejected with a result and
nothing else, in both engines; the largest values they accept still encode.

Before them, ``place`` with user_id 2**64 was journaled and then killed the engine in
``header_for`` (struct.error), and every restart died again on the same seq.
"""

from __future__ import annotations

import pytest

from engine.commands import MAX_AMOUNT, MAX_CLIENT_ORDER_ID, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.reference import ReferenceEngine
from schemas.codec import decode, encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from schemas.wire import event_problem, header_for

R = RejectReason
BUY, SELL, LIMIT, MARKET = Side.BUY, Side.SELL, OrderType.LIMIT, OrderType.MARKET
GTC, IOC, GTT = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.GTT
SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD")]


@pytest.fixture(params=[Engine, ReferenceEngine], ids=["fast", "reference"])
def engine(request):
    e = request.param(SYMBOLS, epoch=1)
    for user in (1, 2):
        e.execute(Deposit(1, user, "USD", 10**9))
        e.execute(Deposit(1, user, "BTC", 10**6))
    return e


def _place(ts=10, user=1, symbol="BTC-USD", side=BUY, otype=LIMIT, tif=GTC, qty=1, price=100, budget=0, cid="", exp=0):
    return PlaceOrder(ts, user, symbol, side, otype, tif, qty, price, budget, cid, exp)


OUT_OF_RANGE = [
    (_place(user=2**64), R.INVALID_USER),
    (_place(user=2**63), R.INVALID_USER),
    (_place(user=-1), R.INVALID_USER),
    (_place(symbol="B" * 33), R.UNKNOWN_SYMBOL),
    (_place(symbol="BTC-\ud800"), R.UNKNOWN_SYMBOL),
    (_place(cid="c" * (MAX_CLIENT_ORDER_ID + 1)), R.INVALID_CLIENT_ORDER_ID),
    (_place(cid="x" * 3_000_000), R.INVALID_CLIENT_ORDER_ID),
    (_place(cid="\udfff"), R.INVALID_CLIENT_ORDER_ID),
    (_place(price=MAX_AMOUNT + 1), R.INVALID_PRICE),
    (_place(price=-(2**63) - 1), R.INVALID_PRICE),
    (_place(qty=2**64), R.INVALID_QUANTITY),
    (_place(side=SELL, price=2**31, qty=2**31), R.INVALID_QUANTITY),  # notional 2**62 > MAX_AMOUNT
    (_place(otype=MARKET, tif=IOC, price=0, budget=MAX_AMOUNT + 1), R.INVALID_BUDGET),
    (_place(tif=GTT, exp=2**63), R.INVALID_EXPIRY),
    (CancelOrder(10, 2**64, 1), R.INVALID_USER),
    (CancelOrder(10, 1, 2**63), R.UNKNOWN_ORDER),
    (CancelOrder(10, 1, 0, "c" * 65), R.INVALID_CLIENT_ORDER_ID),
    (Deposit(10, 2**64, "USD", 1), R.INVALID_USER),
    (Deposit(10, 1, "U" * 33, 1), R.UNKNOWN_ASSET),
    (Deposit(10, 1, "USD", 2**63 + 5), R.INVALID_AMOUNT),
    (Deposit(10, 1, "USD", MAX_AMOUNT), R.INVALID_AMOUNT),  # the supply would pass MAX_AMOUNT
    (Withdraw(10, 1, "USD", 2**64), R.INVALID_AMOUNT),
]


@pytest.mark.parametrize(
    ("cmd", "reason"), OUT_OF_RANGE, ids=[f"{i}-{r.value}" for i, (_, r) in enumerate(OUT_OF_RANGE)]
)
def test_out_of_range_is_a_bare_rejection(engine, cmd, reason):
    before, seq = engine.state_hash(), engine.last_seq
    assert engine.execute(cmd) == engine.execute(cmd) == type(engine.execute(cmd))(False, reason)
    assert engine.last_seq == seq and engine.state_hash() == before, "nothing changed: no id, no event"
    if isinstance(engine, Engine):
        assert engine.range_reason(cmd) is reason


def test_no_expiry_runs_for_a_command_outside_the_ranges(engine):
    gtt = engine.execute(_place(ts=10, tif=GTT, exp=20))
    assert gtt.accepted
    assert engine.execute(_place(ts=30, user=2**64)).events == ()
    expired = engine.execute(Deposit(31, 1, "USD", 1)).events
    assert isinstance(expired[0], OrderUpdate) and expired[0].status is OrderStatus.EXPIRED


def test_in_range_invalid_values_keep_their_rejected_update(engine):
    # Representable but invalid (user 0, qty 0): the order gets an id and a REJECTED update, as before.
    for cmd, reason in ((_place(user=0), R.INVALID_USER), (_place(qty=0), R.INVALID_QUANTITY)):
        result = engine.execute(cmd)
        assert (result.accepted, result.reason, len(result.events)) == (False, reason, 1)
        assert result.order_id > 0 and result.events[0].status is OrderStatus.REJECTED


def test_the_bounds_themselves_are_accepted_and_encode(engine):
    cid = "é" * MAX_CLIENT_ORDER_ID
    assert engine.execute(Deposit(5, 9, "USD", MAX_AMOUNT - 2 * 10**9)).accepted  # the supply reaches the bound
    result = engine.execute(_place(user=9, qty=MAX_AMOUNT // 2**40, price=2**40, cid=cid, tif=GTT, exp=2**63 - 1))
    assert result.accepted and result.events
    for ev in result.events:
        assert event_problem(ev) is None
        header_for(ev)
        assert decode(encode(ev)) == ev


def test_the_largest_fill_sum_fits_a_long(engine):
    """An order's quote_filled can exceed the supply: a taker sweep (at most the supply) plus its own
    fills once resting (at most its price * qty). Both bounded by MAX_AMOUNT, the sum fits."""
    whale, seller = 7, 8
    supply = 2 * 10**9
    assert engine.execute(Deposit(2, whale, "USD", MAX_AMOUNT - supply)).accepted
    assert engine.execute(Deposit(2, seller, "BTC", 2)).accepted
    assert engine.execute(_place(ts=3, user=whale, price=(MAX_AMOUNT - supply) // 1, qty=1)).accepted
    half = MAX_AMOUNT // 2
    swept = engine.execute(_place(ts=4, user=seller, side=SELL, price=half, qty=2))
    assert swept.accepted
    # The seller now holds nearly all the USD and buys its own resting lot back at its price.
    again = engine.execute(_place(ts=5, user=seller, price=half, qty=1))
    last = [e for e in again.events if isinstance(e, OrderUpdate) and e.order_id == swept.order_id][-1]
    assert last.status is OrderStatus.FILLED and last.quote_filled == MAX_AMOUNT - supply + half
    assert last.quote_filled > 2**62, "beyond what half the range holds: why MAX_AMOUNT is half of it"
    for ev in (*swept.events, *again.events):
        assert event_problem(ev) is None
        header_for(ev)
        encode(ev)
    assert engine.check_invariants() == []


def test_unchecked_execution_reproduces_the_old_engine():
    """Recovery of an old journal replays what the rules refuse with the rules of then."""
    engine = Engine(SYMBOLS, epoch=1)
    cmd = _place(user=2**64)
    result = engine.execute_unchecked(cmd)
    (ev,) = result.events
    assert (result.reason, ev.user_id, ev.status) == (R.INSUFFICIENT_FUNDS, 2**64, OrderStatus.REJECTED)
    assert event_problem(ev) == ("out_of_range", f"user_id {2**64} outside a signed 64-bit long")
    assert engine.execute(cmd) == type(result)(False, R.INVALID_USER), "checked again afterwards"
