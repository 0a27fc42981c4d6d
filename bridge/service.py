"""The bridge: engine feed (ZeroMQ SUB) -> Kafka topics, with no seq lost.

The engine's feed is a PUB socket: every bridge (and any other subscriber) gets every event,
and each keeps its own topics, checkpoint and replays; none slows the engine or the others. A
feed message is a batch of entries (``schemas.wire``; a two-frame ``[header, payload]`` message is
one event). Per event: validate the header and the Avro payload (anything bad goes to the
dead-letter topic with a reason: the bridge never crashes on input), drop a seq it already
has, produce it keyed by user_id with ``epoch``/``seq`` headers, and count Kafka's
acknowledgements to advance the watermark. Holes (a jump in the seqs, or a heartbeat ahead of
what arrived) are filled from the engine's replay service, through the same path: what the PUB
socket dropped for this bridge (it read too slowly, or was not subscribed yet: PUB/SUB's slow
joiner), and everything after its checkpoint when it starts. The watermark and the seq ceiling
are checkpointed (``schemas.checkpoint`` states the protocol) so a restarted bridge resumes from it.

Trust. The feed is best effort and anyone who can reach the engine's feed, or publish to the
bridge's SUB socket, can write to it; the replay service is the engine answering the bridge's own
requests. So:

* An epoch is followed only when the replay service confirms it (``INFO``), for events and
  heartbeats alike. An event of an epoch the engine does not confirm is dead-lettered
  (``unconfirmed_epoch``); one of an older epoch is counted as a duplicate only if that epoch's
  seq was already handed to the producer, else dead-lettered (``stale_epoch``).
* An early seq held above a hole that the replay service says the engine never emitted is
  dead-lettered (``beyond_engine_seq``) when the hole's replay ends.
* A seq that cannot be published stands in the log as one dead letter with ``accounted: 1``
  and the watermark passes it once that record is acknowledged: an event too large for the
  broker (``oversized_event``, from the feed if it decodes and matches its header, or from the
  replay service), the engine's UNPUBLISHABLE marker (``unpublishable_event``), anything the
  replay service sends for a requested seq that is not a valid event, and an event record the
  broker refused (``delivery_failed``). Bad frames from the feed are dead-lettered without
  taking a seq: the replay service answers for that seq.
* Only two drops have no dead letter, because nothing is lost by them: a true duplicate (a seq
  already handed to the producer) and a heartbeat of an epoch that is not confirmed (it holds
  no event); both are counted.

Order and the ceiling. Everything to produce goes through one FIFO outbox: a record of epoch E
and seq s leaves it only once a checkpoint of E with ceiling >= s is acknowledged, and the first
checkpoint of a new epoch leaves it only after every record of the old one. In steady state the
outbox is empty and records go straight to the producer.

Backpressure: while ``max_in_flight`` records are unacknowledged or waiting, the producer
refuses more (BufferError), or ``max_pending`` early seqs wait above a hole, the bridge stops
reading the feed; ZeroMQ and then the engine's feed drop what does not fit, and the bridge
replays it from the journal once Kafka is back. Memory stays bounded.

Failures. ``start`` retries Kafka with jittered back-off until it answers (``/health`` says
503 ``starting`` meanwhile). In ``step``, no input and no Kafka error raises: producer errors
are handled where they are reported, a fatal producer error replaces the producer and replays
from the watermark, and any unexpected exception is logged, counted and survived.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import zmq
from confluent_kafka import KafkaError, KafkaException, Message
from tenacity import RetryCallState

from bridge.deadletter import MAX_MARKER_DETAIL, DeadLetter, dead_letter
from bridge.errors import BridgeError, BridgeUnavailable
from bridge.kafka import KafkaIO, write_checkpoint
from bridge.metrics import M
from bridge.settings import BridgeSettings
from bridge.tracker import Hole, SeqTracker
from kit.retry import is_retriable, retrying_sync
from schemas.checkpoint import CeilingLease, Checkpoint
from schemas.codec import CodecError, decode
from schemas.events import BalanceUpdate, EventType, OrderUpdate, Trade
from schemas.registry import Registry
from schemas.wire import HEARTBEAT, UNPUBLISHABLE, WireError, WireHeader, parse_marker, split_batch, unpack

__all__ = ["Bridge"]

log = logging.getLogger("ohs.bridge")
_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")

_RESERVED = 4096
"""Bytes of ``max_message_bytes`` kept for an event record's key, headers and framing."""
_MAX_OUTBOX_BYTES = 256 * 1024 * 1024
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}

# Outbox entry kinds: an event, a dead letter standing for a seq, any other dead letter, and
# the first checkpoint of a new epoch.
_EVENT, _ACCOUNT, _DLQ, _OPEN = 0, 1, 2, 3

Headers = list[tuple[str, bytes]]


class _Out:
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


class _NeverStarted(Exception):
    """close() before start() connected: nothing to flush."""


class _RateLimited:
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


class Bridge:
    def __init__(
        self,
        settings: BridgeSettings,
        kafka: KafkaIO | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """No I/O here: ``start`` connects (so /health can answer while Kafka is away)."""
        self.s = settings
        self.kafka = kafka or KafkaIO(settings)
        self._topics = {
            EventType.ORDER_UPDATE: settings.topic_updates,
            EventType.TRADE: settings.topic_trades,
            EventType.BALANCE_UPDATE: settings.topic_balances,
        }
        self._max_payload = settings.max_message_bytes - _RESERVED
        self.phase = "starting"
        self.registry: Registry | None = None
        self.producer: Any = None
        self.tracker: SeqTracker | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context.instance()
        self.feed: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self._info_sock: zmq.Socket[bytes] | None = None
        self._info: tuple[int, int] | None = None
        self._info_at = -1e9
        self._replay_req: Hole | None = None
        self._outbox: deque[_Out] = deque()
        self._outbox_bytes = 0
        self._deferred: list[tuple[float, _Out]] = []
        self._blocked = False
        self._fatal = False
        self._gen = 0
        self._leases: dict[int, CeilingLease] = {}
        self._last_cp: dict[int, Checkpoint] = {}
        self._last_written: Checkpoint | None = None
        self._opening: int | None = None
        self._closed: dict[int, int] = {}
        """Epochs left behind -> the highest seq handed to the producer in them."""
        self._last_loop = time.monotonic()
        self._next_checkpoint = 0.0
        self._say = _RateLimited()
        self._epoch_bytes: dict[int, bytes] = {}
        self._produced: dict[str, Any] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Connect to Kafka (topics, schema registry, checkpoint, producer), retrying with jittered
        back-off for as long as it takes; False if asked to stop first. A refusal that waiting
        cannot fix (a setting the broker rejects) raises BridgeError."""

        def retriable(exc: BaseException) -> bool:  # librdkafka's errors at start: worth waiting out
            return isinstance(exc, KafkaException) or is_retriable(exc)

        def nap(seconds: float) -> None:  # the back-off, cut short by a stop
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not should_stop():
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

        def say(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("cannot start (attempt %d): %s; retrying in %.1f s", state.attempt_number, exc, wait)

        longest = self.s.connect_backoff_max_ms / 1000.0
        retrier = retrying_sync(min(1.0, longest), longest, retry=retriable, on_retry=say, stop=should_stop, sleep=nap)
        try:
            for attempt in retrier:
                with attempt:
                    if should_stop():
                        return False
                    M.connect_attempts.inc()
                    self._connect()
        except Exception as exc:
            if retriable(exc) and should_stop():
                return False
            raise
        self.phase = "running"
        self._last_loop = time.monotonic()
        n = attempt.retry_state.attempt_number
        if n > 1:
            log.info("connected to Kafka at %s after %d attempts", self.s.kafka_bootstrap, n)
        return True

    def _connect(self) -> None:
        s = self.s
        self.kafka.ensure_topics()
        if s.schema_registry_url and self.registry is None:
            registry = Registry(s.schema_registry_url)
            records = {"OrderUpdate": s.topic_updates, "Trade": s.topic_trades, "BalanceUpdate": s.topic_balances}
            try:
                ids = registry.register(records)
            except CodecError as exc:
                registry.close()
                cls = BridgeUnavailable if exc.retriable else BridgeError
                raise cls(f"schema registry: {exc}") from exc
            self.registry = registry
            log.info("schema registry %s: subject ids %s", s.schema_registry_url, ids)
        checkpoint = self.kafka.read_checkpoint()
        self.producer = self.kafka.make_producer(self._on_kafka_error)
        if checkpoint is not None:
            self.tracker = SeqTracker(epoch=checkpoint.epoch, watermark=checkpoint.watermark)
            self._leases[checkpoint.epoch] = CeilingLease(s.ceiling_lease, acked=checkpoint.ceiling)
            self._last_cp[checkpoint.epoch] = self._last_written = checkpoint
            M.watermark.set(checkpoint.watermark)
            M.ceiling.set(checkpoint.ceiling)
            log.info(
                "resuming from checkpoint epoch=%d watermark=%d ceiling=%d",
                checkpoint.epoch,
                checkpoint.watermark,
                checkpoint.ceiling,
            )
        self.feed = self._ctx.socket(zmq.SUB)
        # Messages are batches of up to ~64 KiB: this bounds what waits here, the engine's PUB
        # socket queues as much again for this bridge and drops the rest (replayed).
        self.feed.setsockopt(zmq.RCVHWM, s.feed_rcvhwm)
        # A frame larger than this makes ZeroMQ drop that peer's connection instead of buffering
        # it: hostile input cannot take the memory; a genuine event is then replayed.
        self.feed.setsockopt(zmq.MAXMSGSIZE, s.max_frame_bytes)
        self.feed.setsockopt(zmq.SUBSCRIBE, b"")
        # Several comma-separated endpoints may be given (SUB fair-queues them): the engine's feed
        # and, in tests, an injector of bad input.
        for endpoint in s.feed_endpoint.split(","):
            self.feed.connect(endpoint.strip())

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.step()
        self.close()

    def status(self) -> dict[str, object]:
        """For /health: read from another thread, so only plain attribute reads."""
        tracker = self.tracker
        lease = self._leases.get(tracker.epoch) if tracker else None
        return {
            "phase": self.phase,
            "last_loop": self._last_loop,
            "epoch": tracker.epoch if tracker else None,
            "watermark": tracker.watermark if tracker else None,
            "ceiling": lease.acked if lease else None,
            "engine_seq": tracker.engine_last if tracker else None,
            "in_flight": tracker.in_flight() if tracker else 0,
            "waiting": len(self._outbox),
        }

    def close(self) -> None:
        """Graceful stop: hand over what waits, wait for the acknowledgements, write the checkpoint."""
        self.phase = "stopping"
        try:
            if self.producer is None:
                raise _NeverStarted
            deadline = time.monotonic() + 20
            while (self._outbox or len(self.producer)) and time.monotonic() < deadline and not self._fatal:
                self._drain()
                self._renew()
                self.producer.poll(0.05)
            self._maybe_checkpoint(force=True)
            self.producer.flush(10)
            if self._outbox:
                log.warning("stopping with %d records not handed to Kafka (replayed at restart)", len(self._outbox))
        except _NeverStarted:
            pass
        except Exception:
            log.exception("while stopping")
        for sock in (self.feed, self._replay, self._info_sock):
            if sock is not None:
                sock.close(linger=0)
        if self.registry is not None:
            self.registry.close()

    # ------------------------------------------------------------------- loop
    def step(self, poll_ms: int = 50) -> None:
        """One turn of the loop; never raises (the last line of defence logs and counts)."""
        self._last_loop = time.monotonic()
        try:
            self._step(poll_ms)
        except Exception:
            M.loop_errors.inc()
            self._say("loop", logging.ERROR, "unexpected error in the bridge loop (survived)", exc_info=True)
            time.sleep(0.05)

    def _step(self, poll_ms: int) -> None:
        if self._fatal:
            self._reset_producer()
        producer = self.producer
        producer.poll(0)
        self._release_deferred()
        self._drain()
        if self._backpressured():
            producer.poll(0.05)  # wait for acks, read nothing
        elif self.feed is not None and self.feed.poll(poll_ms):
            for i in range(500):
                try:
                    frames = self.feed.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                if len(frames) == 1:
                    self._handle_batch(frames[0], replayed=False)
                else:
                    self._handle_safely(frames, replayed=False)
                if i % 8 == 7 and self._backpressured():
                    break
        self._renew()
        self._drain()
        producer.poll(0)
        if not self._kafka_backpressured():
            self._fill_holes()  # also (above all) while too many early seqs wait above a hole
        self._maybe_checkpoint()

    def _backpressured(self) -> bool:
        """Stop reading the feed: Kafka is behind, or too many early seqs wait above a hole."""
        t = self.tracker
        return self._kafka_backpressured() or (t is not None and len(t.pending) >= self.s.max_pending)

    def _kafka_backpressured(self) -> bool:
        return (
            self._blocked
            or len(self.producer) + len(self._outbox) >= self.s.max_in_flight
            or self._outbox_bytes >= _MAX_OUTBOX_BYTES
        )

    # ----------------------------------------------------------------- intake
    def _handle_batch(self, message: bytes, *, replayed: bool) -> None:
        """Every event of a batch message, in order; what follows a malformed spot is dead-lettered
        whole (the seqs it would have held are found missing and replayed)."""
        entries, problem = split_batch(message)
        for header, payload in entries:
            self._handle_safely([header, payload], replayed=replayed)
        if problem:
            M.received.inc()
            consumed = sum(4 + len(h) + len(p) for h, p in entries)
            self._dead_letter([message[consumed:]], "bad_batch", problem)

    def _handle_safely(self, frames: list[bytes], *, replayed: bool) -> None:
        try:
            self.handle(frames, replayed=replayed)
        except Exception as exc:
            M.loop_errors.inc()
            self._say("handle", logging.ERROR, "error handling an input (dead-lettered)", exc_info=True)
            try:
                self._dead_letter(frames, "bridge_error", f"{type(exc).__name__}: {exc}")
            except Exception:
                self._say("handle-dlq", logging.ERROR, "could not dead-letter an input", exc_info=True)

    def handle(self, frames: list[bytes], *, replayed: bool) -> None:
        M.received.inc()
        if len(frames) != 2:
            self._dead_letter(frames, "bad_frame_count", f"{len(frames)} frames, want 2")
            return
        header_frame, payload = frames
        try:
            h = unpack(header_frame)
        except WireError as exc:
            self._dead_letter(frames, exc.reason, str(exc))
            return
        if h.type == HEARTBEAT:
            self._on_heartbeat(h, frames)
            return
        if h.seq == 0:  # seqs start at 1: not a duplicate of anything
            self._dead_letter(frames, "bad_seq", "seq 0", h)
            return
        # What the replay service sends for a seq the bridge asked for is the engine's word on it:
        # if it is not a valid event, the seq is dead-lettered and counted as done.
        req = self._replay_req if replayed else None
        authoritative = req is not None and h.epoch == req.epoch and req.first <= h.seq <= req.last
        if h.type == UNPUBLISHABLE:
            problem, detail = _check_marker(h, payload)
            if problem and not authoritative:
                self._dead_letter(frames, "bad_marker", problem, h)
                return
            out = self._accounted(frames, h, "unpublishable_event", detail or problem, detail_cap=MAX_MARKER_DETAIL)
        else:
            validated = self._validate(frames, h, payload, authoritative)
            if validated is None:
                return
            out = validated
        tracker = self._gate(h, frames)
        if tracker is None:
            return
        if tracker.is_duplicate(h.seq):
            M.duplicates.inc()
            return
        if replayed:
            M.replayed.inc()
        for ready in tracker.offer(h.seq, out):
            self._emit(ready)  # type: ignore[arg-type]

    def _validate(self, frames: list[bytes], h: WireHeader, payload: bytes, authoritative: bool) -> _Out | None:
        """The event's outbox entry; or a dead letter that stands for its seq; or None (dead-lettered)."""
        oversized = len(payload) > self._max_payload
        problem: tuple[str, str] | None = None
        try:
            event = decode(payload)
            if event.seq != h.seq or event.epoch != h.epoch or _TYPE_OF.get(type(event)) != h.type:
                problem = ("header_mismatch", f"header {h} does not describe the payload")
            elif self.registry is not None and not oversized:
                # The same Avro body, behind the registry's 5-byte header instead of the 10-byte one.
                payload = self.registry.to_registry(payload)
        except CodecError as exc:
            problem = ("oversized", f"{len(payload)} bytes; {exc}") if oversized else (exc.reason, exc.detail)
        if problem is not None:
            if authoritative:
                return self._accounted(frames, h, *problem)
            self._dead_letter(frames, *problem, h)
            return None
        if oversized:
            detail = f"{len(payload)} bytes > {self._max_payload} (max_message_bytes less {_RESERVED} for framing)"
            return self._accounted(frames, h, "oversized_event", detail)
        epoch_bytes = self._epoch_bytes.get(h.epoch)
        if epoch_bytes is None:
            self._epoch_bytes = {h.epoch: (epoch_bytes := str(h.epoch).encode())}
        headers = [("epoch", epoch_bytes), ("seq", str(h.seq).encode())]
        topic = self._topics[EventType(h.type)]
        records: list[tuple[str, bytes | None, bytes, Headers]]
        if h.type == EventType.TRADE:
            records = [(topic, str(h.key_user_id).encode(), payload, [*headers, ("side", b"taker")])]
            if h.key_user_id_2 != h.key_user_id:  # each side's partition gets the trade
                records.append((topic, str(h.key_user_id_2).encode(), payload, [*headers, ("side", b"maker")]))
        else:
            records = [(topic, str(h.key_user_id).encode(), payload, headers)]
        return _Out(_EVENT, h.epoch, h.seq, records, frames)

    def _accounted(self, frames: list[bytes], h: WireHeader, reason: str, detail: str, detail_cap: int = 1000) -> _Out:
        dl = dead_letter(
            frames,
            reason,
            detail,
            limit=self.s.max_message_bytes,
            epoch=h.epoch,
            seq=h.seq,
            accounted=True,
            detail_cap=detail_cap,
        )
        return _Out(_ACCOUNT, h.epoch, h.seq, [(self.s.topic_dlq, None, dl.value, dl.headers)], frames)

    def _on_heartbeat(self, h: WireHeader, frames: list[bytes]) -> None:
        if frames[1]:
            self._dead_letter(frames, "bad_heartbeat", f"a heartbeat with a {len(frames[1])}-byte payload", h)
            return
        tracker = self.tracker
        if tracker is None or h.epoch != tracker.epoch:
            # Adopting an epoch needs the replay service's word: a garbage frame with a plausible
            # header must not make the bridge abandon its epoch. A heartbeat holds no event, so
            # one that is not confirmed is only counted.
            if (tracker is not None and h.epoch < tracker.epoch) or self._engine_epoch() != h.epoch:
                M.ignored_heartbeats.inc()
                return
            tracker = self._switch(h.epoch)
        tracker.heartbeat(h.seq)
        M.engine_seq.set(tracker.engine_last)

    def _gate(self, h: WireHeader, frames: list[bytes]) -> SeqTracker | None:
        """The tracker of the event's epoch, following a confirmed new epoch; None if the event was
        dealt with here (a duplicate of a left epoch, or dead-lettered)."""
        tracker = self.tracker
        if tracker is not None and h.epoch == tracker.epoch:
            return tracker
        if tracker is not None and h.epoch < tracker.epoch:
            done = self._closed.get(h.epoch)
            if done is not None and h.seq <= done:
                M.duplicates.inc()  # a stale re-send of a seq that was handed to the producer
                return None
            self._dead_letter(frames, "stale_epoch", f"epoch {h.epoch} is older than the current {tracker.epoch}", h)
            return None
        engine_epoch = self._engine_epoch()
        if engine_epoch != h.epoch:
            said = "no answer" if engine_epoch is None else f"epoch {engine_epoch}"
            self._dead_letter(frames, "unconfirmed_epoch", f"epoch {h.epoch}: the replay service says {said}", h)
            return None
        return self._switch(h.epoch)

    def _switch(self, epoch: int) -> SeqTracker:
        old = self.tracker
        if old is not None:
            log.warning(
                "engine epoch changed %d -> %d (confirmed by the replay service): starting the new epoch at seq 1; "
                "epoch %d ends with seqs up to %d handed over (the engine had said %d)",
                old.epoch,
                epoch,
                old.epoch,
                old.received,
                old.engine_last,
            )
            self._closed[old.epoch] = old.received
            while len(self._closed) > 16:
                del self._closed[min(self._closed)]
            # Early seqs of the old epoch can never be released: the hole below them is gone.
            for _, item in old.take_pending():
                self._dead_letter_out(item, "epoch_closed", f"epoch {old.epoch} ended before the hole below it filled")
        self.tracker = SeqTracker(epoch=epoch)
        self._leases[epoch] = CeilingLease(self.s.ceiling_lease)
        # The new epoch's first checkpoint goes after everything of the old one, in the outbox.
        self._opening = epoch
        self._emit(_Out(_OPEN, epoch, 0, []))
        M.watermark.set(0)
        return self.tracker

    # ------------------------------------------------------ the replay service
    def _engine_epoch(self, fresh: bool = False) -> int | None:
        """The engine's epoch per its replay service (INFO), reused for ``epoch_check_ms``."""
        info = self._engine_info(fresh)
        return None if info is None else info[0]

    def _engine_info(self, fresh: bool = False) -> tuple[int, int] | None:
        now = time.monotonic()
        # An unanswered INFO is not asked again for a while: a flood of foreign-epoch frames while
        # the engine is away must not block the loop on one timeout each.
        reuse = self.s.epoch_check_ms / 1000.0 * (1 if self._info is not None else 5)
        if not fresh and now - self._info_at < reuse:
            return self._info
        self._info_at = now
        self._info = None
        if self._info_sock is None:
            self._info_sock = self._ctx.socket(zmq.DEALER)
            self._info_sock.setsockopt(zmq.LINGER, 0)
            self._info_sock.connect(self.s.replay_endpoint)
        sock = self._info_sock
        # If nothing can be queued, the poll below times out and the socket is replaced.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([b"INFO"], zmq.NOBLOCK)
        if sock.poll(self.s.replay_timeout_ms):
            frames = sock.recv_multipart()
            if len(frames) == 2 and frames[0] == b"INFO" and len(frames[1]) == _QQ.size:
                epoch, last = _QQ.unpack(frames[1])
                self._info = (epoch, last)
                return self._info
            self._say("info", logging.ERROR, "the replay service answered INFO with %d unexpected frames", len(frames))
        # A late reply on this socket must never be read as the answer to the next request.
        sock.close(linger=0)
        self._info_sock = None
        return None

    def _replay_socket(self) -> zmq.Socket[bytes]:
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.connect(self.s.replay_endpoint)
        return self._replay

    def _drop_replay_socket(self) -> None:
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def _fill_holes(self) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        hole = tracker.hole_to_request(time.monotonic(), self.s.gap_wait_ms / 1000.0, self.s.replay_timeout_ms / 1000.0)
        if hole is None:
            return
        M.gaps.inc()
        log.info("hole in epoch %d: seqs %d..%d; asking the engine to replay", hole.epoch, hole.first, hole.last)
        self._replay_req = hole
        try:
            self._replay_range(hole)
        finally:
            self._replay_req = None

    def _replay_range(self, hole: Hole) -> None:
        sock = self._replay_socket()
        try:
            sock.send_multipart([b"REPLAY", _QQQ.pack(hole.epoch, hole.first, hole.last)], zmq.NOBLOCK)
        except zmq.Again:
            self._drop_replay_socket()
            return
        # The engine may stream a long range in chunks between its other work: the timeout runs
        # from the last frame received (bounded overall so the loop always comes back).
        timeout = self.s.replay_timeout_ms / 1000.0
        now = time.monotonic()
        deadline, give_up, received = now + timeout, now + max(10 * timeout, 60.0), 0
        while (now := time.monotonic()) < min(deadline, give_up):
            self._last_loop = now
            if not sock.poll(100):
                self.producer.poll(0)
                continue
            frames = sock.recv_multipart()
            deadline = time.monotonic() + timeout
            kind = frames[0]
            if kind in (b"EVS", b"EV") and len(frames) == (2 if kind == b"EVS" else 3):
                if kind == b"EVS":
                    self._handle_batch(frames[1], replayed=True)
                else:  # one event per message, as an older engine replied
                    self._handle_safely(frames[1:], replayed=True)
                received += 1
                if received % 8 == 0:
                    self.producer.poll(0)  # acknowledgements and the producer's queue keep moving
                    self._renew()
                    self._drain()
                continue
            if kind == b"END" and len(frames) == 2 and len(frames[1]) == _QQ.size:
                epoch, last = _QQ.unpack(frames[1])
                self._replay_ended(epoch, last)
                return
            if kind == b"ERR":
                why = frames[1][:200].decode(errors="replace") if len(frames) > 1 else ""
                self._say("replay-err", logging.ERROR, "replay of %d..%d refused: %s", hole.first, hole.last, why)
                if why.startswith("epoch_mismatch"):
                    self._follow_engine()
                return
            self._dead_letter(frames, "bad_replay_reply", f"{len(frames)} frames starting {kind[:20]!r}")
            self._drop_replay_socket()
            return
        self._say("replay-timeout", logging.ERROR, "replay service at %s did not answer", self.s.replay_endpoint)
        self._drop_replay_socket()

    def _replay_ended(self, epoch: int, last: int) -> None:
        tracker = self.tracker
        if tracker is None or epoch != tracker.epoch:
            return
        tracker.heartbeat(last)
        if max(tracker.pending, default=0) <= last and tracker.engine_last <= last:
            return
        # Seqs wait above the engine's last seq, or a heartbeat claimed more than it has: ask the
        # engine itself. Everything pending was received before this INFO is sent, so a genuine
        # one is at or below the last seq it reports.
        info = self._engine_info(fresh=True)
        if info is None or info[0] != tracker.epoch:
            return
        for seq, item in tracker.engine_is_at(info[1]):
            self._dead_letter_out(item, "beyond_engine_seq", f"seq {seq}: the engine's last seq is {info[1]}")
        M.engine_seq.set(tracker.engine_last)

    def _follow_engine(self) -> None:
        """The replay service says it is in another epoch: follow it if it is newer."""
        epoch = self._engine_epoch(fresh=True)
        if epoch is not None and (self.tracker is None or epoch > self.tracker.epoch):
            self._switch(epoch)

    # ------------------------------------------------------------------ outbox
    def _emit(self, out: _Out) -> None:
        """Produce now if nothing waits ahead and its ceiling allows, else queue in order."""
        ready = out.kind == _DLQ or (out.kind != _OPEN and self._ceiling_allows(out))
        if ready and not self._outbox and self._send(out):
            return
        self._outbox.append(out)
        self._outbox_bytes += out.size

    def _ceiling_allows(self, out: _Out) -> bool:
        lease = self._leases.get(out.epoch)
        return lease is not None and out.seq <= lease.acked

    def _drain(self) -> None:
        self._blocked = False
        ob = self._outbox
        while ob:
            out = ob[0]
            if out.kind == _OPEN:
                if not self._open_epoch(out.epoch):
                    return
            elif out.kind != _DLQ and not self._ceiling_allows(out):
                self._need_ceiling(out.epoch, out.seq)
                return
            elif not self._send(out):
                return
            ob.popleft()
            self._outbox_bytes -= out.size
        M.outbox.set(0)

    def _send(self, out: _Out) -> bool:
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
            kind = _DLQ if out.kind == _DLQ else (_ACCOUNT if topic == dlq else _EVENT)
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
        if out.kind == _EVENT:
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
        if kind == _EVENT:
            dl = dead_letter(
                [value], "delivery_failed", why, limit=self.s.max_message_bytes, epoch=epoch, seq=seq, accounted=True
            )
            M.dead_lettered.labels("delivery_failed").inc()
            return (self.s.topic_dlq, None, dl.value, dl.headers)
        if value or not any(k == "truncated" for k, _ in headers):
            small = DeadLetter(value, list(headers)).minimal()
            return (self.s.topic_dlq, None, small.value, small.headers)
        M.dead_letter_failures.inc()
        return "defer" if kind == _ACCOUNT else "lost"

    def _defer(self, out: _Out) -> None:
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
                    if kind != _DLQ:
                        M.produce_latency.observe(time.monotonic() - sent_at)
                        self._ack(epoch, seq)
                    return
                if err.code() in _PURGED:
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
                late = _Out(_DLQ if kind == _DLQ else _ACCOUNT, epoch, seq, [record])
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
        keep: deque[_Out] = deque()
        for out in self._outbox:
            if out.kind in (_DLQ, _OPEN):
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
        self._emit(_Out(_DLQ, 0, 0, [(self.s.topic_dlq, None, dl.value, dl.headers)]))

    def _as_dead_letter(self, out: _Out, reason: str, detail: str) -> _Out:
        frames = out.frames or [out.records[0][2]]
        M.dead_lettered.labels(reason).inc()
        dl = dead_letter(frames, reason, detail, limit=self.s.max_message_bytes, epoch=out.epoch, seq=out.seq)
        return _Out(_DLQ, 0, 0, [(self.s.topic_dlq, None, dl.value, dl.headers)])

    def _dead_letter_out(self, item: object, reason: str, detail: str) -> None:
        if isinstance(item, _Out):
            self._say(f"dlq-{reason}", logging.WARNING, "dead-lettering seq %d: %s (%s)", item.seq, reason, detail)
            self._emit(self._as_dead_letter(item, reason, detail))

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
                if err is not None and err.code() not in _PURGED:
                    M.delivery_errors.inc()
                    self._fatal = self._fatal or err.fatal()
                    self._say("checkpoint-failed", logging.ERROR, "checkpoint write failed: %s", err)
            except Exception:
                M.loop_errors.inc()

        return on_delivery


def _headers_of(msg: Message) -> Headers:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v if isinstance(v, bytes) else str(v or "").encode()) for k, v in pairs]


def _check_marker(h: WireHeader, payload: bytes) -> tuple[str, str]:
    """(problem or "", the marker's compact JSON or a description of what came)."""
    if h.key_user_id or h.key_user_id_2:
        return f"marker with keys {h.key_user_id}, {h.key_user_id_2} (want 0, 0)", ""
    try:
        # Bounded: at most MARKER_MAX_BYTES, one level deep, measured before the JSON parser runs.
        doc = parse_marker(payload)
    except WireError as exc:
        return f"marker payload: {exc}", ""
    if not isinstance(doc["sha256"], str):
        return "marker field 'sha256' is not a str", ""
    return "", json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


_TYPE_OF: dict[type, int] = {
    OrderUpdate: EventType.ORDER_UPDATE,
    Trade: EventType.TRADE,
    BalanceUpdate: EventType.BALANCE_UPDATE,
}
