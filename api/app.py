"""``create_app``: the FastAPI application of the query API and live stream.

A process of its own (``ohs api``), not part of the worker: reads scale out
independently of the partitions the worker owns, and neither a slow query
nor a WebSocket client can stall the worker's event loop or its rebalances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from cassandra import InvalidRequest
from cassandra.cluster import Cluster
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tenacity import RetryCallState

from api.auth import TokenTable
from api.errors import StorageUnavailable
from api.live import Hub, Tail
from api.metrics import RequestMetrics
from api.routes import build_router
from api.settings import ApiSettings
from api.store import Store, connect
from api.stream import stream_endpoint
from kit.cql import DRIVER_ERRORS
from kit.retry import any_error, retrying

__all__ = ["create_app"]

log = logging.getLogger("ohs.api")

_STREAM_DOC = """\
**Live stream** (WebSocket, not listed below): `GET /users/{user_id}/stream?kind=orders|fills|both`
`&from_seq=N[&from_epoch=E]&fills_from_seq=N[&fills_from_epoch=E]`, token in `Authorization: Bearer`
or `?token=`. An order update is one message, as JSON (the `OrderEvent` schema); a trade's fills are one
message `{"type": "fills", "epoch", "seq", "fills": [Fill, ...]}` (two fills for a self-trade). Each
kind comes in (epoch, seq) order, sent only once the worker has stored it. Reconnect with `from_seq`
(and `from_epoch`) of the last order update and `fills_from_seq` (`fills_from_epoch`) of the last
fills message to resume without gap or duplicate. Close codes: 4401 unauthenticated, 4403 another
user's stream, 1008 bad parameter, 1013 too slow, not ready or Cassandra unavailable (reconnect with
the cursors), 1011 internal error.

**Errors** are JSON `{"detail": "..."}` with the status as the contract: 401 no or an unknown token,
403 another user's `/users/{user_id}/...`, 404 no such order (or another user's), 422 invalid
parameters, 503 Cassandra unavailable.
"""

_CONNECT_MIN_S = 0.5
_CONNECT_MAX_S = 10.0
"""Back-off bounds of the Cassandra connection attempts: ready within ~10 s of the database's return."""
_UNAVAILABLE_LOG_EVERY_S = 10.0


async def _connect_store(app: FastAPI, s: ApiSettings) -> None:
    """Connect to Cassandra and prepare the reads, retrying with jittered back-off until it works.

    Runs in the background from the start, so the API serves (503, /health unavailable) while
    Cassandra is down instead of refusing to start. Only a cancellation ends it early. Jittered
    (kit.retry): API replicas do not reconnect in step."""

    def next_attempt(state: RetryCallState) -> None:
        log.info("next Cassandra connection attempt in %.1fs", state.next_action.sleep if state.next_action else 0.0)

    # The driver's errors share no base class; each one is worth a retry (a cancellation is not).
    async for attempt in retrying(_CONNECT_MIN_S, _CONNECT_MAX_S, retry=any_error, on_retry=next_attempt):
        with attempt:
            n = attempt.retry_state.attempt_number
            cluster: Cluster | None = None
            try:
                # The driver connects and prepares synchronously: off the loop.
                cluster, session = await asyncio.to_thread(connect, s)
                store = await asyncio.to_thread(Store, session, s.keyspace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, InvalidRequest):
                    # The worker creates the tables when it starts: wait for it rather than give up.
                    log.error(
                        "keyspace %s lacks the worker's tables (run `ohs db migrate`), retrying: %s", s.keyspace, exc
                    )
                else:
                    log.warning(
                        "Cassandra not reachable at %s:%d (attempt %d): %r", s.cql_contact_points, s.cql_port, n, exc
                    )
                if cluster is not None:
                    try:
                        await asyncio.to_thread(cluster.shutdown)
                    except Exception as close_exc:  # a half-open cluster that fails to close must not end the retries
                        log.warning("closing the failed Cassandra connection: %r", close_exc)
                raise
            app.state.cluster, app.state.store = cluster, store
            log.info("Cassandra connected after %d attempt(s): keyspace %s", n, s.keyspace)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    s = settings or ApiSettings()
    # Parsed here, before serving: a broken token configuration must stop the start, not every request.
    tokens = TokenTable.from_settings(s)
    if not len(tokens):
        log.warning("no tokens configured: every request will be denied (set OHS_API_TOKENS or OHS_API_TOKENS_FILE)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Neither server is needed to start: the tail and the connection retry in the background,
        # and /health says what is missing meanwhile.
        hub = Hub(s.stream_queue_size)
        tail = Tail(s, hub, asyncio.get_running_loop())
        app.state.hub, app.state.tail = hub, tail
        tail.start()
        connecting = asyncio.create_task(_connect_store(app, s), name="ohs-api-cassandra")
        log.info(
            "api started: keyspace=%s cassandra=%s:%d topic=%s worker_group=%s tokens=%d",
            s.keyspace,
            s.cql_contact_points,
            s.cql_port,
            s.topic_updates,
            s.worker_group,
            len(tokens),
        )
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await asyncio.to_thread(tail.stop)
            cluster: Cluster | None = app.state.cluster
            if cluster is not None:
                await asyncio.to_thread(cluster.shutdown)

    app = FastAPI(
        title="Order history API",
        version="1",
        summary="A user's active orders, order history, order events and statistics, and a live stream of "
        "their order updates. Authenticate with `Authorization: Bearer <token>`.",
        description=_STREAM_DOC,
        lifespan=lifespan,
    )
    app.state.settings = s
    app.state.tokens = tokens
    app.add_middleware(RequestMetrics)
    app.state.store = None  # until _connect_store succeeds: data endpoints answer 503
    app.state.cluster = None
    app.include_router(build_router(s))
    app.add_api_websocket_route("/users/{user_id}/stream", stream_endpoint)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus exposition, without a token (like /health: counts and states, no user data)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The bearer scheme the data endpoints name (api.routes.SECURED): tools such as contract
        # fuzzers then know which operations need a token.
        if app.openapi_schema is None:
            doc = plain_openapi()
            doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "A token of OHS_API_TOKENS / OHS_API_TOKENS_FILE: a user's, or an operator's.",
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    logged = {"at": -_UNAVAILABLE_LOG_EVERY_S}

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # One line per 10 s: an outage must not turn every request into a log line.
        now = time.monotonic()
        if now - logged["at"] >= _UNAVAILABLE_LOG_EVERY_S:
            logged["at"] = now
            log.warning("Cassandra unavailable for %s: %s", request.url.path, exc)
        return JSONResponse({"detail": "storage unavailable, retry later"}, status_code=503)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        # One error shape for every status: the problems as one line (never the input: a query string
        # may hold anything).
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'path'))}: {e.get('msg', '')}"
            for e in errors
        ]
        return JSONResponse({"detail": "; ".join(problems)[:2000] or "invalid request"}, status_code=422)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a designed answer: logged with its traceback (by Starlette), and JSON like every other error.
        return JSONResponse({"detail": "internal error"}, status_code=500)

    for exc_class in (StorageUnavailable, *DRIVER_ERRORS):
        app.add_exception_handler(exc_class, unavailable)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, internal)
    return app
