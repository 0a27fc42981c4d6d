"""The worker's seq guard: is an event's (epoch, seq) one the bridge can have produced?

A record on ``orders.updates`` with a far-future seq (forged, or from a producer
that is not the bridge) would be written with a timestamp that beats every
real write of its order for ever, and count in statistics. The bridge leases
seqs in its checkpoint topic before producing them (``schemas.checkpoint``: a
checkpoint ``(E, W, C)`` with ceiling ``C >= s`` is acknowledged before any
record of epoch ``E`` with seq ``s`` is produced), so after reading the
checkpoint topic to its end, every genuine record is covered. The guard:

* covers ``(E, s)`` when ``s`` is at or below the highest ceiling read for
  epoch ``E``;
* covers an event of an epoch older than the newest one read when its write
  timestamp ``E + s`` stays below the newest epoch (an engine emits far fewer
  than one event per microsecond, so every genuine older-epoch event does):
  compaction may have removed that epoch's checkpoint, and such an event
  cannot shadow newer data;
* covers nothing else: an epoch newer than any checkpoint, or a seq above the
  ceiling, after a fresh read to the end of the topic, is dead-lettered.

``Ceilings`` is the pure bookkeeping; ``CheckpointReader`` reads the topic
with its own consumer (manual assignment, never a group member, no commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from schemas.checkpoint import Checkpoint, CheckpointError
from streams.errors import StreamsError
from streams.processor import SeqGuard

__all__ = ["Ceilings", "CheckpointReader", "CheckpointUnavailable"]

log = logging.getLogger("ohs.worker")


class CheckpointUnavailable(StreamsError):
    """The checkpoint topic could not be read to its end in time: judge nothing, try again."""

    retriable = True


class Ceilings:
    """Highest ceiling read per epoch, for one bridge id."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, int] = {}
        self.newest_epoch = 0

    def update(self, cp: Checkpoint) -> None:
        if cp.ceiling > self.by_epoch.get(cp.epoch, -1):
            self.by_epoch[cp.epoch] = cp.ceiling
        if cp.epoch > self.newest_epoch:
            self.newest_epoch = cp.epoch

    def covers(self, epoch: int, seq: int) -> bool:
        ceiling = self.by_epoch.get(epoch)
        if ceiling is not None and seq <= ceiling:
            return True
        return epoch < self.newest_epoch and epoch + seq < self.newest_epoch


class CheckpointReader(SeqGuard):
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        bridge_id: str,
        *,
        timeout_s: float = 10.0,
        kafka: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap, self.topic, self.key = bootstrap, topic, bridge_id.encode()
        self.timeout_s = timeout_s
        self.kafka = kafka or {}
        self.ceilings = Ceilings()
        self._consumer: Any = None
        self._next_offset = 0
        self._lock = threading.Lock()

    def covers(self, epoch: int, seq: int) -> bool:
        return self.ceilings.covers(epoch, seq)

    async def refresh(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.read_to_end)

    def read_to_end(self) -> None:
        """Read every checkpoint record up to the topic's current end (blocking)."""
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

        with self._lock:
            try:
                if self._consumer is None:
                    self._consumer = Consumer(
                        {
                            "bootstrap.servers": self.bootstrap,
                            "group.id": f"ohs-worker-ceiling-{uuid.uuid4().hex[:8]}",
                            "enable.auto.commit": False,
                            "enable.partition.eof": True,
                            **self.kafka,
                        }
                    )
                consumer = self._consumer
                tp = TopicPartition(self.topic, 0)
                low, high = consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
                start = max(self._next_offset, low)
                if start >= high:
                    return
                consumer.assign([TopicPartition(self.topic, 0, start)])
                deadline = time.monotonic() + self.timeout_s
                while self._next_offset < high:
                    if time.monotonic() > deadline:
                        raise CheckpointUnavailable(f"{self.topic} not read to offset {high} in {self.timeout_s}s")
                    msg = consumer.poll(0.5)
                    if msg is None:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            self._next_offset = max(self._next_offset, msg.offset() or high)
                            if self._next_offset >= high:
                                break
                            continue
                        raise CheckpointUnavailable(f"reading {self.topic}: {err}")
                    self._next_offset = (msg.offset() or 0) + 1
                    if msg.key() != self.key:
                        continue
                    try:
                        self.ceilings.update(Checkpoint.from_bytes(msg.value()))
                    except CheckpointError as exc:
                        log.warning("ignoring a checkpoint record at offset %d: %s", msg.offset(), exc)
            except KafkaException as exc:
                self._drop()
                raise CheckpointUnavailable(f"cannot read {self.topic}: {exc}") from exc
            except CheckpointUnavailable:
                self._drop()
                raise

    def _drop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):  # closing a broken consumer must not hide the original error
                self._consumer.close()
            self._consumer = None

    def close(self) -> None:
        with self._lock:
            self._drop()
