"""``ohs replay`` against a topic the real engine and bridge filled, rows compared with the engine's truth."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.events import OrderUpdate, Trade
from tests.integration.pipeline import Pipeline, read_topics, seqs_of
from tests.integration.streams.test_trades import _journal_trades, _want
from tests.integration.streams.test_trades import _rows as _fills
from tests.integration.streams.test_worker import USERS, _check_rows, _truth

pytestmark = pytest.mark.integration
TABLES = (
    "active_orders",
    "order_history",
    "orders_by_id",
    "user_updates",
    "order_statistics",
)


@dataclass
class Filled:
    """A topic filled by the engine and bridge (both stopped), with the engine's truth."""

    env: dict[str, str]
    bootstrap: str
    topic: str
    engine: object
    updates: list[OrderUpdate]
    records: list[Any]
    ends: dict[int, int]
    trades_topic: str = ""
    trades: list[Trade] = field(default_factory=list)
    """The journal's trades: the bridge wrote each to trades_topic once per user."""

    @property
    def total(self) -> int:
        return sum(self.ends.values())

    def replay(self, *args: str, topic: str | None = None) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "ohs.cli", "replay", "--topic", topic or self.topic, "--json", *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def committed(self, group: str) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            tps = consumer.committed([TopicPartition(self.topic, p) for p in self.ends], timeout=15)
        finally:
            consumer.close()
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}


@pytest.fixture(scope="module")
def filled(stack_endpoints, tmp_path_factory):
    p = Pipeline(stack_endpoints.env(), tmp_path_factory.mktemp("replay"))
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        p.drive(client, 1_500, seed=61, users=USERS)
        client.close()
        p.settle()
        engine, updates = _truth(p)
        want = {e.seq for e in updates}
        bootstrap = stack_endpoints.kafka_bootstrap
        read_topics(bootstrap, [p.topics["updates"]], until=lambda rs: set(seqs_of(rs)) >= want, timeout=120)
        trades = _journal_trades(p)
        sides = {(t.seq, u) for t in trades for u in (t.taker_user_id, t.maker_user_id)}
        read_topics(
            bootstrap,
            [p.topics["trades"]],
            until=lambda rs: {(s, int(r.key())) for s, r in zip(seqs_of(rs), rs, strict=True)} >= sides,
            timeout=120,
        )
    finally:
        p.stop_all()
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{p.tag}"})
    try:
        marks = {n: probe.get_watermark_offsets(TopicPartition(p.topics["updates"], n), timeout=15) for n in range(3)}
    finally:
        probe.close()
    assert all(low == 0 for low, _ in marks.values())
    ends = {n: high for n, (_, high) in marks.items()}
    records = read_topics(bootstrap, [p.topics["updates"]], until=lambda rs: len(rs) >= sum(ends.values()))
    assert len(records) == sum(ends.values())
    env = p.env({"OHS_WORKER_TOPIC_DLQ": p.topics["dlq"]})
    return Filled(env, bootstrap, p.topics["updates"], engine, updates, records, ends, p.topics["trades"], trades)


def _group() -> str:
    return f"replay-{uuid.uuid4().hex[:8]}"


def _rows(cql: Any, ks: str) -> dict[str, set[tuple[Any, ...]]]:
    def frozen(value):  # map columns (an order's events) as sorted tuples, so rows can be compared as a set
        return tuple(sorted(value.items())) if hasattr(value, "items") else value

    return {
        t: {tuple(frozen(v) for v in r) for r in cql.execute(f"SELECT * FROM {ks}.{t}", timeout=60)} for t in TABLES
    }


def _iso(ms: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)).isoformat()


def test_from_beginning_into_a_fresh_keyspace_equals_the_engine_truth(filled, cql_session, keyspace_factory):
    ks = keyspace_factory("replay")
    s = filled.replay("--from-beginning", "--keyspace", ks, "--group", _group())
    assert (s["records"], s["dead_lettered"], s["stopped_by"]) == (filled.total, 0, None)
    assert s["applied"] == len({e.seq for e in filled.updates})
    assert s["applied"] + s["duplicates"] == filled.total
    assert s["statistics"], s["statistics_note"]
    assert {p["partition"]: p["offset"] for p in s["partitions"]} == filled.ends
    _check_rows(cql_session, ks, filled.engine, filled.updates)


def test_replaying_again_changes_nothing_and_leaves_other_groups_alone(filled, cql_session, keyspace_factory):
    ks = keyspace_factory("again")
    live = _group()
    consumer = Consumer({"bootstrap.servers": filled.bootstrap, "group.id": live, "enable.auto.commit": False})
    consumer.commit(
        offsets=[TopicPartition(filled.topic, p, n // 2) for p, n in filled.ends.items()], asynchronous=False
    )
    consumer.close()
    before = filled.committed(live)
    group = _group()
    filled.replay("--from-beginning", "--keyspace", ks, "--group", group)
    rows = _rows(cql_session, ks)
    assert len(rows["user_updates"]) == len({e.seq for e in filled.updates})

    again = filled.replay("--from-beginning", "--keyspace", ks, "--group", group)
    assert again["records"] == filled.total
    assert _rows(cql_session, ks) == rows
    # A replay starting mid-history writes every row it can but must not touch the statistics.
    middle = sorted(r.timestamp()[1] for r in filled.records)[filled.total // 2]
    part = filled.replay("--from-timestamp", _iso(middle), "--keyspace", ks, "--group", group)
    assert 0 < part["records"] < filled.total
    assert not part["statistics"] and "not written" in part["statistics_note"]
    assert _rows(cql_session, ks) == rows
    _check_rows(cql_session, ks, filled.engine, filled.updates)
    assert filled.committed(live) == before
    assert filled.committed(group) == {p["partition"]: p["offset"] for p in part["partitions"]}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_replay_stopped_by_a_signal_resumes_where_it_committed(filled, cql_session, keyspace_factory, sig):
    ks = keyspace_factory("resume")
    group = _group()
    cmd = [sys.executable, "-m", "ohs.cli", "replay", "--topic", filled.topic, "--json"]
    cmd += ["--from-beginning", "--keyspace", ks, "--group", group, "--batch-size", "10"]
    proc = subprocess.Popen(cmd, env=filled.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum(filled.committed(group).values()) < 50:  # a few batches are durable and committed
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the replay committed nothing"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, err[-3000:]
    first = json.loads(out)
    assert first["stopped_by"] == sig
    assert 0 < first["records"] < filled.total
    offsets = {p["partition"]: p["offset"] for p in first["partitions"]}
    assert filled.committed(group) == offsets
    assert first["records"] == sum(offsets.values())

    second = filled.replay("--keyspace", ks, "--group", group)
    assert second["records"] == filled.total - first["records"]
    assert {p["partition"]: p["start"] for p in second["partitions"]} == offsets
    assert second["statistics"], second["statistics_note"]
    assert filled.committed(group) == filled.ends
    _check_rows(cql_session, ks, filled.engine, filled.updates)


def test_dry_run_counts_every_record_and_writes_nothing(filled, cql_session, keyspace_factory):
    ks = keyspace_factory("dry")
    group = _group()
    s = filled.replay("--dry-run", "--from-beginning", "--keyspace", ks, "--group", group)
    assert {p["partition"]: p["records"] for p in s["partitions"]} == filled.ends
    assert s["records"] == filled.total
    assert s["applied"] == len({e.seq for e in filled.updates})
    assert s["dead_lettered"] == 0
    assert not s["statistics"]
    tables = cql_session.execute("SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (ks,))
    assert list(tables) == []
    assert filled.committed(group) == {}


def test_from_timestamp_until_and_from_offset_select_the_expected_records(filled):
    stamps = sorted(r.timestamp()[1] for r in filled.records)
    since, until = stamps[len(stamps) // 3], stamps[2 * len(stamps) // 3]
    expected = {}
    for p in filled.ends:
        mine = sorted((r.offset(), r.timestamp()[1]) for r in filled.records if r.partition() == p)
        first = next((o for o, ts in mine if ts >= since), filled.ends[p])
        stop = next((o for o, ts in mine if ts > until), filled.ends[p])
        expected[p] = max(0, stop - first)
    s = filled.replay("--dry-run", "--from-timestamp", _iso(since), "--until", _iso(until), "--group", _group())
    assert {p["partition"]: p["records"] for p in s["partitions"]} == expected
    assert 0 < s["records"] < filled.total

    half = filled.ends[0] // 2
    s = filled.replay("--dry-run", "--from-offset", f"0:{half}", "--from-offset", "2:0", "--group", _group())
    assert {p["partition"]: (p["start"], p["records"]) for p in s["partitions"]} == {
        0: (half, filled.ends[0] - half),
        2: (0, filled.ends[2]),
    }


def test_bad_records_are_dead_lettered_with_the_workers_headers_or_only_counted_in_a_dry_run(
    filled, topic_factory, keyspace_factory, cql_session
):
    topic = topic_factory("bad", partitions=3)
    good = [r for r in filled.records if r.partition() == 0][:40]
    bad = [(b"1", b"not avro at all", {"bad_magic"}), (b"user-x", good[0].value(), {"bad_key"})]
    producer = Producer({"bootstrap.servers": filled.bootstrap})
    for r in good:
        producer.produce(topic, r.value(), r.key(), partition=0, headers=r.headers())
    for key, value, _ in bad:
        producer.produce(topic, value, key, partition=1)
    assert producer.flush(30) == 0
    dlq = f"orders.dlq.replay-{uuid.uuid4().hex[:8]}"
    env = {**filled.env, "OHS_WORKER_TOPIC_DLQ": dlq}
    admin = AdminClient({"bootstrap.servers": filled.bootstrap})

    dry = replace(filled, env=env).replay("--dry-run", "--from-beginning", "--group", _group(), topic=topic)
    assert (dry["records"], dry["applied"], dry["dead_lettered"]) == (42, 40, 2)
    assert dlq not in admin.list_topics(timeout=15).topics  # counted, never sent

    ks = keyspace_factory("bad")
    s = replace(filled, env=env).replay("--from-beginning", "--keyspace", ks, "--group", _group(), topic=topic)
    assert (s["records"], s["applied"], s["dead_lettered"]) == (42, 40, 2)
    assert [p["dead_lettered"] for p in s["partitions"]] == [0, 2, 0]
    letters = read_topics(filled.bootstrap, [dlq], until=lambda rs: len(rs) >= 2, timeout=30)
    assert len(letters) == 2
    for letter, (key, value, reasons), offset in zip(letters, bad, range(2), strict=True):
        h = {k: v.decode() for k, v in letter.headers()}
        assert (letter.key(), letter.value()) == (key, value), "a dead letter carries the raw record"
        assert h["reason"] in reasons and h["source"] == "replay" and h["detail"]
        assert (h["topic"], h["partition"], h["offset"]) == (topic, "1", str(offset))
    stream = cql_session.execute(f"SELECT seq FROM {ks}.user_updates")
    assert {r.seq for r in stream} == {int(dict(r.headers())["seq"]) for r in good}


def _lease(cql_session, ks: str, group: str):  # type: ignore[no-untyped-def]
    return cql_session.execute(f"SELECT owner, pid FROM {ks}.replay_leases WHERE grp = %s", (group,)).one()


def test_one_replay_per_group_even_after_a_kill_9_until_its_lease_expires(filled, cql_session, keyspace_factory):
    """Before: two replays at once ran into the same group (manual assignment joins no group, so
    nothing refused the second), committing over each other's positions."""
    ks = keyspace_factory("lease")
    group, ttl = _group(), 12
    cmd = [sys.executable, "-m", "ohs.cli", "replay", "--topic", filled.topic, "--json", "--keyspace", ks]
    cmd += ["--group", group, "--lease-ttl", str(ttl)]

    def second(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], env=filled.env, capture_output=True, text=True, timeout=120, check=False)

    first = subprocess.Popen(
        [*cmd, "--from-beginning", "--batch-size", "2"], env=filled.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while sum(filled.committed(group).values()) < 20:  # it holds the lease and commits batches
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first replay committed nothing"
            time.sleep(0.05)
        holder = _lease(cql_session, ks, group)
        assert holder is not None and holder.pid == first.pid
        for args in ((), ("--from-beginning",)):  # a resume, and a restart that would delete its positions
            refused = second(*args)
            assert refused.returncode == 1, refused.stdout + refused.stderr[-3000:]
            assert f"group {group!r} has an active replay" in refused.stderr, refused.stderr[-3000:]
            assert f"pid {first.pid}" in refused.stderr
        assert first.poll() is None, "the refused replays must not disturb the running one"
        assert sum(filled.committed(group).values()) >= 20, "a refused --from-beginning deleted the positions"

        first.kill()  # -9: no release, the lease must expire by itself
        first.wait(30)
        killed_at = time.monotonic()
        refused = second()
        if time.monotonic() - killed_at < ttl / 2:  # only meaningful while the dead lease surely holds
            assert refused.returncode == 1 and "has an active replay" in refused.stderr, refused.stderr[-3000:]
        while _lease(cql_session, ks, group) is not None:
            assert time.monotonic() - killed_at < ttl + 15, "the lease of a killed replay never expired"
            time.sleep(0.5)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    done = filled.committed(group)
    resumed = second()  # the same group resumes where the killed one committed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.loads(resumed.stdout)
    assert {p["partition"]: p["start"] for p in s["partitions"]} == done
    assert filled.committed(group) == filled.ends
    assert _lease(cql_session, ks, group) is None, "a replay that ends releases its lease"
    _check_rows(cql_session, ks, filled.engine, filled.updates)


def test_of_two_replays_started_together_exactly_one_runs(filled, cql_session, keyspace_factory):
    ks = keyspace_factory("race")
    filled.replay("--from-offset", "0:0", "--keyspace", ks, "--group", _group())  # the keyspace and lease table
    group = _group()
    cmd = [sys.executable, "-m", "ohs.cli", "replay", "--topic", filled.topic, "--json", "--keyspace", ks]
    cmd += ["--group", group, "--from-beginning", "--batch-size", "20"]  # long enough to overlap
    procs = [
        subprocess.Popen(cmd, env=filled.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    results = [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs, strict=True)]
    assert sorted(rc for rc, _, _ in results) == [0, 1], [err[-2000:] for _, _, err in results]
    (_, out, _), (_, _, err) = sorted(results, key=lambda r: r[0])
    assert "has an active replay" in err
    assert json.loads(out)["records"] == filled.total
    assert filled.committed(group) == filled.ends
    _check_rows(cql_session, ks, filled.engine, filled.updates)


def test_trades_from_beginning_into_a_fresh_keyspace_equal_the_engine_fills(filled, cql_session, keyspace_factory):
    """Issue 16: ``--what trades`` rebuilds user_trades and user_trade_months from the trades topic."""
    ks = keyspace_factory("fills")
    group = _group()
    # No --topic: the trades replay reads the bridge's trades topic (OHS_BRIDGE_TOPIC_TRADES here).
    cmd = [sys.executable, "-m", "ohs.cli", "replay", "--what", "trades", "--json", "--from-beginning"]
    cmd += ["--keyspace", ks, "--group", group, "--batch-size", "50"]
    proc = subprocess.run(cmd, env=filled.env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    trades = filled.trades
    assert len(trades) > 50, "the flow traded"
    records = sum(1 if t.taker_user_id == t.maker_user_id else 2 for t in trades)
    want = _want(trades)
    assert (s["what"], s["topic"], s["group"]) == ("trades", filled.trades_topic, group)
    assert (s["records"], s["applied"], s["dead_lettered"], s["stopped_by"]) == (records, len(want), 0, None)
    assert len(want) == 2 * len(trades)
    assert not s["statistics"] and "fills have none" in s["statistics_note"]
    assert _fills(cql_session, ks) == want
    months = {(r.user_id, r.month) for r in cql_session.execute(f"SELECT user_id, month FROM {ks}.user_trade_months")}
    assert months == {(row[0], row[1]) for row in want}
    for table in TABLES:  # the fills only: the order tables are the updates replay's
        assert list(cql_session.execute(f"SELECT * FROM {ks}.{table} LIMIT 1")) == [], table

    # Again, in smaller batches: identical rows (the worker's write path: USING TIMESTAMP epoch + seq).
    again = filled.replay(
        "--what", "trades", "--from-beginning", "--keyspace", ks, "--group", group, "--batch-size", "7",
        topic=filled.trades_topic,
    )  # fmt: skip
    assert (again["records"], again["applied"]) == (records, len(want))
    assert _fills(cql_session, ks) == want
