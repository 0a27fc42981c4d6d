"""The fast engine and the naive reference agree on every random command stream.

Both get the same commands; results, events and state hashes must be equal,
``check_invariants()`` must hold in both after every single command, and the fast
engine's own structures must check out (``validate_internal_state()``: the book's
price index, level totals, the order and client-order-id indexes, the expiry heap). Some
commands carry hostile values (beyond a signed 64-bit long, beyond the amount
bounds, over-long or unencodable text): both engines reject them by the same
wire-range rules, and every event either emits encodes (Avro body and feed
header) whatever the stream.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.commands import MAX_AMOUNT, AdvanceTime, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.reference import ReferenceEngine
from schemas import stdavro
from schemas.codec import encode
from schemas.events import OrderType, Side, TimeInForce
from schemas.wire import header_for

settings.register_profile("default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD", tick_size=5, lot_size=2), SymbolSpec("ETH-USD", "ETH", "USD")]
USERS = st.integers(min_value=0, max_value=4)  # 0 is invalid: exercises INVALID_USER
HUGE = st.sampled_from([MAX_AMOUNT, MAX_AMOUNT + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, -(2**64)])
BAD_TEXT = st.sampled_from(["x" * 33, "c" * 65, "\ud800", "é" * 64, "a\udfffb"])


def _hostile(draw, value, strategy):
    """Now and then a hostile value instead of ``value``."""
    return draw(strategy) if draw(st.integers(0, 25)) == 0 else value


@st.composite
def commands(draw):
    n = draw(st.integers(min_value=1, max_value=80))
    ts = 1_000
    out = []
    for _ in range(n):
        ts += draw(st.integers(min_value=0, max_value=50))
        kind = draw(st.sampled_from(["place"] * 6 + ["cancel", "cancel_cid", "deposit", "withdraw", "tick"]))
        user = _hostile(draw, draw(USERS), HUGE)
        if kind == "deposit" or kind == "withdraw":
            asset = draw(st.sampled_from(["BTC", "USD", "ETH", "DOGE"]))
            amount = _hostile(draw, draw(st.integers(min_value=-5, max_value=5000)), HUGE)
            asset = _hostile(draw, asset, BAD_TEXT)
            cls = Deposit if kind == "deposit" else Withdraw
            out.append(cls(ts, user, asset, amount))
        elif kind == "cancel":
            out.append(CancelOrder(ts, user, order_id=_hostile(draw, draw(st.integers(0, 60)), HUGE)))
        elif kind == "cancel_cid":
            cid = _hostile(draw, draw(st.sampled_from(["", "a", "b", "c"])), BAD_TEXT)
            out.append(CancelOrder(ts, user, client_order_id=cid))
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
            big = draw(st.integers(0, 12))
            if big == 0:  # a notional beyond the bounds, with sane parts
                price, qty = 2**31 * 5, 2**32
            elif big == 1 and otype is OrderType.LIMIT:  # large and valid: the rich users trade it
                price, qty = 5 * 2**38 + draw(st.sampled_from([0, 5, -5])), 2**20 * draw(st.sampled_from([1, 2]))
                user = 3 if side is Side.SELL else 4
            price, qty, budget = (_hostile(draw, v, HUGE) for v in (price, qty, budget))
            expire = _hostile(draw, expire, HUGE)
            symbol = _hostile(draw, draw(st.sampled_from(["BTC-USD", "ETH-USD", "ETH-USD", "XRP-USD"])), BAD_TEXT)
            if big == 1:
                symbol = "BTC-USD"
            cid = _hostile(draw, draw(st.sampled_from(["", "", "a", "b", "c"])), BAD_TEXT)
            out.append(PlaceOrder(ts, user, symbol, side, otype, tif, qty, price, budget, cid, expire))
    return out


def _funded(engine, rich=False):
    for user in range(1, 5):
        for asset, amount in (("USD", 50_000), ("BTC", 100), ("ETH", 100)):
            engine.execute(Deposit(0, user, asset, amount))
    if rich:  # users 4 and 3 hold nearly all the USD and BTC that may exist: huge trades, fills and deltas
        engine.execute(Deposit(0, 4, "USD", MAX_AMOUNT - 4 * 50_000))
        engine.execute(Deposit(0, 3, "BTC", MAX_AMOUNT - 4 * 100))


def _encodable(events):
    for ev in events:
        header_for(ev)
        assert stdavro.encode(ev) == encode(ev)  # the engine's own encoder gives fastavro's bytes


@given(cmds=commands(), fees=st.sampled_from([(0, 0), (10, 20), (2500, 5000)]), rich=st.booleans())
def test_fast_engine_matches_reference(cmds, fees, rich):
    fast = Engine(SYMBOLS, epoch=7, maker_fee_bps=fees[0], taker_fee_bps=fees[1], fee_account=0)
    ref = ReferenceEngine(SYMBOLS, epoch=7, maker_fee_bps=fees[0], taker_fee_bps=fees[1], fee_account=0)
    _funded(fast, rich)
    _funded(ref, rich)
    for cmd in cmds:
        got, want = fast.execute(cmd), ref.execute(cmd)
        assert got == want, f"diverged on {cmd}"
        _encodable(got.events)
        assert fast.check_invariants() == []
        assert fast.validate_internal_state() == [], f"after {cmd}"
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
