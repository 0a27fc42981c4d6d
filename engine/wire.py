"""The feed's frame header: what the bridge needs without decoding the Avro body.

A feed message is two ZeroMQ frames, ``[header, payload]``. The header is a
fixed 36-byte big-endian struct: magic ``b"OH"``, version, event type, epoch,
seq and the user ids the record is keyed by (a Trade has two: taker and
maker). A HEARTBEAT has an empty payload and carries the last seq emitted.

Standard library only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.events import BalanceUpdate, Event, EventType, OrderUpdate, Trade

__all__ = [
    "HEADER",
    "HEARTBEAT",
    "MAGIC",
    "VERSION",
    "WireError",
    "WireHeader",
    "header_for",
    "pack",
    "unpack",
]

MAGIC = b"OH"
VERSION = 1
HEARTBEAT = 100
HEADER = struct.Struct(">2sBBQQQQ")


class WireError(ValueError):
    """A header that is not ours; ``reason`` is a stable code for DLQ headers and metrics."""

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
    if type_ not in (1, 2, 3, HEARTBEAT):
        raise WireError("unknown_type", f"event type {type_}")
    return WireHeader(type_, epoch, seq, key, key2)
