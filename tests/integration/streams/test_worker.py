"""engine -> bridge -> Kafka -> faust worker -> Cassandra, compared with the engine's own truth."""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest

from engine.journal import Journal
from engine.recovery import recover
from engine.settings import EngineSettings
from schemas.events import OrderUpdate
from streams.state import ALL_SYMBOLS, UserState
from tests.integration.pipeline import NOT_MIGRATED, Pipeline, free_port, not_migrated

pytestmark = pytest.mark.integration
USERS = 30


@pytest.fixture
def pipeline(stack_endpoints, tmp_path, keyspace_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("orders")
    yield p
    p.stop_all()


def _worker_env(p: Pipeline, group: str) -> dict[str, str]:
    return {
        "OHS_WORKER_GROUP": group,
        "OHS_WORKER_TOPIC_UPDATES": p.topics["updates"],
        "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"],
        "OHS_WORKER_PARTITIONS": "3",
        "OHS_KEYSPACE": p.keyspace,
        "OHS_WORKER_WEB_PORT": str(free_port()),
        "OHS_WORKER_BATCH_WINDOW_S": "0.05",
        "OHS_WORKER_LAG_INTERVAL_S": "1",
    }


def _truth(p: Pipeline):
    s = EngineSettings(_env_file=None, journal_dir=p.workdir / "journal")
    with Journal.open(s.journal_dir, s.symbol_specs()) as journal:
        engine, _ = recover(journal)
        updates = [e for e in journal.read_events(1, 0, limit=10**9) if isinstance(e, OrderUpdate)]
    return engine, updates


def _wait_for_stream(cql, ks, expected_seqs, timeout=180):
    deadline = time.monotonic() + timeout
    got = set()
    while time.monotonic() < deadline:
        try:
            got = {r.seq for r in cql.execute(f"SELECT seq FROM {ks}.user_updates", timeout=60)}
        except NOT_MIGRATED as exc:  # the worker has not migrated the keyspace yet
            if not not_migrated(exc):
                raise
            time.sleep(1)
            continue
        if got >= expected_seqs:
            return got
        time.sleep(1)
    missing = sorted(expected_seqs - got)
    raise AssertionError(f"{len(missing)} order updates never reached Cassandra: seqs {missing[:60]}")


def _check_rows(cql, ks, engine, updates):
    seqs = {e.seq for e in updates}
    got = _wait_for_stream(cql, ks, seqs)
    assert got == seqs  # every OrderUpdate once (the key is the seq), nothing else
    expected_stats = {}
    for ev in updates:
        expected_stats.setdefault(ev.user_id, UserState()).apply(ev)
    for user in range(1, USERS + 1):
        rows = cql.execute(
            f"SELECT order_id, status, filled_qty, seq FROM {ks}.active_orders WHERE user_id = %s", (user,)
        )
        active = {r.order_id: (r.status, r.filled_qty, r.seq) for r in rows}
        truth = {o.order_id: (o.status.value, o.filled_qty, o.seq) for o in engine.open_orders(user)}
        assert active == truth, f"active orders of user {user} differ"
        state = expected_stats.get(user)
        stats = {r.symbol: r for r in cql.execute(f"SELECT * FROM {ks}.order_statistics WHERE user_id = %s", (user,))}
        if state is None:
            assert not stats
            continue
        assert set(stats) == set(state.stats)
        for symbol in state.stats:
            values = state.stat_values(symbol)
            row = stats[symbol]
            assert {k: getattr(row, k) for k in values} == values, f"stats of user {user} {symbol}"
        assert stats[ALL_SYMBOLS].last_seq == state.last_counted(ALL_SYMBOLS)[1]
    history = list(cql.execute(f"SELECT order_id FROM {ks}.order_history WHERE user_id = %s LIMIT 20", (1,)))
    assert [r.order_id for r in history] == sorted((r.order_id for r in history), reverse=True)


def test_rows_equal_the_engine_truth_across_a_worker_kill_9(pipeline, cql_session):
    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    env = _worker_env(p, f"g-{p.tag}")
    p.start("worker", ["worker"], env)
    p.drive(client, 1_500, seed=11, users=USERS)
    time.sleep(3)
    p.kill("worker")  # kill -9 mid-stream: unacked batches and unflushed state are lost
    p.drive(client, 1_500, seed=12, users=USERS)
    p.start("worker", ["worker"], env)
    p.drive(client, 500, seed=13, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    _check_rows(cql_session, p.keyspace, engine, updates)
    p.kill("engine", signal.SIGTERM)


def test_every_record_twice_and_two_workers_give_the_same_rows(
    pipeline, cql_session, stack_endpoints, keyspace_factory
):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from tests.integration.pipeline import read_topics, seqs_of

    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    p.drive(client, 1_500, seed=21, users=USERS)
    client.close()
    final = p.settle()
    engine, updates = _truth(p)
    want = {e.seq for e in updates}

    def complete(records):
        return set(seqs_of(records)) >= want

    records = read_topics(stack_endpoints.kafka_bootstrap, [p.topics["updates"]], until=complete, timeout=120)
    assert final >= max(want)
    # A copy of the topic in which every record comes twice, in place (same partition, key, headers).
    dup = f"orders.updates.dup.{p.tag}"
    admin = AdminClient({"bootstrap.servers": stack_endpoints.kafka_bootstrap})
    admin.create_topics([NewTopic(dup, 3, 1)])[dup].result(30)
    producer = Producer({"bootstrap.servers": stack_endpoints.kafka_bootstrap, "enable.idempotence": True})
    for r in sorted(records, key=lambda r: (r.partition(), r.offset())):
        for _ in range(2):
            producer.produce(dup, r.value(), r.key(), partition=r.partition(), headers=r.headers())
    assert producer.flush(60) == 0

    ks = keyspace_factory("dup")
    env = {**_worker_env(p, f"dup-{p.tag}"), "OHS_WORKER_TOPIC_UPDATES": dup, "OHS_KEYSPACE": ks}
    port_b = free_port()
    p.start("worker-a", ["worker"], env)
    p.start("worker-b", ["worker"], {**env, "OHS_WORKER_WEB_PORT": str(port_b)})
    _check_rows(cql_session, ks, engine, updates)
    # Each worker counts what it did; together at least every record taken, at least half of them
    # duplicates (a rebalance between the two workers' starts may hand a batch over unacked).
    counts = {}
    for port in (int(env["OHS_WORKER_WEB_PORT"]), port_b):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(("ohs_worker_records_total ", "ohs_worker_duplicates_total ")):
                name, value = line.split()
                counts[name] = counts.get(name, 0) + float(value)
    assert counts["ohs_worker_records_total"] >= 2 * len(records)
    assert counts["ohs_worker_duplicates_total"] >= len(records)

    # Each worker exports the group's lag per partition, as the broker sees it: once the group is
    # idle the gauges equal what `ohs lag` computes from the committed offsets.
    from streams.lag import group_lag

    def lag_gauges(port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {
            int(line.split('partition="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ohs_worker_lag_messages{")
        }

    deadline = time.monotonic() + 60
    while True:
        broker = {
            r.partition: float(r.lag_messages)
            for r in group_lag(stack_endpoints.kafka_bootstrap, env["OHS_WORKER_GROUP"], [dup])
        }
        gauges = lag_gauges(port_b)
        if len(gauges) == 3 and gauges == broker:
            break
        assert time.monotonic() < deadline, f"lag gauges {gauges} never matched the broker's {broker}"
        time.sleep(1)


def test_bad_records_are_dead_lettered_and_the_partitions_keep_going(pipeline, cql_session, stack_endpoints):
    from dataclasses import replace

    from confluent_kafka import Producer

    from schemas.codec import encode
    from schemas.events import Trade
    from tests.integration.pipeline import read_topics

    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    p.start("worker", ["worker"], _worker_env(p, f"g-{p.tag}"))
    p.drive(client, 400, seed=51, users=USERS)
    # The engine is still appending: read events only (recovering a live journal races its tail).
    with Journal.open(p.workdir / "journal", EngineSettings(_env_file=None).symbol_specs()) as journal:
        events = list(journal.read_events(1, 0, limit=10**9))
    updates = [e for e in events if isinstance(e, OrderUpdate)]
    trades = [e for e in events if isinstance(e, Trade)]
    good = updates[-1]
    key = str(good.user_id).encode()
    bad = [
        (key, b"not avro at all", {"bad_magic"}),
        (key, encode(good)[:-3], {"truncated", "undecodable"}),
        (b"user-x", encode(good), {"bad_key"}),
        (key, encode(replace(good, qty=-5)), {"rule_violation"}),
        (str(trades[0].taker_user_id).encode(), encode(trades[0]), {"unexpected_type"}),
        (key, b"\xc3\x01" + bytes(8) + encode(good)[10:], {"unknown_fingerprint"}),
    ]
    where: dict[int, tuple[int, int]] = {}
    producer = Producer({"bootstrap.servers": stack_endpoints.kafka_bootstrap})
    for i, (k, v, _) in enumerate(bad):

        def report(err, msg, i=i):
            assert err is None
            where[i] = (msg.partition(), msg.offset())

        producer.produce(p.topics["updates"], v, k, partition=i % 3, on_delivery=report)
    assert producer.flush(30) == 0
    p.drive(client, 400, seed=52, users=USERS)  # the same partitions keep flowing after the bad records
    client.close()
    p.settle()
    engine, updates = _truth(p)
    _check_rows(cql_session, p.keyspace, engine, updates)

    def worker_letters(records):
        return [r for r in records if dict(r.headers() or []).get("source") == b"worker"]

    records = worker_letters(
        read_topics(
            stack_endpoints.kafka_bootstrap, [p.topics["dlq"]], until=lambda rs: len(worker_letters(rs)) >= len(bad)
        )
    )
    assert len(records) == len(bad)
    by_source = {}
    for r in records:
        h = dict(r.headers())
        assert h["topic"].decode() == p.topics["updates"]
        by_source[(int(h["partition"]), int(h["offset"]))] = (r.key(), r.value(), h["reason"].decode())
    for i, (k, v, reasons) in enumerate(bad):
        got_key, got_value, reason = by_source[where[i]]
        assert (got_key, got_value) == (k, v), "the dead letter must carry the raw record"
        assert reason in reasons, f"record {i}: reason {reason}, expected one of {reasons}"
    # The good events' effects pass the audit (its Kafka part would rightly flag the forged records).
    from tests.integration.chaos.faults import audit

    p.kill("engine", signal.SIGTERM)
    audit(p, stack_endpoints.kafka_bootstrap, "--skip-kafka")
