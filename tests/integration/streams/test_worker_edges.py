"""The worker against hostile records and late events (issues 12 and 19), on the real stack.

Each test ends with the worker alive and the rows equal to the engine's truth (and, where the
whole pipeline ran, a clean ``ohs audit`` of Cassandra).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.codec import decode, encode
from schemas.events import OrderUpdate
from tests.integration.chaos.faults import audit, metrics, wait_for
from tests.integration.pipeline import Pipeline, read_topics, seqs_of
from tests.integration.streams.test_worker import USERS, _check_rows, _truth, _worker_env

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("edges")
    yield p
    p.stop_all()


def _filled(p: Pipeline, bootstrap: str, commands: int, seed: int):
    """Run engine + bridge over a seeded flow; return (engine, updates, records of the updates topic)."""
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    p.drive(client, commands, seed=seed, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    want = {e.seq for e in updates}
    records = read_topics(bootstrap, [p.topics["updates"]], until=lambda rs: set(seqs_of(rs)) >= want, timeout=120)
    assert set(seqs_of(records)) >= want
    return engine, updates, records


def _create(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the topic exists
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)


def _dead_letters(bootstrap: str, topic: str, n: int) -> list:
    def mine(rs):
        return [r for r in rs if dict(r.headers() or []).get("source") == b"worker"]

    return mine(read_topics(bootstrap, [topic], until=lambda rs: len(mine(rs)) >= n, timeout=120))


def test_out_of_order_and_twice_every_record_is_applied_once(pipeline, cql_session, stack_endpoints):
    """Issue 19: a producer without idempotence (or a re-drive) delivers a user's events late;
    dedupe by a per-user high-water mark discarded them as stale and their rows were never written."""
    p, bootstrap = pipeline, stack_endpoints.kafka_bootstrap
    engine, updates, records = _filled(p, bootstrap, 1_500, seed=61)
    p.kill("bridge", signal.SIGTERM)
    # Every record twice, shuffled within its partition: most of a user's events arrive late.
    by_partition: dict[int, list] = {}
    for r in records:
        by_partition.setdefault(r.partition(), []).append(r)
    rng = random.Random(5)
    late = f"orders.updates.late.{p.tag}"
    _create(bootstrap, late)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    reordered = 0
    for part, rs in by_partition.items():
        shuffled = rs * 2
        rng.shuffle(shuffled)
        last: dict[bytes, int] = {}
        for r in shuffled:
            seq = int(dict(r.headers())["seq"])
            reordered += seq < last.get(r.key(), 0)
            last[r.key()] = max(seq, last.get(r.key(), 0))
            producer.produce(late, r.value(), r.key(), partition=part, headers=r.headers())
    assert producer.flush(60) == 0
    assert reordered > len(records) // 4  # the topic really is out of order per user
    env = {**_worker_env(p, f"late-{p.tag}"), "OHS_WORKER_TOPIC_UPDATES": late}
    p.start("worker", ["worker"], env)
    _check_rows(cql_session, p.keyspace, engine, updates)
    wait_for(
        lambda: metrics(int(env["OHS_WORKER_WEB_PORT"]))["ohs_worker_records_total"] >= 2 * len(records), "records"
    )
    m = metrics(int(env["OHS_WORKER_WEB_PORT"]))
    assert m["ohs_worker_applied_total"] == len(updates)
    assert m["ohs_worker_duplicates_total"] == len(records) * 2 - len(updates)
    assert "ohs_worker_dead_lettered_total" not in m or m["ohs_worker_dead_lettered_total"] == 0
    p.kill("engine", signal.SIGTERM)
    audit(p, bootstrap, "--skip-kafka")


def test_a_dead_lettered_record_fixed_and_reproduced_is_applied_exactly_once(pipeline, cql_session, stack_endpoints):
    """Issue 19: a record dead-lettered for a rule, fixed and re-produced later, carries a seq below
    the user's newest: it must be applied, once, however often it is re-driven."""
    p, bootstrap = pipeline, stack_endpoints.kafka_bootstrap
    engine, updates, records = _filled(p, bootstrap, 800, seed=62)
    p.kill("bridge", signal.SIGTERM)
    # The victim: an event in the middle of a busy user's history, replaced by a broken copy.
    counts: dict[int, int] = {}
    for e in updates:
        counts[e.user_id] = counts.get(e.user_id, 0) + 1
    busy = max(counts, key=lambda u: counts[u])
    mine = [e for e in updates if e.user_id == busy]
    victim = mine[len(mine) // 2]
    topic = f"orders.updates.redrive.{p.tag}"
    _create(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    original = None
    for r in sorted(records, key=lambda r: (r.partition(), r.offset())):
        if int(dict(r.headers())["seq"]) == victim.seq:
            original = r
            broken = encode(replace(decode(r.value()), filled_qty=-1))
            producer.produce(topic, broken, r.key(), partition=r.partition(), headers=r.headers())
        else:
            producer.produce(topic, r.value(), r.key(), partition=r.partition(), headers=r.headers())
    assert original is not None and producer.flush(60) == 0
    env = {**_worker_env(p, f"rd-{p.tag}"), "OHS_WORKER_TOPIC_UPDATES": topic}
    p.start("worker", ["worker"], env)
    (letter,) = _dead_letters(bootstrap, p.topics["dlq"], 1)
    assert dict(letter.headers())["reason"] == b"rule_violation"
    port = int(env["OHS_WORKER_WEB_PORT"])
    wait_for(lambda: metrics(port)["ohs_worker_records_total"] >= len(records), "every record taken")
    assert metrics(port)["ohs_worker_applied_total"] == len(updates) - 1
    # The fix: the real record, re-driven three times, after everything newer was applied.
    for _ in range(3):
        producer.produce(
            topic, original.value(), original.key(), partition=original.partition(), headers=original.headers()
        )
    assert producer.flush(30) == 0
    _check_rows(cql_session, p.keyspace, engine, updates)
    wait_for(lambda: metrics(port)["ohs_worker_records_total"] >= len(records) + 3, "the re-driven records")
    m = metrics(port)
    assert m["ohs_worker_applied_total"] == len(updates)  # the late one applied, once
    assert m["ohs_worker_duplicates_total"] == 2
    p.kill("engine", signal.SIGTERM)
    audit(p, bootstrap, "--skip-kafka")


def test_hostile_records_are_dead_lettered_and_real_events_still_apply(pipeline, cql_session, stack_endpoints):
    """Issue 12, items 6 and 10: a tombstone stopped the worker for good (exit 70 at every restart);
    a forged far-future seq made every real event of its user a 'duplicate'."""
    p, bootstrap = pipeline, stack_endpoints.kafka_bootstrap
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    env = _worker_env(p, f"h-{p.tag}")
    p.start("worker", ["worker"], env)
    p.drive(client, 300, seed=63, users=USERS)
    port = int(env["OHS_WORKER_WEB_PORT"])
    wait_for(lambda: metrics(port).get("ohs_worker_applied_total", 0) > 10, "the worker's first writes")
    producer = Producer({"bootstrap.servers": bootstrap})
    real = read_topics(bootstrap, [p.topics["updates"]], until=lambda rs: len(rs) > 10, timeout=60)[0]
    ev = decode(real.value())
    assert isinstance(ev, OrderUpdate)
    forged = replace(ev, seq=ev.seq + 10**12, status=ev.status)
    key = str(ev.user_id).encode()
    hostile = [
        (key, None, "null_value"),  # a tombstone
        (None, encode(ev), "bad_key"),  # a null key
        (key, encode(forged), "beyond_ceiling"),  # a far-future seq: would shadow the user's real writes
        (key, encode(replace(ev, epoch=ev.epoch + 1)), "beyond_ceiling"),  # an epoch no bridge announced
    ]
    for k, v, _ in hostile:
        producer.produce(p.topics["updates"], v, k, partition=real.partition())
    assert producer.flush(30) == 0
    p.drive(client, 300, seed=64, users=USERS)  # the same user and partition keep flowing
    client.close()
    p.settle()
    engine, updates = _truth(p)
    _check_rows(cql_session, p.keyspace, engine, updates)
    letters = _dead_letters(bootstrap, p.topics["dlq"], len(hostile))
    assert sorted(dict(r.headers())["reason"].decode() for r in letters) == sorted(h[2] for h in hostile)
    assert p.procs["worker"].poll() is None
    p.kill("engine", signal.SIGTERM)
    audit(p, bootstrap, "--skip-kafka")


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_the_web_port_serves_only_metrics_and_health_on_loopback(pipeline, stack_endpoints):
    """Issue 12, item 1: Faust's table view served any user's state to anyone on 0.0.0.0."""
    p = pipeline
    env = _worker_env(p, f"w-{p.tag}")
    p.start("worker", ["worker"], env)
    port = int(env["OHS_WORKER_WEB_PORT"])
    wait_for(lambda: _status(port, "/metrics") == 200, "metrics")
    wait_for(lambda: _status(port, "/health") == 200, "healthy")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["problems"] == []
    for path in ("/table/user-state/1/", "/table/", "/router/", "/graph/", "/stats/"):
        assert _status(port, path) == 404, path
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError):
        socket.create_connection((addr, port), timeout=3).close()
