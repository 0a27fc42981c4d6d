"""``ohs smoke``: one record through Kafka and one row through Cassandra, read back.

The quickest proof that the endpoints in the environment are usable by the
same client libraries the pipeline uses.
"""

from __future__ import annotations

import os
import time
import uuid

import click

__all__ = ["smoke"]


@click.command()
def smoke() -> None:
    """Produce+consume one Kafka record and write+read one Cassandra row."""
    from cassandra.cluster import Cluster
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    bootstrap = os.environ.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    hosts = os.environ.get("OHS_CQL_CONTACT_POINTS", "127.0.0.1").split(",")
    port = int(os.environ.get("OHS_CQL_PORT", "9042"))
    topic, token = "ohs.smoke", uuid.uuid4().hex

    t0 = time.monotonic()
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"smoke", value=token.encode())
    if producer.flush(30) != 0:
        raise click.ClickException("Kafka did not acknowledge the smoke record")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"smoke-{token}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    found = False
    while time.monotonic() < deadline and not found:
        msg = consumer.poll(0.5)
        found = msg is not None and not msg.error() and msg.value() == token.encode()
    consumer.close()
    if not found:
        raise click.ClickException("the smoke record was not read back from Kafka within 30 s")
    click.echo(f"kafka {bootstrap}: produced and consumed {topic} record in {time.monotonic() - t0:.2f}s")

    t0 = time.monotonic()
    cluster = Cluster(hosts, port=port, protocol_version=5)
    try:
        session = cluster.connect()
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS ohs_smoke WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS ohs_smoke.probe (id text PRIMARY KEY, at timestamp)")
        session.execute("INSERT INTO ohs_smoke.probe (id, at) VALUES (%s, toTimestamp(now()))", (token,))
        row = session.execute("SELECT id FROM ohs_smoke.probe WHERE id = %s", (token,)).one()
    finally:
        cluster.shutdown()
    if row is None:
        raise click.ClickException("the smoke row was not read back from Cassandra")
    click.echo(f"cassandra {hosts[0]}:{port}: wrote and read ohs_smoke.probe in {time.monotonic() - t0:.2f}s")
