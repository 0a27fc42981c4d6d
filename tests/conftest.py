"""Session-wide real servers and per-test unique names.

Integration tests never mock Kafka or Cassandra. By default the session starts
(or reuses) the local stack of ``ohs stack up`` under ``<repo>/.ohs``; with
``OHS_TEST_STACK=external`` it uses whatever ``OHS_KAFKA_BOOTSTRAP`` /
``OHS_CQL_CONTACT_POINTS`` / ``OHS_CQL_PORT`` point at (the compose stack, a
real cluster). Each test gets its own topics and keyspace, so tests do not see
each other's data and need no cleanup between them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    cql_hosts: list[str]
    cql_port: int

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (ohs commands, faust workers) pointed at this stack."""
        return {
            **os.environ,
            "OHS_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "OHS_CQL_CONTACT_POINTS": ",".join(self.cql_hosts),
            "OHS_CQL_PORT": str(self.cql_port),
            # A killed or restarted worker's partitions move after 10 s instead of 45: the
            # scenarios that kill workers wait for that, many times over (the broker's minimum is 6).
            "OHS_WORKER_SESSION_TIMEOUT_S": "10",
        }


@pytest.fixture(scope="session")
def stack_endpoints() -> Endpoints:
    if os.environ.get("OHS_TEST_STACK") == "external":
        return Endpoints(
            os.environ.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            os.environ.get("OHS_CQL_CONTACT_POINTS", "127.0.0.1").split(","),
            int(os.environ.get("OHS_CQL_PORT", "9042")),
        )
    from stack.lifecycle import up
    from stack.settings import StackSettings

    if "OHS_STATE" not in os.environ:
        os.environ["OHS_STATE"] = str(REPO / ".ohs")
    settings = StackSettings()
    up(settings, log=lambda m: print(f"[stack] {m}"))
    # Subprocesses started by tests inherit these.
    os.environ["OHS_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    os.environ["OHS_CQL_CONTACT_POINTS"] = settings.host
    os.environ["OHS_CQL_PORT"] = str(settings.cql_port)
    return Endpoints(settings.kafka_bootstrap, [settings.host], settings.cql_port)


@pytest.fixture(scope="session")
def registry_url(stack_endpoints: Endpoints) -> str:
    """A Confluent-compatible schema registry: OHS_SCHEMA_REGISTRY_URL (compose: Redpanda's),
    else the local stack's Apicurio Registry, started on first use. Read, never set, in os.environ:
    the other tests' subprocesses must keep the registry-free encoding."""
    url = os.environ.get("OHS_SCHEMA_REGISTRY_URL")
    if url:
        return url
    if os.environ.get("OHS_TEST_STACK") == "external":
        pytest.skip("OHS_TEST_STACK=external without OHS_SCHEMA_REGISTRY_URL: no registry to test against")
    from stack.lifecycle import up
    from stack.settings import StackSettings

    settings = StackSettings().model_copy(update={"registry": True})
    if not settings.registry_java:
        pytest.skip("Apicurio Registry 3 needs Java 21+ and none is installed (set OHS_REGISTRY_JAVA)")
    up(settings, log=lambda m: print(f"[stack] {m}"))
    return settings.registry_url


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic_factory(stack_endpoints: Endpoints) -> Callable[..., str]:
    """Create a fresh topic: ``topic_factory("orders", partitions=6) -> "orders_<random>"``."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": stack_endpoints.kafka_bootstrap})

    def make(prefix: str = "t", partitions: int = 3, config: dict[str, str] | None = None) -> str:
        name = unique(prefix).replace("_", "-")
        fut = admin.create_topics([NewTopic(name, partitions, 1, config=config or {})], operation_timeout=30)
        fut[name].result(timeout=30)
        return name

    return make


@pytest.fixture(scope="session")
def cql_cluster(stack_endpoints: Endpoints) -> Iterator[object]:
    from cassandra.cluster import Cluster
    from cassandra.policies import ExponentialReconnectionPolicy

    # The fault suite restarts Cassandra: the driver's default back-off (up to 10 min) would leave
    # this session-wide cluster disconnected for every later test.
    cluster = Cluster(
        stack_endpoints.cql_hosts,
        port=stack_endpoints.cql_port,
        protocol_version=5,
        reconnection_policy=ExponentialReconnectionPolicy(0.5, 5.0),
    )
    yield cluster
    cluster.shutdown()


@pytest.fixture
def cql_session(cql_cluster: object) -> object:
    return cql_cluster.connect()  # type: ignore[attr-defined]


@pytest.fixture
def keyspace_factory(cql_cluster: object) -> Iterator[Callable[[], str]]:
    """Create throw-away keyspaces (SimpleStrategy, rf=1), dropped after the test."""
    session = cql_cluster.connect()  # type: ignore[attr-defined]
    made: list[str] = []

    def make(prefix: str = "ks") -> str:
        name = unique(prefix).lower()
        replication = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        session.execute(f"CREATE KEYSPACE {name} WITH replication = {replication}")
        made.append(name)
        return name

    yield make
    from cassandra.cluster import NoHostAvailable

    for name in made:
        for attempt in range(30):  # a test that restarted Cassandra: the driver is reconnecting
            try:
                session.execute(f"DROP KEYSPACE IF EXISTS {name}", timeout=60)
                break
            except NoHostAvailable:
                if attempt == 29:
                    raise
                time.sleep(1)


@pytest.fixture
def keyspace(keyspace_factory: Callable[[], str]) -> str:
    return keyspace_factory()
