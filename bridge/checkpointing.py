"""The bridge's checkpoints: its watermark and seq ceiling, written to the checkpoint topic.

A record of epoch E and seq s leaves the outbox only once a checkpoint of E with ceiling >= s is
acknowledged (``schemas.checkpoint`` states the protocol; the worker's seq guard reads it). The
lease is renewed at half-way; the watermark is written every ``checkpoint_ms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message

from bridge.kafka import write_checkpoint
from bridge.metrics import M
from bridge.state import (
    PURGED,
    BridgeState,
)
from schemas.checkpoint import Checkpoint

__all__ = ["Checkpointing"]


class Checkpointing(BridgeState):
    # ------------------------------------------------------------- checkpoint
    def _need_ceiling(self, epoch: int, seq: int) -> None:
        """The outbox's head waits for the ceiling of ``epoch``: make sure one is on its way."""
        tracker = self.tracker
        if tracker is not None and tracker.epoch == epoch:
            self._renew()
            return
        lease, last = self._leases.get(epoch), self._last_cp.get(epoch)
        if lease is None:
            return
        ceiling = lease.renewal(seq)
        if ceiling is not None:
            self._write_checkpoint(Checkpoint(epoch, last.watermark if last else 0, ceiling))

    def _renew(self) -> None:
        tracker = self.tracker
        if tracker is None or self._opening == tracker.epoch:
            return
        lease = self._leases.get(tracker.epoch)
        if lease is None:
            return
        ceiling = lease.renewal(tracker.received)
        if ceiling is not None:
            self._write_checkpoint(Checkpoint(tracker.epoch, tracker.watermark, ceiling))

    def _open_epoch(self, epoch: int) -> bool:
        """The new epoch's first checkpoint, produced once nothing of the old epoch waits."""
        tracker, lease = self.tracker, self._leases.get(epoch)
        if tracker is None or tracker.epoch != epoch or lease is None:
            self._opening = None if self._opening == epoch else self._opening
            return True  # superseded by a later epoch (its own opening follows)
        ceiling = lease.renewal(tracker.received) or lease.requested
        if not self._write_checkpoint(Checkpoint(epoch, tracker.watermark, ceiling)):
            return False
        self._opening = None
        return True

    def _maybe_checkpoint(self, force: bool = False) -> None:
        tracker = self.tracker
        now = time.monotonic()
        if tracker is None or self._opening == tracker.epoch or (not force and now < self._next_checkpoint):
            return
        self._next_checkpoint = now + self.s.checkpoint_ms / 1000.0
        lease = self._leases.get(tracker.epoch)
        if lease is None:
            return
        cp = Checkpoint(tracker.epoch, tracker.watermark, max(lease.requested, tracker.watermark))
        if cp != self._last_written:
            self._write_checkpoint(cp)

    def _write_checkpoint(self, cp: Checkpoint) -> bool:
        lease = self._leases.get(cp.epoch)
        try:
            write_checkpoint(self.producer, self.s, cp, self._checkpoint_cb(cp))
        except (BufferError, KafkaException) as exc:
            if isinstance(exc, KafkaException) and exc.args and exc.args[0].fatal():
                self._fatal = True
            if lease is not None:
                lease.on_failure(cp.ceiling)
            self._say("checkpoint", logging.WARNING, "checkpoint not written yet: %s", exc or "queue full")
            return False
        self._last_cp[cp.epoch] = self._last_written = cp
        return True

    def _checkpoint_cb(self, cp: Checkpoint) -> Callable[[KafkaError | None, Message], None]:
        gen = self._gen

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            try:
                lease = self._leases.get(cp.epoch)
                if lease is None:
                    return
                if err is None and gen == self._gen:
                    lease.on_ack(cp.ceiling)
                    tracker = self.tracker
                    if tracker is not None and tracker.epoch == cp.epoch:
                        M.ceiling.set(lease.acked)
                    return
                lease.on_failure(cp.ceiling)
                if self._last_written == cp:
                    self._last_written = None  # write it again at the next interval
                if err is not None and err.code() not in PURGED:
                    M.delivery_errors.inc()
                    self._fatal = self._fatal or err.fatal()
                    self._say("checkpoint-failed", logging.ERROR, "checkpoint write failed: %s", err)
            except Exception:
                M.loop_errors.inc()

        return on_delivery
