"""Per-user state: "already applied?" is exact whatever the arrival order; statistics count once."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.kit import engine_events
from schemas.events import OrderUpdate
from streams.migrate import statements
from streams.state import ALL_SYMBOLS, MAX_EPOCHS, MAX_SPANS, STAT_FIELDS, AppliedSet, StateError, UserState, Verdict
from streams.state import increments as incs


def _updates(n: int = 12000) -> list[OrderUpdate]:
    return [e for e in engine_events(n) if isinstance(e, OrderUpdate)]


def _truth(events: list[OrderUpdate]) -> dict[int, dict[str, list[int]]]:
    """Statistics by brute force: every distinct event counted once."""
    out: dict[int, dict[str, list[int]]] = {}
    for ev in {(e.epoch, e.seq): e for e in events}.values():
        user = out.setdefault(ev.user_id, {})
        for symbol in (ev.symbol, ALL_SYMBOLS):
            row = user.setdefault(symbol, [0] * len(STAT_FIELDS))
            for i, v in enumerate(incs(ev)):
                row[i] += v
    return out


def _apply_all(events: list[OrderUpdate]) -> tuple[dict[int, UserState], list[Verdict]]:
    states: dict[int, UserState] = {}
    verdicts = [states.setdefault(e.user_id, UserState()).apply(e) for e in events]
    return states, verdicts


def test_user_seq_is_gapless_per_user_and_epoch():
    per_user: dict[int, list[int]] = {}
    for e in _updates():
        per_user.setdefault(e.user_id, []).append(e.user_seq)
    for seqs in per_user.values():
        assert seqs == list(range(1, len(seqs) + 1))


def test_in_order_statistics_are_exact_and_every_repeat_is_a_duplicate():
    events = _updates()
    states, verdicts = _apply_all(events + events)
    assert verdicts[: len(events)] == [Verdict.APPLIED] * len(events)
    assert verdicts[len(events) :] == [Verdict.DUPLICATE] * len(events)
    truth = _truth(events)
    for user, state in states.items():
        assert {s: row[: len(STAT_FIELDS)] for s, row in state.stats.items()} == truth[user]
        assert state.gaps() == 0


def test_late_events_are_applied_once_in_any_order():
    """The defect this replaces: a user's high-water mark discarded late events as stale."""
    events = _updates()
    shuffled = events * 2
    random.Random(7).shuffle(shuffled)
    states, verdicts = _apply_all(shuffled)
    assert verdicts.count(Verdict.APPLIED) == len(events)
    assert verdicts.count(Verdict.DUPLICATE) == len(events)
    truth = _truth(events)
    for user, state in states.items():
        assert {s: row[: len(STAT_FIELDS)] for s, row in state.stats.items()} == truth[user]
        assert state.gaps() == 0
        assert state.applied[0].spans == [1, state.version]


def test_a_missing_event_is_a_gap_until_it_arrives_then_counted_once():
    all_events = _updates()
    busy = max({e.user_id for e in all_events}, key=lambda u: sum(e.user_id == u for e in all_events))
    events = [e for e in all_events if e.user_id == busy]
    assert len(events) >= 3
    missing = events[len(events) // 2]
    state = UserState()
    for e in events:
        if e is not missing:
            assert state.apply(e) is Verdict.APPLIED
    assert state.gaps() == 1
    before = state.stats_timestamp()
    assert state.apply(missing) is Verdict.APPLIED  # e.g. a dead letter re-driven after a fix
    assert state.apply(missing) is Verdict.DUPLICATE  # re-driven twice
    assert state.gaps() == 0
    assert state.stats_timestamp() == before + 1  # a late event still moves the stats row forward
    assert state.stats[ALL_SYMBOLS][: len(STAT_FIELDS)] == _truth(events)[missing.user_id][ALL_SYMBOLS]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=200))
def test_applied_set_matches_a_plain_set(seqs):
    s, seen = AppliedSet(1), set()
    for n in seqs:
        verdict = s.add(n)
        assert verdict is (Verdict.DUPLICATE if n in seen else Verdict.APPLIED)
        seen.add(n)
    flat = s.spans
    assert flat == sorted(flat)
    covered = {n for i in range(0, len(flat), 2) for n in range(flat[i], flat[i + 1] + 1)}
    assert covered == seen
    assert all(flat[i] + 1 < flat[i + 1] for i in range(1, len(flat) - 1, 2))  # disjoint, not adjacent


def test_past_the_bound_the_oldest_gap_becomes_late_never_a_silent_drop():
    s = AppliedSet(1)
    for n in range(1, 2 * (MAX_SPANS + 10), 2):  # every other one: a gap after each
        assert s.add(n) is Verdict.APPLIED
    assert len(s.spans) <= 2 * MAX_SPANS
    assert s.ambiguous_upto > 0
    assert s.add(2) is Verdict.LATE  # its gap was given up: reported, not counted or dropped
    assert s.add(1) is Verdict.LATE
    top = s.spans[-1]
    assert s.add(top - 1) is Verdict.APPLIED  # a recent gap is still exact
    assert s.add(top - 1) is Verdict.DUPLICATE


def test_epochs_are_kept_apart_and_only_the_newest_ones():
    ev = _updates()[0]
    state = UserState()
    for epoch in (10, 20, 30):
        assert state.apply(replace(ev, epoch=epoch)) is Verdict.APPLIED
    assert len(state.applied) == MAX_EPOCHS
    assert state.apply(replace(ev, epoch=20)) is Verdict.DUPLICATE
    assert state.apply(replace(ev, epoch=10)) is Verdict.LATE  # older than every epoch kept
    assert state.newest_epoch == 30


def test_events_without_user_seq_use_the_old_rule():
    ev = replace(_updates()[0], user_seq=0)
    state = UserState()
    assert state.apply(ev) is Verdict.APPLIED
    assert state.apply(ev) is Verdict.DUPLICATE
    assert state.apply(replace(ev, seq=ev.seq - 1)) is Verdict.DUPLICATE


def test_encoding_round_trips_and_rejects_garbage():
    events = _updates()
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    states, _ = _apply_all(shuffled[: len(shuffled) // 2])
    for state in states.values():
        again = UserState.from_bytes(state.to_bytes())
        assert again == state
    assert UserState.from_bytes(None) == UserState()
    for bad in (b"\x07garbage", b"\x02" + b"\x00" * 5, next(iter(states.values())).to_bytes() + b"x"):
        with pytest.raises(StateError):
            UserState.from_bytes(bad)


def test_the_json_state_of_earlier_releases_is_read():
    old = (
        b'{"epoch":5,"last_seq":40,"open_orders":{},"stats":{"*":{"orders_new":3,"orders_filled":1,'
        b'"fills":1,"filled_qty":2,"filled_notional":200}},"stats_version":{"*":[5,40]}}'
    )
    state = UserState.from_bytes(old)
    assert state.legacy == (5, 40)
    assert state.stat_values("*")["orders_new"] == 3
    assert state.last_counted("*") == (5, 40)
    assert state.version == 4


def test_migrations_split_into_statements():
    text = "-- a comment\nCREATE TABLE {ks}.a (x int PRIMARY KEY);\n\nALTER TABLE {ks}.a ADD y int;\n"
    assert statements(text, "k") == ["CREATE TABLE k.a (x int PRIMARY KEY)", "ALTER TABLE k.a ADD y int"]
