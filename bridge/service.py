"""The bridge: engine feed (ZeroMQ PULL) -> Kafka topics, with no seq lost.

Per feed message: validate the frames and the Avro payload (anything bad goes
to the dead-letter topic with a reason, the bridge never crashes on input),
drop a seq it already has, produce it keyed by user_id with ``epoch``/``seq``
headers, and count Kafka's acknowledgements to advance the watermark. Holes
(a jump in the seqs, or a heartbeat ahead of what arrived) are filled from the
engine's replay service, through the same path. The watermark is checkpointed
so a restarted bridge resumes from it (see ``bridge.kafka``).

Backpressure: while more than ``max_in_flight`` records are unacknowledged
(Kafka slow or away) the bridge stops reading the feed; ZeroMQ and then the
engine's feed drop what does not fit, and the bridge replays it from the
journal once Kafka is back. Memory stays bounded by that limit.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq
from confluent_kafka import KafkaError, Message

from bridge.errors import BridgeError
from bridge.kafka import ensure_topics, make_producer, read_checkpoint, write_checkpoint
from bridge.metrics import M
from bridge.settings import BridgeSettings
from bridge.tracker import Hole, SeqTracker
from engine.events import EventType, OrderUpdate, Trade
from engine.wire import HEARTBEAT, WireError, WireHeader, unpack
from schemas.codec import CodecError, decode
from schemas.registry import Registry

__all__ = ["Bridge"]

log = logging.getLogger("ohs.bridge")
_QQ = struct.Struct(">QQ")
_QQQ = struct.Struct(">QQQ")


class Bridge:
    def __init__(self, settings: BridgeSettings) -> None:
        self.s = settings
        self._topics = {
            EventType.ORDER_UPDATE: settings.topic_updates,
            EventType.TRADE: settings.topic_trades,
            EventType.BALANCE_UPDATE: settings.topic_balances,
        }
        ensure_topics(settings)
        self.registry: Registry | None = None
        if settings.schema_registry_url:
            self.registry = Registry(settings.schema_registry_url)
            records = {"OrderUpdate": settings.topic_updates, "Trade": settings.topic_trades}
            records["BalanceUpdate"] = settings.topic_balances
            ids = _with_retries(lambda: _register(self.registry, records))  # type: ignore[arg-type]
            log.info("schema registry %s: subject ids %s", settings.schema_registry_url, ids)
        self.producer = make_producer(settings, self._on_kafka_error)
        checkpoint = _with_retries(lambda: read_checkpoint(settings))
        self.tracker: SeqTracker | None = None
        if checkpoint is not None:
            self.tracker = SeqTracker(epoch=checkpoint[0], watermark=checkpoint[1])
            log.info("resuming from checkpoint epoch=%d watermark=%d", *checkpoint)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.feed = self._ctx.socket(zmq.PULL)
        self.feed.setsockopt(zmq.RCVHWM, 100_000)
        # Several comma-separated endpoints may be given (PULL fair-queues them): the engine's feed
        # and, in tests, an injector of bad input.
        for endpoint in settings.feed_endpoint.split(","):
            self.feed.connect(endpoint.strip())
        self._replay: zmq.Socket[bytes] | None = None
        self._last_checkpoint = (0, 0)
        self._last_loop = time.monotonic()
        self._next_checkpoint = 0.0

    # ------------------------------------------------------------------- loop
    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.step()
        self.close()

    def status(self) -> dict[str, object]:
        """For /health: read from another thread, so only plain attribute reads."""
        tracker = self.tracker
        return {
            "last_loop": self._last_loop,
            "epoch": tracker.epoch if tracker else None,
            "watermark": tracker.watermark if tracker else None,
            "engine_seq": tracker.engine_last if tracker else None,
            "in_flight": tracker.in_flight() if tracker else 0,
        }

    def step(self, poll_ms: int = 50) -> None:
        self._last_loop = time.monotonic()
        tracker = self.tracker
        if tracker is not None and tracker.in_flight() >= self.s.max_in_flight:
            self.producer.poll(0.05)  # backpressure: wait for acks, read nothing
        elif self.feed.poll(poll_ms):
            for _ in range(2_000):
                try:
                    frames = self.feed.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self.handle(frames, replayed=False)
        self.producer.poll(0)
        self._fill_holes()
        self._maybe_checkpoint()

    def close(self) -> None:
        """Graceful stop: everything handed to the producer is acknowledged, checkpoint written."""
        self.producer.flush(60)
        self._maybe_checkpoint(force=True)
        self.producer.flush(30)
        self.feed.close(linger=0)
        if self.registry is not None:
            self.registry.close()
        if self._replay is not None:
            self._replay.close(linger=0)

    # ----------------------------------------------------------------- intake
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
            tracker = self.tracker
            if tracker is None or h.epoch != tracker.epoch:
                # An epoch is adopted from a decoded event, or from a heartbeat the engine's
                # replay service confirms: a garbage frame with a plausible header must not
                # make the bridge abandon its epoch.
                if not self._engine_confirms(h.epoch):
                    return
                tracker = self._tracker_for(h.epoch)
            tracker.heartbeat(h.seq)
            M.engine_seq.set(tracker.engine_last)
            return
        if len(payload) > self.s.max_message_bytes:
            self._dead_letter(frames, "oversized", f"{len(payload)} bytes > {self.s.max_message_bytes}")
            return
        try:
            event = decode(payload)
        except CodecError as exc:
            self._dead_letter(frames, exc.reason, exc.detail)
            return
        if (event.epoch, event.seq, int(_type_of(event))) != (h.epoch, h.seq, h.type):
            self._dead_letter(frames, "header_mismatch", f"header {h} does not describe the payload")
            return
        tracker = self._tracker_for(h.epoch)
        if h.epoch != tracker.epoch:
            return  # an event of an epoch we have left (a stale replay): already handled or moot
        if tracker.is_duplicate(h.seq):
            M.duplicates.inc()
            return
        if replayed:
            M.replayed.inc()
        for ready in tracker.offer(h.seq, (h, payload)):
            self._produce_event(tracker, *ready)  # type: ignore[misc]

    def _produce_event(self, tracker: SeqTracker, h: WireHeader, payload: bytes) -> None:
        headers = [("epoch", str(h.epoch).encode()), ("seq", str(h.seq).encode())]
        topic = self._topics[EventType(h.type)]
        keys = [h.key_user_id]
        if h.type == EventType.TRADE and h.key_user_id_2 != h.key_user_id:
            keys.append(h.key_user_id_2)  # each side's partition gets the trade
        if self.registry is not None:
            # The same Avro body, behind the registry's 5-byte header instead of the 10-byte one.
            payload = self.registry.to_registry(payload)
        tracker.expect(h.seq, len(keys))
        on_ack = self._on_ack(h.epoch, h.seq, time.monotonic())
        for i, key in enumerate(keys):
            side = [("side", b"taker" if i == 0 else b"maker")] if h.type == EventType.TRADE else []
            self._produce(topic, str(key).encode(), payload, headers + side, on_ack)
        M.produced.labels(topic).inc(len(keys))

    def _engine_confirms(self, epoch: int) -> bool:
        sock = self._replay_socket()
        sock.send_multipart([b"INFO"])
        if not sock.poll(self.s.replay_timeout_ms):
            self._drop_replay_socket()
            return False
        frames = sock.recv_multipart()
        return len(frames) == 2 and frames[0] == b"INFO" and _QQ.unpack(frames[1])[0] == epoch

    def _replay_socket(self) -> zmq.Socket[bytes]:
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.connect(self.s.replay_endpoint)
        return self._replay

    def _drop_replay_socket(self) -> None:
        # A late reply on this socket must never be read as the answer to the next request.
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def _tracker_for(self, epoch: int) -> SeqTracker:
        if self.tracker is None or epoch > self.tracker.epoch:
            if self.tracker is not None:
                log.warning(
                    "engine epoch changed %d -> %d: starting the new epoch at seq 1",
                    self.tracker.epoch,
                    epoch,
                )
                self.producer.flush(60)
            self.tracker = SeqTracker(epoch=epoch)
        return self.tracker

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list[Any], cb: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
                return
            except BufferError:
                self.producer.poll(0.1)  # local queue full: Kafka is slow or away; wait, keep order

    def _on_ack(self, epoch: int, seq: int, sent_at: float) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            tracker = self.tracker
            if err is not None:
                # With message.timeout.ms=0 only fatal errors land here; the watermark stays put,
                # so the seq is re-fetched after a restart.
                M.delivery_errors.inc()
                log.error("delivery failed for seq %d: %s", seq, err)
                return
            M.acked.inc()
            M.produce_latency.observe(time.monotonic() - sent_at)
            if tracker is not None and tracker.epoch == epoch:
                tracker.ack(seq)
                M.watermark.set(tracker.watermark)
                M.in_flight.set(tracker.in_flight())

        return on_delivery

    def _dead_letter(self, frames: list[bytes], reason: str, detail: str) -> None:
        M.dead_lettered.labels(reason).inc()
        log.warning("dead-lettering input: %s (%s)", reason, detail[:200])
        # Frames are kept as they came: u32 count, then u32 length + bytes for each frame.
        raw = struct.pack(">I", len(frames)) + b"".join(struct.pack(">I", len(f)) + f for f in frames)
        headers = [("reason", reason.encode()), ("source", b"bridge"), ("detail", detail[:1000].encode())]
        self._produce(self.s.topic_dlq, None, raw[: self.s.max_message_bytes * 2], headers, None)

    def _on_kafka_error(self, err: KafkaError) -> None:
        M.delivery_errors.inc()
        if err.fatal():
            log.critical("fatal producer error: %s", err)
        else:
            log.warning("kafka: %s", err)

    # ------------------------------------------------------------ gap filling
    def _fill_holes(self) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        hole = tracker.hole_to_request(time.monotonic(), self.s.gap_wait_ms / 1000.0, self.s.replay_timeout_ms / 1000.0)
        if hole is None:
            return
        M.gaps.inc()
        log.info("hole in epoch %d: seqs %d..%d; asking the engine to replay", hole.epoch, hole.first, hole.last)
        self._replay_range(hole)

    def _replay_range(self, hole: Hole) -> None:
        sock = self._replay_socket()
        sock.send_multipart([b"REPLAY", _QQQ.pack(hole.epoch, hole.first, hole.last)])
        deadline = time.monotonic() + self.s.replay_timeout_ms / 1000.0
        while time.monotonic() < deadline:
            if not sock.poll(100):
                self.producer.poll(0)
                continue
            frames = sock.recv_multipart()
            kind = frames[0]
            if kind == b"EV" and len(frames) == 3:
                self.handle(frames[1:], replayed=True)
            elif kind == b"END":
                epoch, last = _QQ.unpack(frames[1])
                if self.tracker is not None and epoch == self.tracker.epoch:
                    self.tracker.heartbeat(last)
                return
            elif kind == b"ERR":
                log.error("replay refused: %s", frames[1].decode(errors="replace"))
                return
        log.error("replay service at %s did not answer", self.s.replay_endpoint)
        self._drop_replay_socket()

    # ------------------------------------------------------------- checkpoint
    def _maybe_checkpoint(self, force: bool = False) -> None:
        tracker = self.tracker
        now = time.monotonic()
        if tracker is None or (not force and now < self._next_checkpoint):
            return
        self._next_checkpoint = now + self.s.checkpoint_ms / 1000.0
        state = (tracker.epoch, tracker.watermark)
        if state != self._last_checkpoint:
            write_checkpoint(self.producer, self.s, *state)
            self._last_checkpoint = state


def _with_retries(fn: Callable[[], Any], attempts: int = 30) -> Any:
    """Retry a retriable BridgeError (a just-created topic without a leader yet, a broker restart)."""
    for attempt in range(attempts):
        try:
            return fn()
        except BridgeError as exc:
            if not exc.retriable or attempt == attempts - 1:
                raise
            log.warning("%s; retrying", exc)
            time.sleep(min(0.2 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def _register(registry: Registry, records: dict[str, str]) -> dict[str, int]:
    try:
        return registry.register(records)
    except CodecError as exc:
        raise BridgeError(f"schema registry: {exc}", retriable=exc.reason == "registry_unavailable") from exc


def _type_of(event: object) -> EventType:
    if isinstance(event, OrderUpdate):
        return EventType.ORDER_UPDATE
    if isinstance(event, Trade):
        return EventType.TRADE
    return EventType.BALANCE_UPDATE
