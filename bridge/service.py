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

Layout: ``Bridge`` is assembled from one module per concern, each a class in a chain over the
state of ``bridge.state``: ``checkpointing`` <- ``outbox`` <- ``intake`` <- ``engine_link`` <-
this module (lifecycle and the loop).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from confluent_kafka import KafkaException
from tenacity import RetryCallState

from bridge.engine_link import EngineLink
from bridge.errors import BridgeError, BridgeUnavailable
from bridge.kafka import KafkaIO
from bridge.metrics import M
from bridge.settings import BridgeSettings
from bridge.state import (
    RESERVED,
    Out,
    RateLimited,
    log,
)
from bridge.tracker import Hole, SeqTracker
from kit.retry import is_retriable, retrying_sync
from schemas.checkpoint import CeilingLease, Checkpoint
from schemas.codec import CodecError
from schemas.events import EventType
from schemas.registry import Registry

__all__ = ["Bridge"]


class _NeverStarted(Exception):
    """close() before start() connected: nothing to flush."""


class Bridge(EngineLink):
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
        self._max_payload = settings.max_message_bytes - RESERVED
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
        self._outbox: deque[Out] = deque()
        self._outbox_bytes = 0
        self._deferred: list[tuple[float, Out]] = []
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
        self._say = RateLimited()
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
            for _ in range(500):
                try:
                    frames = self.feed.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                if len(frames) == 1:
                    self._handle_batch(frames[0], replayed=False)
                else:
                    self._handle_safely(frames, replayed=False)
                # After every message: the bound is then max_in_flight plus one message's events.
                if self._backpressured():
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
