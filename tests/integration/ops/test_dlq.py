"""``ohs dlq`` on what a real worker dead-lettered: listed, shown, re-driven after the fix, and
re-driven twice without being applied twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.checkpoint import Checkpoint
from schemas.codec import encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from streams.dlq import read_letters
from tests.integration.pipeline import Pipeline, free_port, read_topics

pytestmark = pytest.mark.integration

EPOCH = 1_700_000_000_000_000
USER = 42


def _update(order_id: int, seq: int, user_seq: int, **changes: object) -> OrderUpdate:
    ts = 1_800_000_000_000_000_000 + seq
    ev = OrderUpdate(
        epoch=EPOCH, seq=seq, ts_ns=ts, order_id=order_id, client_order_id="", user_id=USER, symbol="BTC-USD",
        side=Side.BUY, order_type=OrderType.LIMIT, time_in_force=TimeInForce.GTC, price=100, qty=5, quote_budget=0,
        filled_qty=0, remaining_qty=5, quote_filled=0, status=OrderStatus.NEW, reason=RejectReason.NONE,
        last_fill_qty=0, last_fill_price=0, trade_id=0, created_ns=ts, updated_ns=ts, expire_ns=0, user_seq=user_seq,
    )  # fmt: skip
    return replace(ev, **changes)


@pytest.fixture
def worker(stack_endpoints, tmp_path, keyspace_factory):
    """A real worker (seq guard on) over fresh topics, and its bridge checkpoint at ceiling 10."""
    p = Pipeline(stack_endpoints.env(), tmp_path)
    p.keyspace = keyspace_factory("dlq")
    bootstrap = stack_endpoints.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [
        NewTopic(p.topics["updates"], 3, 1),
        NewTopic(p.topics["dlq"], 1, 1),
        NewTopic(p.topics["checkpoint"], 1, 1),
    ]
    for future in admin.create_topics(topics).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "enable.idempotence": True})
    p.checkpoint = lambda ceiling: _checkpoint(producer, p, ceiling)
    p.checkpoint(10)
    p.port = free_port()
    p.group = f"dlq-{p.tag}"
    p.start(
        "worker",
        ["worker"],
        {
            "OHS_WORKER_GROUP": p.group,
            "OHS_WORKER_TOPIC_UPDATES": p.topics["updates"],
            "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"],
            "OHS_WORKER_PARTITIONS": "3",
            "OHS_KEYSPACE": p.keyspace,
            "OHS_WORKER_WEB_PORT": str(p.port),
            "OHS_WORKER_BATCH_WINDOW_S": "0.05",
            "OHS_WORKER_SEQ_GUARD": "true",
        },
    )
    p.producer = producer
    yield p
    p.stop_all()


def _checkpoint(producer: Producer, p: Pipeline, ceiling: int) -> None:
    key = f"bridge-{p.tag}".encode()
    producer.produce(p.topics["checkpoint"], key=key, value=Checkpoint(EPOCH, 0, ceiling).to_bytes())
    assert producer.flush(30) == 0


def _dlq(p: Pipeline, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ohs.cli", "dlq", "--topic", p.topics["dlq"], *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def _metric(p: Pipeline, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.port}/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    return values[0] if values else 0.0


def _wait(what: str, check, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_dead_letter_is_listed_shown_and_redriven_once(worker, stack_endpoints, cql_session):
    p, env, bootstrap = worker, stack_endpoints.env(), stack_endpoints.kafka_bootstrap
    good = _update(1, seq=5, user_seq=1)
    beyond = _update(2, seq=50, user_seq=2)  # beyond the ceiling of 10: the guard refuses it
    broken = _update(3, seq=7, user_seq=3, qty=-5)  # breaks a rule
    where: dict[int, tuple[int, int]] = {}
    for ev in (good, beyond, broken):

        def report(err, msg, seq=ev.seq):
            assert err is None
            where[seq] = (msg.partition(), msg.offset())

        p.producer.produce(p.topics["updates"], encode(ev), str(USER).encode(), on_delivery=report)
    assert p.producer.flush(30) == 0

    def worker_letters():
        letters = [x for x in read_letters(bootstrap, p.topics["dlq"]) if x.source == "worker"]
        return letters if len(letters) >= 2 else None

    letters = _wait("two dead letters", worker_letters)
    assert {x.reason for x in letters} == {"beyond_ceiling", "rule_violation"}
    ks = p.keyspace

    def seqs() -> set[int]:
        return {
            r.seq
            for r in cql_session.execute(
                f"SELECT seq FROM {ks}.user_updates WHERE user_id = %s ALLOW FILTERING", (USER,)
            )
        }

    _wait("the good event in Cassandra", lambda: seqs() == {5})

    # list: reasons, where each came from, sizes.
    proc = _dlq(p, ["list", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    listed = {d["reason"]: d for d in map(json.loads, proc.stdout.splitlines())}
    beyond_letter = listed["beyond_ceiling"]
    assert beyond_letter["source"] == "worker" and beyond_letter["source_topic"] == p.topics["updates"]
    assert (beyond_letter["source_partition"], beyond_letter["source_offset"]) == where[50]
    assert beyond_letter["size"] == beyond_letter["original_size"] == len(encode(beyond))
    assert beyond_letter["key"] == str(USER) and not beyond_letter["truncated"]
    proc = _dlq(p, ["list", "--reason", "rule_violation"], env)  # the table, filtered
    assert proc.returncode == 0 and "rule_violation" in proc.stdout and "beyond_ceiling" not in proc.stdout

    # show: the Avro payload decoded.
    proc = _dlq(p, ["show", str(beyond_letter["offset"]), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["decoded"]["type"] == "OrderUpdate"
    assert (shown["decoded"]["record"]["seq"], shown["decoded"]["record"]["order_id"]) == (50, 2)
    assert _dlq(p, ["show", "999999"], env).returncode == 1

    # The fix: the bridge's checkpoint now covers seq 50. A dry run changes nothing.
    p.checkpoint(100)
    proc = _dlq(p, ["redrive", "--reason", "beyond_ceiling", "--dry-run"], env)
    assert proc.returncode == 0 and "would send" in proc.stdout, proc.stdout + proc.stderr
    time.sleep(2)
    assert seqs() == {5}

    proc = _dlq(p, ["redrive", "--reason", "beyond_ceiling"], env)
    assert proc.returncode == 0 and "1 re-driven, 0 refused" in proc.stdout, proc.stdout + proc.stderr
    _wait("the re-driven event in Cassandra", lambda: seqs() == {5, 50})
    applied = _metric(p, "ohs_worker_applied_total")
    duplicates = _metric(p, "ohs_worker_duplicates_total")

    # Twice: the worker sees it again and applies nothing.
    proc = _dlq(p, ["redrive", "--offset", str(beyond_letter["offset"])], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _wait("the second copy seen as a duplicate", lambda: _metric(p, "ohs_worker_duplicates_total") >= duplicates + 1)
    assert _metric(p, "ohs_worker_applied_total") == applied
    assert seqs() == {5, 50}
    stats = cql_session.execute(
        f"SELECT orders_new, last_seq FROM {ks}.order_statistics WHERE user_id = %s AND symbol = '*'", (USER,)
    ).one()
    assert (stats.orders_new, stats.last_seq) == (2, 50)  # orders 1 and 2, each counted once
    history = cql_session.execute(f"SELECT order_id FROM {ks}.order_history WHERE user_id = %s", (USER,))
    assert sorted(r.order_id for r in history) == [1, 2]

    # The re-driven records: key and value as they were, epoch/seq headers, where they came from.
    redriven = read_topics(
        bootstrap,
        [p.topics["updates"]],
        until=lambda rs: sum(1 for r in rs if "redriven-from" in dict(r.headers() or [])) >= 2,
    )
    copies = [r for r in redriven if "redriven-from" in dict(r.headers() or [])]
    assert len(copies) == 2
    for r in copies:
        h = dict(r.headers())
        assert (r.key(), r.value()) == (str(USER).encode(), encode(beyond))
        assert (h["epoch"], h["seq"]) == (str(EPOCH).encode(), b"50")
        assert h["redriven-from"] == f"{p.topics['dlq']}:0:{beyond_letter['offset']}".encode()
        assert r.partition() == where[50][0]

    # And `ohs lag` names the Faust worker as the owner of every partition.
    lag = [sys.executable, "-m", "ohs.cli", "lag", "--group", p.group, "--topic", p.topics["updates"], "--json"]
    proc = subprocess.run(lag, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    owners = {(row["consumer_id"], row["client_id"]) for row in json.loads(proc.stdout)["partitions"]}
    assert len(owners) == 1 and all(owners.pop()), proc.stdout


def test_redrive_refuses_what_it_cannot_route_back(worker, stack_endpoints):
    p, env = worker, stack_endpoints.env()
    value = encode(_update(9, seq=3, user_seq=1))
    frames = len(value).to_bytes(4, "big")
    bridge_value = (2).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"head" + frames + value
    p.producer.produce(p.topics["dlq"], bridge_value, None, headers={"source": "bridge", "reason": "header_mismatch"})
    cut = {"source": "worker", "reason": "oversized", "topic": p.topics["updates"], "partition": "0", "offset": "3"}
    p.producer.produce(p.topics["dlq"], value[:10], b"42", headers={**cut, "truncated_from": "2000000"})
    gone = {**cut, "topic": "no-such-topic", "reason": "rule_violation"}
    p.producer.produce(p.topics["dlq"], value, b"42", headers=gone)
    assert p.producer.flush(30) == 0

    proc = _dlq(p, ["redrive", "--all", "--json"], env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    refused = {d["offset"]: d["refused"] for d in map(json.loads, proc.stdout.splitlines())}
    assert "not a topic" in refused[0] and "value was cut" in refused[1] and "does not exist" in refused[2]
    assert "0 re-driven, 3 refused" in proc.stderr

    # A bridge dead letter's payload (its last feed frame) is decoded too.
    shown = json.loads(_dlq(p, ["show", "0", "--json"], env).stdout)
    assert shown["decoded"]["record"]["order_id"] == 9
    assert _dlq(p, ["redrive"], env).returncode == 2  # nothing selected: a usage error
    proc = _dlq(p, ["--bootstrap-server", f"127.0.0.1:{free_port()}", "--timeout", "1", "list"], env)
    assert proc.returncode == 3 and proc.stderr.startswith("ohs dlq: cannot reach Kafka")
    assert len(proc.stderr.splitlines()) == 1
