"""Avro codec of the engine's events, shared by the engine feed, the bridge and the worker.

Wire format: Avro *single-object encoding* (spec: "Single object encoding"):
``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's Parsing Canonical Form + the schemaless binary body. Any reader can
find the writer schema by fingerprint among ``schemas/avro/*.avsc`` (and the
superseded versions kept in ``schemas/avro/history/``) without a registry,
and reads with Avro schema resolution into the current schema, so a field
added with a default never breaks an old reader.

Encoding is deterministic: the same event always gives the same bytes, which
is what lets the engine's replay service re-send a range byte-for-byte.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.errors import SchemaError
from schemas.events import BalanceUpdate, Event, EventType, OrderUpdate, Trade, enum_fields, event_from_plain

__all__ = [
    "EVENT_TYPES",
    "MAGIC",
    "CodecError",
    "RegistryUnavailable",
    "add_writer",
    "current_schemas",
    "decode",
    "encode",
    "event_type_of",
    "fingerprint_of",
    "load_schemas",
]

MAGIC = b"\xc3\x01"
SCHEMA_DIR = Path(__file__).resolve().parent / "avro"
_HEADER = struct.Struct("<2sQ")


class CodecError(SchemaError):
    """A payload that cannot be decoded; ``reason`` is a stable code for DLQ headers and metrics."""

    retriable = False

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RegistryUnavailable(CodecError):
    """The schema registry did not answer: the record (or schema) is fine, try again later."""

    retriable = True

    def __init__(self, detail: str = "") -> None:
        super().__init__("registry_unavailable", detail)


_CLASSES: dict[str, type[Event]] = {
    "OrderUpdate": OrderUpdate,
    "Trade": Trade,
    "BalanceUpdate": BalanceUpdate,
}
EVENT_TYPES: dict[str, EventType] = {
    "OrderUpdate": EventType.ORDER_UPDATE,
    "Trade": EventType.TRADE,
    "BalanceUpdate": EventType.BALANCE_UPDATE,
}
"""Record name -> the event type the feed's header carries for it."""


@dataclass(frozen=True, slots=True)
class _Writer:
    name: str
    parsed: Any
    fingerprint: int


def fingerprint_of(schema: dict[str, Any]) -> int:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as an unsigned 64-bit integer."""
    # fastavro renders the fingerprint as its little-endian bytes in hex (the byte order of
    # the single-object header), not as the number: read it back as little-endian.
    digest = fingerprint(to_parsing_canonical_form(parse_schema(schema)), "CRC-64-AVRO")
    return int.from_bytes(bytes.fromhex(digest), "little")


def load_schemas(directory: Path = SCHEMA_DIR) -> tuple[dict[str, Any], dict[int, _Writer]]:
    """(current reader schemas by record name, every known writer schema by fingerprint)."""
    current: dict[str, Any] = {}
    writers: dict[int, _Writer] = {}
    for path in sorted(directory.glob("*.avsc")) + sorted(directory.glob("history/*.avsc")):
        raw = json.loads(path.read_text())
        name = raw["name"]
        parsed = parse_schema(raw)
        fp = fingerprint_of(raw)
        writers[fp] = _Writer(name, parsed, fp)
        if path.parent == directory:
            current[name] = parsed
    return current, writers


_READERS, _WRITERS = load_schemas()
_CURRENT_FP = {w.name: fp for fp, w in _WRITERS.items() if w.parsed is _READERS.get(w.name)}
_ENCODERS = {
    cls: (
        _READERS[name],
        _HEADER.pack(MAGIC, _CURRENT_FP[name]),
        tuple(f.name for f in fields(cls)),
        enum_fields(cls),
    )
    for name, cls in _CLASSES.items()
}


def current_schemas() -> dict[str, tuple[int, str]]:
    """Record name -> (fingerprint, schema JSON text) of the current writer schemas."""
    out = {}
    for name in _CLASSES:
        raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        out[name] = (_CURRENT_FP[name], json.dumps(raw, separators=(",", ":")))
    return out


def add_writer(schema_text: str) -> int:
    """Make a writer schema known (e.g. a newer one found in a schema registry) and return its
    fingerprint: its records are then read by resolution into the current schema."""
    try:
        raw = json.loads(schema_text)
        name = raw["name"].rsplit(".", 1)[-1] if isinstance(raw, dict) else None
        if name not in _READERS:
            raise CodecError("unknown_schema", f"record {name!r} is not one of {sorted(_READERS)}")
        fp = fingerprint_of(raw)
        if fp not in _WRITERS:
            _WRITERS[fp] = _Writer(name, parse_schema(raw), fp)
    except CodecError:
        raise
    except Exception as exc:  # fastavro's SchemaParseException, JSON errors, ...
        raise CodecError("unknown_schema", f"{type(exc).__name__}: {exc}") from exc
    return fp


def encode(event: Event) -> bytes:
    """Single-object encoding of one event with the current schema."""
    schema, header, names, enums = _ENCODERS[type(event)]
    record = {n: (getattr(event, n).value if n in enums else getattr(event, n)) for n in names}
    buf = io.BytesIO()
    buf.write(header)
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _writer_of(data: bytes) -> _Writer:
    if len(data) < _HEADER.size:
        raise CodecError("truncated", f"{len(data)} bytes is shorter than the 10-byte header")
    magic, fp = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("bad_magic", f"starts with {data[:2].hex()}, not c301")
    writer = _WRITERS.get(fp)
    if writer is None:
        raise CodecError("unknown_fingerprint", f"{fp:016x}")
    return writer


def _classify(data: bytes, writer: _Writer) -> str:
    """'truncated' if the bytes are a valid prefix of a record (padding them makes them
    readable), else 'undecodable': only run on the error path."""
    try:
        schemaless_reader(io.BytesIO(data[_HEADER.size :] + bytes(4096)), writer.parsed, _READERS[writer.name])
    except Exception:
        return "undecodable"
    return "truncated"


def event_type_of(data: bytes) -> EventType:
    """The event type, from the fingerprint alone (no body decoding)."""
    return EVENT_TYPES[_writer_of(data).name]


def decode_dict(data: bytes) -> tuple[str, dict[str, Any]]:
    """(record name, record as a dict with enum symbols as strings), resolved to the current schema."""
    writer = _writer_of(data)
    buf = io.BytesIO(data)
    buf.seek(_HEADER.size)
    try:
        record = schemaless_reader(buf, writer.parsed, _READERS[writer.name])
    except Exception as exc:  # fastavro raises IndexError/ValueError/EOFError/... on bad bytes
        raise CodecError(_classify(data, writer), f"{type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(data):
        raise CodecError("trailing_bytes", f"{len(data) - buf.tell()} bytes after the record")
    if not isinstance(record, dict):
        raise CodecError("undecodable", "not a record")
    return writer.name, record


def decode(data: bytes) -> Event:
    """The engine event in ``data``; raises CodecError with a reason code on any bad input."""
    name, record = decode_dict(data)
    try:
        return event_from_plain(_CLASSES[name], record)
    except (ValueError, TypeError, KeyError) as exc:
        raise CodecError("undecodable", f"{name}: {exc!r}") from exc
