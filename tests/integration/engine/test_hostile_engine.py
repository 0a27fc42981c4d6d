"""A real ``ohs engine run`` process against hostile input (issue 12, items 3, 4 and 12): each
single input that used to end the process, or starve its commands, and the process alive after.

No Kafka or Cassandra: real ZeroMQ over loopback TCP, real subprocesses, a real SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from engine.client import EngineClient, EngineClientError
from engine.commands import Deposit
from engine.core import Engine
from engine.journal import Journal, event_record
from engine.settings import EngineSettings
from schemas.codec import decode
from schemas.wire import UNPUBLISHABLE, parse_marker, split_batch, unpack
from tests.ports import free_port
from tests.unit.engine_edges.legacy_journal import build as build_legacy

pytestmark = pytest.mark.integration
QQQ, QQ = struct.Struct(">QQQ"), struct.Struct(">QQ")
SPECS = EngineSettings(_env_file=None).symbol_specs()


@pytest.fixture
def env(tmp_path):
    ports = {"GATEWAY": free_port(), "FEED": free_port(), "REPLAY": free_port()}
    e = {**os.environ, "OHS_ENGINE_JOURNAL_DIR": str(tmp_path / "journal")}
    e.update({f"OHS_ENGINE_{k}_ENDPOINT": f"tcp://127.0.0.1:{p}" for k, p in ports.items()})
    e["OHS_ENGINE_METRICS_PORT"] = "0"
    return e


class Engine_:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "ohs.cli", "engine", "run"], env=env)
        self.ctx = zmq.Context.instance()
        self.sockets: list[zmq.Socket] = []
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"engine exited with {self.proc.returncode}"
            c = EngineClient(self.env["OHS_ENGINE_GATEWAY_ENDPOINT"], timeout_ms=1000)
            try:
                # Refused (no funds): no event, so the journal stays as the test wrote it.
                c.batch([{"type": "withdraw", "user_id": 999_999, "asset": "USD", "amount": 1}])
                return
            except EngineClientError:
                time.sleep(0.2)
            finally:
                c.close()
        raise AssertionError("engine did not answer within 60 s")

    def dealer(self, which: str, rcvhwm: int | None = None, rcvbuf: int | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:  # set before connect: they apply to the pipe and socket it creates
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf is not None:
            sock.setsockopt(zmq.RCVBUF, rcvbuf)
        sock.connect(self.env[f"OHS_ENGINE_{which}_ENDPOINT"])
        self.sockets.append(sock)
        return sock

    def alive(self) -> bool:
        """The process runs and answers a command from a new client."""
        c = EngineClient(self.env["OHS_ENGINE_GATEWAY_ENDPOINT"], timeout_ms=20_000)
        try:
            return self.proc.poll() is None and c.deposit(5, "BTC", 1).accepted
        finally:
            c.close()

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(20) == 0
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()


def _ask(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 20_000) -> list[bytes]:
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), f"no answer to {[f[:20] for f in frames][:3]}"
    return sock.recv_multipart()


def test_hostile_gateway_and_replay_input_leaves_the_engine_serving(env):
    eng = Engine_(env)
    try:
        gw = eng.dealer("GATEWAY")
        # Item 3's reproducer: this ended the engine with RecursionError.
        status, reason = _ask(gw, [b"CMD", b"[" * 100_000])
        assert status == b"ERR" and b"nested deeper than 2" in reason
        status, reason = _ask(gw, [b"CMD", b" " * (1 << 20) + b"{}"])
        assert status == b"ERR" and b"exceeds the limit" in reason
        status, reason = _ask(gw, [b"CMD", b"{}", *([b"x"] * 20_000)])
        assert status == b"ERR" and b"20002 frames" in reason
        # Item 4's reproducer: user_id 2**64 was journaled, then killed the engine in header_for.
        place = {"type": "place", "symbol": "BTC-USD", "side": "BUY", "order_type": "LIMIT"}
        place.update(time_in_force="GTC", qty=1, price=100)
        status, body = _ask(gw, [b"CMD", json.dumps([{**place, "user_id": 2**64}]).encode()])
        assert status == b"OK" and json.loads(body)[0] == {
            "accepted": False,
            "reason": "INVALID_USER",
            "order_id": 0,
            "first_seq": 0,
            "last_seq": 0,
        }
        status, body = _ask(
            gw, [b"CMD", json.dumps([{**place, "user_id": 1, "client_order_id": "c" * 900_000}]).encode()]
        )
        assert json.loads(body)[0]["reason"] == "INVALID_CLIENT_ORDER_ID"
        gw.close()
        # A frame beyond 4x the request limit: ZeroMQ drops that peer unread. The engine goes on.
        big = eng.dealer("GATEWAY")
        big.send_multipart([b"CMD", b"x" * (5 << 20)])
        big.close()
        rp = eng.dealer("REPLAY")
        for junk in ([b"REPLAY"], [b"REPLAY", b"short"], [b""], [b"REPLAY", *([b"x"] * 5000)]):
            assert _ask(rp, junk) == [b"ERR", b"bad_request"]
        huge = eng.dealer("REPLAY")
        huge.send_multipart([b"REPLAY", b"x" * 100_000])  # beyond the replay socket's frame limit
        huge.close()
        assert _ask(rp, [b"INFO"])[0] == b"INFO"
        rp.close()
        assert eng.alive()
    finally:
        eng.stop()
    # Nothing out of range reached the journal.
    with Journal.open(Path(env["OHS_ENGINE_JOURNAL_DIR"]), SPECS, fsync="never") as journal:
        users = {getattr(e, "user_id", 0) for e in journal.read_events(1, 0, 10**9)}
        assert 2**64 not in users


def _journal_of(directory: Path, events: int) -> int:
    """A journal of ``events`` deposits, written directly (fast); returns its epoch."""
    journal = Journal.open(directory, SPECS, fsync="never")
    core = Engine(SPECS, journal.epoch)
    ts = time.time_ns() - 10**9
    for i in range(events):
        cmd = replace(Deposit(0, 1 + i % 100, "USD", 1), ts_ns=ts + i)
        journal.append(cmd, core.execute(cmd).events)
    journal.close()
    return journal.epoch


def test_commands_keep_their_latency_behind_ten_big_replays(env):
    """Ten queued REPLAY(1..300000) raised the gateway's latency from 1 ms to 11.8 s: the engine
    sent every replay whole before it read the next command. Now the command is answered while
    every replay is still running, and each replay still completes as the bridge expects: EVS
    batches in seq order, then END with (epoch, last).

    The order is the engine's own record, not what this process happens to read first (it polls
    eleven sockets, and on a loaded machine it may find an END and the OK in one poll): each END
    carries the engine's last seq when the replay ended, so n + 1 there means the command's deposit
    was applied before that replay ended. The replays are kept running by not reading them: each
    client holds at most one message and a few KiB, so its replay soon meets a full pipe and waits
    (ROUTER_MANDATORY), far short of its 10,000 events. A command stuck behind a replay would then
    never be answered."""
    n = 10_000
    epoch = _journal_of(Path(env["OHS_ENGINE_JOURNAL_DIR"]), n)
    # A Unix socket buffers ~200 KiB and a pipe 1,000 messages of one event: ~4,000 of these
    # ~70-byte events, well short of 10,000 (loopback TCP's autotuned buffers took all of 6,000).
    replay = f"ipc://{Path(env['OHS_ENGINE_JOURNAL_DIR']).parent / 'replay.sock'}"
    eng = Engine_(
        {
            **env,
            "OHS_ENGINE_REPLAY_ENDPOINT": replay,
            "OHS_ENGINE_REPLAY_CHUNK": "1",
            "OHS_ENGINE_REPLAY_TURN_EVENTS": "8",
            # never abandoned while this test waits on the command (that would free the loop)
            "OHS_ENGINE_REPLAY_STALL_MS": "600000",
        }
    )
    try:
        clients = [eng.dealer("REPLAY", rcvhwm=1, rcvbuf=4096) for _ in range(10)]
        for c in clients:
            c.send_multipart([b"REPLAY", QQQ.pack(epoch, 1, 300_000)])
        greedy = eng.dealer("REPLAY")  # one client, ten requests: one is served, nine refused at once
        for _ in range(10):
            greedy.send_multipart([b"REPLAY", QQQ.pack(epoch, 1, 300_000)])
        # Every replay under way: each client has a message waiting (looked at, not read).
        deadline = time.monotonic() + 120
        while not all(c.poll(0) for c in clients):
            assert time.monotonic() < deadline, "a replay never started"
            time.sleep(0.05)
        gw = eng.dealer("GATEWAY")
        gw.send_multipart([b"CMD", json.dumps({"type": "deposit", "user_id": 7, "asset": "BTC", "amount": 1}).encode()])
        assert gw.poll(60_000), "the command was not answered while ten replays waited on their readers"
        assert gw.recv_multipart()[0] == b"OK"
        seqs: dict[int, list[int]] = {i: [] for i in range(len(clients))}
        ended: dict[int, bytes] = {}
        poller = zmq.Poller()
        for c in clients:
            poller.register(c, zmq.POLLIN)
        while len(ended) < len(clients):
            assert time.monotonic() < deadline, f"replays did not finish: {[len(s) for s in seqs.values()]}"
            for sock, _ in poller.poll(100):
                i = clients.index(sock)
                while sock.poll(0):
                    frames = sock.recv_multipart()
                    if frames[0] == b"END":
                        ended[i] = frames[1]
                    else:
                        assert frames[0] == b"EVS", frames[:1]
                        seqs[i] += [decode(payload).seq for _, payload in split_batch(frames[1])[0]]
        # + the command's deposit: every replay ended after the command was applied.
        assert set(ended.values()) == {QQ.pack(epoch, n + 1)}, {QQ.unpack(v) for v in ended.values()}
        assert all(s == list(range(1, n + 1)) for s in seqs.values())
        refused = []
        while greedy.poll(1000):
            frames = greedy.recv_multipart()
            if frames[0] == b"ERR":
                refused.append(frames[1])
        assert refused == [b"busy:client"] * 9
        assert eng.alive()
    finally:
        eng.stop()


def test_a_journal_from_before_the_rules_is_served_and_audited_not_a_crash_loop(env):
    """Item 4's journal: a journaled user_id 2**64 killed every restart at that seq, and ``ohs audit``
    exited with OverflowError. Now the engine starts (twice, the second after a SIGKILL), replays a
    marker for each seq it cannot publish, and the audit names them."""
    directory = Path(env["OHS_ENGINE_JOURNAL_DIR"])
    legacy = build_legacy(directory, SPECS)
    info = subprocess.run(
        [sys.executable, "-m", "ohs.cli", "engine", "info"], env=env, capture_output=True, text=True, check=True
    )
    summary = json.loads(info.stdout)
    assert (summary["last_seq"], summary["unchecked"], summary["unpublishable"]) == (
        legacy.last_seq,
        legacy.bad_commands,
        len(legacy.unpublishable),
    )
    eng = Engine_(env)
    try:
        os.kill(eng.proc.pid, signal.SIGKILL)
        eng.proc.wait(10)
        eng = Engine_(env)
        rp = eng.dealer("REPLAY")
        rp.send_multipart([b"REPLAY", QQQ.pack(legacy.epoch, 1, legacy.last_seq)])
        by_seq = {e.seq: e for e in legacy.events}
        got = []
        while True:
            assert rp.poll(20_000)
            frames = rp.recv_multipart()
            if frames[0] == b"END":
                break
            assert frames[0] == b"EVS"
            for header, payload in split_batch(frames[1])[0]:
                h = unpack(header)
                got.append(h.seq)
                if h.seq in legacy.unpublishable:
                    marker = parse_marker(payload)
                    record = event_record(by_seq[h.seq])
                    assert h.type == UNPUBLISHABLE and marker["reason"] == legacy.unpublishable[h.seq]
                    assert marker["sha256"] == hashlib.sha256(record).hexdigest()
                else:
                    assert decode(payload) == by_seq[h.seq]
        assert got == list(range(1, legacy.last_seq + 1))
        rp.close()
        assert eng.alive()
    finally:
        eng.stop()
    audit = subprocess.run(
        [sys.executable, "-m", "ohs.cli", "audit", "--json", "--skip-kafka", "--skip-cassandra"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert audit.returncode == 1, audit.stderr[-2000:]
    report = json.loads(audit.stdout)
    assert report["journal_check"]["unpublishable"] == len(legacy.unpublishable)
    assert report["journal"]["unpublishable_seqs"] == sorted(legacy.unpublishable)
    assert {e["seq"] for e in report["problems"] if e["area"] == "journal"} == set(legacy.unpublishable)
