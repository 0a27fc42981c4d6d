"""Dead letters that always fit the broker (pure).

A dead letter keeps the input as it came: the value is the frames framed as ``u32 count`` then
``u32 length + bytes`` per frame. Headers:

* ``reason`` (stable code), ``source`` (``bridge``), ``detail`` (at most ``MAX_DETAIL`` bytes;
  an unpublishable marker's JSON, at most 4,096 bytes, is kept whole);
* ``size`` and ``sha256``: length and SHA-256 (hex) of the *whole* framed input, so a
  truncated record still identifies what it stood for;
* ``payload_size`` and ``payload_sha256``: the same for the last frame (an event's Avro bytes,
  comparable with the journal's encoding), when there were two frames;
* ``epoch`` and ``seq``: what the frame header said, when it could be parsed;
* ``accounted: 1`` only when this dead letter *stands for* that seq (the seq is in Kafka only
  here and the bridge's watermark passes it once this record is acknowledged);
* ``truncated: 1`` when the value is a prefix of the framed input.

The whole record (value + headers + Kafka's per-record overhead) is at most ``limit`` bytes:
the value is cut to what remains after the headers. ``limit`` comes from
``OHS_BRIDGE_MAX_MESSAGE_BYTES``, which defaults below the broker's 1 MiB ``message.max.bytes``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_DETAIL", "RECORD_OVERHEAD", "DeadLetter", "dead_letter", "record_size"]

MAX_DETAIL = 1000
MAX_MARKER_DETAIL = 4096
RECORD_OVERHEAD = 512
"""Bytes reserved for Kafka's record and batch framing (batch header 61, record varints < 30)."""
_HEADER_OVERHEAD = 10
"""Per header: two varint lengths."""
_U32 = struct.Struct(">I")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    headers: Headers
    epoch: int | None = None
    seq: int | None = None
    accounted: bool = False

    def minimal(self) -> DeadLetter:
        """The same dead letter without its value and with a short detail: what is retried when
        the broker refused the full one (its limit is lower than configured)."""
        keep = [(k, v[:200] if k == "detail" else v) for k, v in self.headers if k != "truncated"]
        return DeadLetter(b"", [*keep, ("truncated", b"1")], self.epoch, self.seq, self.accounted)


def record_size(value: bytes, headers: Headers, key: bytes | None = None) -> int:
    """An upper bound of the bytes this record takes in a produce request."""
    size = RECORD_OVERHEAD + len(value) + len(key or b"")
    return size + sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in headers)


def _text(detail: str, cap: int) -> bytes:
    # Details can quote hostile input (lone surrogates included): never let encoding raise.
    raw = detail.encode("utf-8", "backslashreplace")
    return raw if len(raw) <= cap else raw[:cap].decode("utf-8", "ignore").encode()


def dead_letter(
    frames: Sequence[bytes],
    reason: str,
    detail: str,
    *,
    limit: int,
    epoch: int | None = None,
    seq: int | None = None,
    accounted: bool = False,
    detail_cap: int = MAX_DETAIL,
) -> DeadLetter:
    """The dead letter of ``frames``, whole or truncated so the record is at most ``limit`` bytes."""
    prefix = _U32.pack(len(frames))
    parts = [prefix]
    digest = hashlib.sha256(prefix)
    size = len(prefix)
    for f in frames:
        length = _U32.pack(len(f))
        digest.update(length)
        digest.update(f)
        parts += (length, f)
        size += len(length) + len(f)
    headers: Headers = [
        ("reason", _text(reason, 100)),
        ("source", b"bridge"),
        ("detail", _text(detail, detail_cap)),
        ("size", str(size).encode()),
        ("sha256", digest.hexdigest().encode()),
    ]
    if len(frames) == 2:
        headers += [
            ("payload_size", str(len(frames[1])).encode()),
            ("payload_sha256", hashlib.sha256(frames[1]).hexdigest().encode()),
        ]
    if epoch is not None and seq is not None:
        headers += [("epoch", str(epoch).encode()), ("seq", str(seq).encode())]
    if accounted:
        headers.append(("accounted", b"1"))
    truncated = ("truncated", b"1")
    budget = limit - record_size(b"", [*headers, truncated])
    if size <= budget:
        value = b"".join(parts)
    else:
        value = _prefix(parts, max(budget, 0))
        headers.append(truncated)
    return DeadLetter(value, headers, epoch, seq, accounted)


def _prefix(parts: list[bytes], n: int) -> bytes:
    """The first ``n`` bytes of the concatenation, without building all of it."""
    out, left = [], n
    for p in parts:
        if left <= 0:
            break
        out.append(p[:left])
        left -= len(p)
    return b"".join(out)
