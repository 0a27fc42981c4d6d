"""The HTTP endpoints: thin handlers over ``api.store`` with authorization first.

Every id is bounded to a CQL bigint and every page size to the configured
maximum in the signature, so bad input is a 422 from validation (and a bad
cursor a 400) before anything reaches Cassandra, never a 500.
"""

# No `from __future__ import annotations` here: FastAPI reads the signatures at runtime, and the page
# size bound in them comes from the settings, a local of build_router that a string annotation cannot name.

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, require_principal, require_reader
from api.models import (
    ActiveOrder,
    ActiveOrders,
    Health,
    Order,
    OrderEvent,
    OrderEvents,
    OrdersPage,
    SymbolStatistics,
    UserStatistics,
    update_dict,
)
from api.settings import ApiSettings
from api.store import MAX_BIGINT, Row, Store, decode_cursor, encode_cursor
from engine.events import OrderUpdate
from schemas.codec import decode
from streams.state import ALL_SYMBOLS

__all__ = ["build_router"]

log = logging.getLogger("ohs.api")

UserId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="The user's id.")]
OrderId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="Engine order id (unique within an epoch).")]
Epoch = Annotated[int | None, Query(ge=0, le=MAX_BIGINT, description="Engine epoch of the order; default: its newest.")]
Caller = Annotated[Principal, Depends(require_principal)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid bearer token."},
    403: {"description": "The token may not read this user's data."},
    422: {"description": "Invalid parameters."},
    503: {"description": "Cassandra is unavailable."},
}
_ORDER_ERRORS: dict[int | str, dict[str, Any]] = {**_ERRORS, 404: {"description": "No such order."}}


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


Db = Annotated[Store, Depends(_store)]


async def _owned_order(request: Request, store: Store, caller: Principal, order_id: int, epoch: int | None) -> Row:
    """The orders_by_id row of an order the caller may read: 404 if none, 403 if not theirs."""
    ref = await store.order_ref(order_id, epoch)
    if ref is None:
        raise HTTPException(404, detail="no such order")
    require_reader(request, caller, ref["user_id"])
    return ref


def build_router(s: ApiSettings) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
    async def health(request: Request, store: Db) -> Health | JSONResponse:
        """Liveness and readiness: 503 when Cassandra does not answer. No authentication."""
        tail = request.app.state.tail
        try:
            version: str | None = await store.release_version()
        except Exception as exc:  # whatever the driver raises, the answer is "not ready"
            log.warning("health: Cassandra did not answer: %r", exc)
            version = None
        body = Health(
            status="ok" if version else "unavailable",
            cassandra=version,
            live_tail=tail.connected,
            subscribers=request.app.state.hub.subscribers,
        )
        return body if version else JSONResponse(body.model_dump(), status_code=503)

    @router.get("/users/{user_id}/orders/active", response_model=ActiveOrders, responses=_ERRORS, tags=["orders"])
    async def active_orders(request: Request, user_id: UserId, caller: Caller, store: Db) -> ActiveOrders:
        """The user's open orders (NEW or PARTIALLY_FILLED), newest first."""
        require_reader(request, caller, user_id)
        rows = await store.active_orders(user_id)
        return ActiveOrders(user_id=user_id, orders=[ActiveOrder.model_validate(r) for r in rows])

    @router.get("/users/{user_id}/orders", response_model=OrdersPage, responses=_ERRORS, tags=["orders"])
    async def order_history(
        request: Request,
        user_id: UserId,
        caller: Caller,
        store: Db,
        limit: Annotated[int, Query(ge=1, le=s.page_size_max, description="Orders per page.")] = s.page_size_default,
        before: Annotated[
            str | None, Query(max_length=64, description="The `next` cursor of the previous page.")
        ] = None,
    ) -> OrdersPage:
        """The user's orders, newest first, latest state each; follow `next` for older ones."""
        require_reader(request, caller, user_id)
        try:
            cursor = decode_cursor(before) if before is not None else None
        except ValueError:
            raise HTTPException(400, detail="invalid cursor in 'before'") from None
        rows, nxt = await store.history(user_id, limit, cursor)
        return OrdersPage(
            user_id=user_id,
            orders=[Order.model_validate(r) for r in rows],
            next=encode_cursor(nxt) if nxt is not None else None,
        )

    @router.get("/orders/{order_id}", response_model=Order, responses=_ORDER_ERRORS, tags=["orders"])
    async def order(request: Request, order_id: OrderId, caller: Caller, store: Db, epoch: Epoch = None) -> Order:
        """One order's latest state; only its owner or an operator may read it."""
        ref = await _owned_order(request, store, caller, order_id, epoch)
        row = await store.order(ref["user_id"], ref["epoch"], order_id)
        if row is None:
            # An event's rows are written concurrently: for a moment one table may have it and not another.
            raise HTTPException(404, detail="no such order")
        return Order.model_validate(row)

    @router.get("/orders/{order_id}/events", response_model=OrderEvents, responses=_ORDER_ERRORS, tags=["orders"])
    async def order_events(
        request: Request, order_id: OrderId, caller: Caller, store: Db, epoch: Epoch = None
    ) -> OrderEvents:
        """Every update of one order, in seq order."""
        ref = await _owned_order(request, store, caller, order_id, epoch)
        events = []
        for payload in await store.order_events(ref["epoch"], order_id):
            ev = decode(payload)
            if isinstance(ev, OrderUpdate):
                events.append(OrderEvent.model_validate(update_dict(ev)))
        return OrderEvents(epoch=ref["epoch"], order_id=order_id, events=events)

    @router.get("/users/{user_id}/stats", response_model=UserStatistics, responses=_ERRORS, tags=["orders"])
    async def statistics(request: Request, user_id: UserId, caller: Caller, store: Db) -> UserStatistics:
        """Counts per status, fills and filled volume, per symbol and for all symbols ('*')."""
        require_reader(request, caller, user_id)
        rows = await store.statistics(user_id)
        rows.sort(key=lambda r: (r["symbol"] != ALL_SYMBOLS, r["symbol"]))
        return UserStatistics(user_id=user_id, symbols=[SymbolStatistics.model_validate(r) for r in rows])

    return router
