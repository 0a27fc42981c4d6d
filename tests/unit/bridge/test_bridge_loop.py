"""The bridge's loop against twins of the engine (real ZeroMQ, scripted journal) and of Kafka (a
producer that checks the seq ceiling invariant on every record): hostile input, Kafka errors,
epoch changes. Every test ends with the bridge alive and every seq accounted for."""

from __future__ import annotations

import dataclasses
import struct
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException

from bridge.errors import BridgeError
from bridge.service import Bridge
from schemas.checkpoint import Checkpoint
from schemas.codec import encode
from schemas.wire import HEARTBEAT, entry, pack
from tests.unit.bridge.twins import (
    EngineTwin,
    KafkaTwin,
    engine_events,
    frames_of,
    marker,
    oversized,
    run_until,
    twin_settings,
)

EPOCH = 1_700_000_000_000_000


@pytest.fixture
def rig(request):
    """(settings, engine twin, kafka twin, started bridge); options via indirect params."""
    opts = getattr(request, "param", {})
    tag = uuid.uuid4().hex[:8]
    s = twin_settings(tag, **opts.get("settings", {}))
    engine = EngineTwin(s.feed_endpoint, s.replay_endpoint, EPOCH, heartbeat_ms=opts.get("heartbeat_ms", 50))
    kafka = KafkaTwin(s)
    for cp in opts.get("checkpoints", []):
        kafka.log.append(_checkpoint_record(s, cp))
        kafka.acked_ceiling[cp.epoch] = max(kafka.acked_ceiling.get(cp.epoch, 0), cp.ceiling)
    bridge = Bridge(s, kafka=kafka)
    assert bridge.start()
    yield s, engine, kafka, bridge
    bridge.close()
    engine.close()
    assert not kafka.violations, kafka.violations[:5]


def _checkpoint_record(s, cp):
    from tests.unit.bridge.twins import Delivered

    return Delivered(s.topic_checkpoint, s.bridge_id.encode(), cp.to_bytes(), {})


def _done(bridge, kafka, last):
    return lambda: bridge.tracker is not None and bridge.tracker.watermark >= last


def _dlq(kafka, s, reason=None):
    return [d for d in kafka.topic(s.topic_dlq) if reason is None or d.headers["reason"] == reason.encode()]


def _assert_every_seq_once(kafka, events, accounted=()):
    """Each seq in the event topics exactly once per record (trades twice), in seq order per key;
    the accounted ones only in the DLQ."""
    seqs = kafka.seqs()
    expected = {e.seq for e in events} - set(accounted)
    assert set(seqs) == expected
    by_key = {}
    for d in kafka.log:
        if "seq" in d.headers and d.topic != kafka.s.topic_dlq:
            by_key.setdefault((d.topic, d.key), []).append(int(d.headers["seq"]))
    assert all(v == sorted(v) for v in by_key.values())


@pytest.mark.parametrize("rig", [{"settings": {"ceiling_lease": 7}}], indirect=True, ids=["lease-7"])
def test_every_seq_in_order_and_never_above_an_acknowledged_ceiling_with_a_small_lease(rig):
    # A lease of 7 seqs forces the bridge to wait for the ceiling again and again (held in order).
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 600)
    engine.append_events(events, skip={5, 6, 200})  # holes: the replay service fills them
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark to reach the last seq")
    _assert_every_seq_once(kafka, events)
    assert kafka.checkpoints()[0].epoch == EPOCH
    # The checkpoint topic's ceiling covers every seq produced (the twin also checked it at
    # each hand-over: no violations).
    assert max(c.ceiling for c in kafka.checkpoints()) >= events[-1].seq


def test_an_oversized_event_from_the_feed_or_the_replay_is_one_accounted_dead_letter(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 500)
    updates = [e for e in events if type(e).__name__ == "OrderUpdate"]
    big_feed, big_replay = oversized(updates[10]), oversized(updates[40])
    events = [big_feed if e.seq == big_feed.seq else big_replay if e.seq == big_replay.seq else e for e in events]
    engine.append_events(events, skip={big_replay.seq})  # that one only comes through the replay service
    # And garbage over the limit that stands for nothing: dead-lettered, truncated, no seq taken.
    engine.send([pack(1, EPOCH, 10**6, 1), b"\xc3\x01" + b"\x00" * 2_000_000])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark to pass the oversized seqs")
    _assert_every_seq_once(kafka, events, accounted={big_feed.seq, big_replay.seq})
    accounted = _dlq(kafka, s, "oversized_event")
    assert sorted(int(d.headers["seq"]) for d in accounted) == sorted([big_feed.seq, big_replay.seq])
    for d in accounted:
        assert d.headers["accounted"] == b"1" and d.headers["truncated"] == b"1"
        assert d.headers["epoch"] == str(EPOCH).encode()
        assert int(d.headers["payload_size"]) == len(encode(big_feed))
    assert [d.headers.get("accounted") for d in _dlq(kafka, s, "oversized")] == [None]


def test_the_unpublishable_marker_is_dead_lettered_and_the_watermark_passes_it(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 200)
    marked = {events[30].seq, events[90].seq}
    for ev in events:
        if ev.seq in marked:
            engine.append(*marker(EPOCH, ev.seq), publish=ev.seq == events[30].seq)
        else:
            engine.append(*frames_of(ev))
    # A malformed marker from the feed stands for nothing.
    engine.send([pack(101, EPOCH, events[50].seq, 0, 0), b"not json"])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark to pass the markers")
    _assert_every_seq_once(kafka, events, accounted=marked)
    dls = _dlq(kafka, s, "unpublishable_event")
    assert sorted(int(d.headers["seq"]) for d in dls) == sorted(marked)
    assert all(d.headers["accounted"] == b"1" and d.headers["detail"].startswith(b'{"reason"') for d in dls)
    assert len(_dlq(kafka, s, "bad_marker")) == 1


def test_a_forged_epoch_change_is_dead_lettered_and_a_real_one_is_followed(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 200)
    engine.append_events(events[:100])
    run_until(bridge, _done(bridge, kafka, events[99].seq), "the first half")
    forged = engine_events(EPOCH + 1, 5)
    for ev in forged:  # valid-looking events of epoch+1, and a heartbeat of it
        engine.send(list(frames_of(ev)))
    engine.send([pack(HEARTBEAT, EPOCH + 1, 10**6), b""])
    engine.append_events(events[100:])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the rest of the real epoch")
    run_until(bridge, lambda: len(_dlq(kafka, s, "unconfirmed_epoch")) == len(forged), "the forged events' DLQ")
    assert bridge.tracker.epoch == EPOCH
    _assert_every_seq_once(kafka, events)
    # Stale input of the epoch left behind, after a real change: a true duplicate is counted,
    # a seq never handed over is dead-lettered.
    new = engine_events(EPOCH + 5, 120, seed=2)
    engine.new_epoch(EPOCH + 5)
    engine.append_events(new)
    run_until(bridge, lambda: bridge.tracker.epoch == EPOCH + 5, "the engine's real new epoch", timeout=30)
    run_until(bridge, _done(bridge, kafka, new[-1].seq), "the new epoch's events")
    engine.send(list(frames_of(events[3])))
    stale = engine_events(EPOCH, 400)[-1]
    engine.send(list(frames_of(stale)))
    run_until(bridge, lambda: len(_dlq(kafka, s, "stale_epoch")) == 1, "the stale event's DLQ")
    assert int(_dlq(kafka, s, "stale_epoch")[0].headers["seq"]) == stale.seq
    new_cps = [c for c in kafka.checkpoints() if c.epoch == EPOCH + 5]
    assert new_cps and max(c.ceiling for c in new_cps) >= new[-1].seq
    assert {int(d.headers["seq"]) for d in kafka.log if d.headers.get("epoch") == str(EPOCH + 5).encode()} >= {
        e.seq for e in new
    }


def test_a_forged_far_future_seq_of_the_current_epoch_is_dead_lettered(rig):
    s, engine, kafka, bridge = rig
    every = engine_events(EPOCH, 500)
    events, more, ahead = every[:300], every[300:400], every[-1]
    engine.append_events(events)
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the events")
    # ``ahead``: a genuine-looking event the engine never emitted.
    engine.send(list(frames_of(ahead)))
    engine.send([pack(HEARTBEAT, EPOCH, 10**9), b""])
    run_until(bridge, lambda: len(_dlq(kafka, s, "beyond_engine_seq")) == 1, "the forged seq's DLQ")
    assert int(_dlq(kafka, s, "beyond_engine_seq")[0].headers["seq"]) == ahead.seq
    engine.append_events(more)
    run_until(bridge, _done(bridge, kafka, more[-1].seq), "later events")
    assert bridge.tracker.engine_last < 10**9


def test_a_full_producer_queue_holds_records_in_order_and_nothing_raises(rig):
    s, engine, kafka, bridge = rig
    kafka.producer.capacity = 3  # BufferError on nearly every produce
    events = engine_events(EPOCH, 400)
    engine.append_events(events)
    for _ in range(50):  # garbage too: its dead letters wait their turn
        engine.send([b"junk", b"in", b"three frames"])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "everything through a 3-record queue")
    _assert_every_seq_once(kafka, events)
    run_until(bridge, lambda: len(_dlq(kafka, s, "bad_frame_count")) == 50, "the dead letters")


def test_refused_records_become_dead_letters_and_refused_dead_letters_shrink(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 200)
    victim = events[20].seq

    def refuse(topic, value, headers):
        if topic == s.topic_dlq and value:  # the broker's limit is lower than configured
            return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        if topic != s.topic_dlq and headers.get("seq") == str(victim).encode():
            return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        return None

    kafka.producer.refuse = refuse

    def raise_on(topic, value, headers):
        if headers.get("reason") == b"bad_frame_count" and value:
            return KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        return None

    kafka.producer.raise_on = raise_on
    engine.append_events(events)
    engine.send([b"junk", b"in", b"three frames"])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark past the refused record")
    stood_in = _dlq(kafka, s, "delivery_failed")
    assert stood_in and all(d.value == b"" and d.headers["accounted"] == b"1" for d in stood_in)
    assert {int(d.headers["seq"]) for d in stood_in} == {victim}
    run_until(bridge, lambda: len(_dlq(kafka, s, "bad_frame_count")) == 1, "the shrunk dead letter")


def test_a_fatal_producer_error_replaces_the_producer_and_replays_from_the_watermark(rig):
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 300)
    engine.append_events(events[:100])
    run_until(bridge, _done(bridge, kafka, events[99].seq), "the first events")
    first = kafka.producer
    first.hold = True
    engine.append_events(events[100:200])
    run_until(bridge, lambda: bridge.tracker.received >= events[199].seq, "records handed to the stuck producer")
    first.on_error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    engine.append_events(events[200:])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the replayed events")
    assert len(kafka.producers) == 2 and first.purged
    _assert_every_seq_once(kafka, events)


def test_start_waits_for_kafka_and_reports_starting_meanwhile(rig_unstarted):
    _s, engine, kafka, bridge = rig_unstarted
    kafka.down_for = 3
    assert bridge.status()["phase"] == "starting"
    assert bridge.start()
    assert bridge.status()["phase"] == "running"
    events = engine_events(EPOCH, 50)
    engine.append_events(events)
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the events after the late start")


def test_start_gives_up_only_when_asked_to_stop(rig_unstarted):
    _s, _engine, kafka, bridge = rig_unstarted
    kafka.down_for = 10**9
    calls = []
    assert bridge.start(lambda: len(calls) > 2 or calls.append(1)) is False


@pytest.fixture
def rig_unstarted():
    tag = uuid.uuid4().hex[:8]
    s = twin_settings(tag, connect_backoff_max_ms=100)
    engine = EngineTwin(s.feed_endpoint, s.replay_endpoint, EPOCH, heartbeat_ms=50)
    kafka = KafkaTwin(s)
    bridge = Bridge(s, kafka=kafka)
    yield s, engine, kafka, bridge
    bridge.close()
    engine.close()
    assert not kafka.violations


@pytest.mark.parametrize(
    "rig", [{"checkpoints": [Checkpoint(EPOCH, 40, 40)]}], indirect=True, ids=["old-checkpoint-without-ceiling"]
)
def test_a_resumed_bridge_renews_its_ceiling_before_producing(rig):
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 150)
    engine.append_events(events)
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the events above the checkpoint")
    assert set(kafka.seqs()) == {e.seq for e in events if e.seq > 40}


def test_hostile_replies_of_the_replay_service_do_not_stop_the_bridge(rig):
    s, engine, kafka, bridge = rig
    every = engine_events(EPOCH, 400)
    events, more = every[:300], every[300:]
    engine.append_events(events)
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the events")
    engine.info_replies = [[b"INFO", b"short"], [b"INFO"], [b"WHAT", b"x", b"y"]]
    for _ in range(3):
        engine.send(list(frames_of(engine_events(EPOCH + 9, 3)[0])))
    run_until(bridge, lambda: len(_dlq(kafka, s, "unconfirmed_epoch")) == 3, "the unconfirmed events", timeout=60)
    engine.append_events(more)
    run_until(bridge, _done(bridge, kafka, more[-1].seq), "later events")


def test_garbage_frames_of_every_kind_are_dead_lettered(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 50)
    garbage = [
        [b""],
        [b"a", b"b", b"c"],
        [struct.pack(">2sBBQQQQ", b"OH", 1, 1, EPOCH, 1, 1, 1)[:-1], b"x"],
        [pack(HEARTBEAT, EPOCH, 5), b"payload"],
        [pack(101, EPOCH, 3, 7, 0), b"{}"],
        [pack(1, EPOCH, 2**64 - 1, 2**64 - 1), b"\xc3\x01" + b"\xff" * 40],
        list(frames_of(dataclasses.replace(events[0], seq=0))),
    ]
    for frames in garbage:
        engine.send(frames)
    engine.append_events(events)
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the events")
    run_until(bridge, lambda: len(_dlq(kafka, s)) >= len(garbage), "the dead letters")
    assert len(_dlq(kafka, s)) == len(garbage) and len(_dlq(kafka, s, "bad_seq")) == 1
    _assert_every_seq_once(kafka, events)


@pytest.mark.parametrize("rig", [{"settings": {"max_pending": 5}}], indirect=True, ids=["max-pending-5"])
def test_too_many_early_seqs_stop_the_feed_but_not_the_replay(rig):
    """With more early seqs waiting than max_pending the bridge stops reading the feed; it must
    still fill the hole from the replay service (else it would wait forever)."""
    _s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 400)
    engine.append_events(events, skip={events[10].seq})
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark past the hole")
    _assert_every_seq_once(kafka, events)


def test_a_marker_nested_too_deep_is_a_bad_marker_not_a_crash(rig):
    """Before: the bridge's own json.loads of a marker payload of 4,096 '[' raised RecursionError
    (caught as a bridge_error). Now the marker goes through schemas.wire.parse_marker, which measures
    the depth before the parser runs: the feed's bad marker stands for nothing, the replayed one
    for its seq."""
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 100)
    deep = events[40].seq
    for ev in events:
        if ev.seq == deep:  # what the replay service answers for that seq: a malformed marker
            engine.append(pack(101, EPOCH, deep, 0, 0), b"[" * 4096, publish=False)
        else:
            engine.append(*frames_of(ev))
    engine.send([pack(101, EPOCH, events[60].seq, 0, 0), b"[" * 4096])
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the watermark past the deep marker")
    _assert_every_seq_once(kafka, events, accounted={deep})
    bad = _dlq(kafka, s, "bad_marker")
    assert len(bad) == 1 and b"deeper" in bad[0].headers["detail"]
    (stood_in,) = _dlq(kafka, s, "unpublishable_event")
    assert int(stood_in.headers["seq"]) == deep and stood_in.headers["accounted"] == b"1"
    assert not _dlq(kafka, s, "bridge_error")


def test_a_batch_with_a_bad_tail_keeps_its_good_entries(rig):
    s, engine, kafka, bridge = rig
    events = engine_events(EPOCH, 60)
    engine.append_events(events, skip={e.seq for e in events[20:30]})
    good = b"".join(entry(*frames_of(e)) for e in events[20:25])
    engine.send([good + b"\x00\x00\x10\x00" + b"torn"])  # five events, then an entry that runs past the end
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "every seq, the rest replayed")
    _assert_every_seq_once(kafka, events)
    (dl,) = _dlq(kafka, s, "bad_batch")
    assert b"too short" in dl.headers["detail"] and dl.value.endswith(b"torn")


def test_one_event_per_replay_message_as_an_older_engine_replies_still_fills_holes(rig):
    _s, engine, kafka, bridge = rig
    engine.replay_batches = False
    events = engine_events(EPOCH, 200)
    engine.append_events(events, skip={e.seq for e in events[50:120]})
    run_until(bridge, _done(bridge, kafka, events[-1].seq), "the hole filled by EV replies")
    _assert_every_seq_once(kafka, events)
    assert any(r[0] == "REPLAY" for r in engine.requests)


def test_start_raises_a_refusal_waiting_cannot_fix_at_once(rig_unstarted):
    _s, _engine, kafka, bridge = rig_unstarted
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise BridgeError("cannot create topic: INVALID_CONFIG")

    kafka.ensure_topics = refuse
    with pytest.raises(BridgeError, match="INVALID_CONFIG"):
        bridge.start()
    assert calls == [1] and bridge.status()["phase"] == "starting"
