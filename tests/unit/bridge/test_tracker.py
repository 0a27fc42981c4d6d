"""The bridge's seq tracker: dedupe, holes, and a watermark that never passes an unacked seq."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.tracker import Hole, SeqTracker


def test_in_order_stream_has_no_hole_and_acks_advance_the_watermark():
    t = SeqTracker(epoch=1)
    for seq in range(1, 6):
        assert t.offer(seq, seq) == [seq]
        t.expect(seq, 1)
    assert t.hole() is None and t.received == 5
    t.ack(2)
    assert t.watermark == 0  # 1 is not acknowledged yet
    t.ack(1)
    assert t.watermark == 2
    for seq in (5, 4, 3):
        t.ack(seq)
    assert t.watermark == 5 and t.in_flight() == 0


def test_duplicates_are_dropped():
    t = SeqTracker(epoch=1, watermark=10)
    assert t.is_duplicate(10) and t.offer(10, "x") == [] and t.offer(3, "x") == []
    assert t.offer(12, "early") == []  # held back: 11 is missing
    assert t.is_duplicate(12) and t.offer(12, "again") == []
    assert t.offer(11, "late") == ["late", "early"]  # released in seq order


def test_a_jump_is_a_hole_and_a_heartbeat_ahead_is_a_hole():
    t = SeqTracker(epoch=3)
    t.offer(1, 1)
    t.offer(4, 4)
    assert t.hole() == Hole(3, 2, 3)
    t.offer(2, 2)
    assert t.offer(3, 3) == [3, 4]
    assert t.hole() is None and t.received == 4
    t.heartbeat(9)
    assert t.hole() == Hole(3, 5, 9)


def test_a_hole_is_requested_after_the_wait_once_then_again_after_the_retry_interval():
    t = SeqTracker(epoch=1)
    t.heartbeat(5)
    assert t.hole_to_request(now=0.0, wait=0.1, retry_after=1.0) is None  # may still be in flight
    assert t.hole_to_request(now=0.2, wait=0.1, retry_after=1.0) == Hole(1, 1, 5)
    assert t.hole_to_request(now=0.5, wait=0.1, retry_after=1.0) is None
    t.offer(6, 6)  # traffic goes on; the hole does not move, so it is not asked for again yet
    assert t.hole_to_request(now=0.9, wait=0.1, retry_after=1.0) is None
    assert t.hole_to_request(now=1.3, wait=0.1, retry_after=1.0) == Hole(1, 1, 5)
    for seq in range(1, 6):
        t.offer(seq, seq)
    assert t.hole_to_request(now=1.4, wait=0.1, retry_after=1.0) is None


def test_a_trade_needs_both_records_acknowledged():
    t = SeqTracker(epoch=1)
    t.offer(1, 1)
    t.expect(1, 2)
    t.ack(1)
    assert t.watermark == 0
    t.ack(1)
    assert t.watermark == 1


@settings(max_examples=200, deadline=None)  # behaviour, not speed: a loaded CI box must not fail it
@given(data=st.data(), n=st.integers(1, 60))
def test_any_arrival_order_with_duplicates_ends_complete(data, n):
    arrivals = data.draw(st.permutations(list(range(1, n + 1))))
    dupes = data.draw(st.lists(st.integers(1, n), max_size=20))
    t = SeqTracker(epoch=1)
    produced = []
    for seq in [*arrivals, *dupes]:
        for ready in t.offer(seq, seq):
            produced.append(ready)
            t.expect(ready, 1)
        # The watermark never passes a seq that was not acknowledged.
        assert t.watermark == 0
    assert produced == list(range(1, n + 1))  # released strictly in seq order, each once
    assert t.hole() is None and t.received == n
    ack_order = data.draw(st.permutations(produced))
    acked = set()
    for seq in ack_order:
        t.ack(seq)
        acked.add(seq)
        expected = 0
        while expected + 1 in acked:
            expected += 1
        assert t.watermark == expected
    assert t.watermark == n
