"""CassandraSink against an in-memory session: the rows of a batch, the requests they become, and
how driver failures are reported (``streams.errors``) and retried (only what failed)."""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
from cassandra import InvalidRequest, OperationTimedOut, ReadTimeout, Unavailable, WriteFailure, WriteTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.query import BatchStatement, BatchType, BoundStatement

import streams.sink as sink_mod
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from schemas.tables import STAT_FIELDS
from streams.errors import SinkError, SinkRejected, SinkUnavailable
from streams.settings import WorkerSettings
from streams.sink import CassandraSink, ReplicaMap, StatsRow, routing_key, statement_cql, translate, write_timestamp
from tests.unit.streams.sink_twins import SessionTwin

EPOCH = 1_000_000


def _update(seq: int, order_id: int = 1, user_id: int = 7, **kw: Any) -> OrderUpdate:
    values: dict[str, Any] = {
        "epoch": EPOCH, "seq": seq, "ts_ns": 1_700_000_000_000_000_000 + seq, "order_id": order_id,
        "client_order_id": "", "user_id": user_id, "symbol": "BTC-USD", "side": Side.BUY,
        "order_type": OrderType.LIMIT, "time_in_force": TimeInForce.GTC, "price": 100, "qty": 10,
        "quote_budget": 0, "filled_qty": 0, "remaining_qty": 10, "quote_filled": 0, "status": OrderStatus.NEW,
        "reason": RejectReason.NONE, "last_fill_qty": 0, "last_fill_price": 0, "trade_id": 0,
        "created_ns": 5, "updated_ns": 5, "expire_ns": 0,
    }  # fmt: skip
    values.update(kw)
    return OrderUpdate(**values)


def _settings(**kw: Any) -> WorkerSettings:
    return WorkerSettings(_env_file=None, **kw)  # type: ignore[call-arg]


def _sink(session: SessionTwin | None = None, **kw: Any) -> tuple[CassandraSink, SessionTwin]:
    session = session or SessionTwin()
    return CassandraSink(session, _settings(**kw), keyspace="ks"), session  # type: ignore[arg-type]


def _by_name(sink: CassandraSink, rows: list[Any]) -> dict[str, list[Any]]:
    names = {id(binder): name for name, binder in sink.handles.items()}
    out: dict[str, list[Any]] = {}
    for group, binder, values, _size in rows:
        out.setdefault(names[id(binder)], []).append((group, values))
    return out


# ------------------------------------------------------------------ translate
@pytest.mark.parametrize(
    "exc",
    [
        OperationTimedOut("slow"),
        WriteTimeout("wt", write_type=0),
        ReadTimeout("rt"),
        Unavailable("down"),
        NoHostAvailable("none", {}),
        WriteFailure("wf"),
        ConnectionResetError("reset"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_driver_errors_translate_to_retriable_unavailable(exc: BaseException) -> None:
    out = translate(exc)
    assert type(out) is SinkUnavailable and out.retriable
    assert type(exc).__name__ in str(out)


def test_a_rejected_statement_is_not_retriable_and_anything_unknown_is() -> None:
    rejected = translate(InvalidRequest("unconfigured table"))
    assert type(rejected) is SinkRejected and not rejected.retriable
    assert "unconfigured table" in str(rejected)
    unknown = translate(RuntimeError("protocol bug"))
    assert type(unknown) is SinkUnavailable and "unexpected driver error" in str(unknown)
    already = SinkRejected("ours")
    assert translate(already) is already  # translated once, never wrapped again


def test_connect_shuts_the_cluster_down_when_no_node_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    class ClusterTwin:
        shut = False

        def connect(self) -> Any:
            raise NoHostAvailable("no host", {"127.0.0.1": OSError("refused")})

        def shutdown(self) -> None:
            ClusterTwin.shut = True

    monkeypatch.setattr(sink_mod, "make_cluster", lambda *a, **kw: ClusterTwin())
    with pytest.raises(SinkUnavailable, match="no Cassandra at"):
        sink_mod.connect(_settings())
    assert ClusterTwin.shut


# ----------------------------------------------------------------------- rows
def test_every_statement_is_timestamped_and_prepared_idempotent() -> None:
    _, session = _sink()
    assert set(session.prepared) == set(statement_cql("ks").values())
    for cql, stmt in session.prepared.items():
        assert "USING TIMESTAMP ?" in cql, cql
        assert stmt.is_idempotent, cql
    assert write_timestamp(EPOCH, 42) == EPOCH + 42


def test_an_orders_events_in_one_batch_write_its_newest_state_once_with_every_event() -> None:
    sink, _ = _sink()
    placed = _update(10)
    filled = _update(12, status=OrderStatus.FILLED, filled_qty=10, remaining_qty=0, updated_ns=9)
    partly = _update(11, status=OrderStatus.PARTIALLY_FILLED, filled_qty=4, remaining_qty=6, updated_ns=8)
    rows = _by_name(sink, sink.rows([(placed, b"p"), (filled, b"f"), (partly, b"q")], []))
    [(group, history)] = rows["history"]
    assert group == ("u", 7)
    assert history[0] == EPOCH + 12, "written at the newest event's timestamp even though it came second"
    assert history[12] == "FILLED" and history[17] == 12
    assert history[18] == {10: b"p", 11: b"q", 12: b"f"}, "every event in the map, keyed by seq"
    assert history[-3:] == (7, EPOCH, 1)
    assert [v for _, v in rows["active_delete"]] == [(EPOCH + 12, 7, EPOCH, 1)]
    assert "active_upsert" not in rows, "a terminal order's active row is a tombstone, never an upsert"
    assert sorted(v[3] for _, v in rows["user_updates"]) == [10, 11, 12], "the user's log keeps every event"
    # Only the placing command's event (created == updated) writes the by-id lookup.
    assert [v for _, v in rows["by_id"]] == [(1, EPOCH, 7, "BTC-USD", EPOCH + 10)]


def test_an_open_order_is_upserted_into_active_orders_at_its_timestamp() -> None:
    sink, _ = _sink()
    ev = _update(3, status=OrderStatus.PARTIALLY_FILLED, filled_qty=2, remaining_qty=8, updated_ns=6)
    rows = _by_name(sink, sink.rows([(ev, b"x")], []))
    [(group, values)] = rows["active_upsert"]
    assert group == ("u", 7)
    assert values[:3] == (7, EPOCH, 1) and values[-1] == EPOCH + 3 and values[-2] == 3
    assert "active_delete" not in rows and "by_id" not in rows


def test_user_updates_are_partitioned_by_the_utc_day_of_engine_time() -> None:
    sink, _ = _sink()
    day_end = int(dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC).timestamp()) * 10**9
    rows = _by_name(
        sink, sink.rows([(_update(1, ts_ns=day_end), b"a"), (_update(2, ts_ns=day_end + 120 * 10**9), b"b")], [])
    )
    days = [group[2] for group, _ in rows["user_updates"]]
    assert days == [dt.date(2026, 3, 1), dt.date(2026, 3, 2)]
    assert routing_key(("d", 7, dt.date(1970, 1, 1))) == (
        b"\x00\x08" + (7).to_bytes(8, "big") + b"\x00" + b"\x00\x04" + (2**31).to_bytes(4, "big") + b"\x00"
    )
    assert routing_key(("u", 7)) == routing_key(("i", 7)) == (7).to_bytes(8, "big")
    with pytest.raises(ValueError, match="unknown row group"):
        routing_key(("z", 1))


def test_statistics_rows_go_to_the_users_partition_with_their_own_timestamp() -> None:
    sink, _ = _sink()
    values = list(range(len(STAT_FIELDS)))
    rows = _by_name(sink, sink.rows([], [StatsRow(7, "*", values, EPOCH, 9, 123)]))
    assert rows == {"stats": [(("u", 7), (7, "*", *values, EPOCH, 9, 123))]}


# ------------------------------------------------------------------- requests
def _batch(n_users: int, per_user: int) -> list[tuple[OrderUpdate, bytes]]:
    return [
        (_update(u * 100 + i, order_id=u * 100 + i, user_id=u), b"payload")
        for u in range(1, n_users + 1)
        for i in range(per_user)
    ]


def test_statements_bind_every_row_into_bounded_unlogged_batches() -> None:
    sink, _ = _sink(batch_max_statements=4)
    applied = _batch(3, 3)
    pending = sink.statements(applied, [])
    # Per event: user_updates, by_id, history, active_upsert.
    assert pending.rows == 4 * len(applied) == len(sink.rows(applied, []))
    assert pending.done == [False] * len(pending.requests)
    sizes = []
    for req in pending.requests:
        if isinstance(req, BatchStatement):
            assert req.batch_type is BatchType.UNLOGGED and req.is_idempotent
            sizes.append(len(req._statements_and_parameters))
        else:
            assert isinstance(req, BoundStatement)
            sizes.append(1)
    assert max(sizes) <= 4 and sum(sizes) == pending.rows


def test_statements_group_by_the_replicas_the_token_map_names() -> None:
    class Token:
        @staticmethod
        def from_key(key: bytes) -> int:
            return int.from_bytes(key[-8:], "big") if len(key) == 8 else 0

    def get_replicas(ks: str, token: int) -> list[Any]:
        assert ks == "ks"
        return [SimpleNamespace(endpoint=f"10.0.0.{token % 3}")]

    session = SessionTwin(hosts=3)
    session.cluster.metadata.token_map = SimpleNamespace(token_class=Token, get_replicas=get_replicas)
    sink, _ = _sink(session, batch_max_statements=1000, batch_max_bytes=10**9)
    pending = sink.statements(_batch(6, 1), [])
    # ("u", user) and ("i", order) partitions route by their bigint; ("d", ...) composite keys to 0:
    # each request holds one replica set only, so at most 3 requests hold everything.
    assert len(pending.requests) == 3


def test_replica_map_is_a_single_set_for_one_node_or_full_replication() -> None:
    token_map = SimpleNamespace(token_class=None, get_replicas=None)
    one = SimpleNamespace(metadata=SimpleNamespace(token_map=token_map, all_hosts=lambda: [1], keyspaces={}))
    assert ReplicaMap(one, "ks").lookup() is None  # type: ignore[arg-type]
    no_map = SimpleNamespace(metadata=SimpleNamespace(token_map=None, all_hosts=lambda: [1, 2, 3], keyspaces={}))
    assert ReplicaMap(no_map, "ks").lookup() is None  # type: ignore[arg-type]
    ks = SimpleNamespace(replication_strategy=SimpleNamespace(replication_factor=3))
    full = SimpleNamespace(
        metadata=SimpleNamespace(token_map=token_map, all_hosts=lambda: [1, 2, 3], keyspaces={"ks": ks})
    )
    assert ReplicaMap(full, "ks").lookup() is None  # type: ignore[arg-type]
    ks.replication_strategy.replication_factor = 2
    assert ReplicaMap(full, "ks").lookup() is not None  # type: ignore[arg-type]


# ---------------------------------------------------------------------- write
def _pending(sink: CassandraSink, users: int = 4) -> Any:
    pending = sink.statements(_batch(users, 2), [])
    assert len(pending.requests) >= 4
    return pending


def test_a_write_sends_every_request_once_and_a_second_write_nothing() -> None:
    sink, session = _sink(batch_max_statements=2)
    pending = _pending(sink)
    asyncio.run(sink.write(pending))
    assert all(pending.done)
    assert sorted(map(id, session.executed)) == sorted(map(id, pending.requests))
    asyncio.run(sink.write(pending))
    assert len(session.executed) == len(pending.requests)


def test_a_failed_write_is_unavailable_and_the_retry_sends_only_what_failed() -> None:
    sink, session = _sink(batch_max_statements=2)
    pending = _pending(sink)
    bad = {id(pending.requests[1]), id(pending.requests[3])}
    session.outcome = lambda req: WriteTimeout("timed out", write_type=0) if id(req) in bad else None
    with pytest.raises(SinkUnavailable, match="2 of") as info:
        asyncio.run(sink.write(pending))
    assert info.value.retriable
    assert [i for i, done in enumerate(pending.done) if not done] == [1, 3]
    session.executed.clear()
    session.outcome = lambda req: None
    asyncio.run(sink.write(pending))
    assert {id(r) for r in session.executed} == bad and all(pending.done)


def test_one_rejected_request_makes_the_whole_write_rejected() -> None:
    sink, session = _sink(batch_max_statements=2)
    pending = _pending(sink)
    first, second = id(pending.requests[0]), id(pending.requests[2])
    session.outcome = lambda req: (
        InvalidRequest("bad") if id(req) == first else Unavailable("down") if id(req) == second else None
    )
    with pytest.raises(SinkRejected) as info:
        asyncio.run(sink.write(pending))
    assert not info.value.retriable and isinstance(info.value, SinkError)
    assert pending.done.count(False) == 2


def test_an_error_raised_by_execute_async_itself_is_reported_like_a_failed_request() -> None:
    sink, session = _sink(batch_max_statements=2)
    pending = _pending(sink)
    session.raise_at_once = NoHostAvailable("no host", {})
    with pytest.raises(SinkUnavailable, match=f"{len(pending.requests)} of {len(pending.requests)} requests"):
        asyncio.run(sink.write(pending))
    assert not any(pending.done)


def test_at_most_write_concurrency_requests_are_in_flight() -> None:
    sink, session = _sink(batch_max_statements=1, write_concurrency=3)
    session.delay = 0.01
    pending = _pending(sink, users=3)
    assert len(pending.requests) > 6
    asyncio.run(sink.write(pending))
    assert all(pending.done)
    assert session.max_in_flight == 3
