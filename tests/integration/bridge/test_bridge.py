"""The bridge between a real engine process and the real Kafka: every seq, exactly as journaled."""

from __future__ import annotations

import json
import signal
import struct
import time
import urllib.request

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.journal import Journal
from engine.settings import EngineSettings
from schemas.codec import decode, encode
from schemas.events import OrderUpdate, Trade
from schemas.wire import HEADER, pack
from tests.integration.pipeline import Pipeline, free_port, read_topics, seqs_of

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(stack_endpoints, tmp_path):
    p = Pipeline(stack_endpoints.env(), tmp_path)
    yield p
    p.stop_all()


def _journal_events(p: Pipeline):
    s = EngineSettings(_env_file=None, journal_dir=p.workdir / "journal")
    with Journal.open(s.journal_dir, s.symbol_specs()) as journal:
        return list(journal.read_events(1, 0, limit=10**9))


def _complete(last_seq):
    def check(records):
        return set(seqs_of(records)) >= set(range(1, last_seq + 1))

    return check


def _assert_log_matches_journal(p: Pipeline, bootstrap: str, last_seq: int) -> list:
    # Let every GTT expire, wait until the bridge has relayed everything the engine has (it may be
    # replaying), then stop the engine so the journal is final.
    topics = [p.topics[t] for t in ("updates", "trades", "balances")]
    settled = p.settle()
    read_topics(bootstrap, topics, until=_complete(settled), timeout=120)
    p.kill("engine", signal.SIGTERM)
    journal = {e.seq: e for e in _journal_events(p)}
    final = max(journal)
    assert final >= settled >= last_seq and set(journal) == set(range(1, final + 1))
    records = read_topics(bootstrap, topics, until=_complete(final), timeout=120)
    assert set(seqs_of(records)) == set(journal), "the log lacks seqs the journal has (or has others)"
    for r in records:
        ev = decode(r.value())
        assert ev == journal[ev.seq], "a record differs from the journal"
        if isinstance(ev, Trade):
            assert int(r.key()) in (ev.taker_user_id, ev.maker_user_id)
        else:
            assert int(r.key()) == ev.user_id
        assert r.topic() == (
            p.topics["updates"] if isinstance(ev, OrderUpdate) else
            p.topics["trades"] if isinstance(ev, Trade) else p.topics["balances"]
        )  # fmt: skip
    # Per partition, seqs only go up, except re-sends of seqs already there (after a kill -9):
    # the worker relies on this to treat "seq <= last applied" as a duplicate.
    by_partition = {}
    for r in records:
        by_partition.setdefault((r.topic(), r.partition()), []).append(r)
    for rs in by_partition.values():
        rs.sort(key=lambda r: r.offset())
        high, seen = 0, set()
        for seq in seqs_of(rs):
            assert seq > high or seq in seen, f"seq {seq} arrived after {high} without being a re-send"
            high, seen = max(high, seq), seen | {seq}
    trades = [r for r in records if r.topic() == p.topics["trades"]]
    per_trade = {}
    for r in trades:
        per_trade.setdefault(int(dict(r.headers())["seq"]), set()).add(dict(r.headers())["side"])
    assert all(sides >= {b"taker"} for sides in per_trade.values())
    assert_ceilings_cover(bootstrap, p.topics["checkpoint"], records)
    return records


def assert_ceilings_cover(bootstrap: str, checkpoint_topic: str, records) -> None:
    """The seq ceiling invariant, read back from the topics: for every event record (epoch E,
    seq s) a checkpoint of epoch E with ceiling >= s was written no later than the record (the
    bridge produces a record only after such a checkpoint was acknowledged)."""
    import bisect

    from schemas.checkpoint import Checkpoint

    cps = read_topics(bootstrap, [checkpoint_topic], until=bool, timeout=60)
    assert cps, "no checkpoint records"
    by_epoch = {}
    for c in sorted(cps, key=lambda c: (c.timestamp()[1], c.offset())):
        cp = Checkpoint.from_bytes(c.value())
        times, ceilings = by_epoch.setdefault(cp.epoch, ([], []))
        times.append(c.timestamp()[1])
        ceilings.append(max(cp.ceiling, ceilings[-1] if ceilings else 0))
    for r in records:
        h = dict(r.headers())
        epoch, seq, ts = int(h["epoch"]), int(h["seq"]), r.timestamp()[1]
        times, ceilings = by_epoch.get(epoch, ([], []))
        i = bisect.bisect_right(times, ts) - 1
        covered = ceilings[i] if i >= 0 else None
        assert covered is not None and covered >= seq, f"epoch {epoch} seq {seq} at {ts}: ceiling then {covered}"


def test_every_seq_reaches_kafka_even_across_a_bridge_kill_9(pipeline, stack_endpoints):
    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"])
    p.drive(client, 1_500, seed=1)
    time.sleep(1)
    p.kill("bridge")  # kill -9 mid-stream: in-flight records and the last checkpoint are lost
    last = p.drive(client, 1_500, seed=2)
    p.start("bridge", ["bridge"])
    last = max(last, p.drive(client, 500, seed=3))
    client.close()
    _assert_log_matches_journal(p, stack_endpoints.kafka_bootstrap, last)


def test_every_seq_survives_an_engine_kill_9_and_restart(pipeline, stack_endpoints):
    p = pipeline
    p.start("engine", ["engine", "run"])
    client = p.client()
    metrics_port = free_port()
    p.start("bridge", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(metrics_port)})
    p.drive(client, 1_000, seed=4)
    p.kill("engine")
    client.close()
    p.start("engine", ["engine", "run"])
    client = p.client()
    last = p.drive(client, 1_000, seed=5)
    client.close()
    _assert_log_matches_journal(p, stack_endpoints.kafka_bootstrap, last)
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=5).read())
    assert health["status"] == "ok" and health["watermark"] == health["engine_seq"] >= last
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert f"ohs_bridge_watermark {float(health['watermark'])}" in metrics


GARBAGE = [
    ([b"only-one-frame"], "bad_batch"),
    ([b"three", b"frames", b"here"], "bad_frame_count"),
    ([b"\x00\x00\x00\x02" + pack(1, 1, 1, 7)], "bad_batch"),
    ([b"x" * 10, b"payload"], "bad_header"),
    ([b"XX" + b"\x00" * (HEADER.size - 2), b"p"], "bad_magic"),
    ([pack(42, 1, 1), b"p"], "unknown_type"),
    ([pack(1, 1, 1, 7), b"\xc3\x01" + b"\x00" * 3], "truncated"),
    ([pack(1, 1, 1, 7), b"\xc3\x01" + b"\xee" * 8 + b"body"], "unknown_fingerprint"),
    ([pack(1, 1, 1, 7), b"not avro at all"], "bad_magic"),
    ([pack(1, 1, 1, 7), b"\xc3\x01" + b"\x00" * 2_000_000], "oversized"),
]


def test_bad_input_goes_to_the_dlq_and_the_stream_is_unaffected(pipeline, stack_endpoints):
    p = pipeline
    injector_endpoint = f"tcp://127.0.0.1:{free_port()}"
    push = zmq.Context.instance().socket(zmq.XPUB)  # sees the bridge's subscription arrive
    push.bind(injector_endpoint)
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"], {"OHS_BRIDGE_FEED_ENDPOINT": f"{p.feed},{injector_endpoint}"})
    assert push.poll(60_000) and push.recv()[:1] == b"\x01", "the bridge subscribes to the injector too"
    p.drive(client, 300, seed=6)
    # A valid payload under a header that lies about it, and a copy of a real event re-sent:
    real = _journal_events(p)[5]
    garbage = [*GARBAGE, ([pack(1, real.epoch, real.seq + 10**6, 1), encode(real)], "header_mismatch")]
    for frames, _ in garbage:
        push.send_multipart(frames)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    def fuzz(frames):
        push.send_multipart(frames)

    fuzz()
    last = p.drive(client, 300, seed=7)
    client.close()
    _assert_log_matches_journal(p, stack_endpoints.kafka_bootstrap, last)

    def enough(records):
        return {dict(r.headers())["reason"].decode() for r in records} >= {r for _, r in garbage}

    dlq = read_topics(stack_endpoints.kafka_bootstrap, [p.topics["dlq"]], until=enough, timeout=60)
    reasons = {dict(r.headers())["reason"].decode() for r in dlq}
    assert reasons >= {reason for _, reason in garbage}
    for r in dlq:
        count = struct.unpack(">I", r.value()[:4])[0]
        assert count >= 1 and dict(r.headers())["source"] == b"bridge"
    push.close(linger=0)
