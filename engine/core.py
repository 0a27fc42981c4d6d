"""The matching engine: order books + ledger + the events of every transition.

Deterministic: the same commands (with their ``ts_ns``) always produce the
same events, ids and seqs; the engine never reads a clock. That is what lets
the journal's recovery re-execute commands and check them against the events
it recorded, and what the differential test against ``engine.reference``
relies on.

Rules (the reference engine implements the same rules independently):

* Validation, first failure wins: UNKNOWN_SYMBOL, INVALID_USER (user_id <= 0),
  INVALID_TIME_IN_FORCE (market + GTC/GTT), INVALID_PRICE, INVALID_QUANTITY,
  INVALID_BUDGET, INVALID_EXPIRY, DUPLICATE_CLIENT_ORDER_ID, INSUFFICIENT_FUNDS.
  A rejected order still gets an order_id and one REJECTED OrderUpdate; no
  balance changes.
* Locks: limit buy price*qty quote; market buy its quote_budget; sell qty base.
* FOK is checked before anything is locked: if it cannot fill completely it
  gets one EXPIRED OrderUpdate with no fill and no balance change.
* Trades happen at the maker's price. A buy taker's price improvement
  ((limit - trade price) * qty) is unlocked at each fill, so ``locked``
  always equals exactly what open orders still need. Self-trades are allowed.
* Fees: floor(received * bps / 10_000), charged on what each side receives
  (the buyer's base, the seller's quote), maker or taker rate by role,
  credited to the fee account. Flooring means a fee never exceeds its rate.
* Event order: an OrderUpdate or Trade first, then the BalanceUpdates it
  caused, one per (user, asset) changed with the absolute values after it.
  Per fill: Trade, maker update, taker update, then TRADE balances (buyer
  quote, buyer base, seller base, seller quote, fee base, fee quote; a cell
  touched twice, as in a self-trade, appears once at its first place).
  A taker's end: EXPIRED (IOC/FOK/market remainder) then ORDER_UNLOCK; or,
  after FILLED, ORDER_UNLOCK of an unspent market-buy budget.
* GTT orders expire, in (expire_ns, order_id) order, at the start of the first
  command whose ts_ns >= expire_ns (AdvanceTime exists to make that happen
  without other traffic), before that command is applied.

Standard library only.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence

from engine.book import Order, OrderBook
from engine.commands import AdvanceTime, CancelOrder, Command, CommandResult, Deposit, PlaceOrder, Withdraw
from engine.events import (
    BalanceReason,
    BalanceUpdate,
    Event,
    OrderStatus,
    OrderType,
    OrderUpdate,
    RejectReason,
    Side,
    TimeInForce,
    Trade,
)
from engine.interfaces import Balance, SymbolSpec
from engine.ledger import Ledger

__all__ = ["Engine"]

_TERMINAL = (OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REJECTED)
_R = RejectReason


class Engine:
    """Fast engine; see the module docstring for the exact rules."""

    def __init__(
        self,
        symbols: Sequence[SymbolSpec],
        epoch: int,
        *,
        maker_fee_bps: int = 0,
        taker_fee_bps: int = 0,
        fee_account: int = 0,
    ) -> None:
        self._epoch = epoch
        self._symbols = {s.name: s for s in symbols}
        self._assets = {a for s in symbols for a in (s.base, s.quote)}
        self._books = {s.name: OrderBook(s.name) for s in symbols}
        self._maker_bps = maker_fee_bps
        self._taker_bps = taker_fee_bps
        self._fee_account = fee_account
        self._ledger = Ledger()
        self._open: dict[int, Order] = {}
        self._cids: dict[tuple[int, str], Order] = {}
        self._expiry: list[tuple[int, int]] = []
        self._seq = 0
        self._next_order_id = 1
        self._next_trade_id = 1
        self._events: list[Event] = []
        self._ts = 0

    # ----------------------------------------------------------------- interface
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def last_seq(self) -> int:
        return self._seq

    def execute(self, cmd: Command) -> CommandResult:
        self._events = []
        self._ts = ts = cmd.ts_ns
        if self._expiry and self._expiry[0][0] <= ts:
            self._expire_due(ts)
        if isinstance(cmd, PlaceOrder):
            result = self._place(cmd)
        elif isinstance(cmd, CancelOrder):
            result = self._cancel(cmd)
        elif isinstance(cmd, Deposit):
            result = self._deposit(cmd)
        elif isinstance(cmd, Withdraw):
            result = self._withdraw(cmd)
        elif isinstance(cmd, AdvanceTime):
            result = CommandResult(True)
        else:  # pragma: no cover - the Command union is closed
            raise TypeError(f"not a command: {cmd!r}")
        if self._events:
            return CommandResult(result.accepted, result.reason, result.order_id, tuple(self._events))
        return result

    def check_invariants(self) -> list[str]:
        need: dict[tuple[int, str], int] = {}
        problems: list[str] = []
        for o in self._open.values():
            spec = self._symbols[o.symbol]
            want = o.price * o.remaining if o.side is Side.BUY else o.remaining
            if o.locked != want:
                problems.append(f"order {o.order_id}: holds {o.locked} locked but needs {want}")
            if o.remaining <= 0 or o.status in _TERMINAL:
                problems.append(f"order {o.order_id}: open with remaining {o.remaining} status {o.status}")
            key = (o.user_id, spec.quote if o.side is Side.BUY else spec.base)
            need[key] = need.get(key, 0) + o.locked
        return problems + self._ledger.check(need)

    def open_orders(self, user_id: int) -> list[OrderUpdate]:
        return [
            o.last_event for oid, o in sorted(self._open.items()) if o.user_id == user_id and o.last_event is not None
        ]

    def balance(self, user_id: int, asset: str) -> Balance:
        return Balance(*self._ledger.get(user_id, asset))

    def state_hash(self) -> str:
        books = [(name, self._books[name].snapshot()) for name in sorted(self._books)]
        orders = [
            (
                o.order_id,
                o.client_order_id,
                o.user_id,
                o.symbol,
                o.side.value,
                o.order_type.value,
                o.time_in_force.value,
                o.price,
                o.qty,
                o.quote_budget,
                o.filled_qty,
                o.quote_filled,
                o.status.value,
                o.created_ns,
                o.updated_ns,
                o.expire_ns,
                o.locked,
            )
            for _, o in sorted(self._open.items())
        ]
        state = (self._seq, self._next_order_id, self._next_trade_id, books, orders, self._ledger.snapshot())
        return hashlib.sha256(repr(state).encode()).hexdigest()

    # ------------------------------------------------------------------- events
    def _emit_order(
        self,
        o: Order,
        fill_qty: int = 0,
        fill_price: int = 0,
        trade_id: int = 0,
        reason: RejectReason = _R.NONE,
    ) -> None:
        self._seq += 1
        terminal = o.status in _TERMINAL
        ev = OrderUpdate(
            self._epoch,
            self._seq,
            self._ts,
            o.order_id,
            o.client_order_id,
            o.user_id,
            o.symbol,
            o.side,
            o.order_type,
            o.time_in_force,
            o.price,
            o.qty,
            o.quote_budget,
            o.filled_qty,
            0 if terminal else o.qty - o.filled_qty,
            o.quote_filled,
            o.status,
            reason,
            fill_qty,
            fill_price,
            trade_id,
            o.created_ns,
            o.updated_ns,
            o.expire_ns,
        )
        o.last_event = ev
        self._events.append(ev)

    def _emit_balances(self, reason: BalanceReason, ref_id: int) -> None:
        for user, asset, avail, locked, da, dl in self._ledger.drain():
            self._seq += 1
            self._events.append(
                BalanceUpdate(self._epoch, self._seq, self._ts, user, asset, avail, locked, da, dl, reason, ref_id)
            )

    # -------------------------------------------------------------------- place
    def _validate(self, c: PlaceOrder) -> RejectReason:
        spec = self._symbols.get(c.symbol)
        if spec is None:
            return _R.UNKNOWN_SYMBOL
        if c.user_id <= 0:
            return _R.INVALID_USER
        market = c.order_type is OrderType.MARKET
        if market and c.time_in_force in (TimeInForce.GTC, TimeInForce.GTT):
            return _R.INVALID_TIME_IN_FORCE
        if (c.price != 0) if market else (c.price <= 0 or c.price % spec.tick_size):
            return _R.INVALID_PRICE
        if c.qty <= 0 or c.qty % spec.lot_size:
            return _R.INVALID_QUANTITY
        if (c.quote_budget <= 0) if (market and c.side is Side.BUY) else (c.quote_budget != 0):
            return _R.INVALID_BUDGET
        if (c.expire_ns <= c.ts_ns) if c.time_in_force is TimeInForce.GTT else (c.expire_ns != 0):
            return _R.INVALID_EXPIRY
        if c.client_order_id and (c.user_id, c.client_order_id) in self._cids:
            return _R.DUPLICATE_CLIENT_ORDER_ID
        return _R.NONE

    def _place(self, c: PlaceOrder) -> CommandResult:
        oid = self._next_order_id
        self._next_order_id += 1
        reason = self._validate(c)
        spec = self._symbols.get(c.symbol)
        buy = c.side is Side.BUY
        lock_asset = "" if spec is None else (spec.quote if buy else spec.base)
        o = Order(
            oid,
            c.client_order_id,
            c.user_id,
            c.symbol,
            c.side,
            c.order_type,
            c.time_in_force,
            c.price,
            c.qty,
            c.quote_budget,
            c.ts_ns,
            c.expire_ns,
            lock_asset,
        )
        if reason is _R.NONE:
            assert spec is not None
            need = c.quote_budget if c.order_type is OrderType.MARKET and buy else (c.price * c.qty if buy else c.qty)
            if self._ledger.available(c.user_id, lock_asset) < need:
                reason = _R.INSUFFICIENT_FUNDS
        if reason is not _R.NONE:
            o.status = OrderStatus.REJECTED
            self._emit_order(o, reason=reason)
            return CommandResult(False, reason, oid)
        assert spec is not None
        book = self._books[c.symbol]
        if c.time_in_force is TimeInForce.FOK and not self._fillable(book, o, spec.lot_size):
            o.status = OrderStatus.EXPIRED
            self._emit_order(o)
            return CommandResult(True, _R.NONE, oid)
        o.locked = need
        self._ledger.lock(c.user_id, lock_asset, need)
        self._emit_order(o)
        self._emit_balances(BalanceReason.ORDER_LOCK, oid)
        self._match(book, o, spec)
        return CommandResult(True, _R.NONE, oid)

    def _crosses(self, taker: Order, maker_price: int) -> bool:
        if taker.order_type is OrderType.MARKET:
            return True
        return maker_price <= taker.price if taker.side is Side.BUY else maker_price >= taker.price

    def _fillable(self, book: OrderBook, o: Order, lot: int) -> bool:
        need, budget = o.qty, o.quote_budget
        market_buy = o.order_type is OrderType.MARKET and o.side is Side.BUY
        for maker in book.opposite(o.side).iter_orders():
            if not self._crosses(o, maker.price):
                return False
            q = min(need, maker.remaining)
            if market_buy:
                afford = budget // maker.price
                q = min(q, afford - afford % lot)
                if q <= 0:
                    return False
                budget -= q * maker.price
            need -= q
            if need == 0:
                return True
        return False

    def _match(self, book: OrderBook, taker: Order, spec: SymbolSpec) -> None:
        opposite = book.opposite(taker.side)
        market_buy = taker.order_type is OrderType.MARKET and taker.side is Side.BUY
        lot = spec.lot_size
        while taker.filled_qty < taker.qty:
            maker = opposite.best()
            if maker is None or not self._crosses(taker, maker.price):
                break
            q = min(taker.qty - taker.filled_qty, maker.qty - maker.filled_qty)
            if market_buy:
                afford = taker.locked // maker.price
                q = min(q, afford - afford % lot)
                if q <= 0:
                    break
            self._fill(book, taker, maker, q, spec)
        if taker.filled_qty == taker.qty:
            if taker.locked:  # unspent market-buy budget
                self._ledger.unlock(taker.user_id, taker.lock_asset, taker.locked)
                taker.locked = 0
                self._emit_balances(BalanceReason.ORDER_UNLOCK, taker.order_id)
        elif taker.order_type is OrderType.MARKET or taker.time_in_force in (
            TimeInForce.IOC,
            TimeInForce.FOK,
        ):
            self._finish(taker, OrderStatus.EXPIRED)
        else:
            book.add(taker)
            self._open[taker.order_id] = taker
            if taker.client_order_id:
                self._cids[(taker.user_id, taker.client_order_id)] = taker
            if taker.time_in_force is TimeInForce.GTT:
                heapq.heappush(self._expiry, (taker.expire_ns, taker.order_id))

    def _fill(self, book: OrderBook, taker: Order, maker: Order, q: int, spec: SymbolSpec) -> None:
        price = maker.price
        quote = price * q
        tid = self._next_trade_id
        self._next_trade_id += 1
        taker_buys = taker.side is Side.BUY
        buyer, seller = (taker, maker) if taker_buys else (maker, taker)
        buyer_bps = self._taker_bps if taker_buys else self._maker_bps
        seller_bps = self._maker_bps if taker_buys else self._taker_bps
        buyer_fee = q * buyer_bps // 10_000
        seller_fee = quote * seller_bps // 10_000
        led = self._ledger
        refund = (buyer.price - price) * q if buyer.order_type is OrderType.LIMIT else 0
        led.spend_locked(buyer.user_id, spec.quote, quote)
        if refund:
            led.unlock(buyer.user_id, spec.quote, refund)
        buyer.locked -= quote + refund
        led.credit(buyer.user_id, spec.base, q - buyer_fee)
        led.spend_locked(seller.user_id, spec.base, q)
        seller.locked -= q
        led.credit(seller.user_id, spec.quote, quote - seller_fee)
        if buyer_fee:
            led.credit(self._fee_account, spec.base, buyer_fee)
        if seller_fee:
            led.credit(self._fee_account, spec.quote, seller_fee)
        ts = self._ts
        for o in (maker, taker):
            o.filled_qty += q
            o.quote_filled += quote
            o.updated_ns = ts
            o.status = OrderStatus.FILLED if o.filled_qty == o.qty else OrderStatus.PARTIALLY_FILLED
        self._seq += 1
        self._events.append(
            Trade(
                self._epoch,
                self._seq,
                ts,
                tid,
                spec.name,
                price,
                q,
                quote,
                taker.side,
                maker.order_id,
                taker.order_id,
                maker.user_id,
                taker.user_id,
                seller_fee if taker_buys else buyer_fee,
                buyer_fee if taker_buys else seller_fee,
            )
        )
        if maker.status is OrderStatus.FILLED:
            book.remove(maker)
            self._close(maker)
        self._emit_order(maker, q, price, tid)
        self._emit_order(taker, q, price, tid)
        self._emit_balances(BalanceReason.TRADE, tid)

    def _close(self, o: Order) -> None:
        self._open.pop(o.order_id, None)
        if o.client_order_id:
            self._cids.pop((o.user_id, o.client_order_id), None)

    def _finish(self, o: Order, status: OrderStatus) -> None:
        """End an order that still holds funds: CANCELLED or EXPIRED, then unlock."""
        o.status = status
        o.updated_ns = self._ts
        self._close(o)
        self._emit_order(o)
        if o.locked:
            self._ledger.unlock(o.user_id, o.lock_asset, o.locked)
            o.locked = 0
            self._emit_balances(BalanceReason.ORDER_UNLOCK, o.order_id)

    # ------------------------------------------------------------ other commands
    def _cancel(self, c: CancelOrder) -> CommandResult:
        o: Order | None = None
        if c.order_id:
            o = self._open.get(c.order_id)
            if o is not None and o.user_id != c.user_id:
                o = None
        elif c.client_order_id:
            o = self._cids.get((c.user_id, c.client_order_id))
        if o is None:
            return CommandResult(False, _R.UNKNOWN_ORDER, c.order_id)
        self._books[o.symbol].remove(o)
        self._finish(o, OrderStatus.CANCELLED)
        return CommandResult(True, _R.NONE, o.order_id)

    def _expire_due(self, ts: int) -> None:
        while self._expiry and self._expiry[0][0] <= ts:
            expire_ns, oid = heapq.heappop(self._expiry)
            o = self._open.get(oid)
            if o is None or o.expire_ns != expire_ns:
                continue  # filled or cancelled since: a stale heap entry
            self._books[o.symbol].remove(o)
            self._finish(o, OrderStatus.EXPIRED)

    def _funds_reason(self, user_id: int, asset: str, amount: int) -> RejectReason:
        if user_id <= 0:
            return _R.INVALID_USER
        if asset not in self._assets:
            return _R.UNKNOWN_ASSET
        if amount <= 0:
            return _R.INVALID_AMOUNT
        return _R.NONE

    def _deposit(self, c: Deposit) -> CommandResult:
        reason = self._funds_reason(c.user_id, c.asset, c.amount)
        if reason is not _R.NONE:
            return CommandResult(False, reason)
        self._ledger.deposit(c.user_id, c.asset, c.amount)
        self._emit_balances(BalanceReason.DEPOSIT, 0)
        return CommandResult(True)

    def _withdraw(self, c: Withdraw) -> CommandResult:
        reason = self._funds_reason(c.user_id, c.asset, c.amount)
        if reason is _R.NONE and self._ledger.available(c.user_id, c.asset) < c.amount:
            reason = _R.INSUFFICIENT_FUNDS
        if reason is not _R.NONE:
            return CommandResult(False, reason)
        self._ledger.withdraw(c.user_id, c.asset, c.amount)
        self._emit_balances(BalanceReason.WITHDRAW, 0)
        return CommandResult(True)
