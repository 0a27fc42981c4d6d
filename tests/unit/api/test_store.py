"""``api.store.Store`` over an in-memory twin of the driver's session: which prepared query each read
runs with which values, every page collected, driver errors as StorageUnavailable."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from cassandra import OperationTimedOut, ReadTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException

from api.errors import StorageUnavailable
from api.store import Store
from tests.unit.api.twins import SessionTwin

Answer = dict[str, Any]


def _store(answers: Answer | None = None, default: Any = None) -> tuple[Store, SessionTwin]:
    """A Store whose session answers a query by the first key of ``answers`` found in its CQL."""
    answers = answers or {}

    def answer(cql: str, params: tuple[Any, ...]) -> Any:
        for needle, result in answers.items():
            if needle in cql:
                return result(params) if callable(result) else result
        return [[]] if default is None else default

    session = SessionTwin(answer)
    return Store(session, "ks"), session  # type: ignore[arg-type]


def test_every_statement_is_prepared_once_idempotent_on_the_keyspace() -> None:
    _, session = _store()
    assert session.prepared and all(s.is_idempotent for s in session.prepared)
    assert all(" ks." in s.cql or "system.local" in s.cql for s in session.prepared)
    assert not any("ALLOW FILTERING" in s.cql for s in session.prepared)
    assert len({s.cql for s in session.prepared}) == len(session.prepared), "no statement prepared twice"


def test_every_page_of_a_result_is_collected() -> None:
    pages = [[{"month": 202501}], [{"month": 202502}, {"month": 202503}], [{"month": 202504}]]
    store, session = _store({"user_trade_months": pages})
    assert asyncio.run(store.trade_months(5)) == [202501, 202502, 202503, 202504]
    assert session.futures[0].fetches == 2
    assert session.executed == [("SELECT month FROM ks.user_trade_months WHERE user_id = ?", (5,))]


@pytest.mark.parametrize(
    "exc",
    [NoHostAvailable("none", {}), OperationTimedOut("slow"), ReadTimeout("rt"), ConnectionException("gone")],
    ids=lambda e: type(e).__name__,
)
def test_driver_errors_become_storage_unavailable(exc: BaseException) -> None:
    store, _ = _store(default=exc)
    with pytest.raises(StorageUnavailable, match=type(exc).__name__):
        asyncio.run(store.ping())


def test_a_bug_is_not_disguised_as_an_outage() -> None:
    store, _ = _store(default=KeyError("not a driver error"))
    with pytest.raises(KeyError):
        asyncio.run(store.statistics(1))


def test_an_error_on_a_later_page_fails_the_read() -> None:
    store, session = _store({"order_statistics": [[{"symbol": "*"}], OperationTimedOut("second page")]})
    with pytest.raises(StorageUnavailable, match="second page"):
        asyncio.run(store.statistics(1))
    assert session.futures[0].fetches == 1


def test_order_ref_reads_the_newest_epoch_or_the_one_given() -> None:
    store, session = _store({"orders_by_id": [[{"order_id": 9, "epoch": 200, "user_id": 3}]]})
    assert asyncio.run(store.order_ref(9, None)) == {"order_id": 9, "epoch": 200, "user_id": 3}
    asyncio.run(store.order_ref(9, 100))
    (newest, p1), (given, p2) = session.executed
    assert newest.endswith("WHERE order_id = ? LIMIT 1") and p1 == (9,)
    assert given.endswith("WHERE order_id = ? AND epoch = ?") and p2 == (9, 100)
    empty, _ = _store()
    assert asyncio.run(empty.order_ref(9, None)) is None


def test_by_client_id_reads_the_lookup_then_that_order() -> None:
    store, session = _store(
        {
            "orders_by_client_id": [[{"epoch": 200, "order_id": 4}]],
            "FROM ks.order_history": lambda p: [[{"user_id": p[0], "epoch": p[1], "order_id": p[2]}]],
        }
    )
    assert asyncio.run(store.order_by_client_id(3, "c-1")) == {"user_id": 3, "epoch": 200, "order_id": 4}
    assert [p for _, p in session.executed] == [(3, "c-1"), (3, 200, 4)]
    missing, session = _store()
    assert asyncio.run(missing.order_by_client_id(3, "c-1")) is None
    assert len(session.executed) == 1, "no order read without a lookup row"


def test_an_orders_events_come_from_its_map_in_seq_order() -> None:
    store, session = _store({"SELECT events": [[{"events": {5: b"e5", 2: b"e2", 11: b"e11"}}]]})
    assert asyncio.run(store.order_events(1, 100, 7)) == [b"e2", b"e5", b"e11"]
    assert len(session.executed) == 1, "the old table is not read when the map has them"


@pytest.mark.parametrize("stored", [[[]], [[{"events": None}]], [[{"events": {}}]]], ids=["no-row", "null", "empty"])
def test_an_order_from_before_the_events_map_reads_the_old_table(stored: Any) -> None:
    old = [[{"seq": 1, "payload": b"a"}, {"seq": 2, "payload": b"b"}]]
    store, session = _store({"SELECT events": stored, "order_events": old})
    assert asyncio.run(store.order_events(1, 100, 7)) == [b"a", b"b"]
    assert session.executed[-1] == (
        "SELECT seq, payload FROM ks.order_events WHERE epoch = ? AND order_id = ?",
        (100, 7),
    )


@pytest.mark.parametrize(
    ("desc", "after", "inclusive", "where", "params"),
    [
        (True, None, False, "WHERE user_id = ? LIMIT ?", (1, 10)),
        (True, (5, 6), False, "(epoch, order_id) < (?, ?) LIMIT ?", (1, 5, 6, 10)),
        (True, (5, 6), True, "(epoch, order_id) <= (?, ?) LIMIT ?", (1, 5, 6, 10)),
        (False, None, False, "ORDER BY epoch ASC, order_id ASC LIMIT ?", (1, 10)),
        (False, (5, 6), False, "(epoch, order_id) > (?, ?) ORDER BY epoch ASC, order_id ASC LIMIT ?", (1, 5, 6, 10)),
        (False, (5, 6), True, "(epoch, order_id) >= (?, ?) ORDER BY epoch ASC, order_id ASC LIMIT ?", (1, 5, 6, 10)),
    ],
)
def test_order_walks_pick_the_query_of_their_direction_and_position(
    desc: bool, after: Any, inclusive: bool, where: str, params: tuple[Any, ...]
) -> None:
    for table in ("order_history", "active_orders"):
        store, session = _store()
        asyncio.run(store.order_rows(table, 1, desc, after, inclusive, 10))
        [(cql, got)] = session.executed
        assert f"FROM ks.{table} " in cql and cql.endswith(where) and got == params, cql


def test_probes_and_fill_slices_pass_their_bounds() -> None:
    store, session = _store({"order_history": [[{"epoch": 1, "order_id": 2, "created_ns": 3}]]})
    assert asyncio.run(store.order_probe("order_history", 1, "at_or_below", 5, 6)) == {
        "epoch": 1, "order_id": 2, "created_ns": 3,
    }  # fmt: skip
    assert session.executed[-1][1] == (1, 5, 6) and "order_id <= ?" in session.executed[-1][0]
    asyncio.run(store.fill_rows(1, 202501, True, (10, 100, 7, "TAKER"), 50))
    cql, params = session.executed[-1]
    assert "(ts_ns, epoch, seq, liquidity) < (?, ?, ?, ?) LIMIT ?" in cql and params == (
        1,
        202501,
        10,
        100,
        7,
        "TAKER",
        50,
    )
    asyncio.run(store.fill_rows(1, 202501, False, None, 50))
    cql, params = session.executed[-1]
    assert cql.endswith("ORDER BY ts_ns ASC, epoch ASC, seq ASC, liquidity ASC LIMIT ?") and params == (1, 202501, 50)


def test_the_stream_reads_positions_of_a_day_partition() -> None:
    day = dt.date(2025, 1, 2)
    store, session = _store({"user_updates": [[{"epoch": 100, "seq": 9, "payload": b"p"}]]})
    assert asyncio.run(store.user_update_first(1, day)) == (100, 9)
    assert asyncio.run(store.user_update_last(1, day)) == (100, 9)
    assert asyncio.run(store.user_updates_after(1, day, (100, 3), 20)) == [{"epoch": 100, "seq": 9, "payload": b"p"}]
    assert [p for _, p in session.executed] == [(1, day), (1, day), (1, day, 100, 3, 20)]
    assert "ORDER BY epoch DESC, seq DESC LIMIT 1" in session.executed[1][0]
    empty, _ = _store()
    assert asyncio.run(empty.user_update_first(1, day)) is None


def test_callbacks_on_the_callers_thread_also_complete_the_read() -> None:
    store, session = _store({"user_trade_months": [[{"month": 1}], [{"month": 2}]]})
    session.sync = True  # the driver runs callbacks at once when the result is already there
    assert asyncio.run(store.trade_months(1)) == [1, 2]
