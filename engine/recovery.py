"""Rebuild an engine from its journal, proving the journal and the engine agree.

Every journaled command is executed again on a fresh engine with the journal's epoch and
configuration, and every event it produces must encode to the journaled bytes: the same entry
(header and Avro frame) the feed sent, or the same UNPUBLISHABLE marker and JSON record. Nothing
journaled is decoded on this path: the regenerated events are encoded (as the hot path does) and
compared with the stored entries, one bytes comparison per command. A mismatch means the code
changed behaviour under an existing journal (or the journal was tampered with), and continuing
would renumber or rewrite history, so it is fatal. A frame written with an older writer schema
(after a compatible schema change) is compared by encoding the regenerated event with that writer.

One change of behaviour is recovered on purpose: the wire-range rules (``engine.core``). The
service never journals a command they reject, so a journaled command they reject was journaled
before they existed (a journal migrated from format 2), and only the rules of then reproduce its
events (``Engine.execute_unchecked``). Such a journal can hold events that cannot be published (a
user id beyond 64 bits, a balance beyond a long): the journal holds their markers and JSON, and
recovery lists them in the ``RecoveryReport``.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.commands import Command
from engine.core import Engine
from engine.journal import Journal, JournalError, RawRecord, _split_entries
from schemas import stdavro
from schemas.events import Event, RejectReason
from schemas.wire import ENTRY, encode_events, event_entry, header_for, parse_marker

__all__ = ["RecoveryReport", "recover"]


@dataclass
class RecoveryReport:
    commands: int = 0
    unchecked: int = 0
    """Commands journaled before the wire-range rules that those rules reject, replayed without them."""
    unpublishable: int = 0
    """Journaled events that cannot be published (see ``schemas.wire.event_problem``)."""
    examples: list[tuple[int, str, str]] = field(default_factory=list)
    """(seq, reason, detail) of the first unpublishable events."""
    limit: int = 20


def recover(
    journal: Journal,
    report: RecoveryReport | None = None,
    on_events: Callable[[list[Event]], None] | None = None,
) -> tuple[Engine, int]:
    """(engine in the journal's final state, number of commands replayed); ``report``, when given,
    is filled with what was replayed without the wire-range rules and what cannot be published;
    ``on_events`` sees every command's events (proven equal to the journal's) in order."""
    h = journal.header
    engine = Engine(
        h.symbols,
        h.epoch,
        maker_fee_bps=h.maker_fee_bps,
        taker_fee_bps=h.taker_fee_bps,
        fee_account=h.fee_account,
    )
    if type(journal).records is not Journal.records:
        # A journal class that watches ``records()`` (audit.core's tap, until it passes
        # ``on_events``): feed it from there. Slower: every event is decoded and compared as a value.
        count = _recover_decoded(journal, engine, report, on_events)
    else:
        count = 0
        for rec in journal.raw_records():
            produced, _ = _execute(engine, rec.command, report)
            entries, json_records = encode_events(produced)
            if (entries != rec.entries or tuple(json_records or ()) != rec.json_records) and not _same_as_older(
                produced, rec
            ):
                raise _diverged(count, rec.first_seq or engine.last_seq, len(produced), rec.count)
            if json_records and report is not None:
                _report_unpublishable(produced, report)
            if on_events is not None:
                on_events(list(produced))
            count += 1
    if engine.last_seq != journal.last_seq:
        raise JournalError(f"recovered seq {engine.last_seq} but the journal ends at {journal.last_seq}")
    if report is not None:
        report.commands = count
    return engine, count


def _execute(engine: Engine, cmd: Command, report: RecoveryReport | None) -> tuple[Sequence[Event], bool]:
    """(events, whether the command needed the old rules)."""
    if engine.range_reason(cmd) is not RejectReason.NONE:
        if report is not None:
            report.unchecked += 1
        return engine.execute_unchecked(cmd).events, True
    return engine.execute(cmd).events, False


def _recover_decoded(
    journal: Journal,
    engine: Engine,
    report: RecoveryReport | None,
    on_events: Callable[[list[Event]], None] | None,
) -> int:
    count = 0
    legacy = False
    """Only after a command that needed the old rules can an event be unpublishable (a balance it
    left beyond a long): until then no event is inspected."""
    for cmd, journaled in journal.records():
        produced, unchecked = _execute(engine, cmd, report)
        legacy = legacy or unchecked
        if list(produced) != journaled:
            first = journaled[0].seq if journaled else engine.last_seq
            raise _diverged(count, first, len(produced), len(journaled))
        if legacy and report is not None:
            _report_unpublishable(produced, report)
        if on_events is not None:
            on_events(journaled)
        count += 1
    return count


def _same_as_older(produced: Sequence[Event], rec: RawRecord) -> bool:
    """Whether entries that differ from the current encoding are the same events written with an
    older writer schema (the journal predates a compatible schema change)."""
    if len(produced) != rec.count:
        return False
    try:
        stored = _split_entries(rec.entries, rec.count, rec.first_seq)
    except ValueError:
        return False
    json_records = []
    for ev, (header, payload) in zip(produced, stored, strict=True):
        entry, record = event_entry(ev)
        if record is not None:
            json_records.append(record)
        if entry[4:] == header + payload:
            continue
        try:
            writer = stdavro.writer_of(payload)
            if writer.current or writer.cls is not type(ev) or writer.encode(ev) != payload or header_for(ev) != header:
                return False
        except Exception:  # an unknown writer, or one that cannot carry this event: not the same
            return False
    return tuple(json_records) == rec.json_records


def _report_unpublishable(produced: Sequence[Event], report: RecoveryReport) -> None:
    for ev in produced:
        entry, record = event_entry(ev)
        if record is None:
            continue
        body = parse_marker(entry[ENTRY.size :])
        report.unpublishable += 1
        if len(report.examples) < report.limit:
            report.examples.append((ev.seq, str(body["reason"]), str(body["detail"])))


def _diverged(count: int, first: int, produced: int, journaled: int) -> JournalError:
    return JournalError(
        f"recovery diverged at command {count + 1} (seq ~{first}): the engine now produces "
        f"{produced} events where the journal holds {journaled}, or different payloads"
    )
