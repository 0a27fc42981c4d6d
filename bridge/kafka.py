"""The bridge's Kafka side: topics, the producer, and the durable checkpoint.

Producer settings and why:

* ``enable.idempotence`` (implies ``acks=all`` and ordered retries): no
  duplicates from the producer's own retries, and per-partition order kept.
* ``message.timeout.ms=0``: never give a record up. While Kafka is away the
  queue fills, the bridge stops reading the feed (the engine journal holds
  everything), and nothing is dropped on a timer.
* ``partitioner=murmur2_random``: the Java client's and aiokafka's default, so
  a user's key lands on the partition Faust expects for its tables.
* ``linger.ms`` + ``compression.type=lz4``: batches for throughput.

The checkpoint is a record ``{epoch, watermark}`` in a compacted one-partition
topic, written from the same producer only after every seq up to the
watermark was acknowledged. A restarted bridge reads it back and asks the
engine to replay everything above it: some records may then exist twice in
the log (never fewer than once); consumers remove duplicates by seq.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bridge.errors import BridgeError
from bridge.settings import BridgeSettings

__all__ = ["ensure_topics", "make_producer", "read_checkpoint", "write_checkpoint"]

log = logging.getLogger("ohs.bridge")


def ensure_topics(s: BridgeSettings) -> None:
    """Create the bridge's topics with the configured partitions/retention if missing."""
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    try:
        existing = set(admin.list_topics(timeout=30).topics)
    except KafkaException as exc:
        raise BridgeError(f"cannot reach Kafka at {s.kafka_bootstrap}: {exc}", retriable=True) from exc
    retention = {"retention.ms": str(s.retention_ms)}
    wanted = [
        NewTopic(s.topic_updates, s.partitions, 1, config=retention),
        NewTopic(s.topic_trades, s.partitions, 1, config=retention),
        NewTopic(s.topic_balances, s.partitions, 1, config=retention),
        NewTopic(s.topic_dlq, 1, 1, config=retention),
        NewTopic(s.topic_checkpoint, 1, 1, config={"cleanup.policy": "compact"}),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return
    for topic, fut in admin.create_topics(missing, operation_timeout=30).items():
        try:
            fut.result(timeout=30)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BridgeError(f"cannot create topic {topic}: {exc}") from exc


def make_producer(s: BridgeSettings, on_error: Callable[[KafkaError], None]) -> Producer:
    return Producer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": 0,
            "partitioner": "murmur2_random",
            "linger.ms": s.linger_ms,
            "compression.type": s.compression,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": max(s.max_in_flight * 3, 100_000),
            "queue.buffering.max.kbytes": 1_048_576,
            "message.max.bytes": max(s.max_message_bytes * 2, 2_000_000),
            "error_cb": on_error,
        }
    )


def write_checkpoint(producer: Producer, s: BridgeSettings, epoch: int, watermark: int) -> None:
    value = json.dumps({"epoch": epoch, "watermark": watermark}).encode()
    producer.produce(s.topic_checkpoint, key=s.bridge_id.encode(), value=value)


def read_checkpoint(s: BridgeSettings) -> tuple[int, int] | None:
    """(epoch, watermark) of this bridge's last checkpoint, or None if it has none."""
    consumer = Consumer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "group.id": f"{s.bridge_id}-checkpoint-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        tp = TopicPartition(s.topic_checkpoint, 0)
        low, high = consumer.get_watermark_offsets(tp, timeout=30)
        if high <= low:
            return None
        # Compaction keeps the latest per key, but another bridge id may share the topic:
        # read a bounded tail and keep this bridge's newest record.
        consumer.assign([TopicPartition(s.topic_checkpoint, 0, max(low, high - 1000))])
        found: dict[str, Any] | None = None
        while True:
            msg = consumer.poll(10)
            if msg is None:
                raise BridgeError("timed out reading the checkpoint topic", retriable=True)
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise BridgeError(f"reading the checkpoint: {err}", retriable=True)
            if msg.key() == s.bridge_id.encode():
                found = json.loads(msg.value() or b"{}")
            if (msg.offset() or 0) >= high - 1:
                break
        return None if found is None else (int(found["epoch"]), int(found["watermark"]))
    except KafkaException as exc:
        raise BridgeError(f"cannot read the checkpoint: {exc}", retriable=True) from exc
    finally:
        consumer.close()
