"""A deliberately naive engine with the same rules as ``engine.core``.

It exists to keep the fast engine honest: the differential property test
feeds both the same random commands and requires identical results, events
and state hashes. So it is written independently and for obviousness, not
speed: orders live in one flat list, the best maker is found by sorting every
time, balances are a plain dict, and the BalanceUpdates of a step are found
by comparing balances before and after it. The rules are in ``engine.core``'s
docstring.

Standard library only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

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
)

__all__ = ["ReferenceEngine"]

BUY, SELL, MARKET = Side.BUY, Side.SELL, OrderType.MARKET


@dataclass
class _O:
    id: int
    cid: str
    user: int
    symbol: str
    side: Side
    type: OrderType
    tif: TimeInForce
    price: int
    qty: int
    budget: int
    created: int
    expire: int
    filled: int = 0
    quote_filled: int = 0
    status: OrderStatus = OrderStatus.NEW
    updated: int = 0
    spent: int = 0
    """Quote paid so far (market buys: what is left of the budget is budget - spent)."""
    last: OrderUpdate | None = None


class ReferenceEngine:
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
        self.specs = {s.name: s for s in symbols}
        self.maker_bps, self.taker_bps, self.fee_account = maker_fee_bps, taker_fee_bps, fee_account
        self.resting: list[_O] = []
        self.bal: dict[tuple[int, str], list[int]] = {}
        self.net: dict[str, int] = {}
        self.seq = 0
        self.user_updates: dict[int, int] = {}
        self.next_id = 1
        self.next_trade = 1
        self.out: list[Event] = []
        self.ts = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def last_seq(self) -> int:
        return self.seq

    # ------------------------------------------------------------------ helpers
    def _b(self, user: int, asset: str) -> list[int]:
        return self.bal.setdefault((user, asset), [0, 0])

    def _locked_need(self, o: _O) -> int:
        """What a resting order must hold: recomputed from scratch, never tracked."""
        if o.side is BUY:
            return o.budget - o.spent if o.type is MARKET else o.price * (o.qty - o.filled)
        return o.qty - o.filled

    def _lock_asset(self, o: _O) -> str:
        spec = self.specs[o.symbol]
        return spec.quote if o.side is BUY else spec.base

    def _order_event(
        self, o: _O, fill: tuple[int, int, int] = (0, 0, 0), reason: RejectReason = RejectReason.NONE
    ) -> None:
        self.seq += 1
        self.user_updates[o.user] = self.user_updates.get(o.user, 0) + 1
        done = o.status in (
            OrderStatus.FILLED,
            OrderStatus.CANCELLED,
            OrderStatus.EXPIRED,
            OrderStatus.REJECTED,
        )
        o.last = OrderUpdate(
            epoch=self._epoch,
            seq=self.seq,
            ts_ns=self.ts,
            order_id=o.id,
            client_order_id=o.cid,
            user_id=o.user,
            symbol=o.symbol,
            side=o.side,
            order_type=o.type,
            time_in_force=o.tif,
            price=o.price,
            qty=o.qty,
            quote_budget=o.budget,
            filled_qty=o.filled,
            remaining_qty=0 if done else o.qty - o.filled,
            quote_filled=o.quote_filled,
            status=o.status,
            reason=reason,
            last_fill_qty=fill[0],
            last_fill_price=fill[1],
            trade_id=fill[2],
            created_ns=o.created,
            updated_ns=o.updated,
            expire_ns=o.expire,
            user_seq=self.user_updates[o.user],
        )
        self.out.append(o.last)

    def _balances(
        self,
        cells: list[tuple[int, str]],
        before: dict[tuple[int, str], tuple[int, int]],
        reason: BalanceReason,
        ref: int,
    ) -> None:
        seen = []
        for cell in cells:
            if cell not in seen:
                seen.append(cell)
        for user, asset in seen:
            a0, l0 = before[(user, asset)]
            a1, l1 = self._b(user, asset)
            if (a1, l1) != (a0, l0):
                self.seq += 1
                self.out.append(
                    BalanceUpdate(self._epoch, self.seq, self.ts, user, asset, a1, l1, a1 - a0, l1 - l0, reason, ref)
                )

    def _snap(self, cells: list[tuple[int, str]]) -> dict[tuple[int, str], tuple[int, int]]:
        return {c: (self._b(*c)[0], self._b(*c)[1]) for c in cells}

    # ---------------------------------------------------------------- execution
    def _out_of_range(self, cmd: Command) -> RejectReason | None:
        """The wire-range rules, checked before anything happens (a rejection there is a bare result)."""

        def long(v: int, hi: int = INT64_MAX) -> bool:
            return INT64_MIN <= v <= hi

        def text(v: str, most: int) -> bool:
            try:
                v.encode("utf-8")
            except UnicodeError:
                return False
            return len(v) <= most

        if isinstance(cmd, AdvanceTime):
            return None
        if cmd.user_id < 0 or cmd.user_id > INT64_MAX:
            return RejectReason.INVALID_USER
        if isinstance(cmd, PlaceOrder):
            checks = [
                (text(cmd.symbol, MAX_NAME), RejectReason.UNKNOWN_SYMBOL),
                (text(cmd.client_order_id, MAX_CLIENT_ORDER_ID), RejectReason.INVALID_CLIENT_ORDER_ID),
                (long(cmd.price, MAX_AMOUNT), RejectReason.INVALID_PRICE),
                (long(cmd.qty, MAX_AMOUNT), RejectReason.INVALID_QUANTITY),
                (
                    cmd.order_type is MARKET or cmd.price < 1 or cmd.qty < 1 or cmd.price * cmd.qty <= MAX_AMOUNT,
                    RejectReason.INVALID_QUANTITY,
                ),
                (long(cmd.quote_budget, MAX_AMOUNT), RejectReason.INVALID_BUDGET),
                (long(cmd.expire_ns), RejectReason.INVALID_EXPIRY),
            ]
        elif isinstance(cmd, CancelOrder):
            checks = [
                (long(cmd.order_id), RejectReason.UNKNOWN_ORDER),
                (text(cmd.client_order_id, MAX_CLIENT_ORDER_ID), RejectReason.INVALID_CLIENT_ORDER_ID),
            ]
        else:
            supply_after = self.net.get(cmd.asset, 0) + (cmd.amount if isinstance(cmd, Deposit) else 0)
            checks = [
                (text(cmd.asset, MAX_NAME), RejectReason.UNKNOWN_ASSET),
                (long(cmd.amount, MAX_AMOUNT), RejectReason.INVALID_AMOUNT),
                (cmd.amount < 1 or supply_after <= MAX_AMOUNT, RejectReason.INVALID_AMOUNT),
            ]
        for ok, reason in checks:
            if not ok:
                return reason
        return None

    def execute(self, cmd: Command) -> CommandResult:
        bad = self._out_of_range(cmd)
        if bad is not None:
            return CommandResult(False, bad)
        self.out = []
        self.ts = cmd.ts_ns
        for o in sorted(
            (o for o in self.resting if o.tif is TimeInForce.GTT and o.expire <= self.ts),
            key=lambda o: (o.expire, o.id),
        ):
            self._end(o, OrderStatus.EXPIRED)
        if isinstance(cmd, PlaceOrder):
            accepted, reason, oid = self._place(cmd)
        elif isinstance(cmd, CancelOrder):
            accepted, reason, oid = self._cancel(cmd)
        elif isinstance(cmd, (Deposit, Withdraw)):
            accepted, reason, oid = self._funds(cmd)
        elif isinstance(cmd, AdvanceTime):
            accepted, reason, oid = True, RejectReason.NONE, 0
        else:  # pragma: no cover
            raise TypeError(cmd)
        return CommandResult(accepted, reason, oid, tuple(self.out))

    def _end(self, o: _O, status: OrderStatus) -> None:
        self.resting.remove(o)
        o.status, o.updated = status, self.ts
        self._order_event(o)
        cell = (o.user, self._lock_asset(o))
        before = self._snap([cell])
        amount = self._locked_need(o)
        self._b(*cell)[0] += amount
        self._b(*cell)[1] -= amount
        self._balances([cell], before, BalanceReason.ORDER_UNLOCK, o.id)

    def _reject_reason(self, c: PlaceOrder) -> RejectReason:
        spec = self.specs.get(c.symbol)
        if spec is None:
            return RejectReason.UNKNOWN_SYMBOL
        if c.user_id < 1:
            return RejectReason.INVALID_USER
        if c.order_type is MARKET and c.time_in_force not in (TimeInForce.IOC, TimeInForce.FOK):
            return RejectReason.INVALID_TIME_IN_FORCE
        if c.order_type is MARKET and c.price != 0:
            return RejectReason.INVALID_PRICE
        if c.order_type is not MARKET and (c.price < 1 or c.price % spec.tick_size != 0):
            return RejectReason.INVALID_PRICE
        if c.qty < 1 or c.qty % spec.lot_size != 0:
            return RejectReason.INVALID_QUANTITY
        wants_budget = c.order_type is MARKET and c.side is BUY
        if (wants_budget and c.quote_budget < 1) or (not wants_budget and c.quote_budget != 0):
            return RejectReason.INVALID_BUDGET
        if c.time_in_force is TimeInForce.GTT and c.expire_ns <= c.ts_ns:
            return RejectReason.INVALID_EXPIRY
        if c.time_in_force is not TimeInForce.GTT and c.expire_ns != 0:
            return RejectReason.INVALID_EXPIRY
        if c.client_order_id and any(o.user == c.user_id and o.cid == c.client_order_id for o in self.resting):
            return RejectReason.DUPLICATE_CLIENT_ORDER_ID
        return RejectReason.NONE

    def _makers(self, o: _O) -> list[_O]:
        """Resting orders this one could trade with, best first."""
        out = []
        for m in self.resting:
            if m.symbol != o.symbol or m.side is o.side:
                continue
            if o.type is not MARKET and (m.price > o.price if o.side is BUY else m.price < o.price):
                continue
            out.append(m)
        return sorted(out, key=lambda m: (m.price if o.side is BUY else -m.price, m.id))

    def _fill_qty(self, o: _O, m: _O, remaining: int, budget_left: int) -> int:
        q = min(remaining, m.qty - m.filled)
        if o.type is MARKET and o.side is BUY:
            lot = self.specs[o.symbol].lot_size
            q = min(q, (budget_left // m.price) // lot * lot)
        return q

    def _place(self, c: PlaceOrder) -> tuple[bool, RejectReason, int]:
        oid = self.next_id
        self.next_id += 1
        o = _O(
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
            updated=c.ts_ns,
        )
        reason = self._reject_reason(c)
        if reason is RejectReason.NONE and self._b(o.user, self._lock_asset(o))[0] < self._locked_need(o):
            reason = RejectReason.INSUFFICIENT_FUNDS
        if reason is not RejectReason.NONE:
            o.status = OrderStatus.REJECTED
            self._order_event(o, reason=reason)
            return False, reason, oid
        if o.tif is TimeInForce.FOK:
            need, budget = o.qty, o.budget
            for m in self._makers(o):
                q = self._fill_qty(o, m, need, budget)
                if q < 1:
                    break
                need -= q
                budget -= q * m.price
                if need == 0:
                    break
            if need:
                o.status = OrderStatus.EXPIRED
                self._order_event(o)
                return True, RejectReason.NONE, oid
        cell = (o.user, self._lock_asset(o))
        before = self._snap([cell])
        amount = self._locked_need(o)
        self._b(*cell)[0] -= amount
        self._b(*cell)[1] += amount
        self._order_event(o)
        self._balances([cell], before, BalanceReason.ORDER_LOCK, oid)
        while o.filled < o.qty:
            makers = self._makers(o)
            if not makers:
                break
            q = self._fill_qty(o, makers[0], o.qty - o.filled, o.budget - o.spent)
            if q < 1:
                break
            self._trade(o, makers[0], q)
        spec = self.specs[o.symbol]
        if o.filled == o.qty:
            if o.type is MARKET and o.side is BUY and o.budget > o.spent:
                cell = (o.user, spec.quote)
                before = self._snap([cell])
                left = o.budget - o.spent
                self._b(*cell)[0] += left
                self._b(*cell)[1] -= left
                self._balances([cell], before, BalanceReason.ORDER_UNLOCK, oid)
        elif o.type is MARKET or o.tif in (TimeInForce.IOC, TimeInForce.FOK):
            self.resting.append(o)  # so that _end can take it out again
            self._end(o, OrderStatus.EXPIRED)
        else:
            self.resting.append(o)
        return True, RejectReason.NONE, oid

    def _trade(self, taker: _O, maker: _O, q: int) -> None:
        spec = self.specs[taker.symbol]
        price = maker.price
        tid = self.next_trade
        self.next_trade += 1
        buyer, seller = (taker, maker) if taker.side is BUY else (maker, taker)
        buyer_bps = self.taker_bps if buyer is taker else self.maker_bps
        seller_bps = self.taker_bps if seller is taker else self.maker_bps
        buyer_fee = (q * buyer_bps) // 10_000
        seller_fee = (price * q * seller_bps) // 10_000
        fee = self.fee_account
        cells = [
            (buyer.user, spec.quote),
            (buyer.user, spec.base),
            (seller.user, spec.base),
            (seller.user, spec.quote),
            (fee, spec.base),
            (fee, spec.quote),
        ]
        before = self._snap(cells)
        # Locks are recomputed from the order's state before and after the fill: what the
        # buyer stops holding beyond what it paid is its price improvement, back to available.
        buyer_lock_before, seller_lock_before = self._locked_need(buyer), self._locked_need(seller)
        for o in (buyer, seller):
            o.filled += q
            o.quote_filled += price * q
            o.updated = self.ts
            o.status = OrderStatus.FILLED if o.filled == o.qty else OrderStatus.PARTIALLY_FILLED
        buyer.spent += price * q
        buyer_released = buyer_lock_before - self._locked_need(buyer)
        self._b(buyer.user, spec.quote)[1] -= buyer_released
        self._b(buyer.user, spec.quote)[0] += buyer_released - price * q
        self._b(buyer.user, spec.base)[0] += q - buyer_fee
        self._b(seller.user, spec.base)[1] -= seller_lock_before - self._locked_need(seller)
        self._b(seller.user, spec.quote)[0] += price * q - seller_fee
        self._b(fee, spec.base)[0] += buyer_fee
        self._b(fee, spec.quote)[0] += seller_fee
        self.seq += 1
        self.out.append(
            Trade(
                self._epoch,
                self.seq,
                self.ts,
                tid,
                spec.name,
                price,
                q,
                price * q,
                taker.side,
                maker.id,
                taker.id,
                maker.user,
                taker.user,
                buyer_fee if maker is buyer else seller_fee,
                buyer_fee if taker is buyer else seller_fee,
            )
        )
        if maker.filled == maker.qty:
            self.resting.remove(maker)
        self._order_event(maker, (q, price, tid))
        self._order_event(taker, (q, price, tid))
        self._balances(cells, before, BalanceReason.TRADE, tid)

    def _cancel(self, c: CancelOrder) -> tuple[bool, RejectReason, int]:
        for o in self.resting:
            if o.user != c.user_id:
                continue
            if (c.order_id and o.id == c.order_id) or (
                not c.order_id and c.client_order_id and o.cid == c.client_order_id
            ):
                self._end(o, OrderStatus.CANCELLED)
                return True, RejectReason.NONE, o.id
        return False, RejectReason.UNKNOWN_ORDER, c.order_id

    def _funds(self, c: Deposit | Withdraw) -> tuple[bool, RejectReason, int]:
        assets = {a for s in self.specs.values() for a in (s.base, s.quote)}
        if c.user_id < 1:
            return False, RejectReason.INVALID_USER, 0
        if c.asset not in assets:
            return False, RejectReason.UNKNOWN_ASSET, 0
        if c.amount < 1:
            return False, RejectReason.INVALID_AMOUNT, 0
        sign = 1 if isinstance(c, Deposit) else -1
        if sign < 0 and self._b(c.user_id, c.asset)[0] < c.amount:
            return False, RejectReason.INSUFFICIENT_FUNDS, 0
        cell = (c.user_id, c.asset)
        before = self._snap([cell])
        self._b(*cell)[0] += sign * c.amount
        self.net[c.asset] = self.net.get(c.asset, 0) + sign * c.amount
        reason = BalanceReason.DEPOSIT if sign > 0 else BalanceReason.WITHDRAW
        self._balances([cell], before, reason, 0)
        return True, RejectReason.NONE, 0

    # ------------------------------------------------------------------ queries
    def check_invariants(self) -> list[str]:
        problems = []
        for asset in {a for _, a in self.bal} | set(self.net):
            total = sum(av + lk for (_, a), (av, lk) in self.bal.items() if a == asset)
            if total != self.net.get(asset, 0):
                problems.append(f"{asset}: total {total} != net deposits {self.net.get(asset, 0)}")
        for (user, asset), (av, lk) in self.bal.items():
            if av < 0 or lk < 0:
                problems.append(f"user {user} {asset}: negative")
            need = sum(self._locked_need(o) for o in self.resting if o.user == user and self._lock_asset(o) == asset)
            if lk != need:
                problems.append(f"user {user} {asset}: locked {lk} != {need}")
        return problems

    def open_orders(self, user_id: int) -> list[OrderUpdate]:
        return [o.last for o in sorted(self.resting, key=lambda o: o.id) if o.user == user_id and o.last]

    def balance(self, user_id: int, asset: str) -> Balance:
        av, lk = self.bal.get((user_id, asset), [0, 0])
        return Balance(av, lk)

    def state_hash(self) -> str:
        books = []
        for name in sorted(self.specs):
            sides = []
            for side in (BUY, SELL):
                orders = sorted(
                    (o for o in self.resting if o.symbol == name and o.side is side),
                    key=lambda o: (-o.price if side is BUY else o.price, o.id),
                )
                levels: list[tuple[int, list[int]]] = []
                for o in orders:
                    if levels and levels[-1][0] == o.price:
                        levels[-1][1].append(o.id)
                    else:
                        levels.append((o.price, [o.id]))
                sides.append(levels)
            books.append((name, (sides[0], sides[1])))
        orders_state = [
            (
                o.id,
                o.cid,
                o.user,
                o.symbol,
                o.side.value,
                o.type.value,
                o.tif.value,
                o.price,
                o.qty,
                o.budget,
                o.filled,
                o.quote_filled,
                o.status.value,
                o.created,
                o.updated,
                o.expire,
                self._locked_need(o),
            )
            for o in sorted(self.resting, key=lambda o: o.id)
        ]
        balances = sorted((u, a, av, lk) for (u, a), (av, lk) in self.bal.items() if av or lk)
        user_seqs = sorted(self.user_updates.items())
        state = (self.seq, self.next_id, self.next_trade, books, orders_state, balances, user_seqs)
        return hashlib.sha256(repr(state).encode()).hexdigest()
