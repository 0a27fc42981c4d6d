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

The checkpoint (``schemas.checkpoint`` describes the record and its seq ceiling) lives in a
compacted one-partition topic, written from the same producer. A restarted bridge reads it back
and asks the engine to replay everything above the watermark: some records may then exist twice
in the log (never fewer than once); consumers remove duplicates by seq.

Every Kafka failure at start is a ``BridgeError``: ``BridgeUnavailable`` (retriable) when waiting
can help (the broker is down or still starting), ``BridgeError`` itself when not (a setting the
broker refuses).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bridge.errors import BridgeError, BridgeUnavailable
from bridge.settings import BridgeSettings
from schemas.checkpoint import Checkpoint, CheckpointError

__all__ = ["Checkpoint", "KafkaIO", "ensure_topics", "make_producer", "read_checkpoint", "write_checkpoint"]

log = logging.getLogger("ohs.bridge")

# Refusals that waiting cannot fix. Anything else at start (no broker, a broker still
# registering: INVALID_REPLICATION_FACTOR "only 0 brokers", timeouts) is retried.
_PERMANENT = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.INVALID_CONFIG,
    KafkaError.POLICY_VIOLATION,
    KafkaError.INVALID_PARTITIONS,
    KafkaError.TOPIC_EXCEPTION,
}


def _retriable(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return not isinstance(err, KafkaError) or err.code() not in _PERMANENT


def client_config(s: BridgeSettings) -> dict[str, Any]:
    """What every Kafka client of the bridge starts from: the brokers and this process's credentials."""
    return {"bootstrap.servers": s.kafka_bootstrap, **s.kafka_auth.librdkafka()}


def ensure_topics(s: BridgeSettings) -> None:
    """Create the bridge's topics with the configured partitions/retention/replicas if missing."""
    admin = AdminClient(client_config(s))
    timeout = s.kafka_timeout_ms / 1000.0
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BridgeUnavailable(f"cannot reach Kafka at {s.kafka_bootstrap}: {exc}") from exc
    retention = {"retention.ms": str(s.retention_ms)}
    rf = s.replication_factor
    wanted = [
        NewTopic(s.topic_updates, s.partitions, rf, config=retention),
        NewTopic(s.topic_trades, s.partitions, rf, config=retention),
        NewTopic(s.topic_balances, s.partitions, rf, config=retention),
        NewTopic(s.topic_dlq, 1, rf, config=retention),
        NewTopic(s.topic_checkpoint, 1, rf, config={"cleanup.policy": "compact"}),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return
    for topic, fut in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                cls = BridgeUnavailable if _retriable(exc) else BridgeError
                raise cls(f"cannot create topic {topic}: {exc}") from exc
        except Exception as exc:  # a future that timed out (concurrent.futures.TimeoutError)
            raise BridgeUnavailable(f"cannot create topic {topic}: {type(exc).__name__} {exc}") from exc


def make_producer(s: BridgeSettings, on_error: Callable[[KafkaError], None]) -> Producer:
    return Producer(
        {
            **client_config(s),
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": 0,
            "partitioner": "murmur2_random",
            "linger.ms": s.linger_ms,
            "compression.type": s.compression,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": max(s.max_in_flight * 3, 100_000),
            "queue.buffering.max.kbytes": 1_048_576,
            # A protocol request holds whole batches; every single record is kept under
            # max_message_bytes by the bridge itself (events dead-lettered, dead letters cut).
            "message.max.bytes": max(s.max_message_bytes * 2, 2_000_000),
            "error_cb": on_error,
        }
    )


def write_checkpoint(
    producer: Producer, s: BridgeSettings, cp: Checkpoint, on_delivery: Callable[..., None] | None = None
) -> None:
    """Hand one checkpoint record to the producer (raises BufferError/KafkaException like produce)."""
    producer.produce(s.topic_checkpoint, key=s.bridge_id.encode(), value=cp.to_bytes(), on_delivery=on_delivery)


def read_checkpoint(s: BridgeSettings) -> Checkpoint | None:
    """This bridge's last checkpoint, or None if it has none (or none that can be read)."""
    timeout = s.kafka_timeout_ms / 1000.0
    try:
        consumer = Consumer(
            {
                **client_config(s),
                "group.id": f"{s.bridge_id}-checkpoint-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    except KafkaException as exc:
        raise BridgeUnavailable(f"cannot read the checkpoint: {exc}") from exc
    try:
        tp = TopicPartition(s.topic_checkpoint, 0)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
        if high <= low:
            return None
        # Compaction keeps the latest per key, but another bridge id may share the topic:
        # read a bounded tail and keep this bridge's newest record.
        consumer.assign([TopicPartition(s.topic_checkpoint, 0, max(low, high - 1000))])
        found: Checkpoint | None = None
        key = s.bridge_id.encode()
        while True:
            msg = consumer.poll(timeout)
            if msg is None:
                raise BridgeUnavailable("timed out reading the checkpoint topic")
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise BridgeUnavailable(f"reading the checkpoint: {err}")
            if msg.key() == key:
                try:
                    found = Checkpoint.from_bytes(msg.value())
                except CheckpointError as exc:
                    # Resuming from an older good record only means more re-sends; a bad record
                    # must not stop the bridge from starting.
                    log.error("ignoring an unreadable checkpoint at offset %s: %s", msg.offset(), exc)
            if (msg.offset() or 0) >= high - 1:
                break
        return found
    except KafkaException as exc:
        raise BridgeUnavailable(f"cannot read the checkpoint: {exc}") from exc
    finally:
        consumer.close()


class KafkaIO:
    """What the bridge needs from Kafka, behind one object so unit tests can pass an in-memory twin."""

    def __init__(self, s: BridgeSettings) -> None:
        self.s = s

    def ensure_topics(self) -> None:
        ensure_topics(self.s)

    def read_checkpoint(self) -> Checkpoint | None:
        return read_checkpoint(self.s)

    def make_producer(self, on_error: Callable[[KafkaError], None]) -> Any:
        return make_producer(self.s, on_error)
