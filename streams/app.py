"""The Faust worker: ``faust -A streams.app worker -l info``.

One agent consumes ``orders.updates``, keyed by user_id; a table holds each
user's state (which events were applied, statistics) and is co-partitioned
with the topic (the bridge uses the same murmur2 partitioner as Faust's
producer, and the table uses it too). Per batch (every record already
queued, so a caught-up worker writes each record at once and batches grow
only under load): decode and check, dedupe against the state, write
Cassandra (retrying until it succeeds), store the users' new state, ack the
records and hand the batch's end offsets to the committer, which commits
them after flushing the producer, so the state changelog and the dead
letters are durable before any offset moves past them. Neither the flush
nor the commit is waited for by the next batch.

Start-up never needs Cassandra: the session is opened (and the keyspace
migrated) by a task that retries with back-off while ``/health`` reports
unavailable; the agent waits for it before its first batch.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kit.retry import any_error, retrying
from kit.runtime import tune_gc
from schemas.registry import Registry
from streams import faust_adapter as fa
from streams.ceiling import CheckpointReader
from streams.lag import group_lag
from streams.metrics import W
from streams.migrate import migrate
from streams.processor import Processor, ProcessorStop, Record
from streams.settings import WorkerSettings
from streams.sink import CassandraSink, Sink, connect
from streams.state import UserState
from streams.statecache import StateCache
from streams.trades import FILLS, TRADE_RECORDS, FillSink, TradeProcessor, TradesSettings

faulthandler.enable()  # a crash in native code (librdkafka, libev, RocksDB) prints every thread's stack

log = logging.getLogger("ohs.worker")
# aiokafka and Faust's topics log a debug line for every record they send (the changelog): never
# wanted in production, and their cost shows in a profile even when nothing is printed.
for _name in ("aiokafka", "faust.topics"):
    logging.getLogger(_name).setLevel(logging.INFO)

settings = WorkerSettings()
_KAFKA = settings.kafka_auth.librdkafka()
"""This worker's credentials, for its confluent-kafka clients (seq guard, lag gauges)."""

app = fa.App(
    settings.group,
    broker=f"kafka://{settings.kafka_bootstrap}",
    store=settings.store,
    datadir=settings.data_dir,
    web_port=settings.web_port,
    web_bind=settings.web_bind,
    web_host=settings.web_bind if settings.web_bind not in ("0.0.0.0", "::") else "127.0.0.1",
    # Faust's own views would serve any user's table value, and the cluster's routing, to
    # anyone who can reach the port: only /metrics and /health are served.
    web_tables_enabled=False,
    web_router_enabled=False,
    web_graph_enabled=False,
    web_stats_enabled=False,
    topic_partitions=settings.partitions,
    # The tables' changelogs and the dead-letter topic, when Faust creates them.
    topic_replication_factor=settings.topic_replication_factor,
    broker_credentials=fa.broker_credentials(settings.kafka_auth),
    consumer_auto_offset_reset="earliest",
    # Changelog records of one batch (one per user) travel in a few produce requests, not one
    # each; the committer's flush sends whatever lingers at once.
    producer_linger=0.01,
    stream_buffer_maxsize=settings.stream_buffer,
    broker_session_timeout=settings.session_timeout_s,
    # Heartbeats from the consumer's own thread, at most a third of the session apart (Kafka's rule).
    broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
    key_serializer="raw",
    value_serializer="raw",
)
app.fetch_max_wait_ms = settings.fetch_max_wait_ms


async def _wait_for_kafka() -> None:
    """Before Faust's producer and consumer start: wait (jittered back-off) until the broker
    answers, as the worker waits for Cassandra; an outage at start-up is not a reason to exit."""
    async for attempt in retrying(0.5, settings.retry_max_s, retry=any_error):
        with attempt:
            try:
                await fa.kafka_reachable(settings.kafka_bootstrap, timeout_s=10.0, auth=settings.kafka_auth)
            except Exception as exc:
                log.warning(
                    "Kafka unavailable at %s (attempt %d): %s",
                    settings.kafka_bootstrap,
                    attempt.retry_state.attempt_number,
                    exc,
                )
                raise
    log.info("Kafka reachable at %s", settings.kafka_bootstrap)


app.before_start = _wait_for_kafka

updates_topic = app.topic(settings.topic_updates, schema=fa.RawSchema(), partitions=settings.partitions)
dlq_topic = app.topic(settings.topic_dlq, key_type=bytes, value_type=bytes, partitions=1)

users = app.Table(
    "user-state",
    default=None,
    partitions=settings.partitions,
    key_type=bytes,
    value_type=bytes,  # UserState.to_bytes(): the app's serializers are raw
    use_partitioner=True,
    # Bounded memory: Faust opens one RocksDB per partition with 3 x 64 MiB memtables and a 2 GiB
    # block cache each; here a worker's RocksDB memory is at most partitions x (2 x write buffer
    # + block cache), ~32 MiB per partition by default (docs/operations.md, sizing).
    options={
        "write_buffer_size": settings.rocksdb_write_buffer_mb * 1024 * 1024,
        "max_write_buffer_number": 2,
        "block_cache_size": settings.rocksdb_block_cache_mb * 1024 * 1024,
    },
)


class _Runtime:
    """What the agent needs once Cassandra is reachable, and what /health reports."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.processor: Processor | None = None
        self.error = "connecting to Cassandra"
        self.last_durable = time.time()
        self.last_commit = 0.0
        self.waiting = False
        self.lag = 0
        """The group's lag on the updates topic at the last refresh (``export_lag``): records wait
        in Kafka even when the agent has taken none (a consumer that stopped fetching)."""
        self.lag_since = time.time()
        """When the lag last rose from zero: an idle worker's old last durable batch is no stall."""
        self.waiting_since = time.time()
        """The agent holds records it has not made durable yet."""
        self.committer: fa.Committer | None = None
        self.table_writer = fa.TableWriter(app, users)
        self.cache = StateCache(settings.state_cache_users)
        self.cache_owned: set[Any] = set()
        self.updates_order = fa.Contiguity()
        self.trades_order: fa.Contiguity | None = None
        """The trades agent's, made anew each time that agent starts (for /health)."""


rt = _Runtime()
# A dead letter keeps the record as it came, but must fit the DLQ: Kafka's default message limit
# is 1 MiB, and headers count too.
_DLQ_MAX_VALUE = 900 * 1024


async def _dead_letter(rec: Record, reason: str, detail: str) -> None:
    value = rec.value or b""
    headers = {
        "reason": reason.encode(),
        "source": b"worker",
        "detail": detail[:1000].encode(errors="replace"),
        "topic": rec.topic.encode(),
        "partition": str(rec.partition).encode(),
        "offset": str(rec.offset).encode(),
        "null_value": b"1" if rec.value is None else b"0",
    }
    for name, value in rec.headers:  # the bridge's epoch and seq: what `ohs dlq redrive` puts back
        if name in ("epoch", "seq") and isinstance(value, bytes) and len(value) <= 24:
            headers[name] = value
    if len(value) > _DLQ_MAX_VALUE:
        headers["truncated_from"] = str(len(value)).encode()
        value = value[:_DLQ_MAX_VALUE]
    key = rec.key[:256] if rec.key is not None else None
    await dlq_topic.send(key=key, value=value, headers=headers)
    W.dead_lettered.labels(reason).inc()
    log.warning("dead-lettered %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, reason, detail[:300])


def _open_cluster() -> tuple[Any, Any]:
    """Blocking: connect cassandra-driver and migrate (run in a thread, never on the event loop).
    The cluster stays open: its token map drives the replica grouping of every batch."""
    cluster, session = connect(settings)
    try:
        migrate(session, settings)
        return cluster, session
    except Exception:
        cluster.shutdown()
        raise


async def _open_sink() -> Sink:
    loop = asyncio.get_running_loop()
    cluster, session = await loop.run_in_executor(None, _open_cluster)
    try:
        if settings.cql_driver == "acsylla":
            from streams.acsylla_sink import AcsyllaSink

            return await AcsyllaSink.open(settings, cluster)
        return await loop.run_in_executor(None, CassandraSink, session, settings)
    except BaseException:
        cluster.shutdown()
        raise


@app.task  # type: ignore[untyped-decorator]
async def start_sink() -> None:
    """Open Cassandra with jittered back-off until it answers; then the agent may run."""
    async for attempt in retrying(0.5, settings.retry_max_s, retry=any_error):
        with attempt:
            try:
                sink = await _open_sink()
            except Exception as exc:
                rt.error = f"Cassandra unavailable: {exc}"
                log.warning("cannot open Cassandra yet (attempt %d): %s", attempt.retry_state.attempt_number, exc)
                raise
    guard = (
        CheckpointReader(settings.kafka_bootstrap, settings.topic_checkpoint, settings.bridge_id, kafka=_KAFKA)
        if settings.seq_guard
        else None
    )
    rt.processor = Processor(
        sink,
        _dead_letter,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        registry=Registry(settings.schema_registry_url) if settings.schema_registry_url else None,
        guard=guard,
        on_retry=W.retries.inc,
    )
    rt.committer = fa.Committer(app, on_commit=_on_commit)
    rt.error = ""
    # Start-up is done (Faust, the drivers, prepared statements): freeze what exists and collect
    # less often (kit/runtime.py says why).
    tune_gc(settings.gc_threshold0)
    rt.ready.set()
    log.info("Cassandra session open; keyspace %s migrated", settings.keyspace)


def _on_commit() -> None:
    rt.last_commit = time.time()
    W.last_commit.set(rt.last_commit)


@app.agent(updates_topic, concurrency=1)
async def apply_updates(stream: Any) -> None:
    """Batches in order; up to ``write_pipeline`` of them being written at once.

    While batch N is being written, batch N+1 is prepared on top of N's in-memory states and its
    write starts; each batch stores its states, acks its records and hands its offsets to the
    committer only after it is durable AND the batch before it has done all that: the table and
    the committed offsets never get ahead of what Cassandra has.
    """
    await stream.maybe_start()
    await rt.ready.wait()
    processor, committer = rt.processor, rt.committer
    assert processor is not None and committer is not None
    inflight: deque[asyncio.Task[None]] = deque()
    loop = asyncio.get_running_loop()
    while True:
        try:
            events = await _take(rt.updates_order, stream)
        except StopAsyncIteration:  # the stream is stopping (shutdown or rebalance of the agent)
            return
        if not rt.waiting:
            rt.waiting_since = time.time()
        rt.waiting = True
        try:
            if settings.batch_window_s and len(events) < settings.batch_size:
                await asyncio.sleep(settings.batch_window_s)
                events += fa.take_queued(stream, settings.batch_size - len(events), _skipped(rt.updates_order))
            owned = fa.assignment(app)
            if owned != rt.cache_owned:
                # Partitions moved: another worker may have changed their users' states meanwhile.
                while inflight:
                    await inflight.popleft()
                rt.cache.clear()
                rt.cache_owned = owned
            events = await _contiguous(rt.updates_order, events, owned)
            if not events:
                rt.waiting = bool(inflight)
                continue
            batch = await _prepare(processor, events)
            previous = inflight[-1] if inflight else None
            inflight.append(loop.create_task(_finish(processor, committer, batch, previous)))
            while inflight and (inflight[0].done() or len(inflight) >= settings.write_pipeline):
                await inflight.popleft()
        except ProcessorStop as exc:
            log.critical("%s; stopping without committing (see docs/operations.md)", exc)
            os._exit(78)
        except Exception:
            # Only a bug gets here (the processor handles its records' failures). The batch is not
            # acked: the process ends at once, offsets stay where they are and a restart redoes it.
            log.critical("unexpected error in the batch loop: exiting without acking", exc_info=True)
            os._exit(70)
        rt.waiting = bool(inflight)


async def _contiguous(guard: fa.Contiguity, events: list[Any], owned: set[Any]) -> list[Any]:
    """The events of ``events`` to process: those ``fa.Contiguity`` admits, of partitions in
    ``owned``. Every other event is acked here (bookkeeping only: offsets come from durable
    batches): of a partition revoked meanwhile (its new owner reads it again), or skipping or
    repeating part of a partition (one skipped is sought back to the first record skipped).

    The events returned must all be processed, even if the assignment changes before they are:
    Contiguity counts them as taken, so a partition given back to this worker does not take
    them again. (The trades agent used to filter its batch by a second look at the assignment,
    after the seek's await: a rebalance in between dropped a batch it had admitted, and 452
    fills were lost after a Kafka pause in a CI run of 2026-12-06.)"""
    guard.forget(owned)
    mine: list[Any] = []
    for e in events:
        if e.message.tp in owned:
            mine.append(e)
        else:
            e.ack()
    taken, dropped, gaps = guard.admit(mine, fa.committed_offset(app))
    for e in dropped:
        e.ack()
    await _seek_back(guard, gaps)
    return taken


def _skipped(guard: fa.Contiguity) -> Callable[[Any], None]:
    """What ``fa.take_available`` calls for each message it leaves out as not current."""
    committed = fa.committed_offset(app)
    return lambda m: guard.skipped(m.tp, m.offset, committed)


async def _take(guard: fa.Contiguity, stream: Any) -> list[Any]:
    """The next events of ``stream``. Each time nothing came for ``retry_s``, seek back every
    partition whose records the batch loop still needs and will not get otherwise: one sought
    back whose records have not come, one with records left out as not current, and one whose
    log ends past the next offset to take although the consumer fetched it (nothing else would:
    no later record of it comes to show the gap)."""
    skipped = _skipped(guard)
    while True:
        try:
            return await asyncio.wait_for(
                fa.take_available(stream, settings.batch_size, skipped=skipped), guard.retry_s
            )
        except TimeoutError:
            guard.forget(fa.assignment(app))  # a partition revoked meanwhile is not sought
            gaps = guard.overdue()
            for tp, offset in guard.behind(fa.fetched_ends(stream), fa.committed_offset(app)).items():
                gaps.setdefault(tp, offset)
            await _seek_back(guard, gaps)


async def _seek_back(guard: fa.Contiguity, gaps: dict[Any, int]) -> None:
    for tp, offset in gaps.items():
        W.consumer_gaps.inc()
        log.warning("partition %s: the consumer skipped records from offset %d; fetching them again", tp, offset)
        try:
            guard.sought(tp, await fa.seek_back(app, tp, offset))
        except Exception as exc:  # revoked meanwhile, or the broker away: tried again later
            log.warning("partition %s: cannot seek back to %d yet: %s", tp, offset, exc)


class _Batch:
    __slots__ = ("by_key", "events", "loaded", "prepared", "records")

    def __init__(self, events: list[Any], records: list[Record], by_key: dict[bytes, Any]) -> None:
        self.events, self.records, self.by_key = events, records, by_key
        self.prepared: Any = None
        self.loaded: list[bytes] = []
        """Users whose states this batch pinned in the cache."""


async def _prepare(processor: Processor, events: list[Any]) -> _Batch:
    """``events``: what ``_contiguous`` returned, every one of them to be processed."""
    by_key: dict[bytes, Any] = {}
    records = []
    for e in events:
        m = e.message
        records.append(Record(m.key, m.value, m.topic, m.partition, m.offset, _headers(m.headers)))
        by_key[m.key or b""] = e
    batch = _Batch(events, records, by_key)
    cache, reader = rt.cache, rt.table_writer

    def load(key: bytes) -> UserState:
        batch.loaded.append(key)
        return cache.get(key, lambda: UserState.from_bytes(reader.read(by_key[key], key)))  # type: ignore[no-any-return]

    batch.prepared = await processor.prepare(records, load)
    return batch


async def _finish(processor: Processor, committer: fa.Committer, batch: _Batch, previous: Any) -> None:
    """Make a batch durable, then (after the one before it) store its states and commit."""
    try:
        result = await processor.complete(batch.prepared)
        if previous is not None:
            await previous
        # The states as they were right after this batch (Prepared.states says why not the objects).
        by_key = batch.by_key
        deliveries = await rt.table_writer.write([(by_key[k], k, value) for k, value in batch.prepared.states.items()])
        rt.cache.release(batch.loaded)
        for e in batch.events:
            e.ack()
        committer.request(fa.batch_offsets(batch.events), deliveries)
    except ProcessorStop as exc:
        log.critical("%s; stopping without committing (see docs/operations.md)", exc)
        os._exit(78)
    except BaseException:
        log.critical("unexpected error finishing a batch: exiting without acking", exc_info=True)
        os._exit(70)
    rt.last_durable = time.time()
    W.last_durable.set(rt.last_durable)
    if settings.latency_file and result.emitted_ns:
        _record_latencies(result.durable_at_ns, result.emitted_ns)
    W.records.inc(len(batch.records))
    W.applied.inc(result.applied)
    W.duplicates.inc(result.duplicates)
    W.batch_size.observe(len(batch.records))
    W.rows.inc(result.rows)
    W.requests.inc(result.requests)
    if result.rows:
        W.write_latency.observe(result.write_seconds)


def _headers(headers: Any) -> tuple[tuple[str, bytes], ...]:
    if not headers:
        return ()
    items = headers.items() if hasattr(headers, "items") else headers
    return tuple((str(k), bytes(v)) for k, v in items if v is not None)


def _record_latencies(durable_at_ns: int, emitted_ns: list[int]) -> None:
    """Every event's latency, not a sample: what `ohs bench e2e` computes percentiles from."""
    assert settings.latency_file is not None
    with open(settings.latency_file, "ab") as f:
        array("d", ((durable_at_ns - e) / 1e9 for e in emitted_ns)).tofile(f)


@app.timer(interval=settings.lag_interval_s)  # type: ignore[untyped-decorator]
async def export_lag() -> None:
    """Refresh the lag gauges from the broker (blocking admin calls: off the event loop). A timer
    that raises would crash the worker, so whatever happens here is only logged."""
    loop = asyncio.get_running_loop()
    try:
        rows = await loop.run_in_executor(
            None, partial(group_lag, settings.kafka_bootstrap, settings.group, [settings.topic_updates], config=_KAFKA)
        )
    except Exception as exc:  # a broker outage, a timeout: the gauges keep their last values
        log.warning("consumer lag not refreshed: %s", exc)
        return
    for row in rows:
        W.lag_messages.labels(row.topic, str(row.partition)).set(row.lag_messages)
        W.lag_seconds.labels(row.topic, str(row.partition)).set(row.lag_seconds)
    lag = sum(max(row.lag_messages, 0) for row in rows)
    if lag and not rt.lag:
        rt.lag_since = time.time()
    rt.lag = lag


@app.page("/metrics")
async def metrics(web: Any, request: Any) -> Any:
    """Prometheus exposition of the worker's metrics, on the Faust web port."""
    return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


@app.page("/health")
async def health(web: Any, request: Any) -> Any:
    """200 while the worker makes progress: Cassandra open, and no records waiting longer than
    ``health_stall_s`` without a durable batch, whether the agent holds them or they still lag in
    Kafka. 503 (with the reason) otherwise."""
    now = time.time()
    problems = []
    if rt.error:
        problems.append(rt.error)
    # Since the last durable batch, or since work appeared after an idle time, whichever is later.
    appeared = [t for t, busy in ((rt.lag_since, rt.lag > 0), (rt.waiting_since, rt.waiting)) if busy]
    stalled = now - max(rt.last_durable, min(appeared)) if appeared else 0.0
    if stalled > settings.health_stall_s:
        problems.append(f"no durable batch for {stalled:.0f}s while records wait (lag {rt.lag})")
    body: dict[str, Any] = {
        "status": "unavailable" if problems else "ok",
        "problems": problems,
        "last_durable_batch": rt.last_durable,
        "last_commit": rt.last_commit or None,
    }
    try:  # where the consumer stands: what to look at when the worker stops making progress
        body["not_fetched"] = fa.fetch_state(app)
        orders = {"updates": rt.updates_order} | ({"trades": rt.trades_order} if rt.trades_order else {})
        body["next_offsets"] = {name: guard.describe() for name, guard in orders.items()}
    except Exception as exc:  # a diagnosis never turns a health answer into an error
        body["consumer_state_error"] = repr(exc)
    return web.json(body, status=503 if problems else 200)


# ======================================================================================== trades
# The users' fills (issue 16): a second agent of the same app, same group, same sink and committer,
# no table (streams.trades says why fills need no per-user state). Off with OHS_WORKER_TRADES=false.
trades_settings = TradesSettings()


async def _apply_trades(processor: TradeProcessor, committer: fa.Committer, events: list[Any]) -> None:
    """``events``: what ``_contiguous`` returned, every one of them to be processed."""
    records = [
        Record(m.key, m.value, m.topic, m.partition, m.offset, _headers(m.headers)) for m in (e.message for e in events)
    ]
    result, _ = await processor.process(records)
    for e in events:
        e.ack()
    committer.request(fa.batch_offsets(events))  # no changelog records to wait for
    TRADE_RECORDS.inc(len(records))
    FILLS.inc(result.applied)
    W.rows.inc(result.rows)
    W.requests.inc(result.requests)


if trades_settings.trades:
    trades_topic = app.topic(trades_settings.topic_trades, schema=fa.RawSchema(), partitions=settings.partitions)

    @app.agent(trades_topic, concurrency=1)
    async def apply_trades(stream: Any) -> None:
        await stream.maybe_start()
        await rt.ready.wait()
        orders, committer = rt.processor, rt.committer
        assert orders is not None and committer is not None
        processor = TradeProcessor(
            cast(FillSink, orders.sink),
            _dead_letter,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
            registry=orders.registry,
            # A reader of its own: the two agents refresh their ceilings independently.
            guard=CheckpointReader(
                settings.kafka_bootstrap, settings.topic_checkpoint, settings.bridge_id, kafka=_KAFKA
            )
            if settings.seq_guard
            else None,
            on_retry=W.retries.inc,
        )
        guard = rt.trades_order = fa.Contiguity()
        while True:
            try:
                events = await _take(guard, stream)
            except StopAsyncIteration:  # the stream is stopping (shutdown or rebalance of the agent)
                return
            try:
                if settings.batch_window_s and len(events) < settings.batch_size:
                    await asyncio.sleep(settings.batch_window_s)
                    events += fa.take_queued(stream, settings.batch_size - len(events), _skipped(guard))
                events = await _contiguous(guard, events, fa.assignment(app))
                if events:
                    await _apply_trades(processor, committer, events)
            except ProcessorStop as exc:
                log.critical("%s; stopping without committing (see docs/operations.md)", exc)
                os._exit(78)
            except Exception:
                # As for order updates: only a bug gets here; end at once, nothing acked, a restart redoes it.
                log.critical("unexpected error in the trades batch loop: exiting without acking", exc_info=True)
                os._exit(70)
