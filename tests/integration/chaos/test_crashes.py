"""Hard crashes of the servers under load (issue 18, items 1-3): kill -9 of Kafka, of Cassandra, of
both at once and then of the engine, restarted in the worst order. After each: the rows equal the
engine's truth, Kafka holds exactly the journal's seqs, and `ohs audit` is clean.

A kill -9 leaves the data directories as a crash does: Kafka recovers its logs, Cassandra replays
its commit log up to its last sync marker. The local stack syncs before it acknowledges (group
commit, stack/servers.py): with periodic sync this test found 335 acknowledged writes gone after
the kill. These tests kill the local stack's servers, so they need the local stack (a private one:
OHS_STATE and its own ports); each leaves the servers running again.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from stack.lifecycle import up
from tests.integration.chaos.faults import (
    IN_FLIGHT_BOUND,
    Background,
    alive,
    committed,
    cql_retry,
    diagnose,
    finish,
    kill9,
    metrics,
    settled_committed,
    start_pipeline,
    start_server,
    wait_for,
)
from tests.integration.pipeline import Pipeline
from tests.integration.streams.test_worker import USERS

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("crash")
    p.group = f"g-{uuid.uuid4().hex[:6]}"
    yield p
    p.stop_all()


def _bridge(p: Pipeline, name: str) -> float:
    return metrics(p.bridge_port)[f"ohs_bridge_{name}"]


def _worker(p: Pipeline, name: str) -> float:
    return metrics(p.worker_port).get(f"ohs_worker_{name}", 0.0)


def _under_load(p: Pipeline, client, seed: int, commands: int = 2_000) -> Background:
    """Flow the bridge and the worker are busy with when the fault hits (not a pipeline at rest)."""
    watermark, applied = _bridge(p, "watermark"), _worker(p, "applied_total")
    load = Background(p.drive, client, commands, seed, 500, USERS)
    wait_for(lambda: _bridge(p, "watermark") > watermark + 200, "the bridge relaying the new flow")
    wait_for(lambda: _worker(p, "applied_total") > applied + 100, "the worker writing the new flow")
    return load


def _start(p: Pipeline, seed: int):
    client = start_pipeline(p)
    p.drive(client, 600, seed=seed, users=USERS)
    wait_for(lambda: _worker(p, "applied_total") > 0, "the worker's first writes")
    return client


def test_kafka_killed_9_mid_stream_then_restarted(local_stack, pipeline, cql_session, stack_endpoints):
    p = pipeline
    client = _start(p, seed=201)
    load = _under_load(p, client, seed=202)
    kill9(local_stack.state_dir, "kafka")
    load.join()  # the engine never waits for Kafka: it journals the whole flow
    # More flow after the crash, whatever part of the background load the kill came after (on a
    # slow machine the load may be nearly done by then): ~6K events, more than the bridge may hold.
    p.drive(client, 1_500, seed=204, users=USERS)
    time.sleep(1)
    frozen = _bridge(p, "watermark")
    for _ in range(10):  # the bridge holds back: no watermark past an unacknowledged record
        assert _bridge(p, "watermark") == frozen
        assert _bridge(p, "in_flight") <= IN_FLIGHT_BOUND
        alive(p, "engine", "bridge", "worker")
        time.sleep(1)
    assert p.engine_info()[1] > frozen + IN_FLIGHT_BOUND, "the crash held nothing back"
    up(local_stack, log=lambda m: print(f"[stack] {m}"))  # log recovery after an unclean shutdown
    wait_for(lambda: _bridge(p, "watermark") > frozen, "the bridge to resume")
    finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=203, faults=1)


def test_cassandra_killed_9_mid_batch_then_restarted(local_stack, pipeline, cql_session, stack_endpoints):
    p = pipeline
    bootstrap = stack_endpoints.kafka_bootstrap
    client = _start(p, seed=211)
    load = _under_load(p, client, seed=212)
    # What Cassandra has acknowledged a moment before the crash (a read returns only acknowledged
    # writes); the worker keeps writing until the kill, so it is mid-batch when Cassandra dies.
    acked = {r.seq for r in cql_session.execute(f"SELECT seq FROM {p.keyspace}.user_updates", timeout=60)}
    kill9(local_stack.state_dir, "cassandra")
    killed = time.monotonic()
    retries = _worker(p, "write_retries_total")
    load.join()
    # More flow after the crash, whatever part of the load the kill came after (on a slow machine
    # the worker may have written all of it by then): the worker must have a batch to retry.
    p.drive(client, 300, seed=214, users=USERS)
    wait_for(
        lambda: _worker(p, "write_retries_total") > retries,
        "the worker to retry the failed batch",
        explain=lambda: diagnose(p, bootstrap),
    )
    time.sleep(max(0.0, killed + 3 - time.monotonic()))
    before = settled_committed(bootstrap, p.group)
    time.sleep(8)  # more than two of Faust's commit intervals (2.8 s)
    assert committed(bootstrap, p.group) == before, "offsets moved past a batch Cassandra never wrote"
    alive(p, "engine", "bridge", "worker")

    # Cassandra restarts with the worker frozen: what is read then is what the commit log kept,
    # not what the worker wrote again.
    worker = p.procs["worker"]
    worker.send_signal(signal.SIGSTOP)
    try:
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        kept = {r.seq for r in cql_retry(cql_session, f"SELECT seq FROM {p.keyspace}.user_updates")}
    finally:
        worker.send_signal(signal.SIGCONT)
    assert len(acked) > 0 and acked <= kept, f"{len(acked - kept)} acknowledged writes lost by the crash"
    finish(p, client, cql_session, bootstrap, seed=213, faults=1)


def test_kafka_and_cassandra_killed_together_then_the_engine_restarted_in_the_worst_order(
    local_stack, pipeline, cql_session, stack_endpoints
):
    """Both servers die at once, then the engine while they are down, then the bridge and the
    worker (the whole host); everything comes back before what it depends on: the worker first
    (no Kafka, no Cassandra), the bridge (no Kafka, no engine), Kafka (the worker consumes but
    cannot write), Cassandra, and the engine last (journal recovery, same epoch)."""
    p = pipeline
    client = _start(p, seed=221)
    epoch = p.engine_info()[0]
    load = _under_load(p, client, seed=222)
    kill9(local_stack.state_dir, "kafka", "cassandra")
    load.join()
    reached = p.engine_info()[1]  # every seq up to here was answered to a client
    p.kill("engine")  # SIGKILL, while both servers are down
    client.close()
    p.kill("bridge")
    p.kill("worker")

    kafka_up = False
    exits: list[int] = []  # the worker's exits while Kafka was down: must stay empty (below)

    def settle_alive(seconds: float, *names: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            worker = p.procs["worker"]
            if not kafka_up and worker.poll() is not None:
                # As its supervisor would (compose: restart: unless-stopped), and noted.
                exits.append(worker.returncode)
                del p.procs["worker"]
                p.start("worker", ["worker"], p.worker_env)
            alive(p, *(n for n in names if kafka_up or n != "worker"))
            time.sleep(1)

    p.start("worker", ["worker"], p.worker_env)
    settle_alive(10, "worker")
    p.start("bridge", ["bridge"], p.bridge_env)
    settle_alive(5, "worker", "bridge")
    start_server(local_stack, "kafka")
    settle_alive(5, "worker", "bridge")  # the worker restarted as its supervisor would
    kafka_up = True
    settle_alive(10, "worker", "bridge")  # the worker takes records it cannot write yet
    start_server(local_stack, "cassandra")
    settle_alive(5, "worker", "bridge")
    p.start("engine", ["engine", "run"])
    client = p.client()
    recovered_epoch, recovered = p.engine_info()
    assert recovered_epoch == epoch, "the engine came back in another epoch"
    # Every command answered before the kill was journaled first: recovery gets at least that far.
    # (A CI run of 2026-12-02 ended with 349 updates missing; the engine was suspected, but the
    # loss was the worker's: a batch stored the states of the next, pipelined one. Fixed in
    # streams.processor.Prepared.states; the engine recovers what it answered, asserted here.)
    assert recovered >= reached, f"the engine recovered last seq {recovered}, below the {reached} it had answered"
    finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=223, faults=5)  # 5 kill -9s
    # Fixed: the worker waits for Kafka at start-up (streams.faust_adapter.App.before_start)
    # instead of exiting on aiokafka's "Unable to bootstrap"; a restart here would be a regression.
    assert not exits, f"the worker exited {len(exits)} time(s) while Kafka was down (status {exits[:1]})"
