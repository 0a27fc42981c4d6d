"""``ohs replay``: re-apply a Kafka topic to the Cassandra tables, to backfill or rebuild them.

The worker's pipeline without Faust: the same ``Processor`` (rules, dead letters, per-user seq
dedupe, write retries) and ``CassandraSink`` (``USING TIMESTAMP epoch+seq``), so replaying over
rows that are right rewrites identical cells and changes nothing. Dedupe state starts empty: it
only has to drop the duplicates inside what this run reads.

``--what trades`` replays the trades topic into the users' fills (``user_trades`` and its month
index) through the worker's ``TradeProcessor`` and the same sink's ``fill_statements``: a fill row
depends on its trade alone, so there is no state, and no statistics to hold back. One kind per
run, each with its own default group (``ohs-replay``, ``ohs-replay-trades``), since a ``--from-*``
deletes the positions of its group on every topic.

Positions belong to the replay's own group: manual assignment (it never joins a group), no
auto-commit, the worker's group never touched. A batch's offsets are committed only once it is
durable in Cassandra and its dead letters acknowledged, so the same command without ``--from-*``
resumes; ``--from-*`` deletes the group's positions and starts a new replay.

One replay per group at a time, or two would commit over each other's positions (and a second
``--from-*`` would delete the first's). The group cannot be the lock: manual assignment never
joins it, and a subscribing member would be handed a share of the partitions, not refused. So the
lock is a lease row per group in the target keyspace (``replay_leases``), taken with a lightweight
transaction (``INSERT ... IF NOT EXISTS``: Paxos, so of two replays starting together exactly one
wins), written with a TTL and renewed every third of it while the replay runs. A replay killed
with -9 stops renewing, and its row expires by itself ``--lease-ttl`` seconds later at most; one
that ends releases it at once. Before each commit the holder checks that its lease is still
valid (renewing it if needed) and stops, committing nothing, if another replay took it over. A
dry run writes and commits nothing, so it takes no lease.

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
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from cassandra.concurrent import execute_concurrent_with_args
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from kit.retry import retrying, unless_final
from schemas.events import OrderUpdate
from schemas.registry import Registry
from streams.errors import StreamsError
from streams.migrate import migrate
from streams.processor import BatchResult, Processor, Record
from streams.settings import WorkerSettings
from streams.sink import CassandraSink, StatsRow, connect
from streams.state import ALL_SYMBOLS, STAT_FIELDS, UserState, increments
from streams.trades import TradeProcessor, TradesSettings

__all__ = ["GROUPS", "PartitionSummary", "Replay", "ReplayError", "ReplayOptions", "ReplaySummary"]

log = logging.getLogger("ohs.replay")
T = TypeVar("T")
Applied = Sequence[tuple[OrderUpdate, bytes]]
_STATUS_COUNTS = len(STAT_FIELDS) - 3
"""The orders_* fields come first: each event counts in exactly one of them."""
GROUPS = {"updates": "ohs-replay", "trades": "ohs-replay-trades"}
"""What can be replayed, and the default group of each."""


def _us(when: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (Kafka timestamps are whole ms: float seconds could be off by one)."""
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


class ReplayError(StreamsError):
    """The replay cannot start or go on: bad options, no topic, a refused group or keyspace."""

    retriable = False


class _Abandoned(Exception):
    """A stop came while a step was still retrying or writing."""


@dataclass(frozen=True)
class ReplayOptions:
    what: str = "updates"  # or "trades": the fills (GROUPS)
    group: str = ""  # default: GROUPS[what]
    topic: str | None = None  # default: the worker's topic of ``what``
    keyspace: str | None = None  # default: the worker's (live) keyspace
    from_beginning: bool = False
    from_offsets: dict[int, int] = field(default_factory=dict)
    from_timestamp: dt.datetime | None = None
    until: dt.datetime | None = None  # None: the end offsets taken at start
    dry_run: bool = False
    batch_size: int | None = None  # default: the worker's
    stop_grace_s: float = 10.0  # how long a stop waits for the batch being written
    lease_ttl_s: float = 30.0  # how long a killed replay keeps its group locked, at most

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
    what: str = "updates"

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

    def apply(self, applied: Applied) -> list[StatsRow]:
        touched: dict[int, set[str]] = {}
        newest: dict[int, int] = {}
        for ev, _ in applied:
            user = self.rows.setdefault(ev.user_id, {})
            inc = dict(zip(STAT_FIELDS, increments(ev), strict=True))
            for symbol in (ev.symbol, ALL_SYMBOLS):
                values, counted = user.get(symbol, (dict.fromkeys(STAT_FIELDS, 0), (0, 0)))
                if (ev.epoch, ev.seq) <= counted:
                    continue
                user[symbol] = ({f: min(values[f] + inc[f], 2**63 - 1) for f in STAT_FIELDS}, (ev.epoch, ev.seq))
                touched.setdefault(ev.user_id, set()).add(symbol)
            newest[ev.user_id] = max(newest.get(ev.user_id, 0), ev.epoch)
        out = []
        for user_id, symbols in touched.items():
            rows = self.rows[user_id]
            # The worker's timestamp rule (UserState.stats_timestamp): newest epoch + events applied,
            # which is the '*' row's status counts, so a replay and the worker write the same cells.
            everything = rows[ALL_SYMBOLS][0]
            version = sum(everything[f] for f in STAT_FIELDS[:_STATUS_COUNTS])
            epoch = max(newest[user_id], max(c[0] for _v, c in rows.values()))
            for symbol in sorted(symbols):
                values, (last_epoch, last_seq) = rows[symbol]
                out.append(
                    StatsRow(user_id, symbol, [values[f] for f in STAT_FIELDS], last_epoch, last_seq, epoch + version)
                )
        return out


class _Sink:
    """What the processor writes through: the worker's sink with this replay's statistics, or nothing (dry run)."""

    def __init__(self, inner: CassandraSink | None = None, stats: _Statistics | None = None) -> None:
        self.inner, self.stats = inner, stats

    def statements(self, applied: Applied, stats: Sequence[StatsRow]) -> Any:
        # The processor's sums start at this run's first record: never the ones to write.
        rows = self.stats.apply(applied) if self.stats is not None else []
        return self.inner.statements(applied, rows) if self.inner is not None else None

    async def write(self, pending: Any) -> None:
        if self.inner is not None and pending is not None:
            await self.inner.write(pending)


class _Lease:
    """The lease row of one group in ``<keyspace>.replay_leases`` (see the module docstring)."""

    def __init__(self, session: Any, keyspace: str, group: str, ttl_s: float) -> None:
        self.session, self.group, self.ttl = session, group, max(3, round(ttl_s))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        # Expired cells leave tombstones: gc_grace bounds how long (one row per group, renewed rarely).
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {keyspace}.replay_leases (grp text PRIMARY KEY, owner text, host text, "
            "pid int, since timestamp) WITH gc_grace_seconds = 3600",
            timeout=60,
        )
        table = f"{keyspace}.replay_leases"
        self._take = session.prepare(
            f"INSERT INTO {table} (grp, owner, host, pid, since) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
        )
        # Every column again: a renewal must extend every cell's TTL, or the row would lose them one by one.
        self._renew = session.prepare(
            f"UPDATE {table} USING TTL ? SET owner = ?, host = ?, pid = ?, since = ? WHERE grp = ? IF owner = ?"
        )
        self._drop = session.prepare(f"DELETE FROM {table} WHERE grp = ? IF owner = ?")
        self._since = dt.datetime.now(dt.UTC)
        self._valid_until = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def margin_s(self) -> float:
        # A commit checked just before expiry still has to reach the broker: keep a third of the TTL spare.
        return self.ttl / 3

    def acquire(self) -> None:
        """Take the lease or raise ReplayError naming who holds it; then keep it renewed in a thread."""
        if not self._try_take():
            raise ReplayError(self._lost or f"group {self.group!r} has an active replay")
        self._thread = threading.Thread(target=self._renewer, name="ohs-replay-lease", daemon=True)
        self._thread.start()

    def _try_take(self) -> bool:
        sent = time.monotonic()
        row = self.session.execute(
            self._take, (self.group, self.owner, self.host, self.pid, self._since, self.ttl)
        ).one()
        # Not applied but ours: a first attempt that timed out had in fact succeeded.
        if row[0] or row.owner == self.owner:
            self._valid_until = sent + self.ttl - self.margin_s
            return True
        since = row.since.replace(tzinfo=dt.UTC).isoformat(timespec="seconds") if row.since else "?"
        self._lost = (
            f"group {self.group!r} has an active replay (host {row.host}, pid {row.pid}, since {since}): wait for it "
            f"to end, or, if it was killed, for its lease to expire (at most {self.ttl} s after it stopped); "
            "or give another --group"
        )
        return False

    def _renew_once(self) -> None:
        sent = time.monotonic()
        row = self.session.execute(
            self._renew, (self.ttl, self.owner, self.host, self.pid, self._since, self.group, self.owner)
        ).one()
        if row[0]:
            self._valid_until = sent + self.ttl - self.margin_s
        elif not self._try_take():  # expired (we were stalled), and then another replay took it
            log.error("lost the lease of group %r: %s", self.group, self._lost)

    def _renewer(self) -> None:
        # Nothing may end this thread early: a failed renewal is retried at the next tick, and check()
        # stops the commits once the lease is no longer known to be valid.
        while not self._stop.wait(self.ttl / 3) and self._lost is None:
            try:
                self._renew_once()
            except Exception as exc:  # driver errors share no base class; the next tick retries
                log.warning("renewing the lease of group %r failed: %r", self.group, exc)

    def check(self) -> None:
        """Before a commit: ReplayError if another replay holds the lease now; TimeoutError (retriable) while
        it cannot be confirmed (Cassandra unreachable)."""
        if self._lost is None and time.monotonic() >= self._valid_until:
            self._renew_once()
        if self._lost is not None:
            raise ReplayError(f"stopped without committing: {self._lost}")
        if time.monotonic() >= self._valid_until:
            raise TimeoutError(f"the lease of group {self.group!r} could not be renewed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._lost is None:
            try:
                self.session.execute(self._drop, (self.group, self.owner), timeout=10)
            except Exception as exc:  # it expires by itself anyway
                log.warning(
                    "releasing the lease of group %r failed (it expires in %d s): %r", self.group, self.ttl, exc
                )


class Replay:
    def __init__(self, settings: WorkerSettings, options: ReplayOptions) -> None:
        if sum((options.from_beginning, bool(options.from_offsets), options.from_timestamp is not None)) > 1:
            raise ReplayError("give at most one of --from-beginning, --from-offset, --from-timestamp")
        if options.what not in GROUPS:
            raise ReplayError(f"cannot replay {options.what!r}: give one of {', '.join(GROUPS)}")
        options = replace(options, group=options.group or GROUPS[options.what])
        if options.group == settings.group:
            raise ReplayError(f"group {options.group!r} is the live worker's: the replay needs a group of its own")
        self.s, self.o = settings, options
        self.trades = options.what == "trades"
        default_topic = TradesSettings().topic_trades if self.trades else settings.topic_updates
        self.topic = options.topic or default_topic
        self.keyspace = options.keyspace or settings.keyspace
        self.batch_size = options.batch_size or settings.batch_size
        self._stop_signal: int | None = None
        self._stop_at = 0.0
        self._meta = ""
        self._progress: Callable[[ReplaySummary], None] = lambda _s: None
        self._dlq_errors: list[str] = []
        self._users: dict[bytes, UserState] = {}
        self._lease: _Lease | None = None

    def stop(self, signum: int) -> None:
        """Ask the run to stop (safe in a signal handler); the summary reports ``signum``."""
        if self._stop_signal is None:
            self._stop_signal, self._stop_at = signum, time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stop_signal is not None

    def _kafka(self) -> dict[str, Any]:
        """What every Kafka client of the replay starts from: the brokers and this process's credentials."""
        return {"bootstrap.servers": self.s.kafka_bootstrap, **self.s.kafka_auth.librdkafka()}

    def run(self, progress: Callable[[ReplaySummary], None] | None = None) -> ReplaySummary:
        """Replay up to the end positions or a stop; ``progress`` is called after every batch."""
        self._progress = progress or self._progress
        return asyncio.run(self._run())

    async def _run(self) -> ReplaySummary:
        t0 = time.monotonic()
        config = {**self._kafka(), "group.id": self.o.group, "enable.auto.commit": False}
        # Positions are always explicit: one deleted under us (retention) must fail, not jump elsewhere.
        consumer = Consumer({**config, "enable.partition.eof": True, "auto.offset.reset": "error"})
        cluster, producer = None, None
        registry = Registry(self.s.schema_registry_url) if self.s.schema_registry_url else None
        try:
            if not self.o.dry_run:
                cluster, session = connect(self.s)
                migrate(session, self.s, self.keyspace)
                # Before anything reads or changes the group's positions: they are the lease holder's.
                self._lease = _Lease(session, self.keyspace, self.o.group, self.o.lease_ttl_s)
                self._lease.acquire()
            summary = self._plan(consumer)
            self._meta = json.dumps({"ks": self.keyspace, "stats": summary.statistics}, separators=(",", ":"))
            sink, fills = _Sink(), None
            if not self.o.dry_run:
                resume = any(p.start > 0 for p in summary.partitions)
                stats = _Statistics(session, self.keyspace, resume) if summary.statistics else None
                fills = CassandraSink(session, self.s, self.keyspace)
                sink = _Sink(fills, stats)
                # message.timeout.ms=0: a dead letter is never given up on a timer, like the bridge's records
                producer = Producer({**self._kafka(), "enable.idempotence": True, "message.timeout.ms": 0})
                self._prepare_kafka()
                if self.o.explicit:
                    self._commit(consumer, {p.partition: p.offset for p in summary.partitions})
            proc = self._processor(sink, fills, self._dead_letter(producer), registry)
            log.info("statistics %s", summary.statistics_note)
            self._progress(summary)
            try:
                await self._loop(consumer, producer, proc, summary)
            except _Abandoned as exc:
                log.warning("stopped while %s: that batch is not committed and will be replayed", exc)
            summary.stopped_by = self._stop_signal
        finally:
            consumer.close()
            if self._lease is not None:
                self._lease.release()
            if cluster is not None:
                cluster.shutdown()
            if producer is not None:
                producer.flush(5)
            if registry is not None:
                registry.close()
        summary.elapsed_s = time.monotonic() - t0
        return summary

    def _processor(
        self, sink: _Sink, fills: CassandraSink | None, dead_letter: Callable[[Record, str, str], Any], registry: Any
    ) -> Processor:
        """The worker's processor of ``what``, writing through ``sink`` (order updates) or ``fills``
        (trades; None in a dry run: fills counted, nothing written)."""
        initial, most = self.s.retry_initial_s, self.s.retry_max_s
        if self.trades:
            return TradeProcessor(fills, dead_letter, registry=registry, retry_initial_s=initial, retry_max_s=most)
        # stats=False: the sink computes them (_Statistics): this run may not start at the beginning.
        return Processor(sink, dead_letter, registry=registry, stats=False, retry_initial_s=initial, retry_max_s=most)

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
        if self.trades:
            stats, note = False, "not written: fills have none (the order updates' replay writes them)"
        elif self.o.dry_run:
            stats, note = False, "not written (dry run)"
        elif not resumes_stats:
            stats, note = False, "not written: the replay this run resumes did not start at the beginning"
        elif gaps:
            stats = False
            note = (
                f"not written: partition {gaps[0]} starts at offset {starts[gaps[0]]}, after the beginning of its "
                "history, so the sums would miss earlier events; the statistics rows are left as they are"
            )
        summary = ReplaySummary(self.topic, self.o.group, self.keyspace, self.o.dry_run, stats, note, parts)
        summary.what = self.o.what
        return summary

    def _offsets_at(
        self, consumer: Consumer, partitions: list[int], ms: int, marks: dict[int, tuple[int, int]]
    ) -> dict[int, int]:
        """First offset with a timestamp (ms) at or after ``ms`` per partition; the end offset if none."""
        found = consumer.offsets_for_times([TopicPartition(self.topic, p, ms) for p in partitions], timeout=15)
        return {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1] for tp in found}

    def _prepare_kafka(self) -> None:
        """Create the dead-letter topic if missing (as the worker would: a dead letter must not wait for it), and
        on --from-* delete the group's positions, so a later resume never mixes two replays."""
        admin = AdminClient(self._kafka())
        steps = []
        if self.s.topic_dlq not in admin.list_topics(timeout=15).topics:
            topic = NewTopic(self.s.topic_dlq, 1, self.s.topic_replication_factor)
            created = admin.create_topics([topic])[self.s.topic_dlq]
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
        if self._lease is not None:
            self._lease.check()  # only the lease holder moves the group's positions
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
                    batch.append(Record(msg.key(), msg.value(), self.topic, p, offset))
                    reached[p] = offset + 1
                    if offset + 1 >= end:
                        finished.add(p)
            if not reached:
                continue
            results = await self._apply(proc, batch) if batch else {}
            read: dict[int, int] = {}
            for rec in batch:
                read[rec.partition] = read.get(rec.partition, 0) + 1
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
                # Records as read: a trade's record can be two fills (a self-trade), so not applied + the rest.
                ps.offset, ps.records = offset, ps.records + read.get(p, 0)
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
        stats = proc.sink.stats if isinstance(proc.sink, _Sink) else None
        if stats is not None:
            await self._until_done("reading statistics", partial(stats.load, {int(k) for k in keys if k.isdigit()}))
        by_partition: dict[int, list[Record]] = {}
        for rec in batch:
            by_partition.setdefault(rec.partition, []).append(rec)
        users = self._users

        def load(key: bytes) -> UserState:
            # The dedupe state of this run only: it drops the duplicates inside what the run reads.
            state = users.get(key)
            if state is None:
                state = users[key] = UserState()
            return state

        task = asyncio.ensure_future(asyncio.gather(*(proc.process(recs, load) for recs in by_partition.values())))
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if self._stop_signal is not None and time.monotonic() - self._stop_at > self.o.stop_grace_s:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise _Abandoned("writing a batch")
        results = {}
        for p, (result, _changed) in zip(by_partition, task.result(), strict=True):
            results[p] = result  # the states changed in place (load hands out this run's objects)
        return results

    def _flush(self, producer: Producer) -> None:
        if self._dlq_errors:
            raise ReplayError(f"dead letters not delivered to {self.s.topic_dlq}: {self._dlq_errors[0]}")
        if producer.flush(5) > 0:
            raise TimeoutError("dead letters not acknowledged yet")

    async def _until_done(self, what: str, step: Callable[[], T]) -> T:
        """Retry ``step`` with jittered back-off until it succeeds (never given up on a timer) or a stop
        comes. Kafka's and the driver's errors share no base class and each is worth a retry; the
        project's own errors are retried only when their class says so (a ``ReplayError`` is not)."""
        loop = asyncio.get_running_loop()
        try:
            async for attempt in retrying(
                self.s.retry_initial_s,
                self.s.retry_max_s,
                retry=unless_final,
                stop=lambda: self._stop_signal is not None,
                what=what,
                log=log,
            ):
                with attempt:
                    return await loop.run_in_executor(None, step)
        except Exception as exc:
            if unless_final(exc) and self._stop_signal is not None:
                raise _Abandoned(what) from exc
            raise
        raise AssertionError("unreachable")
