"""Journals of formats 1 and 2, written byte for byte as the engines of then wrote them.

Both formats are records ``u32 length | u32 crc32 | payload``: a JSON header (``format``, epoch,
symbols, fees), then one JSON ``[command, [event rows]]`` per command, each event row
``[tag, field values...]`` (format 1's order updates have no ``user_seq``). The events are the
real engine's (``execute_unchecked`` for a command flagged as journaled before the wire-range
rules). Shared by the migration tests and the engine-process test.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from engine.commands import Command
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import command_to_dict
from schemas.events import Event, OrderUpdate
from schemas.wire import event_json


def _record(payload: bytes) -> bytes:
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def write(
    directory: Path,
    symbols: list[SymbolSpec],
    commands: Iterable[tuple[Command, bool]],
    *,
    version: int = 2,
    epoch: int = 1_700_000_000_000_000,
    fees: tuple[int, int, int] = (0, 0, 0),
) -> tuple[Engine, list[Event]]:
    """Write ``directory/journal.log`` in ``version`` from (command, journaled before the rules);
    returns the engine after them and every event."""
    directory.mkdir(parents=True, exist_ok=True)
    maker, taker, fee_account = fees
    header = {
        "format": version,
        "epoch": epoch,
        "symbols": [asdict(s) for s in symbols],
        "maker_fee_bps": maker,
        "taker_fee_bps": taker,
        "fee_account": fee_account,
    }
    engine = Engine(symbols, epoch, maker_fee_bps=maker, taker_fee_bps=taker, fee_account=fee_account)
    out = [_record(json.dumps(header, separators=(",", ":")).encode())]
    events: list[Event] = []
    for cmd, unchecked in commands:
        if not unchecked and engine.range_reason(cmd).value != "NONE":
            continue  # rejected before it was journaled, as the service does
        result = engine.execute_unchecked(cmd) if unchecked else engine.execute(cmd)
        rows = []
        for ev in result.events:
            row = json.loads(event_json(ev))
            if version == 1 and isinstance(ev, OrderUpdate):
                row = row[:-1]  # no user_seq
            rows.append(row)
        out.append(_record(json.dumps([command_to_dict(cmd), rows], separators=(",", ":")).encode()))
        events.extend(result.events)
    (directory / "journal.log").write_bytes(b"".join(out))
    return engine, events
