"""Every error the HTTP API gives is one its OpenAPI document lists; other users' orders look missing.

No servers: the app is served by Starlette's TestClient without its lifespan (so neither the
Kafka tail nor the Cassandra connection starts), with an in-memory twin of ``api.store.Store``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import StorageUnavailable
from api.live import Hub
from api.models import Order
from api.settings import ApiSettings

USER1, USER2, OPERATOR = "user-one-0123456789abcdef", "user-two-0123456789abcdef", "operator-0123456789abcdef"
ALICES_ORDER, BOBS_ORDER, MISSING_ORDER = 10, 20, 30


def _row(user_id: int, order_id: int) -> dict[str, Any]:
    """An order_history row as the driver returns it: every column of the Order model."""
    out: dict[str, Any] = {}
    for name, field in Order.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, enum.Enum):
            out[name] = next(iter(ann)).value
        elif ann is str:
            out[name] = "x"
        else:
            out[name] = 1
    return out | {"user_id": user_id, "order_id": order_id, "epoch": 7}


class FakeStore:
    """The reads of ``api.store.Store``; ``fail`` makes every read raise it (a Cassandra outage)."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None
        self.reads: list[str] = []
        self.orders = {ALICES_ORDER: 1, BOBS_ORDER: 2}

    async def _read(self, what: str) -> None:
        self.reads.append(what)
        if self.fail is not None:
            raise self.fail

    async def ping(self) -> None:
        await self._read("ping")

    async def order_rows(
        self, table: str, user_id: int, desc: bool, after: Any, inclusive: bool, limit: int
    ) -> list[Any]:
        await self._read(table)
        return [_row(user_id, 5)] if after is None else []

    async def order_probe(self, table: str, user_id: int, kind: str, epoch: int = 0, order_id: int = 0) -> Any:
        await self._read("probe")
        return None

    async def order_by_client_id(self, user_id: int, client_order_id: str) -> dict[str, Any] | None:
        await self._read("by_client_id")
        return _row(user_id, ALICES_ORDER) if client_order_id == "mine" else None

    async def order_window(self, user_id: int, epoch: int, order_id: int) -> dict[str, Any] | None:
        await self._read("window")
        return {"user_id": user_id, "created_ns": 1, "updated_ns": 2}

    async def trade_months(self, user_id: int) -> list[int]:
        await self._read("months")
        return [197001]

    async def fill_rows(self, user_id: int, month: int, desc: bool, after: Any, limit: int) -> list[Any]:
        await self._read("fills")
        return []

    async def order_ref(self, order_id: int, epoch: int | None) -> dict[str, Any] | None:
        await self._read("order_ref")
        user = self.orders.get(order_id)
        return None if user is None else {"user_id": user, "epoch": 7, "order_id": order_id}

    async def order(self, user_id: int, epoch: int, order_id: int) -> dict[str, Any] | None:
        await self._read("order")
        return _row(user_id, order_id)

    async def order_events(self, user_id: int, epoch: int, order_id: int) -> list[bytes]:
        await self._read("events")
        return [b"\x00 not a stored event"]  # undecodable: skipped, never a 500

    async def statistics(self, user_id: int) -> list[Any]:
        await self._read("stats")
        return []


@pytest.fixture
def api() -> Iterator[tuple[TestClient, FakeStore, Any]]:
    tokens = {USER1: {"user_id": 1}, USER2: {"user_id": 2}, OPERATOR: {"role": "operator"}}
    app = create_app(ApiSettings(tokens=json.dumps(tokens), _env_file=None))  # type: ignore[call-arg]
    store = FakeStore()
    app.state.store = store
    app.state.tail = SimpleNamespace(connected=True)
    app.state.hub = Hub(10)
    yield TestClient(app, raise_server_exceptions=False), store, app


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _documented(client: TestClient) -> dict[str, set[int]]:
    doc = client.get("/openapi.json").json()
    return {path: {int(code) for code in ops["get"]["responses"]} for path, ops in doc["paths"].items()}


# (OpenAPI path, concrete path, query): every GET operation, with parameters that are valid.
OPERATIONS = [
    ("/health", "/health", {}),
    ("/symbols", "/symbols", {}),
    ("/users/{user_id}/orders/active", "/users/1/orders/active", {"symbol": "BTC-USD"}),
    ("/users/{user_id}/orders", "/users/1/orders", {"limit": 5, "status": ["FILLED", "NEW"], "from": 1, "to": 9}),
    ("/users/{user_id}/orders/by-client-id/{client_order_id}", "/users/1/orders/by-client-id/mine", {}),
    ("/users/{user_id}/trades", "/users/1/trades", {"symbol": "BTC-USD", "order_id": ALICES_ORDER}),
    ("/orders/{order_id}", f"/orders/{ALICES_ORDER}", {}),
    ("/orders/{order_id}/events", f"/orders/{ALICES_ORDER}/events", {}),
    ("/users/{user_id}/stats", "/users/1/stats", {}),
]


def _variants(concrete: str, query: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """Requests that exercise every designed error path of an operation."""
    yield concrete, query, _auth(USER1)
    yield concrete, query, {}  # no token
    yield concrete, query, {"Authorization": "Bearer not-a-configured-token-at-all"}
    yield concrete, query, _auth(USER2)  # another user's data
    yield concrete, query, _auth(OPERATOR)
    yield concrete.replace("/1/", "/0/").replace(f"/{ALICES_ORDER}", "/0"), query, _auth(USER1)  # out of range
    yield concrete.replace("/1/", "/x/").replace(f"/{ALICES_ORDER}", "/1.5"), query, _auth(USER1)  # not an int
    yield concrete, {**query, "limit": 10_000, "epoch": -1, "before": "%%%"}, _auth(USER1)
    yield concrete, {**query, "before": "AAAA", "cursor": "1.2.x"}, _auth(USER1)  # malformed cursors
    yield concrete, {**query, "cursor": "99999999999999999999.1"}, _auth(USER1)  # beyond a bigint: a valid shape
    yield concrete, {**query, "from": -1, "status": "OPEN", "order": "up", "side": "X"}, _auth(USER1)
    yield concrete.replace("/mine", "/other"), query, _auth(USER1)  # no order with that client id
    yield concrete.replace(f"/{ALICES_ORDER}", f"/{MISSING_ORDER}"), query, _auth(USER1)
    yield concrete.replace(f"/{ALICES_ORDER}", f"/{BOBS_ORDER}"), query, _auth(USER1)


FAILURES: list[Callable[[], BaseException | None]] = [
    lambda: None,
    lambda: StorageUnavailable("down"),
    lambda: NoHostAvailable("no host", {}),  # untranslated driver errors are 503 too
    lambda: OperationTimedOut("slow"),
]


@pytest.mark.parametrize("failure", FAILURES, ids=["up", "unavailable", "no-host", "timeout"])
def test_every_error_status_is_one_the_openapi_document_lists(api: Any, failure: Any) -> None:
    client, store, _ = api
    documented = _documented(client)
    assert set(documented) == {path for path, _, _ in OPERATIONS}, "a new operation needs its cases here"
    store.fail = failure()
    seen: set[int] = set()
    for path, concrete, query in OPERATIONS:
        for url, params, headers in _variants(concrete, query):
            resp = client.get(url, params=params, headers=headers)
            seen.add(resp.status_code)
            assert resp.status_code in documented[path], (path, url, params, headers, resp.status_code, resp.text)
            assert resp.headers["content-type"] == "application/json", (url, resp.text)
            if resp.status_code != 200 and path != "/health":  # one Error body for every error status
                assert list(resp.json()) == ["detail"] and isinstance(resp.json()["detail"], str), resp.text
    expected = {200, 401, 403, 404, 422} if store.fail is None else {200, 401, 422, 503}
    assert expected <= seen, "the cases above no longer reach every error path"


def test_not_connected_to_cassandra_yet_is_503_and_health_says_so(api: Any) -> None:
    client, _, app = api
    app.state.store = None
    app.state.tail.connected = False
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "cassandra": False, "live_tail": False}
    for path, concrete, _ in OPERATIONS[2:]:
        resp = client.get(concrete, headers=_auth(USER1))
        assert resp.status_code == 503 and resp.json() == {"detail": "storage unavailable, retry later"}, path
        assert client.get(concrete).status_code == 401, "authentication comes first"


def test_health_publishes_states_only(api: Any) -> None:
    client, _, _ = api
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "cassandra": True, "live_tail": True}


@pytest.mark.parametrize("suffix", ["", "/events"])
def test_another_users_order_is_as_missing_as_a_missing_one(api: Any, suffix: str) -> None:
    client, store, _ = api
    store.reads.clear()
    foreign = client.get(f"/orders/{BOBS_ORDER}{suffix}", headers=_auth(USER1))
    foreign_reads = list(store.reads)
    store.reads.clear()
    missing = client.get(f"/orders/{MISSING_ORDER}{suffix}", headers=_auth(USER1))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json() == {"detail": "no such order"}
    assert dict(foreign.headers) == dict(missing.headers) | {"content-length": foreign.headers["content-length"]}
    assert foreign_reads == store.reads == ["order_ref"], "the same work for both: nothing to time"
    # Operators and the owner still read it.
    assert client.get(f"/orders/{BOBS_ORDER}{suffix}", headers=_auth(OPERATOR)).status_code == 200
    assert client.get(f"/orders/{BOBS_ORDER}{suffix}", headers=_auth(USER2)).status_code == 200


def test_a_foreign_order_denial_is_logged_with_its_owner(api: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, _, _ = api
    with caplog.at_level("WARNING", logger="ohs.api"):
        client.get(f"/orders/{BOBS_ORDER}", headers=_auth(USER1))
    assert f"denied status=404 path=/orders/{BOBS_ORDER} principal=user:1 reason=owner user:2" in caplog.text
    assert USER1 not in caplog.text
