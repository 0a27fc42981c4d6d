"""engine -> bridge -> orders.trades -> the worker's trades agent -> user_trades, against the journal."""

from __future__ import annotations

import time
from typing import Any

import pytest

from engine.journal import Journal
from engine.settings import EngineSettings
from schemas.events import Trade
from streams.trades import fills_of
from tests.integration.pipeline import NOT_MIGRATED, Pipeline, not_migrated
from tests.integration.streams.test_worker import _worker_env

pytestmark = pytest.mark.integration
USERS = 20
_COLUMNS = "user_id, month, ts_ns, epoch, seq, liquidity, trade_id, order_id, symbol, side, price, qty, quote_qty, fee"


def _journal_trades(p: Pipeline) -> list[Trade]:
    with Journal.open(p.workdir / "journal", EngineSettings(_env_file=None).symbol_specs()) as journal:  # type: ignore[call-arg]
        return [e for e in journal.read_events(1, 0, limit=10**9) if isinstance(e, Trade)]


def _want(trades: list[Trade]) -> set[tuple[Any, ...]]:
    out = set()
    for t in trades:
        for user in {t.taker_user_id, t.maker_user_id}:
            for f in fills_of(t, user):
                out.add(
                    (f.user_id, f.month, f.ts_ns, f.epoch, f.seq, f.liquidity, f.trade_id, f.order_id, f.symbol,
                     f.side, f.price, f.qty, f.quote_qty, f.fee)
                )  # fmt: skip
    return out


def _rows(cql: Any, ks: str) -> set[tuple[Any, ...]]:
    try:
        return {tuple(r) for r in cql.execute(f"SELECT {_COLUMNS} FROM {ks}.user_trades", timeout=60)}
    except NOT_MIGRATED as exc:
        if not not_migrated(exc):
            raise
        return set()


def _wait_rows(cql: Any, ks: str, want: set[tuple[Any, ...]], timeout: float = 120) -> set[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    got: set[tuple[Any, ...]] = set()
    while time.monotonic() < deadline:
        got = _rows(cql, ks)
        if got >= want:
            return got
        time.sleep(1)
    return got


def test_every_users_fills_once_across_a_worker_kill_9(stack_endpoints, tmp_path, keyspace_factory, cql_session):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    ks = keyspace_factory("trades")
    p.keyspace = ks  # type: ignore[attr-defined]
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        env = _worker_env(p, f"tr-{p.tag}")
        p.start("worker", ["worker"], env)
        p.drive(client, 800, seed=21, users=USERS)
        time.sleep(2)
        p.kill("worker")  # mid-stream: batches written but not committed are re-read and rewritten
        p.drive(client, 800, seed=22, users=USERS)
        p.start("worker", ["worker"], env)
        client.close()
        p.settle()
        trades = _journal_trades(p)
        assert len(trades) > 50, "the flow traded"
        want = _want(trades)
        got = _wait_rows(cql_session, ks, want)
        assert got == want, f"{len(want - got)} fills missing, {len(got - want)} extra\n{p.log('worker')}"
        months = {
            (r.user_id, r.month) for r in cql_session.execute(f"SELECT user_id, month FROM {ks}.user_trade_months")
        }
        assert months == {(row[0], row[1]) for row in want}
    finally:
        p.stop_all()
