"""The feed's frame header: what the bridge needs without decoding the Avro body.

A feed message is two ZeroMQ frames, ``[header, payload]``. The header is a
fixed 36-byte big-endian struct: magic ``b"OH"``, version, event type, epoch,
seq and the user ids the record is keyed by (a Trade has two: taker and
maker). A HEARTBEAT has an empty payload and carries the last seq emitted.

An UNPUBLISHABLE marker stands in for a journaled event that cannot be put on
the wire (a journal written before the engine bounded its input can hold a
user id beyond 64 bits, a balance beyond a long, text that is not UTF-8 or is
huge): same header with the event's epoch and seq and keys 0, 0, and a
payload of compact UTF-8 JSON, at most ``MARKER_MAX_BYTES``:
``{"reason": str, "detail": str, "size": int, "sha256": str}``, where size
and sha256 are those of the event as the journal stores it (its compact JSON
list). The engine sends it wherever it would have sent the event (feed and
replay), so the seq is accounted for; the bridge dead-letters it.

Entries and batches. The engine sends events in *batches*: a feed message of one frame holding
one or more entries, each ``u32 size | header | payload`` (size = payload bytes), in seq order;
a heartbeat is an entry with an empty payload. The journal stores every event as exactly this
entry (``event_entry``), so the feed, the journal and the replay service (``EVS`` replies) carry
the same bytes, encoded once. A two-frame message ``[header, payload]`` is still one event (what a
test's injector sends); consumers accept both.

Standard library only.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from schemas.errors import SchemaError
from schemas.events import INT64_MAX, INT64_MIN, BalanceUpdate, Event, EventType, OrderUpdate, Trade, enum_fields
from schemas.stdavro import current_layout, framed_encoder

try:  # the optional C build of the hot path's encoder (setup.py); absent, Python does it all
    from schemas import _avroc
except ImportError:  # pragma: no cover - depends on the build
    _avroc = None  # type: ignore[assignment]

__all__ = [
    "ENTRY",
    "HEADER",
    "HEARTBEAT",
    "MAGIC",
    "MARKER_MAX_BYTES",
    "MAX_EVENT_BYTES",
    "UNPUBLISHABLE",
    "VERSION",
    "WireError",
    "WireHeader",
    "encode_events",
    "entry",
    "event_entry",
    "event_json",
    "event_problem",
    "header_for",
    "loads_bounded",
    "native_in_use",
    "pack",
    "parse_marker",
    "split_batch",
    "unpack",
    "unpublishable",
    "use_native",
]

MAGIC = b"OH"
VERSION = 1
HEARTBEAT = 100
UNPUBLISHABLE = 101
HEADER = struct.Struct(">2sBBQQQQ")
ENTRY = struct.Struct(">I2sBBQQQQ")
"""An entry's prefix: payload size, then the header."""
_SIZE = struct.Struct(">I")
MAX_EVENT_BYTES = 8192
"""Largest encoded event the engine publishes. With the command bounds an event is well under 1 KB;
only a journal written before them can hold a bigger one, which is sent as a marker instead."""
MARKER_MAX_BYTES = 4096
_TYPES = (1, 2, 3, HEARTBEAT, UNPUBLISHABLE)


class WireError(SchemaError, ValueError):
    """A header that is not ours; ``reason`` is a stable code for DLQ headers and metrics."""

    retriable = False

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WireHeader:
    type: int
    epoch: int
    seq: int
    key_user_id: int
    key_user_id_2: int


def pack(type_: int, epoch: int, seq: int, key: int = 0, key2: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, epoch, seq, key, key2)


def header_for(event: Event) -> bytes:
    if isinstance(event, OrderUpdate):
        return HEADER.pack(MAGIC, VERSION, EventType.ORDER_UPDATE, event.epoch, event.seq, event.user_id, 0)
    if isinstance(event, Trade):
        return HEADER.pack(
            MAGIC, VERSION, EventType.TRADE, event.epoch, event.seq, event.taker_user_id, event.maker_user_id
        )
    if isinstance(event, BalanceUpdate):
        return HEADER.pack(MAGIC, VERSION, EventType.BALANCE_UPDATE, event.epoch, event.seq, event.user_id, 0)
    raise TypeError(f"not an event: {event!r}")


def unpack(frame: bytes) -> WireHeader:
    if len(frame) != HEADER.size:
        raise WireError("bad_header", f"{len(frame)} bytes, want {HEADER.size}")
    magic, version, type_, epoch, seq, key, key2 = HEADER.unpack(frame)
    if magic != MAGIC:
        raise WireError("bad_magic", f"header magic {magic!r}")
    if version != VERSION:
        raise WireError("bad_version", f"header version {version}")
    if type_ not in _TYPES:
        raise WireError("unknown_type", f"event type {type_}")
    return WireHeader(type_, epoch, seq, key, key2)


_TEXT_FIELDS = frozenset({"client_order_id", "symbol", "asset"})
_LAYOUT: dict[type[object], tuple[tuple[str, ...], tuple[str, ...]]] = {}
_KINDS: dict[type[object], EventType] = {
    OrderUpdate: EventType.ORDER_UPDATE,
    Trade: EventType.TRADE,
    BalanceUpdate: EventType.BALANCE_UPDATE,
}
_KEYS: dict[type[object], tuple[str, ...]] = {
    OrderUpdate: ("epoch", "seq", "user_id"),
    Trade: ("epoch", "seq", "taker_user_id", "maker_user_id"),
    BalanceUpdate: ("epoch", "seq", "user_id"),
}


def event_problem(event: Event) -> tuple[str, str] | None:
    """None if ``event`` can be published, else (reason, detail): ``out_of_range`` (an integer beyond a
    signed 64-bit long, or a negative header field), ``bad_text`` (not encodable as UTF-8, or not
    text at all) or ``oversized`` (its text alone beyond ``MAX_EVENT_BYTES``). Pure and cheap: the
    engine can ask it of every event of a journal at start."""
    cls = type(event)
    layout = _LAYOUT.get(cls)
    if layout is None:
        names = tuple(f.name for f in fields(event))
        texts = tuple(n for n in names if n in _TEXT_FIELDS)
        ints = tuple(n for n in names if n not in _TEXT_FIELDS)
        layout = _LAYOUT[cls] = (ints, texts)
    ints, texts = layout
    for name in ints:
        value = getattr(event, name)
        if isinstance(value, enum.Enum):
            continue
        if type(value) is not int:
            return "out_of_range", f"{name} is {type(value).__name__}, not an integer"
        if not INT64_MIN <= value <= INT64_MAX:
            return "out_of_range", f"{name} {_short(value)} outside a signed 64-bit long"
    for name in _KEYS[cls]:
        if getattr(event, name) < 0:
            return "out_of_range", f"{name} {getattr(event, name)} is negative (an unsigned header key)"
    size = 0
    for name in texts:
        value = getattr(event, name)
        if type(value) is not str:
            return "bad_text", f"{name} is {type(value).__name__}, not text"
        try:
            size += len(value.encode())
        except UnicodeEncodeError as exc:
            return "bad_text", f"{name} is not UTF-8 encodable: {exc.reason} at {exc.start}"
    if size > MAX_EVENT_BYTES:
        return "oversized", f"{size} bytes of text > {MAX_EVENT_BYTES}"
    return None


def _short(value: int) -> str:
    return str(value) if value.bit_length() < 200 else f"of {value.bit_length()} bits"


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PAIRS = re.compile(rb"\[\]|\{\}")


def loads_bounded(data: bytes, max_depth: int) -> object:
    """``json.loads`` of UTF-8 ``data`` once it is proven nested at most ``max_depth`` deep.

    The C parser recurses once per level and a few KB of ``[`` exhaust the interpreter's stack, so
    the depth is measured first, without recursion and in linear time at C speed: drop escaped
    backslashes and quotes, drop what lies between quotes (brackets there are only text), keep
    the brackets, and strip innermost ``[]``/``{}`` pairs ``max_depth`` times; anything left is
    nested deeper (or unbalanced, which JSON refuses too). Up to the first byte the parser would
    refuse, this reads the text exactly as the parser does, so the parser can never go deeper
    than what was measured. Only UTF-8 is accepted (json.loads would also guess UTF-16 and -32,
    where a quote or a backslash is not a single byte). Raises ValueError, as json.loads does."""
    text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = b"".join(plain.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not skeleton:
            break
        skeleton, n = _PAIRS.subn(b"", skeleton)
        if not n:
            break
    if skeleton:
        raise ValueError(f"JSON nested deeper than {max_depth} levels (or unbalanced brackets)")
    return json.loads(text)


def unpublishable(epoch: int, seq: int, reason: str, detail: str, record: bytes) -> tuple[bytes, bytes]:
    """(header, payload) of the marker for the event with this epoch and seq; ``record`` is the event as
    the journal stores it. The payload is at most ``MARKER_MAX_BYTES`` (the detail is cut to fit)."""
    body = {"reason": reason[:64], "detail": "", "size": len(record), "sha256": hashlib.sha256(record).hexdigest()}
    room = MARKER_MAX_BYTES - len(json.dumps(body, separators=(",", ":")).encode())
    cut = detail[: max(0, room)]
    # A character may take up to 6 bytes once JSON-escaped: shorten until the whole payload fits.
    while True:
        body["detail"] = cut
        payload = json.dumps(body, separators=(",", ":")).encode()
        if len(payload) <= MARKER_MAX_BYTES:
            break
        cut = cut[: len(cut) - max(1, (len(payload) - MARKER_MAX_BYTES) // 6 + 1)]
    return pack(UNPUBLISHABLE, epoch, seq), payload


def parse_marker(payload: bytes) -> dict[str, object]:
    """The marker's fields; raises WireError for anything that is not a marker payload."""
    if len(payload) > MARKER_MAX_BYTES:
        raise WireError("bad_marker", f"{len(payload)} bytes > {MARKER_MAX_BYTES}")
    try:
        body = loads_bounded(payload, 1)
    except ValueError as exc:
        raise WireError("bad_marker", str(exc)[:200]) from exc
    if not isinstance(body, dict) or set(body) != {"reason", "detail", "size", "sha256"}:
        raise WireError("bad_marker", "want an object with reason, detail, size, sha256")
    if not (isinstance(body["reason"], str) and isinstance(body["detail"], str) and type(body["size"]) is int):
        raise WireError("bad_marker", "reason and detail are text, size an integer")
    return body


def entry(header: bytes, payload: bytes) -> bytes:
    """One entry of a batch (``header`` must be a packed ``HEADER``)."""
    return _SIZE.pack(len(payload)) + header + payload


def split_batch(message: bytes) -> tuple[list[tuple[bytes, bytes]], str]:
    """The (header, payload) pairs of a batch message, and "" or what is wrong with the rest of
    it (the entries before a bad spot are returned: each stands on its own)."""
    out: list[tuple[bytes, bytes]] = []
    pos, end, prefix = 0, len(message), ENTRY.size
    while pos < end:
        if end - pos < prefix:
            return out, f"{end - pos} bytes at offset {pos} are too short for an entry"
        (size,) = _SIZE.unpack_from(message, pos)
        if size > end - pos - prefix:
            return out, f"an entry at offset {pos} claims {size} bytes, {end - pos - prefix} remain"
        out.append((message[pos + 4 : pos + prefix], message[pos + prefix : pos + prefix + size]))
        pos += prefix + size
    if not out:
        return out, "an empty batch"
    return out, ""


def _entry_builder(cls: type[Event]) -> Callable[[Event], bytes]:
    """The event's whole entry (size, header, record) from one generated function."""
    keys = {OrderUpdate: "e.user_id, 0", Trade: "e.taker_user_id, e.maker_user_id", BalanceUpdate: "e.user_id, 0"}[cls]
    kind = int(_KINDS[cls])
    frame = f"P(len(body), M, V, {kind}, e.epoch, e.seq, {keys}) + body"
    return framed_encoder(cls, frame, {"P": ENTRY.pack, "M": MAGIC, "V": VERSION})


_ENTRIES: dict[type[object], Callable[[Event], bytes]] = {cls: _entry_builder(cls) for cls in _KEYS}  # type: ignore[arg-type]


_MAX_ENTRY = ENTRY.size + MAX_EVENT_BYTES


def _configure_native() -> Callable[[Sequence[Event]], bytes | None] | None:
    """The C encoder set up with the current writers' layouts, or None without the build."""
    if _avroc is None:
        return None
    codes = {"long": 0, "string": 1, "enum": 2}
    specs = []
    for cls, keys in _KEYS.items():
        header, layout = current_layout(cls)  # type: ignore[arg-type]
        fields_ = tuple((name, codes[kind], members) for name, kind, members in layout)
        specs.append((cls, int(_KINDS[cls]), header, keys[2:], fields_))
    _avroc.configure(tuple(specs), MAX_EVENT_BYTES, VERSION)
    return _avroc.encode_entries


_NATIVE = _configure_native()
_native = _NATIVE


def use_native(enabled: bool) -> bool:
    """Encode with the C build (the default when it is built) or in Python only (benchmarks and
    tests compare the two); returns whether the C encoder is now in use."""
    global _native
    _native = _NATIVE if enabled else None
    return _native is not None


def native_in_use() -> bool:
    """Whether ``encode_events`` uses the C build now."""
    return _native is not None


def native_encoder() -> Callable[[Sequence[Event]], bytes | None] | None:
    """The C encoder ``encode_events`` tries first, when it is in use: for a loop that calls it
    per command and ``encode_events`` only when it answers None (the engine's hot path)."""
    return _native


def encode_events(events: Sequence[Event]) -> tuple[bytes, list[bytes] | None]:
    """(the events' entries, concatenated; the JSON of each one sent as a marker, or None when
    every event can be published): what the journal stores and the feed sends, encoded once.

    The C encoder takes the batch when every event is an ordinary one; anything else (it answers
    None) is encoded here, where the markers are made."""
    if _native is not None:
        out = _native(events)
        if out is not None:
            return out, None
    parts = []
    json_records: list[bytes] | None = None
    entries = _ENTRIES
    for ev in events:
        try:
            out = entries[type(ev)](ev)
            if len(out) <= _MAX_ENTRY:
                parts.append(out)
                continue
        except Exception:  # the event cannot be encoded, or is too large: event_entry says why
            pass
        out, record = event_entry(ev)
        parts.append(out)
        if record is not None:
            if json_records is None:
                json_records = []
            json_records.append(record)
    return b"".join(parts), json_records


def event_entry(event: Event) -> tuple[bytes, bytes | None]:
    """(entry, None) for a publishable event; for one that cannot be published, (the entry of its
    UNPUBLISHABLE marker, the event as JSON: ``event_json``), so the journal still holds it whole."""
    try:
        out = _ENTRIES[type(event)](event)
    except Exception as exc:  # struct.error, OverflowError, UnicodeEncodeError, KeyError: the event's fault
        problem = event_problem(event) or ("unencodable", f"{type(exc).__name__}: {exc}")
    else:
        if len(out) - ENTRY.size <= MAX_EVENT_BYTES:
            return out, None
        problem = ("oversized", f"{len(out) - ENTRY.size} bytes > {MAX_EVENT_BYTES}")
    record = event_json(event)
    header, payload = unpublishable(event.epoch, event.seq, problem[0], problem[1], record)
    return entry(header, payload), record


_JSON_LAYOUT: dict[type[object], tuple[str, tuple[str, ...], frozenset[str]]] = {
    OrderUpdate: ("o", tuple(OrderUpdate.__dataclass_fields__), enum_fields(OrderUpdate)),
    Trade: ("t", tuple(Trade.__dataclass_fields__), enum_fields(Trade)),
    BalanceUpdate: ("b", tuple(BalanceUpdate.__dataclass_fields__), enum_fields(BalanceUpdate)),
}


def event_json(event: Event) -> bytes:
    """The event as compact JSON ``[tag, field values...]`` (enums by value): how journals before
    format 3 stored every event, and how the journal still stores one that cannot be published
    (what a marker's size and sha256 describe). Never fails: text UTF-8 cannot encode is escaped,
    and anything else JSON cannot hold is identified by its repr."""
    tag, names, enums = _JSON_LAYOUT[type(event)]
    row = [tag, *(getattr(event, n).value if n in enums else getattr(event, n) for n in names)]
    try:
        return json.dumps(row, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return repr(event).encode(errors="replace")
