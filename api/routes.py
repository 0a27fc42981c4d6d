"""The HTTP endpoints: thin handlers over ``api.store`` and ``api.query`` with authorization first.

Every id is bounded to a CQL bigint, every page size to the configured maximum and every cursor to
its fixed shape in the signature, so bad input is a 422 from validation before anything reaches
Cassandra, never a 500; and every input the OpenAPI document accepts is answered (no schema-valid
request is refused for its values).
"""

# No `from __future__ import annotations` here: FastAPI reads the signatures at runtime, and the page
# size bound in them comes from the settings, a local of build_router that a string annotation cannot name.

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, log_denial, require_principal, require_reader
from api.errors import StorageUnavailable
from api.models import (
    ActiveOrder,
    ActiveOrders,
    Error,
    FillsPage,
    Health,
    Order,
    OrderEvent,
    OrderEvents,
    OrdersPage,
    SymbolInfo,
    Symbols,
    SymbolStatistics,
    UserStatistics,
    fill_model,
    update_dict,
)
from api.query import (
    FILL_CURSOR,
    ORDER_CURSOR,
    Row,
    decode_fill_cursor,
    decode_order_cursor,
    scan_fills,
    scan_orders,
)
from api.settings import ApiSettings
from api.store import MAX_BIGINT, Store
from schemas.codec import CodecError, decode
from schemas.events import MAX_CLIENT_ORDER_ID, MAX_NAME, OrderStatus, OrderUpdate, Side
from schemas.tables import ALL_SYMBOLS

__all__ = ["SECURED", "build_router"]

log = logging.getLogger("ohs.api")

UserId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="The user's id.")]
OrderId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="Engine order id (unique within an epoch).")]
Epoch = Annotated[int | None, Query(ge=0, le=MAX_BIGINT, description="Engine epoch of the order; default: its newest.")]
Caller = Annotated[Principal, Depends(require_principal)]
SymbolFilter = Annotated[
    str | None, Query(min_length=1, max_length=MAX_NAME, description="Only this symbol (an unknown one: none).")
]
Since = Annotated[
    int | None,
    Query(
        alias="from", ge=0, le=MAX_BIGINT, description="Only from this time on (inclusive), ns since the Unix epoch."
    ),
]
Until = Annotated[
    int | None, Query(ge=0, le=MAX_BIGINT, description="Only before this time (exclusive), ns since the Unix epoch.")
]
Direction = Annotated[Literal["asc", "desc"], Query(description="desc: newest first (the default); asc: oldest first.")]
OrderCursorParam = Annotated[
    str | None,
    Query(pattern=ORDER_CURSOR, description="The `next` of the previous page; repeat the same filters with it."),
]
SECURED: dict[str, Any] = {"security": [{"bearer": []}]}
"""openapi_extra of the routes that need a token (the scheme is declared by ``api.app``)."""
_OPEN = {OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED}


def _error(description: str) -> dict[str, Any]:
    return {"model": Error, "description": description}


_401 = _error("Missing or invalid bearer token.")
_403 = _error("The token may not read this user's data.")
_422 = _error("Invalid parameters: which, and why, in `detail`.")
_503 = _error("Cassandra is unavailable (not connected yet, down or timing out): retry later.")
_USER_ERRORS: dict[int | str, dict[str, Any]] = {401: _401, 403: _403, 422: _422, 503: _503}
# No 403 on an order: to a user token, another user's order is as missing as an order that does not
# exist, so order ids (and their epochs) of other users cannot be probed.
_ORDER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _401,
    404: _error("No such order, or not the caller's."),
    422: _422,
    503: _503,
}
_CLIENT_ID_ERRORS: dict[int | str, dict[str, Any]] = {**_USER_ERRORS, 404: _error("No order with this client id.")}


def _store(request: Request) -> Store:
    store: Store | None = request.app.state.store
    if store is None:
        raise StorageUnavailable("not connected to Cassandra yet")
    return store


Db = Annotated[Store, Depends(_store)]


async def _owned_order(request: Request, store: Store, caller: Principal, order_id: int, epoch: int | None) -> Row:
    """The orders_by_id row of an order the caller may read; 404 if none or (for a user) not theirs."""
    ref = await store.order_ref(order_id, epoch)
    if ref is None:
        raise HTTPException(404, detail="no such order")
    if not caller.may_read(ref["user_id"]):
        # The same answer as a missing order, after the same single read: neither the status, the body
        # nor the work done tells a probing user that the id exists. The log still says whose it is.
        log_denial(404, request.url.path, caller, f"owner user:{ref['user_id']}")
        raise HTTPException(404, detail="no such order")
    return ref


def _order_cursor(cursor: str | None, before: str | None) -> tuple[int, int] | None:
    text = cursor if cursor is not None else before  # both given: `cursor`, the current name, wins
    return decode_order_cursor(text) if text is not None else None


def build_router(s: ApiSettings) -> APIRouter:
    """Every endpoint, bound to the settings (page size bounds, symbols, scan budget)."""
    router = APIRouter()
    _meta_routes(router, s)
    _user_order_routes(router, s)
    _order_routes(router, s)
    _trade_routes(router, s)
    return router


def _meta_routes(router: APIRouter, s: ApiSettings) -> None:
    """/health and /symbols: no token."""
    decimals = s.decimals()
    symbols = Symbols(
        symbols=[
            SymbolInfo(
                symbol=spec.name,
                base=spec.base,
                quote=spec.quote,
                tick_size=spec.tick_size,
                lot_size=spec.lot_size,
                price_decimals=decimals.get(spec.name, (0, 0))[0],
                qty_decimals=decimals.get(spec.name, (0, 0))[1],
            )
            for spec in s.symbol_specs()
        ]
    )

    @router.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready: Cassandra does not answer."}},
        tags=["ops"],
    )
    async def health(request: Request) -> Health | JSONResponse:
        """Liveness and readiness: 503 while Cassandra does not answer. No authentication, so it tells
        states only, no versions or counts."""
        store: Store | None = request.app.state.store
        ready = False
        if store is not None:
            try:
                await store.ping()
                ready = True
            except Exception as exc:  # whatever the driver raises, the answer is "not ready"
                log.warning("health: Cassandra did not answer: %r", exc)
        body = Health(
            status="ok" if ready else "unavailable", cassandra=ready, live_tail=request.app.state.tail.connected
        )
        return body if ready else JSONResponse(body.model_dump(), status_code=503)

    @router.get("/symbols", response_model=Symbols, tags=["reference"])
    async def list_symbols() -> Symbols:
        """The engine's symbols (OHS_ENGINE_SYMBOLS, given to the API too) with their tick and lot sizes
        and display decimals, so clients can render integer prices and quantities. No token needed."""
        return symbols


def _user_order_routes(router: APIRouter, s: ApiSettings) -> None:
    """A user's orders: open ones, the history with its filters, one by client id, the statistics."""
    Limit = Annotated[int, Query(ge=1, le=s.page_size_max, description="Items per page.")]

    @router.get(
        "/users/{user_id}/orders/active",
        response_model=ActiveOrders,
        responses=_USER_ERRORS,
        tags=["orders"],
        openapi_extra=SECURED,
    )
    async def active_orders(
        request: Request,
        user_id: UserId,
        caller: Caller,
        store: Db,
        symbol: SymbolFilter = None,
        limit: Limit = s.page_size_default,
        cursor: OrderCursorParam = None,
    ) -> ActiveOrders:
        """The user's open orders (NEW or PARTIALLY_FILLED), newest first, a page at a time."""
        require_reader(request, caller, user_id)
        page = await scan_orders(
            store, "active_orders", user_id, limit=limit, desc=True, cursor=_order_cursor(cursor, None),
            since_ns=None, until_ns=None, match=None if symbol is None else (lambda r: r["symbol"] == symbol),
            scan_max=s.scan_max,
        )  # fmt: skip
        return ActiveOrders(user_id=user_id, orders=[ActiveOrder.model_validate(r) for r in page.rows], next=page.next)

    @router.get(
        "/users/{user_id}/orders",
        response_model=OrdersPage,
        responses=_USER_ERRORS,
        tags=["orders"],
        openapi_extra=SECURED,
    )
    async def order_history(
        request: Request,
        user_id: UserId,
        caller: Caller,
        store: Db,
        limit: Limit = s.page_size_default,
        cursor: OrderCursorParam = None,
        before: Annotated[
            str | None, Query(pattern=ORDER_CURSOR, deprecated=True, description="The former name of `cursor`.")
        ] = None,
        symbol: SymbolFilter = None,
        side: Annotated[Side | None, Query(description="Only this side.")] = None,
        status: Annotated[
            list[OrderStatus] | None, Query(description="Only these statuses (repeat the parameter for several).")
        ] = None,
        since: Since = None,
        to: Until = None,
        order: Direction = "desc",
    ) -> OrdersPage:
        """The user's orders in creation order, latest state each; follow `next` for more.

        `from`/`to` bound the creation time (a position in the user's orders, found by bisection);
        `symbol`, `side` and `status` filter the rows of that range, reading at most OHS_API_SCAN_MAX rows
        per page. Only open statuses: read from the (small) open orders instead."""
        require_reader(request, caller, user_id)
        statuses = {st.value for st in status} if status else None
        table = "active_orders" if status and set(status) <= _OPEN else "order_history"
        match = None
        if symbol is not None or side is not None or statuses is not None:

            def match(r: Row) -> bool:
                return (
                    (symbol is None or r["symbol"] == symbol)
                    and (side is None or r["side"] == side.value)
                    and (statuses is None or r["status"] in statuses)
                )

        page = await scan_orders(
            store, table, user_id, limit=limit, desc=order == "desc", cursor=_order_cursor(cursor, before),
            since_ns=since, until_ns=to, match=match, scan_max=s.scan_max,
        )  # fmt: skip
        # An open order's row in active_orders lacks `reason`: it is NONE while the order is open.
        return OrdersPage(
            user_id=user_id,
            orders=[Order.model_validate({"reason": "NONE", **r}) for r in page.rows],
            next=page.next,
        )

    @router.get(
        "/users/{user_id}/orders/by-client-id/{client_order_id}",
        response_model=Order,
        responses=_CLIENT_ID_ERRORS,
        tags=["orders"],
        openapi_extra=SECURED,
    )
    async def order_by_client_id(
        request: Request,
        user_id: UserId,
        client_order_id: Annotated[
            str, Path(min_length=1, max_length=MAX_CLIENT_ORDER_ID, description="The client's own id of the order.")
        ],
        caller: Caller,
        store: Db,
    ) -> Order:
        """The newest order the user placed with this client_order_id (the engine refuses an id only while
        an order with it is open, so it may have named older ones too)."""
        require_reader(request, caller, user_id)
        try:
            client_order_id.encode()
        except UnicodeEncodeError:  # lone surrogates from a percent-decoded path: no order has that id
            raise HTTPException(404, detail="no such order") from None
        row = await store.order_by_client_id(user_id, client_order_id)
        if row is None:
            raise HTTPException(404, detail="no such order")
        return Order.model_validate(row)

    @router.get(
        "/users/{user_id}/stats",
        response_model=UserStatistics,
        responses=_USER_ERRORS,
        tags=["orders"],
        openapi_extra=SECURED,
    )
    async def statistics(request: Request, user_id: UserId, caller: Caller, store: Db) -> UserStatistics:
        """Counts per status, fills and filled volume, per symbol and for all symbols ('*')."""
        require_reader(request, caller, user_id)
        rows = await store.statistics(user_id)
        rows.sort(key=lambda r: (r["symbol"] != ALL_SYMBOLS, r["symbol"]))
        return UserStatistics(user_id=user_id, symbols=[SymbolStatistics.model_validate(r) for r in rows])


def _order_routes(router: APIRouter, s: ApiSettings) -> None:
    """One order by id, and its events: to its owner or an operator (anyone else: 404)."""

    @router.get(
        "/orders/{order_id}", response_model=Order, responses=_ORDER_ERRORS, tags=["orders"], openapi_extra=SECURED
    )
    async def order(request: Request, order_id: OrderId, caller: Caller, store: Db, epoch: Epoch = None) -> Order:
        """One order's latest state; only its owner or an operator may read it (anyone else: 404)."""
        ref = await _owned_order(request, store, caller, order_id, epoch)
        row = await store.order(ref["user_id"], ref["epoch"], order_id)
        if row is None:
            # An event's rows are written concurrently: for a moment one table may have it and not another.
            raise HTTPException(404, detail="no such order")
        return Order.model_validate(row)

    @router.get(
        "/orders/{order_id}/events",
        response_model=OrderEvents,
        responses=_ORDER_ERRORS,
        tags=["orders"],
        openapi_extra=SECURED,
    )
    async def order_events(
        request: Request, order_id: OrderId, caller: Caller, store: Db, epoch: Epoch = None
    ) -> OrderEvents:
        """Every update of one order, in seq order."""
        ref = await _owned_order(request, store, caller, order_id, epoch)
        events = []
        for payload in await store.order_events(ref["user_id"], ref["epoch"], order_id):
            try:
                ev = decode(payload)
            except CodecError as exc:  # the worker stores only what it decoded: not expected, never a 500
                log.error("order %d: undecodable stored event: %s", order_id, exc.reason)
                continue
            if isinstance(ev, OrderUpdate):
                events.append(OrderEvent.model_validate(update_dict(ev)))
        return OrderEvents(epoch=ref["epoch"], order_id=order_id, events=events)


def _trade_routes(router: APIRouter, s: ApiSettings) -> None:
    """A user's fills."""
    Limit = Annotated[int, Query(ge=1, le=s.page_size_max, description="Items per page.")]
    specs = {spec.name: spec for spec in s.symbol_specs()}

    @router.get(
        "/users/{user_id}/trades",
        response_model=FillsPage,
        responses=_USER_ERRORS,
        tags=["trades"],
        openapi_extra=SECURED,
    )
    async def trades(
        request: Request,
        user_id: UserId,
        caller: Caller,
        store: Db,
        limit: Limit = s.page_size_default,
        cursor: Annotated[
            str | None,
            Query(pattern=FILL_CURSOR, description="The `next` of the previous page; repeat the same filters with it."),
        ] = None,
        symbol: SymbolFilter = None,
        order_id: Annotated[
            int | None, Query(ge=1, le=MAX_BIGINT, description="Only the fills of this order (its newest epoch).")
        ] = None,
        since: Since = None,
        to: Until = None,
        order: Direction = "desc",
    ) -> FillsPage:
        """The user's fills (their side of each trade), by trade time; follow `next` for more.

        `from`/`to` bound the trade time (a slice of each month's partition); `symbol` and `order_id`
        filter, reading at most OHS_API_SCAN_MAX rows per page (an order's fills are looked for between
        its creation and its last update)."""
        require_reader(request, caller, user_id)
        match = None
        if order_id is not None:
            ref = await store.order_ref(order_id, None)
            window = None if ref is None or ref["user_id"] != user_id else await store.order_window(
                user_id, ref["epoch"], order_id
            )  # fmt: skip
            if ref is None or window is None:
                return FillsPage(user_id=user_id, fills=[], next=None)
            since = max(since or 0, window["created_ns"])
            to = min(to if to is not None else MAX_BIGINT, window["updated_ns"] + 1)
            epoch = ref["epoch"]

            def match(r: Row) -> bool:
                return r["order_id"] == order_id and r["epoch"] == epoch and (symbol is None or r["symbol"] == symbol)

        elif symbol is not None:

            def match(r: Row) -> bool:
                return bool(r["symbol"] == symbol)

        page = await scan_fills(
            store, user_id, limit=limit, desc=order == "desc",
            cursor=decode_fill_cursor(cursor) if cursor is not None else None,
            since_ns=since, until_ns=to, match=match, scan_max=s.scan_max,
        )  # fmt: skip
        return FillsPage(user_id=user_id, fills=[fill_model(r, specs) for r in page.rows], next=page.next)
