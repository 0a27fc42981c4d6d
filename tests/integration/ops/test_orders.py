"""``ohs orders`` reads back, from real Cassandra, what the worker's processor and sink wrote."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from schemas.codec import encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from streams.processor import Processor, Record
from streams.settings import WorkerSettings
from streams.state import UserState
from tests.ports import free_port

pytestmark = pytest.mark.integration

EPOCH = 1_700_000_000_000_000
USER = 7


def _new(order_id: int, seq: int, user_seq: int, symbol: str = "BTC-USD") -> OrderUpdate:
    ts = 1_800_000_000_000_000_000 + seq
    return OrderUpdate(
        epoch=EPOCH, seq=seq, ts_ns=ts, order_id=order_id, client_order_id=f"c{order_id}", user_id=USER,
        symbol=symbol, side=Side.BUY, order_type=OrderType.LIMIT, time_in_force=TimeInForce.GTC, price=100, qty=5,
        quote_budget=0, filled_qty=0, remaining_qty=5, quote_filled=0, status=OrderStatus.NEW,
        reason=RejectReason.NONE, last_fill_qty=0, last_fill_price=0, trade_id=0, created_ns=ts, updated_ns=ts,
        expire_ns=0, user_seq=user_seq,
    )  # fmt: skip


def _fill(ev: OrderUpdate, seq: int, user_seq: int, qty: int, trade: int) -> OrderUpdate:
    filled = ev.filled_qty + qty
    return replace(
        ev,
        seq=seq,
        user_seq=user_seq,
        ts_ns=ev.created_ns + seq,
        updated_ns=ev.created_ns + seq,
        filled_qty=filled,
        remaining_qty=ev.qty - filled if filled < ev.qty else 0,
        quote_filled=ev.quote_filled + qty * 100,
        status=OrderStatus.FILLED if filled == ev.qty else OrderStatus.PARTIALLY_FILLED,
        last_fill_qty=qty,
        last_fill_price=100,
        trade_id=trade,
    )


EVENTS = [
    a := _new(101, seq=1, user_seq=1),
    b := _fill(a, seq=3, user_seq=2, qty=2, trade=9),
    _new(102, seq=4, user_seq=3, symbol="ETH-USD"),
    _fill(b, seq=6, user_seq=4, qty=3, trade=11),
]


@pytest.fixture
def written(stack_endpoints, keyspace_factory, monkeypatch):
    """EVENTS applied by the worker's own processor and Cassandra sink into a fresh keyspace."""
    from streams.migrate import migrate
    from streams.sink import CassandraSink, connect

    ks = keyspace_factory("orders_cmd")
    env = {**stack_endpoints.env(), "OHS_KEYSPACE": ks}
    for k, v in env.items():
        if k.startswith("OHS_"):
            monkeypatch.setenv(k, v)
    s = WorkerSettings()
    cluster, session = connect(s)
    try:
        migrate(session, s)
        sink = CassandraSink(session, s)

        async def dead_letter(rec, reason, detail):
            raise AssertionError(f"dead-lettered: {reason} {detail}")

        states: dict[bytes, UserState] = {}
        records = [Record(str(USER).encode(), encode(ev), "orders.updates", 0, i) for i, ev in enumerate(EVENTS)]
        result, changed = asyncio.run(
            Processor(sink, dead_letter).process(records, lambda k: states.get(k, UserState()))
        )
        assert result.applied == len(EVENTS) and set(changed) == {str(USER).encode()}
    finally:
        cluster.shutdown()
    return env


def _orders(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ohs.cli", "orders", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def _json(args: list[str], env: dict[str, str]) -> dict:
    proc = _orders([*args, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_history_active_order_and_stats_are_what_the_worker_wrote(written):
    env = written
    history = _json(["--user", str(USER)], env)["orders"]
    assert [(o["order_id"], o["status"], o["filled_qty"]) for o in history] == [(102, "NEW", 0), (101, "FILLED", 5)]
    assert _json(["--user", str(USER), "--history", "--limit", "1"], env)["orders"][0]["order_id"] == 102

    active = _json(["--user", str(USER), "--active"], env)["active"]
    assert [(o["order_id"], o["symbol"], o["remaining_qty"]) for o in active] == [(102, "ETH-USD", 5)]

    one = _json(["--user", str(USER), "--order", "101"], env)
    assert one["order"]["status"] == "FILLED" and one["order"]["quote_filled"] == 500
    assert [(e["seq"], e["user_seq"], e["status"], e["last_fill_qty"], e["trade_id"]) for e in one["events"]] == [
        (1, 1, "NEW", 0, 0),
        (3, 2, "PARTIALLY_FILLED", 2, 9),
        (6, 4, "FILLED", 3, 11),
    ]

    stats = {r["symbol"]: r for r in _json(["--user", str(USER), "--stats"], env)["statistics"]}
    assert set(stats) == {"*", "BTC-USD", "ETH-USD"}
    assert (stats["*"]["orders_new"], stats["*"]["orders_filled"], stats["*"]["fills"]) == (2, 1, 2)
    assert stats["*"]["last_seq"] == 6

    # The default is a table for people.
    proc = _orders(["--user", str(USER), "--order", "101"], env)
    assert proc.returncode == 0 and "PARTIALLY_FILLED" in proc.stdout and "3 event(s)" in proc.stdout, proc.stderr


def test_another_users_order_or_an_empty_user(written):
    env = written
    proc = _orders(["--user", str(USER + 1), "--order", "101"], env)
    assert proc.returncode == 1 and proc.stderr.strip() == f"ohs orders: user {USER + 1} has no order 101"
    assert _json(["--user", str(USER + 1)], env)["orders"] == []
    assert _orders(["--user", str(USER), "--order", "101", "--active"], env).returncode == 2
    assert _orders(["--user", "0"], env).returncode == 2


def test_exit_3_without_cassandra_or_keyspace(written):
    env = {**written, "OHS_CQL_PORT": str(free_port())}
    proc = _orders(["--user", str(USER)], env)
    assert proc.returncode == 3 and "cannot reach Cassandra" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _orders(["--user", str(USER)], {**written, "OHS_KEYSPACE": "no_such_keyspace_h6"})
    assert proc.returncode == 3 and proc.stderr.strip().endswith(
        "does not exist (run `ohs db migrate` or start the worker)"
    )
