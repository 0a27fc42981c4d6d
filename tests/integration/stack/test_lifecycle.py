"""The launcher itself, on a second, private stack (own ports and state dir).

A private stack keeps the session's shared one untouched while this test stops
and restarts servers. It proves: topics and tables survive ``down`` + ``up``;
``up`` twice is harmless; a stale pid file is ignored; a taken port is a clear
error; ``reset`` wipes the state.
"""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from stack.errors import StackError
from stack.lifecycle import down, reset, status, up
from stack.process import port_in_use
from stack.settings import StackSettings
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    return free_port()


@pytest.fixture
def private(tmp_path, stack_endpoints):
    # stack_endpoints: the shared stack has fetched the jars, so this one reuses the cache.
    s = StackSettings(
        state=tmp_path / "state",
        kafka_port=_free_port(),
        kafka_controller_port=_free_port(),
        cql_port=_free_port(),
        cassandra_storage_port=_free_port(),
        cassandra_jmx_port=_free_port(),
        kafka_heap="512m",
        cassandra_heap="1g",
        warmup_s=3.0,
    )
    yield s
    reset(s, log=lambda m: None)


def test_data_survives_down_up_and_up_is_idempotent(private):
    from cassandra.cluster import Cluster
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    logs: list[str] = []
    timings = up(private, logs.append, warm=True)
    # Both were started by this call: both warmed up, and what the warm-up wrote is gone.
    assert "warmup_s" in timings and any(m.startswith("warmed up in") for m in logs), logs
    assert not any(m.startswith("warm-up:") for m in logs), logs  # no warm-up error
    topic = f"durable-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": private.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": private.kafka_bootstrap, "acks": "all"})
    for i in range(20):
        producer.produce(topic, key=str(i).encode(), value=f"v{i}".encode())
    assert producer.flush(30) == 0

    cluster = Cluster(["127.0.0.1"], port=private.cql_port, protocol_version=5)
    session = cluster.connect()
    session.execute("CREATE KEYSPACE dur WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute("CREATE TABLE dur.t (k int PRIMARY KEY, v text)")
    for i in range(20):
        session.execute("INSERT INTO dur.t (k, v) VALUES (%s, %s)", (i, f"v{i}"))
    cluster.shutdown()

    # A second `up` with everything running starts nothing and succeeds.
    pids_before = {st.name: st.pid for st in status(private)}
    logs.clear()
    timings = up(private, logs.append, warm=True)
    assert any("already running" in m for m in logs)
    assert "warmup_s" not in timings, "nothing was started, so nothing is warmed up"
    assert {st.name: st.pid for st in status(private)} == pids_before

    down(private, lambda m: None)
    assert all(st.pid is None for st in status(private))
    assert not port_in_use("127.0.0.1", private.kafka_port)

    # A stale pid file (process long gone, pid maybe reused) must not confuse `up`.
    (private.state_dir / "kafka.pid").write_text(json.dumps({"pid": 1, "start_time": 12345}))
    up(private, lambda m: None)

    consumer = Consumer(
        {"bootstrap.servers": private.kafka_bootstrap, "group.id": "dur", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    values = set()
    for _ in range(200):
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            values.add(msg.value().decode())
        if len(values) == 20:
            break
    consumer.close()
    assert values == {f"v{i}" for i in range(20)}

    cluster = Cluster(["127.0.0.1"], port=private.cql_port, protocol_version=5)
    rows = {r.k: r.v for r in cluster.connect().execute("SELECT k, v FROM dur.t")}
    cluster.shutdown()
    assert rows == {i: f"v{i}" for i in range(20)}

    reset(private, lambda m: None)
    assert not private.state_dir.exists()


def test_taken_port_is_a_clear_error(private):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", private.kafka_port))
    blocker.listen()
    try:
        with pytest.raises(StackError, match=rf"port\(s\) \[{private.kafka_port}"):
            up(private, lambda m: None)
    finally:
        blocker.close()
