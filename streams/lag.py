"""Consumer lag per group and partition, in messages and in seconds.

Lag in messages is ``end offset - committed offset``. Lag in seconds is the
age of the oldest record the group has not consumed yet (the record at the
committed offset): it answers "how stale is what users read", which a message
count cannot on a topic whose rate varies.

Used by ``ohs lag`` (operators, alerting) and by the worker's Prometheus
gauges; it only reads, and never joins or moves the group it inspects.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

__all__ = ["LagError", "PartitionLag", "group_lag"]


class LagError(Exception):
    retriable = True


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
    """Age of the oldest unconsumed record; 0.0 when fully caught up."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def group_lag(bootstrap: str, group: str, topics: list[str] | None = None) -> list[PartitionLag]:
    """Lag of ``group`` on ``topics`` (default: every topic it has committed offsets on)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        committed_tps = futures[group].result(timeout=15).topic_partitions or []
        committed = {(tp.topic, tp.partition): tp.offset for tp in committed_tps}
        if topics is None:
            topics = sorted({t for t, _ in committed})
        metadata = admin.list_topics(timeout=15)
    except KafkaException as exc:
        raise LagError(f"cannot read offsets of group {group!r}: {exc}") from exc

    # A throw-away consumer that never subscribes: it reads watermarks and single records
    # by explicit assignment, so the inspected group is never joined or rebalanced.
    probe = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ohs-lag-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    out: list[PartitionLag] = []
    try:
        now = time.time()
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None:
                continue
            for partition in sorted(meta.partitions):
                low, high = probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                pos = committed.get((topic, partition), -1)
                start = pos if pos >= 0 else low
                lag = max(0, high - start)
                age = 0.0
                if lag:
                    ts = _record_timestamp(probe, topic, partition, start)
                    age = max(0.0, now - ts) if ts is not None else 0.0
                out.append(PartitionLag(group, topic, partition, pos, high, lag, round(age, 3)))
    except KafkaException as exc:
        raise LagError(f"cannot read watermarks: {exc}") from exc
    finally:
        probe.close()
    return out


def _record_timestamp(probe: Consumer, topic: str, partition: int, offset: int) -> float | None:
    """Timestamp (s) of the record at ``offset``, or None if it cannot be read quickly."""
    probe.assign([TopicPartition(topic, partition, offset)])
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            msg = probe.poll(0.2)
            if msg is None or msg.error():
                continue
            _kind, ts_ms = msg.timestamp()
            return ts_ms / 1000.0 if ts_ms > 0 else None
        return None
    finally:
        probe.unassign()
