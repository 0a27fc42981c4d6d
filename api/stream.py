"""``WS /users/{user_id}/stream?from_seq=N[&from_epoch=E]``: a user's order updates as they happen.

Each message is one OrderUpdate as a JSON object (``epoch`` and ``seq``
included), in (epoch, seq) order, each at most once per connection. A client
that reconnects with ``from_seq`` = the last seq it received (and
``from_epoch`` = its epoch, to be exact across an engine epoch change;
without it the cursor is taken in the newest epoch the user has events in)
misses nothing:

1. the subscriber is registered with the live tail first, buffering;
2. the user's ``user_updates`` partitions are walked back from today (UTC)
   until one starts at or before the cursor, or the lookback ends, and every
   stored event after the cursor is sent, oldest first;
3. then the buffered and live events after the last one sent.

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
from collections.abc import AsyncIterator

from fastapi import WebSocket, WebSocketDisconnect

from api.auth import authenticate, bearer_token, decide, log_denial
from api.live import Hub, LiveEvent, Subscriber
from api.settings import ApiSettings
from api.store import MAX_BIGINT, Cursor, Store
from engine.events import OrderUpdate
from schemas.codec import decode

__all__ = ["replay", "resume_point", "stream_endpoint"]

log = logging.getLogger("ohs.api")

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
_REPLAY_PAGE = 500
_READY_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 5.0


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


async def replay(store: Store, user_id: int, cursor: Cursor, days: list[dt.date]) -> AsyncIterator[LiveEvent]:
    """The user's stored events after ``cursor`` on ``days`` (oldest first), in (epoch, seq) order."""
    for day in days:
        after = cursor
        while True:
            rows = await store.user_updates_after(user_id, day, after, _REPLAY_PAGE)
            for row in rows:
                ev = decode(row["payload"])
                if isinstance(ev, OrderUpdate):
                    yield LiveEvent.of(ev)
            if len(rows) < _REPLAY_PAGE:
                break
            after = (rows[-1]["epoch"], rows[-1]["seq"])


async def _send(ws: WebSocket, ev: LiveEvent) -> None:
    await ws.send_text(json.dumps(ev.data, separators=(",", ":")))


async def _pump(
    ws: WebSocket, sub: Subscriber, store: Store, s: ApiSettings, from_seq: int | None, from_epoch: int | None
) -> None:
    last: Cursor | None = None
    if from_seq is not None:
        today = dt.datetime.now(dt.UTC).date()
        last, days = await resume_point(store, sub.user_id, from_seq, from_epoch, s.stream_lookback_days, today)
        async for ev in replay(store, sub.user_id, last, days):
            await _send(ws, ev)
            last = ev.position
    while True:
        ev = await sub.queue.get()
        # Kafka may hold a re-sent event twice, and the backfill may have sent what is buffered.
        if last is not None and ev.position <= last:
            continue
        await _send(ws, ev)
        last = ev.position


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
    store: Store = app.state.store
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
        raw_seq, raw_epoch = ws.query_params.get("from_seq"), ws.query_params.get("from_epoch")
        from_seq = None if raw_seq is None else _int_param(raw_seq, "from_seq", 0)
        from_epoch = None if raw_epoch is None else _int_param(raw_epoch, "from_epoch", 0)
    except ValueError as exc:
        await _close(ws, CLOSE_POLICY, str(exc))
        return
    if decide(principal, owner) is not None:
        log_denial(403, path, principal, f"owner user:{owner}")
        await _close(ws, CLOSE_FORBIDDEN, "forbidden")
        return

    try:
        await asyncio.wait_for(hub.ready.wait(), _READY_TIMEOUT_S)
    except TimeoutError:
        await _close(ws, CLOSE_TRY_AGAIN, "live stream not ready, retry")
        return
    sub = hub.subscribe(owner)  # before the backfill: see the module docstring
    tasks = {
        asyncio.create_task(_pump(ws, sub, store, s, from_seq, from_epoch)),
        asyncio.create_task(_drain_client(ws)),
    }
    overflow = asyncio.create_task(sub.overflowed.wait())
    try:
        done, _ = await asyncio.wait({*tasks, overflow}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.unsubscribe(sub)
        for task in (*tasks, overflow):
            task.cancel()
        await asyncio.gather(*tasks, overflow, return_exceptions=True)
    if overflow in done:
        log.info("stream user:%d closed: the client fell %d events behind", owner, s.stream_queue_size)
        await _close(ws, CLOSE_TRY_AGAIN, "too slow: reconnect with from_seq")
        return
    for task in done:
        error = task.exception()
        if error is not None and not isinstance(error, WebSocketDisconnect | OSError):
            log.error("stream user:%d failed", owner, exc_info=error)
            await _close(ws, CLOSE_INTERNAL, "internal error, reconnect with from_seq")
