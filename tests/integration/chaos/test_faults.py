"""Faults under load on the full pipeline (engine -> bridge -> Kafka -> worker -> Cassandra):
after each one drains, Kafka holds every journaled seq and Cassandra equals the engine's truth.

Real processes, real signals, loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.bridge.test_bridge import _assert_log_matches_journal
from tests.integration.chaos.faults import DelayProxy, audit, diagnose, metrics, server_pid, wait_for
from tests.integration.pipeline import Pipeline, free_port
from tests.integration.streams.test_worker import USERS, _check_rows, _truth, _worker_env

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("fault")
    p.group = f"g-{uuid.uuid4().hex[:6]}"
    yield p
    p.stop_all()


def _start(p: Pipeline, worker_env: dict[str, str] | None = None):
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    env = {**_worker_env(p, p.group), **(worker_env or {})}
    p.worker_port = int(env["OHS_WORKER_WEB_PORT"])
    p.start("worker", ["worker"], env)
    return client


def _wait_applying(p: Pipeline) -> None:
    """The faults hit a pipeline under load, not one still starting: the worker has written."""
    wait_for(lambda: metrics(p.worker_port).get("ohs_worker_applied_total", 0) > 0, "the worker's first writes")


def _finish(p: Pipeline, client, cql_session, bootstrap: str, seed: int) -> None:
    """More flow after the fault, then the proofs: the log equals the journal, the rows the truth."""
    last = p.drive(client, 300, seed=seed, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    try:
        _check_rows(cql_session, p.keyspace, engine, updates)
    except AssertionError as exc:  # with where the flow stopped, if a process stopped making progress
        raise AssertionError(f"{exc}\n{diagnose(p, bootstrap)}") from exc
    _assert_log_matches_journal(p, bootstrap, last)  # also stops the engine: the journal is final
    try:
        audit(p, bootstrap)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(p, bootstrap)}") from exc


def test_kafka_paused_20s_under_load(local_stack, pipeline, cql_session, stack_endpoints):
    p = pipeline
    client = _start(p)
    p.drive(client, 800, seed=71, users=USERS)
    _wait_applying(p)
    kafka = server_pid(local_stack.state_dir, "kafka")
    os.kill(kafka, signal.SIGSTOP)  # a broker that hangs (GC pause, stalled disk): no error, no answer
    try:
        t0 = time.monotonic()
        p.drive(client, 1_500, seed=72, users=USERS)  # the engine never waits for Kafka
        time.sleep(max(0.0, 20 - (time.monotonic() - t0)))
    finally:
        os.kill(kafka, signal.SIGCONT)
    for name in ("bridge", "worker"):
        assert p.procs[name].poll() is None, f"{name} died while Kafka was paused:\n{p.log(name)}"
    _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=73)


def test_rebalance_mid_batch_a_second_worker_joins_then_is_killed(pipeline, cql_session, stack_endpoints):
    p = pipeline
    client = _start(p)
    p.drive(client, 800, seed=81, users=USERS)
    _wait_applying(p)
    p.start("worker-b", ["worker"], {**_worker_env(p, p.group), "OHS_WORKER_WEB_PORT": str(free_port())})
    p.drive(client, 1_500, seed=82, users=USERS)  # flows through the rebalance
    time.sleep(3)
    p.kill("worker-b")  # kill -9 while it holds partitions and batches: another rebalance
    p.drive(client, 800, seed=83, users=USERS)
    _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=84)


def test_rebalance_while_the_workers_buffer_is_full_and_its_writes_wait(pipeline, cql_session, stack_endpoints):
    """A rebalance while the batch loop waits on slow writes and Faust's buffer in front of it is
    full, so the consumer's delivery of a fetched record is itself waiting: the rebalance seeks
    back to the committed offsets, and the late delivery must not mark everything up to it as
    read. (It did: a CI run of 2026-12-06 lost 2,687 updates after the worker it restarted
    caught up on a backlog while Cassandra was down and the group rebalanced.)"""
    p = pipeline
    proxy = DelayProxy(stack_endpoints.cql_port)
    try:
        # Small batches and a small buffer: the buffer is full as soon as the writes slow down.
        env = {
            "OHS_CQL_PORT": str(proxy.port),
            "OHS_WORKER_REQUEST_TIMEOUT_S": "60",
            "OHS_WORKER_BATCH_SIZE": "40",
            "OHS_WORKER_STREAM_BUFFER": "60",
        }
        client = _start(p, env)
        p.drive(client, 300, seed=101, users=USERS)
        _wait_applying(p)
        proxy.delay = 1.0  # every write waits ~2 s: the backlog queues in front of the batch loop
        p.drive(client, 1_500, seed=102, users=USERS)
        time.sleep(3)
        p.start("worker-b", ["worker"], {**_worker_env(p, p.group), "OHS_WORKER_WEB_PORT": str(free_port())})
        p.drive(client, 300, seed=103, users=USERS)
        time.sleep(15)  # the rebalance completes while the first worker's deliveries wait
        proxy.delay = 0.0
        p.kill("worker-b", signal.SIGTERM)  # leaves the group: another rebalance, back to one worker
        assert p.procs["worker"].poll() is None, p.log("worker")
        _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=104)
    finally:
        proxy.close()


def test_cassandra_answers_slower_than_the_driver_waits(pipeline, cql_session, stack_endpoints):
    p = pipeline
    proxy = DelayProxy(stack_endpoints.cql_port)
    web = free_port()
    try:
        # A 2 s request timeout and a 3 s delay: every write times out, and quickly enough to see
        # several failed attempts inside a short test.
        env = {"OHS_CQL_PORT": str(proxy.port), "OHS_WORKER_WEB_PORT": str(web), "OHS_WORKER_REQUEST_TIMEOUT_S": "2"}
        client = _start(p, env)
        p.drive(client, 600, seed=91, users=USERS)
        wait_for(lambda: metrics(web).get("ohs_worker_applied_total", 0) > 0, "the worker's first writes")
        proxy.delay = 3.0
        p.drive(client, 1_500, seed=92, users=USERS)
        wait_for(lambda: metrics(web).get("ohs_worker_write_retries_total", 0) >= 2, "timed-out writes", 150)
        proxy.delay = 0.0
        assert p.procs["worker"].poll() is None, p.log("worker")
        _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=93)
    finally:
        proxy.close()


def test_full_disk_under_the_worker_state_dir(pipeline, cql_session, stack_endpoints, tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    p = pipeline
    try:
        env = {"OHS_WORKER_DATA_DIR": str(mnt / "worker-data")}
        client = _start(p, env)
        p.drive(client, 800, seed=101, users=USERS)
        _wait_applying(p)
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
        p.drive(client, 1_500, seed=102, users=USERS)  # table writes now fail with ENOSPC
        time.sleep(5)
        filler.unlink()  # the operator frees space and restarts the worker if it stopped
        if p.procs["worker"].poll() is not None:
            p.procs.pop("worker")
            p.start("worker", ["worker"], {**_worker_env(p, p.group), **env})
        _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=103)
    finally:
        p.stop_all()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_backfill_replay_overlapping_live_traffic(pipeline, cql_session, stack_endpoints):
    """`ohs replay` rewrites the live keyspace from the beginning while the worker applies new
    events: old events land after newer ones, and the write timestamps keep the newer values."""
    p = pipeline
    client = _start(p)
    p.drive(client, 1_000, seed=111, users=USERS)
    _wait_applying(p)
    env = p.env({"OHS_WORKER_TOPIC_UPDATES": p.topics["updates"], "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"]})
    env["OHS_KEYSPACE"] = p.keyspace
    cmd = [sys.executable, "-m", "ohs.cli", "replay", "--from-beginning", "--group", f"replay-{p.group}"]
    cmd += ["--batch-size", "100"]
    replay = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p.drive(client, 1_500, seed=112, users=USERS)  # live traffic while the replay runs
    out, _ = replay.communicate(timeout=300)
    assert replay.returncode == 0, out.decode(errors="replace")[-3000:]
    _finish(p, client, cql_session, stack_endpoints.kafka_bootstrap, seed=113)
