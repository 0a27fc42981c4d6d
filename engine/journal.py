"""The engine's journal: every command and the events it produced, on disk, in order.

It is the drop copy of the whole pipeline: the engine appends a command's events here *before*
publishing them, recovery re-executes the commands and checks that each regenerated event encodes
to the journaled bytes, the replay service re-sends any seq range from here byte for byte, and
``ohs audit`` compares everything downstream against it.

File format 3 (``journal.log`` in the journal dir), a sequence of records
``u32 length | u32 crc32(payload) | payload`` (big-endian). The first record is the header,
compact JSON: ``format`` (the version, 3), epoch, symbols and fee settings; recovery refuses a
journal whose header disagrees with the engine's configuration, and a journal of another format
with what to do (below). Every other record is one command:

``u64 first_seq | u32 events | u32 command bytes | command | entries | json records``

* ``first_seq``/``events``: the seqs of its events, ``first_seq .. first_seq + events - 1``
  (0/0 for a command without events); the sparse index and ``read_tail`` read only this.
* the command: one tag byte, then a fixed ``struct`` layout per command type (``_pack_command``);
  tag 0 is its JSON object instead, for a command no layout can hold (only a journal migrated from
  before the wire-range rules has one).
* ``entries``: each event as the feed sends it, ``u32 size | 36-byte header | Avro single-object
  encoding`` (``schemas.wire``): the engine encodes each event once, and the same bytes go to the
  feed and out of the replay service. An event that cannot be published (only possible after a
  journal from before the wire-range rules) is stored as the entry of its UNPUBLISHABLE marker,
  and, after the entries, ``u32 size | JSON`` of each such event (``schemas.wire.event_json``), so
  the journal still holds it whole.

A crash mid-append leaves a torn tail (a short or CRC-failing *last* record): it is cut off on
open. A bad record with valid records after it is corruption and an error.

Older formats. Format 1 (JSON events, no user_seq) and 2 (JSON events with user_seq) journals are
refused with a JournalError naming the fix: ``ohs engine migrate-journal`` re-executes such a
journal and writes its format-3 equivalent beside it (``engine.migrate``, docs/engine.md), or the
directory is moved aside and the engine starts a new epoch.

Durability (``fsync``): ``always`` fsyncs before ``flush`` returns; ``interval`` at most every
``fsync_interval_ms`` (the service calls ``maybe_sync``); ``never`` leaves it to the OS. ``add``
stages a record and ``flush`` writes everything staged in one system call; the service flushes
each batch of commands before it publishes any of their events or answers a client, so a killed
*process* loses nothing anyone saw. Only a machine crash can lose the un-fsynced tail of
``interval``/``never``.

Standard library only.
"""

from __future__ import annotations

import bisect
import enum
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# zlib-ng's CRC-32 is zlib's (the same values: journals written with either read with either), at a
# smaller cost per call; the journal computes one per record.
from zlib_ng.zlib_ng import crc32

from engine.commands import AdvanceTime, CancelOrder, Command, Deposit, PlaceOrder, Withdraw
from engine.interfaces import EngineError, SymbolSpec
from schemas import stdavro
from schemas.events import BalanceUpdate, Event, OrderType, OrderUpdate, Side, TimeInForce, Trade, event_from_plain
from schemas.wire import ENTRY, UNPUBLISHABLE, encode_events, event_json

__all__ = [
    "FORMAT",
    "Journal",
    "JournalError",
    "JournalHeader",
    "RawRecord",
    "command_from_dict",
    "command_to_dict",
    "event_from_json",
    "event_record",
    "read_tail",
]

FORMAT = 3
"""3: events stored as their feed entries (Avro), commands packed. 1 and 2 stored JSON."""
_REC = struct.Struct(">II")
_PREFIX = struct.Struct(">QII")
_SIZE = struct.Struct(">I")
_INDEX_EVERY = 64
"""One sparse index entry (first seq -> file offset) per this many records with events."""

_COMMANDS: dict[str, type[Any]] = {
    "place": PlaceOrder,
    "cancel": CancelOrder,
    "deposit": Deposit,
    "withdraw": Withdraw,
    "tick": AdvanceTime,
}
_COMMAND_NAMES = {cls: name for name, cls in _COMMANDS.items()}
_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "side": Side,
    "taker_side": Side,
    "order_type": OrderType,
    "time_in_force": TimeInForce,
}

event_record = event_json
"""The event as compact JSON (formats 1 and 2 stored every event so; format 3 only those that
cannot be published). Kept under its old name."""


class JournalError(EngineError):
    """The journal cannot be opened, is corrupt, or disagrees with the engine."""

    retriable = False


@dataclass(frozen=True, slots=True)
class JournalHeader:
    format: int
    epoch: int
    """Creation time in microseconds since the Unix epoch."""
    symbols: tuple[SymbolSpec, ...]
    maker_fee_bps: int
    taker_fee_bps: int
    fee_account: int


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One command record as stored: what recovery compares without decoding any event."""

    offset: int
    first_seq: int
    count: int
    command: Command
    entries: bytes
    """The events' feed entries, concatenated."""
    json_records: tuple[bytes, ...]
    """The JSON of each event stored as an UNPUBLISHABLE marker, in order."""


# ------------------------------------------------------------------------------- commands
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


# Packed layouts: tag, then fixed fields, then the UTF-8 text. The enum orders are part of the
# format: append only.
_SIDES = (Side.BUY, Side.SELL)
_TYPES = (OrderType.LIMIT, OrderType.MARKET)
_TIFS = (TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTT)
# By member name: an Enum's __hash__ is Python code, a str's is cached.
_SIDE_I = {m.name: i for i, m in enumerate(_SIDES)}
_TYPE_I = {m.name: i for i, m in enumerate(_TYPES)}
_TIF_I = {m.name: i for i, m in enumerate(_TIFS)}
_PLACE = struct.Struct(">BqqqqqqBBBHH")
_CANCEL = struct.Struct(">BqqqH")
_FUNDS = struct.Struct(">BqqqH")
_TICK = struct.Struct(">Bq")
_T_JSON, _T_PLACE, _T_CANCEL, _T_DEPOSIT, _T_WITHDRAW, _T_TICK = range(6)
_LONG, _ENUM, _TEXT = 0, 1, 2


def _longs(*names: str) -> tuple[tuple[str, int, tuple[object, ...]], ...]:
    return tuple((name, _LONG, ()) for name in names)


_LAYOUTS = (
    (
        PlaceOrder,
        _T_PLACE,
        (
            *_longs("ts_ns", "user_id", "qty", "price", "quote_budget", "expire_ns"),
            ("side", _ENUM, _SIDES),
            ("order_type", _ENUM, _TYPES),
            ("time_in_force", _ENUM, _TIFS),
            ("symbol", _TEXT, ()),
            ("client_order_id", _TEXT, ()),
        ),
    ),
    (CancelOrder, _T_CANCEL, (*_longs("ts_ns", "user_id", "order_id"), ("client_order_id", _TEXT, ()))),
    (Deposit, _T_DEPOSIT, (*_longs("ts_ns", "user_id", "amount"), ("asset", _TEXT, ()))),
    (Withdraw, _T_WITHDRAW, (*_longs("ts_ns", "user_id", "amount"), ("asset", _TEXT, ()))),
    (AdvanceTime, _T_TICK, _longs("ts_ns")),
)
"""The packed layouts above as data, for the optional C build of the record (``engine._journalc``):
in layout order, a long is 8 bytes, an enum member its index in the tuple (1 byte), text its UTF-8
length (2 bytes), the texts themselves after the fixed part. ``_pack_command`` is the reference;
tests/unit/engine_edges/test_journal_native.py compares the two."""


def _python_record(
    cmd: Command, first_seq: int, count: int, entries: bytes, json_records: Sequence[bytes] = ()
) -> bytes:
    """A command record as ``Journal.add`` stages it, built in Python (what the C build must match)."""
    packed = _pack_command(cmd)
    payload = _PREFIX.pack(first_seq, count, len(packed)) + packed + entries
    if json_records:
        payload += b"".join(_SIZE.pack(len(r)) + r for r in json_records)
    return _REC.pack(len(payload), crc32(payload)) + payload


def _configure_native() -> Callable[[Command, int, int, bytes], bytes | None] | None:
    try:  # the optional C build (setup.py); absent, Journal.add builds every record in Python
        from engine import _journalc
    except ImportError:
        return None
    _journalc.configure(_LAYOUTS, crc32)
    return _journalc.record


_native_record = _configure_native()


def _pack_command(cmd: Command) -> bytes:
    try:
        t = type(cmd)
        if t is PlaceOrder:
            c: Any = cmd
            sym: bytes = c.symbol.encode()
            cid: bytes = c.client_order_id.encode()
            head: bytes = _PLACE.pack(
                _T_PLACE,
                c.ts_ns,
                c.user_id,
                c.qty,
                c.price,
                c.quote_budget,
                c.expire_ns,
                _SIDE_I[c.side._name_],
                _TYPE_I[c.order_type._name_],
                _TIF_I[c.time_in_force._name_],
                len(sym),
                len(cid),
            )
            return head + sym + cid
        if t is CancelOrder:
            c = cmd
            cid = c.client_order_id.encode()
            packed: bytes = _CANCEL.pack(_T_CANCEL, c.ts_ns, c.user_id, c.order_id, len(cid)) + cid
            return packed
        if t is Deposit or t is Withdraw:
            c = cmd
            asset = c.asset.encode()
            tag = _T_DEPOSIT if t is Deposit else _T_WITHDRAW
            packed = _FUNDS.pack(tag, c.ts_ns, c.user_id, c.amount, len(asset)) + asset
            return packed
        if t is AdvanceTime:
            return _TICK.pack(_T_TICK, cmd.ts_ns)
    except (struct.error, UnicodeEncodeError, KeyError, OverflowError):
        pass  # beyond every layout (a command from before the wire-range rules): JSON holds anything
    return bytes([_T_JSON]) + json.dumps(command_to_dict(cmd), separators=(",", ":")).encode()


def _unpack_command(data: bytes) -> Command:
    """Raises ValueError/KeyError/TypeError/struct.error/IndexError on bytes that are not a command."""
    tag = data[0]
    if tag == _T_PLACE:
        _, ts, user, qty, price, budget, expire, side, otype, tif, n_sym, n_cid = _PLACE.unpack_from(data)
        at = _PLACE.size
        if at + n_sym + n_cid != len(data):
            raise ValueError("place: text lengths disagree with the record")
        sym, cid = data[at : at + n_sym].decode(), data[at + n_sym :].decode()
        return PlaceOrder(ts, user, sym, _SIDES[side], _TYPES[otype], _TIFS[tif], qty, price, budget, cid, expire)
    if tag == _T_CANCEL:
        _, ts, user, order_id, n = _CANCEL.unpack_from(data)
        if _CANCEL.size + n != len(data):
            raise ValueError("cancel: text length disagrees with the record")
        return CancelOrder(ts, user, order_id, data[_CANCEL.size :].decode())
    if tag in (_T_DEPOSIT, _T_WITHDRAW):
        _, ts, user, amount, n = _FUNDS.unpack_from(data)
        if _FUNDS.size + n != len(data):
            raise ValueError("deposit/withdraw: text length disagrees with the record")
        cls = Deposit if tag == _T_DEPOSIT else Withdraw
        return cls(ts, user, data[_FUNDS.size :].decode(), amount)
    if tag == _T_TICK:
        if len(data) != _TICK.size:
            raise ValueError("tick: wrong size")
        return AdvanceTime(_TICK.unpack(data)[1])
    if tag == _T_JSON:
        body = json.loads(data[1:])
        if not isinstance(body, dict):
            raise TypeError("a JSON command is an object")
        return command_from_dict(body)
    raise ValueError(f"unknown command tag {tag}")


# --------------------------------------------------------------------------------- events
_JSON_CLASSES: dict[str, type[Any]] = {"o": OrderUpdate, "t": Trade, "b": BalanceUpdate}
_JSON_NAMES = {tag: tuple(cls.__dataclass_fields__) for tag, cls in _JSON_CLASSES.items()}


def event_from_json(record: bytes | list[Any], names_of: dict[str, tuple[str, ...]] | None = None) -> Event:
    """The event in a JSON record (``event_json``); ``names_of`` gives the field names per tag of an
    older layout (format 1 lacked user_seq, which then reads as its default). Raises ValueError,
    KeyError, TypeError or IndexError."""
    row = json.loads(record) if isinstance(record, bytes) else record
    if not isinstance(row, list) or not row:
        raise TypeError("an event record is a non-empty list")
    tag = row[0]
    cls = _JSON_CLASSES[tag]
    names = (names_of or _JSON_NAMES)[tag]
    values = dict(zip(names, row[1:], strict=True))
    for f in fields(cls):
        if f.name not in values:
            values[f.name] = f.default
    return event_from_plain(cls, values)


def _split_entries(data: bytes, count: int, first_seq: int) -> list[tuple[bytes, bytes]]:
    """(header, payload) of ``count`` entries at the start of ``data``; raises ValueError unless
    they are exactly that many, of the seqs ``first_seq``.. in order."""
    out = []
    pos, prefix = 0, ENTRY.size
    for i in range(count):
        (size,) = _SIZE.unpack_from(data, pos)
        header = data[pos + 4 : pos + prefix]
        if len(header) != prefix - 4 or pos + prefix + size > len(data):
            raise ValueError("an entry runs past the record")
        if struct.unpack_from(">Q", header, 12)[0] != first_seq + i:
            raise ValueError(f"entry {i} does not hold seq {first_seq + i}")
        out.append((header, data[pos + prefix : pos + prefix + size]))
        pos += prefix + size
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the entries")
    return out


def _entries_end(data: bytes, start: int, count: int) -> int:
    pos = start
    for _ in range(count):
        (size,) = _SIZE.unpack_from(data, pos)
        pos += ENTRY.size + size
        if pos > len(data):
            raise ValueError("an entry runs past the record")
    return pos


def _parse(payload: bytes, offset: int) -> RawRecord:
    """A command record; raises ValueError/KeyError/TypeError/IndexError/struct.error on one that is not."""
    first_seq, count, cmd_len = _PREFIX.unpack_from(payload)
    at = _PREFIX.size
    if at + cmd_len > len(payload) or (count == 0) != (first_seq == 0):
        raise ValueError("record prefix disagrees with its size")
    command = _unpack_command(payload[at : at + cmd_len])
    at += cmd_len
    end = _entries_end(payload, at, count)
    json_records: list[bytes] = []
    pos = end
    while pos < len(payload):
        (size,) = _SIZE.unpack_from(payload, pos)
        if pos + 4 + size > len(payload):
            raise ValueError("a JSON record runs past the record")
        json_records.append(payload[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return RawRecord(offset, first_seq, count, command, payload[at:end], tuple(json_records))


def _events_of(rec: RawRecord) -> list[Event]:
    events: list[Event] = []
    records = iter(rec.json_records)
    for header, payload in _split_entries(rec.entries, rec.count, rec.first_seq):
        if header[3] == UNPUBLISHABLE:
            events.append(event_from_json(next(records)))
        else:
            events.append(stdavro.decode(payload))
    if next(records, None) is not None:
        raise ValueError("more JSON records than markers")
    return events


# -------------------------------------------------------------------------------- journal
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
        self._end = self._fh.seek(0, os.SEEK_END)
        """File offset after the last staged record."""
        self._staged: list[bytes] = []
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
        name: str = "journal.log",
    ) -> Journal:
        """Open (or create) the journal ``name`` in ``directory``, cutting a torn tail."""
        if fsync not in ("always", "interval", "never"):
            raise JournalError(f"fsync policy must be always|interval|never, not {fsync!r}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        wanted = JournalHeader(
            FORMAT,
            epoch if epoch is not None else time.time_ns() // 1000,
            tuple(symbols),
            maker_fee_bps,
            taker_fee_bps,
            fee_account,
        )
        if not path.exists() or path.stat().st_size == 0:
            write_header(path, wanted)
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
    def add(self, cmd: Command, first_seq: int, count: int, entries: bytes, json_records: Sequence[bytes] = ()) -> None:
        """Stage one command record: its events' entries (``schemas.wire.encode_events``). Written
        by the next ``flush``; nothing of it may be published before."""
        # The C build takes the usual record; what it declines (and markers) is built in Python.
        record = None if json_records or _native_record is None else _native_record(cmd, first_seq, count, entries)
        if record is None:
            record = _python_record(cmd, first_seq, count, entries, json_records)
        if count:
            if self._records % _INDEX_EVERY == 0 or not self._index:
                self._index.append((first_seq, self._end))
            self._records += 1
            self.last_seq = first_seq + count - 1
        self._staged.append(record)
        self._end += len(record)

    def flush(self) -> None:
        """Write every staged record to the OS (one system call), then fsync if the policy is ``always``."""
        self._write_staged()
        if self.fsync == "always":
            self.sync()

    def append(self, cmd: Command, events: Sequence[Event]) -> None:
        """Encode, stage and write one command with its events at once."""
        entries, json_records = encode_events(events)
        self.add(cmd, events[0].seq if events else 0, len(events), entries, json_records or ())
        self.flush()

    def sync(self) -> None:
        self._write_staged()
        if self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False
        self._last_sync = time.monotonic()

    def _write_staged(self) -> None:
        if self._staged:
            data = memoryview(b"".join(self._staged))
            self._staged.clear()
            while data:
                written = self._fh.write(data)
                data = data[written or 0 :]
            self._dirty = True

    def maybe_sync(self) -> None:
        """For ``interval``: fsync if the last one is older than the interval."""
        if self.fsync == "interval" and self._dirty and time.monotonic() - self._last_sync >= self._interval_s:
            self.sync()

    def close(self) -> None:
        if self._fh.closed:
            return
        self._write_staged()
        if self.fsync != "never":
            self.sync()
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def raw_records(self, from_offset: int = 0) -> Iterator[RawRecord]:
        """Every command record as stored, in order (the header skipped): no event is decoded."""
        for offset, payload in self._payloads(from_offset):
            try:
                record = _parse(payload, offset)
            except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as exc:
                raise self._undecodable(offset, exc) from exc
            yield record

    def records(self, from_offset: int = 0) -> Iterator[tuple[Command, list[Event]]]:
        """Every (command, events) in order (the header skipped), the events decoded."""
        for rec in self.raw_records(from_offset):
            try:
                events = _events_of(rec)
            except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as exc:
                raise self._undecodable(rec.offset, exc) from exc
            yield rec.command, events

    def read_entries(self, from_seq: int, to_seq: int, limit: int = 50_000) -> Iterator[tuple[int, bytes]]:
        """(seq, entry) of the events with from_seq <= seq <= to_seq (0 = to the end), at most
        ``limit``: the replay service's path. Entries are sliced out of the records, never decoded."""
        pos = bisect.bisect_right(self._index, (from_seq, 1 << 62)) - 1
        offset = self._index[pos][1] if pos >= 0 else 0
        sent = 0
        for at, payload in self._payloads(offset):
            try:
                first, count, cmd_len = _PREFIX.unpack_from(payload)
                if not count or first + count <= from_seq:
                    continue
                p = _PREFIX.size + cmd_len
                for i in range(count):
                    (size,) = _SIZE.unpack_from(payload, p)
                    end = p + ENTRY.size + size
                    seq = first + i
                    if seq >= from_seq:
                        if (to_seq and seq > to_seq) or sent >= limit:
                            return
                        if end > len(payload):
                            raise ValueError("an entry runs past the record")
                        sent += 1
                        yield seq, payload[p:end]
                    p = end
            except (ValueError, struct.error) as exc:
                raise self._undecodable(at, exc) from exc

    def read_events(self, from_seq: int, to_seq: int, limit: int = 50_000) -> Iterator[Event]:
        """Events with from_seq <= seq <= to_seq (0 = to the end), at most ``limit``, decoded. A
        marker's event comes from its JSON record (found in the same record)."""
        pos = bisect.bisect_right(self._index, (from_seq, 1 << 62)) - 1
        offset = self._index[pos][1] if pos >= 0 else 0
        sent = 0
        for rec in self.raw_records(offset):
            if not rec.count or rec.first_seq + rec.count <= from_seq:
                continue
            try:
                events = _events_of(rec)
            except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
                raise self._undecodable(rec.offset, exc) from exc
            for ev in events:
                if ev.seq < from_seq:
                    continue
                if (to_seq and ev.seq > to_seq) or sent >= limit:
                    return
                sent += 1
                yield ev

    def _payloads(self, from_offset: int) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) of every record from ``from_offset`` (0: after the header)."""
        self._write_staged()
        with self.path.open("rb") as fh:
            if from_offset:
                fh.seek(from_offset)
            else:
                _read_record(fh)  # header
            while True:
                offset = fh.tell()
                payload = _read_record(fh)
                if payload is None:
                    return
                yield offset, payload

    def _undecodable(self, offset: int, exc: BaseException) -> JournalError:
        # A record with a valid CRC that is not ours: written by other code, or forged.
        return JournalError(f"{self.path}: undecodable record at byte {offset}: {exc!r:.300}")


def write_header(path: Path, header: JournalHeader) -> None:
    """Create ``path`` holding only ``header`` (fsynced)."""
    payload = json.dumps(asdict(header), separators=(",", ":")).encode()
    with path.open("wb") as fh:
        fh.write(_REC.pack(len(payload), crc32(payload)) + payload)
        fh.flush()
        os.fsync(fh.fileno())


def header_of(path: Path) -> dict[str, Any]:
    """The header record of a journal of any format, as JSON (for the migration and error messages)."""
    with path.open("rb") as fh:
        raw = _read_record(fh)
    if raw is None:
        raise JournalError(f"{path}: unreadable header record")
    try:
        head = json.loads(raw)
    except ValueError as exc:
        raise JournalError(f"{path}: the header record is not JSON: {exc}") from exc
    if not isinstance(head, dict):
        raise JournalError(f"{path}: the header record is not a JSON object")
    return head


def _header(path: Path, head: dict[str, Any]) -> JournalHeader:
    version = head.get("format")
    if version != FORMAT:
        if version in (1, 2):
            raise JournalError(
                f"{path}: journal format {version} is older than this engine's {FORMAT} (it stores events as "
                "JSON; format 3 stores the bytes the feed sends). Migrate it with `ohs engine migrate-journal` "
                "(it writes the format-3 journal beside it, never in place) or move the journal directory "
                "aside to start a new epoch: docs/engine.md, 'Journal format'"
            )
        raise JournalError(f"{path}: journal format {version!r} is not {FORMAT} (written by a newer engine?)")
    try:
        return JournalHeader(
            head["format"],
            head["epoch"],
            tuple(SymbolSpec(**s) for s in head["symbols"]),
            head["maker_fee_bps"],
            head["taker_fee_bps"],
            head["fee_account"],
        )
    except (KeyError, TypeError) as exc:
        raise JournalError(f"{path}: malformed header: {exc!r}") from exc


def read_tail(path: Path, offset: int) -> tuple[int, int, int]:
    """(epoch in the header, last seq of the complete records from ``offset`` on or 0, the offset
    after them) of a journal another process may be appending to: a record still being written
    ends the read, and the next call resumes at the returned offset."""
    with path.open("rb") as fh:
        raw = _read_record(fh)
        if raw is None:
            raise JournalError(f"{path}: unreadable header record")
        epoch = int(_header(path, json.loads(raw)).epoch)
        fh.seek(max(offset, fh.tell()))
        last = 0
        while True:
            payload = _read_record(fh)
            if payload is None:
                break
            offset = fh.tell()
            first, count, _ = _PREFIX.unpack_from(payload)
            if count:
                last = first + count - 1
    return epoch, last, offset


def _read_record(fh: Any) -> bytes | None:
    head = fh.read(_REC.size)
    if len(head) < _REC.size:
        return None
    length, crc = _REC.unpack(head)
    payload: bytes = fh.read(length)
    if len(payload) < length or crc32(payload) != crc:
        return None
    return payload


def _scan(path: Path) -> tuple[JournalHeader, list[tuple[int, int]], int, int, int]:
    """(header, sparse index, records with events, last seq, end of the last good record)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = _read_record(fh)
        if raw is None:
            raise JournalError(f"{path}: unreadable header record")
        try:
            head = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise JournalError(f"{path}: the header record is not JSON: {exc!r:.200}") from exc
        if not isinstance(head, dict):
            raise JournalError(f"{path}: the header record is not a JSON object")
        header = _header(path, head)
        index: list[tuple[int, int]] = []
        records, last_seq = 0, 0
        good_end = fh.tell()
        while True:
            offset = fh.tell()
            payload = _read_record(fh)
            if payload is None:
                break
            try:
                first, count, cmd_len = _PREFIX.unpack_from(payload)
                if _PREFIX.size + cmd_len > len(payload) or (count == 0) != (first == 0):
                    raise ValueError("record prefix disagrees with its size")
                if count and first != last_seq + 1:
                    raise ValueError(f"seqs {first}.. follow {last_seq}")
            except (ValueError, struct.error) as exc:
                raise JournalError(f"{path}: undecodable record at byte {offset}: {exc!r:.300}") from exc
            if count:
                if records % _INDEX_EVERY == 0 or not index:
                    index.append((first, offset))
                records += 1
                last_seq = first + count - 1
            good_end = fh.tell()
        if good_end < size:
            # Is the bad spot the tail (torn write) or followed by more data (corruption)?
            fh.seek(good_end)
            head_bytes = fh.read(_REC.size)
            if len(head_bytes) == _REC.size:
                length, _crc = _REC.unpack(head_bytes)
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
