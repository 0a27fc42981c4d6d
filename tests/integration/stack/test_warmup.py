"""The stack's warm-up on the real servers: it drives both, and leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from stack.settings import StackSettings
from stack.warmup import WARMUP_KEYSPACE, WARMUP_TOPIC, warm_up

pytestmark = pytest.mark.integration


def test_the_warm_up_drives_kafka_and_cassandra_then_removes_its_topic_and_keyspace(stack_endpoints):
    from cassandra.cluster import Cluster
    from confluent_kafka.admin import AdminClient

    s = StackSettings(_env_file=None)  # type: ignore[call-arg]  # the shared stack's ports, from the environment
    logs: list[str] = []
    report = warm_up(s, 3.0, {"kafka", "cassandra"}, logs.append)
    assert report.errors == [] and logs == []
    assert report.kafka_records > 0 and report.cassandra_rows > 0, report
    assert report.seconds >= 3.0

    admin = AdminClient({"bootstrap.servers": stack_endpoints.kafka_bootstrap})
    assert WARMUP_TOPIC not in admin.list_topics(timeout=10).topics
    cluster = Cluster(stack_endpoints.cql_hosts, port=stack_endpoints.cql_port)
    try:
        names = {
            r.keyspace_name for r in cluster.connect().execute("SELECT keyspace_name FROM system_schema.keyspaces")
        }
    finally:
        cluster.shutdown()
    assert WARMUP_KEYSPACE not in names


def test_only_the_servers_named_are_driven(stack_endpoints):
    s = StackSettings(_env_file=None)  # type: ignore[call-arg]
    report = warm_up(s, 1.0, {"cassandra"}, lambda m: None)
    assert report.kafka_records == 0 and report.cassandra_rows > 0 and report.errors == []
    assert os.environ.get("OHS_KAFKA_BOOTSTRAP")  # the fixture exported the shared stack's endpoints
