"""Everything the worker needs from Faust beyond its public API, in one place.

Faust (faust-streaming) delivers messages one at a time through three layers
of asyncio machinery, and on this project's 2-core machine that machinery
alone costs ~180 µs of CPU per record (measured with an agent that does
nothing: ``docs/benchmarks.md``), more than the worker's whole per-update
budget. Two places cost most:

* the consumer's drain loop wraps every message in ``Service.wait_first``
  (four tasks and an ``asyncio.wait`` per message, to notice a rebalance);
* a stream's iterator runs ``await sleep(0)``, the processors and the sensors
  per event, and ``take_events`` adds a coroutine per event on top.

So the worker (a) runs a consumer whose drain loop calls the conductor
directly and checks for a rebalance between messages instead of racing it,
(b) takes each batch straight from its agent's channel queue: every event
already queued, without awaiting between them, and (c) stores a batch's
table values itself (``TableWriter``): into the table's store, exactly where
``table[key] = value`` puts them, and into its changelog as one produce batch
per partition, instead of one Faust message future, buffer task and
producer call per value (~240 µs each, measured). Everything else is
Faust's: the group, the assignment, the conductor, the table's store, its
changelog topic and recovery, acks and commits.

What this module relies on is checked by ``tests/unit/streams/test_faust_adapter.py``,
which fails when an upgrade renames or reshapes any of it; the dependency
range in ``pyproject.toml`` is pinned to the version that test ran against.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import faust
from aiokafka import AIOKafkaClient
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as _aiokafka_driver

from kit.auth import KafkaAuth

__all__ = [
    "App",
    "Committer",
    "Contiguity",
    "FastConsumer",
    "RawSchema",
    "TableWriter",
    "aiokafka_auth",
    "assignment",
    "batch_offsets",
    "broker_credentials",
    "commit_offsets",
    "committed_offset",
    "current_event",
    "fetched_ends",
    "kafka_reachable",
    "seek_back",
    "take_available",
    "take_queued",
]

log = logging.getLogger("ohs.worker")

_YIELD_EVERY = 1000
"""Messages handed to the conductor between two yields to the event loop (Faust's own loop
yields every 100; the conductor's handler awaits nothing unless a queue is full)."""


class _FastConsumerThread(_aiokafka_driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait the app asks for (``App.fetch_max_wait_ms``).

    Faust builds the worker's aiokafka consumer with ``fetch_max_wait_ms=1500``, no setting.
    Measured with ``ohs bench e2e --rate 1000`` (docs/benchmarks.md): records then reached the
    batch loop in bursts 1-2 s old (p50 emit-to-queryable 1.5-1.9 s in 4 of 6 runs), and with
    50 ms the p50 was 219-387 ms in 5 of 5. aiokafka reads the value when the consumer starts
    (``AIOKafkaConsumer.start`` hands ``_fetch_max_wait_ms`` to its fetcher); the adapter's tests
    check that it still does."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "fetch_max_wait_ms", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = int(wait)
        return consumer


class FastConsumer(_aiokafka_driver.Consumer):
    """Faust's aiokafka consumer with a drain loop that does not race every message against
    the rebalance flag: the flag is tested between messages, and only a message that arrives
    while the flow is suspended takes Faust's original, racing path."""

    def _new_consumer_thread(self) -> Any:
        return _FastConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Never commit from acks: the worker's ``Committer`` commits the end of each durable,
        gap-free batch. Faust's own commit (every ``broker_commit_interval``, at a rebalance, at
        stop) takes the first run of acked offsets after the committed one, and counts a run
        that starts one past it as contiguous (``min(acked) - committed > 1``): a record whose
        event never reached the batch loop is then committed past, and lost."""
        return False

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - run by Faust in the worker
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_read_offset = self._read_offset.__setitem__
        suspended = self.suspend_flow.is_set
        current = functools.partial(is_current, self.app)
        sleep = asyncio.sleep
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in ait:
                    since_yield += 1
                    if since_yield > _YIELD_EVERY:
                        await sleep(0)
                        since_yield = 0
                    # Every fetched message is delivered, even one below the read offset: which
                    # records the batch loop takes, in what order, is ``Contiguity``'s decision.
                    # Faust drops a message below its read offset as already read, and a
                    # rebalance that resumes the flow before it seeks to the committed offsets
                    # lets messages of the old position move that offset past the records the
                    # seek is about to fetch again: dropped as read, never processed (all three
                    # partitions at once in a run of the new rebalance scenario). Faust's gap
                    # bookkeeping (``_add_gap``) served its commits from acks, which this
                    # consumer does not make.
                    if suspended():
                        # A rebalance is under way: Faust's own path, which gives up on the
                        # message when the flow is suspended (it is fetched again after).
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    else:
                        await callback(message)
                    if not current(message):
                        # A rebalance happened while the callback waited (a full queue, flow
                        # control): this fetch is stale and the consumer is being sought back.
                        # The message itself is skipped by ``take_available``.
                        break
                    set_read_offset(tp, message.offset)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class RawSchema(faust.Schema):  # type: ignore[type-arg]
    """Keys and values as the bytes they came as: Faust's serializer registry (a codec lookup,
    ``want_bytes`` and three calls per field) costs ~15 µs per record for what is an identity
    with the ``raw`` serializer. Faust's public Schema extension points; the worker decodes
    records itself (and dead-letters what it cannot)."""

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.key

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.value


class _FastTransport(_aiokafka_driver.Transport):
    Consumer = FastConsumer


class App(faust.App):
    """A Faust app whose consumer is :class:`FastConsumer` (same broker URL, same settings), and
    which waits for the broker before its services start.

    ``before_start`` (when set) is awaited in ``on_first_start``: mode starts a service's
    dependencies (Faust's producer, consumer, tables) only after it, so the app can wait there for
    Kafka. Without it a worker started while Kafka is down exits at once: aiokafka's producer
    raises "Unable to bootstrap" from its start and Faust stops the worker."""

    before_start: Callable[[], Awaitable[None]] | None = None
    fetch_max_wait_ms: int | None = None
    """How long a fetch may wait for records at the broker (None: Faust's 1,500 ms)."""

    def _new_transport(self) -> Any:
        return _FastTransport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        if self.before_start is not None:
            await self.before_start()
        await super().on_first_start()


def broker_credentials(auth: KafkaAuth) -> Any:
    """Faust's ``broker_credentials`` for ``auth``: SASL (over TLS or not) or TLS alone; None for PLAINTEXT."""
    if auth.protocol == "PLAINTEXT":
        return None
    ctx = auth.ssl_context()
    if auth.sasl:
        return faust.SASLCredentials(
            username=auth.username, password=auth.password, ssl_context=ctx, mechanism=auth.mechanism
        )
    return faust.SSLCredentials(ctx)


def aiokafka_auth(auth: KafkaAuth) -> dict[str, Any]:
    """The keyword arguments of an aiokafka client for ``auth`` (what Faust derives from ``broker_credentials``)."""
    if auth.protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": auth.protocol}
    if auth.tls:
        out["ssl_context"] = auth.ssl_context()
    if auth.sasl:
        out.update(sasl_mechanism=auth.mechanism, sasl_plain_username=auth.username, sasl_plain_password=auth.password)
    return out


async def kafka_reachable(bootstrap: str, timeout_s: float, auth: KafkaAuth | None = None) -> None:
    """One metadata round trip with aiokafka's own client, the one Faust's producer bootstraps
    with, as this worker's principal; raises ``KafkaConnectionError`` when no broker answers
    (an authentication failure raises too: waiting cannot fix it, but the caller logs each try)."""
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(timeout_s * 1000),
        **aiokafka_auth(auth or KafkaAuth()),
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
    finally:
        await client.close()


async def take_available(
    stream: Any, max_events: int, idle_s: float = 1.0, skipped: Callable[[Any], None] | None = None
) -> list[Any]:
    """The next batch of an agent's stream: wait for one event, then take every event already
    queued, up to ``max_events``, without waiting for more.

    So a caught-up worker writes each record as soon as it arrives, and batches grow only
    when records arrive faster than they are written. Every event taken is registered as
    unacknowledged with the consumer, as Faust's stream iterator does, so a rebalance waits
    (``stream_wait_empty``) until the batch is acked or the worker gives it up. While it waits
    with an empty queue it calls ``resume_drained`` every ``idle_s``. Each message left out as
    not current (``is_current``) is passed to ``skipped``: nothing else records that it was
    fetched and not taken (``Contiguity.skipped`` says why that matters).
    """
    app = stream.app
    queue = stream.channel.queue
    add_unacked = app.consumer.unacked.add
    while True:
        if not queue.empty():
            first = await queue.get()
        else:
            try:
                first = await asyncio.wait_for(queue.get(), idle_s)
            except TimeoutError:
                resume_drained(stream)
                continue
        if is_current(app, first.message):
            break
        if skipped is not None:
            skipped(first.message)
    batch = [first]
    add_unacked(first.message)
    get_nowait, empty = queue.get_nowait, queue.empty
    while len(batch) < max_events and not empty():
        event = get_nowait()
        if is_current(app, event.message):
            add_unacked(event.message)
            batch.append(event)
        elif skipped is not None:
            skipped(event.message)
    return batch


def fetched_ends(stream: Any) -> dict[Any, int]:
    """Partitions of ``stream``'s topics that this worker owns, whose consumer has fetched up to
    the end of the log as its last fetch saw it (aiokafka's position at its highwater; no
    broker call): {partition: that end}. ``Contiguity.behind`` compares it with the next offset
    the batch loop needs: a record between them was fetched and never reached the loop. A
    partition still fetching its backlog (or cut off from the broker) is left out: records it
    has not fetched yet are not missing."""
    consumer = stream.app.consumer
    topics = set(getattr(stream.channel, "topics", None) or ())
    try:
        subscription = consumer._thread._ensure_consumer()._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
    except Exception:  # not started, or stopping
        return {}
    if assignment is None:
        return {}
    out: dict[Any, int] = {}
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        state = assignment.state_value(tp)  # aiokafka's TopicPartition hashes as Faust's TP
        if state is None or not state.has_valid_position or state.highwater is None:
            continue
        if state.position >= state.highwater:
            out[tp] = state.highwater
    return out


def resume_drained(stream: Any) -> list[Any]:
    """Fetch again every partition of ``stream``'s topics that Faust stopped fetching because
    its queue was full, now that the queue is empty; returns those it had left out.

    Faust removes a partition from its fetch set when a put takes the stream's queue over its
    high mark, and adds it back from a callback the queue runs only inside ``get`` calls. A put
    that lands while the only reader already waits in ``get`` (or just before a rebalance
    clears the queue) leaves the partition out with nothing queued to wake the reader: no
    record of it is fetched again, and the worker waits with records lagging in Kafka. (A CI
    run on 2026-12-06 ended with both agents stuck on one partition for minutes after a
    rebalance; this is one way to get there, reproduced in ``tests/unit/streams``.)"""
    queue = stream.channel.queue
    if not queue.empty():
        return []
    queue.maybe_endorse_pressure_drop()  # the queue's own callbacks, as a get() would run them
    consumer = stream.app.consumer
    topics = set(getattr(stream.channel, "topics", None) or ())
    left_out = [tp for tp in consumer._buffered_partitions if tp.topic in topics]
    for tp in left_out:
        log.warning("partition %s was left out of fetching with its buffer empty; fetching it again", tp)
        consumer.on_buffer_drop(tp)
    return left_out


def take_queued(stream: Any, max_events: int, skipped: Callable[[Any], None] | None = None) -> list[Any]:
    """Every event already queued for ``stream``, up to ``max_events``, without waiting (``skipped``:
    as for ``take_available``)."""
    app = stream.app
    queue = stream.channel.queue
    add_unacked = app.consumer.unacked.add
    out: list[Any] = []
    while len(out) < max_events and not queue.empty():
        event = queue.get_nowait()
        if is_current(app, event.message):
            add_unacked(event.message)
            out.append(event)
        elif skipped is not None:
            skipped(event.message)
    return out


def is_current(app: Any, message: Any) -> bool:
    """Whether ``message`` was fetched in the consumer's current generation, with the flow on.

    A message fetched before a rebalance can still reach a stream's queue after it: the
    conductor's put waits while the queue is full or the flow is suspended, and completes after
    the rebalance cleared the queue and sought the consumer back to the committed offsets. Such
    a message is fetched again, in order, from there; taken now it would be processed ahead of
    the records before it. Faust's own stream iterator skips these the same way
    (``Stream._py_aiter``); the worker takes events from the queue itself, so it must too."""
    return bool(message.generation_id == app.consumer_generation_id and app.flow_control.is_active())


def current_event(event: Any | None) -> None:
    """Point Faust's current-event context at ``event``: a table's RocksDB store files a set
    value under the partition of the event being processed (and sends its changelog record
    there), which Faust only tracks inside its own stream iterator."""
    _current_event.set(None if event is None else weakref.ref(event))


def assignment(app: Any) -> set[Any]:
    """The topic partitions this worker owns now."""
    return set(app.consumer.assignment())


async def commit_offsets(app: Any, offsets: Mapping[Any, int]) -> bool:
    """Commit ``offsets`` (TP -> next offset) now, after flushing the producer, so every
    changelog record sent before is durable first. Faust discards partitions revoked
    meanwhile; it commits what it is given, so offsets never move backwards only because the
    ``Committer`` keeps the highest offset per partition.

    Faust's own committer derives offsets from its list of acked messages and, after some
    rebalances, stops advancing a partition for good (faust-streaming#318, robinhood/faust
    #625, #681): the lag would never clear and the API's live stream, which waits for
    commits, would stall. Committing the end of each durable batch avoids depending on it.
    """
    result: bool = await app.consumer._commit_offsets(dict(offsets))
    return result


def batch_offsets(events: Sequence[Any]) -> dict[Any, int]:
    """Per partition, the offset after the last of ``events``."""
    out: dict[Any, int] = {}
    for e in events:
        m = e.message
        nxt = m.offset + 1
        if nxt > out.get(m.tp, -1):
            out[m.tp] = nxt
    return out


class Committer:
    """Commits the end offsets of durable batches in the background, one commit at a time.

    The batch loop hands each batch's offsets to ``request`` and goes on: the commit (which
    first flushes the producer, so the batch's changelog records and dead letters are durable)
    overlaps the next batch instead of adding two round trips to it. Offsets of batches that
    pile up meanwhile are merged into the next commit. A failed commit is retried with the next
    request or after a pause; it only delays the commit (reprocessing is harmless), so it is
    logged, never raised: this task must not end the worker.
    """

    def __init__(self, app: Any, on_commit: Any = None, retry_s: float = 1.0) -> None:
        self.app = app
        self.on_commit = on_commit
        self.retry_s = retry_s
        self._offsets: dict[Any, int] = {}
        self._deliveries: list[asyncio.Future[Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def request(self, offsets: Mapping[Any, int], deliveries: Sequence[asyncio.Future[Any]] = ()) -> None:
        """Commit ``offsets`` once ``deliveries`` (the batch's changelog records) are acknowledged."""
        for tp, offset in offsets.items():
            if offset > self._offsets.get(tp, -1):
                self._offsets[tp] = offset
        self._deliveries.extend(deliveries)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            offsets, self._offsets = self._offsets, {}
            deliveries, self._deliveries = self._deliveries, []
            if not offsets:
                continue
            try:
                for fut in deliveries:
                    await asyncio.shield(fut)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A changelog record Kafka refused (after the producer's own retries, which last
                # its request timeout): the offsets of its batch must never be committed, and the
                # value is only in the local store. Stop: a restart redoes those batches.
                log.critical("a changelog batch was not delivered (%r): stopping without committing", exc)
                os._exit(75)
            try:
                await commit_offsets(self.app, offsets)
                if self.on_commit is not None:
                    self.on_commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("committing %d partitions failed, will retry: %r", len(offsets), exc)
                for tp, offset in offsets.items():
                    if offset > self._offsets.get(tp, -1):
                        self._offsets[tp] = offset
                await asyncio.sleep(self.retry_s)
                self._wake.set()


class Contiguity:
    """The batch loop takes each partition's records in offset order with none skipped.

    Around a rebalance Faust can hand the streams records out of order or not at all: it
    resumes the flow before it seeks to the committed offsets, so records fetched from the old
    position arrive first, and its queues are cleared meanwhile (one update lost in
    ``test_rebalance_while_the_workers_buffer_is_full_and_its_writes_wait``,
    ``docs/reliability.md``). The worker commits the end of each durable batch, so a record
    skipped there would be committed past.
    This keeps, per partition, the next offset to take: a record below it was taken before
    (a re-fetch after a seek: dropped, it is durable or in flight), a record above it means
    records were skipped, so the partition is sought back to it (``seek_back``) and nothing of
    it is taken until that offset arrives. ``committed`` gives the start of a partition not
    seen yet (the group's committed offset; None: take the first record that comes).

    A record ``take_available`` left out as not current (``skipped``) is seen by nothing else:
    when it was a partition's last one, no later record shows the gap. So a partition with such
    a record that no seek or later record has covered within ``retry_s`` is sought back too."""

    def __init__(self, retry_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._next: dict[Any, int] = {}
        self._sought: dict[Any, float] = {}
        """Partitions sought back to their next offset, and when: a repeat seek waits ``retry_s``."""
        self._skipped: dict[Any, tuple[int, int, float]] = {}
        """Partitions with records left out as not current and not taken since: (the lowest such
        offset, the offset to seek back to, when the first was left out)."""
        self.retry_s = retry_s
        self._clock = clock

    def admit(
        self, events: Sequence[Any], committed: Callable[[Any], int | None]
    ) -> tuple[list[Any], list[Any], dict[Any, int]]:
        """``events`` split into (to take, to drop, {partition: offset to seek back to})."""
        taken: list[Any] = []
        dropped: list[Any] = []
        gaps: dict[Any, int] = {}
        nxt, sought, skipped, now = self._next, self._sought, self._skipped, self._clock()
        for e in events:
            m = e.message
            tp, offset = m.tp, m.offset
            expected = nxt.get(tp)
            if expected is None:
                start = committed(tp)
                expected = start if start is not None and start >= 0 else offset
                nxt[tp] = expected
            if offset == expected:
                taken.append(e)
                nxt[tp] = offset + 1
                sought.pop(tp, None)
                left_out = skipped.get(tp)
                if left_out is not None and offset >= left_out[0]:
                    del skipped[tp]  # fetched again and taken in order
            elif offset < expected:
                dropped.append(e)
            else:
                dropped.append(e)
                since = sought.get(tp)
                if since is None or now - since >= self.retry_s:
                    gaps[tp] = expected
        return taken, dropped, gaps

    def skipped(self, tp: Any, offset: int, committed: Callable[[Any], int | None]) -> None:
        """A record of ``tp`` at ``offset`` was fetched and left out as not current. Normally the
        rebalance that made it stale seeks the partition back and it comes again; if it has not
        been taken within ``retry_s``, ``overdue`` names the partition (a quiet partition whose
        whole backlog was left out would otherwise wait for a record that never comes: a worker
        restarted after its flow stopped held 200 updates for good, a few restarts in a hundred)."""
        expected = self._next.get(tp)
        if expected is None:
            start = committed(tp)
            expected = start if start is not None and start >= 0 else offset
        if offset < expected:
            return  # taken before (a re-fetch): nothing is missing
        first = self._skipped.get(tp)
        if first is None:
            self._skipped[tp] = (offset, expected, self._clock())
        elif offset < first[0]:
            self._skipped[tp] = (offset, min(expected, first[1]), first[2])

    def behind(self, ends: dict[Any, int], committed: Callable[[Any], int | None]) -> dict[Any, int]:
        """Partitions whose log ends (``ends``: ``fetched_ends``) past the next offset to take,
        not already sought back: {partition: next offset}. Asked when the stream's queue has been
        empty for ``retry_s``: the consumer fetched those records (its position is at the end)
        and none reached the batch loop, so they were lost on the way and must be fetched again.
        Restarts of a worker whose flow had stopped left a partition's whole backlog so, with no
        later record to show the gap (3 of ~80 restarts in a scratch loop; the CI failure of
        ee54af2, and the 'Still open' stalls of docs/reliability.md)."""
        out = {}
        for tp, end in ends.items():
            if tp in self._sought:
                continue  # ``overdue`` asks again for those
            nxt = self._next.get(tp)
            if nxt is None:
                start = committed(tp)
                if start is None or start < 0:
                    continue  # never committed: where it starts is the consumer's reset policy
                nxt = start
            if nxt < end:
                out[tp] = nxt
        return out

    def awaiting(self) -> bool:
        """Some partition was sought back and its next record has not come yet, or has records
        left out as not current and not taken since."""
        return bool(self._sought or self._skipped)

    def overdue(self) -> dict[Any, int]:
        """Partitions sought back ``retry_s`` ago whose next record has still not come (nothing
        after it came either, or ``admit`` would have asked again), and partitions whose records
        left out ``retry_s`` ago have not been taken since: {partition: offset to seek back to}."""
        now = self._clock()
        out = {tp: self._next[tp] for tp, since in self._sought.items() if now - since >= self.retry_s}
        for tp, (_, target, since) in self._skipped.items():
            if tp not in out and tp not in self._sought and now - since >= self.retry_s:
                out[tp] = self._next.get(tp, target)
        return out

    def sought(self, tp: Any, offset: int) -> None:
        """``tp`` was sought to ``offset`` (past ``next`` only when the records before it are gone)."""
        self._next[tp] = offset
        self._sought[tp] = self._clock()
        self._skipped.pop(tp, None)  # the seek fetches them again; ``_sought`` watches it

    def describe(self) -> dict[str, Any]:
        """The next offset to take per partition, and the partitions sought back (for /health)."""
        return {
            "next": {f"{tp.topic}:{tp.partition}": n for tp, n in self._next.items()},
            "sought": sorted(f"{tp.topic}:{tp.partition}" for tp in self._sought),
            "skipped": sorted(f"{tp.topic}:{tp.partition}" for tp in self._skipped),
        }

    def forget(self, keep: set[Any]) -> None:
        """Partitions not in ``keep`` were revoked: their next offset is the group's again."""
        for tp in [tp for tp in self._next if tp not in keep]:
            del self._next[tp]
            self._sought.pop(tp, None)
        for tp in [tp for tp in self._skipped if tp not in keep]:
            del self._skipped[tp]


def fetch_state(app: Any) -> dict[str, str]:
    """Assigned partitions the consumer is not fetching, and why (Faust's own bookkeeping):
    ``paused`` (a rebalance or a table's recovery), ``buffer_full`` (the stream's queue was over
    its high mark; fetching resumes when it drains), or ``inactive`` (neither). Empty when every
    assigned partition is fetched. For ``/health``: a partition that stays here while it lags is
    why a worker stops making progress."""
    consumer = app.consumer
    active = consumer._active_partitions
    if active is None:
        return {}
    paused, buffered = consumer._paused_partitions, consumer._buffered_partitions
    out = {}
    for tp in set(consumer.assignment()) - active:
        if consumer._is_changelog_tp(tp):  # read only by a recovery: paused the rest of the time
            continue
        reason = "paused" if tp in paused else "buffer_full" if tp in buffered else "inactive"
        out[f"{tp.topic}:{tp.partition}"] = reason
    return out


def committed_offset(app: Any) -> Callable[[Any], int | None]:
    """The consumer's last known committed offset of a partition (set by each rebalance's seek
    and by every commit), or None."""
    offsets = app.consumer._committed_offset
    return lambda tp: offsets.get(tp)


async def seek_back(app: Any, tp: Any, offset: int, timeout_s: float = 15.0) -> int:
    """Seek ``tp`` back to ``offset`` so its records are fetched again from there; past it only
    to the partition's earliest offset when retention deleted the records before (returned).

    Each broker call is bounded by ``timeout_s`` (Faust's own bound is its 90 s request
    timeout): the batch loop waits here, so a broker that does not answer must not hold every
    other partition for that long. A seek that times out raises; ``Contiguity`` asks again."""
    consumer = app.consumer
    target = offset
    try:
        earliest = (await asyncio.wait_for(consumer.earliest_offsets(tp), timeout_s)).get(tp)
        if earliest is not None and earliest > offset:
            log.error("partition %s: offsets %d-%d were deleted before the worker read them", tp, offset, earliest - 1)
            target = earliest
    except Exception as exc:  # the seek below still helps; Contiguity retries if it does not
        log.warning("partition %s: cannot read its earliest offset: %r", tp, exc)
    await asyncio.wait_for(consumer.seek_wait({tp: target}), timeout_s)
    # Faust's record of the partition's position, as its own seek leaves it.
    consumer._read_offset[tp] = target
    return target


class TableWriter:
    """Stores values of a Faust table as ``table[key] = value`` would, batched.

    For each value: the table's store (RocksDB: the partition of the event that carried the
    key), then the table's changelog topic (same key and value, same partition), sent as one
    aiokafka batch per partition; once a batch is acknowledged, the store records its last
    offset as persisted (what Faust's own changelog callback does, so a restart reads only
    newer changelog records). ``write`` returns the delivery futures: the committer waits for
    them before it commits the offsets of the records that produced the values.
    """

    def __init__(self, app: Any, table: Any) -> None:
        self.app = app
        self.table = table

    def read(self, event: Any, key: bytes) -> bytes | None:
        """The stored value of ``key`` (None if absent), from the store partition of ``event``:
        one lookup, where ``table.get`` costs two (a containment test, then the read)."""
        current_event(event)
        try:
            value: bytes = self.table.data[key]
        except KeyError:
            return None
        finally:
            current_event(None)
        return value

    async def write(self, items: Sequence[tuple[Any, bytes, bytes]]) -> list[asyncio.Future[Any]]:
        """``items``: (event whose partition the key lives in, key, value)."""
        store = self.table.data
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        try:
            for event, key, value in items:
                current_event(event)
                store[key] = value
                by_partition.setdefault(event.message.partition, []).append((key, value))
        finally:
            current_event(None)
        producer = self.app.producer._ensure_producer()
        topic = self.table.changelog_topic.get_topic_name()
        futures: list[asyncio.Future[Any]] = []
        for partition, records in by_partition.items():
            batch, count = producer.create_batch(), 0
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await self._send(producer, batch, topic, partition, count))
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)
                count += 1
            futures.append(await self._send(producer, batch, topic, partition, count))
        return futures

    async def _send(self, producer: Any, batch: Any, topic: str, partition: int, count: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
        store = self.table.data

        def persisted(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return  # the committer sees the failure and does not commit past it
            meta = fut.result()
            store.set_persisted_offset(meta.topic_partition, meta.offset + count - 1)

        future.add_done_callback(persisted)
        return future
