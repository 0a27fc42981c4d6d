"""The HTTP routes over an in-memory twin of the store: who may read what, filters, cursors, page
bounds and the error body. No servers: Starlette's TestClient without the lifespan (no Kafka tail,
no Cassandra), as in ``test_error_paths.py`` (which checks that every status is documented)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.live import Hub
from api.settings import ApiSettings
from schemas.codec import encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from tests.unit.api.twins import StoreTwin, fill_row, order_row

ALICE, BOB, OPERATOR = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef0", "operator-token-0123456789ab"
DEFAULT, MAX = 3, 5
JAN, FEB, MAR = 1_735_689_600 * 10**9, 1_738_368_000 * 10**9, 1_740_787_200 * 10**9  # 2025-01/02/03-01 UTC


def _history() -> list[dict[str, Any]]:
    """Alice (user 1): ten orders over two epochs, created in key order; Bob (user 2): one."""
    rows = []
    kinds = [
        ("BTC-USD", "BUY", "FILLED"), ("ETH-USD", "SELL", "NEW"), ("BTC-USD", "SELL", "CANCELLED"),
        ("BTC-USD", "BUY", "PARTIALLY_FILLED"), ("ETH-USD", "BUY", "REJECTED"), ("BTC-USD", "BUY", "NEW"),
    ]  # fmt: skip
    for i, (symbol, side, status) in enumerate(kinds, start=1):
        reason = "INSUFFICIENT_FUNDS" if status == "REJECTED" else "NONE"
        rows.append(order_row(1, 100, i, i * 10, symbol=symbol, side=side, status=status, reason=reason))
    for i in range(1, 5):
        rows.append(order_row(1, 200, i, 100 + i * 10, status="NEW" if i % 2 else "FILLED"))
    rows.append(order_row(2, 100, 7, 70, client_order_id="bobs"))
    return rows


def _keys(body: dict[str, Any]) -> list[tuple[int, int]]:
    return [(o["epoch"], o["order_id"]) for o in body["orders"]]


ALL_DESC = [(200, 4), (200, 3), (200, 2), (200, 1), (100, 6), (100, 5), (100, 4), (100, 3), (100, 2), (100, 1)]


@pytest.fixture
def rig() -> Iterator[tuple[TestClient, StoreTwin]]:
    tokens = {ALICE: {"user_id": 1}, BOB: {"user_id": 2}, OPERATOR: {"role": "operator"}}
    settings = ApiSettings(  # type: ignore[call-arg]
        tokens=json.dumps(tokens), page_size_default=DEFAULT, page_size_max=MAX, _env_file=None
    )
    app = create_app(settings)
    store = StoreTwin(history=_history(), by_client_id={(2, "bobs"): (100, 7)})
    app.state.store = store
    app.state.tail = SimpleNamespace(connected=True)
    app.state.hub = Hub(10)
    yield TestClient(app, raise_server_exceptions=False), store


def _get(client: TestClient, url: str, token: str | None = ALICE, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(url, params=params, headers=headers)


def _walk(client: TestClient, url: str, **params: Any) -> tuple[list[tuple[int, int]], int]:
    """Every page of a listing, following `next`: (keys in order, pages)."""
    keys, pages, cursor = [], 0, None
    while True:
        resp = _get(client, url, **params, **({"cursor": cursor} if cursor else {}))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        keys += _keys(body)
        pages += 1
        cursor = body["next"]
        if cursor is None:
            return keys, pages
        assert pages < 50


# --------------------------------------------------------------------------- authorization
def test_no_or_an_unknown_token_is_401_with_a_bearer_challenge(rig: Any) -> None:
    client, store = rig
    for token in (None, "not-a-token-anyone-was-given"):
        resp = _get(client, "/users/1/orders", token=token)
        assert resp.status_code == 401
        assert resp.json() == {"detail": "missing or invalid bearer token"}
        assert resp.headers["www-authenticate"] == "Bearer"
    assert store.reads == [], "nothing is read for an unauthenticated caller"


@pytest.mark.parametrize(
    "path",
    [
        "/users/2/orders",
        "/users/2/orders/active",
        "/users/2/trades",
        "/users/2/stats",
        "/users/2/orders/by-client-id/bobs",
    ],
)
def test_a_user_token_reading_another_users_data_is_403_before_any_read(rig: Any, path: str) -> None:
    client, store = rig
    resp = _get(client, path, token=ALICE)
    assert resp.status_code == 403 and resp.json() == {"detail": "not allowed to read this user's data"}
    assert store.reads == []
    assert _get(client, path, token=BOB).status_code == 200
    assert _get(client, path, token=OPERATOR).status_code == 200


def test_an_order_of_another_user_is_404_even_for_an_existing_id_but_the_operator_reads_it(rig: Any) -> None:
    client, _ = rig
    assert _get(client, "/orders/7", token=ALICE).json() == {"detail": "no such order"}
    assert _get(client, "/orders/7", token=ALICE).status_code == 404
    assert _get(client, "/orders/7", token=OPERATOR).json()["user_id"] == 2
    assert _get(client, "/orders/7", token=BOB).json()["client_order_id"] == "bobs"


# ------------------------------------------------------------------------------- history
def test_history_pages_walk_every_order_once_newest_first_or_oldest_first(rig: Any) -> None:
    client, _ = rig
    keys, pages = _walk(client, "/users/1/orders")
    assert keys == ALL_DESC and pages == 4  # pages of DEFAULT = 3
    keys, _ = _walk(client, "/users/1/orders", order="asc", limit=MAX)
    assert keys == ALL_DESC[::-1]


def test_next_resumes_after_the_last_order_and_is_null_at_the_end(rig: Any) -> None:
    client, _ = rig
    first = _get(client, "/users/1/orders", limit=5).json()
    assert _keys(first) == ALL_DESC[:5] and first["next"] == "100.6"
    second = _get(client, "/users/1/orders", limit=5, cursor=first["next"]).json()
    assert _keys(second) == ALL_DESC[5:] and second["next"] is None


@pytest.mark.parametrize(("limit", "status"), [(0, 422), (-1, 422), (MAX + 1, 422), (MAX, 200), (1, 200)])
def test_the_page_size_is_bounded_by_the_settings(rig: Any, limit: int, status: int) -> None:
    client, store = rig
    resp = _get(client, "/users/1/orders", limit=limit)
    assert resp.status_code == status, resp.text
    if status == 422:
        assert list(resp.json()) == ["detail"] and "limit" in resp.json()["detail"]
        assert store.reads == [], "bad input never reaches the store"
    else:
        assert len(resp.json()["orders"]) == limit


def test_the_default_page_size_is_the_settings_default(rig: Any) -> None:
    client, _ = rig
    assert len(_get(client, "/users/1/orders").json()["orders"]) == DEFAULT


def test_cursor_wins_over_the_deprecated_before_and_before_alone_still_works(rig: Any) -> None:
    client, _ = rig
    assert _keys(_get(client, "/users/1/orders", before="200.1").json()) == ALL_DESC[4:7]
    assert _keys(_get(client, "/users/1/orders", before="200.1", cursor="100.3").json()) == ALL_DESC[8:]


@pytest.mark.parametrize("cursor", ["1", "1.2.3", "a.b", "-1.2", "1.", "12345678901234567890.1"])
def test_a_malformed_cursor_is_422(rig: Any, cursor: str) -> None:
    client, _ = rig
    resp = _get(client, "/users/1/orders", cursor=cursor)
    assert resp.status_code == 422 and "cursor" in resp.json()["detail"]


def test_symbol_side_and_status_filter_together(rig: Any) -> None:
    client, _ = rig
    keys, _ = _walk(client, "/users/1/orders", symbol="BTC-USD", side="BUY", status=["FILLED", "NEW"])
    assert keys == [(200, 4), (200, 3), (200, 2), (200, 1), (100, 6), (100, 1)]
    keys, _ = _walk(client, "/users/1/orders", side="SELL")
    assert keys == [(100, 3), (100, 2)]
    rejected = _get(client, "/users/1/orders", status="REJECTED").json()["orders"]
    assert [(o["order_id"], o["reason"]) for o in rejected] == [(5, "INSUFFICIENT_FUNDS")]
    assert _get(client, "/users/1/orders", symbol="NOPE-USD").json() == {"user_id": 1, "orders": [], "next": None}


def test_only_open_statuses_are_read_from_active_orders(rig: Any) -> None:
    client, store = rig
    body = _get(client, "/users/1/orders", status=["NEW", "PARTIALLY_FILLED"], limit=MAX).json()
    assert {r[1] for r in store.reads if r[0] == "order_rows"} == {"active_orders"}
    assert _keys(body) == [(200, 3), (200, 1), (100, 6), (100, 4), (100, 2)]
    assert {o["reason"] for o in body["orders"]} == {"NONE"}, "an open order's reason is NONE"
    store.reads.clear()
    _get(client, "/users/1/orders", status=["NEW", "FILLED"])
    assert {r[1] for r in store.reads if r[0] == "order_rows"} == {"order_history"}


def test_from_and_to_bound_the_creation_time(rig: Any) -> None:
    client, _ = rig
    # created_ns: epoch 100 order i at 10*i, epoch 200 order i at 100 + 10*i; `to` is exclusive.
    keys, _ = _walk(client, "/users/1/orders", **{"from": 30, "to": 120})
    assert keys == [(200, 1), (100, 6), (100, 5), (100, 4), (100, 3)]
    keys, _ = _walk(client, "/users/1/orders", order="asc", **{"from": 30, "to": 120})
    assert keys == [(100, 3), (100, 4), (100, 5), (100, 6), (200, 1)]
    assert _walk(client, "/users/1/orders", **{"from": 500})[0] == []
    assert _get(client, "/users/1/orders", **{"from": -1}).status_code == 422


def test_active_orders_lists_the_open_ones_newest_first_with_a_symbol_filter(rig: Any) -> None:
    client, _ = rig
    keys, _ = _walk(client, "/users/1/orders/active")
    assert keys == [(200, 3), (200, 1), (100, 6), (100, 4), (100, 2)]
    body = _get(client, "/users/1/orders/active", symbol="ETH-USD").json()
    assert _keys(body) == [(100, 2)] and "reason" not in body["orders"][0]


# ----------------------------------------------------------------------------- one order
def test_an_order_is_its_newest_epoch_unless_one_is_given(rig: Any) -> None:
    client, store = rig
    assert _get(client, "/orders/1").json()["epoch"] == 200
    older = _get(client, "/orders/1", epoch=100).json()
    assert (older["epoch"], older["status"]) == (100, "FILLED")
    assert ("order_ref", 1, 100) in store.reads
    assert _get(client, "/orders/6", epoch=200).status_code == 404


def test_an_order_whose_history_row_is_not_written_yet_is_404_not_500(rig: Any) -> None:
    client, store = rig
    store.missing_history.add((100, 6))
    resp = _get(client, "/orders/6")
    assert resp.status_code == 404 and resp.json() == {"detail": "no such order"}


def _update(seq: int, status: OrderStatus) -> OrderUpdate:
    return OrderUpdate(
        100, seq, seq, 4, "", 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 2, 0,
        1 if status is OrderStatus.PARTIALLY_FILLED else 0, 1, 100 if status is OrderStatus.PARTIALLY_FILLED else 0,
        status, RejectReason.NONE, 0, 0, 0, 40, 40 + seq, 0,
    )  # fmt: skip


def test_an_orders_events_come_decoded_in_seq_order_and_undecodable_ones_are_skipped(
    rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, store = rig
    store.events[(1, 100, 4)] = {
        9: encode(_update(9, OrderStatus.PARTIALLY_FILLED)),
        3: encode(_update(3, OrderStatus.NEW)),
        5: b"\x00 not an event",
    }
    with caplog.at_level("ERROR", logger="ohs.api"):
        body = _get(client, "/orders/4/events", epoch=100).json()
    assert (body["epoch"], body["order_id"]) == (100, 4)
    assert [(e["seq"], e["status"]) for e in body["events"]] == [(3, "NEW"), (9, "PARTIALLY_FILLED")]
    assert "undecodable stored event" in caplog.text


def test_by_client_id_finds_the_users_order_and_404s_otherwise(rig: Any) -> None:
    client, store = rig
    store.by_client_id[(1, "mine-1")] = (100, 2)
    body = _get(client, "/users/1/orders/by-client-id/mine-1").json()
    assert (body["epoch"], body["order_id"], body["user_id"]) == (100, 2, 1)
    resp = _get(client, "/users/1/orders/by-client-id/nope")
    assert resp.status_code == 404 and resp.json() == {"detail": "no such order"}
    assert _get(client, "/users/1/orders/by-client-id/" + "x" * 1000).status_code == 422


# --------------------------------------------------------------------------------- trades
def _fills(store: StoreTwin) -> None:
    store.fills = [
        fill_row(1, JAN + 1, 11, 4, symbol="BTC-USD", side="BUY"),
        fill_row(1, JAN + 2, 12, 2, symbol="ETH-USD", side="SELL"),
        fill_row(1, JAN + 3, 13, 4, symbol="BTC-USD", side="BUY", liquidity="MAKER"),
        fill_row(1, FEB + 1, 21, 6, symbol="BTC-USD", side="BUY", epoch=100),
        fill_row(1, FEB + 2, 22, 4, symbol="BTC-USD", side="BUY", epoch=200),
        fill_row(2, FEB + 3, 23, 7, symbol="BTC-USD"),
    ]


def _fill_keys(body: dict[str, Any]) -> list[int]:
    return [f["seq"] for f in body["fills"]]


def test_trades_page_across_months_with_cursors_and_carry_the_fee_asset(rig: Any) -> None:
    client, store = rig
    _fills(store)
    seqs, cursor, pages = [], None, 0
    while True:
        body = _get(client, "/users/1/trades", limit=2, **({"cursor": cursor} if cursor else {})).json()
        seqs += _fill_keys(body)
        pages += 1
        cursor = body["next"]
        if cursor is None or pages > 10:
            break
    assert seqs == [22, 21, 13, 12, 11]
    asc = _get(client, "/users/1/trades", order="asc", limit=MAX).json()
    assert _fill_keys(asc) == [11, 12, 13, 21, 22]
    assets = {f["seq"]: f["fee_asset"] for f in asc["fills"]}
    assert assets[11] == "BTC" and assets[12] == "USD", "a buyer receives the base, a seller the quote"


def test_trades_filter_by_symbol_time_and_order(rig: Any) -> None:
    client, store = rig
    _fills(store)
    assert _fill_keys(_get(client, "/users/1/trades", symbol="ETH-USD").json()) == [12]
    body = _get(client, "/users/1/trades", limit=MAX, **{"from": JAN + 2, "to": FEB + 2}).json()
    assert _fill_keys(body) == [21, 13, 12]
    # order 4 of its newest epoch (200), created at 140: its fill of epoch 200 only, not epoch 100's.
    store.history = [r for r in store.history if not (r["epoch"] == 200 and r["order_id"] == 4)]
    store.history.append(order_row(1, 200, 4, FEB, updated_ns=FEB + 5, status="FILLED"))
    store.fills.append(fill_row(1, MAR + 1, 31, 5, epoch=200))
    store.reads.clear()
    assert _fill_keys(_get(client, "/users/1/trades", order_id=4).json()) == [22]
    # Only the months of the order's life are read.
    assert {r[2] for r in store.reads if r[0] == "fill_rows"} == {202502}


def test_trades_of_an_order_of_another_user_or_no_order_are_an_empty_page(rig: Any) -> None:
    client, store = rig
    _fills(store)
    empty = {"user_id": 1, "fills": [], "next": None}
    assert _get(client, "/users/1/trades", order_id=7).json() == empty  # Bob's order
    assert _get(client, "/users/1/trades", order_id=999).json() == empty
    assert not [r for r in store.reads if r[0] == "fill_rows"], "no fills read for someone else's order"


# ------------------------------------------------------------------------------ statistics
def test_statistics_list_all_symbols_first_then_by_name(rig: Any) -> None:
    client, store = rig
    base = {"user_id": 1, "last_epoch": 100, "last_seq": 9}
    counts = {f: 0 for f in _stat_fields()}
    store.stats[1] = [{**base, **counts, "symbol": s} for s in ("SOL-USD", "*", "BTC-USD")]
    body = _get(client, "/users/1/stats").json()
    assert [s["symbol"] for s in body["symbols"]] == ["*", "BTC-USD", "SOL-USD"]
    assert _get(client, "/users/1/stats").json()["user_id"] == 1


def _stat_fields() -> list[str]:
    from api.models import SymbolStatistics

    return [n for n in SymbolStatistics.model_fields if n not in ("symbol",)]


def test_symbols_need_no_token_and_list_the_configured_specs(rig: Any) -> None:
    client, store = rig
    body = _get(client, "/symbols", token=None).json()
    names = [s["symbol"] for s in body["symbols"]]
    assert "BTC-USD" in names
    btc = next(s for s in body["symbols"] if s["symbol"] == "BTC-USD")
    assert (btc["base"], btc["quote"]) == ("BTC", "USD")
    assert store.reads == []
