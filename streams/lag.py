"""Consumer lag per group and partition, in messages and in seconds, and who owns each partition.

Lag in messages is ``end offset - committed offset``. Lag in seconds is the
age of the oldest record the group has not consumed yet (the record at the
committed offset): it answers "how stale is what users read", which a message
count cannot on a topic whose rate varies.

Used by ``ohs lag`` (operators, alerting) and by the worker's Prometheus
gauges; it only reads, and never joins, rebalances or commits to the group it
inspects.

How it reads, and why not librdkafka's ListConsumerGroupOffsets (AdminClient): that call kills
the process on paths an outage or a fresh cluster takes (a NOT_COORDINATOR answer dereferences
an absent consumer group: SIGSEGV, librdkafka #5040; see api/live.py). The committed offsets are
read with ``Consumer.committed`` of a consumer that carries the inspected group id but never
subscribes: the consumer's own OffsetFetch path, which handles those answers. The same consumer
reads watermarks and, by explicit assignment, the record at each committed offset.

Who owns each partition (``members=True``, what ``ohs lag`` shows) needs DescribeConsumerGroups,
an AdminClient call; it is made only after the consumer has reached the cluster, and the worker's
gauges never make it. It also tells a group that does not exist (state DEAD) from an idle one.

librdkafka logs nothing on stderr here: its log level is 0 and its logs go to a silent logger;
failures surface as ``LagError`` with a one-line message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streams.errors import StreamsError

__all__ = [
    "GroupLag",
    "GroupNotFound",
    "KafkaUnreachable",
    "LagError",
    "LagReader",
    "PartitionLag",
    "describe_lag",
    "group_lag",
]

_kafka_log = logging.getLogger("ohs.lag.kafka")
_kafka_log.addHandler(logging.NullHandler())
_kafka_log.propagate = False

# librdkafka's own logging: nothing on stderr (log level 0 = emergencies only, and a logger that
# drops them), so a script calling `ohs lag` sees one line of ours, never librdkafka's noise.
QUIET: dict[str, Any] = {"log_level": 0, "logger": _kafka_log}

_READ_RECORD_S = 5.0
"""Longest wait for the records at the committed offsets (their timestamps give the lag in
seconds); a read with a shorter timeout waits that long at most."""


class LagError(StreamsError):
    """Lag could not be read; the message is one line, fit for a terminal."""

    retriable = True


class KafkaUnreachable(LagError):
    """No broker answered (or answered an error) within the timeout."""

    retriable = True


class GroupNotFound(LagError):
    """The broker knows no such group: no member and no committed offset."""

    retriable = False


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int
    """Next offset the group will read; -1 when the group never committed here."""
    end: int
    """Log end offset (high watermark)."""
    lag_messages: int
    lag_seconds: float
    """Age of the oldest unconsumed record; 0.0 when fully caught up (or when it could not be read)."""
    consumer_id: str = ""
    """Member owning the partition now ("" when no member has it: the group is empty or rebalancing)."""
    host: str = ""
    client_id: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class GroupLag:
    group: str
    state: str
    """The coordinator's view: STABLE, EMPTY, PREPARING_REBALANCE, ...; UNKNOWN when not asked."""
    members: int
    partitions: list[PartitionLag] = field(default_factory=list)
    missing_topics: list[str] = field(default_factory=list)
    """Topics asked for that the cluster does not have."""

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.group,
            "state": self.state,
            "members": self.members,
            "partitions": [p.as_dict() for p in self.partitions],
            "missing_topics": self.missing_topics,
        }


def group_lag(
    bootstrap: str,
    group: str,
    topics: list[str] | None = None,
    *,
    timeout_s: float = 15.0,
    config: dict[str, Any] | None = None,
) -> list[PartitionLag]:
    """Lag of ``group`` on ``topics`` (default: every topic it has committed offsets on).

    Never an AdminClient call (the worker's gauges call this every few seconds). Raises
    ``LagError``; an unknown group simply has nothing committed (``committed == -1``)."""
    return describe_lag(bootstrap, group, topics, timeout_s=timeout_s, members=False, config=config).partitions


def describe_lag(
    bootstrap: str,
    group: str,
    topics: list[str] | None = None,
    *,
    timeout_s: float = 15.0,
    members: bool = True,
    config: dict[str, Any] | None = None,
) -> GroupLag:
    """Lag of ``group`` per partition; with ``members``, who owns each partition and whether the
    group exists at all (``GroupNotFound`` when the coordinator knows neither a member nor an
    offset of it). ``topics`` default: what the group has committed offsets on or is assigned."""
    extra = dict(config or {})
    consumer = _consumer(bootstrap, group, extra)
    try:
        return _read(consumer, bootstrap, group, topics, timeout_s, members, extra)
    finally:
        consumer.close()


class LagReader:
    """One group's lag read again and again through one consumer (``ohs run``'s progress line
    reads it every second: a consumer per read would connect and fetch metadata each time).
    The same reads as ``group_lag``: it never joins, rebalances or commits to the group."""

    def __init__(self, bootstrap: str, group: str, *, config: dict[str, Any] | None = None) -> None:
        self.bootstrap, self.group = bootstrap, group
        self._extra = dict(config or {})
        self._consumer = _consumer(bootstrap, group, self._extra)

    def read(self, topics: list[str], timeout_s: float = 2.0) -> list[PartitionLag]:
        """Lag of each partition of ``topics`` (those the cluster has). Raises ``LagError``."""
        return _read(self._consumer, self.bootstrap, self.group, topics, timeout_s, False, self._extra).partitions

    def close(self) -> None:
        self._consumer.close()


# ------------------------------------------------------------------------------ internals


def _consumer(bootstrap: str, group: str, extra: dict[str, Any]) -> Any:
    # The inspected group's id, but never subscribed and never committing: its OffsetFetch reads
    # the group's offsets; it joins nothing. Explicit assignments read single records.
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            **QUIET,
            **extra,
        }
    )


def _read(
    consumer: Any,
    bootstrap: str,
    group: str,
    topics: list[str] | None,
    timeout_s: float,
    members: bool,
    extra: dict[str, Any],
) -> GroupLag:
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnreachable(f"cannot reach Kafka at {bootstrap}: {_reason(exc)}") from exc
    state, member_count = "UNKNOWN", 0
    owners: dict[tuple[str, int], tuple[str, str, str]] = {}
    if members:
        state, member_count, owners = _describe(bootstrap, group, timeout_s, extra)
    existing = {
        name: sorted(meta.partitions)
        for name, meta in metadata.topics.items()
        if meta.error is None and not name.startswith("__")
    }
    candidates = sorted(existing) if topics is None else [t for t in topics if t in existing]
    missing = [t for t in topics or [] if t not in existing]
    committed = _committed(consumer, [(t, p) for t in candidates for p in existing[t]], timeout_s)
    if topics is None:
        wanted = {t for (t, _), off in committed.items() if off >= 0} | {t for t, _ in owners}
        candidates = [t for t in candidates if t in wanted]
    if members and state == "DEAD" and not any(off >= 0 for off in committed.values()):
        raise GroupNotFound(f"consumer group {group!r} does not exist (no member, no committed offset)")
    rows = _rows(consumer, group, [(t, p) for t in candidates for p in existing[t]], committed, owners, timeout_s)
    return GroupLag(group, state, member_count, rows, missing)


def _reason(exc: BaseException) -> str:
    """A KafkaException's text without its KafkaError{...} wrapper."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return err.str()
    return str(exc) or type(exc).__name__


def _describe(
    bootstrap: str, group: str, timeout_s: float, extra: dict[str, Any]
) -> tuple[str, int, dict[tuple[str, int], tuple[str, str, str]]]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET, **extra})
    try:
        future = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group]
        desc = future.result(timeout=timeout_s + 5)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return "DEAD", 0, {}
        raise KafkaUnreachable(f"cannot describe group {group!r} at {bootstrap}: {_reason(exc)}") from exc
    except TimeoutError as exc:
        raise KafkaUnreachable(f"cannot describe group {group!r} at {bootstrap}: timed out") from exc
    owners: dict[tuple[str, int], tuple[str, str, str]] = {}
    for m in desc.members or []:
        assignment = m.assignment.topic_partitions if m.assignment is not None else []
        for tp in assignment or []:
            owners[(tp.topic, tp.partition)] = (m.member_id, (m.host or "").lstrip("/"), m.client_id or "")
    state = getattr(desc.state, "name", str(desc.state))
    return state, len(desc.members or []), owners


def _committed(consumer: Any, tps: list[tuple[str, int]], timeout_s: float) -> dict[tuple[str, int], int]:
    if not tps:
        return {}
    try:
        got = consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnreachable(f"cannot read committed offsets: {_reason(exc)}") from exc
    return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else -1) for tp in got}


def _rows(
    consumer: Any,
    group: str,
    tps: Iterable[tuple[str, int]],
    committed: dict[tuple[str, int], int],
    owners: dict[tuple[str, int], tuple[str, str, str]],
    timeout_s: float,
) -> list[PartitionLag]:
    now = time.time()
    marks: list[tuple[str, int, int, int, int]] = []
    """(topic, partition, committed, first unconsumed offset, end)"""
    try:
        for topic, partition in tps:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            pos = committed.get((topic, partition), -1)
            # Never committed: everything still in the log is unconsumed (retention may have
            # removed records below a committed offset too: those count as consumed).
            start = max(low, pos) if pos >= 0 else low
            marks.append((topic, partition, pos, start, high))
    except KafkaException as exc:
        raise KafkaUnreachable(f"cannot read watermarks: {_reason(exc)}") from exc
    stamps = _timestamps(
        consumer, [(t, p, start) for t, p, _, start, end in marks if end > start], min(_READ_RECORD_S, timeout_s)
    )
    out = []
    for topic, partition, pos, start, end in marks:
        lag = max(0, end - start)
        ts = stamps.get((topic, partition)) if lag else None
        age = round(max(0.0, now - ts), 3) if ts is not None else 0.0
        member, host, client = owners.get((topic, partition), ("", "", ""))
        out.append(PartitionLag(group, topic, partition, pos, end, lag, age, member, host, client))
    return out


def _timestamps(consumer: Any, starts: list[tuple[str, int, int]], wait_s: float) -> dict[tuple[str, int], float]:
    """Timestamp (s) of the record at each (topic, partition, offset), read by one assignment of
    them all; those not read within a few seconds are left out."""
    if not starts:
        return {}
    wanted = {(t, p): off for t, p, off in starts}
    out: dict[tuple[str, int], float] = {}
    consumer.assign([TopicPartition(t, p, off) for t, p, off in starts])
    try:
        deadline = time.monotonic() + wait_s
        while len(out) < len(wanted) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            key = (msg.topic(), msg.partition())
            if key in out or key not in wanted:
                continue
            _kind, ts_ms = msg.timestamp()
            out[key] = ts_ms / 1000.0 if ts_ms > 0 else 0.0  # seen: later records of it are ignored
    except KafkaException as exc:
        raise KafkaUnreachable(f"cannot read records: {_reason(exc)}") from exc
    finally:
        consumer.unassign()
    return {k: v for k, v in out.items() if v > 0}
