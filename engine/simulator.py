"""A realistic, seeded order flow driven through the real engine, journal and feed.

Users deposit, then trade around a per-symbol mid price that random-walks:
mostly passive limit orders near the mid, some aggressive IOC limits and
market orders that cross, FOKs, short-lived GTTs, cancels of earlier orders
(some already filled: those cancels are rejected, as in real traffic), a few
invalid orders and withdrawals. The *sequence* of commands is a pure function
of the seed; their timestamps come from the engine clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from engine.commands import CancelOrder, Command, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.service import EngineService
from schemas.events import OrderType, Side, TimeInForce

__all__ = ["FlowGenerator", "SimulationReport", "simulate", "stamped_flow"]

BUY, SELL = Side.BUY, Side.SELL


class FlowGenerator:
    """Yields commands (with ts_ns=0: the caller stamps them)."""

    def __init__(self, symbols: list[SymbolSpec], users: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.symbols = symbols
        self.users = users
        self.mid = {s.name: 10_000 - 10_000 % s.tick_size for s in symbols}
        self.placed: list[tuple[int, int]] = []
        """(user, order_id) of placed orders, the pool cancels draw from."""

    def deposits(self) -> Iterator[Command]:
        assets = sorted({a for s in self.symbols for a in (s.base, s.quote)})
        quotes = {s.quote for s in self.symbols}
        for user in range(1, self.users + 1):
            for asset in assets:
                yield Deposit(0, user, asset, 10**12 if asset in quotes else 10**8)

    def record(self, user: int, order_id: int) -> None:
        self.placed.append((user, order_id))
        if len(self.placed) > 50_000:
            del self.placed[: len(self.placed) // 2]

    def next(self, now_ns: int) -> Command:
        rng = self.rng
        spec = self.symbols[rng.randrange(len(self.symbols))]
        tick, lot = spec.tick_size, spec.lot_size
        mid = self.mid[spec.name] = max(100 * tick, self.mid[spec.name] + tick * rng.choice((-1, 0, 0, 1)))
        user = rng.randint(1, self.users)
        side = BUY if rng.random() < 0.5 else SELL
        qty = lot * rng.randint(1, 10)
        r = rng.random()
        if r < 0.50:  # passive limit, rests on the book
            offset = tick * rng.randint(1, 20)
            price = mid - offset if side is BUY else mid + offset
            return PlaceOrder(0, user, spec.name, side, OrderType.LIMIT, TimeInForce.GTC, qty, price)
        if r < 0.62:  # aggressive limit IOC that crosses the spread
            offset = tick * rng.randint(0, 10)
            price = mid + offset if side is BUY else max(tick, mid - offset)
            return PlaceOrder(0, user, spec.name, side, OrderType.LIMIT, TimeInForce.IOC, qty, price)
        if r < 0.67:  # market
            budget = qty * (mid + 50 * tick) if side is BUY else 0
            return PlaceOrder(0, user, spec.name, side, OrderType.MARKET, TimeInForce.IOC, qty, 0, budget)
        if r < 0.70:  # fill or kill
            price = mid + 5 * tick if side is BUY else mid - 5 * tick
            return PlaceOrder(0, user, spec.name, side, OrderType.LIMIT, TimeInForce.FOK, qty, price)
        if r < 0.75:  # good till time, expires within a few seconds
            price = mid - tick * rng.randint(1, 5) if side is BUY else mid + tick * rng.randint(1, 5)
            expire = now_ns + rng.randint(200, 3_000) * 1_000_000
            return PlaceOrder(0, user, spec.name, side, OrderType.LIMIT, TimeInForce.GTT, qty, price, 0, "", expire)
        if r < 0.97 and self.placed:  # cancel an earlier order (it may be gone already)
            owner, order_id = self.placed.pop(rng.randrange(len(self.placed)))
            return CancelOrder(0, owner, order_id)
        if r < 0.985:  # invalid on purpose: the engine must reject, not break
            return PlaceOrder(0, user, spec.name, side, OrderType.LIMIT, TimeInForce.GTC, 0, mid)
        return Withdraw(0, user, spec.quote, rng.randint(1, 1_000))


def stamped_flow(symbols: list[SymbolSpec], users: int, commands: int, seed: int, step_ns: int = 1000) -> list[Command]:
    """The seeded flow as a list, stamped ``step_ns`` apart: every user's deposits, then
    ``commands`` commands. A scratch engine executes them as they are drawn, so cancels name
    orders that exist (what benchmarks and tests replay into a fresh engine or service)."""
    gen = FlowGenerator(symbols, users, seed=seed)
    flow = [replace(c, ts_ns=1) for c in gen.deposits()]
    engine = Engine(symbols, 1)
    for c in flow:
        engine.execute(c)
    ts = 1
    for _ in range(commands):
        ts += step_ns
        c = replace(gen.next(ts), ts_ns=ts)
        r = engine.execute(c)
        if r.accepted and isinstance(c, PlaceOrder):
            gen.record(c.user_id, r.order_id)
        flow.append(c)
    return flow


@dataclass(frozen=True, slots=True)
class SimulationReport:
    commands: int
    events: int
    rejected: int
    seconds: float
    last_seq: int
    epoch: int
    feed_dropped: int

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


def simulate(
    service: EngineService,
    users: int,
    rate: float,
    duration: float,
    seed: int,
    *,
    n_symbols: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> SimulationReport:
    """Drive ``service`` at ``rate`` commands/s for ``duration`` s, through journal and feed."""
    symbols = service.settings.symbol_specs()[:n_symbols]
    gen = FlowGenerator(symbols, users, seed)
    stats = service.stats
    start_cmds, start_events, start_rej = stats.commands, stats.events, stats.rejected
    service.submit([replace(c, ts_ns=service.stamp()) for c in gen.deposits()])
    t0 = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= duration or should_stop():
            break
        due = min(int(rate * elapsed) - sent, 2_000)
        if due <= 0:
            service.service_io(timeout_ms=1)
            continue
        batch = []
        for _ in range(due):
            now = service.stamp()
            batch.append(replace(gen.next(now), ts_ns=now))
        for cmd, result in zip(batch, service.submit(batch), strict=True):
            if isinstance(cmd, PlaceOrder) and result.accepted:
                gen.record(cmd.user_id, result.order_id)
        sent += due
        service.service_io(timeout_ms=0)
    seconds = time.monotonic() - t0
    return SimulationReport(
        stats.commands - start_cmds,
        stats.events - start_events,
        stats.rejected - start_rej,
        seconds,
        service.engine.last_seq,
        service.engine.epoch,
        stats.feed_dropped,
    )
