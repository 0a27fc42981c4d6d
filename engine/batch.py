"""The engine service's loop over one batch of commands: check, execute, encode, stage.

``EngineService.submit`` (engine/service.py) owns what is around it: the journal's write and
sync, the feed, the counters, turning an exception into ``EngineFatal``. This is only the part
that runs once per command, kept apart so that the optional mypyc build (setup.py) compiles it
with the core: compiled, its calls into the core are C calls, and the loop around them costs
what the interpreter cost before (docs/benchmarks.md, the engine's section). Its I/O goes through
the callables it is given; it never touches a file or a socket itself.

Standard library only (with the pure core).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from engine.commands import Command
from engine.core import Engine
from schemas.events import Event, RejectReason

__all__ = ["Outcome", "execute_batch"]

_NONE: Final = RejectReason.NONE


class Outcome:
    """What ``submit`` answers for one command (what the gateway replies). Its events are
    journaled and published, not kept: holding a whole batch's event objects until its end cost
    the core a third of its rate."""

    __slots__ = ("accepted", "first_seq", "last_seq", "order_id", "reason")

    def __init__(self, accepted: bool, reason: RejectReason, order_id: int, first_seq: int, last_seq: int) -> None:
        self.accepted = accepted
        self.reason = reason
        self.order_id = order_id
        """The order placed (also when rejected) or cancelled; 0 for other commands."""
        self.first_seq = first_seq
        """The seq of the command's first event, 0 when it has none; its events are first_seq..last_seq."""
        self.last_seq = last_seq

    def astuple(self) -> tuple[bool, RejectReason, int, int, int]:
        return (self.accepted, self.reason, self.order_id, self.first_seq, self.last_seq)

    def __repr__(self) -> str:
        return (
            f"Outcome(accepted={self.accepted}, reason={self.reason.name}, order_id={self.order_id}, "
            f"first_seq={self.first_seq}, last_seq={self.last_seq})"
        )


def execute_batch(
    engine: Engine,
    commands: Sequence[Command],
    stage: Callable[[Command, int, int, bytes], None],
    encode: Callable[[Sequence[Event]], bytes | None] | None,
    encode_and_stage: Callable[[Command, int, int, Sequence[Event]], bytes],
    outcomes: list[Outcome],
    sections: list[bytes],
) -> tuple[int, int, int]:
    """Run ``commands`` in order: (events, rejected, out of range).

    Per command, one Outcome goes to ``outcomes`` (so after an exception ``len(outcomes)`` is the
    index of the command that raised it). A command outside the wire ranges gets its rejection
    and nothing else. Any other: the core executes it, ``encode`` (the C encoder; None without
    it) encodes its events, ``stage(cmd, first_seq, count, entries)`` stages its journal record
    and the entries go to ``sections``; when ``encode`` is None or declines the events (answers
    None), ``encode_and_stage`` does both and returns the entries."""
    events = rejected = out_of_range = 0
    append = outcomes.append
    for cmd in commands:
        reason = engine.range_reason(cmd)
        if reason is not _NONE:
            append(Outcome(False, reason, 0, 0, 0))
            rejected += 1
            out_of_range += 1
            continue
        result = engine.apply(cmd)
        evs = result.events
        if evs:
            first = evs[0].seq
            count = len(evs)
            entries = encode(evs) if encode is not None else None
            if entries is None:
                entries = encode_and_stage(cmd, first, count, evs)
            else:
                stage(cmd, first, count, entries)
            sections.append(entries)
            events += count
            append(Outcome(result.accepted, result.reason, result.order_id, first, first + count - 1))
        else:
            stage(cmd, 0, 0, b"")
            append(Outcome(result.accepted, result.reason, result.order_id, 0, 0))
        if not result.accepted:
            rejected += 1
    return events, rejected, out_of_range
