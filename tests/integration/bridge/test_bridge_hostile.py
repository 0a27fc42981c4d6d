"""Hostile input through a real ``ohs bridge`` process into the real Kafka, whose topics are
created with Kafka's default 1 MiB record limit (the local stack's broker allows 4 MiB, which
would hide an oversized dead letter).

The engine is its scripted twin (``tests/unit/bridge/twins.py``: real ZeroMQ, real events from
the real engine core): it can publish what the real engine no longer emits (an event with a
3 MB client_order_id from an old journal, the UNPUBLISHABLE marker) and forged frames on the
same feed. Each test ends with the bridge process alive, every genuine seq in Kafka and the
watermark past every seq."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.checkpoint import Checkpoint
from schemas.wire import HEARTBEAT, pack
from tests.integration.bridge.test_bridge import assert_ceilings_cover
from tests.integration.pipeline import Pipeline, free_port, read_topics, seqs_of
from tests.unit.bridge.twins import EngineTwin, engine_events, frames_of, marker, oversized

pytestmark = pytest.mark.integration

EPOCH = 1_800_000_000_000_000
KAFKA_DEFAULT_LIMIT = "1048588"  # message.max.bytes of a stock broker (1 MiB + 12)


@pytest.fixture
def rig(stack_endpoints, tmp_path):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    admin = AdminClient({"bootstrap.servers": stack_endpoints.kafka_bootstrap})
    limit = {"max.message.bytes": KAFKA_DEFAULT_LIMIT}
    topics = [NewTopic(p.topics[t], 3, 1, config=limit) for t in ("updates", "trades", "balances")]
    topics += [NewTopic(p.topics["dlq"], 1, 1, config=limit)]
    topics += [NewTopic(p.topics["checkpoint"], 1, 1, config={**limit, "cleanup.policy": "compact"})]
    for fut in admin.create_topics(topics, operation_timeout=30).values():
        fut.result(30)
    engine = EngineTwin(p.feed, p.replay, EPOCH, heartbeat_ms=100)
    p.metrics_port = free_port()
    yield p, engine, stack_endpoints.kafka_bootstrap
    p.stop_all()
    engine.close()


def _start_bridge(p: Pipeline) -> None:
    p.start("bridge", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(p.metrics_port)})


def _health(p: Pipeline) -> dict:
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/health", timeout=5).read())
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON
        return json.loads(exc.read())
    except OSError:
        return {}


def _wait_watermark(p: Pipeline, last: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert p.procs["bridge"].poll() is None, f"the bridge exited:\n{p.log('bridge')}"
        h = _health(p)
        if h.get("status") == "ok" and (h.get("watermark") or 0) >= last:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"watermark {h.get('watermark')} never reached {last}:\n{p.log('bridge')}")
        time.sleep(0.3)


def _dlq(p: Pipeline, bootstrap: str, want: int) -> list:
    return read_topics(bootstrap, [p.topics["dlq"]], until=lambda rs: len(rs) >= want, timeout=60)


def _event_records(p: Pipeline, bootstrap: str, seqs: set[int]) -> list:
    topics = [p.topics[t] for t in ("updates", "trades", "balances")]
    return read_topics(bootstrap, topics, until=lambda rs: set(seqs_of(rs)) >= seqs, timeout=120)


def _checkpoint(p: Pipeline, bootstrap: str) -> Checkpoint:
    cps = read_topics(bootstrap, [p.topics["checkpoint"]], until=bool, timeout=60)
    return Checkpoint.from_bytes(cps[-1].value())


def test_oversized_events_and_frames_are_dead_lettered_within_the_broker_limit(rig):
    """Issue item 5: a 3 MB client_order_id killed the bridge (its dead letter exceeded the broker's
    limit) and every restart replayed the same seq and died again."""
    p, engine, bootstrap = rig
    events = engine_events(EPOCH, 600)
    updates = [e for e in events if type(e).__name__ == "OrderUpdate"]
    big_feed, big_replay = oversized(updates[5]), oversized(updates[60])
    events = [{big_feed.seq: big_feed, big_replay.seq: big_replay}.get(e.seq, e) for e in events]
    _start_bridge(p)
    engine.append_events(events, skip={big_replay.seq})  # that one only through the replay service
    # Frames over the limit that stand for no seq: dead-lettered, truncated.
    engine.send([pack(1, EPOCH, 10**7, 1), b"\xc3\x01" + b"\x00" * 3_000_000])
    engine.send([b"x" * 2_000_000, b"y" * 2_000_000])
    last = events[-1].seq
    _wait_watermark(p, last)
    genuine = {e.seq for e in events} - {big_feed.seq, big_replay.seq}
    records = _event_records(p, bootstrap, genuine)
    assert set(seqs_of(records)) == genuine
    assert_ceilings_cover(bootstrap, p.topics["checkpoint"], records)
    dlq = _dlq(p, bootstrap, 4)
    accounted = [r for r in dlq if dict(r.headers()).get("accounted") == b"1"]
    assert sorted(int(dict(r.headers())["seq"]) for r in accounted) == sorted([big_feed.seq, big_replay.seq])
    for r in dlq:  # every one was accepted by a broker with the default 1 MiB limit
        h = dict(r.headers())
        assert h["truncated"] == b"1" and int(h["size"]) > 2_000_000 and len(h["sha256"]) == 64
    assert {dict(r.headers())["reason"] for r in dlq} == {b"oversized_event", b"oversized", b"bad_header"}

    # A restart resumes past the oversized seqs: no crash loop, no second dead letter.
    p.kill("bridge", signal.SIGTERM)
    cp = _checkpoint(p, bootstrap)
    assert cp.epoch == EPOCH and cp.watermark >= last and cp.ceiling >= last
    _start_bridge(p)
    more = engine_events(EPOCH, 800)[len(events) :]
    engine.append_events(more)
    _wait_watermark(p, more[-1].seq)
    assert len(_dlq(p, bootstrap, 4)) == 4


def test_the_unpublishable_marker_is_dead_lettered_and_the_watermark_passes_it(rig):
    """Protocol addition A: the engine's "seq N cannot be published" marker, from the feed and
    from the replay service."""
    p, engine, bootstrap = rig
    events = engine_events(EPOCH, 400)
    on_feed, replay_only = events[40].seq, events[300].seq
    _start_bridge(p)
    for ev in events:
        if ev.seq in (on_feed, replay_only):
            engine.append(*marker(EPOCH, ev.seq), publish=ev.seq == on_feed)
        else:
            engine.append(*frames_of(ev))
    last = events[-1].seq
    _wait_watermark(p, last)
    genuine = {e.seq for e in events} - {on_feed, replay_only}
    assert set(seqs_of(_event_records(p, bootstrap, genuine))) == genuine
    dlq = _dlq(p, bootstrap, 2)
    assert sorted(int(dict(r.headers())["seq"]) for r in dlq) == sorted([on_feed, replay_only])
    for r in dlq:
        h = dict(r.headers())
        assert h["reason"] == b"unpublishable_event" and h["accounted"] == b"1" and h["epoch"] == str(EPOCH).encode()
        assert json.loads(h["detail"])["reason"] == "too_large"


def test_a_forged_epoch_is_dead_lettered_and_the_real_epoch_is_not_dropped(rig):
    """Issue item 11: one valid-looking event of epoch+1 made the bridge switch epoch and then drop
    the real epoch's events without a dead letter."""
    p, engine, bootstrap = rig
    events = engine_events(EPOCH, 600)
    _start_bridge(p)
    engine.append_events(events[:300])
    _wait_watermark(p, events[299].seq)
    forged = engine_events(EPOCH + 1, 3, seed=9)[:3]
    for ev in forged:
        engine.send(list(frames_of(ev)))
    engine.send([pack(HEARTBEAT, EPOCH + 1, 5), b""])
    engine.append_events(events[300:])
    last = events[-1].seq
    _wait_watermark(p, last)
    records = _event_records(p, bootstrap, {e.seq for e in events})
    assert set(seqs_of(records)) == {e.seq for e in events}
    assert all(dict(r.headers())["epoch"] == str(EPOCH).encode() for r in records)
    dlq = _dlq(p, bootstrap, len(forged))
    assert [dict(r.headers())["reason"] for r in dlq] == [b"unconfirmed_epoch"] * len(forged)
    assert sorted(int(dict(r.headers())["seq"]) for r in dlq) == sorted(e.seq for e in forged)
    assert "epoch changed" not in p.log("bridge")
    assert _checkpoint(p, bootstrap).epoch == EPOCH

    # The engine really starts a new epoch: followed once its replay service confirms it.
    new = engine_events(EPOCH + 7, 300, seed=3)
    engine.new_epoch(EPOCH + 7)
    engine.append_events(new)
    deadline = time.monotonic() + 120
    while _health(p).get("epoch") != EPOCH + 7 or (_health(p).get("watermark") or 0) < new[-1].seq:
        assert time.monotonic() < deadline and p.procs["bridge"].poll() is None, p.log("bridge")
        time.sleep(0.3)
    want = {(EPOCH, e.seq) for e in events} | {(EPOCH + 7, e.seq) for e in new}
    topics = [p.topics[t] for t in ("updates", "trades", "balances")]
    everything = read_topics(bootstrap, topics, until=lambda rs: _ids(rs) >= want, timeout=120)
    assert _ids(everything) == want
    assert_ceilings_cover(bootstrap, p.topics["checkpoint"], everything)


def _ids(records) -> set[tuple[int, int]]:
    return {(int(dict(r.headers())["epoch"]), int(dict(r.headers())["seq"])) for r in records}
