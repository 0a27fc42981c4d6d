"""``ohs lag`` against a real group on the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.lag import group_lag

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, key=b"k", value=str(i).encode(), partition=0)
    assert producer.flush(30) == 0


def test_lag_counts_messages_and_age_then_returns_to_zero(stack_endpoints, topic_factory):
    bootstrap = stack_endpoints.kafka_bootstrap
    topic = topic_factory("lag", partitions=1)
    group = f"lag-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, 10)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    consumer.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    time.sleep(1.1)  # so the oldest unconsumed record is measurably old

    (row,) = group_lag(bootstrap, group, [topic])
    assert (row.committed, row.end, row.lag_messages) == (4, 10, 6)
    assert row.lag_seconds >= 1.0

    cmd = [sys.executable, "-m", "ohs.cli", "lag", "--group", group, "--topic", topic, "--json"]
    cmd += ["--max-lag", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=stack_endpoints.env(), check=False)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stdout)["partitions"][0]["lag_messages"] == 6

    consumer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
    consumer.close()
    (row,) = group_lag(bootstrap, group, [topic])
    assert (row.lag_messages, row.lag_seconds) == (0, 0.0)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=stack_endpoints.env(), check=False)
    assert proc.returncode == 0, proc.stderr
