"""The API's Cassandra connection retries with jittered back-off (kit.retry) until it works."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from cassandra import InvalidRequest
from cassandra.cluster import NoHostAvailable

import api.app as api_app
from api.settings import ApiSettings


class _Cluster:
    def __init__(self) -> None:
        self.closed = False

    def shutdown(self) -> None:
        self.closed = True


def test_connect_retries_driver_errors_and_closes_each_failed_cluster(monkeypatch):
    monkeypatch.setattr(api_app, "_CONNECT_MIN_S", 0.001)
    monkeypatch.setattr(api_app, "_CONNECT_MAX_S", 0.002)
    clusters: list[_Cluster] = []
    failures: list[Exception] = [NoHostAvailable("down", {}), InvalidRequest("no table"), OSError("reset")]

    def connect(_s: ApiSettings) -> tuple[_Cluster, object]:
        clusters.append(_Cluster())
        return clusters[-1], "session"

    def store(session: object, keyspace: str) -> str:
        if failures:
            raise failures.pop(0)
        return f"store of {keyspace}"

    monkeypatch.setattr(api_app, "connect", connect)
    monkeypatch.setattr(api_app, "Store", store)
    app = SimpleNamespace(state=SimpleNamespace(cluster=None, store=None))
    s = ApiSettings()
    asyncio.run(api_app._connect_store(app, s))  # type: ignore[arg-type]
    assert len(clusters) == 4 and [c.closed for c in clusters] == [True, True, True, False]
    assert app.state.store == f"store of {s.keyspace}" and app.state.cluster is clusters[-1]


def test_a_cancellation_ends_the_connection_attempts(monkeypatch):
    def connect(_s: ApiSettings) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(api_app, "connect", connect)
    app = SimpleNamespace(state=SimpleNamespace(cluster=None, store=None))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(api_app._connect_store(app, ApiSettings()))  # type: ignore[arg-type]
