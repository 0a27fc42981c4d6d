"""The Faust worker: ``faust -A streams.app worker -l info``.

One agent consumes ``orders.updates`` in batches (``take_events``), keyed by
user_id; a table holds each user's state (last applied seq, open orders,
statistics) and is co-partitioned with the topic (the bridge uses the same
murmur2 partitioner as Faust's producer, and the table uses it too). Per
batch: decode and dedupe, write Cassandra (retrying until it succeeds), store
the users' new state, flush the producer so the state changelog is durable,
and only then let Faust ack the batch: offsets are never committed for an
event whose effects and state are not both durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from array import array
from typing import Any

import faust
from faust.streams import _current_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.registry import Registry
from streams.lag import LagError, group_lag
from streams.metrics import W
from streams.migrate import migrate
from streams.processor import Processor, Record
from streams.settings import WorkerSettings
from streams.sink import CassandraSink, connect

log = logging.getLogger("ohs.worker")

settings = WorkerSettings()

app = faust.App(
    settings.group,
    broker=f"kafka://{settings.kafka_bootstrap}",
    store=settings.store,
    datadir=settings.data_dir,
    web_port=settings.web_port,
    web_host="127.0.0.1",
    topic_partitions=settings.partitions,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    key_serializer="raw",
    value_serializer="raw",
)

updates_topic = app.topic(settings.topic_updates, key_type=bytes, value_type=bytes, partitions=settings.partitions)
dlq_topic = app.topic(settings.topic_dlq, key_type=bytes, value_type=bytes, partitions=1)

users = app.Table(
    "user-state",
    default=None,
    partitions=settings.partitions,
    key_type=bytes,
    value_type=bytes,  # JSON of UserState.to_dict(), encoded here (the app's serializers are raw)
    use_partitioner=True,
)

_runtime: dict[str, Any] = {}


def _load(raw: bytes | None) -> dict[str, Any] | None:
    return None if raw is None else json.loads(raw)


def _processor() -> Processor:
    proc = _runtime.get("processor")
    if proc is None:
        cluster, session = connect(settings)
        migrate(session, settings)
        _runtime["cluster"] = cluster

        async def dead_letter(rec: Record, reason: str, detail: str) -> None:
            headers = {
                "reason": reason.encode(),
                "source": b"worker",
                "detail": detail[:1000].encode(),
                "topic": rec.topic.encode(),
                "partition": str(rec.partition).encode(),
                "offset": str(rec.offset).encode(),
            }
            await dlq_topic.send(key=rec.key, value=rec.value, headers=headers)
            W.dead_lettered.labels(reason).inc()
            log.warning("dead-lettered %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, reason, detail)

        proc = Processor(
            CassandraSink(session, settings),
            dead_letter,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
            registry=Registry(settings.schema_registry_url) if settings.schema_registry_url else None,
            on_retry=W.retries.inc,
        )
        _runtime["processor"] = proc
    return proc


@app.agent(updates_topic, concurrency=1)
async def apply_updates(stream: Any) -> None:
    async for events in stream.take_events(settings.batch_size, within=settings.batch_window_s):
        records = [
            Record(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset)
            for e in events
        ]
        try:
            processor = _processor()
            states = {r.key or b"": _load(users.get(r.key or b"")) for r in records}
            result, changed = await processor.process(records, states)
            by_key = {e.message.key or b"": e for e in events}
            for key, value in changed.items():
                # The RocksDB store files a value under the partition of the event being
                # processed, which faust tracks per event and take_events leaves unset: point it
                # at an event of this key (the topic and the table are co-partitioned by key).
                _current_event.set(weakref.ref(by_key[key]))
                users[key] = json.dumps(value, separators=(",", ":")).encode()
            _current_event.set(None)
            # The changelog must be durable before these offsets can be committed.
            await app.producer.flush()
            await _commit_durable(events)
            if settings.latency_file and result.emitted_ns:
                _record_latencies(result.durable_at_ns, result.emitted_ns)
            W.records.inc(len(records))
            W.applied.inc(result.applied)
            W.duplicates.inc(result.duplicates)
            W.batch_size.observe(len(records))
            W.write_latency.observe(result.write_seconds)
            log.info(
                "batch: %d records, %d applied, %d duplicates, %d dead-lettered, write %.3fs, %d retries",
                len(records),
                result.applied,
                result.duplicates,
                result.dead_lettered,
                result.write_seconds,
                result.retries,
            )
        except Exception:
            # Only a bug gets here (the processor retries its own failures). Leaving the loop by
            # an exception would make take_events ack this batch unwritten, so the process ends
            # at once instead: offsets stay where they are and a restart redoes the batch.
            log.critical("unexpected error in the batch loop: exiting without acking", exc_info=True)
            os._exit(70)


async def _commit_durable(events: list[Any]) -> None:
    """Commit, per partition, past the last record of a batch that is now durable.

    Faust's own committer derives offsets from its list of acked messages and, after some
    rebalances, stops advancing a partition for good (faust-streaming#318, robinhood/faust#625,
    #681): reprocessing is harmless here, but the lag would never clear and the API's live
    stream, which waits for commits, would stall. The batch is in partition order and durable,
    so committing its end is always safe; Faust discards the commit of a partition revoked
    meanwhile, and its own periodic commit still runs (and never moves an offset backwards).
    """
    offsets: dict[Any, int] = {}
    for e in events:
        tp = e.message.tp
        offsets[tp] = max(offsets.get(tp, 0), e.message.offset + 1)
    try:
        await app.consumer._commit_offsets(offsets)  # type: ignore[attr-defined]
    except Exception as exc:  # a failed commit only means reprocessing: never leave the loop for it
        log.warning("commit after a durable batch failed (Faust's periodic commit will retry): %s", exc)


def _record_latencies(durable_at_ns: int, emitted_ns: list[int]) -> None:
    """Every event's latency, not a sample: what `ohs bench e2e` computes percentiles from."""
    assert settings.latency_file is not None
    with open(settings.latency_file, "ab") as f:
        array("d", ((durable_at_ns - e) / 1e9 for e in emitted_ns)).tofile(f)


@app.timer(interval=settings.lag_interval_s)  # type: ignore[untyped-decorator]
async def export_lag() -> None:
    """Refresh the lag gauges from the broker (blocking admin calls: off the event loop)."""
    loop = asyncio.get_running_loop()
    try:
        rows = await loop.run_in_executor(
            None, group_lag, settings.kafka_bootstrap, settings.group, [settings.topic_updates]
        )
    except LagError as exc:
        log.warning("consumer lag not refreshed: %s", exc)
        return
    for row in rows:
        W.lag_messages.labels(row.topic, str(row.partition)).set(row.lag_messages)
        W.lag_seconds.labels(row.topic, str(row.partition)).set(row.lag_seconds)


@app.page("/metrics")
async def metrics(web: Any, request: Any) -> Any:
    """Prometheus exposition of the worker's metrics, on the Faust web port."""
    return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])
