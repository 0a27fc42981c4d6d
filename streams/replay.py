"""``ohs replay``: re-apply a Kafka topic to the Cassandra tables, to backfill or rebuild them.

The worker's pipeline without Faust: the same ``Processor`` (rules, dead letters, per-user seq
dedupe, write retries) and ``CassandraSink`` (``USING TIMESTAMP epoch+seq``), so replaying over
rows that are right rewrites identical cells and changes nothing. Dedupe state starts empty: it
only has to drop the duplicates inside what this run reads.

Positions belong to the replay's own group: manual assignment (it never joins a group), no
auto-commit, the worker's group never touched. A batch's offsets are committed only once it is
durable in Cassandra and its dead letters acknowledged, so the same command without ``--from-*``
resumes; ``--from-*`` deletes the group's positions and starts a new replay.

Statistics rows are sums over a user's whole history, written with the timestamp of the last
event counted: sums started mid-history would replace the right row with a smaller one. So they
are written only when the replay has every event of its users: each replayed partition starts at
offset 0 with nothing deleted (a user's events all live in their key's partition), or the run
resumes such a replay (recorded in the commit metadata, with the keyspace). A resumed run goes
on from the rows already written: a row is exactly the sum of its events up to its (last_epoch,
last_seq), so older events are skipped for it and newer ones added. Otherwise the statistics
rows are left alone and the summary says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from cassandra.concurrent import execute_concurrent_with_args
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from engine.events import OrderUpdate
from schemas.registry import Registry
from streams.migrate import migrate
from streams.processor import BatchResult, Processor, Record
from streams.settings import WorkerSettings
from streams.sink import CassandraSink, connect
from streams.state import ALL_SYMBOLS, STAT_FIELDS, UserState

__all__ = ["PartitionSummary", "Replay", "ReplayError", "ReplayOptions", "ReplaySummary"]

log = logging.getLogger("ohs.replay")
T = TypeVar("T")
Applied = Sequence[tuple[OrderUpdate, bytes]]
StatRow = tuple[int, str, dict[str, int], tuple[int, int]]


def _us(when: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (Kafka timestamps are whole ms: float seconds could be off by one)."""
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


class ReplayError(Exception):
    """The replay cannot start or go on: bad options, no topic, a refused group or keyspace."""


class _Abandoned(Exception):
    """A stop came while a step was still retrying or writing."""


@dataclass(frozen=True)
class ReplayOptions:
    group: str = "ohs-replay"
    topic: str | None = None  # default: the worker's updates topic
    keyspace: str | None = None  # default: the worker's (live) keyspace
    from_beginning: bool = False
    from_offsets: dict[int, int] = field(default_factory=dict)
    from_timestamp: dt.datetime | None = None
    until: dt.datetime | None = None  # None: the end offsets taken at start
    dry_run: bool = False
    batch_size: int | None = None  # default: the worker's
    stop_grace_s: float = 10.0  # how long a stop waits for the batch being written

    @property
    def explicit(self) -> bool:
        return self.from_beginning or bool(self.from_offsets) or self.from_timestamp is not None


@dataclass
class PartitionSummary:
    partition: int
    start: int
    end: int
    offset: int
    """Next offset to replay (committed, unless dry run): where a resumed run starts."""
    records: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0


@dataclass
class ReplaySummary:
    topic: str
    group: str
    keyspace: str
    dry_run: bool
    statistics: bool
    statistics_note: str
    partitions: list[PartitionSummary]
    retries: int = 0
    elapsed_s: float = 0.0
    stopped_by: int | None = None  # the signal that stopped the run

    def sum(self, name: str) -> int:
        return sum(getattr(p, name) for p in self.partitions)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("records", "applied", "duplicates", "dead_lettered"):
            out[name] = self.sum(name)
        out["rate"] = out["records"] / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return out


class _Statistics:
    """The statistics rows of the replayed users; a resumed run starts from the rows in Cassandra."""

    def __init__(self, session: Any, keyspace: str, resume: bool) -> None:
        self.session, self.resume = session, resume
        self.rows: dict[int, dict[str, tuple[dict[str, int], tuple[int, int]]]] = {}
        cols = ", ".join(STAT_FIELDS)
        self.select = session.prepare(
            f"SELECT symbol, {cols}, last_epoch, last_seq FROM {keyspace}.order_statistics WHERE user_id = ?"
        )

    def load(self, users: set[int]) -> None:
        new = sorted(users - self.rows.keys())
        if not self.resume:
            self.rows.update((u, {}) for u in new)
            return
        found = execute_concurrent_with_args(self.session, self.select, [(u,) for u in new], concurrency=64)
        for user, (_ok, rows) in zip(new, found, strict=True):
            self.rows[user] = {
                r.symbol: ({f: getattr(r, f) or 0 for f in STAT_FIELDS}, (r.last_epoch, r.last_seq)) for r in rows
            }

    def apply(self, applied: Applied) -> list[StatRow]:
        touched: dict[tuple[int, str], None] = {}
        for ev, _ in applied:
            user = self.rows.setdefault(ev.user_id, {})
            for symbol in (ev.symbol, ALL_SYMBOLS):
                values, counted = user.get(symbol, (dict.fromkeys(STAT_FIELDS, 0), (0, 0)))
                if (ev.epoch, ev.seq) <= counted:
                    continue
                # UserState owns the counting rules: an event applied to an empty state is its increments.
                scratch = UserState()
                scratch.apply(ev)
                inc = scratch.stats[ALL_SYMBOLS]
                user[symbol] = ({f: values[f] + inc[f] for f in STAT_FIELDS}, (ev.epoch, ev.seq))
                touched[(ev.user_id, symbol)] = None
        return [(u, sym, *self.rows[u][sym]) for u, sym in touched]


class _Sink:
    """What the processor writes through: the worker's sink with this replay's statistics, or nothing (dry run)."""

    def __init__(self, inner: CassandraSink | None = None, stats: _Statistics | None = None) -> None:
        self.inner, self.stats = inner, stats

    def statements(self, applied: Applied, stats: Sequence[StatRow]) -> list[Any]:
        # The processor's sums start at this run's first record: never the ones to write.
        rows = self.stats.apply(applied) if self.stats is not None else []
        return self.inner.statements(applied, rows) if self.inner is not None else []

    def write(self, statements: list[Any]) -> None:
        if self.inner is not None:
            self.inner.write(statements)


class Replay:
    def __init__(self, settings: WorkerSettings, options: ReplayOptions) -> None:
        if sum((options.from_beginning, bool(options.from_offsets), options.from_timestamp is not None)) > 1:
            raise ReplayError("give at most one of --from-beginning, --from-offset, --from-timestamp")
        if options.group == settings.group:
            raise ReplayError(f"group {options.group!r} is the live worker's: the replay needs a group of its own")
        self.s, self.o = settings, options
        self.topic = options.topic or settings.topic_updates
        self.keyspace = options.keyspace or settings.keyspace
        self.batch_size = options.batch_size or settings.batch_size
        self._stop_signal: int | None = None
        self._stop_at = 0.0
        self._meta = ""
        self._progress: Callable[[ReplaySummary], None] = lambda _s: None
        self._dlq_errors: list[str] = []
        self._users: dict[bytes, dict[str, Any]] = {}

    def stop(self, signum: int) -> None:
        """Ask the run to stop (safe in a signal handler); the summary reports ``signum``."""
        if self._stop_signal is None:
            self._stop_signal, self._stop_at = signum, time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stop_signal is not None

    def run(self, progress: Callable[[ReplaySummary], None] | None = None) -> ReplaySummary:
        """Replay up to the end positions or a stop; ``progress`` is called after every batch."""
        self._progress = progress or self._progress
        return asyncio.run(self._run())

    async def _run(self) -> ReplaySummary:
        t0 = time.monotonic()
        config = {"bootstrap.servers": self.s.kafka_bootstrap, "group.id": self.o.group, "enable.auto.commit": False}
        # Positions are always explicit: one deleted under us (retention) must fail, not jump elsewhere.
        consumer = Consumer({**config, "enable.partition.eof": True, "auto.offset.reset": "error"})
        cluster, producer = None, None
        registry = Registry(self.s.schema_registry_url) if self.s.schema_registry_url else None
        try:
            summary = self._plan(consumer)
            self._meta = json.dumps({"ks": self.keyspace, "stats": summary.statistics}, separators=(",", ":"))
            sink = _Sink()
            if not self.o.dry_run:
                cluster, session = connect(self.s)
                migrate(session, self.s, self.keyspace)
                resume = any(p.start > 0 for p in summary.partitions)
                stats = _Statistics(session, self.keyspace, resume) if summary.statistics else None
                sink = _Sink(CassandraSink(session, self.s, self.keyspace), stats)
                producer = Producer(
                    {"bootstrap.servers": self.s.kafka_bootstrap, "enable.idempotence": True, "message.timeout.ms": 0}
                )  # message.timeout.ms=0: a dead letter is never given up on a timer, like the bridge's records
                self._prepare_kafka()
                if self.o.explicit:
                    self._commit(consumer, {p.partition: p.offset for p in summary.partitions})
            proc = Processor(
                cast(CassandraSink, sink),
                self._dead_letter(producer),
                registry=registry,
                retry_initial_s=self.s.retry_initial_s,
                retry_max_s=self.s.retry_max_s,
            )
            log.info("statistics %s", summary.statistics_note)
            self._progress(summary)
            try:
                await self._loop(consumer, producer, proc, summary)
            except _Abandoned as exc:
                log.warning("stopped while %s: that batch is not committed and will be replayed", exc)
            summary.stopped_by = self._stop_signal
        finally:
            consumer.close()
            if cluster is not None:
                cluster.shutdown()
            if producer is not None:
                producer.flush(5)
            if registry is not None:
                registry.close()
        summary.elapsed_s = time.monotonic() - t0
        return summary

    def _plan(self, consumer: Consumer) -> ReplaySummary:
        meta = consumer.list_topics(self.topic, timeout=15).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReplayError(f"no topic {self.topic!r} on {self.s.kafka_bootstrap}")
        marks = {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=15) for p in meta.partitions}
        resumes_stats = True
        if self.o.from_beginning:
            starts = {p: low for p, (low, _high) in marks.items()}
        elif self.o.from_offsets:
            if set(self.o.from_offsets) - set(marks):
                raise ReplayError(f"{self.topic} has partitions {sorted(marks)}, not {sorted(self.o.from_offsets)}")
            starts = dict(self.o.from_offsets)
        elif self.o.from_timestamp is not None:
            # Rounded up: a record stamped in the millisecond before the instant is not "at or after" it.
            starts = self._offsets_at(consumer, list(marks), -(-_us(self.o.from_timestamp) // 1000), marks)
        else:
            tps = consumer.committed([TopicPartition(self.topic, p) for p in sorted(marks)], timeout=15)
            committed = {tp.partition: (tp.offset, json.loads(tp.metadata or "{}")) for tp in tps if tp.offset >= 0}
            if not committed:
                raise ReplayError(f"group {self.o.group!r} has no position on {self.topic}: give a --from-* option")
            other = {m.get("ks") for _o, m in committed.values()} - {self.keyspace}
            if other and not self.o.dry_run:
                raise ReplayError(
                    f"group {self.o.group!r} was replaying into keyspace {other.pop()!r}, not {self.keyspace!r}: "
                    "pass that --keyspace, or a --from-* option to start over"
                )
            starts = {p: offset for p, (offset, _m) in committed.items()}
            resumes_stats = all(m.get("stats") for _o, m in committed.values())
        ends = {p: marks[p][1] for p in starts}
        if self.o.until is not None:
            after = self._offsets_at(consumer, list(starts), _us(self.o.until) // 1000 + 1, marks)
            ends = {p: min(ends[p], after[p]) for p in starts}
        parts, gaps = [], []
        for p in sorted(starts):
            low, high = marks[p]
            if not low <= starts[p] <= high:
                if self.o.explicit or starts[p] > high:
                    raise ReplayError(f"offset {starts[p]} of partition {p} is outside [{low}, {high}]")
                starts[p] = low  # retention deleted records since the last run: a hole
                gaps.append(p)
            elif self.o.explicit and starts[p] > 0:
                gaps.append(p)
            parts.append(PartitionSummary(p, starts[p], max(ends[p], starts[p]), starts[p]))
        stats, note = True, "written: this replay has every event of the users it replays"
        if self.o.dry_run:
            stats, note = False, "not written (dry run)"
        elif not resumes_stats:
            stats, note = False, "not written: the replay this run resumes did not start at the beginning"
        elif gaps:
            stats = False
            note = (
                f"not written: partition {gaps[0]} starts at offset {starts[gaps[0]]}, after the beginning of its "
                "history, so the sums would miss earlier events; the statistics rows are left as they are"
            )
        return ReplaySummary(self.topic, self.o.group, self.keyspace, self.o.dry_run, stats, note, parts)

    def _offsets_at(
        self, consumer: Consumer, partitions: list[int], ms: int, marks: dict[int, tuple[int, int]]
    ) -> dict[int, int]:
        """First offset with a timestamp (ms) at or after ``ms`` per partition; the end offset if none."""
        found = consumer.offsets_for_times([TopicPartition(self.topic, p, ms) for p in partitions], timeout=15)
        return {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1] for tp in found}

    def _prepare_kafka(self) -> None:
        """Create the dead-letter topic if missing (as the worker would: a dead letter must not wait for it), and
        on --from-* delete the group's positions, so a later resume never mixes two replays."""
        admin = AdminClient({"bootstrap.servers": self.s.kafka_bootstrap})
        steps = []
        if self.s.topic_dlq not in admin.list_topics(timeout=15).topics:
            created = admin.create_topics([NewTopic(self.s.topic_dlq, 1)])[self.s.topic_dlq]
            steps.append((created, KafkaError.TOPIC_ALREADY_EXISTS))  # a worker may create it meanwhile
        if self.o.explicit:
            deleted = admin.delete_consumer_groups([self.o.group], request_timeout=15)[self.o.group]
            steps.append((deleted, KafkaError.GROUP_ID_NOT_FOUND))
        for future, harmless in steps:
            try:
                future.result(timeout=30)
            except KafkaException as exc:
                if exc.args[0].code() != harmless:
                    raise ReplayError(f"cannot prepare Kafka for the replay: {exc}") from exc

    def _commit(self, consumer: Consumer, offsets: dict[int, int]) -> None:
        tps = [TopicPartition(self.topic, p, offset, self._meta) for p, offset in sorted(offsets.items())]
        failed = [tp for tp in consumer.commit(offsets=tps, asynchronous=False) or [] if tp.error]
        if failed:
            raise KafkaException(failed[0].error)

    def _dead_letter(self, producer: Producer | None) -> Callable[[Record, str, str], Any]:
        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._dlq_errors.append(str(err))

        async def dead_letter(rec: Record, reason: str, detail: str) -> None:
            if producer is None:
                return
            # The worker's headers; source=replay tells operators which one sent it.
            where = {"topic": rec.topic, "partition": str(rec.partition), "offset": str(rec.offset)}
            headers: dict[str, str | bytes | None] = {"reason": reason, "source": "replay", "detail": detail[:1000]}
            headers.update(where)
            producer.produce(self.s.topic_dlq, rec.value, rec.key, headers=headers, on_delivery=delivered)
            producer.poll(0)
            log.debug("dead-lettered %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, reason, detail)

        return dead_letter

    async def _loop(
        self, consumer: Consumer, producer: Producer | None, proc: Processor, summary: ReplaySummary
    ) -> None:
        parts = {p.partition: p for p in summary.partitions}
        active = {p for p, ps in parts.items() if ps.offset < ps.end}
        consumer.assign([TopicPartition(self.topic, p, parts[p].offset) for p in sorted(active)])
        until_ms = _us(self.o.until) // 1000 if self.o.until is not None else None
        while active and self._stop_signal is None:
            reached: dict[int, int] = {}
            finished: set[int] = set()
            batch: list[Record] = []
            for msg in consumer.consume(self.batch_size, 0.5):
                p, offset, err = msg.partition(), msg.offset() or 0, msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    if p in active or err.fatal():
                        raise ReplayError(f"reading {self.topic}[{p}]: {err}")
                    log.warning("kafka: %s", err)  # a client-wide event (broker down...): librdkafka retries
                if p not in active or p in finished:
                    continue
                end = parts[p].end
                if err is not None:
                    reached[p] = min(offset, end)  # at the log end, every record before it was delivered
                    finished.add(p)
                elif offset >= end or (until_ms is not None and msg.timestamp()[1] > until_ms):
                    reached[p] = min(offset, end)
                    finished.add(p)
                else:
                    batch.append(Record(msg.key(), msg.value() or b"", self.topic, p, offset))
                    reached[p] = offset + 1
                    if offset + 1 >= end:
                        finished.add(p)
            if not reached:
                continue
            results = await self._apply(proc, batch) if batch else {}
            dead = sum(r.dead_lettered for r in results.values())
            if dead:
                log.warning("%d records of this batch dead-lettered to %s", dead, self.s.topic_dlq)
            if not self.o.dry_run:
                if producer is not None and dead:
                    await self._until_done("flushing dead letters", partial(self._flush, producer))
                offsets = {p: ps.offset for p, ps in parts.items()} | reached
                await self._until_done("committing offsets", partial(self._commit, consumer, offsets))
            for p, offset in reached.items():
                r, ps = results.get(p, BatchResult()), parts[p]
                ps.offset, ps.records = offset, ps.records + r.applied + r.duplicates + r.dead_lettered
                ps.applied += r.applied
                ps.duplicates += r.duplicates
                ps.dead_lettered += r.dead_lettered
                summary.retries += r.retries
            if finished:
                active -= finished
                consumer.pause([TopicPartition(self.topic, p) for p in finished])
            self._progress(summary)

    async def _apply(self, proc: Processor, batch: list[Record]) -> dict[int, BatchResult]:
        """Write one batch, a processor call per partition (for per-partition counts) run concurrently; abandoned
        when a stop's grace period runs out."""
        keys = {r.key or b"" for r in batch}
        stats = cast(_Sink, proc.sink).stats
        if stats is not None:
            await self._until_done("reading statistics", partial(stats.load, {int(k) for k in keys if k.isdigit()}))
        by_partition: dict[int, list[Record]] = {}
        for rec in batch:
            by_partition.setdefault(rec.partition, []).append(rec)
        states = {k: self._users.get(k) for k in keys}
        task = asyncio.ensure_future(asyncio.gather(*(proc.process(recs, states) for recs in by_partition.values())))
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if self._stop_signal is not None and time.monotonic() - self._stop_at > self.o.stop_grace_s:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise _Abandoned("writing a batch")
        results = {}
        for p, (result, changed) in zip(by_partition, task.result(), strict=True):
            results[p] = result
            for key, state in changed.items():
                # Only the dedupe position is needed: the processor's statistics are never written.
                self._users[key] = {**state, "open_orders": {}, "stats": {}, "stats_version": {}}
        return results

    def _flush(self, producer: Producer) -> None:
        if self._dlq_errors:
            raise ReplayError(f"dead letters not delivered to {self.s.topic_dlq}: {self._dlq_errors[0]}")
        if producer.flush(5) > 0:
            raise TimeoutError("dead letters not acknowledged yet")

    async def _until_done(self, what: str, step: Callable[[], T]) -> T:
        """Retry ``step`` with back-off until it succeeds (never given up on a timer) or a stop comes."""
        delay = self.s.retry_initial_s
        while True:
            try:
                return await asyncio.get_running_loop().run_in_executor(None, step)
            except ReplayError:
                raise
            except Exception as exc:  # driver and client errors share no base class; each is worth a retry
                if self._stop_signal is not None:
                    raise _Abandoned(what) from exc
                log.warning("%s failed (retry in %.1fs): %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.s.retry_max_s)
