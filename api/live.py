"""The live tail: the worker's topic, released to subscribers once the worker has made it durable.

One tail per API process. A confluent-kafka consumer with a private group id
and no commits is *assigned* every partition of the updates topic (never
subscribed: it must not join or rebalance any group), starting where the
worker group has committed. It holds each record until the worker group's
committed offset of its partition passes it: the worker commits an offset
only after the batch is written to Cassandra, so a client is never shown an
event that a reload or a resume could not find again.

Why no event is lost across a subscriber's backfill -> live hand-off (see
``api.stream``): the tail reads the committed offsets, *then* takes the set
of subscribed users, *then* hands that user's released events to the loop.
An event released after a subscriber registered is queued for it; one
released before was already durable, so the backfill, which starts after
registering, reads it from Cassandra. The tail never skips a record across
its own restarts either: it resumes at the first record it has not released.

The consumer blocks, so it runs in a thread; events cross to the event loop
in batches through ``loop.call_soon_threadsafe``, and each subscriber has a
bounded queue that the tail never waits on: a subscriber that cannot keep up
is dropped and told to resume with ``from_seq``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from api.models import update_dict
from api.settings import ApiSettings
from engine.events import OrderUpdate
from schemas.codec import CodecError, decode
from schemas.registry import Registry, is_registry_frame

__all__ = ["Hub", "LiveEvent", "Subscriber", "Tail"]

log = logging.getLogger("ohs.api.live")

_RESTART_MAX_S = 10.0
_CONSUME_BATCH = 500


@dataclass(frozen=True, slots=True)
class LiveEvent:
    user_id: int
    epoch: int
    seq: int
    data: dict[str, Any]
    """The OrderUpdate as JSON values (``api.models.update_dict``)."""

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.seq

    @classmethod
    def of(cls, ev: OrderUpdate) -> LiveEvent:
        return cls(ev.user_id, ev.epoch, ev.seq, update_dict(ev))


class Subscriber:
    def __init__(self, user_id: int, queue_size: int) -> None:
        self.user_id = user_id
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(queue_size)
        self.overflowed = asyncio.Event()
        """Set (and the subscriber dropped) when its queue was full: it has missed events."""


class Hub:
    """Subscribers by user. Lives on the event loop: only ``dispatch`` is called from the tail thread,
    and only through ``call_soon_threadsafe``."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subs: dict[int, set[Subscriber]] = {}
        self.users: frozenset[int] = frozenset()
        """Users with a subscriber. Replaced, never mutated, so the tail thread can read it without a lock."""
        self.ready = asyncio.Event()
        """Set once the tail has chosen its start offsets: subscribing before that could miss events."""

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def subscribe(self, user_id: int) -> Subscriber:
        sub = Subscriber(user_id, self.queue_size)
        self._subs.setdefault(user_id, set()).add(sub)
        self.users = frozenset(self._subs)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.user_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.user_id]
            self.users = frozenset(self._subs)

    def dispatch(self, events: list[LiveEvent]) -> None:
        for ev in events:
            for sub in tuple(self._subs.get(ev.user_id, ())):
                try:
                    sub.queue.put_nowait(ev)
                except asyncio.QueueFull:
                    self.unsubscribe(sub)
                    sub.overflowed.set()


def _user_of(key: bytes | None) -> int | None:
    try:
        return int(key) if key is not None else None
    except ValueError:
        return None


class Tail:
    def __init__(self, s: ApiSettings, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.s = s
        self.hub = hub
        self.loop = loop
        self.connected = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next: dict[int, int] = {}
        """Partition -> offset of the first record not yet released; kept across consumer restarts."""
        self._warned_no_commit: set[int] = set()
        self._registry = Registry(s.schema_registry_url) if s.schema_registry_url else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ohs-api-tail", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._session()
                return
            except Exception:
                log.exception("live tail failed; restarting in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _RESTART_MAX_S)

    def _session(self) -> None:
        s = self.s
        admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
        consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap,
                "group.id": f"ohs-api-tail-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                # Only reached when retention removed records the tail had not released yet.
                "auto.offset.reset": "earliest",
            }
        )
        try:
            partitions = self._partitions(admin)
            if partitions is None:
                return
            committed = self._committed(admin, partitions)
            for p in partitions:
                # Where the worker group has no commit, the worker itself starts at the log start
                # (auto_offset_reset=earliest): starting at the end would drop what it processes next.
                self._next.setdefault(p, committed.get(p, OFFSET_BEGINNING))
            tps = {p: TopicPartition(s.topic_updates, p, self._next[p]) for p in partitions}
            consumer.assign(list(tps.values()))
            log.info("live tail: %s, partitions at %s", s.topic_updates, {p: tp.offset for p, tp in tps.items()})
            self.connected = True
            self.loop.call_soon_threadsafe(self.hub.ready.set)
            self._loop(admin, consumer, tps)
        finally:
            self.connected = False
            consumer.close()

    def _partitions(self, admin: AdminClient) -> list[int] | None:
        """Partitions of the topic, waiting for it to exist (the API may start before the bridge); None on stop."""
        waited = False
        while not self._stop.is_set():
            meta = admin.list_topics(self.s.topic_updates, timeout=10).topics.get(self.s.topic_updates)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if not waited:
                log.warning("live tail: topic %s does not exist yet; waiting", self.s.topic_updates)
                waited = True
            self._stop.wait(2.0)
        return None

    def _committed(self, admin: AdminClient, partitions: list[int]) -> dict[int, int]:
        group = self.s.worker_group
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(self.s.topic_updates, p) for p in partitions])
        result = admin.list_consumer_group_offsets([request], request_timeout=10)[group].result(timeout=15)
        out: dict[int, int] = {}
        for tp in result.topic_partitions or []:
            if tp.error is None and tp.offset >= 0:
                out[tp.partition] = tp.offset
            elif tp.partition not in self._warned_no_commit:
                self._warned_no_commit.add(tp.partition)
                log.warning("live tail: group %s has no committed offset on partition %d", group, tp.partition)
        return out

    def _loop(self, admin: AdminClient, consumer: Consumer, tps: dict[int, TopicPartition]) -> None:
        pending: dict[int, deque[tuple[int, bytes | None, bytes | None]]] = {p: deque() for p in tps}
        paused: set[int] = set()
        limit = self.s.live_max_pending
        next_check = 0.0
        offsets_failing = False
        while not self._stop.is_set():
            for msg in consumer.consume(_CONSUME_BATCH, timeout=0.1):
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("live tail: %s", err)
                    continue
                partition, offset = msg.partition(), msg.offset()
                if partition in pending and offset is not None:
                    pending[partition].append((offset, msg.key(), msg.value()))
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.s.live_poll_interval_s
                try:
                    committed = self._committed(admin, list(tps))
                except (KafkaException, TimeoutError) as exc:
                    # Nothing is released meanwhile; the consumer itself is fine, so keep it. Logged once
                    # per outage, not five times a second.
                    if not offsets_failing:
                        log.warning("live tail: cannot read the offsets of %s: %s", self.s.worker_group, exc)
                    offsets_failing = True
                else:
                    if offsets_failing:
                        log.info("live tail: reading the offsets of %s again", self.s.worker_group)
                    offsets_failing = False
                    self._release(pending, committed)
            for p, queue in pending.items():
                if p not in paused and len(queue) >= limit:
                    consumer.pause([tps[p]])
                    paused.add(p)
                    log.warning("live tail: partition %d paused, %d records wait for the worker", p, len(queue))
                elif p in paused and len(queue) <= limit // 2:
                    consumer.resume([tps[p]])
                    paused.discard(p)

    def _release(
        self, pending: dict[int, deque[tuple[int, bytes | None, bytes | None]]], committed: dict[int, int]
    ) -> None:
        # Read after the committed offsets: the order the hand-off argument in the docstring needs.
        users = self.hub.users
        out: list[LiveEvent] = []
        for p, queue in pending.items():
            upto = committed.get(p)
            if upto is None:
                continue
            while queue and queue[0][0] < upto:
                offset, key, value = queue.popleft()
                self._next[p] = offset + 1
                if not users or value is None:
                    continue
                user = _user_of(key)
                if user is not None and user not in users:
                    continue  # decoding costs more than the key check; most records concern nobody here
                ev = self._decode(p, offset, value)
                if ev is not None and ev.user_id in users:
                    out.append(LiveEvent.of(ev))
        if out:
            self.loop.call_soon_threadsafe(self.hub.dispatch, out)

    def _decode(self, partition: int, offset: int, value: bytes) -> OrderUpdate | None:
        try:
            if self._registry is not None and is_registry_frame(value):
                value = self._registry.to_single_object(value)
            ev = decode(value)
        except CodecError as exc:
            # The worker dead-letters such a record and writes nothing for it: nothing to stream.
            log.debug("live tail: skipping undecodable record %d@%d: %s", partition, offset, exc.reason)
            return None
        return ev if isinstance(ev, OrderUpdate) else None
