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

Fills ride the same way: the tail also reads the trades topic (when it exists; it looks again
every half minute while it does not), and releases a Trade once the worker group, whose trades
agent writes ``user_trades``, has committed past it on that topic. Each kind is in (epoch, seq)
order within itself; the two kinds are not ordered with each other (two topics, two commits), so
a stream keeps one position per kind.

The consumer blocks, so it runs in a thread; events cross to the event loop
in batches through ``loop.call_soon_threadsafe``, and each subscriber has a
bounded queue that the tail never waits on: a subscriber that cannot keep up
is dropped and told to resume with ``from_seq``.

Why no AdminClient: librdkafka's ListConsumerGroupOffsets (the admin call) has two known
process-killing bugs on exactly the paths an outage takes. A NOT_COORDINATOR answer (a fresh
cluster, a coordinator moving) dereferences the admin client's absent consumer group
(SIGSEGV in ``rd_kafka_cgrp_op``, librdkafka #5040), and a dropped connection frees the
request's ``eonce`` twice (abort: ``rd_kafka_enq_once_del_source_return: Assertion
'eonce->refcnt > 0' failed``, librdkafka #4605, fix proposed in #5397). Both kill the whole
API, and no Python handler can catch them. The worker group's offsets are read instead with
``Consumer.committed`` of a consumer that carries the worker's group id but never subscribes
(so it never joins, rebalances or commits to that group): the consumer's own OffsetFetch path,
which handles both errors. Every Kafka object here is used by the tail thread only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from tenacity import RetryCallState

from api.metrics import A
from api.models import fill_model, update_dict
from api.settings import ApiSettings
from kit.retry import any_error, retrying_sync
from schemas.codec import CodecError, decode
from schemas.events import OrderUpdate, Trade
from schemas.registry import Registry, is_registry_frame
from schemas.symbols import SymbolSpec
from schemas.tables import fills_of

__all__ = ["FILLS", "ORDERS", "Hub", "LiveEvent", "Subscriber", "Tail"]

log = logging.getLogger("ohs.api.live")

_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 10.0
_CONSUME_BATCH = 500
_OFFSETS_TIMEOUT_S = 5.0
"""Bound of one read of the worker group's offsets: the tail thread waits on it, and so does a stop."""
_OUTAGE_POLL_S = 1.0
"""Pause between failed offset reads: an outage must not turn into a busy loop of requests."""
_TOPIC_RECHECK_S = 30.0
"""How often a missing trades topic is looked for again."""
ORDERS, FILLS = "order", "fills"
"""The kinds of live event: an order update, or a trade's fills for one user."""
_Pending = deque[tuple[int, bytes | None, bytes | None, int]]
"""(offset, key, value, Kafka timestamp in ms) of records waiting for the worker's commit."""


class _Reassign(Exception):
    """The set of topics to tail changed (the trades topic appeared): start a new session at once."""


@dataclass(frozen=True, slots=True)
class LiveEvent:
    user_id: int
    epoch: int
    seq: int
    data: dict[str, Any]
    """The OrderUpdate as JSON values (``api.models.update_dict``), or a fills message."""
    kind: str = ORDERS

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.seq

    @classmethod
    def of(cls, ev: OrderUpdate) -> LiveEvent:
        return cls(ev.user_id, ev.epoch, ev.seq, update_dict(ev))

    @classmethod
    def fills(cls, user_id: int, epoch: int, seq: int, fills: list[dict[str, Any]]) -> LiveEvent:
        """One trade's fills of one user (two for a self-trade): ``{"type": "fills", epoch, seq, fills}``,
        each fill exactly as ``GET /users/{user_id}/trades`` shows it."""
        return cls(user_id, epoch, seq, {"type": "fills", "epoch": epoch, "seq": seq, "fills": fills}, FILLS)


def trade_event(user_id: int, trade: Trade, specs: dict[str, SymbolSpec]) -> LiveEvent | None:
    """``user_id``'s fills of ``trade`` as a live event, or None if the user took no side of it."""
    # In user_trades' clustering order (liquidity ascending: MAKER before TAKER in a self-trade), so the
    # stream and `GET /users/{user_id}/trades?order=asc` list a trade's fills the same way.
    own = sorted(fills_of(trade, user_id), key=lambda fill: fill.liquidity)
    rows = [fill_model(dataclasses.asdict(fill), specs).model_dump(mode="json") for fill in own]
    return LiveEvent.fills(user_id, trade.epoch, trade.seq, rows) if rows else None


class Subscriber:
    def __init__(self, user_id: int, queue_size: int, kinds: frozenset[str] = frozenset({ORDERS})) -> None:
        self.user_id = user_id
        self.kinds = kinds
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

    def subscribe(self, user_id: int, kinds: frozenset[str] = frozenset({ORDERS})) -> Subscriber:
        sub = Subscriber(user_id, self.queue_size, kinds)
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
                if ev.kind not in sub.kinds:
                    continue
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


class _EveryFewSeconds(logging.Filter):
    """Passes one record per interval and counts the rest: during an outage librdkafka logs every
    reconnect attempt (several a second), which would bury everything else in the log."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            record.msg = f"{record.msg} ({self._suppressed} more librdkafka lines since the last one)"
        self._last, self._suppressed = now, 0
        return True


_kafka_log = logging.getLogger("ohs.api.kafka")
_kafka_log.addFilter(_EveryFewSeconds(10.0))


class Tail:
    def __init__(self, s: ApiSettings, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.s = s
        self.hub = hub
        self.loop = loop
        self.connected = False
        """Whether the tail reads Kafka right now: False before the first assignment and while
        the worker group's offsets cannot be read (a broker outage); shown on /health."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next: dict[tuple[str, int], int] = {}
        """(topic, partition) -> offset of the first record not yet released; kept across consumer restarts."""
        self._warned_no_commit: set[tuple[str, int]] = set()
        self._registry = Registry(s.schema_registry_url) if s.schema_registry_url else None
        self._specs = {spec.name: spec for spec in s.symbol_specs()}
        self._warned_no_trades = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ohs-api-tail", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        # Nothing may end this thread but a stop: a dead tail would leave every stream silent.
        # Restarts back off with jitter (kit.retry): API replicas do not retry in step. A
        # reassignment restarts at once, and from the shortest back-off again.
        def restarting(state: RetryCallState) -> None:
            log.info("live tail: restarting in %.1fs", state.next_action.sleep if state.next_action else 0.0)

        while not self._stop.is_set():
            retrier = retrying_sync(
                _RESTART_MIN_S,
                _RESTART_MAX_S,
                retry=lambda exc: any_error(exc) and not isinstance(exc, _Reassign),
                on_retry=restarting,
                stop=self._stop.is_set,
                sleep=self._stop.wait,
            )
            try:
                for attempt in retrier:
                    with attempt:
                        if not self._stop.is_set():
                            self._attempt()
                return
            except _Reassign:
                continue
            except Exception:  # a stop came while the tail was failing
                return

    def _attempt(self) -> None:
        """One session; returns when it ends for good (a stop, the API's loop closing), raises to be restarted."""
        try:
            self._session()
        except _Reassign:
            raise
        except RuntimeError as exc:
            if self.loop.is_closed():  # the API is shutting down under us
                return
            log.exception("live tail failed: %s", exc)
            raise
        except KafkaException as exc:
            # A broker outage at (re)start: expected, so no traceback, and retried.
            log.warning("live tail: Kafka unavailable: %s", exc)
            raise
        except Exception:
            log.exception("live tail failed")
            raise

    def _session(self) -> None:
        s = self.s
        common = {
            "bootstrap.servers": s.kafka_bootstrap,
            **s.kafka_auth.librdkafka(),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "log.connection.close": False,
        }
        consumer = Consumer(
            {
                **common,
                "group.id": f"ohs-api-tail-{uuid.uuid4().hex[:12]}",
                # Only reached when retention removed records the tail had not released yet.
                "auto.offset.reset": "earliest",
                # Served by consume(), rate-limited: librdkafka logs every reconnect attempt of an outage.
                "logger": _kafka_log,
            }
        )
        # The worker group's id, for Consumer.committed only: never subscribe()d, so it never joins
        # the group, and with auto-commit off it never commits to it (see the module docstring).
        # Its failures reach us as exceptions of committed(), so its own log lines (one per reconnect
        # attempt, and nothing serves a logger of a consumer that is never polled) are only the critical ones.
        offsets = Consumer({**common, "group.id": s.worker_group, "log_level": 2})
        try:
            partitions = self._partitions(consumer)
            if partitions is None:
                return
            topics = {s.topic_updates: partitions}
            trades = self._trade_partitions(consumer)
            if trades:
                topics[s.topic_trades] = trades
            tps: dict[tuple[str, int], TopicPartition] = {}
            for topic, parts in topics.items():
                committed = self._committed(offsets, topic, parts)
                for p in parts:
                    # Where the worker group has no commit, the worker itself starts at the log start
                    # (auto_offset_reset=earliest): starting at the end would drop what it processes next.
                    self._next.setdefault((topic, p), committed.get(p, OFFSET_BEGINNING))
                    tps[(topic, p)] = TopicPartition(topic, p, self._next[(topic, p)])
            consumer.assign(list(tps.values()))
            log.info("live tail: partitions at %s", {f"{t}[{p}]": tp.offset for (t, p), tp in tps.items()})
            self.connected = True
            self.loop.call_soon_threadsafe(self.hub.ready.set)
            self._loop(offsets, consumer, tps, trades_missing=not trades)
        finally:
            self.connected = False
            for c in (consumer, offsets):
                try:
                    c.close()
                except Exception as exc:  # closing must not hide why the session ended
                    log.debug("live tail: closing a consumer: %r", exc)

    def _partitions(self, consumer: Consumer) -> list[int] | None:
        """Partitions of the topic, waiting for it to exist (the API may start before the bridge); None on stop."""
        waited = False
        while not self._stop.is_set():
            meta = consumer.list_topics(self.s.topic_updates, timeout=10).topics.get(self.s.topic_updates)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if not waited:
                log.warning("live tail: topic %s does not exist yet; waiting", self.s.topic_updates)
                waited = True
            self._stop.wait(2.0)
        return None

    def _trade_partitions(self, consumer: Consumer) -> list[int]:
        """Partitions of the trades topic, or none while it does not exist (fills wait; orders do not)."""
        topic = self.s.topic_trades
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        if not self._warned_no_trades:
            self._warned_no_trades = True
            log.warning("live tail: topic %s does not exist yet: no live fills until it does", topic)
        return []

    def _committed(self, offsets: Consumer, topic: str, partitions: list[int]) -> dict[int, int]:
        """The worker group's committed offset per partition of ``topic`` (partitions without one are left
        out). Raises KafkaException when Kafka does not answer within the timeout."""
        tps = offsets.committed([TopicPartition(topic, p) for p in partitions], timeout=_OFFSETS_TIMEOUT_S)
        out: dict[int, int] = {}
        for tp in tps:
            if tp.error is None and tp.offset >= 0:
                out[tp.partition] = tp.offset
            elif (topic, tp.partition) not in self._warned_no_commit:
                self._warned_no_commit.add((topic, tp.partition))
                log.warning(
                    "live tail: group %s has no committed offset on %s[%d]", self.s.worker_group, topic, tp.partition
                )
        return out

    def _loop(
        self,
        offsets: Consumer,
        consumer: Consumer,
        tps: dict[tuple[str, int], TopicPartition],
        trades_missing: bool = False,
    ) -> None:
        pending: dict[tuple[str, int], _Pending] = {tp: deque() for tp in tps}
        by_topic: dict[str, list[int]] = {}
        for topic, p in tps:
            by_topic.setdefault(topic, []).append(p)
        paused: set[tuple[str, int]] = set()
        limit = self.s.live_max_pending
        next_check = 0.0
        next_topics = time.monotonic() + _TOPIC_RECHECK_S
        offsets_failing = False
        while not self._stop.is_set():
            for msg in consumer.consume(_CONSUME_BATCH, timeout=0.1):
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    if err.code() == KafkaError._ALL_BROKERS_DOWN:
                        self.connected = False
                    if not offsets_failing:  # one line per outage, not one per reconnect attempt
                        log.warning("live tail: %s", err)
                    continue
                where, offset = (msg.topic(), msg.partition()), msg.offset()
                if where in pending and offset is not None:
                    pending[where].append((offset, msg.key(), msg.value(), msg.timestamp()[1]))
            now = time.monotonic()
            if trades_missing and now >= next_topics:
                next_topics = now + _TOPIC_RECHECK_S
                if self._trade_partitions(consumer):
                    log.info("live tail: topic %s exists now: tailing it too", self.s.topic_trades)
                    raise _Reassign()
            if now >= next_check:
                next_check = now + self.s.live_poll_interval_s
                try:
                    committed = {t: self._committed(offsets, t, parts) for t, parts in by_topic.items()}
                except KafkaException as exc:
                    # Nothing is released meanwhile; both consumers reconnect by themselves, so keep them.
                    # Logged once per outage, not five times a second.
                    self.connected = False
                    if not offsets_failing:
                        log.warning("live tail: cannot read the offsets of %s: %s", self.s.worker_group, exc)
                    offsets_failing = True
                    next_check = time.monotonic() + _OUTAGE_POLL_S
                else:
                    if offsets_failing:
                        log.info("live tail: reading the offsets of %s again", self.s.worker_group)
                    offsets_failing = False
                    self.connected = True
                    self._release(pending, committed)
                oldest = min((q[0][3] for q in pending.values() if q), default=None)
                A.live_tail_delay.set(max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0)
            for where, queue in pending.items():
                if where not in paused and len(queue) >= limit:
                    consumer.pause([tps[where]])
                    paused.add(where)
                    log.warning("live tail: %s[%d] paused, %d records wait for the worker", *where, len(queue))
                elif where in paused and len(queue) <= limit // 2:
                    consumer.resume([tps[where]])
                    paused.discard(where)

    def _release(self, pending: dict[tuple[str, int], _Pending], committed: dict[str, dict[int, int]]) -> None:
        # Read after the committed offsets: the order the hand-off argument in the docstring needs.
        users = self.hub.users
        out: list[LiveEvent] = []
        for (topic, p), queue in pending.items():
            upto = committed.get(topic, {}).get(p)
            if upto is None:
                continue
            while queue and queue[0][0] < upto:
                offset, key, value, _ts = queue.popleft()
                self._next[(topic, p)] = offset + 1
                if not users or value is None:
                    continue
                user = _user_of(key)
                if user is None or user not in users:
                    continue  # decoding costs more than the key check; most records concern nobody here
                ev = self._decode(topic, p, offset, value)
                if isinstance(ev, OrderUpdate):
                    if ev.user_id == user and topic == self.s.topic_updates:
                        out.append(LiveEvent.of(ev))
                elif isinstance(ev, Trade) and topic == self.s.topic_trades:
                    fills = trade_event(user, ev, self._specs)
                    if fills is not None:
                        out.append(fills)
        if out:
            self.loop.call_soon_threadsafe(self.hub.dispatch, out)

    def _decode(self, topic: str, partition: int, offset: int, value: bytes) -> OrderUpdate | Trade | None:
        try:
            if self._registry is not None and is_registry_frame(value):
                value = self._registry.to_single_object(value)
            ev = decode(value)
        except CodecError as exc:
            # The worker dead-letters such a record and writes nothing for it: nothing to stream.
            log.debug("live tail: skipping undecodable record %s[%d]@%d: %s", topic, partition, offset, exc.reason)
            return None
        return ev if isinstance(ev, OrderUpdate | Trade) else None
