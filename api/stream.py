"""``WS /users/{user_id}/stream?kind=orders|fills|both&from_seq=N[&from_epoch=E]&fills_from_seq=N...``:
a user's order updates and fills as they happen.

``kind`` chooses what is sent: order updates (the default), fills, or both. A trade's fills for the
user (one, or two for a self-trade) are one message ``{"type": "fills", "epoch", "seq", "fills"}``,
each fill as ``GET /users/{user_id}/trades`` shows it. Each kind has its own cursor, ``from_seq`` /
``from_epoch`` for order updates and ``fills_from_seq`` / ``fills_from_epoch`` for fills: the two
come from two topics with two commits, so they are each in order but not ordered with each other.
Everything below holds for each kind on its own.

Each message is one OrderUpdate as a JSON object (``epoch`` and ``seq``
included), in (epoch, seq) order, each at most once per connection. A client
that reconnects with ``from_seq`` = the last seq it received (and
``from_epoch`` = its epoch, to be exact across an engine epoch change;
without it the cursor is taken in the newest epoch the user has events in)
misses nothing:

1. the subscriber is registered with the live tail first, buffering;
2. the user's ``user_updates`` partitions are walked back from today (UTC)
   until one starts at or before the cursor, or the lookback ends, and the
   stored events after the cursor are sent, oldest first, up to the first
   hole in the user's ``user_seq`` (``OrderStream`` says why);
3. then the buffered and live events after the last one sent (and what lay
   past a hole, once it is known to be final).

``api.live`` explains why an event is either in step 2 or in step 3.

Browsers cannot set headers on a WebSocket, so the token may come as
``?token=``; denials close with 4401/4403 (after accepting: a close code can
only be sent on an open WebSocket) and are logged without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from api.auth import authenticate, bearer_token, decide, log_denial
from api.errors import StorageUnavailable
from api.live import FILLS, ORDERS, Hub, LiveEvent, Subscriber
from api.metrics import A
from api.models import fill_model
from api.settings import ApiSettings
from api.store import MAX_BIGINT, Cursor, Store
from schemas.codec import CodecError, decode
from schemas.events import OrderUpdate
from schemas.symbols import SymbolSpec
from schemas.tables import month_of

__all__ = ["OrderStream", "replay_fills", "resume_point", "stream_endpoint"]

log = logging.getLogger("ohs.api")

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
_REPLAY_PAGE = 500
_READY_TIMEOUT_S = 10.0
_HOLE_RECHECK_S = 0.5
"""While a hole holds the backfill back and nothing live arrives: how often the store is read again."""
_CLOSE_TIMEOUT_S = 5.0
_KINDS = {"orders": frozenset({ORDERS}), "fills": frozenset({FILLS}), "both": frozenset({ORDERS, FILLS})}


def _int_param(raw: str, name: str, low: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not low <= value <= MAX_BIGINT:
        raise ValueError(f"{name} must be between {low} and {MAX_BIGINT}")
    return value


async def resume_point(
    store: Store, user_id: int, from_seq: int, from_epoch: int | None, lookback_days: int, today: dt.date
) -> tuple[Cursor, list[dt.date]]:
    """(cursor, days to replay oldest first). Days are walked newest first from tomorrow (an engine
    clock slightly ahead of ours files events there) until one starts at or before the cursor."""
    epoch = from_epoch
    walked: list[dt.date] = []
    for back in range(-1, lookback_days):
        day = today - dt.timedelta(days=back)
        walked.append(day)
        first = await store.user_update_first(user_id, day)
        if first is None:
            continue
        if epoch is None:
            epoch = (await store.user_update_last(user_id, day) or first)[0]
        if first <= (epoch, from_seq):
            break
    else:
        if from_seq > 0 and epoch is not None:
            # The client's cursor is older than anything kept for streams: events may be missing for it.
            log.info("stream user:%d from_seq=%d: older than the %d-day lookback", user_id, from_seq, lookback_days)
    # No stored event at all: every event that comes is after the client's cursor, whatever its epoch.
    return (epoch if epoch is not None else 0, from_seq), walked[::-1]


async def replay_fills(
    store: Store, user_id: int, cursor: Cursor, since_ns: int, specs: dict[str, SymbolSpec]
) -> AsyncIterator[LiveEvent]:
    """The user's stored fills after ``cursor`` from ``since_ns`` on, one message per trade, in (epoch, seq)
    order (the engine's time never decreases along seqs: time order is seq order)."""
    group: list[dict[str, Any]] = []
    at: Cursor = (-1, -1)
    for month in sorted(m for m in await store.trade_months(user_id) if m >= month_of(since_ns)):
        after: tuple[int, int, int, str] = (since_ns, -1, -1, "")
        while True:
            rows = await store.fill_rows(user_id, month, False, after, _REPLAY_PAGE)
            for row in rows:
                pos = (row["epoch"], row["seq"])
                if pos <= cursor:
                    continue
                if pos != at and group:
                    yield LiveEvent.fills(user_id, *at, group)
                    group = []
                at = pos
                group.append(fill_model(row, specs).model_dump(mode="json"))
            if len(rows) < _REPLAY_PAGE:
                break
            last = rows[-1]
            after = (last["ts_ns"], last["epoch"], last["seq"], last["liquidity"])
    if group:
        yield LiveEvent.fills(user_id, *at, group)


Send = Callable[[LiveEvent], Awaitable[None]]


class OrderStream:
    """The order-updates half of one stream: the stored updates after the cursor, then the live ones,
    each once, in (epoch, seq) order, with no gap.

    Why a hole stops the backfill. The worker writes a batch as several concurrent requests and
    commits its offsets once all of them are durable, so for a moment Cassandra can hold a user's
    later update while an earlier one of the same batch is still on its way. Sending that later
    update would skip the earlier one for good: it is released by the live tail after this
    subscriber registered, and dropped as older than what was sent. ``user_seq`` counts a user's
    updates gaplessly within an epoch, so the backfill sends a stored update only when the one
    before it was sent (or is the cursor's), and stops at the first hole. What lies past it is sent
    when it is known to be final:

    * a live update arrives: the tail released it, so the worker committed everything before it in
      its partition, which holds all of the user's updates: every stored update before it is final,
      and a hole still there is permanent (a dead-lettered update). They are sent first, then it;
    * the user is idle: the store is read again every ``_HOLE_RECHECK_S``; a filled hole lets the
      backfill go on, and one still open after ``hole_wait_s`` is taken as permanent (logged).

    Updates without a ``user_seq`` (written before the field) and a cursor with no stored update at
    or before it give no base to check against: the next update is taken as it is."""

    def __init__(
        self,
        store: Store,
        user_id: int,
        cursor: Cursor,
        first_day: dt.date,
        hole_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.user_id, self.hole_wait_s, self.clock = store, user_id, hole_wait_s, clock
        self.last: Cursor = cursor
        """Position of the last update sent, or the cursor."""
        self.day = first_day
        """The oldest day partition that may still hold an update after ``last``."""
        self.base: tuple[int, int] | None = None
        """(epoch, user_seq) of the update at ``last``, when known."""
        self.hole: tuple[int, int] | None = None
        """The base at which a hole stopped the backfill, while it does."""
        self._hole_since = 0.0

    @property
    def held(self) -> bool:
        return self.hole is not None

    async def start(self, send: Send) -> None:
        """The backfill: find the base, then send what is stored after the cursor, up to a hole."""
        row = await self.store.user_update_at_or_before(self.user_id, self.day, self.last)
        ev = _decode_row(self.user_id, row) if row is not None else None
        if ev is not None and ev.user_seq:
            self.base = (ev.epoch, ev.user_seq)
        await self._stored(send, until=None, final=False)

    async def live(self, ev: LiveEvent, send: Send) -> None:
        """A live update, released by the tail (the queue hands them over in order)."""
        if ev.position <= self.last:
            return  # Kafka may hold a re-sent event twice, and the backfill may have sent it
        if self.hole is not None:
            await self._stored(send, until=ev.position, final=True)
            self.hole = None
        await send(ev)
        self._sent(ev.epoch, ev.seq, int(ev.data.get("user_seq") or 0))

    async def idle(self, send: Send) -> None:
        """Nothing live came for a while: read the store again past a hole (see the class)."""
        if self.hole is None:
            return
        final = self.clock() - self._hole_since >= self.hole_wait_s
        if final:
            epoch, n = self.hole
            log.warning(
                "stream user:%d: user_seq %d of epoch %d still missing after %.0f s: sending what follows it "
                "(a dead-lettered update?)",
                self.user_id,
                n + 1,
                epoch,
                self.hole_wait_s,
            )
            self.hole = None
        await self._stored(send, until=None, final=final)

    async def _stored(self, send: Send, until: Cursor | None, final: bool) -> None:
        """Send the stored updates after ``last`` (before ``until``, if given), stopping at a hole
        unless ``final``. Days run from ``day`` to tomorrow (an engine clock slightly ahead of ours
        files updates there)."""
        last_day = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
        while True:
            after = self.last
            while True:
                rows = await self.store.user_updates_after(self.user_id, self.day, after, _REPLAY_PAGE)
                for row in rows:
                    after = (row["epoch"], row["seq"])
                    if until is not None and after >= until:
                        return
                    ev = _decode_row(self.user_id, row)
                    if ev is None:
                        continue
                    if not final and self._hole_before(ev):
                        if self.hole != self.base:
                            self.hole, self._hole_since = self.base, self.clock()
                        return
                    await send(LiveEvent.of(ev))
                    self._sent(ev.epoch, ev.seq, ev.user_seq)
                if len(rows) < _REPLAY_PAGE:
                    break
            if self.day >= last_day:
                self.hole = None
                return
            self.day += dt.timedelta(days=1)

    def _hole_before(self, ev: OrderUpdate) -> bool:
        if not ev.user_seq or self.base is None:
            return False
        epoch, n = self.base
        if ev.epoch == epoch:
            return ev.user_seq != n + 1
        return ev.epoch > epoch and ev.user_seq != 1

    def _sent(self, epoch: int, seq: int, user_seq: int) -> None:
        self.last = (epoch, seq)
        self.base = (epoch, user_seq) if user_seq else None


def _decode_row(user_id: int, row: dict[str, Any]) -> OrderUpdate | None:
    try:
        ev = decode(row["payload"])
    except CodecError as exc:  # the worker stores only what it decoded: not expected
        log.error("user:%d: undecodable stored event %s: %s", user_id, row["seq"], exc.reason)
        return None
    return ev if isinstance(ev, OrderUpdate) else None


async def _send(ws: WebSocket, ev: LiveEvent) -> None:
    await ws.send_text(json.dumps(ev.data, separators=(",", ":")))


@dataclass(frozen=True)
class _Resume:
    from_seq: int | None
    from_epoch: int | None
    fills_from_seq: int | None
    fills_from_epoch: int | None


async def _pump(ws: WebSocket, sub: Subscriber, store: Store, s: ApiSettings, r: _Resume) -> None:
    last: dict[str, Cursor | None] = {ORDERS: None, FILLS: None}
    today = dt.datetime.now(dt.UTC).date()

    async def send(ev: LiveEvent) -> None:
        await _send(ws, ev)

    orders: OrderStream | None = None
    if ORDERS in sub.kinds and r.from_seq is not None:
        cursor, days = await resume_point(store, sub.user_id, r.from_seq, r.from_epoch, s.stream_lookback_days, today)
        orders = OrderStream(store, sub.user_id, cursor, days[0], s.stream_hole_wait_s)
        await orders.start(send)
    if FILLS in sub.kinds and r.fills_from_seq is not None:
        # The user's order updates locate the cursor in time (every fill comes with updates of its order,
        # at the same engine time): its fills are on or after the first day walked.
        cursor, days = await resume_point(
            store, sub.user_id, r.fills_from_seq, r.fills_from_epoch, s.stream_lookback_days, today
        )
        last[FILLS] = cursor
        since = int(dt.datetime.combine(days[0], dt.time(), dt.UTC).timestamp()) * 10**9
        async for ev in replay_fills(store, sub.user_id, cursor, since, _specs(s)):
            await _send(ws, ev)
            last[FILLS] = ev.position
    while True:
        if orders is not None and orders.held:
            try:
                ev = await asyncio.wait_for(sub.queue.get(), _HOLE_RECHECK_S)
            except TimeoutError:
                await orders.idle(send)
                continue
        else:
            ev = await sub.queue.get()
        if orders is not None and ev.kind == ORDERS:
            await orders.live(ev, send)
            continue
        # Kafka may hold a re-sent event twice, and the backfill may have sent what is buffered.
        seen = last[ev.kind]
        if seen is not None and ev.position <= seen:
            continue
        await _send(ws, ev)
        last[ev.kind] = ev.position


def _specs(s: ApiSettings) -> dict[str, SymbolSpec]:
    return {spec.name: spec for spec in s.symbol_specs()}


async def _drain_client(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends: the only way to notice it has gone while idle."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    # A client that stopped reading leaves the close frame stuck behind a full send buffer.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason), _CLOSE_TIMEOUT_S)


async def stream_endpoint(ws: WebSocket, user_id: str) -> None:
    app = ws.app
    s: ApiSettings = app.state.settings
    hub: Hub = app.state.hub
    path = ws.url.path
    await ws.accept()

    token = bearer_token(ws.headers.get("authorization")) or ws.query_params.get("token") or None
    principal = authenticate(app.state.tokens, token)
    if principal is None:
        log_denial(401, path, None, "no token" if token is None else "unknown token")
        await _close(ws, CLOSE_UNAUTHENTICATED, "missing or invalid token")
        return
    try:
        owner = _int_param(user_id, "user_id", 1)
        q = ws.query_params
        cursors = {
            name: None if q.get(name) is None else _int_param(q[name], name, 0)
            for name in ("from_seq", "from_epoch", "fills_from_seq", "fills_from_epoch")
        }
        kinds = _KINDS.get(q.get("kind", "orders"))
        if kinds is None:
            raise ValueError("kind must be orders, fills or both")
        if ORDERS not in kinds and cursors["from_seq"] is not None:
            raise ValueError("from_seq is the order updates' cursor: fills resume from fills_from_seq")
        resume = _Resume(**cursors)
    except ValueError as exc:
        await _close(ws, CLOSE_POLICY, str(exc))
        return
    if decide(principal, owner) is not None:
        log_denial(403, path, principal, f"owner user:{owner}")
        await _close(ws, CLOSE_FORBIDDEN, "forbidden")
        return

    store: Store | None = app.state.store
    if store is None:
        await _close(ws, CLOSE_TRY_AGAIN, "storage unavailable, retry")
        return
    try:
        await asyncio.wait_for(hub.ready.wait(), _READY_TIMEOUT_S)
    except TimeoutError:
        await _close(ws, CLOSE_TRY_AGAIN, "live stream not ready, retry")
        return
    sub = hub.subscribe(owner, kinds)  # before the backfill: see the module docstring
    A.ws_subscribers.inc()
    tasks = {
        asyncio.create_task(_pump(ws, sub, store, s, resume)),
        asyncio.create_task(_drain_client(ws)),
    }
    overflow = asyncio.create_task(sub.overflowed.wait())
    try:
        done, _ = await asyncio.wait({*tasks, overflow}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.unsubscribe(sub)
        A.ws_subscribers.dec()
        for task in (*tasks, overflow):
            task.cancel()
        await asyncio.gather(*tasks, overflow, return_exceptions=True)
    if overflow in done:
        log.info("stream user:%d closed: the client fell %d events behind", owner, s.stream_queue_size)
        await _close(ws, CLOSE_TRY_AGAIN, "too slow: reconnect with from_seq")
        return
    for task in done:
        error = task.exception()
        if isinstance(error, StorageUnavailable):
            log.info("stream user:%d closed: %s", owner, error)
            await _close(ws, CLOSE_TRY_AGAIN, "storage unavailable, reconnect with from_seq")
        elif error is not None and not isinstance(error, WebSocketDisconnect | OSError):
            log.error("stream user:%d failed", owner, exc_info=error)
            await _close(ws, CLOSE_INTERNAL, "internal error, reconnect with from_seq")
