"""The engine service against hostile input and heavy replays, loop turn by loop turn.

In-process ZeroMQ (inproc) and explicit ``service_io`` calls, so the order in which things happen
is exact: no servers, no timing. The same scenarios against a real engine process, over TCP, are
in ``tests/integration/engine/test_hostile_engine.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid

import pytest
import zmq

import engine.replay as replay_mod
import engine.service as service_mod
from engine.commands import Deposit, PlaceOrder
from engine.journal import Journal, event_record
from engine.service import EngineFatal, EngineService
from engine.settings import EngineSettings
from schemas.codec import decode
from schemas.events import OrderType, Side, TimeInForce
from schemas.wire import UNPUBLISHABLE, parse_marker, split_batch, unpack
from tests.unit.engine_edges.legacy_journal import build as build_legacy

QQQ, QQ = struct.Struct(">QQQ"), struct.Struct(">QQ")


@pytest.fixture
def make(tmp_path):
    made: list[tuple[EngineService, list[zmq.Socket]]] = []
    ctx = zmq.Context.instance()

    def _make(**kw) -> tuple[EngineService, Peers]:
        tag = uuid.uuid4().hex
        ends = {k: f"inproc://{k}-{tag}" for k in ("feed", "replay", "gateway")}
        kw.setdefault("journal_dir", tmp_path / "journal")
        s = EngineSettings(_env_file=None, **{f"{k}_endpoint": v for k, v in ends.items()}, **kw)
        svc = EngineService(s, ctx)
        peers = Peers(ctx, ends)
        made.append((svc, peers.sockets))
        return svc, peers

    yield _make
    for svc, socks in made:
        for sock in socks:
            sock.close(linger=0)
        svc.close()


class Peers:
    def __init__(self, ctx, ends):
        self.ctx, self.ends, self.sockets = ctx, ends, []

    def dealer(self, which: str, rcvhwm: int = 0) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        if rcvhwm:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.connect(self.ends[which])
        self.sockets.append(sock)
        return sock


def _turns(svc, n=1):
    for _ in range(n):
        svc.service_io(0)


def _drain(sock) -> list[list[bytes]]:
    out = []
    while sock.poll(0):
        out.append(sock.recv_multipart())
    return out


def _entries(messages) -> list[tuple[bytes, bytes]]:
    """(header, payload) of every event in replay replies (EVS batches), in order."""
    out = []
    for m in messages:
        if m[0] == b"EVS":
            entries, problem = split_batch(m[1])
            assert not problem, problem
            out += entries
    return out


def _seqs(messages) -> list[int]:
    return [decode(payload).seq for _h, payload in _entries(messages)]


def _fund(svc, n):
    svc.submit([Deposit(svc.stamp(), 1 + i % 50, "USD", 1) for i in range(n)])


# ------------------------------------------------------------------------------- the gateway
def test_hostile_gateway_requests_get_err_and_the_engine_goes_on(make):
    svc, peers = make()
    gw = peers.dealer("gateway")
    junk = [
        [b"CMD", b"[" * 100_000],  # the reproducer of item 3
        [b"CMD", b"x" * ((1 << 20) + 1)],
        [b"CMD", b"{}", *([b"f"] * 10_000)],
        [b"NOPE"],
        [b""],
        [b"CMD", b"\xff\xfe[\x00"],
    ]
    for frames in junk:
        gw.send_multipart(frames)
    _turns(svc, 2)
    replies = _drain(gw)
    assert [r[0] for r in replies] == [b"ERR"] * len(junk)
    assert b"nested deeper" in replies[0][1] and b"exceeds the limit" in replies[1][1]
    assert b"10002 frames" in replies[2][1]
    assert svc.stats.gateway_errors == len(junk)
    gw.send_multipart([b"CMD", json.dumps({"type": "deposit", "user_id": 1, "asset": "USD", "amount": 3}).encode()])
    _turns(svc)
    ((status, body),) = _drain(gw)
    assert status == b"OK" and json.loads(body)[0]["accepted"]


def test_out_of_range_commands_are_answered_and_never_journaled(make):
    svc, peers = make()
    gw = peers.dealer("gateway")
    bad = [
        {
            "type": "place",
            "user_id": 2**64,
            "symbol": "BTC-USD",
            "side": "BUY",
            "order_type": "LIMIT",
            "time_in_force": "GTC",
            "qty": 1,
            "price": 100,
        },
        {
            "type": "place",
            "user_id": 1,
            "symbol": "BTC-USD",
            "side": "BUY",
            "order_type": "LIMIT",
            "time_in_force": "GTC",
            "qty": 1,
            "price": 100,
            "client_order_id": "c" * 900_000,
        },
        {"type": "deposit", "user_id": 1, "asset": "USD", "amount": 2**63},
    ]
    size = svc.journal.path.stat().st_size
    gw.send_multipart([b"CMD", json.dumps(bad).encode()])
    _turns(svc)
    ((status, body),) = _drain(gw)
    results = json.loads(body)
    assert status == b"OK"
    assert [(r["accepted"], r["reason"], r["order_id"], r["last_seq"]) for r in results] == [
        (False, "INVALID_USER", 0, 0),
        (False, "INVALID_CLIENT_ORDER_ID", 0, 0),
        (False, "INVALID_AMOUNT", 0, 0),
    ]
    assert svc.journal.path.stat().st_size == size, "nothing journaled"
    assert svc.stats.out_of_range == 3 and svc.engine.last_seq == 0


def test_a_handler_failure_is_counted_and_survived_but_a_core_failure_stops(make, monkeypatch):
    svc, peers = make()
    gw = peers.dealer("gateway")

    def broken(*a, **kw):
        raise KeyError("a bug in parsing")

    monkeypatch.setattr(service_mod, "parse_request", broken)
    gw.send_multipart([b"CMD", b"{}"])
    _turns(svc)
    assert svc.stats.handler_errors == 1
    monkeypatch.undo()

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(svc.journal, "add", full_disk)
    with pytest.raises(EngineFatal, match="OSError"):
        svc.submit([Deposit(svc.stamp(), 1, "USD", 1)])


# -------------------------------------------------------------------------------- the replay
def _replay_all(sock, epoch, lo=1, hi=0):
    sock.send_multipart([b"REPLAY", QQQ.pack(epoch, lo, hi)])


def test_commands_are_answered_while_replays_are_still_running(make):
    """Ten REPLAY(1..300000) before one command: before, the engine sent every event of every
    replay in the same turn and the command waited behind them (1 ms -> 11.8 s). Now the command is
    answered in the turn it arrives, while no replay has finished yet."""
    svc, peers = make(replay_chunk=4, replay_turn_events=64)
    _fund(svc, 2_000)
    epoch = svc.engine.epoch
    clients = [peers.dealer("replay") for _ in range(10)]
    for c in clients:
        _replay_all(c, epoch, 1, 300_000)
    _turns(svc)  # the requests are taken in
    gw = peers.dealer("gateway")
    gw.send_multipart([b"CMD", json.dumps({"type": "deposit", "user_id": 7, "asset": "USD", "amount": 1}).encode()])
    _turns(svc)
    assert gw.poll(0), "the command is answered in the turn it arrived"
    assert svc.stats.replayed_events <= 2 * 64
    got = {id(c): _drain(c) for c in clients}
    assert all(frames and frames[-1][0] == b"EVS" for frames in got.values()), "every replay moved, none ended"
    # The replays go on, round-robin, and each ends as the protocol says: EVS 1..last, END (epoch, last).
    seqs = {id(c): _seqs(got[id(c)]) for c in clients}
    ended: dict[int, bytes] = {}
    for _ in range(10_000):
        _turns(svc)
        for c in clients:
            for frames in _drain(c):
                if frames[0] == b"END":
                    ended[id(c)] = frames[1]
                else:
                    seqs[id(c)] += _seqs([frames])
        if len(ended) == len(clients):
            break
    last = svc.engine.last_seq
    assert set(ended.values()) == {QQ.pack(epoch, last)}
    assert all(s == list(range(1, 2_001)) for s in seqs.values())


def test_one_replay_per_client_and_a_global_cap(make):
    svc, peers = make(replay_max_active=2)
    _fund(svc, 500)
    epoch = svc.engine.epoch
    a, b, c = (peers.dealer("replay") for _ in range(3))
    for _ in range(10):
        _replay_all(a, epoch)
    _replay_all(b, epoch)
    _replay_all(c, epoch)
    _turns(svc)
    assert [f for f in _drain(a) if f[0] == b"ERR"] == [[b"ERR", b"busy:client"]] * 9
    assert _drain(c) == [[b"ERR", b"busy:server"]]
    assert svc.stats.replay_busy == 10 and len(svc.replays.active) == 2


def test_a_request_returns_at_most_the_limit_then_the_client_asks_again(make, monkeypatch):
    monkeypatch.setattr(replay_mod, "REPLAY_LIMIT", 10)
    svc, peers = make()
    _fund(svc, 25)
    epoch, sock, got = svc.engine.epoch, peers.dealer("replay"), []
    lo = 1
    while True:
        _replay_all(sock, epoch, lo, 0)
        _turns(svc, 3)
        frames = _drain(sock)
        assert frames[-1] == [b"END", QQ.pack(epoch, 25)]
        batch = _seqs(frames[:-1])
        assert len(batch) <= 10
        if not batch:
            break
        got += batch
        lo = batch[-1] + 1
    assert got == list(range(1, 26))


def test_replays_of_a_client_that_left_or_stopped_reading_are_dropped(make):
    svc, peers = make(
        replay_chunk=1, replay_turn_events=1000, replay_stall_ms=100
    )  # a message per event: the pipe fills
    _fund(svc, 5_000)
    epoch = svc.engine.epoch
    gone = peers.dealer("replay")
    _replay_all(gone, epoch)
    _turns(svc)
    gone.close(linger=0)
    peers.sockets.remove(gone)
    for _ in range(500):  # until ZeroMQ has taken the peer's pipe down (asynchronously)
        _turns(svc)
        if not svc.replays.active:
            break
    assert not svc.replays.active, "a client that left: nobody to send the rest to"
    assert svc.stats.replayed_events < 600 and svc.stats.replay_abandoned == 0
    stuck = peers.dealer("replay", rcvhwm=10)
    _replay_all(stuck, epoch)
    _turns(svc, 2_000)  # one message per turn: the pipe (about a thousand messages) fills up
    for _ in range(50):
        if not svc.replays.active:
            break
        svc.service_io(20)
    assert not svc.replays.active and svc.stats.replay_abandoned == 1


@pytest.mark.parametrize(
    "frames",
    [
        [b"REPLAY"],
        [b"REPLAY", b"short"],
        [b"REPLAY", QQQ.pack(1, 1, 1), b"extra"],
        [b""],
        [b"INFO", b"x"],
        [b"REPLAY", *([b"x"] * 5000)],
    ],
    ids=["one", "short", "extra", "empty", "info-extra", "many-frames"],
)
def test_bad_replay_requests_get_err(make, frames):
    svc, peers = make()
    sock = peers.dealer("replay")
    sock.send_multipart(frames)
    _turns(svc)
    assert _drain(sock) == [[b"ERR", b"bad_request"]]
    sock.send_multipart([b"INFO"])
    _turns(svc)
    assert _drain(sock) == [[b"INFO", QQ.pack(svc.engine.epoch, svc.engine.last_seq)]]


# ----------------------------------------------------------------- a journal from before the rules
def test_unpublishable_events_go_out_as_markers_from_replay_and_feed(make, tmp_path):
    """Before: the engine journaled user_id 2**64, died in header_for, and every restart died again
    on the same seq. Now it starts, says so, and sends a marker wherever the event would go."""
    settings = EngineSettings(_env_file=None)
    legacy = build_legacy(tmp_path / "legacy", settings.symbol_specs())
    svc, peers = make(journal_dir=tmp_path / "legacy")
    assert (svc.recovery.unchecked, svc.recovery.unpublishable) == (legacy.bad_commands, len(legacy.unpublishable))
    assert svc.engine.last_seq == legacy.last_seq
    sock = peers.dealer("replay")
    _replay_all(sock, svc.engine.epoch)
    _turns(svc, 3)
    frames = _drain(sock)
    assert frames[-1] == [b"END", QQ.pack(legacy.epoch, legacy.last_seq)]
    by_seq = {e.seq: e for e in legacy.events}
    seen = []
    for header, payload in _entries(frames[:-1]):
        h = unpack(header)
        seen.append(h.seq)
        if h.seq in legacy.unpublishable:
            assert (h.type, h.epoch, h.key_user_id, h.key_user_id_2) == (UNPUBLISHABLE, legacy.epoch, 0, 0)
            marker = parse_marker(payload)
            record = event_record(by_seq[h.seq])
            assert marker["reason"] == legacy.unpublishable[h.seq]
            assert (marker["size"], marker["sha256"]) == (len(record), hashlib.sha256(record).hexdigest())
            assert len(payload) <= 4096
        else:
            assert decode(payload) == by_seq[h.seq]
    assert seen == list(range(1, legacy.last_seq + 1))
    assert svc.stats.unpublishable == len(legacy.unpublishable)
    # New commands go on from the journal's seq. The feed carries them, and a marker for what still
    # cannot be published: user 3's USD balance, from before the rules, is beyond a long.
    sub = peers.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    peers.sockets.append(sub)
    sub.connect(peers.ends["feed"])
    svc.service_io(50)  # the subscription reaches the PUB socket before the events are sent
    spec = settings.symbol_specs()[0]
    place = PlaceOrder(svc.stamp(), 3, spec.name, Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 1, 100)
    deposit, placed = svc.submit([Deposit(svc.stamp(), 2, spec.base, 5), place])
    assert deposit.first_seq == deposit.last_seq == legacy.last_seq + 1 and placed.accepted
    sent = []
    while sub.poll(2000) and len(sent) < 3:
        entries, problem = split_batch(sub.recv())
        assert not problem
        sent += [e for e in entries if unpack(e[0]).type != 100]  # heartbeats aside
    assert [unpack(h).seq for h, _ in sent] == list(range(legacy.last_seq + 1, legacy.last_seq + 4))
    paid, new = decode(sent[0][1]), decode(sent[1][1])
    assert (paid.seq, paid.user_id, paid.asset, paid.delta_available) == (deposit.first_seq, 2, spec.base, 5)
    assert (new.seq, new.order_id) == (placed.first_seq, placed.order_id)
    lock = unpack(sent[2][0])
    assert lock.type == UNPUBLISHABLE and parse_marker(sent[2][1])["reason"] == "out_of_range"
    # The service journals them as usual: a later recovery holds everything.
    svc.journal.sync()
    with Journal.open(tmp_path / "legacy", settings.symbol_specs(), fsync="never") as journal:
        assert journal.last_seq == legacy.last_seq + 3


def test_a_marker_always_fits(make):
    from schemas.wire import MARKER_MAX_BYTES, unpublishable

    for detail in ("x" * 100_000, "\u2028" * 10_000, "\x00" * 10_000, "\ud800" * 3000):
        _header, payload = unpublishable(1, 2, "oversized", detail, b"r" * 5_000_000)
        assert len(payload) <= MARKER_MAX_BYTES
        body = parse_marker(payload)
        assert body["size"] == 5_000_000 and body["detail"]
