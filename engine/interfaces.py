"""The engine package's interfaces, in one place.

``MatchingCore`` is implemented by the fast engine (``engine.core.Engine``)
and by the naive reference (``engine.reference.ReferenceEngine``); the
differential test drives both through this interface. The edges (journal,
feed, gateway) depend only on it.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.commands import Command, CommandResult
from schemas.events import OrderUpdate
from schemas.symbols import SymbolSpec  # the contract's; re-exported for the engine's modules

__all__ = ["Balance", "EngineError", "MatchingCore", "SymbolSpec"]


class EngineError(Exception):
    """Root of the engine package's exceptions (never raised for a rejection)."""

    retriable: bool = False


@dataclass(frozen=True, slots=True)
class Balance:
    available: int
    locked: int


class MatchingCore(Protocol):
    """A deterministic order book + ledger: same commands in, same events out."""

    @property
    def epoch(self) -> int: ...

    @property
    def last_seq(self) -> int:
        """Seq of the last event emitted (0 before the first)."""
        ...

    def execute(self, cmd: Command) -> CommandResult:
        """Apply one command; never raises for a business rejection."""
        ...

    def check_invariants(self) -> list[str]:
        """Every violated invariant as a sentence; empty when all hold.

        Per asset: sum over users (fee account included) of available + locked
        equals deposits - withdrawals; nothing negative; each user's locked
        equals exactly what their open orders still need.
        """
        ...

    def open_orders(self, user_id: int) -> list[OrderUpdate]:
        """The user's open orders (latest state of each), by order_id."""
        ...

    def balance(self, user_id: int, asset: str) -> Balance: ...

    def state_hash(self) -> str:
        """A digest of books, open orders, balances and counters."""
        ...
