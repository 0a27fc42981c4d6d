"""A server of the stack stops while the pipeline runs: nothing is lost, nothing moves ahead.

These tests stop and restart the session's own Kafka or Cassandra (the local stack), so they
cannot run against an external stack. Each leaves the server running again.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from cassandra.cluster import Cluster

from stack.lifecycle import down, up
from streams.lag import group_lag
from tests.integration.bridge.test_bridge import _assert_log_matches_journal
from tests.integration.chaos.faults import audit, metrics, wait_for
from tests.integration.pipeline import Pipeline, free_port
from tests.integration.streams.test_worker import USERS, _check_rows, _truth, _wait_for_stream, _worker_env

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_bridge_stops_reading_while_kafka_is_down_then_catches_up(local_stack, stack_endpoints, tmp_path):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    try:
        port, max_in_flight = free_port(), 500
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(port), "OHS_BRIDGE_MAX_IN_FLIGHT": "500"})
        last = p.drive(client, 1_000, seed=31)
        wait_for(lambda: metrics(port).get("ohs_bridge_watermark", 0) >= last, "the bridge to relay the first flow")

        down(local_stack, only="kafka")
        frozen = metrics(port)["ohs_bridge_watermark"]
        # The engine goes on (its journal holds everything); the bridge may only buffer a bounded
        # number of events and may never move its watermark past an unacknowledged one.
        last = p.drive(client, 3_000, seed=32)
        for _ in range(10):
            m = metrics(port)
            assert m["ohs_bridge_watermark"] == frozen
            assert m["ohs_bridge_in_flight"] <= max_in_flight
            assert p.procs["bridge"].poll() is None, p.log("bridge")
            time.sleep(0.5)
        assert last > frozen + max_in_flight  # the outage really held back more than the bound

        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        last = p.drive(client, 300, seed=33)
        client.close()
        _assert_log_matches_journal(p, stack_endpoints.kafka_bootstrap, last)
        assert p.procs["bridge"].poll() is None, "the bridge exited during the outage"
        audit(p, stack_endpoints.kafka_bootstrap)  # Kafka only: this pipeline has no worker
    finally:
        p.stop_all()


@pytest.mark.parametrize("outage_s", [30, 180], ids=["30s", "3min"])
def test_worker_pauses_while_cassandra_is_down_then_resumes(
    local_stack, stack_endpoints, tmp_path, keyspace_factory, outage_s
):
    if outage_s > 60 and not os.environ.get("OHS_CHAOS_LONG"):
        pytest.skip("the 3-minute outage runs with OHS_CHAOS_LONG=1 (make chaos-long); CI runs the 30 s one")
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("outage")
    group = f"g-{p.tag}"
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        p.start("worker", ["worker"], _worker_env(p, group))
        p.drive(client, 800, seed=41, users=USERS)
        p.settle()
        _, updates = _truth(p)
        cluster = Cluster([local_stack.host], port=local_stack.cql_port)
        try:
            _wait_for_stream(cluster.connect(), p.keyspace, {e.seq for e in updates})
        finally:
            cluster.shutdown()

        down(local_stack, only="cassandra")
        stopped = time.monotonic()
        p.drive(client, 1_500, seed=42, users=USERS)
        time.sleep(5)  # the worker takes a batch, fails to write it, and retries
        before = {(r.topic, r.partition): r.committed for r in group_lag(stack_endpoints.kafka_bootstrap, group)}
        # At least Faust's commit interval (2.8 s) more, and until the outage has lasted outage_s.
        time.sleep(max(8.0, outage_s - (time.monotonic() - stopped)))
        lag = group_lag(stack_endpoints.kafka_bootstrap, group)
        after = {(r.topic, r.partition): r.committed for r in lag}
        assert after == before, "offsets moved while Cassandra was down"
        assert sum(r.lag_messages for r in lag) > 0, "the outage held nothing back"
        assert p.procs["worker"].poll() is None, p.log("worker")

        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        p.drive(client, 300, seed=43, users=USERS)
        client.close()
        p.settle()
        engine, updates = _truth(p)
        cluster = Cluster([local_stack.host], port=local_stack.cql_port)
        try:
            _check_rows(cluster.connect(), p.keyspace, engine, updates)
        finally:
            cluster.shutdown()
        assert p.procs["worker"].poll() is None, "the worker exited during the outage"
        p.kill("engine", signal.SIGTERM)
        audit(p, stack_endpoints.kafka_bootstrap)
        assert "unexpected error in the batch loop" not in p.log("worker")
    finally:
        p.stop_all()
