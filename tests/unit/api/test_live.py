"""The live hub's fan-out: per-user delivery, bounded queues, a slow subscriber dropped (pure asyncio)."""

from __future__ import annotations

import asyncio

from api.live import Hub, LiveEvent


def _ev(user: int, seq: int, epoch: int = 7) -> LiveEvent:
    return LiveEvent(user, epoch, seq, {"user_id": user, "epoch": epoch, "seq": seq})


def test_events_reach_only_their_users_subscribers_in_order() -> None:
    async def run() -> None:
        hub = Hub(queue_size=10)
        a1, a2, b = hub.subscribe(1), hub.subscribe(1), hub.subscribe(2)
        assert hub.users == frozenset({1, 2}) and hub.subscribers == 3
        hub.dispatch([_ev(1, 5), _ev(2, 6), _ev(3, 7), _ev(1, 8)])
        for sub, seqs in ((a1, [5, 8]), (a2, [5, 8]), (b, [6])):
            assert [sub.queue.get_nowait().seq for _ in range(sub.queue.qsize())] == seqs
        hub.unsubscribe(a1)
        assert hub.users == frozenset({1, 2})
        hub.unsubscribe(a2)
        hub.unsubscribe(a2)  # twice is harmless: the stream's cleanup may race an overflow drop
        assert hub.users == frozenset({2}) and hub.subscribers == 1

    asyncio.run(run())


def test_a_full_queue_drops_the_subscriber_and_spares_the_others() -> None:
    async def run() -> None:
        hub = Hub(queue_size=2)
        slow, fast = hub.subscribe(1), hub.subscribe(1)
        hub.dispatch([_ev(1, 1), _ev(1, 2)])
        fast.queue.get_nowait()
        fast.queue.get_nowait()
        hub.dispatch([_ev(1, 3)])  # slow's queue is full: it has now missed seq 3
        assert slow.overflowed.is_set() and not fast.overflowed.is_set()
        assert fast.queue.get_nowait().seq == 3
        hub.dispatch([_ev(1, 4)])
        assert slow.queue.qsize() == 2, "a dropped subscriber receives nothing more"
        assert hub.subscribers == 1 and hub.users == frozenset({1})

    asyncio.run(run())


def test_position_orders_by_epoch_then_seq() -> None:
    assert _ev(1, 900, epoch=1).position < _ev(1, 1, epoch=2).position
