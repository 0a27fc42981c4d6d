"""Real round trips through the session's Kafka and Cassandra."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration


def test_kafka_produce_consume_commit(stack_endpoints, topic_factory):
    topic = topic_factory("roundtrip", partitions=3)
    producer = Producer({"bootstrap.servers": stack_endpoints.kafka_bootstrap, "enable.idempotence": True})
    sent = {f"user-{i}".encode(): f"value-{i}".encode() for i in range(30)}
    delivered = []
    for key, value in sent.items():
        producer.produce(topic, value=value, key=key, on_delivery=lambda err, msg: delivered.append((err, msg)))
    assert producer.flush(30) == 0
    assert all(err is None for err, _ in delivered) and len(delivered) == 30

    group = f"g-{uuid.uuid4().hex[:8]}"
    conf = {
        "bootstrap.servers": stack_endpoints.kafka_bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    got = {}
    for _ in range(300):
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            if len(got) == len(sent):
                break
            continue
        got[msg.key()] = msg.value()
        consumer.commit(message=msg, asynchronous=False)
    consumer.close()
    assert got == sent

    # The commit is durable on the broker: a new consumer of the group has nothing left to read.
    consumer = Consumer(conf)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(3)]
    consumer.close()
    assert [tp.offset for tp in committed] == ends
    assert sum(ends) == 30


def test_cassandra_keyspace_table_insert_select(cql_session, keyspace):
    cql_session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v bigint)")
    insert = cql_session.prepare(f"INSERT INTO {keyspace}.kv (k, v) VALUES (?, ?)")
    for i in range(10):
        cql_session.execute(insert, (f"k{i}", i * i))
    rows = {r.k: r.v for r in cql_session.execute(f"SELECT k, v FROM {keyspace}.kv")}
    assert rows == {f"k{i}": i * i for i in range(10)}
