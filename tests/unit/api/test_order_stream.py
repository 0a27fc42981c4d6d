"""``api.stream.OrderStream``: a resumed stream never skips an update the worker is still writing.

The worker writes a batch as concurrent requests and commits once all are durable, so the store
can briefly hold a user's later update without an earlier one. The backfill must stop at that
hole (``user_seq``), and send what lies past it once it is final: when a later update is released
live, when a re-read finds the hole filled, or after ``hole_wait_s``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from api.live import LiveEvent
from api.stream import OrderStream
from schemas.codec import encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce

EPOCH = 100
TODAY = dt.datetime.now(dt.UTC).date()


def _update(seq: int, user_seq: int, epoch: int = EPOCH) -> OrderUpdate:
    return OrderUpdate(
        epoch=epoch, seq=seq, ts_ns=seq, order_id=seq, client_order_id="", user_id=1, symbol="BTC-USD",
        side=Side.BUY, order_type=OrderType.LIMIT, time_in_force=TimeInForce.GTC, price=100, qty=2,
        quote_budget=0, filled_qty=0, remaining_qty=2, quote_filled=0, status=OrderStatus.NEW,
        reason=RejectReason.NONE, last_fill_qty=0, last_fill_price=0, trade_id=0, created_ns=40, updated_ns=40,
        expire_ns=0, user_seq=user_seq,
    )  # fmt: skip


class UpdatesTwin:
    """user_updates of one user, one day partition per date, in (epoch, seq) order, with LIMIT."""

    def __init__(self) -> None:
        self.days: dict[dt.date, dict[tuple[int, int], bytes]] = {}

    def store(self, ev: OrderUpdate, day: dt.date = TODAY) -> None:
        self.days.setdefault(day, {})[(ev.epoch, ev.seq)] = encode(ev)

    async def user_update_at_or_before(self, user_id: int, day: dt.date, at: tuple[int, int]) -> dict[str, Any] | None:
        rows = sorted(k for k in self.days.get(day, {}) if k <= at)
        return None if not rows else self._row(day, rows[-1])

    async def user_updates_after(
        self, user_id: int, day: dt.date, after: tuple[int, int], limit: int
    ) -> list[dict[str, Any]]:
        keys = sorted(k for k in self.days.get(day, {}) if k > after)[:limit]
        return [self._row(day, k) for k in keys]

    def _row(self, day: dt.date, key: tuple[int, int]) -> dict[str, Any]:
        return {"epoch": key[0], "seq": key[1], "payload": self.days[day][key]}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stream(store: UpdatesTwin, cursor: tuple[int, int], clock: Clock | None = None) -> tuple[OrderStream, list[int]]:
    stream = OrderStream(store, 1, cursor, TODAY, hole_wait_s=30.0, clock=clock or Clock())  # type: ignore[arg-type]
    return stream, []


def _sender(out: list[int]) -> Any:
    async def send(ev: LiveEvent) -> None:
        out.append(ev.seq)

    return send


def test_the_backfill_sends_everything_after_the_cursor_when_nothing_is_missing() -> None:
    store = UpdatesTwin()
    for n in range(1, 6):
        store.store(_update(10 * n, n))
    stream, sent = _stream(store, (EPOCH, 20))
    asyncio.run(stream.start(_sender(sent)))
    assert sent == [30, 40, 50] and not stream.held


def test_a_hole_stops_the_backfill_and_a_live_update_sends_what_is_final_first() -> None:
    store = UpdatesTwin()
    for n in (1, 2, 4, 5):  # user_seq 3 (seq 30) is still being written
        store.store(_update(10 * n, n))
    stream, sent = _stream(store, (EPOCH, 10))
    send = _sender(sent)

    async def run() -> None:
        await stream.start(send)
        assert sent == [20] and stream.held
        store.store(_update(30, 3))  # written, and the batch committed: released live, in order
        for n in (3, 4, 5, 6):
            await stream.live(LiveEvent.of(_update(10 * n, n)), send)

    asyncio.run(run())
    assert sent == [20, 30, 40, 50, 60] and not stream.held


def test_a_permanent_hole_is_passed_when_a_later_update_is_released() -> None:
    """A dead-lettered update never comes: the release of a later one proves everything before it final."""
    store = UpdatesTwin()
    for n in (1, 2, 4, 5):
        store.store(_update(10 * n, n))
    stream, sent = _stream(store, (EPOCH, 0))
    send = _sender(sent)

    async def run() -> None:
        await stream.start(send)
        assert sent == [10, 20] and stream.held
        await stream.live(LiveEvent.of(_update(60, 6)), send)

    asyncio.run(run())
    assert sent == [10, 20, 40, 50, 60]


def test_an_idle_user_gets_the_rest_once_the_hole_fills_or_after_the_wait() -> None:
    store = UpdatesTwin()
    for n in (1, 3, 5):
        store.store(_update(10 * n, n))
    clock = Clock()
    stream, sent = _stream(store, (EPOCH, 10), clock)
    send = _sender(sent)

    async def run() -> None:
        await stream.start(send)
        assert sent == [] and stream.held
        await stream.idle(send)
        assert sent == []  # still missing, and not for long yet
        store.store(_update(20, 2))  # filled: the backfill goes on up to the next hole
        clock.now = 1.0
        await stream.idle(send)
        assert sent == [20, 30] and stream.held
        clock.now = 20.0
        await stream.idle(send)
        assert sent == [20, 30]  # a new hole: its own wait started at 1.0
        clock.now = 31.5
        await stream.idle(send)  # given up on: taken as permanent
        assert sent == [20, 30, 50] and not stream.held

    asyncio.run(run())


def test_duplicates_and_old_updates_are_never_sent_twice() -> None:
    store = UpdatesTwin()
    for n in (1, 2, 3):
        store.store(_update(10 * n, n))
    stream, sent = _stream(store, (EPOCH, 0))
    send = _sender(sent)

    async def run() -> None:
        await stream.start(send)
        for n in (2, 3, 3, 4, 4):
            await stream.live(LiveEvent.of(_update(10 * n, n)), send)

    asyncio.run(run())
    assert sent == [10, 20, 30, 40]


def test_a_new_epoch_starts_at_user_seq_1_and_a_cursor_without_base_takes_the_first_update() -> None:
    store = UpdatesTwin()
    store.store(_update(50, 7))  # no update at or before the cursor is stored: no base to check against
    store.store(_update(60, 8))
    store.store(_update(1, 1, epoch=EPOCH + 1))
    store.store(_update(3, 3, epoch=EPOCH + 1))  # user_seq 2 of the new epoch is missing
    stream, sent = _stream(store, (EPOCH, 40))
    asyncio.run(stream.start(_sender(sent)))
    assert sent == [50, 60, 1] and stream.held


def test_the_backfill_walks_the_day_partitions_up_to_tomorrow() -> None:
    store = UpdatesTwin()
    yesterday, tomorrow = TODAY - dt.timedelta(days=1), TODAY + dt.timedelta(days=1)
    store.store(_update(10, 1), yesterday)
    store.store(_update(20, 2), yesterday)
    store.store(_update(30, 3), TODAY)
    store.store(_update(40, 4), tomorrow)
    stream = OrderStream(store, 1, (EPOCH, 10), yesterday, hole_wait_s=30.0)  # type: ignore[arg-type]
    sent: list[int] = []
    asyncio.run(stream.start(_sender(sent)))
    assert sent == [20, 30, 40]


def test_updates_without_user_seq_are_taken_as_they_come() -> None:
    store = UpdatesTwin()
    for seq in (10, 20, 40):
        store.store(_update(seq, 0))
    stream, sent = _stream(store, (EPOCH, 10))
    asyncio.run(stream.start(_sender(sent)))
    assert sent == [20, 40] and not stream.held
