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

from engine.journal import Journal
from engine.recovery import recover
from engine.settings import EngineSettings
from schemas.codec import encode
from schemas.events import OrderStatus, OrderUpdate, Trade
from streams.lag import group_lag
from streams.state import UserState
from streams.trades import MAKER, TAKER, fills_of
from tests.conftest import unique
from tests.integration.pipeline import Pipeline
from tests.integration.streams.test_worker import _worker_env

pytestmark = pytest.mark.integration
USERS = 30
FAILING = (
    "lost",
    "extra",
    "inconsistent",
    "mismatch",
    "out_of_order",
    "unknown",
    "applied_twice",
    "stale",
    "beyond_journal",
    "unpublishable",
)


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
            rows = group_lag(self.bootstrap, self.group, [self.p.topics["updates"], self.p.topics["trades"]])
            if len(rows) == 6 and all(r.committed == r.end or r.end == 0 for r in rows):
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
    areas["journal"] = report["journal_check"]
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
    assert tables["user_updates"]["read"] == len(updates)
    assert tables["order_history"]["read"] == tables["orders_by_id"]["read"] == len(last)
    assert tables["active_orders"]["read"] == sum(len(engine.open_orders(u)) for u in range(1, USERS + 1)) > 0
    assert tables["order_statistics"]["read"] == sum(len(s.stats) for s in states.values())
    fills = [f for t in trades for u in {t.taker_user_id, t.maker_user_id} for f in fills_of(t, u)]
    assert tables["user_trades"]["read"] == len(fills) == 2 * len(trades) == report["journal"]["fills"] > 0
    assert tables["user_trade_months"]["read"] == len({(f.user_id, f.month) for f in fills})
    for area in [*kafka.values(), *tables.values()]:
        if isinstance(area, dict) and "read" in area:
            assert area["read"] == area["expected"]
    assert not _failing(report) and not report["per_user"]
    assert report["timing"]["events_per_s"] > 0


_FILL = "user_id, month, ts_ns, epoch, seq, liquidity, trade_id, order_id, symbol, side, price, qty, quote_qty, fee"


def test_each_fill_lost_forged_or_changed_and_a_missing_month_are_named(flow):
    """Issue 16: the audit checks user_trades and user_trade_months against the journal's trades.
    The tampering is undone at the end (with later timestamps), for the next test."""
    cql, ks = flow.cql, flow.p.keyspace
    engine, events = flow.journal()
    trades = [e for e in events if isinstance(e, Trade)]
    months = {(r.user_id, r.month) for r in cql.execute(f"SELECT user_id, month FROM {ks}.user_trade_months")}
    pair = next(t for t in trades if t.taker_user_id != t.maker_user_id)
    (gone,) = fills_of(pair, pair.maker_user_id)  # deleted
    (real,) = fills_of(pair, pair.taker_user_id)
    # The taker's fill copied into the partition of a user who took no part (one the audit reads).
    third = next(u for u, m in sorted(months) if m == real.month and u not in (pair.taker_user_id, gone.user_id))
    changed = next(  # its qty changed
        f
        for t in trades[len(trades) // 2 :]
        for f in fills_of(t, t.taker_user_id)
        if t.seq != pair.seq and f.user_id not in (gone.user_id, third)
    )
    hidden = next(m for m in sorted(months) if m[0] not in (gone.user_id, changed.user_id, third))  # unindexed
    stamp = engine.epoch + engine.last_seq + 5_000  # later than anything the worker wrote
    key = "WHERE user_id = %s AND month = %s AND ts_ns = %s AND epoch = %s AND seq = %s AND liquidity = %s"

    def fill_key(f):  # type: ignore[no-untyped-def]
        return (f.user_id, f.month, f.ts_ns, f.epoch, f.seq, f.liquidity)

    def insert(values, ts):  # type: ignore[no-untyped-def]
        marks = ", ".join(["%s"] * len(values))
        cql.execute(f"INSERT INTO {ks}.user_trades ({_FILL}) VALUES ({marks}) USING TIMESTAMP %s", (*values, ts))

    row = [getattr(gone, c.strip()) for c in _FILL.split(",")]
    forged = [third if c.strip() == "user_id" else getattr(real, c.strip()) for c in _FILL.split(",")]
    try:
        cql.execute(f"DELETE FROM {ks}.user_trades USING TIMESTAMP %s {key}", (stamp, *fill_key(gone)))
        insert(forged, stamp)  # the taker's fill again, in a user's partition who took no part in the trade
        cql.execute(
            f"UPDATE {ks}.user_trades USING TIMESTAMP %s SET qty = %s {key}",
            (stamp, changed.qty + 1, *fill_key(changed)),
        )
        cql.execute(
            f"DELETE FROM {ks}.user_trade_months USING TIMESTAMP %s WHERE user_id = %s AND month = %s", (stamp, *hidden)
        )
        rc, report = flow.audit()
        assert (rc, _failing(report)) == (
            1,
            {"user_trades.lost": 1, "user_trades.extra": 1, "user_trades.mismatch": 1, "user_trade_months.lost": 1},
        )
        examples = {(e["area"], e["category"]): e for e in report["problems"]}
        lost = examples[("user_trades", "lost")]
        assert (lost["user_id"], lost["seq"], lost["liquidity"], lost["month"]) == (
            gone.user_id,
            gone.seq,
            MAKER,
            gone.month,
        )
        extra = examples[("user_trades", "extra")]
        assert (extra["user_id"], extra["seq"], extra["liquidity"], extra["reason"]) == (
            third,
            pair.seq,
            TAKER,
            "misplaced",
        )
        assert extra["journal_user"] == pair.taker_user_id
        mismatch = examples[("user_trades", "mismatch")]
        assert (mismatch["user_id"], mismatch["seq"]) == (changed.user_id, changed.seq)
        assert mismatch["fields"] == {"qty": [changed.qty, changed.qty + 1]}
        month = examples[("user_trade_months", "lost")]
        assert (month["user_id"], month["month"]) == hidden
        assert report["per_user"][str(gone.user_id)] == {"user_trades.lost": 1}
        tables = report["cassandra"]["tables"]
        assert tables["user_trades"]["read"] == tables["user_trades"]["expected"], "one row fewer, one more"
    finally:
        insert(row, stamp + 1)
        cql.execute(f"DELETE FROM {ks}.user_trades USING TIMESTAMP %s {key}", (stamp + 1, third, *fill_key(real)[1:]))
        cql.execute(
            f"UPDATE {ks}.user_trades USING TIMESTAMP %s SET qty = %s {key}",
            (stamp + 1, changed.qty, *fill_key(changed)),
        )
        cql.execute(
            f"INSERT INTO {ks}.user_trade_months (user_id, month) VALUES (%s, %s) USING TIMESTAMP %s",
            (*hidden, stamp + 1),
        )
    rc, report = flow.audit()
    assert rc == 0 and not _failing(report), report["problems"][:5]


def test_real_faults_are_found_under_their_category(flow):
    p, cql, ks = flow.p, flow.cql, flow.p.keyspace
    engine, events = flow.journal()
    updates = [e for e in events if isinstance(e, OrderUpdate)]

    # 1. A stream row lost.
    gone = updates[len(updates) // 2]
    day = dt.datetime.fromtimestamp(gone.ts_ns / 1e9, tz=dt.UTC).date()
    cql.execute(
        f"DELETE FROM {ks}.user_updates WHERE user_id = %s AND day = %s AND epoch = %s AND seq = %s",
        (gone.user_id, day, gone.epoch, gone.seq),
    )
    rc, report = flow.audit()
    assert (rc, _failing(report)) == (1, {"user_updates.lost": 1})
    assert report["per_user"] == {str(gone.user_id): {"user_updates.lost": 1}}

    # 2. An active order overwritten with a wrong filled_qty, newer than anything the worker wrote.
    victim = next(o for u in range(1, USERS + 1) for o in engine.open_orders(u))
    cql.execute(
        f"UPDATE {ks}.active_orders USING TIMESTAMP %s SET filled_qty = %s "
        "WHERE user_id = %s AND epoch = %s AND order_id = %s",
        (victim.epoch + engine.last_seq + 1_000, victim.filled_qty + 1, victim.user_id, victim.epoch, victim.order_id),
    )
    rc, report = flow.audit()
    assert (rc, _failing(report)) == (1, {"user_updates.lost": 1, "active_orders.mismatch": 1})
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
        "user_updates.lost": 1,
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
    assert failing["user_updates.lost"] == 1 + len(new_updates)
    assert failing["kafka.updates.inconsistent"] == 1
    assert "kafka.updates.out_of_order" not in failing and "user_updates.extra" not in failing
    # Rows of orders the new events changed are behind them: stale (the events never arrived), not
    # applied twice (only the order rewritten in step 3 may still show as that).
    assert failing["order_history.stale"] > 0 and failing.get("order_history.applied_twice", 0) <= 1

    # 6. Issue 12, item 10: a record on the updates topic with a far-future seq, and the rows it made
    #    (written here as the worker writes them). Before, they were "ahead" (information) and the
    #    audit passed them; the journal never produced them: each is a failure, beyond_journal.
    p.kill("worker", signal.SIGTERM)  # nothing consumes the forged record meanwhile
    report5 = report
    victim = next(e for e in new_updates if e.user_id == 5 or e is new_updates[-1])  # user 5's, as in the issue
    forged = replace(victim, seq=engine.last_seq + 1_000_000, status=OrderStatus.CANCELLED, remaining_qty=0)
    stamp = forged.epoch + forged.seq
    headers = [("epoch", str(forged.epoch).encode()), ("seq", str(forged.seq).encode())]
    producer.produce(p.topics["updates"], encode(forged), str(victim.user_id).encode(), headers=headers)
    assert producer.flush(30) == 0
    day = dt.datetime.fromtimestamp(forged.ts_ns / 1e9, tz=dt.UTC).date()
    cql.execute(
        f"INSERT INTO {ks}.user_updates (user_id, day, epoch, seq, order_id, status, payload) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) USING TIMESTAMP %s",
        (
            victim.user_id,
            day,
            forged.epoch,
            forged.seq,
            forged.order_id,
            "CANCELLED",
            encode(forged),
            stamp,
        ),
    )
    cql.execute(
        f"UPDATE {ks}.order_history USING TIMESTAMP %s SET status = 'CANCELLED', remaining_qty = 0, seq = %s "
        "WHERE user_id = %s AND epoch = %s AND order_id = %s",
        (stamp, forged.seq, victim.user_id, forged.epoch, forged.order_id),
    )
    cql.execute(
        f"UPDATE {ks}.orders_by_id USING TIMESTAMP %s SET user_id = %s, symbol = %s WHERE order_id = %s AND epoch = %s",
        (stamp, victim.user_id, victim.symbol, forged.order_id, forged.epoch),
    )
    cql.execute(
        f"UPDATE {ks}.order_statistics USING TIMESTAMP %s SET last_epoch = %s, last_seq = %s "
        "WHERE user_id = %s AND symbol = '*'",
        (stamp, forged.epoch, forged.seq, victim.user_id),
    )
    rc, report = flow.audit()
    failing = _failing(report)
    assert rc == 1
    beyond = {k: v for k, v in failing.items() if k.endswith(".beyond_journal")}
    assert beyond == {
        "kafka.updates.beyond_journal": 1,
        "user_updates.beyond_journal": 1,
        "order_history.beyond_journal": 1,
        "orders_by_id.beyond_journal": 1,
        "order_statistics.beyond_journal": 1,
    }
    # What the forged rows overwrote no longer counts as behind (stale): nothing else changes.
    rest = {k: v for k, v in failing.items() if not k.endswith(".beyond_journal")}
    assert set(rest) <= set(_failing(report5)) and all(v <= _failing(report5)[k] for k, v in rest.items())
    assert sum(_failing(report5).values()) - sum(rest.values()) <= 3
    tables = report["cassandra"]["tables"]
    assert report["kafka"]["updates"]["ahead"] == 0 and all(t.get("ahead", 0) == 0 for t in tables.values())
    examples = [e for e in report["problems"] if e["category"] == "beyond_journal"]
    assert {e["seq"] for e in examples} == {forged.seq} and {e["user_id"] for e in examples} == {victim.user_id}
    assert report["per_user"][str(victim.user_id)]["kafka.updates.beyond_journal"] == 1
