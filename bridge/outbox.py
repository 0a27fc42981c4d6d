"""The bridge's outbox: everything to produce, in order, and what becomes of each record.

One FIFO: an event leaves it once its epoch's ceiling allows (``checkpointing``), the first
checkpoint of a new epoch only after every record of the old one. In steady state it is empty and
records go straight to the producer. Delivery reports advance the watermark; a record Kafka
refuses for good is replaced by a dead letter that stands for its seq, and a dead letter always
fits (cut to the limit, then stripped of its payload). A fatal producer error replaces the
producer and replays from the watermark.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from confluent_kafka import KafkaError, KafkaException, Message

from bridge.checkpointing import Checkpointing
from bridge.deadletter import DeadLetter, dead_letter
from bridge.metrics import M
from bridge.state import (
    ACCOUNT,
    DLQ,
    EVENT,
    MAX_OUTBOX_BYTES,
    OPEN,
    PURGED,
    Headers,
    Out,
    log,
)
from bridge.tracker import SeqTracker
from schemas.wire import WireHeader

__all__ = ["Outbox"]


class Outbox(Checkpointing):
    # ------------------------------------------------------------------ outbox
    def _kafka_backpressured(self) -> bool:
        """Kafka is behind: the producer's queue is full, or ``max_in_flight`` records (or the
        outbox's byte bound) are unacknowledged or waiting. The feed and replays stop being read."""
        return (
            self._blocked
            or len(self.producer) + len(self._outbox) >= self.s.max_in_flight
            or self._outbox_bytes >= MAX_OUTBOX_BYTES
        )

    def _emit(self, out: Out) -> None:
        """Produce now if nothing waits ahead and its ceiling allows, else queue in order."""
        ready = out.kind == DLQ or (out.kind != OPEN and self._ceiling_allows(out))
        if ready and not self._outbox and self._send(out):
            return
        self._outbox.append(out)
        self._outbox_bytes += out.size

    def _ceiling_allows(self, out: Out) -> bool:
        lease = self._leases.get(out.epoch)
        return lease is not None and out.seq <= lease.acked

    def _drain(self) -> None:
        self._blocked = False
        ob = self._outbox
        while ob:
            out = ob[0]
            if out.kind == OPEN:
                if not self._open_epoch(out.epoch):
                    return
            elif out.kind != DLQ and not self._ceiling_allows(out):
                self._need_ceiling(out.epoch, out.seq)
                return
            elif not self._send(out):
                return
            ob.popleft()
            self._outbox_bytes -= out.size
        M.outbox.set(0)

    def _send(self, out: Out) -> bool:
        """Hand ``out``'s remaining records to the producer. False: it must wait at the head (the
        queue is full, or the producer must be replaced); True: done with it here."""
        if out.sent == 0 and out.expect:
            tracker = self.tracker
            if tracker is not None and tracker.epoch == out.epoch:
                tracker.expect(out.seq, len(out.records))
        dlq = self.s.topic_dlq
        cb, cb_kind = None, -1
        while out.sent < len(out.records):
            topic, key, value, headers = out.records[out.sent]
            kind = DLQ if out.kind == DLQ else (ACCOUNT if topic == dlq else EVENT)
            if kind != cb_kind:  # one report callback for both records of a trade
                cb, cb_kind = self._delivery_cb(kind, out.epoch, out.seq), kind
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
            except BufferError:
                # The local queue is full: Kafka is slow or away. Keep the order: wait at the head.
                self._blocked = True
                M.outbox.set(len(self._outbox))
                return False
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.fatal():
                    self._fatal = True
                    return False
                M.delivery_errors.inc()
                self._say("refused", logging.ERROR, "the producer refused a record for %s: %s", topic, exc)
                fallback = self._fallback(kind, out.epoch, out.seq, value, headers, str(exc))
                if fallback == "defer":
                    self._defer(out)
                    return True
                if fallback == "lost":
                    out.sent += 1  # an unaccounted dead letter nothing can carry: counted, lost
                else:
                    out.records[out.sent] = fallback
                continue
            out.sent += 1
        if out.kind == EVENT:
            counter = self._produced.get(out.records[0][0])
            if counter is None:
                counter = self._produced[out.records[0][0]] = M.produced.labels(out.records[0][0])
            counter.inc(len(out.records))
        return True

    def _fallback(
        self, kind: int, epoch: int, seq: int, value: bytes, headers: Headers, why: str
    ) -> tuple[str, bytes | None, bytes, Headers] | Literal["defer", "lost"]:
        """What to produce instead of a record Kafka refused for good: an event's seq stands in the
        DLQ (re-sending it would put it behind later records of its partition, where the worker
        takes it for a duplicate); a dead letter is retried without its payload; a dead letter
        refused even so is retried later if it stands for a seq ("defer"), else counted as lost."""
        if kind == EVENT:
            dl = dead_letter(
                [value], "delivery_failed", why, limit=self.s.max_message_bytes, epoch=epoch, seq=seq, accounted=True
            )
            M.dead_lettered.labels("delivery_failed").inc()
            return (self.s.topic_dlq, None, dl.value, dl.headers)
        if value or not any(k == "truncated" for k, _ in headers):
            small = DeadLetter(value, list(headers)).minimal()
            return (self.s.topic_dlq, None, small.value, small.headers)
        M.dead_letter_failures.inc()
        return "defer" if kind == ACCOUNT else "lost"

    def _defer(self, out: Out) -> None:
        """Try a dead letter that stands for a seq again later, out of the stream's way (only the
        watermark waits for it)."""
        self._deferred.append((time.monotonic() + 5.0, out))

    def _release_deferred(self) -> None:
        if not self._deferred:
            return
        now = time.monotonic()
        due = [o for t, o in self._deferred if t <= now]
        self._deferred = [(t, o) for t, o in self._deferred if t > now]
        for out in due:
            self._outbox.append(out)
            self._outbox_bytes += out.size

    # --------------------------------------------------------------- delivery
    def _delivery_cb(self, kind: int, epoch: int, seq: int) -> Callable[[KafkaError | None, Message], None]:
        gen, sent_at = self._gen, time.monotonic()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            # Runs inside producer.poll(): an exception here would surface from poll() in the loop.
            try:
                if gen != self._gen:
                    return  # a replaced producer's report
                if err is None:
                    M.acked.inc()
                    if kind != DLQ:
                        M.produce_latency.observe(time.monotonic() - sent_at)
                        self._ack(epoch, seq)
                    return
                if err.code() in PURGED:
                    return
                M.delivery_errors.inc()
                if err.fatal():
                    self._fatal = True
                    return
                # With message.timeout.ms=0 only permanent refusals land here (the broker's size
                # limit lower than configured, authorization, an invalid record).
                self._say("delivery", logging.ERROR, "Kafka refused a record of %s (seq %d): %s", msg.topic(), seq, err)
                value, headers = msg.value() or b"", _headers_of(msg)
                fallback = self._fallback(kind, epoch, seq, value, headers, str(err))
                if fallback == "lost":
                    return
                # "defer": the refused record was already the minimal dead letter: the same again, later.
                record = (self.s.topic_dlq, None, value, headers) if fallback == "defer" else fallback
                late = Out(DLQ if kind == DLQ else ACCOUNT, epoch, seq, [record])
                late.expect = False  # the seq's records were counted when it was first produced
                if fallback == "defer":
                    self._defer(late)
                else:
                    self._outbox.append(late)
                    self._outbox_bytes += late.size
            except Exception:
                M.loop_errors.inc()
                self._say("delivery-cb", logging.ERROR, "error in a delivery report (survived)", exc_info=True)

        return on_delivery

    def _ack(self, epoch: int, seq: int) -> None:
        tracker = self.tracker
        if tracker is not None and tracker.epoch == epoch:
            tracker.ack(seq)
            M.watermark.set(tracker.watermark)
            M.in_flight.set(tracker.in_flight())

    def _on_kafka_error(self, err: KafkaError) -> None:
        try:
            M.delivery_errors.inc()
            if err.fatal():
                log.critical("fatal producer error: %s (the producer will be replaced)", err)
                self._fatal = True
            else:
                self._say(f"kafka-{err.code()}", logging.WARNING, "kafka: %s", err)
        except Exception:
            M.loop_errors.inc()

    def _reset_producer(self) -> None:
        """After a fatal producer error: a new producer, and everything above the acknowledged
        watermark handed over again (replayed from the engine). Nothing acknowledged is lost;
        dead letters still in the old producer's queue are counted as lost."""
        M.producer_resets.inc()
        old, self._gen = self.producer, self._gen + 1
        try:
            lost = len(old)
            old.purge()
            old.poll(0)
        except Exception:
            lost = -1
        log.error("replacing the producer after a fatal error (%d records dropped from its queue)", lost)
        self.producer = self.kafka.make_producer(self._on_kafka_error)
        self._fatal = False
        tracker = self.tracker
        if tracker is not None:
            fresh = SeqTracker(epoch=tracker.epoch, watermark=tracker.watermark)
            fresh.heartbeat(tracker.engine_last)
            self.tracker = fresh
        current = tracker.epoch if tracker is not None else None
        keep: deque[Out] = deque()
        for out in self._outbox:
            if out.kind in (DLQ, OPEN):
                out.sent = 0
                keep.append(out)
            elif out.epoch != current:
                keep.append(self._as_dead_letter(out, "epoch_closed", "dropped by a producer reset"))
            # else: above the watermark of the current epoch, replayed from the engine
        self._outbox = keep
        self._outbox_bytes = sum(o.size for o in keep)
        self._deferred = [(t, o) for t, o in self._deferred if o.epoch != current]
        for lease in self._leases.values():
            lease.requested = lease.acked
        self._last_written = None

    # -------------------------------------------------------------- dead letters
    def _dead_letter(self, frames: list[bytes], reason: str, detail: str, h: WireHeader | None = None) -> None:
        """Dead-letter an input that does not stand for a seq."""
        M.dead_lettered.labels(reason).inc()
        self._say(f"dlq-{reason}", logging.WARNING, "dead-lettering input: %s (%s)", reason, detail[:200])
        dl = dead_letter(
            frames,
            reason,
            detail,
            limit=self.s.max_message_bytes,
            epoch=h.epoch if h else None,
            seq=h.seq if h else None,
        )
        self._emit(Out(DLQ, 0, 0, [(self.s.topic_dlq, None, dl.value, dl.headers)]))

    def _as_dead_letter(self, out: Out, reason: str, detail: str) -> Out:
        frames = out.frames or [out.records[0][2]]
        M.dead_lettered.labels(reason).inc()
        dl = dead_letter(frames, reason, detail, limit=self.s.max_message_bytes, epoch=out.epoch, seq=out.seq)
        return Out(DLQ, 0, 0, [(self.s.topic_dlq, None, dl.value, dl.headers)])

    def _dead_letter_out(self, item: object, reason: str, detail: str) -> None:
        if isinstance(item, Out):
            self._say(f"dlq-{reason}", logging.WARNING, "dead-lettering seq %d: %s (%s)", item.seq, reason, detail)
            self._emit(self._as_dead_letter(item, reason, detail))


def _headers_of(msg: Message) -> Headers:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v if isinstance(v, bytes) else str(v or "").encode()) for k, v in pairs]
