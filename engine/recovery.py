"""Rebuild an engine from its journal, proving the journal and the engine agree.

Every journaled command is executed again on a fresh engine with the
journal's epoch and configuration, and every event it produces must equal the
journaled event: same seq, same payload. A mismatch means the code changed
behaviour under an existing journal (or the journal was tampered with), and
continuing would renumber or rewrite history, so it is fatal.

Standard library only.
"""

from __future__ import annotations

from engine.core import Engine
from engine.journal import Journal, JournalError

__all__ = ["recover"]


def recover(journal: Journal) -> tuple[Engine, int]:
    """(engine in the journal's final state, number of commands replayed)."""
    h = journal.header
    engine = Engine(
        h.symbols,
        h.epoch,
        maker_fee_bps=h.maker_fee_bps,
        taker_fee_bps=h.taker_fee_bps,
        fee_account=h.fee_account,
    )
    count = 0
    for cmd, journaled in journal.records():
        produced = engine.execute(cmd).events
        if list(produced) != journaled:
            first = journaled[0].seq if journaled else engine.last_seq
            raise JournalError(
                f"recovery diverged at command {count + 1} (seq ~{first}): the engine now produces "
                f"{len(produced)} events where the journal holds {len(journaled)}, or different payloads"
            )
        count += 1
    if engine.last_seq != journal.last_seq:
        raise JournalError(f"recovered seq {engine.last_seq} but the journal ends at {journal.last_seq}")
    return engine, count
