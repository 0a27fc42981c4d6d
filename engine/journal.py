"""The engine's journal: every command and the events it produced, on disk, in order.

It is the drop copy of the whole pipeline: the engine appends a command's
events here *before* publishing them, recovery re-executes the commands and
checks that each regenerated event equals the journaled one, the replay
service re-sends any seq range from here, and ``ohs audit`` compares
everything downstream against it.

File format (``journal.log`` in the journal dir), a sequence of records:
``u32 length | u32 crc32(payload) | payload`` (big-endian), payload = compact
JSON. The first record is the header: format version, epoch, symbols and fee
settings; recovery refuses a journal whose header disagrees with the
engine's configuration. A crash mid-append leaves a torn tail (a short or
CRC-failing *last* record): it is cut off on open. A bad record with valid
records after it is corruption and an error.

Durability (``fsync``): ``always`` fsyncs each record before ``append``
returns; ``interval`` at most every ``fsync_interval_ms`` (the service calls
``maybe_sync``); ``never`` leaves it to the OS. Each append is written to the
OS at once, so a killed *process* loses nothing; only a machine crash can lose
the un-fsynced tail of ``interval``/``never``.

Standard library only.
"""

from __future__ import annotations

import bisect
import enum
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.commands import AdvanceTime, CancelOrder, Command, Deposit, PlaceOrder, Withdraw
from engine.events import (
    BalanceUpdate,
    Event,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Side,
    TimeInForce,
    Trade,
    enum_fields,
    event_from_plain,
)
from engine.interfaces import EngineError, SymbolSpec

__all__ = ["FORMAT", "Journal", "JournalError", "JournalHeader", "command_from_dict", "command_to_dict"]

FORMAT = 1
_REC = struct.Struct(">II")
_INDEX_EVERY = 64
"""One sparse index entry (first seq -> file offset) per this many records."""

_COMMANDS: dict[str, type[Any]] = {
    "place": PlaceOrder,
    "cancel": CancelOrder,
    "deposit": Deposit,
    "withdraw": Withdraw,
    "tick": AdvanceTime,
}
_COMMAND_NAMES = {cls: name for name, cls in _COMMANDS.items()}
_EVENTS: dict[str, type[Any]] = {"o": OrderUpdate, "t": Trade, "b": BalanceUpdate}
_EVENT_TAGS = {cls: tag for tag, cls in _EVENTS.items()}
_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "side": Side,
    "taker_side": Side,
    "order_type": OrderType,
    "time_in_force": TimeInForce,
    "status": OrderStatus,
}


class JournalError(EngineError):
    """The journal cannot be opened, is corrupt, or disagrees with the engine."""


@dataclass(frozen=True, slots=True)
class JournalHeader:
    format: int
    epoch: int
    """Creation time in microseconds since the Unix epoch."""
    symbols: tuple[SymbolSpec, ...]
    maker_fee_bps: int
    taker_fee_bps: int
    fee_account: int


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def command_to_dict(cmd: Command) -> dict[str, Any]:
    out = {f.name: _plain(getattr(cmd, f.name)) for f in fields(cmd)}
    out["type"] = _COMMAND_NAMES[type(cmd)]
    return out


def command_from_dict(data: dict[str, Any]) -> Command:
    """Build a command from its dict form; raises KeyError/TypeError/ValueError on bad input."""
    data = dict(data)
    cls = _COMMANDS[data.pop("type")]
    for key, enum_cls in _ENUM_FIELDS.items():
        if key in data:
            data[key] = enum_cls(data[key])
    cmd = cls(**data)
    for f in fields(cmd):
        expected = str if f.type == "str" else int
        value = getattr(cmd, f.name)
        if f.type in ("str", "int") and (type(value) is not expected):
            raise TypeError(f"{f.name} must be {expected.__name__}, got {type(value).__name__}")
    result: Command = cmd
    return result


_EVENT_LAYOUT: dict[type[Any], tuple[str, tuple[str, ...], frozenset[str]]] = {
    cls: (tag, tuple(f.name for f in fields(cls)), enum_fields(cls)) for tag, cls in _EVENTS.items()
}


def _event_to_list(ev: Event) -> list[Any]:
    tag, names, enums = _EVENT_LAYOUT[type(ev)]
    return [tag, *(getattr(ev, n).value if n in enums else getattr(ev, n) for n in names)]


def _event_from_list(row: list[Any]) -> Event:
    cls = _EVENTS[row[0]]
    names = _EVENT_LAYOUT[cls][1]
    return event_from_plain(cls, dict(zip(names, row[1:], strict=True)))


class Journal:
    """Append-only command+event log. Not thread-safe: one engine loop owns it."""

    def __init__(self, path: Path, header: JournalHeader, fsync: str, fsync_interval_ms: int) -> None:
        self.path = path
        self.header = header
        self.fsync = fsync
        self._interval_s = fsync_interval_ms / 1000.0
        self._index: list[tuple[int, int]] = []
        self._records = 0
        self.last_seq = 0
        self._fh = path.open("ab", buffering=0)
        self._dirty = False
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        directory: Path,
        symbols: Sequence[SymbolSpec],
        *,
        maker_fee_bps: int = 0,
        taker_fee_bps: int = 0,
        fee_account: int = 0,
        fsync: str = "interval",
        fsync_interval_ms: int = 5,
        epoch: int | None = None,
    ) -> Journal:
        """Open (or create) the journal in ``directory``, cutting a torn tail."""
        if fsync not in ("always", "interval", "never"):
            raise JournalError(f"fsync policy must be always|interval|never, not {fsync!r}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "journal.log"
        wanted = JournalHeader(
            FORMAT,
            epoch if epoch is not None else time.time_ns() // 1000,
            tuple(symbols),
            maker_fee_bps,
            taker_fee_bps,
            fee_account,
        )
        if not path.exists() or path.stat().st_size == 0:
            payload = json.dumps(asdict(wanted), separators=(",", ":")).encode()
            with path.open("wb") as fh:
                fh.write(_REC.pack(len(payload), zlib.crc32(payload)) + payload)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(directory)
            return cls(path, wanted, fsync, fsync_interval_ms)
        header, index, records, last_seq, good_end = _scan(path)
        if (header.symbols, header.maker_fee_bps, header.taker_fee_bps, header.fee_account) != (
            wanted.symbols,
            wanted.maker_fee_bps,
            wanted.taker_fee_bps,
            wanted.fee_account,
        ):
            raise JournalError(
                f"{path} was written with other symbols or fees than configured now; "
                "replaying it under a different configuration would produce different events"
            )
        if good_end != path.stat().st_size:
            # Torn tail from a crash mid-append: those events were never published.
            with path.open("r+b") as fh:
                fh.truncate(good_end)
                os.fsync(fh.fileno())
        journal = cls(path, header, fsync, fsync_interval_ms)
        journal._index, journal._records, journal.last_seq = index, records, last_seq
        return journal

    @property
    def epoch(self) -> int:
        return self.header.epoch

    # ---------------------------------------------------------------- appending
    def append(self, cmd: Command, events: Sequence[Event]) -> None:
        payload = json.dumps(
            [command_to_dict(cmd), [_event_to_list(e) for e in events]], separators=(",", ":")
        ).encode()
        offset = self._fh.tell()
        self._fh.write(_REC.pack(len(payload), zlib.crc32(payload)) + payload)
        if events:
            if self._records % _INDEX_EVERY == 0 or not self._index:
                self._index.append((events[0].seq, offset))
            self.last_seq = events[-1].seq
        self._records += 1
        self._dirty = True
        if self.fsync == "always":
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False
        self._last_sync = time.monotonic()

    def maybe_sync(self) -> None:
        """For ``interval``: fsync if the last one is older than the interval."""
        if self.fsync == "interval" and self._dirty and time.monotonic() - self._last_sync >= self._interval_s:
            self.sync()

    def close(self) -> None:
        if self._fh.closed:
            return
        if self.fsync != "never":
            self.sync()
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def records(self, from_offset: int = 0) -> Iterator[tuple[Command, list[Event]]]:
        """Every (command, events) in order (the header skipped)."""
        with self.path.open("rb") as fh:
            if from_offset:
                fh.seek(from_offset)
            else:
                _read_record(fh)  # header
            while True:
                payload = _read_record(fh)
                if payload is None:
                    return
                cmd_d, evs = json.loads(payload)
                yield command_from_dict(cmd_d), [_event_from_list(e) for e in evs]

    def read_events(self, from_seq: int, to_seq: int, limit: int = 50_000) -> Iterator[Event]:
        """Events with from_seq <= seq <= to_seq (0 = to the end), at most ``limit``."""
        pos = bisect.bisect_right(self._index, (from_seq, 1 << 62)) - 1
        offset = self._index[pos][1] if pos >= 0 else 0
        sent = 0
        for _cmd, events in self.records(offset):
            for ev in events:
                if ev.seq < from_seq:
                    continue
                if (to_seq and ev.seq > to_seq) or sent >= limit:
                    return
                sent += 1
                yield ev


def _read_record(fh: Any) -> bytes | None:
    head = fh.read(_REC.size)
    if len(head) < _REC.size:
        return None
    length, crc = _REC.unpack(head)
    payload: bytes = fh.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    return payload


def _scan(path: Path) -> tuple[JournalHeader, list[tuple[int, int]], int, int, int]:
    """(header, sparse index, record count, last seq, end of the last good record)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = _read_record(fh)
        if raw is None:
            raise JournalError(f"{path}: unreadable header record")
        h = json.loads(raw)
        if h.get("format") != FORMAT:
            raise JournalError(f"{path}: journal format {h.get('format')} is not {FORMAT}")
        header = JournalHeader(
            h["format"],
            h["epoch"],
            tuple(SymbolSpec(**s) for s in h["symbols"]),
            h["maker_fee_bps"],
            h["taker_fee_bps"],
            h["fee_account"],
        )
        index: list[tuple[int, int]] = []
        records, last_seq = 0, 0
        good_end = fh.tell()
        while True:
            offset = fh.tell()
            payload = _read_record(fh)
            if payload is None:
                break
            events = json.loads(payload)[1]
            if events:
                first = events[0][2]  # [tag, epoch, seq, ...]
                if records % _INDEX_EVERY == 0 or not index:
                    index.append((first, offset))
                last_seq = events[-1][2]
            records += 1
            good_end = fh.tell()
        if good_end < size:
            # Is the bad spot the tail (torn write) or followed by more data (corruption)?
            fh.seek(good_end)
            head = fh.read(_REC.size)
            if len(head) == _REC.size:
                length, _crc = _REC.unpack(head)
                if good_end + _REC.size + length < size:
                    raise JournalError(
                        f"{path}: corrupt record at byte {good_end} followed by more data; "
                        "refusing to guess (restore the journal from a copy)"
                    )
    return header, index, records, last_seq, good_end


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
