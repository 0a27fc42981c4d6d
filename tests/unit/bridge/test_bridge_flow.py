"""The bridge's flow control against the twins (``twins.py``): which holes it asks the replay service
for, that the watermark and the checkpoint never pass an unacknowledged record, how far it reads
while Kafka is away, what an epoch change does to seqs left above a hole, and a graceful stop and
restart. ``test_bridge_loop.py`` covers hostile input and Kafka errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.metrics import M
from bridge.service import Bridge
from bridge.settings import BridgeSettings
from schemas.checkpoint import Checkpoint
from schemas.wire import HEARTBEAT, pack
from tests.unit.bridge.twins import EngineTwin, KafkaTwin, engine_events, frames_of, run_until, twin_settings

EPOCH = 1_700_000_000_000_000
Rig = tuple[BridgeSettings, EngineTwin, KafkaTwin, Bridge]


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    opts: dict[str, Any] = dict(getattr(request, "param", {}))
    heartbeat_ms = opts.pop("heartbeat_ms", 50)
    s = twin_settings(uuid.uuid4().hex[:8], **opts)
    engine = EngineTwin(s.feed_endpoint, s.replay_endpoint, EPOCH, heartbeat_ms=heartbeat_ms)
    kafka = KafkaTwin(s)
    bridge = Bridge(s, kafka=kafka)
    assert bridge.start()
    yield s, engine, kafka, bridge
    bridge.close()
    engine.close()
    assert not kafka.violations, kafka.violations[:5]


def _at(bridge: Bridge, seq: int, epoch: int = EPOCH) -> Any:
    return lambda: bridge.tracker is not None and bridge.tracker.epoch == epoch and bridge.tracker.watermark >= seq


def _replays(engine: EngineTwin) -> list[tuple[int, int, int]]:
    return [r[1:] for r in engine.requests if r[0] == "REPLAY"]


def _event_topics(s: BridgeSettings) -> set[str]:
    return {s.topic_updates, s.topic_trades, s.topic_balances}


def _seqs_of(kafka: KafkaTwin, epoch: int) -> list[int]:
    topics = _event_topics(kafka.s)
    return [int(d.headers["seq"]) for d in kafka.log if d.topic in topics and d.headers["epoch"] == str(epoch).encode()]


def _records_per_seq(events: list[Any]) -> dict[int, int]:
    """Kafka records per seq: a trade between two users is one record per side."""
    out = {}
    for e in events:
        two = type(e).__name__ == "Trade" and e.maker_user_id != e.taker_user_id
        out[e.seq] = 2 if two else 1
    return out


# ------------------------------------------------------------------------------- holes
def test_a_hole_is_asked_for_exactly_and_a_tail_seen_only_in_heartbeats_too(rig: Rig) -> None:
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 300)[:300]
    engine.append_events(events[:200], skip=set(range(41, 51)))
    run_until(bridge, _at(bridge, 200), "the hole 41..50 filled")
    assert (EPOCH, 41, 50) in _replays(engine)
    assert all(lo >= 41 and hi <= 50 for _e, lo, hi in _replays(engine)), _replays(engine)
    # Journaled, never published: only the heartbeats tell the bridge they exist.
    engine.requests.clear()
    engine.append_events(events[200:], skip={e.seq for e in events[200:]})
    run_until(bridge, _at(bridge, 300), "the tail found through the heartbeats")
    assert _replays(engine) and _replays(engine)[0][:2] == (EPOCH, 201)
    want = _records_per_seq(events)
    got: dict[int, int] = {}
    for seq in kafka.seqs():
        got[seq] = got.get(seq, 0) + 1
    assert got == want, "every seq once (a trade once per side), none replayed twice"


def test_a_duplicate_from_the_feed_is_dropped_without_a_record(rig: Rig) -> None:
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 60)[:60]
    engine.append_events(events)
    run_until(bridge, _at(bridge, 60), "the events")
    before, dups = len(kafka.log), _duplicates()
    for ev in events[:5]:
        engine.send(list(frames_of(ev)))
    engine.send([pack(HEARTBEAT, EPOCH, 60), b""])
    run_until(bridge, lambda: _duplicates() >= dups + 5, "the duplicates counted")
    for _ in range(10):
        bridge.step(poll_ms=5)
    new = [d for d in kafka.log[before:] if d.topic != s.topic_checkpoint]
    assert new == [], "a seq already handed over is neither produced nor dead-lettered again"


def _duplicates() -> float:
    return float(M.duplicates._value.get())


# -------------------------------------------------------------------- acknowledgements
def test_the_watermark_and_the_checkpoint_stay_below_what_kafka_has_not_acknowledged(rig: Rig) -> None:
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 200)[:200]
    engine.append_events(events[:80])
    run_until(bridge, _at(bridge, 80), "the first events")
    kafka.producer.hold = True  # Kafka takes records but acknowledges nothing
    engine.append_events(events[80:])
    run_until(bridge, lambda: bridge.tracker is not None and bridge.tracker.received >= 200, "everything read")
    until = time.monotonic() + 3 * s.checkpoint_ms / 1000
    while time.monotonic() < until:  # long enough for periodic checkpoints
        bridge.step(poll_ms=5)
    assert bridge.tracker is not None and bridge.tracker.watermark == 80
    queued = [Checkpoint.from_bytes(m.value()) for m, _ in kafka.producer.queue if m.topic() == s.topic_checkpoint]
    assert all(c.watermark <= 80 for c in queued), queued
    assert bridge.status()["watermark"] == 80 and bridge.status()["in_flight"] == 120, "handed over, unacknowledged"
    kafka.producer.hold = False
    run_until(bridge, _at(bridge, 200), "the acknowledgements")
    run_until(bridge, lambda: max(c.watermark for c in kafka.checkpoints()) == 200, "a checkpoint of it all")
    # Every checkpoint in the log comes after every record at or below its watermark.
    topics, delivered = _event_topics(s), set()
    for d in kafka.log:
        if d.topic in topics or (d.topic == s.topic_dlq and d.headers.get("accounted") == b"1"):
            delivered.add(int(d.headers["seq"]))
        elif d.topic == s.topic_checkpoint:
            cp = Checkpoint.from_bytes(d.value)
            missing = set(range(1, cp.watermark + 1)) - delivered
            assert not missing, f"checkpoint {cp} before seqs {sorted(missing)[:5]} were acknowledged"


@pytest.mark.parametrize("rig", [{"max_in_flight": 50}], indirect=True, ids=["in-flight-50"])
def test_while_kafka_is_away_the_bridge_stops_reading_and_loses_nothing(rig: Rig) -> None:
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 3000)[:3000]
    engine.append_events(events[:20])
    run_until(bridge, _at(bridge, 20), "the first events")
    kafka.producer.hold = True
    engine.append_events(events[20:])
    for _ in range(300):
        bridge.step(poll_ms=2)
    assert bridge.tracker is not None
    waiting = len(kafka.producer) + len(bridge._outbox)
    # It stops within one feed message (the twin batches up to 100 events in one) of the bound.
    assert 50 <= waiting <= 50 + 100, waiting
    assert bridge.tracker.received < 20 + 50 + 100 < len(events), "the rest waits in ZeroMQ or the journal"
    assert bridge.tracker.watermark == 20
    kafka.producer.hold = False
    run_until(bridge, _at(bridge, len(events)), "everything once Kafka is back", timeout=60)
    assert sorted(set(kafka.seqs())) == [e.seq for e in events]


@pytest.mark.parametrize("rig", [{"max_in_flight": 50}], indirect=True, ids=["in-flight-50"])
def test_a_replay_stops_reading_at_the_bound_too_and_asks_for_the_rest_later(rig: Rig) -> None:
    """A replay started just before Kafka stalls must not hand the producer a whole range (up to
    50,000 events): it stops within one replay message of the bound, like the feed."""
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 3000)[:3000]
    engine.append_events(events[:20])
    run_until(bridge, _at(bridge, 20), "the first events")
    kafka.producer.hold = True
    engine.append_events(events[20:], skip={e.seq for e in events[20:]})  # journaled, never published
    for _ in range(300):
        bridge.step(poll_ms=2)
    assert bridge.tracker is not None
    waiting = len(kafka.producer) + len(bridge._outbox)
    assert 50 <= waiting <= 50 + 64, waiting  # the twin replays 64 events per message
    assert _replays(engine), "the hole was asked for"
    kafka.producer.hold = False
    run_until(bridge, _at(bridge, len(events)), "everything once Kafka is back", timeout=60)
    assert sorted(set(kafka.seqs())) == [e.seq for e in events]
    assert len(_replays(engine)) > 1, "the rest of the range was asked for again"


# -------------------------------------------------------------------------- epochs
def test_seqs_left_above_a_hole_when_the_epoch_changes_are_dead_lettered_and_the_new_epoch_opens_after(
    rig: Rig,
) -> None:
    s, engine, kafka, bridge = rig
    old = engine_events(EPOCH, 70)[:70]
    engine.append_events(old[:50])
    for ev in old[60:]:  # 51..60 never reach the journal: the hole below 61..70 cannot be filled
        engine.append(*frames_of(ev))
    run_until(bridge, lambda: bridge.tracker is not None and len(bridge.tracker.pending) == 10, "61..70 waiting")
    run_until(bridge, lambda: (EPOCH, 51, 60) in _replays(engine), "the replay of the hole")
    assert bridge.tracker is not None and bridge.tracker.watermark == 50
    new_epoch = EPOCH + 1000
    new = engine_events(new_epoch, 30, seed=3)[:30]
    engine.new_epoch(new_epoch)
    engine.append_events(new)
    run_until(bridge, _at(bridge, 30, new_epoch), "the new epoch followed", timeout=30)
    closed = [d for d in kafka.topic(s.topic_dlq) if d.headers["reason"] == b"epoch_closed"]
    assert sorted(int(d.headers["seq"]) for d in closed) == list(range(61, 71))
    assert all(d.headers["epoch"] == str(EPOCH).encode() for d in closed)
    assert sorted(set(_seqs_of(kafka, EPOCH))) == list(range(1, 51)), "nothing above the hole was produced"
    assert sorted(set(_seqs_of(kafka, new_epoch))) == list(range(1, 31))
    # The new epoch's first checkpoint is written after every record of the old one.
    first_new = next(i for i, d in enumerate(kafka.log) if d.topic == s.topic_checkpoint and _cp_epoch(d) == new_epoch)
    last_old = max(i for i, d in enumerate(kafka.log) if d.headers.get("epoch") == str(EPOCH).encode())
    assert first_new > last_old
    assert bridge.status()["epoch"] == new_epoch


def _cp_epoch(d: Any) -> int:
    return Checkpoint.from_bytes(d.value).epoch


# ------------------------------------------------------------------ stop and restart
def test_a_graceful_stop_checkpoints_the_watermark_and_a_restart_resumes_after_it(rig: Rig) -> None:
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 150)[:150]
    engine.append_events(events[:100])
    run_until(bridge, _at(bridge, 100), "the first events")
    bridge.close()
    assert bridge.status()["phase"] == "stopping"
    last = kafka.checkpoints()[-1]
    assert (last.epoch, last.watermark) == (EPOCH, 100) and last.ceiling >= 100
    engine.append_events(events[100:], skip={e.seq for e in events[100:]})  # missed while stopped
    again = Bridge(s, kafka=kafka)
    try:
        assert again.start()
        assert again.tracker is not None and again.tracker.watermark == 100
        run_until(again, _at(again, 150), "the events missed while stopped")
        assert any(lo == 101 for _e, lo, _hi in _replays(engine)), _replays(engine)
    finally:
        again.close()
    per_seq: dict[int, int] = {}
    for seq in kafka.seqs():
        per_seq[seq] = per_seq.get(seq, 0) + 1
    assert per_seq == _records_per_seq(events), "nothing produced twice across the restart"


@pytest.mark.parametrize("rig", [{"heartbeat_ms": 0}], indirect=True, ids=["no-heartbeats"])
def test_a_replay_refused_for_epoch_mismatch_makes_the_bridge_follow_the_engine(rig: Rig) -> None:
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 20)[:20]
    engine.append_events(events[:10])
    run_until(bridge, _at(bridge, 10), "the first events")
    engine.new_epoch(EPOCH + 7)  # the engine restarted; no heartbeat tells the bridge
    engine.send(list(frames_of(events[14])))  # a late frame of the old epoch, above a hole
    run_until(bridge, lambda: bridge.tracker is not None and bridge.tracker.epoch == EPOCH + 7, "the engine followed")
    assert any(r[0] == "REPLAY" and r[1] == EPOCH for r in engine.requests), "the hole was asked for first"

    def closed() -> list[int]:
        return [int(d.headers["seq"]) for d in kafka.topic(s.topic_dlq) if d.headers["reason"] == b"epoch_closed"]

    run_until(bridge, lambda: bool(closed()), "the early seq's dead letter")
    assert closed() == [15]
    new = engine_events(EPOCH + 7, 5, seed=4)[:5]
    engine.append_events(new)
    run_until(bridge, _at(bridge, 5, EPOCH + 7), "the new epoch's events")


def test_records_are_keyed_by_user_with_epoch_and_seq_headers_and_a_trade_goes_to_both_sides(rig: Rig) -> None:
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 400)
    engine.append_events(events)
    run_until(bridge, _at(bridge, events[-1].seq), "the events")
    by_seq: dict[int, list[Any]] = {}
    for d in kafka.log:
        if d.topic in _event_topics(s):
            by_seq.setdefault(int(d.headers["seq"]), []).append(d)
    trades = 0
    for ev in events:
        records = by_seq[ev.seq]
        assert all(d.headers["epoch"] == str(EPOCH).encode() for d in records)
        name = type(ev).__name__
        if name == "Trade":
            assert {d.topic for d in records} == {s.topic_trades}
            sides = {d.headers["side"]: d.key for d in records}
            if ev.maker_user_id != ev.taker_user_id:
                trades += 1
                assert sides == {b"taker": str(ev.taker_user_id).encode(), b"maker": str(ev.maker_user_id).encode()}
            else:
                assert sides == {b"taker": str(ev.taker_user_id).encode()}
        else:
            topic = s.topic_updates if name == "OrderUpdate" else s.topic_balances
            [d] = records
            assert (d.topic, d.key) == (topic, str(ev.user_id).encode())
    assert trades > 0, "the flow had no trade between two users"


def test_an_event_whose_header_names_another_user_is_dead_lettered_and_replayed_to_its_own_partition(
    rig: Rig,
) -> None:
    """The header's keys choose the partitions, so they must be the payload's users: the copy
    that lies is dead-lettered, and the seq it stood for comes from the replay, keyed right."""
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 400)
    at = next(i for i, e in enumerate(events) if type(e).__name__ == "OrderUpdate")
    target, events = events[at], events[: at + 20]
    engine.append_events(events, skip={target.seq})
    _header, payload = frames_of(target)
    engine.send([pack(1, EPOCH, target.seq, target.user_id + 1), payload])
    run_until(bridge, _at(bridge, events[-1].seq), "the events")
    run_until(bridge, lambda: any(d.topic == s.topic_dlq for d in kafka.log), "the dead letter")
    [dead] = [d for d in kafka.log if d.topic == s.topic_dlq]
    assert dead.headers["reason"] == b"header_mismatch"
    records = [d for d in kafka.log if d.topic in _event_topics(s) and int(d.headers["seq"]) == target.seq]
    assert [(d.topic, d.key) for d in records] == [(s.topic_updates, str(target.user_id).encode())]


def test_nothing_is_produced_until_a_ceiling_checkpoint_is_acknowledged(rig: Rig) -> None:
    from confluent_kafka import KafkaError

    s, engine, kafka, bridge = rig
    kafka.producer.refuse = lambda topic, value, headers: (
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED) if topic == s.topic_checkpoint else None
    )
    events = engine_events(EPOCH, 50)[:50]
    engine.append_events(events)
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        bridge.step(poll_ms=5)
    assert bridge.tracker is not None and bridge.tracker.received == 50
    assert kafka.seqs() == [] and bridge.status()["waiting"] > 0, "events wait in the outbox for their ceiling"
    kafka.producer.refuse = lambda topic, value, headers: None
    run_until(bridge, _at(bridge, 50), "the events once a checkpoint is acknowledged")
    assert sorted(set(kafka.seqs())) == list(range(1, 51))


def test_status_before_start_and_close_without_start_are_harmless() -> None:
    s = twin_settings(uuid.uuid4().hex[:8])
    bridge = Bridge(s, kafka=KafkaTwin(s))
    assert bridge.status() == {
        "phase": "starting", "last_loop": bridge.status()["last_loop"], "epoch": None, "watermark": None,
        "ceiling": None, "engine_seq": None, "in_flight": 0, "waiting": 0,
    }  # fmt: skip
    bridge.close()
    assert bridge.status()["phase"] == "stopping"
