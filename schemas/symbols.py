"""The tradable symbols: what the engine trades and what the API serves at /symbols.

``OHS_ENGINE_SYMBOLS`` (and the API's ``OHS_API_SYMBOLS``, given the same text) is a
comma-separated list of ``NAME:BASE:QUOTE:TICK:LOT`` definitions; ``parse_symbols`` is the one
parser both use, so the API describes exactly the symbols the engine accepts.

Part of the pure core's contract: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import MAX_NAME

__all__ = ["DEFAULT_SYMBOLS", "SymbolSpec", "parse_symbols"]

DEFAULT_SYMBOLS = "BTC-USD:BTC:USD:1:1,ETH-USD:ETH:USD:1:1,SOL-USD:SOL:USD:1:1,XRP-USD:XRP:USD:1:1"


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """A tradable pair. Price units * quantity units = quote units."""

    name: str
    """E.g. "BTC-USD"."""
    base: str
    """Asset bought by a buy order, e.g. "BTC"."""
    quote: str
    """Asset paid by a buy order, e.g. "USD"."""
    tick_size: int = 1
    """Valid prices are positive multiples of this."""
    lot_size: int = 1
    """Valid quantities are positive multiples of this."""


def parse_symbols(text: str) -> list[SymbolSpec]:
    """The symbols of a ``NAME:BASE:QUOTE:TICK:LOT,...`` definition; ValueError for a bad one."""
    specs = []
    for item in text.split(","):
        name, base, quote, tick, lot = item.strip().split(":")
        for part in (name, base, quote):
            # Clients name symbols and assets; longer names are refused at the gateway (wire ranges).
            if not 0 < len(part) <= MAX_NAME or not part.isprintable():
                raise ValueError(f"symbol or asset name {part[:40]!r}: 1 to {MAX_NAME} printable characters")
        if int(tick) < 1 or int(lot) < 1:
            raise ValueError(f"symbol {name}: tick and lot sizes are positive")
        specs.append(SymbolSpec(name, base, quote, int(tick), int(lot)))
    return specs
