"""Network partitions under load (issue 18, item 4): the worker cut off from Cassandra for 60 s,
the bridge cut off from Kafka. No process dies, nothing is committed past what is durable, and
after the heal the rows equal the engine's truth and `ohs audit` is clean.

A partition is not an outage: nothing refuses or resets a connection, requests just get no
answer. ``PartitionProxy`` (faults.py) stops forwarding without closing anything, so the clients
see timeouts. Both of the worker's Cassandra clients (acsylla for writes, cassandra-driver for
metadata) go through it: OHS_CQL_PORT points them at the proxy. A Kafka client learns broker
addresses from metadata, so a proxy in front of the bootstrap address alone would be bypassed:
the broker gets a second listener whose advertised address is the proxy (``kafka_via_proxy``),
and only the bridge bootstraps there.
"""

from __future__ import annotations

import time
import uuid

import pytest

from streams.lag import group_lag
from tests.integration.chaos.faults import (
    IN_FLIGHT_BOUND,
    Background,
    PartitionProxy,
    alive,
    committed,
    finish,
    kafka_via_proxy,
    metrics,
    start_pipeline,
    wait_for,
)
from tests.integration.pipeline import Pipeline
from tests.integration.streams.test_worker import USERS

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
CASSANDRA_PARTITION_S = 60
KAFKA_PARTITION_S = 70
"""Longer than librdkafka's client-side timeout of an in-flight request (socket.timeout.ms, 60 s;
with message.timeout.ms=0 nothing times out sooner): the produce requests in flight at the cut
time out inside the partition ("MsgPossiblyPersisted"), the connection is dropped and the records
are retried after the heal, the idempotent producer's hard case. A shorter partition only delays
the acknowledgements."""


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("partition")
    p.group = f"g-{uuid.uuid4().hex[:6]}"
    yield p
    p.stop_all()


def _m(port: int, name: str) -> float:
    return metrics(port).get(name, 0.0)


def test_worker_partitioned_from_cassandra_for_60s(pipeline, cql_session, stack_endpoints):
    p = pipeline
    bootstrap = stack_endpoints.kafka_bootstrap
    proxy = PartitionProxy(stack_endpoints.cql_port)
    try:
        # A 5 s request timeout: several timed-out attempts inside the partition.
        env = {"OHS_CQL_PORT": str(proxy.port), "OHS_WORKER_REQUEST_TIMEOUT_S": "5"}
        client = start_pipeline(p, worker_env=env)
        p.drive(client, 600, seed=301, users=USERS)
        wait_for(lambda: _m(p.worker_port, "ohs_worker_applied_total") > 0, "the worker's first writes")
        assert proxy.connections >= 2, "the worker's drivers do not go through the proxy"
        applied = _m(p.worker_port, "ohs_worker_applied_total")
        load = Background(p.drive, client, 2_000, 302, 500, USERS)
        wait_for(lambda: _m(p.worker_port, "ohs_worker_applied_total") > applied + 100, "the worker writing")
        proxy.cut()
        cut = time.monotonic()
        retries = _m(p.worker_port, "ohs_worker_write_retries_total")
        load.join()
        time.sleep(max(0.0, cut + 10 - time.monotonic()))  # the batch in flight at the cut times out
        before = committed(bootstrap, p.group)
        while time.monotonic() - cut < CASSANDRA_PARTITION_S:
            alive(p, "engine", "bridge", "worker")
            time.sleep(2)
        lag = committed(bootstrap, p.group)
        assert lag == before, "offsets moved while no write could reach Cassandra"
        assert _m(p.worker_port, "ohs_worker_write_retries_total") > retries, "no write timed out"
        assert sum(r.lag_messages for r in group_lag(bootstrap, p.group)) > 0, "the partition held nothing back"
        proxy.heal()
        wait_for(lambda: committed(bootstrap, p.group) != before, "the worker to commit after the heal", 180)
        finish(p, client, cql_session, bootstrap, seed=303, faults=1)
        log = (p.workdir / "worker.log").read_text(errors="replace")
        assert "Request timed out" in log, "the driver saw something else than timeouts"
        assert "unexpected error in the batch loop" not in log
    finally:
        proxy.close()


def test_bridge_partitioned_from_kafka(local_stack, pipeline, cql_session, stack_endpoints):
    p = pipeline
    proxy = kafka_via_proxy(local_stack)
    try:
        client = start_pipeline(p, bridge_env={"OHS_BRIDGE_KAFKA_BOOTSTRAP": f"{local_stack.host}:{proxy.port}"})
        p.drive(client, 600, seed=311, users=USERS)
        wait_for(lambda: _m(p.worker_port, "ohs_worker_applied_total") > 0, "the worker's first writes")
        assert proxy.connections >= 1, "the bridge does not go through the proxy"
        watermark = _m(p.bridge_port, "ohs_bridge_watermark")
        load = Background(p.drive, client, 2_000, 312, 500, USERS)
        wait_for(lambda: _m(p.bridge_port, "ohs_bridge_watermark") > watermark + 200, "the bridge relaying")
        proxy.cut()
        cut = time.monotonic()
        load.join()
        # More flow inside the partition, whatever part of the background load the cut came after
        # (on a slow machine the load may be nearly done by then): more than the bridge may hold.
        p.drive(client, 1_500, seed=314, users=USERS)
        time.sleep(2)
        # Every byte of the bridge's goes through the proxy (the listener's metadata names it):
        # were one connection direct, acknowledgements would still arrive and the watermark move.
        frozen = _m(p.bridge_port, "ohs_bridge_watermark")
        while time.monotonic() - cut < KAFKA_PARTITION_S:
            assert _m(p.bridge_port, "ohs_bridge_watermark") == frozen, "the watermark moved past unacknowledged"
            assert _m(p.bridge_port, "ohs_bridge_in_flight") <= IN_FLIGHT_BOUND
            alive(p, "engine", "bridge", "worker")
            time.sleep(2)
        assert p.engine_info()[1] > frozen + IN_FLIGHT_BOUND, "the partition held nothing back"
        proxy.heal()
        wait_for(lambda: _m(p.bridge_port, "ohs_bridge_watermark") > frozen, "the bridge to resume", 180)
        finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=313, faults=1)
        log = (p.workdir / "bridge.log").read_text(errors="replace")
        assert "Timed out ProduceRequest" in log, "no produce request outlived its timeout inside the partition"
    finally:
        proxy.close()
