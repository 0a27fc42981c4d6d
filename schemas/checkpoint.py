"""The bridge's checkpoint record and its seq ceiling lease (pure: standard library only).

The record
----------
The checkpoint topic (``OHS_BRIDGE_TOPIC_CHECKPOINT``, default ``bridge.watermark``: one
partition, ``cleanup.policy=compact``) holds, under the key ``bridge_id`` (UTF-8), JSON values

    {"epoch": E, "watermark": W, "ceiling": C}

with integers ``0 <= W <= C < 2**64``. Records written before the ceiling existed have no
``"ceiling"``; they read as ``C = W``. Unknown extra keys are ignored (forward compatible).

* ``W``, the watermark: every seq ``1..W`` of epoch ``E`` has all of its records acknowledged
  by Kafka (``acks=all``): in the event topics, or, for a seq that cannot be published (an
  oversized event, the engine's UNPUBLISHABLE marker), as one dead letter in the DLQ with the
  header ``accounted: 1``. A restarted bridge resumes at ``W`` and asks the engine to replay
  everything above it.
* ``C``, the ceiling: a lease on seqs. **Invariant: the bridge never hands a record of epoch
  ``E`` with seq ``s`` to the producer (event topics, and the DLQ records that stand for a seq)
  unless a checkpoint record of epoch ``E`` with ceiling ``>= s`` has already been acknowledged
  by Kafka.**

Consequences a consumer (the worker) can rely on:

1. When a record ``(E, s)`` of an event topic is visible, a checkpoint ``(E, _, C >= s)`` is
   already in the checkpoint topic (it was acknowledged, i.e. committed, before the record was
   even produced). So reading the checkpoint topic to its end (its high watermark) after seeing
   the record always finds a covering ceiling for a genuine record; a record beyond every
   ceiling of its epoch was not written by the bridge (forged, or from another writer).
2. Within an epoch one bridge's ceilings never decrease (a restarted bridge starts from the
   ceiling it reads back), so the latest record of the key covers every seq the bridge produced
   in that epoch, and the maximum over all records read is the same number.
3. Epochs only move forward, and the first checkpoint of a new epoch ``E2`` is produced only
   after every record of the previous epoch was handed to the producer: once a consumer reads a
   checkpoint of ``E2``, no further record of an older epoch will be written by the bridge.
   (Compaction keeps only the latest record per key, so a consumer that must judge old-epoch
   records should remember the ceiling of each epoch as it reads the topic, not rely on
   reading an old epoch's record back later.)

How the lease is renewed (``CeilingLease``): the bridge requests ``C = received + lease``
(``OHS_BRIDGE_CEILING_LEASE``, default 100,000 seqs) whenever the highest seq it has ready,
``received``, passes ``C - lease/2``: in steady state the ceiling is acknowledged long before it
is needed, and the renewal costs one small record per ``lease/2`` events, no per-event I/O. When
a ceiling is not yet acknowledged (a fresh epoch, Kafka slow), ready records wait in seq order
in the bridge's outbox (bounded by ``max_in_flight``, like any backpressure); they are never
reordered. Every checkpoint record carries the highest ceiling requested so far; the periodic
watermark checkpoint (every ``checkpoint_ms``) renews nothing but repeats it.

Other bridges may share the topic under other keys; readers filter by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from schemas.errors import SchemaError

__all__ = ["MAX_U64", "CeilingLease", "Checkpoint", "CheckpointError"]

MAX_U64 = 2**64 - 1


class CheckpointError(SchemaError, ValueError):
    """A checkpoint record that is not one (bad JSON, missing fields, out-of-range integers)."""

    retriable = False


def _u64(doc: dict[str, object], name: str) -> int:
    value = doc.get(name)
    # bool is an int subclass: true/false must not pass as 1/0.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_U64:
        raise CheckpointError(f"{name!r} must be an integer in [0, 2**64): {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Checkpoint:
    epoch: int
    watermark: int
    ceiling: int

    def __post_init__(self) -> None:
        for name in ("epoch", "watermark", "ceiling"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_U64:
                raise CheckpointError(f"{name} must be an integer in [0, 2**64): {value!r}")
        if self.ceiling < self.watermark:
            raise CheckpointError(f"ceiling {self.ceiling} is below the watermark {self.watermark}")

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"epoch": self.epoch, "watermark": self.watermark, "ceiling": self.ceiling}, separators=(",", ":")
        ).encode()

    @classmethod
    def from_bytes(cls, value: bytes | None) -> Checkpoint:
        """Decode a record value; an old record without ``ceiling`` reads as ceiling = watermark."""
        if value is None:
            raise CheckpointError("null value (a tombstone)")
        if len(value) > 4096:
            raise CheckpointError(f"{len(value)} bytes: not a checkpoint")
        try:
            doc = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise CheckpointError("not a JSON object")
        epoch, watermark = _u64(doc, "epoch"), _u64(doc, "watermark")
        ceiling = _u64(doc, "ceiling") if "ceiling" in doc else watermark
        return cls(epoch, watermark, ceiling)


@dataclass
class CeilingLease:
    """The ceiling of one epoch: the highest requested (written) and the highest acknowledged.

    Pure bookkeeping; the bridge writes a checkpoint whenever ``renewal`` returns a value, and
    reports the outcome with ``on_ack`` / ``on_failure``.
    """

    lease: int
    acked: int = 0
    """Highest ceiling Kafka acknowledged for this epoch: seqs up to it may be produced."""
    requested: int = 0
    """Highest ceiling handed to the producer for this epoch (acknowledged or not)."""

    def __post_init__(self) -> None:
        if self.lease < 2:
            raise ValueError(f"a lease of {self.lease} seqs cannot be renewed ahead of need")
        self.requested = max(self.requested, self.acked)

    def allows(self, seq: int) -> bool:
        return seq <= self.acked

    def renewal(self, received: int) -> int | None:
        """The ceiling to write now, or None: renew once ``received`` passes ``requested - lease/2``
        (never lower than what was already requested)."""
        if received <= self.requested - self.lease // 2:
            return None
        self.requested = max(self.requested, received + self.lease)
        return self.requested

    def on_ack(self, ceiling: int) -> None:
        if ceiling > self.acked:
            self.acked = ceiling
        if self.requested < self.acked:
            self.requested = self.acked

    def on_failure(self, ceiling: int) -> None:
        """A write of ``ceiling`` failed: if it was the latest request, the next ``renewal`` asks again."""
        if ceiling == self.requested and self.acked < ceiling:
            self.requested = self.acked
