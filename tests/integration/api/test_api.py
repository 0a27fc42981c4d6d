"""The query API and live stream as users run them, checked against the engine's own truth.

One real pipeline per module (engine -> bridge -> Kafka -> faust worker ->
Cassandra in a fresh keyspace), then ``ohs api`` as a subprocess; every answer
is compared with what the engine's journal says happened.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.models import update_dict
from engine.client import EngineClient
from engine.core import Engine
from engine.journal import Journal, JournalError
from engine.recovery import recover
from engine.settings import EngineSettings
from schemas.events import OrderStatus, OrderUpdate, RejectReason, Trade
from streams.lag import group_lag
from streams.state import ALL_SYMBOLS, UserState
from streams.trades import fills_of
from tests.integration.chaos.faults import diagnose
from tests.integration.pipeline import NOT_MIGRATED, Pipeline, free_port, not_migrated

pytestmark = pytest.mark.integration

USERS = 8
SCAN_MAX = 7
"""The API's per-page read budget here: small, so filtered pages end early and cursors carry on."""
OPERATOR = f"operator-{uuid.uuid4().hex}"
TOKENS = {u: f"user-{u}-{uuid.uuid4().hex}" for u in range(1, USERS + 1)}


@dataclass
class Running:
    p: Pipeline
    client: EngineClient
    http: httpx.Client
    ws_base: str
    keyspace: str
    group: str
    bootstrap: str
    cql: Any
    worker_env: dict[str, str]


def auth(user: int | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR if user is None else TOKENS[user]}"}


def truth(p: Pipeline) -> tuple[Engine, list[OrderUpdate]]:
    engine, events = journal_events(p)
    return engine, [e for e in events if isinstance(e, OrderUpdate)]


def journal_events(p: Pipeline) -> tuple[Engine, list[Any]]:
    s = EngineSettings(_env_file=None, journal_dir=p.workdir / "journal")  # type: ignore[call-arg]
    for attempt in range(5):
        try:
            with Journal.open(s.journal_dir, s.symbol_specs()) as journal:
                engine, _ = recover(journal)
                events = list(journal.read_events(1, 0, limit=10**9))
            return engine, events
        except JournalError:
            # The engine may still be appending (GTT expiries): recovery then reads past the end it saw
            # at open. Read again once it has settled.
            if attempt == 4:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def wait_synced(r: Running, updates: list[OrderUpdate], timeout: float = 60.0) -> None:
    """Until Cassandra has every update (each user's '*' statistics are at their last seq) and the worker
    has committed the whole topic (so no batch is still half written)."""
    last: dict[int, int] = {}
    for ev in updates:
        last[ev.user_id] = ev.seq
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            have: dict[int, int] = {}
            for user in last:
                row = r.cql.execute(
                    f"SELECT last_seq FROM {r.keyspace}.order_statistics WHERE user_id = %s AND symbol = %s",
                    (user, ALL_SYMBOLS),
                ).one()
                if row is not None:
                    have[user] = row.last_seq
        except NOT_MIGRATED as exc:  # the worker has not created the tables yet
            if not not_migrated(exc):
                raise
            have = {}
        topics = [r.p.topics["updates"], r.p.topics["trades"]]
        lag = group_lag(r.bootstrap, r.group, topics) if have == last else []
        if lag and all(pl.committed >= 0 and pl.lag_messages == 0 for pl in lag):
            return
        time.sleep(0.5)
    raise AssertionError(f"Cassandra never caught up with the engine:\n{diagnose(r.p, r.bootstrap)}")


CID_USER = 1


def _client_ids(client: EngineClient) -> None:
    """User 1's orders with client ids: one placed, cancelled and placed again (the id names two orders,
    the newest answers), a duplicate of the open one (rejected: it must not hide it), one filled at once."""
    client.deposit(CID_USER, "USD", 10**9)
    client.deposit(CID_USER, "BTC", 10**6)
    first = client.place(CID_USER, "BTC-USD", "BUY", 1, 1, client_order_id="cid-again")
    client.cancel(CID_USER, order_id=first.order_id)
    client.place(CID_USER, "BTC-USD", "BUY", 1, 1, client_order_id="cid-again")
    dup = client.place(CID_USER, "BTC-USD", "BUY", 1, 1, client_order_id="cid-again")
    assert not dup.accepted
    client.place(CID_USER, "ETH-USD", "SELL", 1, 10**6, client_order_id="ünïcode id")


@pytest.fixture(scope="module")
def running(stack_endpoints: Any, tmp_path_factory: pytest.TempPathFactory, cql_cluster: Any) -> Iterator[Running]:
    cql = cql_cluster.connect()
    keyspace = f"api_{uuid.uuid4().hex[:10]}"
    cql.execute(f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
    p = Pipeline(stack_endpoints.env(), tmp_path_factory.mktemp("api"))
    group = f"g-{p.tag}"
    port = free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
    client: EngineClient | None = None
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        worker_env = {
            "OHS_WORKER_GROUP": group,
            "OHS_WORKER_TOPIC_UPDATES": p.topics["updates"],
            "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"],
            "OHS_WORKER_PARTITIONS": "3",
            "OHS_KEYSPACE": keyspace,
            "OHS_WORKER_WEB_PORT": str(free_port()),
            "OHS_WORKER_BATCH_WINDOW_S": "0.05",
            # The API is under test here, not the worker's table store: the in-memory one starts fastest.
            "OHS_WORKER_STORE": "memory://",
        }
        # What ``diagnose`` reads when a test finds the worker behind.
        p.group, p.worker_port = group, int(worker_env["OHS_WORKER_WEB_PORT"])
        p.start("worker", ["worker"], worker_env)
        p.drive(client, 1_000, seed=31, users=USERS)
        _client_ids(client)
        p.settle()
        r = Running(
            p, client, http, f"ws://127.0.0.1:{port}", keyspace, group,
            stack_endpoints.kafka_bootstrap, cql, worker_env,
        )  # fmt: skip
        wait_synced(r, truth(p)[1], timeout=120)
        api_env = {
            "OHS_KEYSPACE": keyspace,
            "OHS_API_TOPIC_UPDATES": p.topics["updates"],
            "OHS_API_WORKER_GROUP": group,
            "OHS_API_TOKENS": json.dumps(
                {OPERATOR: {"role": "operator", "name": "tests"}} | {t: {"user_id": u} for u, t in TOKENS.items()}
            ),
            "OHS_API_SCAN_MAX": str(SCAN_MAX),
            "OHS_API_SYMBOL_DECIMALS": "BTC-USD:2:4",
            "OHS_LOG_FORMAT": "json",
        }
        p.start("api", ["api", "--port", str(port)], api_env)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the API did not start:\n{p.log('api')}")
            time.sleep(0.2)
        yield r
    finally:
        http.close()
        if client is not None:
            client.close()
        p.stop_all()
        cql.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        cql.shutdown()


def _orders_of(updates: list[OrderUpdate], user: int) -> dict[int, OrderUpdate]:
    """order_id -> its last update, for one user's orders."""
    out: dict[int, OrderUpdate] = {}
    for ev in updates:
        if ev.user_id == user:
            out[ev.order_id] = ev
    return out


def test_reads_equal_the_engine_truth(running: Running) -> None:
    r = running
    engine, updates = truth(r.p)
    wait_synced(r, updates)
    expected_stats: dict[int, UserState] = {}
    for ev in updates:
        expected_stats.setdefault(ev.user_id, UserState()).apply(ev)
    for user in range(1, USERS + 1):
        headers = auth(user)
        active = r.http.get(f"/users/{user}/orders/active", headers=headers)
        assert active.status_code == 200, active.text
        got = {o["order_id"]: (o["status"], o["filled_qty"], o["seq"]) for o in active.json()["orders"]}
        want = {o.order_id: (o.status.value, o.filled_qty, o.seq) for o in engine.open_orders(user)}
        assert got == want, f"active orders of user {user}"

        orders, cursor, pages = [], None, 0
        while True:
            # `before` is the former name of `cursor`: both still page.
            params: dict[str, Any] = {"limit": 7} | ({"before" if pages % 2 else "cursor": cursor} if cursor else {})
            page = r.http.get(f"/users/{user}/orders", params=params, headers=headers)
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["orders"]) <= 7
            orders += body["orders"]
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
        last_updates = _orders_of(updates, user)
        keys = [(o["epoch"], o["order_id"]) for o in orders]
        assert keys == sorted(set(keys), reverse=True), "every order once, newest first"
        assert {o["order_id"] for o in orders} == set(last_updates)
        assert pages >= len(last_updates) // 7
        for o in orders:
            ev = last_updates[o["order_id"]]
            assert {k: o[k] for k in ("status", "filled_qty", "quote_filled", "seq", "reason")} == {
                "status": ev.status.value,
                "filled_qty": ev.filled_qty,
                "quote_filled": ev.quote_filled,
                "seq": ev.seq,
                "reason": ev.reason.value,
            }

        for order_id in sorted(last_updates)[:: max(1, len(last_updates) // 4)]:
            ev = last_updates[order_id]
            one = r.http.get(f"/orders/{order_id}", headers=headers)
            assert one.status_code == 200, one.text
            row = update_dict(ev)
            body = one.json()
            assert body == {k: row[k] for k in body}
            with_epoch = r.http.get(f"/orders/{order_id}", params={"epoch": ev.epoch}, headers=headers)
            assert with_epoch.json() == one.json()
            events = r.http.get(f"/orders/{order_id}/events", headers=headers)
            assert events.status_code == 200, events.text
            want_events = [update_dict(e) for e in updates if e.order_id == order_id]
            got_events = events.json()["events"]
            assert len(got_events) == len(want_events)
            for g, w in zip(got_events, want_events, strict=True):
                assert g == w, {k: (g.get(k), w[k]) for k in w if g.get(k) != w[k]}

        stats = r.http.get(f"/users/{user}/stats", headers=headers)
        assert stats.status_code == 200, stats.text
        by_symbol = {row["symbol"]: row for row in stats.json()["symbols"]}
        state = expected_stats[user]
        assert set(by_symbol) == set(state.stats)
        assert stats.json()["symbols"][0]["symbol"] == ALL_SYMBOLS
        for symbol in state.stats:
            values = state.stat_values(symbol)
            assert {k: by_symbol[symbol][k] for k in values} == values, f"stats of user {user} {symbol}"
        assert by_symbol[ALL_SYMBOLS]["last_seq"] == state.last_counted(ALL_SYMBOLS)[1]
        assert state.last_counted(ALL_SYMBOLS)[1] == max(ev.seq for ev in updates if ev.user_id == user)


def test_users_read_only_their_own_data_and_operators_read_all(running: Running) -> None:
    r = running
    _, updates = truth(r.p)
    bobs_order = next(ev.order_id for ev in updates if ev.user_id == 2)
    orders = [f"/orders/{bobs_order}", f"/orders/{bobs_order}/events"]
    paths = ["/users/2/orders/active", "/users/2/orders", "/users/2/stats", *orders]
    missing = max(ev.order_id for ev in updates) + 1_000
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer not-a-configured-token-at-all"}, {"Authorization": "Basic x"}):
            denied = r.http.get(path, headers=headers)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"] == "Bearer"
            assert denied.json() == {"detail": "missing or invalid bearer token"}
        forbidden = r.http.get(path, headers=auth(1))
        if path in orders:
            # Another user's order answers exactly like a missing one: its id cannot be probed.
            absent = r.http.get(path.replace(str(bobs_order), str(missing)), headers=auth(1))
            assert forbidden.status_code == absent.status_code == 404, path
            assert forbidden.json() == absent.json() == {"detail": "no such order"}
        else:
            assert forbidden.status_code == 403, path
            assert forbidden.json() == {"detail": "not allowed to read this user's data"}
        assert r.http.get(path, headers=auth(2)).status_code == 200, path
        assert r.http.get(path, headers=auth(None)).status_code == 200, path
    time.sleep(0.5)  # the API's log is written by another process
    log = (r.p.workdir / "api.log").read_text()
    assert f"denied status=404 path=/orders/{bobs_order}/events principal=user:1 reason=owner user:2" in log
    assert "denied status=401 path=/users/2/stats principal=anonymous reason=unknown token" in log
    assert all(token not in log for token in (*TOKENS.values(), OPERATOR))


def _raw_cursor(version: int, epoch: int, order_id: int) -> str:
    """A cursor of the format before issue 16 (base64 of version, epoch, order id): no longer a cursor."""
    return base64.urlsafe_b64encode(struct.pack(">Bqq", version, epoch, order_id)).decode()


def test_bad_parameters_are_4xx_json_never_500(running: Running) -> None:
    r = running
    cases = [
        ("/users/abc/orders", {}, 422),
        ("/users/0/orders", {}, 422),
        ("/users/-1/orders/active", {}, 422),
        ("/users/99999999999999999999/stats", {}, 422),
        ("/users/1/orders", {"limit": 0}, 422),
        ("/users/1/orders", {"limit": 501}, 422),
        ("/users/1/orders", {"limit": "ten"}, 422),
        ("/users/1/orders", {"before": "%%%not-base64"}, 422),
        ("/users/1/orders", {"cursor": "AAAA"}, 422),
        ("/users/1/orders", {"cursor": "1" * 20 + ".1"}, 422),
        ("/users/1/orders", {"before": _raw_cursor(1, 1, 2)}, 422),  # the old format
        ("/users/1/orders", {"cursor": "-1.2"}, 422),
        ("/users/1/orders", {"status": "OPEN"}, 422),
        ("/users/1/orders", {"from": -1}, 422),
        ("/users/1/orders", {"order": "newest"}, 422),
        ("/users/1/trades", {"cursor": "1.2.3.X"}, 422),
        ("/users/1/trades", {"order_id": 0}, 422),
        ("/users/1/orders/by-client-id/" + "x" * 65, {}, 422),
        ("/users/1/orders/by-client-id/nope", {}, 404),
        ("/orders/1.5", {}, 422),
        ("/orders/1", {"epoch": -1}, 422),
        ("/orders/1/events", {"epoch": "now"}, 422),
        ("/orders/9223372036854775807", {}, 404),
        ("/orders/1", {"epoch": 1}, 404),
    ]
    for path, params, status in cases:
        resp = r.http.get(path, params=params, headers=auth(None))
        assert resp.status_code == status, (path, params, resp.text)
        assert resp.headers["content-type"] == "application/json"
        assert list(resp.json()) == ["detail"] and isinstance(resp.json()["detail"], str), resp.text
    # A cursor past every order is a valid, empty last page; one beyond a bigint means the largest one.
    end = r.http.get("/users/1/orders", params={"cursor": "0.0"}, headers=auth(1))
    assert end.json() == {"user_id": 1, "orders": [], "next": None}
    top = r.http.get("/users/1/orders", params={"cursor": "9" * 19 + "." + "9" * 19}, headers=auth(1))
    assert top.json()["orders"] == r.http.get("/users/1/orders", headers=auth(1)).json()["orders"]


def test_openapi_and_health(running: Running) -> None:
    r = running
    doc = r.http.get("/openapi.json").json()
    assert set(doc["paths"]) == {
        "/health",
        "/symbols",
        "/users/{user_id}/orders/active",
        "/users/{user_id}/orders",
        "/users/{user_id}/orders/by-client-id/{client_order_id}",
        "/users/{user_id}/trades",
        "/orders/{order_id}",
        "/orders/{order_id}/events",
        "/users/{user_id}/stats",
    }
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ok = doc["paths"]["/users/{user_id}/orders"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OrdersPage"}
    assert {"Order", "OrderEvent", "SymbolStatistics"} <= set(doc["components"]["schemas"])
    health = r.http.get("/health")
    assert health.status_code == 200
    # States only: no version of anything (the endpoint needs no token).
    assert health.json() == {"status": "ok", "cassandra": True, "live_tail": True}


def _close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_stream_denials(running: Running) -> None:
    r = running
    with connect(f"{r.ws_base}/users/2/stream") as ws:
        assert _close_code(ws) == 4401
    with connect(f"{r.ws_base}/users/2/stream?token=wrong-token-wrong-token") as ws:
        assert _close_code(ws) == 4401
    with connect(f"{r.ws_base}/users/2/stream", additional_headers=auth(1)) as ws:
        assert _close_code(ws) == 4403
    with connect(f"{r.ws_base}/users/2/stream?from_seq=abc", additional_headers=auth(2)) as ws:
        assert _close_code(ws) == 1008
    time.sleep(0.5)
    log = r.p.log("api")
    assert "denied status=403 path=/users/2/stream principal=user:1 reason=owner user:2" in log
    assert "wrong-token-wrong-token" not in log


def _receive(ws: ClientConnection, want: int, timeout: float) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            got.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
        except TimeoutError:
            break
    return got


def test_stream_resumes_from_a_seq_without_gap_or_duplicate(running: Running) -> None:
    r = running
    _, before = truth(r.p)
    seqs = {u: [ev.seq for ev in before if ev.user_id == u] for u in range(1, USERS + 1)}
    url = f"{r.ws_base}/users"
    # (connection, user, from_seq): one resumes from the middle of the stored history before any new
    # event, one reads everything the browser way (token in the query, as the operator).
    streams: list[tuple[ClientConnection, int, int]] = []
    user = 3
    from_seq = seqs[user][len(seqs[user]) // 2]
    streams.append(
        (
            connect(f"{url}/{user}/stream?from_seq={from_seq}", additional_headers=auth(user), max_queue=None),
            user,
            from_seq,
        )
    )
    streams.append((connect(f"{url}/4/stream?from_seq=0&token={OPERATOR}", max_queue=None), 4, 0))

    def flow() -> None:
        # Rounds with pauses spread the flow over seconds: the hand-offs below happen while the worker
        # is writing and committing, so events are released during the backfills.
        for i in range(10):
            r.p.drive(r.client, 100, seed=320 + i, batch=20, users=USERS)
            time.sleep(0.3)

    drive = threading.Thread(target=flow)
    try:
        drive.start()
        for wave in range(4):
            time.sleep(0.6)
            for u in range(1, USERS + 1):
                since = 0 if wave % 2 == 0 else seqs[u][len(seqs[u]) // 3]
                # The last wave names the epoch too, as a client resuming across engine epochs does.
                epoch = f"&from_epoch={before[0].epoch}" if wave == 3 else ""
                ws = connect(f"{url}/{u}/stream?from_seq={since}{epoch}", additional_headers=auth(u), max_queue=None)
                streams.append((ws, u, since))
        drive.join(60)
        assert not drive.is_alive()
        r.p.settle()
        _, after = truth(r.p)
        deadline = time.monotonic() + 40
        for ws, u, since in streams:
            want = [ev for ev in after if ev.user_id == u and ev.seq > since]
            got = _receive(ws, len(want), timeout=max(1.0, deadline - time.monotonic()))
            assert [m["seq"] for m in got] == [ev.seq for ev in want], f"user {u} from_seq={since}"
            assert got == [update_dict(ev) for ev in want]
        # Nothing more may follow: a duplicate or a foreign event would have arrived by now.
        assert all(_receive(ws, 1, timeout=0.05) == [] for ws, _, _ in streams)
    finally:
        for ws, _, _ in streams:
            ws.close()
    assert len([ev for ev in after if ev.user_id == user]) > len(seqs[user]), "the user had live events too"
    assert f"token={OPERATOR}" not in r.p.log("api")


def test_stream_holds_back_what_the_worker_has_not_stored(running: Running) -> None:
    r = running
    user = 6
    # A clean stop leaves the group at once (a kill -9 would hold the partitions for the session timeout).
    r.p.kill("worker", signal.SIGTERM)
    _, before = truth(r.p)
    since = max(ev.seq for ev in before if ev.user_id == user)
    with connect(f"{r.ws_base}/users/{user}/stream?from_seq={since}", additional_headers=auth(user)) as ws:
        r.p.drive(r.client, 300, seed=61, users=USERS)
        _, after = truth(r.p)
        want = [ev for ev in after if ev.user_id == user and ev.seq > since]
        assert want, "the drive gave the user new events"
        # In Kafka, not in Cassandra: the stream must not show them (a reload could not find them).
        assert _receive(ws, 1, timeout=3.0) == []
        # `ohs lag` sees the stopped worker's group fall behind...
        lag = subprocess.run(
            [sys.executable, "-m", "ohs.cli", "lag", "--group", r.group, "--json", "--max-lag", "0"],
            env=r.p.env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        behind = sum(row["lag_messages"] for row in json.loads(lag.stdout.splitlines()[0])["partitions"])
        assert lag.returncode == 1 and behind > 0, lag.stdout  # 1: threshold breached
        r.p.start("worker", ["worker"], r.worker_env)
        r.p.settle()
        _, after = truth(r.p)
        want = [ev for ev in after if ev.user_id == user and ev.seq > since]
        got = _receive(ws, len(want), timeout=45)
    seqs = [m["seq"] for m in got]
    # The message first and short: a long list's diff would push the diagnosis out of CI's excerpt.
    assert seqs == [ev.seq for ev in want], (
        f"the stream gave {len(seqs)} of the user's {len(want)} new events after the worker restarted "
        f"(first wanted {want[0].seq}, first given {seqs[:1]}):\n{diagnose(r.p, r.bootstrap)}"
    )
    # ... and back to 0 once the resumed worker has committed everything.
    deadline = time.monotonic() + 60
    while True:
        rows = group_lag(r.bootstrap, r.group, [r.p.topics["updates"]])
        if rows and all(row.lag_messages == 0 for row in rows):
            break
        assert time.monotonic() < deadline, f"lag never returned to 0: {rows}"
        time.sleep(1)


# ------------------------------------------------------------------ issue 16: filters, fills, lookups
def _pages(r: Running, path: str, params: dict[str, Any], headers: dict[str, str], key: str) -> list[dict[str, Any]]:
    """Every item of every page, following `next` (pages may be short: the scan budget is small here)."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10_000):
        resp = r.http.get(path, params=params | ({"cursor": cursor} if cursor else {}), headers=headers)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body[key]) <= params.get("limit", 100)
        items += body[key]
        cursor = body["next"]
        if cursor is None:
            return items
    raise AssertionError("pages never ended")


def _want_fills(events: list[Any], user: int) -> list[dict[str, Any]]:
    out = []
    for t in events:
        if isinstance(t, Trade):
            for f in fills_of(t, user):
                out.append({k: getattr(f, k) for k in ("user_id", "ts_ns", "epoch", "seq", "liquidity", "trade_id",
                            "order_id", "symbol", "side", "price", "qty", "quote_qty", "fee")})  # fmt: skip
    return sorted(out, key=lambda f: (f["ts_ns"], f["epoch"], f["seq"], f["liquidity"]), reverse=True)


def _order_cases(symbol: str, mid: int, late: int) -> list[tuple[dict[str, Any], Any]]:
    """(query, which orders it must return) of the filters the orders endpoint takes."""
    return [
        ({"symbol": symbol}, lambda e: e.symbol == symbol),
        ({"side": "SELL"}, lambda e: e.side.value == "SELL"),
        ({"status": ["CANCELLED", "EXPIRED"]}, lambda e: e.status.value in ("CANCELLED", "EXPIRED")),
        ({"status": "NEW"}, lambda e: e.status is OrderStatus.NEW),
        ({"from": mid, "to": late}, lambda e: mid <= e.created_ns < late),
        (
            {"from": mid, "symbol": symbol, "side": "BUY"},
            lambda e: e.created_ns >= mid and e.symbol == symbol and e.side.value == "BUY",
        ),
        ({"to": mid + 1}, lambda e: e.created_ns <= mid),
    ]


def test_order_filters_and_time_ranges_equal_the_engine_truth(running: Running) -> None:
    r = running
    _, updates = truth(r.p)
    wait_synced(r, updates)
    for user in (2, 5):
        last = _orders_of(updates, user)
        created = sorted(ev.created_ns for ev in last.values())
        mid, late = created[len(created) // 3], created[2 * len(created) // 3]
        symbol = max({ev.symbol for ev in last.values()}, key=lambda sym: sum(e.symbol == sym for e in last.values()))
        cases = _order_cases(symbol, mid, late)
        for params, keep in cases:
            for order in ("desc", "asc"):
                got = _pages(r, f"/users/{user}/orders", {"limit": 3, "order": order, **params}, auth(user), "orders")
                want = sorted((e for e in last.values() if keep(e)), key=lambda e: (e.epoch, e.order_id))
                if order == "desc":
                    want.reverse()
                assert [(o["order_id"], o["status"], o["seq"]) for o in got] == [
                    (e.order_id, e.status.value, e.seq) for e in want
                ], (user, params, order)
        # Open orders: a limit, a cursor and a symbol, newest first.
        active = _pages(r, f"/users/{user}/orders/active", {"limit": 2, "symbol": symbol}, auth(user), "orders")
        want_open = sorted(
            (e for e in last.values() if e.status.value in ("NEW", "PARTIALLY_FILLED") and e.symbol == symbol),
            key=lambda e: (e.epoch, e.order_id), reverse=True,
        )  # fmt: skip
        assert [o["order_id"] for o in active] == [e.order_id for e in want_open]


def test_fills_equal_the_engine_trades_with_every_filter(running: Running) -> None:
    r = running
    _, events = journal_events(r.p)
    wait_synced(r, [e for e in events if isinstance(e, OrderUpdate)])
    checked = 0
    for user in range(1, USERS + 1):
        want = _want_fills(events, user)
        got = _pages(r, f"/users/{user}/trades", {"limit": 4}, auth(user), "fills")
        assert [{k: f[k] for k in w} for f, w in zip(got, want, strict=False)] == want and len(got) == len(want)
        for f in got:
            assert f["fee_asset"] == ("BTC" if f["side"] == "BUY" else "USD") if f["symbol"] == "BTC-USD" else True
        if not want:
            continue
        checked += 1
        asc = _pages(r, f"/users/{user}/trades", {"limit": 5, "order": "asc"}, auth(user), "fills")
        assert asc == got[::-1]
        symbol = want[0]["symbol"]
        by_symbol = _pages(r, f"/users/{user}/trades", {"limit": 2, "symbol": symbol}, auth(None), "fills")
        assert by_symbol == [f for f in got if f["symbol"] == symbol]
        ts = sorted({f["ts_ns"] for f in want})
        lo, hi = ts[len(ts) // 4], ts[3 * len(ts) // 4]
        ranged = _pages(r, f"/users/{user}/trades", {"limit": 3, "from": lo, "to": hi}, auth(user), "fills")
        assert ranged == [f for f in got if lo <= f["ts_ns"] < hi]
        order_id = want[-1]["order_id"]
        of_order = _pages(r, f"/users/{user}/trades", {"limit": 2, "order_id": order_id}, auth(user), "fills")
        assert of_order == [f for f in got if f["order_id"] == order_id] and of_order
        # Another user's order filters to nothing: fills of other users are never shown.
        other = next(u for u in range(1, USERS + 1) if u != user)
        assert _pages(r, f"/users/{other}/trades", {"order_id": order_id}, auth(other), "fills") == [
            f for f in _want_fills(events, other) if f["order_id"] == order_id
        ]
    assert checked >= 3, "the flow gave several users fills"


def test_an_order_by_client_id_is_the_newest_with_that_id(running: Running) -> None:
    r = running
    _, updates = truth(r.p)
    wait_synced(r, updates)
    mine = [e for e in updates if e.user_id == CID_USER and e.client_order_id == "cid-again"]
    placed = sorted({e.order_id for e in mine if e.reason is not RejectReason.DUPLICATE_CLIENT_ORDER_ID})
    assert len(placed) == 2 and any(e.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID for e in mine)
    got = r.http.get(f"/users/{CID_USER}/orders/by-client-id/cid-again", headers=auth(CID_USER))
    assert got.status_code == 200, got.text
    newest = [e for e in mine if e.order_id == placed[-1]][-1]
    assert got.json() == {k: update_dict(newest)[k] for k in got.json()}
    assert got.json()["status"] == "NEW"
    unicode = r.http.get(f"/users/{CID_USER}/orders/by-client-id/ünïcode id", headers=auth(None))
    assert unicode.status_code == 200 and unicode.json()["client_order_id"] == "ünïcode id"
    assert r.http.get(f"/users/{CID_USER}/orders/by-client-id/cid-again", headers=auth(2)).status_code == 403
    assert r.http.get("/users/2/orders/by-client-id/cid-again", headers=auth(2)).status_code == 404


def test_symbols_and_metrics(running: Running) -> None:
    r = running
    body = r.http.get("/symbols").json()
    specs = EngineSettings(_env_file=None).symbol_specs()  # type: ignore[call-arg]
    assert [s["symbol"] for s in body["symbols"]] == [s.name for s in specs]
    btc = body["symbols"][0]
    assert (btc["base"], btc["quote"], btc["tick_size"], btc["lot_size"]) == ("BTC", "USD", 1, 1)
    assert (btc["price_decimals"], btc["qty_decimals"]) == (2, 4)
    r.http.get("/users/1/orders", headers=auth(1))
    r.http.get("/users/2/orders", headers=auth(1))
    metrics = r.http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'ohs_api_requests_total{route="/users/{user_id}/orders",status="200"}' in text
    assert 'ohs_api_requests_total{route="/users/{user_id}/orders",status="403"}' in text
    assert 'ohs_api_request_seconds_bucket{le="0.001",route="/users/{user_id}/orders"}' in text
    for name in ("ohs_api_ws_subscribers", "ohs_api_live_tail_delay_seconds", 'ohs_build_info{component="api"'):
        assert name in text
    assert "/users/1/orders" not in text, "routes are templates, never paths"
    # JSON logs: every line of the API's log is one object.
    lines = [line for line in r.p.log("api").splitlines()[1:] if line.strip()]
    assert lines and all(json.loads(line)["logger"] for line in lines)


def _fills_messages(events: list[Any], user: int, since: int) -> list[dict[str, Any]]:
    want = []
    for t in events:
        if isinstance(t, Trade) and t.seq > since and user in (t.taker_user_id, t.maker_user_id):
            want.append((t.epoch, t.seq, len(fills_of(t, user))))
    return [{"type": "fills", "epoch": e, "seq": s, "n": n} for e, s, n in want]


def test_stream_carries_fills_and_resumes_each_kind_without_gap(running: Running) -> None:
    r = running
    _, events = journal_events(r.p)
    wait_synced(r, [e for e in events if isinstance(e, OrderUpdate)])
    users = [u for u in range(1, USERS + 1) if _want_fills(events, u)][:3]
    streams = []
    for u in users:
        seqs = sorted({f["seq"] for f in _want_fills(events, u)})
        fills_from = seqs[len(seqs) // 2]
        upd = [e.seq for e in events if isinstance(e, OrderUpdate) and e.user_id == u]
        orders_from = upd[len(upd) // 2]
        both = connect(
            f"{r.ws_base}/users/{u}/stream?kind=both&from_seq={orders_from}&fills_from_seq={fills_from}",
            additional_headers=auth(u), max_queue=None,
        )  # fmt: skip
        fills = connect(
            f"{r.ws_base}/users/{u}/stream?kind=fills&fills_from_seq={fills_from}",
            additional_headers=auth(u),
            max_queue=None,
        )
        streams.append((u, orders_from, fills_from, both, fills))
    try:
        r.p.drive(r.client, 300, seed=91, users=USERS)
        r.p.settle()
        _, after = journal_events(r.p)
        for u, orders_from, fills_from, both, fills in streams:
            want_fills = _fills_messages(after, u, fills_from)
            want_orders = [
                update_dict(e) for e in after if isinstance(e, OrderUpdate) and e.user_id == u and e.seq > orders_from
            ]
            got = _receive(fills, len(want_fills), timeout=40)
            assert [
                {"type": m["type"], "epoch": m["epoch"], "seq": m["seq"], "n": len(m["fills"])} for m in got
            ] == want_fills
            rest = _pages(r, f"/users/{u}/trades", {"limit": 500, "order": "asc"}, auth(u), "fills")
            assert [f for m in got for f in m["fills"]] == [f for f in rest if f["seq"] > fills_from]
            mixed = _receive(both, len(want_fills) + len(want_orders), timeout=40)
            assert [m for m in mixed if m.get("type") == "fills"] == got
            assert [m for m in mixed if m.get("type") != "fills"] == want_orders
        assert all(_receive(ws, 1, timeout=0.05) == [] for *_, a, b in streams for ws in (a, b))
    finally:
        for *_, a, b in streams:
            a.close()
            b.close()
    with connect(f"{r.ws_base}/users/1/stream?kind=fills&from_seq=1", additional_headers=auth(1)) as ws:
        assert _close_code(ws) == 1008
    with connect(f"{r.ws_base}/users/1/stream?kind=trades", additional_headers=auth(1)) as ws:
        assert _close_code(ws) == 1008


@pytest.mark.skipif(
    shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None, reason="no schemathesis"
)
def test_the_openapi_contract_holds_under_schemathesis(running: Running) -> None:
    """Every operation fuzzed with every check, as an operator and as a user: any finding fails."""
    r = running
    cli = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    for token in (OPERATOR, TOKENS[3]):
        run = subprocess.run(
            [cli, "run", f"{str(r.http.base_url).rstrip('/')}/openapi.json", "--checks", "all", "--seed", "1601",
             "--max-examples", "25", "--workers", "2", "-H", f"Authorization: Bearer {token}",
             "--request-timeout", "15", "--no-color"],
            capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
