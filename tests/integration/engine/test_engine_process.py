"""The engine as a real process: gateway, feed, replay, and recovery after SIGKILL.

No Kafka or Cassandra needed: real ZeroMQ sockets on loopback, a real
``ohs engine run`` subprocess, a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from engine.client import EngineClient, EngineClientError
from engine.journal import Journal
from engine.recovery import recover
from engine.settings import EngineSettings
from schemas.codec import decode
from schemas.wire import HEARTBEAT, split_batch, unpack
from tests.ports import free_port

pytestmark = pytest.mark.integration


def _port() -> int:
    return free_port()


@pytest.fixture
def engine_env(tmp_path):
    ports = {"GATEWAY": _port(), "FEED": _port(), "REPLAY": _port()}
    env = {**os.environ, "OHS_ENGINE_JOURNAL_DIR": str(tmp_path / "journal")}
    env.update({f"OHS_ENGINE_{k}_ENDPOINT": f"tcp://127.0.0.1:{p}" for k, p in ports.items()})
    env["OHS_ENGINE_HEARTBEAT_MS"] = "100"
    env["OHS_ENGINE_METRICS_PORT"] = str(free_port())
    return env


def _wait_ready(client_endpoint):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c = EngineClient(client_endpoint, timeout_ms=1000)
        try:
            c.deposit(999, "USD", 1)
            return
        except EngineClientError:
            time.sleep(0.2)
        finally:
            c.close()
    raise AssertionError("engine did not answer within 30 s")


def _drive(client, n):
    results = []
    client.deposit(1, "USD", 10**9)
    client.deposit(2, "BTC", 10**6)
    for i in range(n):
        if i % 2:
            results.append(client.place(1, "BTC-USD", "BUY", 1 + i % 3, 100 + i % 5, client_order_id=f"b{i}"))
        else:
            results.append(client.place(2, "BTC-USD", "SELL", 1 + i % 4, 101 + i % 5))
        if i % 7 == 0:
            results.append(client.cancel(1, client_order_id=f"b{i - 1}"))
    return results


def test_feed_replay_gateway_and_recovery_after_sigkill(engine_env):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.SUB)
    pull.setsockopt(zmq.SUBSCRIBE, b"")
    pull.connect(engine_env["OHS_ENGINE_FEED_ENDPOINT"])
    proc = subprocess.Popen([sys.executable, "-m", "ohs.cli", "engine", "run"], env=engine_env)
    try:
        _wait_ready(engine_env["OHS_ENGINE_GATEWAY_ENDPOINT"])
        # The feed is live once a heartbeat arrives; until then the subscription is not in place.
        assert pull.poll(10_000), "no heartbeat on the feed"
        while pull.poll(0):
            pull.recv()
        client = EngineClient(engine_env["OHS_ENGINE_GATEWAY_ENDPOINT"], timeout_ms=20_000)
        results = _drive(client, 200)
        assert any(r.accepted for r in results) and any(not r.accepted for r in results)
        last_seq = max(r.last_seq for r in results)

        # The feed: every seq in order, decodable, headers consistent; heartbeats carry the last seq.
        seen, heartbeat_seq = [], 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(seen) < last_seq or heartbeat_seq < last_seq):
            if pull.poll(200):
                entries, problem = split_batch(pull.recv())  # a batch of entries per message
                assert not problem, problem
                for header, payload in entries:
                    h = unpack(header)
                    if h.type == HEARTBEAT:
                        heartbeat_seq = h.seq
                        continue
                    ev = decode(payload)
                    assert (ev.seq, ev.epoch) == (h.seq, h.epoch)
                    seen.append(ev.seq)
        first = results[0].first_seq - 2  # the two deposits of _drive come first
        assert seen == list(range(first, last_seq + 1))
        assert heartbeat_seq == last_seq

        # /metrics and /health of the engine process, served from its own thread.
        port = engine_env["OHS_ENGINE_METRICS_PORT"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        values = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        assert values["ohs_engine_last_seq"].value >= last_seq
        assert values["ohs_engine_events_total"].value >= last_seq - first + 1
        assert values["ohs_engine_commands_total"].value >= len(results)
        assert values["ohs_build_info"].labels["component"] == "engine"
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
        assert health["status"] == "ok" and health["last_seq"] >= last_seq

        # Replay: exact ranges, END carries the engine's last seq, a wrong epoch is refused.
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(engine_env["OHS_ENGINE_REPLAY_ENDPOINT"])
        dealer.send_multipart([b"INFO"])
        _, info = dealer.recv_multipart()
        epoch, info_last = struct.unpack(">QQ", info)
        assert info_last == last_seq
        dealer.send_multipart([b"REPLAY", struct.pack(">QQQ", epoch, 10, 20)])
        got = []
        while True:
            frames = dealer.recv_multipart()
            if frames[0] == b"END":
                assert struct.unpack(">QQ", frames[1]) == (epoch, last_seq)
                break
            assert frames[0] == b"EVS" and len(frames) == 2
            got += [decode(payload).seq for _, payload in split_batch(frames[1])[0]]
        assert got == list(range(10, 21))
        dealer.send_multipart([b"REPLAY", struct.pack(">QQQ", epoch + 1, 1, 5)])
        assert dealer.recv_multipart() == [b"ERR", f"epoch_mismatch:{epoch}".encode()]
        dealer.close(linger=0)

        # Malformed gateway requests are answered with an error; the engine keeps working.
        raw = ctx.socket(zmq.DEALER)
        raw.connect(engine_env["OHS_ENGINE_GATEWAY_ENDPOINT"])
        for junk in ([b"CMD", b"{not json"], [b"CMD", b'{"type": "place", "side": "UP"}'], [b"NOPE"]):
            raw.send_multipart(junk)
            assert raw.recv_multipart()[0] == b"ERR"
        raw.close(linger=0)

        # SIGKILL mid-flow, restart: the state equals the journal's, and the seq goes on without a gap.
        more = [client.place(2, "BTC-USD", "SELL", 1, 300 + i) for i in range(50)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        client.close()
        acknowledged_last = max(r.last_seq for r in more)

        proc = subprocess.Popen([sys.executable, "-m", "ohs.cli", "engine", "run"], env=engine_env)
        _wait_ready(engine_env["OHS_ENGINE_GATEWAY_ENDPOINT"])
        client = EngineClient(engine_env["OHS_ENGINE_GATEWAY_ENDPOINT"], timeout_ms=20_000)
        after = client.deposit(3, "USD", 5)
        # _wait_ready's probe deposits (user 999) may come first, each exactly one event.
        assert after.first_seq > acknowledged_last
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        client.close()

        settings = EngineSettings(_env_file=None, journal_dir=engine_env["OHS_ENGINE_JOURNAL_DIR"])
        with Journal.open(settings.journal_dir, settings.symbol_specs()) as journal:
            events = list(journal.read_events(1, 0, limit=10**9))
            recovered, _ = recover(journal)
        assert [e.seq for e in events] == list(range(1, recovered.last_seq + 1))
        assert recovered.last_seq == after.last_seq
        assert {e.epoch for e in events} == {epoch}
        assert recovered.check_invariants() == []
        # Every order acknowledged before the SIGKILL survived it (sells far above any bid: still open).
        open_ids = {o.order_id for o in recovered.open_orders(2)}
        assert all(r.accepted for r in more) and {r.order_id for r in more} <= open_ids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pull.close(linger=0)
