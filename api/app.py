"""``create_app``: the FastAPI application of the query API and live stream.

A process of its own (``ohs api``), not part of the worker: reads scale out
independently of the partitions the worker owns, and neither a slow query
nor a WebSocket client can stall the worker's event loop or its rebalances.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cassandra import InvalidRequest, OperationTimedOut, RequestExecutionException
from cassandra.cluster import NoHostAvailable
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.auth import TokenTable
from api.live import Hub, Tail
from api.routes import build_router
from api.settings import ApiSettings
from api.store import Store, connect
from api.stream import stream_endpoint

__all__ = ["create_app"]

log = logging.getLogger("ohs.api")

_STREAM_DOC = """\
**Live stream** (WebSocket, not listed below): `GET /users/{user_id}/stream?from_seq=N[&from_epoch=E]`,
token in `Authorization: Bearer` or `?token=`. Each message is one order update as JSON (the
`OrderEvent` schema), in (epoch, seq) order, sent only once the worker has stored it. Reconnect with
`from_seq` (and `from_epoch`) of the last message to resume without gap or duplicate. Close codes:
4401 unauthenticated, 4403 another user's stream, 1008 bad parameter, 1013 too slow or not ready
(reconnect with `from_seq`), 1011 internal error.
"""

_UNAVAILABLE = (RequestExecutionException, OperationTimedOut, NoHostAvailable)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    s = settings or ApiSettings()
    # Parsed here, before serving: a broken token configuration must stop the start, not every request.
    tokens = TokenTable.from_settings(s)
    if not len(tokens):
        log.warning("no tokens configured: every request will be denied (set OHS_API_TOKENS or OHS_API_TOKENS_FILE)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The driver connects and prepares synchronously: off the loop, which is already running.
        cluster, session = await asyncio.to_thread(connect, s)
        tail: Tail | None = None
        try:
            try:
                app.state.store = await asyncio.to_thread(Store, session, s.keyspace)
            except InvalidRequest as exc:
                log.critical("keyspace %s lacks the worker's tables (run `ohs db migrate`): %s", s.keyspace, exc)
                raise
            hub = Hub(s.stream_queue_size)
            tail = Tail(s, hub, asyncio.get_running_loop())
            app.state.hub, app.state.tail = hub, tail
            tail.start()
            log.info(
                "api ready: keyspace=%s cassandra=%s:%d topic=%s worker_group=%s tokens=%d",
                s.keyspace,
                s.cql_contact_points,
                s.cql_port,
                s.topic_updates,
                s.worker_group,
                len(tokens),
            )
            yield
        finally:
            if tail is not None:
                await asyncio.to_thread(tail.stop)
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
    app.include_router(build_router(s))
    app.add_api_websocket_route("/users/{user_id}/stream", stream_endpoint)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Cassandra unavailable for %s: %r", request.url.path, exc)
        return JSONResponse({"detail": "storage unavailable, retry later"}, status_code=503)

    for exc_class in _UNAVAILABLE:
        app.add_exception_handler(exc_class, unavailable)

    return app
