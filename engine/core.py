"""The matching engine: order books + ledger + the events of every transition.

Deterministic: the same commands (with their ``ts_ns``) always produce the
same events, ids and seqs; the engine never reads a clock. That is what lets
the journal's recovery re-execute commands and check them against the events
it recorded, and what the differential test against ``engine.reference``
relies on.

Rules (the reference engine implements the same rules independently):

* Wire ranges, checked before anything else (``range_reason``): a command
  that fails them is rejected with only a result: no GTT expiry runs, no
  order id is taken, no event is emitted, and the service does not journal
  it. Every integer must fit a signed 64-bit long and user ids must not be
  negative (INVALID_USER); symbols and assets are at most ``MAX_NAME``
  characters of valid Unicode (UNKNOWN_SYMBOL, UNKNOWN_ASSET); a
  client_order_id at most ``MAX_CLIENT_ORDER_ID`` (INVALID_CLIENT_ORDER_ID);
  price, qty, quote_budget and deposit/withdraw amounts at most
  ``MAX_AMOUNT`` (INVALID_PRICE, INVALID_QUANTITY, INVALID_BUDGET,
  INVALID_AMOUNT), and so are a limit order's price * qty (INVALID_QUANTITY)
  and an asset's total supply after a deposit (INVALID_AMOUNT). A cancel's
  order_id outside the long range is UNKNOWN_ORDER. With the supply bounded,
  every balance, lock, delta, trade quote and fill sum fits a long (see
  ``MAX_AMOUNT``): no event can carry a number the wire cannot.
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

Speed (the rules above are the contract; this is how they are met quickly, and the reference
engine with the differential test keeps it honest): events are built positionally without a
frozen dataclass's per-field ``object.__setattr__`` (``events.fast_constructor``); an accepted
order holds the ledger cells it locks from and is paid into, so a fill moves amounts between
known cells and emits its BalanceUpdates directly, in the rule's order (a general merge runs
only when two of a fill's cells are one: a self-trade, or the fee account trading); commands
dispatch on their exact type; a level keeps its total, so a fill-or-kill check reads levels.
``validate_internal_state`` checks the structure all of this relies on.
The same source may run compiled by mypyc, an optional build (setup.py, ``engine/__init__.py``):
its classes become C structs and its calls C calls, ~1.5x the commands per CPU-second. Nothing here
depends on which runs; the module constants are ``Final`` so the build reads them directly.

Standard library only.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from typing import Final

from engine.book import Level, Order, OrderBook, _Side
from engine.commands import (
    INT64_MAX,
    INT64_MIN,
    MAX_AMOUNT,
    MAX_CLIENT_ORDER_ID,
    MAX_NAME,
    AdvanceTime,
    CancelOrder,
    Command,
    CommandResult,
    Deposit,
    PlaceOrder,
    Withdraw,
)
from engine.interfaces import Balance, SymbolSpec
from engine.ledger import Cell, Ledger
from schemas.events import (
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
    fast_constructor,
)

__all__ = ["Engine"]

# Final: a compiled build (mypyc, setup.py) reads these as C statics, not through the module's dict.
_TERMINAL: Final = (OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REJECTED)
_R: Final = RejectReason
_NONE: Final = RejectReason.NONE
_BUY: Final = Side.BUY
_SELL: Final = Side.SELL
_LIMIT: Final = OrderType.LIMIT
_MARKET: Final = OrderType.MARKET
_GTC: Final = TimeInForce.GTC
_IOC: Final = TimeInForce.IOC
_FOK: Final = TimeInForce.FOK
_GTT: Final = TimeInForce.GTT
_NEW: Final = OrderStatus.NEW
_PARTIAL: Final = OrderStatus.PARTIALLY_FILLED
_FILLED: Final = OrderStatus.FILLED
_LOCK: Final = BalanceReason.ORDER_LOCK
_UNLOCK: Final = BalanceReason.ORDER_UNLOCK
_TRADE: Final = BalanceReason.TRADE
_REJECTED: Final = OrderStatus.REJECTED
_EXPIRED: Final = OrderStatus.EXPIRED
_CANCELLED: Final = OrderStatus.CANCELLED
_DEPOSIT_R: Final = BalanceReason.DEPOSIT
_WITHDRAW_R: Final = BalanceReason.WITHDRAW
# What the hot path uses of other modules, as Final names of this one: the compiled build looks an
# imported name up in the module's dict on every use, a Final one it reads as a C static.
_PLACE: Final = PlaceOrder
_CANCEL: Final = CancelOrder
_DEPOSIT: Final = Deposit
_WITHDRAW: Final = Withdraw
_ADVANCE: Final = AdvanceTime
_I64_MIN: Final = INT64_MIN
_I64_MAX: Final = INT64_MAX
_AMOUNT_MAX: Final = MAX_AMOUNT
_NAME_MAX: Final = MAX_NAME
_CID_MAX: Final = MAX_CLIENT_ORDER_ID
_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop
# Events are frozen dataclasses; these build them without a frozen __init__'s per-field
# object.__setattr__ (``fast_constructor``): positional, every field.
_OrderUpdate: Final = fast_constructor(OrderUpdate)
_Trade: Final = fast_constructor(Trade)
_BalanceUpdate: Final = fast_constructor(BalanceUpdate)
_Result: Final = fast_constructor(CommandResult)
_NO_EVENTS: Final[tuple[Event, ...]] = ()


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
        self._user_seq: dict[int, int] = {}
        self._next_order_id = 1
        self._next_trade_id = 1
        self._events: list[Event] = []
        self._ts = 0
        # Names the wire ranges accept without looking at the text again.
        self._fine_symbols = frozenset(n for n in self._symbols if _text_ok(n, _NAME_MAX))
        self._fine_assets = frozenset(a for a in self._assets if _text_ok(a, _NAME_MAX))
        self._fee_cells = {
            s.name: (self._ledger.cell(fee_account, s.base), self._ledger.cell(fee_account, s.quote)) for s in symbols
        }
        """The fee account's (base, quote) cells per symbol (a cell holding nothing is as good as none)."""

    # ----------------------------------------------------------------- interface
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def last_seq(self) -> int:
        return self._seq

    def execute(self, cmd: Command) -> CommandResult:
        reason = self.range_reason(cmd)
        if reason is not _NONE:
            return _Result(False, reason, 0, _NO_EVENTS)
        return self.apply(cmd)

    def apply(self, cmd: Command) -> CommandResult:
        """``execute`` without the wire-range rules: for a command ``range_reason`` has passed (the
        service asks first, to know whether to journal it), and for recovering a journal written
        before the rules (``execute_unchecked``)."""
        events: list[Event] = []
        self._events = events
        self._ts = ts = cmd.ts_ns
        if self._expiry and self._expiry[0][0] <= ts:
            self._expire_due(ts)
        t = type(cmd)
        if t is _PLACE:
            accepted, reason, oid = self._place(cmd)  # type: ignore[arg-type]
        elif t is _CANCEL:
            accepted, reason, oid = self._cancel(cmd)  # type: ignore[arg-type]
        elif t is _DEPOSIT:
            accepted, reason, oid = self._deposit(cmd)  # type: ignore[arg-type]
        elif t is _WITHDRAW:
            accepted, reason, oid = self._withdraw(cmd)  # type: ignore[arg-type]
        elif t is _ADVANCE:
            accepted, reason, oid = True, _NONE, 0
        else:  # pragma: no cover - the Command union is closed
            raise TypeError(f"not a command: {cmd!r}")
        return _Result(accepted, reason, oid, tuple(events) if events else _NO_EVENTS)

    def range_reason(self, cmd: Command) -> RejectReason:
        """NONE, or why ``cmd`` is outside the wire ranges (module docstring). Depends only on the
        command and the assets' supply, so the service can ask before it executes and journals."""
        t = type(cmd)
        if t is _PLACE:
            c: PlaceOrder = cmd  # type: ignore[assignment]
            if not 0 <= c.user_id <= _I64_MAX:
                return _R.INVALID_USER
            if c.symbol not in self._fine_symbols and not _text_ok(c.symbol, _NAME_MAX):
                return _R.UNKNOWN_SYMBOL
            if c.client_order_id and not _text_ok(c.client_order_id, _CID_MAX):
                return _R.INVALID_CLIENT_ORDER_ID
            price, qty = c.price, c.qty
            if not _I64_MIN <= price <= _AMOUNT_MAX:
                return _R.INVALID_PRICE
            if not _I64_MIN <= qty <= _AMOUNT_MAX:
                return _R.INVALID_QUANTITY
            if price > 0 and qty > 0 and c.order_type is _LIMIT and price * qty > _AMOUNT_MAX:
                return _R.INVALID_QUANTITY
            if not _I64_MIN <= c.quote_budget <= _AMOUNT_MAX:
                return _R.INVALID_BUDGET
            if not _I64_MIN <= c.expire_ns <= _I64_MAX:
                return _R.INVALID_EXPIRY
        elif t is _CANCEL:
            k: CancelOrder = cmd  # type: ignore[assignment]
            if not 0 <= k.user_id <= _I64_MAX:
                return _R.INVALID_USER
            if not _I64_MIN <= k.order_id <= _I64_MAX:
                return _R.UNKNOWN_ORDER
            if k.client_order_id and not _text_ok(k.client_order_id, _CID_MAX):
                return _R.INVALID_CLIENT_ORDER_ID
        elif t is _DEPOSIT or t is _WITHDRAW:
            f: Deposit | Withdraw = cmd  # type: ignore[assignment]
            if not 0 <= f.user_id <= _I64_MAX:
                return _R.INVALID_USER
            if f.asset not in self._fine_assets and not _text_ok(f.asset, _NAME_MAX):
                return _R.UNKNOWN_ASSET
            if not _I64_MIN <= f.amount <= _AMOUNT_MAX:
                return _R.INVALID_AMOUNT
            if t is _DEPOSIT and f.amount > 0 and self._ledger.supply(f.asset) + f.amount > _AMOUNT_MAX:
                return _R.INVALID_AMOUNT
        return _NONE

    def execute_unchecked(self, cmd: Command) -> CommandResult:
        """``execute`` without the wire-range rules: for recovering a journal written before they
        existed. The service never journals a command they reject, so a journaled command they
        reject can only come from such a journal, and only the old rules reproduce it."""
        return self.apply(cmd)

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

    def validate_internal_state(self) -> list[str]:
        """Every inconsistency of the engine's own structures, as a sentence; empty when there is
        none (beside ``check_invariants``, which checks the money). Each book checks itself
        (``OrderBook.validate``: price index against levels, level totals, each order's place),
        then what lies between them: the resting orders are exactly the open-order index, the
        client-order-id index holds exactly the open orders that have one, every resting GTT order
        is in the expiry heap, every open order's cells are its user's, and the id counters are
        ahead of every order."""
        problems: list[str] = []
        resting: dict[int, Order] = {}
        for name, book in self._books.items():
            problems += book.validate()
            for o in book.orders():
                if o.order_id in resting:
                    problems.append(f"order {o.order_id} rests twice")
                resting[o.order_id] = o
                if o.symbol != name:
                    problems.append(f"order {o.order_id} of {o.symbol} rests in {name}")
        if set(resting) != set(self._open):
            only_book = sorted(set(resting) - set(self._open))[:5]
            only_index = sorted(set(self._open) - set(resting))[:5]
            problems.append(
                f"resting orders and the open index differ: only resting {only_book}, only open {only_index}"
            )
        for oid, o in self._open.items():
            if o.order_id != oid or resting.get(oid, o) is not o:
                problems.append(f"open index entry {oid} is another order ({o.order_id})")
            if o.order_id >= self._next_order_id:
                problems.append(f"order {o.order_id} is not below the next order id {self._next_order_id}")
            spec = self._symbols.get(o.symbol)
            if spec is not None:
                lock, recv = (spec.quote, spec.base) if o.side is Side.BUY else (spec.base, spec.quote)
                for cell, asset in ((o.lock_cell, lock), (o.recv_cell, recv)):
                    if cell is None or (cell.user, cell.asset) != (o.user_id, asset):
                        problems.append(f"order {o.order_id}: its {asset} cell is not its user's")
                    elif cell is not self._ledger.cell(o.user_id, asset):
                        problems.append(f"order {o.order_id}: its {asset} cell is not the ledger's")
        with_cid = {(o.user_id, o.client_order_id): o for o in self._open.values() if o.client_order_id}
        if len(with_cid) != sum(1 for o in self._open.values() if o.client_order_id):
            problems.append("two open orders of one user share a client_order_id")
        if set(with_cid) != set(self._cids) or any(
            self._cids[k] is not o for k, o in with_cid.items() if k in self._cids
        ):
            problems.append(
                f"client-order-id index {sorted(self._cids)[:5]} != open orders with one {sorted(with_cid)[:5]}"
            )
        in_heap = set(self._expiry)
        for o in self._open.values():
            if o.time_in_force is TimeInForce.GTT and (o.expire_ns, o.order_id) not in in_heap:
                problems.append(f"GTT order {o.order_id} is missing from the expiry heap")
        if any(
            self._expiry[i] > self._expiry[c]
            for i in range(len(self._expiry))
            for c in (2 * i + 1, 2 * i + 2)
            if c < len(self._expiry)
        ):
            problems.append("the expiry heap is not a heap")
        return problems

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
        user_seqs = sorted(self._user_seq.items())
        state = (self._seq, self._next_order_id, self._next_trade_id, books, orders, self._ledger.snapshot(), user_seqs)
        return hashlib.sha256(repr(state).encode()).hexdigest()

    # ------------------------------------------------------------------- events
    def _emit_order(
        self,
        o: Order,
        fill_qty: int = 0,
        fill_price: int = 0,
        trade_id: int = 0,
        reason: RejectReason = _NONE,
    ) -> None:
        self._seq = seq = self._seq + 1
        user = o.user_id
        user_seq = self._user_seq[user] = self._user_seq.get(user, 0) + 1
        status = o.status
        qty, filled = o.qty, o.filled_qty
        ev = _OrderUpdate(
            self._epoch,
            seq,
            self._ts,
            o.order_id,
            o.client_order_id,
            user,
            o.symbol,
            o.side,
            o.order_type,
            o.time_in_force,
            o.price,
            qty,
            o.quote_budget,
            filled,
            0 if status in _TERMINAL else qty - filled,
            o.quote_filled,
            status,
            reason,
            fill_qty,
            fill_price,
            trade_id,
            o.created_ns,
            o.updated_ns,
            o.expire_ns,
            user_seq,
        )
        o.last_event = ev
        self._events.append(ev)

    def _emit_balance(self, cell: Cell, d_available: int, d_locked: int, reason: BalanceReason, ref_id: int) -> None:
        self._seq = seq = self._seq + 1
        self._events.append(
            _BalanceUpdate(
                self._epoch,
                seq,
                self._ts,
                cell.user,
                cell.asset,
                cell.available,
                cell.locked,
                d_available,
                d_locked,
                reason,
                ref_id,
            )
        )

    def _unlock(self, o: Order) -> None:
        """Release everything ``o`` still holds (ORDER_UNLOCK), if anything."""
        amount = o.locked
        if amount:
            cell = o.lock_cell
            assert cell is not None
            cell.available += amount
            cell.locked -= amount
            o.locked = 0
            self._emit_balance(cell, amount, -amount, _UNLOCK, o.order_id)

    # -------------------------------------------------------------------- place
    def _validate(self, c: PlaceOrder, spec: SymbolSpec | None) -> RejectReason:
        if spec is None:
            return _R.UNKNOWN_SYMBOL
        if c.user_id <= 0:
            return _R.INVALID_USER
        market = c.order_type is _MARKET
        tif = c.time_in_force
        if market and (tif is _GTC or tif is _GTT):
            return _R.INVALID_TIME_IN_FORCE
        if (c.price != 0) if market else (c.price <= 0 or c.price % spec.tick_size):
            return _R.INVALID_PRICE
        if c.qty <= 0 or c.qty % spec.lot_size:
            return _R.INVALID_QUANTITY
        if (c.quote_budget <= 0) if (market and c.side is _BUY) else (c.quote_budget != 0):
            return _R.INVALID_BUDGET
        if (c.expire_ns <= c.ts_ns) if tif is _GTT else (c.expire_ns != 0):
            return _R.INVALID_EXPIRY
        if c.client_order_id and (c.user_id, c.client_order_id) in self._cids:
            return _R.DUPLICATE_CLIENT_ORDER_ID
        return _NONE

    def _place(self, c: PlaceOrder) -> tuple[bool, RejectReason, int]:
        oid = self._next_order_id
        self._next_order_id = oid + 1
        spec = self._symbols.get(c.symbol)
        reason = self._validate(c, spec)
        buy = c.side is _BUY
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
        if reason is not _NONE:
            o.status = _REJECTED
            self._emit_order(o, reason=reason)
            return False, reason, oid
        assert spec is not None
        need = c.quote_budget if c.order_type is _MARKET and buy else (c.price * c.qty if buy else c.qty)
        ledger = self._ledger
        lock_cell = ledger.cell(c.user_id, lock_asset)
        if lock_cell.available < need:
            o.status = _REJECTED
            self._emit_order(o, reason=_R.INSUFFICIENT_FUNDS)
            return False, _R.INSUFFICIENT_FUNDS, oid
        book = self._books[c.symbol]
        if c.time_in_force is _FOK and not self._fillable(book.asks if buy else book.bids, o, spec.lot_size):
            o.status = _EXPIRED
            self._emit_order(o)
            return True, _NONE, oid
        o.lock_cell = lock_cell
        o.recv_cell = ledger.cell(c.user_id, spec.base if buy else spec.quote)
        o.locked = need
        lock_cell.available -= need
        lock_cell.locked += need
        self._emit_order(o)
        self._emit_balance(lock_cell, -need, need, _LOCK, oid)
        self._match(book, o, spec)
        return True, _NONE, oid

    def _fillable(self, side: _Side, o: Order, lot: int) -> bool:
        need, budget = o.qty, o.quote_budget
        market = o.order_type is _MARKET
        market_buy = market and o.side is _BUY
        buy = o.side is _BUY
        limit = o.price
        sign, levels = side.sign, side.levels
        for key in side.prices:
            price = sign * key
            if not market and (price > limit if buy else price < limit):
                return False
            level = levels[key]
            if not market_buy:
                if level.total >= need:
                    return True
                need -= level.total
                continue
            for maker in level.orders:
                q = min(need, maker.qty - maker.filled_qty)
                afford = budget // price
                q = min(q, afford - afford % lot)
                if q <= 0:
                    return False
                budget -= q * price
                need -= q
                if need == 0:
                    return True
        return False

    def _match(self, book: OrderBook, taker: Order, spec: SymbolSpec) -> None:
        buy = taker.side is _BUY
        side = book.asks if buy else book.bids
        prices, levels = side.prices, side.levels
        market = taker.order_type is _MARKET
        market_buy = market and buy
        limit = taker.price
        lot = spec.lot_size
        qty = taker.qty
        while taker.filled_qty < qty and prices:
            level = levels[prices[0]]
            maker = level.orders[0]
            price = maker.price
            if not market and (price > limit if buy else price < limit):
                break
            q = min(qty - taker.filled_qty, maker.qty - maker.filled_qty)
            if market_buy:
                afford = taker.locked // price
                q = min(q, afford - afford % lot)
                if q <= 0:
                    break
            self._fill(side, level, taker, maker, q, spec)
        if taker.filled_qty == qty:
            self._unlock(taker)  # unspent market-buy budget
        elif market or taker.time_in_force is _IOC or taker.time_in_force is _FOK:
            self._finish(taker, _EXPIRED)
        else:
            book.add(taker)
            self._open[taker.order_id] = taker
            if taker.client_order_id:
                self._cids[(taker.user_id, taker.client_order_id)] = taker
            if taker.time_in_force is _GTT:
                _heappush(self._expiry, (taker.expire_ns, taker.order_id))

    def _fill(self, side: _Side, level: Level, taker: Order, maker: Order, q: int, spec: SymbolSpec) -> None:
        price = maker.price
        quote = price * q
        tid = self._next_trade_id
        self._next_trade_id = tid + 1
        taker_buys = taker.side is _BUY
        if taker_buys:
            buyer, seller, buyer_bps, seller_bps = taker, maker, self._taker_bps, self._maker_bps
        else:
            buyer, seller, buyer_bps, seller_bps = maker, taker, self._maker_bps, self._taker_bps
        buyer_fee = q * buyer_bps // 10_000
        seller_fee = quote * seller_bps // 10_000
        refund = (buyer.price - price) * q if buyer.order_type is _LIMIT else 0
        bq, bb, sb, sq = buyer.lock_cell, buyer.recv_cell, seller.lock_cell, seller.recv_cell
        assert bq is not None and bb is not None and sb is not None and sq is not None
        fee_base, fee_quote = self._fee_cells[spec.name]
        # The moves (module docstring, "Event order": buyer quote, buyer base, seller base, seller
        # quote, fee base, fee quote), applied before any event is built: each BalanceUpdate
        # carries a cell's values after the whole fill.
        spent = quote + refund
        bq.available += refund
        bq.locked -= spent
        buyer.locked -= spent
        got_base = q - buyer_fee
        bb.available += got_base
        sb.locked -= q
        seller.locked -= q
        got_quote = quote - seller_fee
        sq.available += got_quote
        if buyer_fee:
            fee_base.available += buyer_fee
        if seller_fee:
            fee_quote.available += seller_fee
        ts = self._ts
        for o in (maker, taker):
            o.filled_qty += q
            o.quote_filled += quote
            o.updated_ns = ts
            o.status = _FILLED if o.filled_qty == o.qty else _PARTIAL
        self._seq = seq = self._seq + 1
        self._events.append(
            _Trade(
                self._epoch,
                seq,
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
        maker_done = maker.status is _FILLED
        side.filled_front(level, q, maker_done)
        if maker_done:
            self._close(maker)
        self._emit_order(maker, q, price, tid)
        self._emit_order(taker, q, price, tid)
        emit = self._emit_balance
        if (
            bq is not sq
            and bb is not sb
            and bq is not bb
            and fee_base not in (bq, bb, sb, sq)
            and fee_quote
            not in (
                bq,
                bb,
                sb,
                sq,
            )
        ):
            # Six different cells (the usual case): each appears once, in the rule's order.
            emit(bq, refund, -spent, _TRADE, tid)
            if got_base:
                emit(bb, got_base, 0, _TRADE, tid)
            emit(sb, 0, -q, _TRADE, tid)
            if got_quote:
                emit(sq, got_quote, 0, _TRADE, tid)
            if buyer_fee:
                emit(fee_base, buyer_fee, 0, _TRADE, tid)
            if seller_fee:
                emit(fee_quote, seller_fee, 0, _TRADE, tid)
            return
        # Some cells are one (a self-trade, the fee account trading, a symbol whose base is its
        # quote): a cell appears once, at its first place, with the sum of its moves.
        moves = [(bq, refund, -spent), (bb, got_base, 0), (sb, 0, -q), (sq, got_quote, 0)]
        if buyer_fee:
            moves.append((fee_base, buyer_fee, 0))
        if seller_fee:
            moves.append((fee_quote, seller_fee, 0))
        order: list[Cell] = []
        sums: dict[int, list[int]] = {}
        for cell, da, dl in moves:
            total = sums.get(id(cell))
            if total is None:
                sums[id(cell)] = [da, dl]
                order.append(cell)
            else:
                total[0] += da
                total[1] += dl
        for cell in order:
            da, dl = sums[id(cell)]
            if da or dl:
                emit(cell, da, dl, _TRADE, tid)

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
        self._unlock(o)

    # ------------------------------------------------------------ other commands
    def _cancel(self, c: CancelOrder) -> tuple[bool, RejectReason, int]:
        o: Order | None = None
        if c.order_id:
            o = self._open.get(c.order_id)
            if o is not None and o.user_id != c.user_id:
                o = None
        elif c.client_order_id:
            o = self._cids.get((c.user_id, c.client_order_id))
        if o is None:
            return False, _R.UNKNOWN_ORDER, c.order_id
        self._books[o.symbol].remove(o)
        self._finish(o, _CANCELLED)
        return True, _NONE, o.order_id

    def _expire_due(self, ts: int) -> None:
        while self._expiry and self._expiry[0][0] <= ts:
            expire_ns, oid = _heappop(self._expiry)
            o = self._open.get(oid)
            if o is None or o.expire_ns != expire_ns:
                continue  # filled or cancelled since: a stale heap entry
            self._books[o.symbol].remove(o)
            self._finish(o, _EXPIRED)

    def _funds_reason(self, user_id: int, asset: str, amount: int) -> RejectReason:
        if user_id <= 0:
            return _R.INVALID_USER
        if asset not in self._assets:
            return _R.UNKNOWN_ASSET
        if amount <= 0:
            return _R.INVALID_AMOUNT
        return _NONE

    def _deposit(self, c: Deposit) -> tuple[bool, RejectReason, int]:
        reason = self._funds_reason(c.user_id, c.asset, c.amount)
        if reason is not _NONE:
            return False, reason, 0
        cell = self._ledger.deposit(c.user_id, c.asset, c.amount)
        self._emit_balance(cell, c.amount, 0, _DEPOSIT_R, 0)
        return True, _NONE, 0

    def _withdraw(self, c: Withdraw) -> tuple[bool, RejectReason, int]:
        reason = self._funds_reason(c.user_id, c.asset, c.amount)
        if reason is _NONE and self._ledger.available(c.user_id, c.asset) < c.amount:
            reason = _R.INSUFFICIENT_FUNDS
        if reason is not _NONE:
            return False, reason, 0
        cell = self._ledger.withdraw(c.user_id, c.asset, c.amount)
        self._emit_balance(cell, -c.amount, 0, _WITHDRAW_R, 0)
        return True, _NONE, 0


def _text_ok(text: str, limit: int) -> bool:
    """At most ``limit`` characters that UTF-8 can encode (a lone surrogate cannot: Avro would refuse it)."""
    if len(text) > limit:
        return False
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
