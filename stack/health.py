"""Readiness checks: a server is up when a real client can really use it."""

from __future__ import annotations

import logging
from typing import Any

from stack.settings import StackSettings

__all__ = ["GRANTS", "cassandra_ready", "kafka_ready", "provision_roles", "registry_ready", "superuser_cluster"]

HEALTH_TOPIC = "__ohs_health"


def kafka_ready(s: StackSettings, timeout_s: float = 5.0) -> str | None:
    """None when the broker answers metadata and can create a topic; else why not."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    # log_level 0: the refused connections while the broker boots are expected, not news.
    admin = AdminClient(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "socket.timeout.ms": int(timeout_s * 1000),
            "log_level": 0,
            **s.kafka_admin_config(),
        }
    )
    try:
        metadata = admin.list_topics(timeout=timeout_s)
        if not metadata.brokers:
            return "no broker in metadata yet"
        if HEALTH_TOPIC not in metadata.topics:
            futures = admin.create_topics([NewTopic(HEALTH_TOPIC, 1, 1)], operation_timeout=timeout_s)
            futures[HEALTH_TOPIC].result(timeout=timeout_s)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        if getattr(err, "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
            return None
        return str(err)
    except Exception as exc:
        return str(exc)
    return None


def cassandra_ready(s: StackSettings, timeout_s: float = 5.0) -> str | None:
    """None when ``SELECT release_version FROM system.local`` answers; else why not."""
    # The driver logs every refused connection at WARNING while the node boots.
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    cluster = superuser_cluster(s, timeout_s)
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local", timeout=timeout_s).one()
        return None if row and row.release_version else "no release_version"
    except Exception as exc:
        return str(exc).splitlines()[0][:200]
    finally:
        cluster.shutdown()


def superuser_cluster(s: StackSettings, timeout_s: float, protocol_version: int = 5) -> Any:
    """A cassandra-driver Cluster of the stack's node, as its superuser when auth is on."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster

    provider = PlainTextAuthProvider("cassandra", s.cassandra_superuser_password.get_secret_value()) if s.auth else None
    return Cluster(
        [s.host], port=s.cql_port, connect_timeout=timeout_s, protocol_version=protocol_version, auth_provider=provider
    )


GRANTS: dict[str, tuple[str, ...]] = {
    # Creates the keyspace and its tables (`ohs db migrate`), and so owns them: every permission on them.
    "worker": ("CREATE ON ALL KEYSPACES",),
    # Reads only: the query API never writes.
    "api": ("SELECT ON ALL KEYSPACES",),
    # On-call tools (`ohs audit`, `ohs orders`) read. `ohs replay` is the worker's sink run by hand: it
    # runs as the worker.
    "ops": ("SELECT ON ALL KEYSPACES",),
}
"""With auth, what each principal may do in Cassandra; any other (the bridge) may only log in.
The same grants as docker-compose.secure.yml's deploy/scylla/cql-roles.sh."""


def provision_roles(s: StackSettings, timeout_s: float = 30.0) -> None:
    """With auth: one login role per configured principal, with its password and ``GRANTS``
    (idempotent: run on every ``up``)."""
    if not s.auth:
        return
    cluster = superuser_cluster(s, timeout_s)
    try:
        session = cluster.connect()
        for name, password in s.users.items():
            quoted = password.replace("'", "''")
            session.execute(f"CREATE ROLE IF NOT EXISTS {name} WITH LOGIN = true AND PASSWORD = '{quoted}'")
            session.execute(f"ALTER ROLE {name} WITH PASSWORD = '{quoted}'")
            for grant in GRANTS.get(name, ()):
                session.execute(f"GRANT {grant} TO {name}")
    finally:
        cluster.shutdown()


def registry_ready(s: StackSettings, timeout_s: float = 5.0) -> str | None:
    """None when the registry's Confluent-compatible API lists subjects; else why not."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{s.registry_url}/subjects", timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)[:200]
