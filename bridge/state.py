"""What the parts of the bridge share: its state, the outbox entry, and a rate-limited log.

``bridge.service.Bridge`` is one object assembled from one module per concern, each a class in
a chain that adds its methods to the same state: ``checkpointing`` (the seq ceiling and the
watermark in the checkpoint topic) <- ``outbox`` (records handed to the producer in order,
delivery reports, dead letters) <- ``intake`` (validation, dedupe, the epoch gate) <-
``engine_link`` (holes, and the engine's replay service) <- ``service`` (lifecycle and loop).
``BridgeState`` declares the state they share; ``Bridge.__init__`` sets it.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from typing import Any

import zmq
from confluent_kafka import KafkaError

from bridge.kafka import KafkaIO
from bridge.settings import BridgeSettings
from bridge.tracker import Hole, SeqTracker
from schemas.checkpoint import CeilingLease, Checkpoint
from schemas.events import EventType
from schemas.registry import Registry

__all__ = [
    "ACCOUNT",
    "DLQ",
    "EVENT",
    "MAX_OUTBOX_BYTES",
    "OPEN",
    "PURGED",
    "QQ",
    "QQQ",
    "RESERVED",
    "BridgeState",
    "Headers",
    "Out",
    "RateLimited",
    "log",
]

log = logging.getLogger("ohs.bridge")
QQ = struct.Struct(">QQ")
QQQ = struct.Struct(">QQQ")

RESERVED = 4096
"""Bytes of ``max_message_bytes`` kept for an event record's key, headers and framing."""
MAX_OUTBOX_BYTES = 256 * 1024 * 1024
PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}

# Outbox entry kinds: an event, a dead letter standing for a seq, any other dead letter, and
# the first checkpoint of a new epoch.
EVENT, ACCOUNT, DLQ, OPEN = 0, 1, 2, 3

Headers = list[tuple[str, bytes]]


class Out:
    """One thing to hand to the producer, in order: its records (topic, key, value, headers)."""

    __slots__ = ("epoch", "expect", "frames", "kind", "records", "sent", "seq", "size")

    def __init__(
        self,
        kind: int,
        epoch: int,
        seq: int,
        records: list[tuple[str, bytes | None, bytes, Headers]],
        frames: list[bytes] | None = None,
    ) -> None:
        self.kind, self.epoch, self.seq, self.records, self.frames = kind, epoch, seq, records, frames
        self.sent = 0
        self.expect = True
        """Tell the tracker how many records the seq has, when the first one is handed over."""
        self.size = len(records[0][2]) * len(records) if records else 0


class RateLimited:
    """At most one log line per ``every`` seconds per key, with the count of those skipped."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(key, (-1e9, 0))
        if now - last < self.every:
            self._last[key] = (last, skipped + 1)
            return
        self._last[key] = (now, 0)
        if skipped:
            msg += f" ({skipped} more like this since the last line)"
        log.log(level, msg, *args, exc_info=exc_info)


class BridgeState:
    """The state every part of the bridge reads and writes (set by ``Bridge.__init__``)."""

    s: BridgeSettings
    kafka: KafkaIO
    phase: str
    registry: Registry | None
    producer: Any
    tracker: SeqTracker | None
    feed: zmq.Socket[bytes] | None
    _ctx: zmq.Context[zmq.Socket[bytes]]
    _topics: dict[EventType, str]
    _max_payload: int
    _replay: zmq.Socket[bytes] | None
    _info_sock: zmq.Socket[bytes] | None
    _info: tuple[int, int] | None
    _info_at: float
    _replay_req: Hole | None
    _outbox: deque[Out]
    _outbox_bytes: int
    _deferred: list[tuple[float, Out]]
    _blocked: bool
    _fatal: bool
    _gen: int
    """Generation of the producer: reports of a replaced one are ignored."""
    _leases: dict[int, CeilingLease]
    _last_cp: dict[int, Checkpoint]
    _last_written: Checkpoint | None
    _opening: int | None
    _closed: dict[int, int]
    """Epochs left behind -> the highest seq handed to the producer in them."""
    _last_loop: float
    _next_checkpoint: float
    _say: RateLimited
    _epoch_bytes: dict[int, bytes]
    _produced: dict[str, Any]

    def _engine_epoch(self, fresh: bool = False) -> int | None:
        """The engine's epoch per its replay service (``bridge.engine_link``)."""
        raise NotImplementedError
