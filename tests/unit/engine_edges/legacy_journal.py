"""A journal holding what an engine without the wire-range rules journaled: records that cannot be published.

Before the rules, the engine journaled whatever it was sent and then died publishing it. Such a
journal (format 2, JSON) reaches format 3 through ``ohs engine migrate-journal``, which journals
those commands as JSON and their unpublishable events as UNPUBLISHABLE markers with their JSON.
Here the same records are appended directly, with the events the engine of then produced
(``Engine.execute_unchecked`` is that engine), between ordinary records. Shared by the unit tests,
the audit's tests and the engine-process test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from engine.commands import Command, Deposit, PlaceOrder
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import Journal
from schemas.events import Event, OrderType, Side, TimeInForce
from schemas.wire import event_problem

BUY, SELL, LIMIT, GTC = Side.BUY, Side.SELL, OrderType.LIMIT, TimeInForce.GTC


@dataclass
class Legacy:
    directory: Path
    epoch: int
    last_seq: int
    bad_commands: int
    unpublishable: dict[int, str]
    """seq -> reason, of every journaled event that cannot be published."""
    events: list[Event]


def build(directory: Path, symbols: list[SymbolSpec], ts0: int = 1_700_000_000_000_000_000) -> Legacy:
    """Ordinary and bad records; the bad ones are what the hostile probe sent (issue 12, item 4)."""
    journal = Journal.open(directory, symbols, fsync="never")
    engine = Engine(symbols, journal.epoch)
    symbol, quote, base = symbols[0].name, symbols[0].quote, symbols[0].base
    ts = ts0
    events: list[Event] = []
    bad = 0

    def run(cmd: Command, legacy: bool = False) -> None:
        nonlocal ts, bad
        ts += 1_000
        cmd = replace(cmd, ts_ns=ts)
        if legacy:
            assert engine.range_reason(cmd).value != "NONE", cmd  # the rules refuse it now
            result = engine.execute_unchecked(cmd)
            journal.append(cmd, result.events)
            bad += 1
        elif engine.range_reason(cmd).value != "NONE":
            return  # as the service does: rejected unexecuted, never journaled
        else:
            result = engine.execute(cmd)
            journal.append(cmd, result.events)
        events.extend(result.events)

    run(Deposit(0, 1, quote, 10**9))
    run(Deposit(0, 2, base, 10**6))
    run(PlaceOrder(0, 2, symbol, SELL, LIMIT, GTC, 5, 120))
    # A user id beyond 64 bits: its REJECTED update killed the engine in header_for.
    run(PlaceOrder(0, 2**64, symbol, BUY, LIMIT, GTC, 1, 100), legacy=True)
    # A deposit that makes a balance no long can hold: every later update of it is unpublishable too.
    run(Deposit(0, 3, quote, 2**63 + 500), legacy=True)
    # A client_order_id that UTF-8 cannot encode (a lone surrogate), on an order that rests.
    run(PlaceOrder(0, 2, symbol, SELL, LIMIT, GTC, 1, 130, client_order_id="\ud800"), legacy=True)
    # Ordinary commands after them, one by the user with the huge balance: it trades with user 2.
    run(PlaceOrder(0, 1, symbol, BUY, LIMIT, GTC, 2, 120))
    run(PlaceOrder(0, 3, symbol, BUY, LIMIT, GTC, 1, 120))
    run(Deposit(0, 1, quote, 77))  # refused now: the supply of the quote asset is beyond MAX_AMOUNT
    run(Deposit(0, 1, base, 77))
    journal.close()
    unpublishable = {}
    for ev in events:
        problem = event_problem(ev)
        if problem is not None:
            unpublishable[ev.seq] = problem[0]
    return Legacy(directory, journal.epoch, engine.last_seq, bad, unpublishable, events)
