"""``ohs audit`` against a real engine, bridge, worker, Kafka and Cassandra: clean when they agree
with the journal, and each real fault found under its own category."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from confluent_kafka import Producer

from engine.events import OrderUpdate, Trade
from engine.journal import Journal
from engine.recovery import recover
from engine.settings import EngineSettings
from schemas.codec import encode
from streams.lag import group_lag
from streams.state import UserState
from tests.conftest import unique
from tests.integration.pipeline import Pipeline
from tests.integration.streams.test_worker import _worker_env

pytestmark = pytest.mark.integration
USERS = 30
FAILING = ("lost", "extra", "inconsistent", "mismatch", "out_of_order", "unknown", "applied_twice", "stale")


@dataclass
class Flow:
    p: Pipeline
    bootstrap: str
    group: str
    cql: Any

    def audit(self, *args: str) -> tuple[int, dict[str, Any]]:
        t = self.p.topics
        cmd = [sys.executable, "-m", "ohs.cli", "audit", "--json", "--journal-dir", str(self.p.workdir / "journal")]
        cmd += ["--keyspace", self.p.keyspace, "--topic-updates", t["updates"], "--topic-trades", t["trades"]]
        cmd += ["--topic-balances", t["balances"], *args]
        proc = subprocess.run(cmd, env=self.p.env(), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode in (0, 1) and proc.stdout, proc.stderr[-3000:]
        return proc.returncode, json.loads(proc.stdout)

    def journal(self) -> tuple[Any, list[Any]]:
        with Journal.open(self.p.workdir / "journal", EngineSettings(_env_file=None).symbol_specs()) as journal:
            engine, _ = recover(journal)
            return engine, list(journal.read_events(1, 0, limit=10**9))

    def wait_caught_up(self, timeout: float = 120) -> None:
        """Until the worker committed every record: its Cassandra writes come before the commit."""
        deadline = time.monotonic() + timeout
        while True:
            rows = group_lag(self.bootstrap, self.group, [self.p.topics["updates"]])
            if len(rows) == 3 and all(r.committed == r.end or r.end == 0 for r in rows):
                return
            assert time.monotonic() < deadline, f"worker never caught up: {rows}\n{self.p.log('worker')}"
            time.sleep(1)


@pytest.fixture(scope="module")
def flow(stack_endpoints, tmp_path_factory, cql_cluster) -> Iterator[Flow]:
    session = cql_cluster.connect()
    ks = unique("audit").lower()
    session.execute(f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
    p = Pipeline(stack_endpoints.env(), tmp_path_factory.mktemp("audit"))
    p.keyspace = ks  # type: ignore[attr-defined]
    f = Flow(p, stack_endpoints.kafka_bootstrap, f"audit-{p.tag}", session)
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        p.start("worker", ["worker"], _worker_env(p, f.group))
        p.drive(client, 1_000, seed=81, users=USERS)
        client.close()
        p.settle()
        f.wait_caught_up()
        yield f
    finally:
        p.stop_all()
        session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=60)


def _failing(report: dict[str, Any]) -> dict[str, int]:
    """Nonzero failing counts by "area.category", Kafka topics and Cassandra tables alike."""
    areas = {f"kafka.{r}": report["kafka"][r] for r in ("updates", "trades", "balances")}
    areas.update(report["cassandra"]["tables"])
    return {f"{a}.{c}": n for a, counts in areas.items() for c, n in counts.items() if c in FAILING and n}


def test_a_settled_pipeline_audits_clean_and_counts_what_the_journal_holds(flow):
    rc, report = flow.audit()
    assert rc == 0 and report["ok"], (report["problems"][:5], report["notes"])
    engine, events = flow.journal()
    kinds = Counter(type(e).__name__ for e in events)
    assert report["journal"]["events"] == len(events) == engine.last_seq
    assert report["journal"]["epoch"] == engine.epoch
    trades = [e for e in events if isinstance(e, Trade)]
    sides = sum(1 if t.taker_user_id == t.maker_user_id else 2 for t in trades)
    kafka = report["kafka"]
    assert (kafka["updates"]["read"], kafka["trades"]["read"], kafka["balances"]["read"]) == (
        kinds["OrderUpdate"],
        sides,
        kinds["BalanceUpdate"],
    )
    assert kafka["totals"]["duplicates"] == 0  # the bridge never restarted: nothing was re-sent

    updates = [e for e in events if isinstance(e, OrderUpdate)]
    last = {e.order_id: e for e in updates}
    states: dict[int, UserState] = {}
    for e in updates:
        states.setdefault(e.user_id, UserState()).apply(e)
    tables = report["cassandra"]["tables"]
    assert tables["order_updates_stream"]["read"] == len(updates)
    assert tables["order_history"]["read"] == tables["orders_by_id"]["read"] == len(last)
    assert tables["active_orders"]["read"] == sum(len(engine.open_orders(u)) for u in range(1, USERS + 1)) > 0
    assert tables["order_statistics"]["read"] == sum(len(s.stats) for s in states.values())
    for area in [*kafka.values(), *tables.values()]:
        if isinstance(area, dict) and "read" in area:
            assert area["read"] == area["expected"]
    assert not _failing(report) and not report["per_user"]
    assert report["timing"]["events_per_s"] > 0


def test_real_faults_are_found_under_their_category(flow):
    p, cql, ks = flow.p, flow.cql, flow.p.keyspace
    engine, events = flow.journal()
    updates = [e for e in events if isinstance(e, OrderUpdate)]

    # 1. A stream row lost.
    gone = updates[len(updates) // 2]
    day = dt.datetime.fromtimestamp(gone.ts_ns / 1e9, tz=dt.UTC).date()
    cql.execute(
        f"DELETE FROM {ks}.order_updates_stream WHERE day = %s AND bucket = %s AND epoch = %s AND seq = %s",
        (day, gone.seq % 16, gone.epoch, gone.seq),
    )
    rc, report = flow.audit()
    assert (rc, _failing(report)) == (1, {"order_updates_stream.lost": 1})
    assert report["per_user"] == {str(gone.user_id): {"order_updates_stream.lost": 1}}

    # 2. An active order overwritten with a wrong filled_qty, newer than anything the worker wrote.
    victim = next(o for u in range(1, USERS + 1) for o in engine.open_orders(u))
    cql.execute(
        f"UPDATE {ks}.active_orders USING TIMESTAMP %s SET filled_qty = %s "
        "WHERE user_id = %s AND epoch = %s AND order_id = %s",
        (victim.epoch + engine.last_seq + 1_000, victim.filled_qty + 1, victim.user_id, victim.epoch, victim.order_id),
    )
    rc, report = flow.audit()
    assert (rc, _failing(report)) == (1, {"order_updates_stream.lost": 1, "active_orders.mismatch": 1})
    (example,) = [e for e in report["problems"] if e["area"] == "active_orders"]
    assert example["order_id"] == victim.order_id
    assert example["fields"] == {"filled_qty": [victim.filled_qty, victim.filled_qty + 1]}

    # 3. Effects applied twice: an order's history row rewritten with an older update of it, and a
    #    user's statistics counting one NEW more, both after the newer values (higher timestamps).
    later = engine.last_seq + 2_000
    by_order: dict[int, list[OrderUpdate]] = {}
    for e in updates:
        by_order.setdefault(e.order_id, []).append(e)
    # An order whose last update did reach Cassandra (not the one whose stream row is gone).
    first = next(evs[0] for evs in by_order.values() if len(evs) > 1 and evs[-1].seq != gone.seq)
    again = updates[0]
    cql.execute(
        f"UPDATE {ks}.order_history USING TIMESTAMP %s SET status = %s, filled_qty = %s, seq = %s "
        "WHERE user_id = %s AND epoch = %s AND order_id = %s",
        (
            first.epoch + later,
            first.status.value,
            first.filled_qty,
            first.seq,
            first.user_id,
            first.epoch,
            first.order_id,
        ),
    )
    row = cql.execute(
        f"SELECT orders_new FROM {ks}.order_statistics WHERE user_id = %s AND symbol = '*'", (again.user_id,)
    ).one()
    cql.execute(
        f"UPDATE {ks}.order_statistics USING TIMESTAMP %s SET orders_new = %s WHERE user_id = %s AND symbol = '*'",
        (again.epoch + later, row.orders_new + 1, again.user_id),
    )
    rc, report = flow.audit()
    expected = {
        "order_updates_stream.lost": 1,
        "active_orders.mismatch": 1,
        "order_history.applied_twice": 1,
        "order_statistics.applied_twice": 1,
    }
    assert (rc, _failing(report)) == (1, expected)

    # 4. A record on the updates topic claiming an existing seq with another payload (the worker
    #    drops it as a duplicate: Cassandra does not change).
    target = updates[-1]
    # The bridge's partitioner: on another partition the worker would not find the user's state.
    producer = Producer({"bootstrap.servers": flow.bootstrap, "partitioner": "murmur2_random"})
    headers = [("epoch", str(target.epoch).encode()), ("seq", str(target.seq).encode())]
    forged = encode(replace(target, price=target.price + 7))
    producer.produce(p.topics["updates"], forged, str(target.user_id).encode(), headers=headers)
    assert producer.flush(30) == 0
    rc, report = flow.audit()
    expected["kafka.updates.inconsistent"] = 1
    assert (rc, _failing(report)) == (1, expected)
    (example,) = [e for e in report["problems"] if e["area"] == "kafka.updates"]
    assert (example["seq"], example["reason"]) == (target.seq, "payload_differs")
    assert example["fields"] == {"price": [target.price, target.price + 7]}

    # 5. The journal ahead of the topics: the bridge stopped while the engine took more commands.
    p.kill("bridge", signal.SIGTERM)
    before = engine.last_seq
    client = p.client()
    p.drive(client, 200, seed=82, users=USERS)
    client.close()
    p.settle()  # the flow's GTT orders expire by themselves: wait until the journal stops growing
    engine, events = flow.journal()
    new = [e for e in events if e.seq > before]
    new_updates = [e for e in new if isinstance(e, OrderUpdate)]
    trades = [e for e in new if isinstance(e, Trade)]
    rc, report = flow.audit()
    failing = _failing(report)
    assert rc == 1
    assert failing["kafka.updates.lost"] == len(new_updates) > 0
    assert failing["kafka.trades.lost"] == sum(1 if t.taker_user_id == t.maker_user_id else 2 for t in trades)
    assert failing["kafka.balances.lost"] == len(new) - len(new_updates) - len(trades)
    assert failing["order_updates_stream.lost"] == 1 + len(new_updates)
    assert failing["kafka.updates.inconsistent"] == 1
    assert "kafka.updates.out_of_order" not in failing and "order_updates_stream.extra" not in failing
    # Rows of orders the new events changed are behind them: stale (the events never arrived), not
    # applied twice (only the order rewritten in step 3 may still show as that).
    assert failing["order_history.stale"] > 0 and failing.get("order_history.applied_twice", 0) <= 1
