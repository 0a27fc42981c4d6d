"""Avro single-object encoding of the engine's events, in the standard library.

The engine encodes each event exactly once, here: the journal stores those bytes, the feed sends
them and the replay service returns them (``schemas.wire``). ``schemas.codec`` (fastavro) is the
pipeline's codec and stays the reference: for every event this module must give the same bytes
(``tests/unit/schemas/test_stdavro.py`` proves it against fastavro, fingerprints included). It
exists because fastavro costs the engine's hot path a dict per record and a generic writer: an
encoder generated per schema, with the varints of repeated values cached, is 4-7x cheaper.

Schemas are the ``.avsc`` files of the ``schemas`` package (``avro/`` current, ``avro/history/``
superseded writers), read here as JSON; the fingerprint is CRC-64-AVRO of the schema's Parsing
Canonical Form (Avro specification, "Schema Fingerprints"), computed here too. Only what the
event schemas use is supported: records of ``long``, ``string`` and enum fields.

Encoding goes through the *current* schema of the event's record; ``encoder_for`` gives the
encoder of any known writer (recovery re-encodes a regenerated event with the writer a journaled
frame names, so a journal stays checkable after a compatible schema change). Decoding reads any
known writer into the engine's dataclass, filling fields the writer lacks with the dataclass
default (``user_seq`` is 0 in records from before it). It is for reading the journal, off the hot
path.

Standard library only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from typing import Any

from schemas.errors import SchemaError
from schemas.events import BalanceUpdate, Event, OrderUpdate, Trade, event_from_plain, field_enums

__all__ = [
    "MAGIC",
    "AvroError",
    "Writer",
    "canonical_form",
    "crc64_avro",
    "current_fingerprint",
    "current_layout",
    "decode",
    "encode",
    "encoder_for",
    "fingerprint_of",
    "framed_encoder",
    "writer_of",
    "writers",
]

MAGIC = b"\xc3\x01"
_HEADER = struct.Struct("<2sQ")
_CLASSES: dict[str, type[Event]] = {"OrderUpdate": OrderUpdate, "Trade": Trade, "BalanceUpdate": BalanceUpdate}
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


class AvroError(SchemaError, ValueError):
    """Bytes that are not a single-object record of a known writer, or a schema this module cannot use."""

    retriable = False


# ------------------------------------------------------------------------------ fingerprints
_EMPTY64 = 0xC15D213AA4D7A795


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_CRC = _crc_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's 64-bit Rabin fingerprint (CRC-64-AVRO) of ``data``."""
    fp = _EMPTY64
    for b in data:
        fp = (fp >> 8) ^ _CRC[(fp ^ b) & 0xFF]
    return fp


_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_KEYS = ("name", "type", "fields", "symbols", "items", "values", "size")


def canonical_form(schema: Any, namespace: str = "", named: set[str] | None = None) -> str:
    """Parsing Canonical Form of a schema (the JSON value of a ``.avsc``)."""
    named = set() if named is None else named
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return json.dumps(schema)
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        return json.dumps(full, ensure_ascii=False)
    if isinstance(schema, list):
        return "[" + ",".join(canonical_form(s, namespace, named) for s in schema) + "]"
    if not isinstance(schema, dict):
        raise AvroError(f"not a schema: {schema!r:.100}")
    kind = schema["type"]
    if kind in _PRIMITIVES and len(schema) >= 1 and "name" not in schema:
        return json.dumps(kind)
    if kind in ("record", "error", "enum", "fixed"):
        name = schema["name"]
        ns = schema.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
        full = name if "." in name or not ns else f"{ns}.{name}"
        if full in named:
            return json.dumps(full, ensure_ascii=False)
        named.add(full)
        parts = [f'"name":{json.dumps(full, ensure_ascii=False)}', f'"type":{json.dumps(kind)}']
        if kind in ("record", "error"):
            body = ",".join(
                "{"
                + f'"name":{json.dumps(f["name"], ensure_ascii=False)},"type":{canonical_form(f["type"], ns, named)}'
                + "}"
                for f in schema["fields"]
            )
            parts.append(f'"fields":[{body}]')
        elif kind == "enum":
            parts.append('"symbols":' + json.dumps(schema["symbols"], separators=(",", ":"), ensure_ascii=False))
        else:
            parts.append(f'"size":{int(schema["size"])}')
        return "{" + ",".join(parts) + "}"
    if kind == "array":
        return '{"type":"array","items":' + canonical_form(schema["items"], namespace, named) + "}"
    if kind == "map":
        return '{"type":"map","values":' + canonical_form(schema["values"], namespace, named) + "}"
    return canonical_form(kind, namespace, named)


def fingerprint_of(schema: dict[str, Any]) -> int:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as an unsigned 64-bit integer."""
    return crc64_avro(canonical_form(schema).encode())


# ---------------------------------------------------------------------------------- varints
def _varint_slow(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_LAST14 = [_varint_slow(z) for z in range(1 << 14)]
"""Varint of every value below 2**14 (one or two bytes, the last without a continuation bit)."""
_MID14 = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14)]
"""Two varint bytes of 14 bits that more bytes follow."""


def _zigzag_varint(value: int) -> bytes:
    """Avro's long: zigzag, then 7 bits per byte, low first. 14 bits per table lookup, so at most
    five for 64 bits (nanosecond timestamps take 62: a loop over their last bits cost them ~40%
    more, measured with timeit)."""
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise OverflowError(f"{value} does not fit an Avro long")
    z = (value << 1) ^ (value >> 63)
    if z < 0x4000:
        return _LAST14[z]
    if z < 0x10000000:
        return _MID14[z & 0x3FFF] + _LAST14[z >> 14]
    if z < 0x40000000000:
        return _MID14[z & 0x3FFF] + _MID14[(z >> 14) & 0x3FFF] + _LAST14[z >> 28]
    if z < 0x100000000000000:
        return _MID14[z & 0x3FFF] + _MID14[(z >> 14) & 0x3FFF] + _MID14[(z >> 28) & 0x3FFF] + _LAST14[z >> 42]
    return (
        _MID14[z & 0x3FFF]
        + _MID14[(z >> 14) & 0x3FFF]
        + _MID14[(z >> 28) & 0x3FFF]
        + _MID14[(z >> 42) & 0x3FFF]
        + _LAST14[z >> 56]  # z < 2**64: at most 8 bits left
    )


_LONGS: dict[int, bytes] = {v: _zigzag_varint(v) for v in range(-1024, 16384)}
"""Varints of recently encoded longs. Most fields repeat (ids, prices, quantities, the command's
timestamp in each of its events): a dict hit costs a fraction of encoding the varint."""
_LONGS_MAX = 1 << 16
_TEXTS: dict[str, bytes] = {}
"""Length-prefixed UTF-8 of recent strings (symbols, assets, client order ids)."""
_TEXTS_MAX = 1 << 14


def _long_miss(value: int) -> bytes:
    """The varint of ``value``, remembered (the cache is emptied when full: it refills in a few events)."""
    out = _zigzag_varint(value)
    if len(_LONGS) >= _LONGS_MAX:
        _LONGS.clear()
    _LONGS[value] = out
    return out


def _text_miss(value: str) -> bytes:
    raw = value.encode()
    out = _zigzag_varint(len(raw)) + raw
    if len(_TEXTS) >= _TEXTS_MAX:
        _TEXTS.clear()
    _TEXTS[value] = out
    return out


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    z = shift = 0
    while True:
        if pos >= len(data):
            raise AvroError("truncated varint")
        b = data[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise AvroError("varint longer than 10 bytes")
    value = (z >> 1) ^ -(z & 1)
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise AvroError("varint beyond a long")
    return value, pos


# ---------------------------------------------------------------------------------- writers
@dataclass(frozen=True)
class Writer:
    """One writer schema of one event record: how to encode an event with it and read it back."""

    name: str
    cls: type[Event]
    fingerprint: int
    header: bytes
    """``C3 01`` + the fingerprint, little-endian."""
    layout: tuple[tuple[str, str, tuple[str, ...]], ...]
    """(field, kind, enum symbols) in schema order; kind is long | string | enum."""
    encode: Callable[[Event], bytes]
    """Raises for an event this writer cannot carry (OverflowError beyond a long, KeyError for an
    enum symbol it lacks, UnicodeEncodeError for text UTF-8 cannot encode, AttributeError ...)."""
    current: bool


def _layout(raw: dict[str, Any]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    out = []
    for f in raw["fields"]:
        kind = f["type"]
        if isinstance(kind, dict) and kind.get("type") == "enum":
            out.append((f["name"], "enum", tuple(kind["symbols"])))
        elif isinstance(kind, dict) and kind.get("type") in ("long", "string") and "name" not in kind:
            out.append((f["name"], kind["type"], ()))
        elif kind in ("long", "string"):
            out.append((f["name"], kind, ()))
        else:
            raise AvroError(f"{raw['name']}.{f['name']}: type {kind!r:.80} is not supported by schemas.stdavro")
    return tuple(out)


def _make_encoder(
    cls: type[Event],
    header: bytes,
    layout: tuple[tuple[str, str, tuple[str, ...]], ...],
    frame: str = "body",
    names_in_frame: dict[str, object] | None = None,
) -> Callable[[Event], bytes]:
    """A straight-line encoder for ``cls`` with this layout, generated once (as dataclasses generate
    their __init__): one ``b"".join`` of cached varints and enum bytes, returned as ``frame`` (an
    expression of ``body``, the record, and ``e``, the event) in the same function."""
    enums = field_enums(cls)
    names = set(cls.__dataclass_fields__)
    env: dict[str, Any] = {"H": header, "lg": _LONGS.get, "lm": _long_miss, "tg": _TEXTS.get, "tm": _text_miss}
    env["z"] = _zigzag_varint
    parts = []
    for name, kind, symbols in layout:
        if name not in names:
            raise AvroError(f"{cls.__name__} has no field {name!r} for this writer")
        a = f"e.{name}"
        if kind == "enum":
            if name not in enums:
                raise AvroError(f"{cls.__name__}.{name} is not an enum")
            enum_cls = enums[name]
            # A member the writer lacks has no entry: KeyError (it cannot be written with this schema).
            # Keyed by the member's name: an Enum's __hash__ is Python code, a str's is cached.
            env[f"E_{name}"] = {m.name: _zigzag_varint(symbols.index(m.value)) for m in enum_cls if m.value in symbols}
            parts.append(f"E_{name}[{a}._name_]")
        elif kind == "long":
            if name == "seq":
                parts.append(f"z({a})")  # unique per event: caching it would only churn the cache
            else:
                parts.append(f"(lg({a}) or lm({a}))")
        else:
            parts.append(f"(tg({a}) or tm({a}))")
    env.update(names_in_frame or {})
    src = "def encode(e):\n    body = b''.join((H, " + ", ".join(parts) + "))\n" + f"    return {frame}\n"
    exec(src, env)
    encode: Callable[[Event], bytes] = env["encode"]
    return encode


def _load() -> tuple[dict[int, Writer], dict[type[Event], Writer]]:
    root = resources.files("schemas").joinpath("avro")
    paths = [(p, True) for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".avsc")]
    history = root.joinpath("history")
    if history.is_dir():
        paths += [(p, False) for p in sorted(history.iterdir(), key=lambda p: p.name) if p.name.endswith(".avsc")]
    by_fp: dict[int, Writer] = {}
    current: dict[type[Event], Writer] = {}
    for path, is_current in paths:
        raw = json.loads(path.read_text())
        name = raw["name"].rsplit(".", 1)[-1]
        cls = _CLASSES.get(name)
        if cls is None:
            continue
        fp = fingerprint_of(raw)
        header = _HEADER.pack(MAGIC, fp)
        layout = _layout(raw)
        writer = Writer(name, cls, fp, header, layout, _make_encoder(cls, header, layout), is_current)
        by_fp[fp] = writer
        if is_current:
            current[cls] = writer
    missing = set(_CLASSES.values()) - set(current)
    if missing:
        raise AvroError(f"no current schema for {sorted(c.__name__ for c in missing)}")
    return by_fp, current


_WRITERS, _CURRENT = _load()
_ENCODE = {cls: w.encode for cls, w in _CURRENT.items()}


def writers() -> dict[int, Writer]:
    """Every known writer schema by fingerprint (current and history)."""
    return dict(_WRITERS)


def current_fingerprint(cls: type[Event]) -> int:
    return _CURRENT[cls].fingerprint


def current_layout(cls: type[Event]) -> tuple[bytes, tuple[tuple[str, str, tuple[tuple[object, bytes], ...]], ...]]:
    """(single-object header, ((field, kind, ((enum member, its encoded index), ...)), ...)) of the
    current writer of ``cls``: what ``schemas.wire`` hands the optional C encoder, which must write
    exactly the bytes this module writes."""
    w = _CURRENT[cls]
    enums = field_enums(cls)
    out = []
    for name, kind, symbols in w.layout:
        members: tuple[tuple[object, bytes], ...] = ()
        if kind == "enum":
            members = tuple((m, _zigzag_varint(symbols.index(m.value))) for m in enums[name] if m.value in symbols)
        out.append((name, kind, members))
    return w.header, tuple(out)


def encoder_for(cls: type[Event]) -> Callable[[Event], bytes]:
    """The encoder of ``cls``'s current schema (the hot path binds it once)."""
    return _ENCODE[cls]


def framed_encoder(cls: type[Event], frame: str, names: dict[str, object]) -> Callable[[Event], bytes]:
    """The current schema's encoder of ``cls`` returning ``frame``: a Python expression of ``body``
    (the single-object record) and ``e`` (the event), with ``names`` in scope, evaluated in the
    same generated function (``schemas.wire`` wraps each record in its feed entry so: one call per
    event instead of two)."""
    w = _CURRENT[cls]
    return _make_encoder(cls, w.header, w.layout, frame, names)


def encode(event: Event) -> bytes:
    """Single-object encoding of ``event`` with its current schema (raises for an event no long,
    enum or UTF-8 string can carry: only a journal from before the engine bounded its input holds one)."""
    return _ENCODE[type(event)](event)


def writer_of(data: bytes) -> Writer:
    """The writer schema a single-object record names; AvroError if it names none we know."""
    if len(data) < _HEADER.size or data[:2] != MAGIC:
        raise AvroError("not a single-object record")
    writer = _WRITERS.get(_HEADER.unpack_from(data)[1])
    if writer is None:
        raise AvroError(f"unknown writer fingerprint {data[2:10][::-1].hex()}")
    return writer


def decode(data: bytes) -> Event:
    """The event in a single-object record of any known writer (fields it lacks: their defaults)."""
    writer = writer_of(data)
    pos = _HEADER.size
    values: dict[str, object] = {}
    for name, kind, symbols in writer.layout:
        if kind == "long":
            values[name], pos = _read_long(data, pos)
        elif kind == "string":
            size, pos = _read_long(data, pos)
            if size < 0 or pos + size > len(data):
                raise AvroError(f"{name}: string of {size} bytes past the end")
            try:
                values[name] = data[pos : pos + size].decode()
            except UnicodeDecodeError as exc:
                raise AvroError(f"{name}: not UTF-8") from exc
            pos += size
        else:
            index, pos = _read_long(data, pos)
            if not 0 <= index < len(symbols):
                raise AvroError(f"{name}: enum index {index} of {len(symbols)}")
            values[name] = symbols[index]
    if pos != len(data):
        raise AvroError(f"{len(data) - pos} bytes after the record")
    for f in fields(writer.cls):
        if f.name not in values:
            if f.default is MISSING:
                raise AvroError(f"writer {writer.fingerprint:016x} lacks {f.name}, which has no default")
            values[f.name] = f.default
    try:
        return event_from_plain(writer.cls, values)
    except (ValueError, KeyError, TypeError) as exc:
        raise AvroError(f"{writer.name}: {exc!r:.200}") from exc
