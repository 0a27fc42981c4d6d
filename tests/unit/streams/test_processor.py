"""The processor against its in-memory twins: dedupe, dead letters, retries, the seq guard."""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import replace

import pytest

from bench.kit import engine_events
from schemas.codec import encode
from schemas.events import OrderUpdate
from streams.errors import SinkRejected, SinkUnavailable
from streams.memory import MemorySink
from streams.processor import Limits, Processor, ProcessorStop, Record, SeqGuard
from streams.state import ALL_SYMBOLS, STAT_FIELDS, UserState


@functools.cache
def _all(n: int) -> tuple[OrderUpdate, ...]:
    return tuple(e for e in engine_events(n) if isinstance(e, OrderUpdate))


def _updates(n: int = 12_000) -> list[OrderUpdate]:
    return list(_all(n))


def _records(events: list[OrderUpdate]) -> list[Record]:
    return [Record(str(e.user_id).encode(), encode(e), "t", 0, i) for i, e in enumerate(events)]


class Harness:
    def __init__(self, sink: MemorySink | None = None, guard: SeqGuard | None = None, **kw: object) -> None:
        self.sink = sink or MemorySink()
        self.letters: list[tuple[Record, str, str]] = []
        self.retries = 0
        self.table: dict[bytes, bytes] = {}

        async def dead_letter(rec: Record, reason: str, detail: str) -> None:
            self.letters.append((rec, reason, detail))

        def on_retry() -> None:
            self.retries += 1

        self.proc = Processor(
            self.sink, dead_letter, guard=guard, on_retry=on_retry, retry_initial_s=0.001, retry_max_s=0.002, **kw
        )

    def run(self, records: list[Record], batch: int = 500):
        """Batches as the worker makes them: state read from and stored back to a table."""
        results = []
        for i in range(0, len(records), batch):
            result, changed = asyncio.run(
                self.proc.process(records[i : i + batch], lambda k: UserState.from_bytes(self.table.get(k)))
            )
            for key, state in changed.items():
                self.table[key] = state.to_bytes()
            results.append(result)
        return results

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.letters]


def _expected_stats(events: list[OrderUpdate]) -> dict[tuple[int, str], list[int]]:
    states: dict[int, UserState] = {}
    for e in {e.seq: e for e in events}.values():
        states.setdefault(e.user_id, UserState()).apply(e)
    return {(u, sym): row[: len(STAT_FIELDS)] for u, st in states.items() for sym, row in st.stats.items()}


def _stats_of(sink: MemorySink) -> dict[tuple[int, str], list[int]]:
    return {k: list(row.values) for k, (_ts, row) in sink.stats.items()}


def test_every_record_twice_in_any_order_gives_the_truth():
    events = _updates()
    twice = events * 2
    random.Random(11).shuffle(twice)
    h = Harness()
    results = h.run(_records(twice))
    assert sum(r.applied for r in results) == len(events)
    assert sum(r.duplicates for r in results) == len(events)
    assert set(h.sink.events) == {(e.epoch, e.seq) for e in events}
    assert _stats_of(h.sink) == _expected_stats(events)
    # The newest event of each order wins its rows, whatever order they came in.
    last = {(e.user_id, e.epoch, e.order_id): e for e in events}
    assert {k: v[1].seq for k, v in h.sink.history.items()} == {k: e.seq for k, e in last.items()}
    assert not h.letters


def test_an_older_event_never_resurrects_a_closed_order():
    events = _updates()
    closed = next(e for e in reversed(events) if e.status.value in ("FILLED", "CANCELLED"))
    same = [e for e in events if (e.epoch, e.order_id) == (closed.epoch, closed.order_id)]
    h = Harness()
    h.run(_records([same[-1]]))
    h.run(_records(same[:-1]))  # the NEW (and fills) arrive after the terminal status
    assert closed.order_id not in h.sink.open_orders(closed.user_id)
    assert h.sink.history[(closed.user_id, closed.epoch, closed.order_id)][1].seq == closed.seq


def test_hostile_records_are_dead_lettered_with_their_reason():
    events = _updates()
    good = events[5]
    key = str(good.user_id).encode()
    bad = [
        Record(key, None, "t", 0, 1),
        Record(None, encode(good), "t", 0, 2),
        Record(b"12x", encode(good), "t", 0, 3),
        Record(key, b"junk: not an avro frame", "t", 0, 4),
        Record(key, encode(good)[:-4], "t", 0, 5),
        Record(key, encode(replace(good, filled_qty=-1)), "t", 0, 6),
        Record(key, encode(replace(good, client_order_id="x" * 300)), "t", 0, 7),
        Record(key, b"\xc3\x01" + bytes(70_000), "t", 0, 8),
        Record(str(good.user_id + 1).encode(), encode(good), "t", 0, 9),
    ]
    h = Harness()
    h.run(bad + _records([good]))
    assert h.reasons() == [
        "null_value",
        "bad_key",
        "bad_key",
        "bad_magic",
        h.reasons()[4],
        "rule_violation",
        "rule_violation",
        "oversized",
        "bad_key",
    ]
    assert h.reasons()[4] in ("truncated", "undecodable")
    assert set(h.sink.events) == {(good.epoch, good.seq)}


def test_a_bug_meeting_one_record_dead_letters_it_and_the_batch_goes_on(monkeypatch):
    events = _updates()[:20]
    h = Harness()
    real = h.proc._rule_violation

    def flaky(rec, ev):
        if ev.seq == events[3].seq:
            raise RuntimeError("boom")
        return real(rec, ev)

    monkeypatch.setattr(h.proc, "_rule_violation", flaky)
    (result,) = h.run(_records(events))
    assert h.reasons() == ["internal_error"]
    assert result.applied == len(events) - 1


def test_retriable_failures_are_retried_until_they_succeed_and_counted():
    events = _updates()[:50]
    h = Harness(MemorySink(fail_retriably=3))
    (result,) = h.run(_records(events))
    assert (h.sink.attempts, h.sink.writes, result.retries, h.retries) == (4, 1, 3, 3)
    assert result.applied == len(events)


def test_a_rejected_batch_stops_the_processor_and_stores_no_state():
    h = Harness(MemorySink(reject=True))
    with pytest.raises(ProcessorStop):
        h.run(_records(_updates()[:10]))
    assert h.table == {}


class _OutageThenRejection(MemorySink):
    """Cassandra away for two attempts, then refusing the batch (a schema changed under the worker)."""

    async def write(self, pending: list[object]) -> None:
        self.reject = self.attempts >= 2
        await super().write(pending)


def test_a_retriable_failure_is_retried_and_a_non_retriable_one_is_not():
    """SinkUnavailable is retried with back-off; SinkRejected stops the processor at its first
    occurrence (ProcessorStop: the worker exits without committing), never retried forever."""
    h = Harness(MemorySink(reject=True))
    with pytest.raises(ProcessorStop, match="retrying cannot help"):
        h.run(_records(_updates()[:10]))
    assert (h.sink.attempts, h.sink.writes, h.retries) == (1, 0, 0)

    h = Harness(_OutageThenRejection(fail_retriably=10))
    with pytest.raises(ProcessorStop) as stopped:
        h.run(_records(_updates()[:10]))
    assert isinstance(stopped.value.__cause__, SinkRejected)
    assert (h.sink.attempts, h.sink.writes, h.retries) == (3, 0, 2)  # two retries, then the stop
    assert h.table == {}


class _Guard(SeqGuard):
    def __init__(self, ceiling: int, failures: int = 0) -> None:
        self.ceiling, self.failures, self.refreshes = ceiling, failures, 0

    def covers(self, epoch: int, seq: int) -> bool:
        return seq <= self.ceiling

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.failures:
            self.failures -= 1
            raise SinkUnavailable("checkpoint topic away (twin)")


def test_the_guard_dead_letters_what_no_checkpoint_covers_after_a_fresh_read():
    events = _updates()[:40]
    forged = replace(events[10], seq=events[-1].seq + 10**9)
    guard = _Guard(ceiling=events[-1].seq, failures=2)
    h = Harness(guard=guard)
    (result,) = h.run(_records([*events, forged]))
    assert h.reasons() == ["beyond_ceiling"]
    assert guard.refreshes == 3 and h.retries == 2  # retried while the topic could not be read
    assert result.applied == len(events)
    h2 = Harness(guard=_Guard(ceiling=events[-1].seq))
    h2.run(_records(events))
    assert h2.proc.guard.refreshes == 0  # nothing beyond: no read at all


def test_events_too_old_for_the_state_are_reported_not_dropped():
    ev = _updates()[0]
    h = Harness()
    for epoch in (ev.epoch + 10, ev.epoch + 20):
        h.run(_records([replace(ev, epoch=epoch)]))
    h.run(_records([ev]))  # an epoch older than both kept
    assert h.reasons() == ["late_beyond_window"]


def test_limits_are_settings():
    ev = _updates()[0]
    h = Harness(limits=Limits(max_value_bytes=10))
    h.run(_records([ev]))
    assert h.reasons() == ["oversized"]


def test_statistics_rows_carry_a_timestamp_that_grows_with_every_event():
    all_events = _updates()
    events = [e for e in all_events if e.user_id == all_events[0].user_id]
    h = Harness()
    seen = []
    for e in events:
        h.run(_records([e]))
        seen.append(h.sink.stats[(e.user_id, ALL_SYMBOLS)][0])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_a_batch_stores_its_own_states_not_those_of_a_later_batch_prepared_on_top():
    """The worker prepares batch N+1 on the same state objects while N is being written. What N
    stores once durable must be the states right after N: if it stored N+1's effects and the
    worker died before N+1 was durable, N+1's events would be duplicates on restart, never written."""
    events = _updates()
    user = max({e.user_id for e in events}, key=lambda u: sum(e.user_id == u for e in events))
    mine = [e for e in events if e.user_id == user]
    half = len(mine) // 2
    h = Harness()
    cache: dict[bytes, UserState] = {}

    def load(key: bytes) -> UserState:  # the worker's cache: one object per user across batches
        return cache.setdefault(key, UserState.from_bytes(h.table.get(key)))

    async def pipeline() -> None:
        first = await h.proc.prepare(_records(mine[:half]), load)
        await h.proc.prepare(_records(mine[half:]), load)  # the second batch, before the first is durable
        await h.proc.complete(first)
        # The objects now hold the second batch's effects too: storing them would be the bug.
        assert {k: v.to_bytes() for k, v in first.changed.items()} != first.states
        h.table.update(first.states)  # what the worker stores for the first batch
        # ... and the worker dies here: the second batch is never written.

    asyncio.run(pipeline())
    key = str(user).encode()
    stored = UserState.from_bytes(h.table[key])
    truth = UserState()
    for e in mine[:half]:
        truth.apply(e)
    assert stored.to_bytes() == truth.to_bytes()
    # A restart reads the stored state and applies the second batch again: nothing is a duplicate.
    fresh = Harness(sink=h.sink)
    fresh.table = dict(h.table)
    (result,) = fresh.run(_records(mine[half:]), batch=len(mine))
    assert result.applied == len(mine) - half and result.duplicates == 0
