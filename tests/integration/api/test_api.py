"""The query API and live stream as users run them, checked against the engine's own truth.

One real pipeline per module (engine -> bridge -> Kafka -> faust worker ->
Cassandra in a fresh keyspace), then ``ohs api`` as a subprocess; every answer
is compared with what the engine's journal says happened.
"""

from __future__ import annotations

import base64
import json
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
from cassandra import InvalidRequest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.models import update_dict
from api.store import encode_cursor
from engine.client import EngineClient
from engine.core import Engine
from engine.events import OrderUpdate
from engine.journal import Journal
from engine.recovery import recover
from engine.settings import EngineSettings
from streams.lag import group_lag
from streams.state import ALL_SYMBOLS, UserState
from tests.integration.pipeline import Pipeline, free_port

pytestmark = pytest.mark.integration

USERS = 8
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
    s = EngineSettings(_env_file=None, journal_dir=p.workdir / "journal")  # type: ignore[call-arg]
    with Journal.open(s.journal_dir, s.symbol_specs()) as journal:
        engine, _ = recover(journal)
        updates = [e for e in journal.read_events(1, 0, limit=10**9) if isinstance(e, OrderUpdate)]
    return engine, updates


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
        except InvalidRequest:  # the worker has not created the tables yet
            have = {}
        lag = group_lag(r.bootstrap, r.group, [r.p.topics["updates"]]) if have == last else []
        if lag and all(pl.committed >= 0 and pl.lag_messages == 0 for pl in lag):
            return
        time.sleep(0.5)
    raise AssertionError(f"Cassandra never caught up with the engine:\n{r.p.log('worker')}")


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
        p.start("worker", ["worker"], worker_env)
        p.drive(client, 1_000, seed=31, users=USERS)
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
            params: dict[str, Any] = {"limit": 7} | ({"before": cursor} if cursor else {})
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
            assert events.json()["events"] == [update_dict(e) for e in updates if e.order_id == order_id]

        stats = r.http.get(f"/users/{user}/stats", headers=headers)
        assert stats.status_code == 200, stats.text
        by_symbol = {row["symbol"]: row for row in stats.json()["symbols"]}
        state = expected_stats[user]
        assert set(by_symbol) == set(state.stats)
        assert stats.json()["symbols"][0]["symbol"] == ALL_SYMBOLS
        for symbol, values in state.stats.items():
            assert {k: by_symbol[symbol][k] for k in values} == values, f"stats of user {user} {symbol}"
        assert by_symbol[ALL_SYMBOLS]["last_seq"] == state.last_seq


def test_users_read_only_their_own_data_and_operators_read_all(running: Running) -> None:
    r = running
    _, updates = truth(r.p)
    bobs_order = next(ev.order_id for ev in updates if ev.user_id == 2)
    paths = ["/users/2/orders/active", "/users/2/orders", "/users/2/stats", f"/orders/{bobs_order}"]
    paths.append(f"/orders/{bobs_order}/events")
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer not-a-configured-token-at-all"}, {"Authorization": "Basic x"}):
            denied = r.http.get(path, headers=headers)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"] == "Bearer"
            assert denied.json() == {"detail": "missing or invalid bearer token"}
        forbidden = r.http.get(path, headers=auth(1))
        assert forbidden.status_code == 403, path
        assert forbidden.json() == {"detail": "not allowed to read this user's data"}
        assert r.http.get(path, headers=auth(2)).status_code == 200, path
        assert r.http.get(path, headers=auth(None)).status_code == 200, path
    time.sleep(0.5)  # the API's log is written by another process
    log = r.p.log("api")
    assert f"denied status=403 path=/orders/{bobs_order}/events principal=user:1 reason=owner user:2" in log
    assert "denied status=401 path=/users/2/stats principal=anonymous reason=unknown token" in log
    assert all(token not in log for token in (*TOKENS.values(), OPERATOR))


def _raw_cursor(version: int, epoch: int, order_id: int) -> str:
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
        ("/users/1/orders", {"before": "%%%not-base64"}, 400),
        ("/users/1/orders", {"before": "AAAA"}, 400),
        ("/users/1/orders", {"before": "x" * 65}, 422),
        ("/users/1/orders", {"before": _raw_cursor(9, 1, 2)}, 400),  # an unknown cursor version
        ("/users/1/orders", {"before": _raw_cursor(1, -1, 2)}, 400),
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
        assert "detail" in resp.json()
    # A cursor past every order is a valid, empty last page.
    end = r.http.get("/users/1/orders", params={"before": encode_cursor((0, 0))}, headers=auth(1))
    assert end.json() == {"user_id": 1, "orders": [], "next": None}


def test_openapi_and_health(running: Running) -> None:
    r = running
    doc = r.http.get("/openapi.json").json()
    assert set(doc["paths"]) >= {
        "/health",
        "/users/{user_id}/orders/active",
        "/users/{user_id}/orders",
        "/orders/{order_id}",
        "/orders/{order_id}/events",
        "/users/{user_id}/stats",
    }
    ok = doc["paths"]["/users/{user_id}/orders"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OrdersPage"}
    assert {"Order", "OrderEvent", "SymbolStatistics"} <= set(doc["components"]["schemas"])
    health = r.http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["cassandra"]
    assert health.json()["live_tail"] is True


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
        assert lag.returncode == 2 and behind > 0, lag.stdout
        r.p.start("worker", ["worker"], r.worker_env)
        r.p.settle()
        _, after = truth(r.p)
        want = [ev for ev in after if ev.user_id == user and ev.seq > since]
        got = _receive(ws, len(want), timeout=45)
    assert [m["seq"] for m in got] == [ev.seq for ev in want]
    # ... and back to 0 once the resumed worker has committed everything.
    deadline = time.monotonic() + 60
    while True:
        rows = group_lag(r.bootstrap, r.group, [r.p.topics["updates"]])
        if rows and all(row.lag_messages == 0 for row in rows):
            break
        assert time.monotonic() < deadline, f"lag never returned to 0: {rows}"
        time.sleep(1)
