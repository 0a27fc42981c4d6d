"""The fast engine and the naive reference agree on every random command stream.

Both get the same commands; results, events and state hashes must be equal,
and ``check_invariants()`` must hold in both after every single command.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.commands import AdvanceTime, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.events import OrderType, Side, TimeInForce
from engine.interfaces import SymbolSpec
from engine.reference import ReferenceEngine

settings.register_profile("default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD", tick_size=5, lot_size=2), SymbolSpec("ETH-USD", "ETH", "USD")]
USERS = st.integers(min_value=0, max_value=4)  # 0 is invalid: exercises INVALID_USER


@st.composite
def commands(draw):
    n = draw(st.integers(min_value=1, max_value=80))
    ts = 1_000
    out = []
    for _ in range(n):
        ts += draw(st.integers(min_value=0, max_value=50))
        kind = draw(st.sampled_from(["place"] * 6 + ["cancel", "cancel_cid", "deposit", "withdraw", "tick"]))
        user = draw(USERS)
        if kind == "deposit" or kind == "withdraw":
            asset = draw(st.sampled_from(["BTC", "USD", "ETH", "DOGE"]))
            amount = draw(st.integers(min_value=-5, max_value=5000))
            cls = Deposit if kind == "deposit" else Withdraw
            out.append(cls(ts, user, asset, amount))
        elif kind == "cancel":
            out.append(CancelOrder(ts, user, order_id=draw(st.integers(0, 60))))
        elif kind == "cancel_cid":
            out.append(CancelOrder(ts, user, client_order_id=draw(st.sampled_from(["", "a", "b", "c"]))))
        elif kind == "tick":
            out.append(AdvanceTime(ts))
        else:
            otype = draw(st.sampled_from([OrderType.LIMIT, OrderType.LIMIT, OrderType.MARKET]))
            side = draw(st.sampled_from([Side.BUY, Side.SELL]))
            tif = draw(st.sampled_from(list(TimeInForce)))
            price = 0 if otype is OrderType.MARKET else draw(st.sampled_from([90, 95, 100, 105, 110, 7, 0]))
            if draw(st.integers(0, 30)) == 0:
                price = draw(st.integers(-5, 120))  # sometimes invalid on purpose
            qty = draw(st.sampled_from([1, 2, 4, 6, 10, 0, -2]))
            budget = 0
            if otype is OrderType.MARKET and side is Side.BUY:
                budget = draw(st.sampled_from([0, 50, 300, 1000, 5000]))
            expire = 0
            if tif is TimeInForce.GTT:
                expire = ts + draw(st.sampled_from([-5, 0, 1, 10, 30, 200]))
            elif draw(st.integers(0, 40)) == 0:
                expire = ts + 10  # invalid: expiry on a non-GTT order
            symbol = draw(st.sampled_from(["BTC-USD", "ETH-USD", "ETH-USD", "XRP-USD"]))
            cid = draw(st.sampled_from(["", "", "a", "b", "c"]))
            out.append(PlaceOrder(ts, user, symbol, side, otype, tif, qty, price, budget, cid, expire))
    return out


def _funded(engine):
    for user in range(1, 5):
        for asset, amount in (("USD", 50_000), ("BTC", 100), ("ETH", 100)):
            engine.execute(Deposit(0, user, asset, amount))


@given(cmds=commands(), fees=st.sampled_from([(0, 0), (10, 20), (2500, 5000)]))
def test_fast_engine_matches_reference(cmds, fees):
    fast = Engine(SYMBOLS, epoch=7, maker_fee_bps=fees[0], taker_fee_bps=fees[1], fee_account=0)
    ref = ReferenceEngine(SYMBOLS, epoch=7, maker_fee_bps=fees[0], taker_fee_bps=fees[1], fee_account=0)
    _funded(fast)
    _funded(ref)
    for cmd in cmds:
        got, want = fast.execute(cmd), ref.execute(cmd)
        assert got == want, f"diverged on {cmd}"
        assert fast.check_invariants() == []
        assert ref.check_invariants() == []
        assert fast.state_hash() == ref.state_hash()
    for user in range(0, 5):
        assert fast.open_orders(user) == ref.open_orders(user)


@given(cmds=commands())
def test_seq_is_gapless_and_strictly_increasing(cmds):
    engine = Engine(SYMBOLS, epoch=3)
    _funded(engine)
    last = engine.last_seq
    for cmd in cmds:
        for ev in engine.execute(cmd).events:
            assert ev.seq == last + 1 and ev.epoch == 3 and ev.ts_ns == cmd.ts_ns
            last = ev.seq
    assert engine.last_seq == last
