"""The worker through ordinary outages (issue 12, items 7 and 8): it rides them out and resumes.

Before: Kafka stopped for 60 s crashed the worker after ~16 s (the lag timer's admin call raised
TimeoutError); a worker started while Cassandra was down exited 70 at its first record and stayed
dead; a worker started while Kafka was down exited 1 at once (aiokafka's "Unable to bootstrap" in
Faust's producer start). The first two stop a server of the local stack (the fault suite's
``local_stack`` fixture); the third reaches Kafka through a proxy that is cut, then healed.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
import uuid

import pytest

from stack.lifecycle import down, up
from tests.integration.chaos.faults import PartitionProxy, audit, metrics, wait_for
from tests.integration.pipeline import Pipeline
from tests.integration.streams.test_worker import USERS, _check_rows, _truth, _worker_env

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
OUTAGE_S = 60


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("outage")
    p.group = f"g-{uuid.uuid4().hex[:6]}"
    yield p
    p.stop_all()


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_worker_rides_out_kafka_stopped_for_a_minute(local_stack, pipeline, cql_session, stack_endpoints):
    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    env = {**_worker_env(p, p.group), "OHS_WORKER_LAG_INTERVAL_S": "1"}  # the timer that crashed it
    port = int(env["OHS_WORKER_WEB_PORT"])
    p.start("worker", ["worker"], env)
    p.drive(client, 600, seed=81, users=USERS)
    wait_for(lambda: metrics(port).get("ohs_worker_applied_total", 0) > 0, "the worker's first writes")
    down(local_stack, only="kafka")
    try:
        t0 = time.monotonic()
        p.drive(client, 600, seed=82, users=USERS)  # the engine journals on; nothing reaches Kafka
        while time.monotonic() - t0 < OUTAGE_S:
            for name in ("bridge", "worker"):
                assert p.procs[name].poll() is None, f"{name} died while Kafka was down:\n{p.log(name)}"
            time.sleep(2)
    finally:
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
    p.drive(client, 300, seed=83, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    _check_rows(cql_session, p.keyspace, engine, updates)
    assert p.procs["worker"].poll() is None
    p.kill("engine", signal.SIGTERM)
    audit(p, stack_endpoints.kafka_bootstrap)


def test_worker_started_while_cassandra_is_down_waits_then_applies(local_stack, pipeline, cql_cluster, stack_endpoints):
    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    p.drive(client, 400, seed=84, users=USERS)  # records wait in Kafka for the worker
    env = _worker_env(p, p.group)
    port = int(env["OHS_WORKER_WEB_PORT"])
    down(local_stack, only="cassandra")
    try:
        p.start("worker", ["worker"], env)
        wait_for(lambda: _health(port)[0] == 503, "the worker to report Cassandra unavailable")
        _, body = _health(port)
        assert body["status"] == "unavailable" and any("Cassandra" in x for x in body["problems"])
        time.sleep(20)  # well past the old failure (exit 70 at the first record)
        assert p.procs["worker"].poll() is None, f"the worker died while Cassandra was down:\n{p.log('worker')}"
    finally:
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
    wait_for(lambda: _health(port)[0] == 200, "the worker to become healthy", timeout=180)
    p.drive(client, 300, seed=85, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    for attempt in range(30):  # the test session's own driver reconnects after the restart too
        try:
            session = cql_cluster.connect()
            break
        except Exception:
            if attempt == 29:
                raise
            time.sleep(2)
    _check_rows(session, p.keyspace, engine, updates)
    p.kill("engine", signal.SIGTERM)
    audit(p, stack_endpoints.kafka_bootstrap)


def test_worker_started_while_kafka_is_unreachable_waits_then_applies(pipeline, cql_session, stack_endpoints):
    """The worker bootstraps through a proxy that starts cut (connections accepted, no answer: an
    unreachable broker); it must wait, retrying, and apply everything once the proxy heals."""
    p = pipeline
    kafka_port = int(stack_endpoints.kafka_bootstrap.rsplit(":", 1)[1])
    proxy = PartitionProxy(kafka_port)
    proxy.cut()
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        p.drive(client, 400, seed=86, users=USERS)  # records wait in Kafka for the worker
        env = {**_worker_env(p, p.group), "OHS_WORKER_KAFKA_BOOTSTRAP": f"127.0.0.1:{proxy.port}"}
        p.start("worker", ["worker"], env)
        wait_for(lambda: "Kafka unavailable" in p.log("worker"), "the worker to report Kafka unavailable", 60)
        time.sleep(15)  # the old failure was an exit within a second or two of the first attempt
        assert p.procs["worker"].poll() is None, f"the worker died while Kafka was unreachable:\n{p.log('worker')}"
        assert proxy.connections >= 1, "the worker did not try the proxy"
        proxy.heal()
        p.drive(client, 300, seed=87, users=USERS)
        client.close()
        p.settle()
        engine, updates = _truth(p)
        _check_rows(cql_session, p.keyspace, engine, updates)
        assert p.procs["worker"].poll() is None, p.log("worker")
        p.kill("engine", signal.SIGTERM)
        audit(p, stack_endpoints.kafka_bootstrap)
    finally:
        proxy.close()
