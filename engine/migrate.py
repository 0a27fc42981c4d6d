"""``ohs engine migrate-journal``: turn a format 1 or 2 journal into its format 3 equivalent.

Formats 1 and 2 stored each record as compact JSON ``[command, [event, ...]]`` with every event a
list ``[tag, field values...]``; format 1's order updates lack ``user_seq`` (added in format 2).
The migration proves what it writes, as recovery would:

1. every command of the old journal is executed again on a fresh engine with the journal's epoch,
   symbols and fees (a command today's wire-range rules reject, journaled before they existed,
   with the rules of then: ``Engine.execute_unchecked``);
2. every regenerated event must equal the journaled one: all fields, except ``user_seq`` when the
   journal is format 1 (it has none; the new journal holds what the engine computes now);
3. the new journal is written *beside* the old one (``journal.format3.log`` in the same
   directory by default; never in place), then opened and recovered from scratch: its final
   state must equal the migrated engine's. Only then is it renamed into its final name.

The old journal is never modified. To switch (engine stopped):
``mv journal.log journal.format2.log && mv journal.format3.log journal.log``, then start the
engine: same epoch, same seqs. Downstream records keep what they were sent: a format-1 journal's
events went out without ``user_seq`` (read as 0); if consumers rely on it, start a new epoch
instead (move the journal directory aside).

Standard library only.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.commands import Command
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import Journal, JournalError, command_from_dict, event_from_json, header_of
from engine.recovery import recover
from schemas.events import BalanceUpdate, Event, OrderUpdate, RejectReason, Trade
from schemas.wire import encode_events

__all__ = ["MigrationReport", "migrate"]

_REC = struct.Struct(">II")
_NAMES_V2 = {
    "o": tuple(OrderUpdate.__dataclass_fields__),
    "t": tuple(Trade.__dataclass_fields__),
    "b": tuple(BalanceUpdate.__dataclass_fields__),
}
_NAMES_V1 = {**_NAMES_V2, "o": tuple(n for n in OrderUpdate.__dataclass_fields__ if n != "user_seq")}
_FLUSH_EVERY = 1_000
"""Records staged per write of the new journal."""


@dataclass
class MigrationReport:
    source: Path
    target: Path
    format: int
    epoch: int
    commands: int = 0
    events: int = 0
    last_seq: int = 0
    unchecked: int = 0
    """Commands replayed with the rules of before the wire ranges."""
    unpublishable: int = 0
    """Events the new journal holds as UNPUBLISHABLE markers (with their JSON)."""
    torn_tail: bool = False
    examples: list[tuple[int, str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "target": str(self.target),
            "format": self.format,
            "epoch": self.epoch,
            "commands": self.commands,
            "events": self.events,
            "last_seq": self.last_seq,
            "unchecked": self.unchecked,
            "unpublishable": self.unpublishable,
            "torn_tail": self.torn_tail,
        }


def _old_records(path: Path, report: MigrationReport) -> Iterator[tuple[int, list[Any]]]:
    """(offset, [command dict, event rows]) of every record after the header; a torn tail ends it."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_REC.size)
        length, _ = _REC.unpack(head)
        fh.seek(_REC.size + length)
        while True:
            offset = fh.tell()
            prefix = fh.read(_REC.size)
            if len(prefix) < _REC.size:
                report.torn_tail = bool(prefix)
                return
            length, crc = _REC.unpack(prefix)
            payload = fh.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                if offset + _REC.size + length < size:
                    raise JournalError(f"{path}: corrupt record at byte {offset} followed by more data")
                report.torn_tail = True
                return
            try:
                record = json.loads(payload)
                if not (isinstance(record, list) and len(record) == 2 and isinstance(record[1], list)):
                    raise TypeError("a record is [command, [events]]")
            except (ValueError, TypeError, RecursionError) as exc:
                raise JournalError(f"{path}: undecodable record at byte {offset}: {exc!r:.200}") from exc
            yield offset, record


def _comparable(ev: Event, with_user_seq: bool) -> Event:
    if not with_user_seq and isinstance(ev, OrderUpdate):
        return replace(ev, user_seq=0)
    return ev


def migrate(directory: Path, *, target: Path | None = None, force: bool = False) -> MigrationReport:
    """Write the format-3 equivalent of ``directory/journal.log`` (format 1 or 2) beside it; see
    the module docstring. Raises JournalError if the journal is not an old format, does not replay,
    or the target exists (unless ``force``)."""
    source = directory / "journal.log"
    if not source.exists():
        raise JournalError(f"no journal at {source}")
    head = header_of(source)
    version = head.get("format")
    if version not in (1, 2):
        raise JournalError(f"{source} is format {version!r}: only formats 1 and 2 are migrated")
    target = target or directory / "journal.format3.log"
    if target.resolve() == source.resolve():
        raise JournalError("the migration never writes in place")
    if target.exists() and not force:
        raise JournalError(f"{target} exists: remove it or pass --force")
    try:
        symbols = tuple(SymbolSpec(**s) for s in head["symbols"])
        epoch, maker, taker = head["epoch"], head["maker_fee_bps"], head["taker_fee_bps"]
        fee_account = head["fee_account"]
    except (KeyError, TypeError) as exc:
        raise JournalError(f"{source}: malformed header: {exc!r}") from exc
    report = MigrationReport(source, target, int(version), int(epoch))
    names = _NAMES_V1 if version == 1 else _NAMES_V2
    with_user_seq = version != 1
    engine = Engine(symbols, epoch, maker_fee_bps=maker, taker_fee_bps=taker, fee_account=fee_account)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    out = Journal.open(
        target.parent,
        symbols,
        maker_fee_bps=maker,
        taker_fee_bps=taker,
        fee_account=fee_account,
        fsync="never",
        epoch=epoch,
        name=partial.name,
    )
    try:
        for offset, (cmd_d, rows) in _old_records(source, report):
            try:
                cmd: Command = command_from_dict(cmd_d)
                journaled = [event_from_json(row, names) for row in rows]
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise JournalError(f"{source}: undecodable record at byte {offset}: {exc!r:.200}") from exc
            if engine.range_reason(cmd) is not RejectReason.NONE:
                produced = engine.execute_unchecked(cmd).events
                report.unchecked += 1
            else:
                produced = engine.execute(cmd).events
            if [_comparable(e, with_user_seq) for e in produced] != [_comparable(e, with_user_seq) for e in journaled]:
                first = journaled[0].seq if journaled else engine.last_seq
                raise JournalError(
                    f"{source}: migration diverged at command {report.commands + 1} (seq ~{first}): the engine "
                    f"produces {len(produced)} events where the journal holds {len(journaled)}, or different "
                    "payloads; nothing was switched"
                )
            entries, json_records = encode_events(produced)
            out.add(cmd, produced[0].seq if produced else 0, len(produced), entries, json_records or ())
            if json_records:
                report.unpublishable += len(json_records)
            report.commands += 1
            report.events += len(produced)
            if report.commands % _FLUSH_EVERY == 0:
                out.flush()
        out.sync()
    finally:
        out.close()
    report.last_seq = engine.last_seq
    # Prove the new journal: opened and recovered from scratch, it must give the same engine.
    with Journal.open(
        target.parent,
        symbols,
        maker_fee_bps=maker,
        taker_fee_bps=taker,
        fee_account=fee_account,
        fsync="never",
        name=partial.name,
    ) as check:
        recovered, commands = recover(check)
    if commands != report.commands or recovered.state_hash() != engine.state_hash():
        raise JournalError(f"{partial}: the new journal does not recover to the migrated state; nothing was switched")
    os.replace(partial, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return report
