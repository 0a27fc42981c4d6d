"""The engine service's loop around the pure core: journal before publish, rejections as values,
the feed's batches and heartbeats, replay slicing and recovery, loop turn by loop turn.

No servers: a real journal in a temporary directory, in-process ZeroMQ for the replay and gateway
sockets, and a recording twin of the feed (``service_twins``). Hostile input and heavy replays are in
``test_service_hostile.py``.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import engine.service as service_mod
from engine.commands import AdvanceTime, Deposit, PlaceOrder, Withdraw
from engine.service import EngineFatal, EngineService
from engine.settings import EngineSettings
from schemas import wire
from schemas.codec import decode
from schemas.events import OrderStatus, OrderType, RejectReason, Side, TimeInForce
from schemas.wire import HEARTBEAT, split_batch, unpack
from tests.unit.engine_edges.service_twins import FeedTwin, install

QQQ, QQ = struct.Struct(">QQQ"), struct.Struct(">QQ")
Rig = tuple[EngineService, FeedTwin, list[tuple[str, Any]]]


class _Maker:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ctx = zmq.Context.instance()
        self.services: list[EngineService] = []
        self.sockets: list[zmq.Socket[bytes]] = []
        self.ends: dict[str, str] = {}

    def __call__(self, **kw: Any) -> Rig:
        tag = uuid.uuid4().hex
        self.ends = {k: f"inproc://{k}-{tag}" for k in ("feed", "replay", "gateway")}
        kw.setdefault("journal_dir", self.tmp_path / "journal")
        kw.setdefault("fsync", "never")
        s = EngineSettings(_env_file=None, **{f"{k}_endpoint": v for k, v in self.ends.items()}, **kw)  # type: ignore[call-arg]
        svc = EngineService(s, self.ctx)
        self.services.append(svc)
        feed, calls = install(svc)
        return svc, feed, calls

    def dealer(self, which: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.connect(self.ends[which])
        self.sockets.append(sock)
        return sock

    def close(self, svc: EngineService) -> None:
        self.services.remove(svc)
        svc.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[_Maker]:
    maker = _Maker(tmp_path)
    yield maker
    for sock in maker.sockets:
        sock.close(linger=0)
    for svc in maker.services:
        svc.close()


def _feed_entries(messages: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for m in messages:
        entries, problem = split_batch(m)
        assert not problem, problem
        out += entries
    return out


def _feed_seqs(messages: list[bytes]) -> list[int]:
    return [unpack(h).seq for h, _ in _feed_entries(messages) if unpack(h).type != HEARTBEAT]


def _drain(sock: zmq.Socket[bytes], wait_ms: int = 0) -> list[list[bytes]]:
    out = []
    while sock.poll(wait_ms):
        out.append(sock.recv_multipart())
        wait_ms = 0
    return out


def _place(svc: EngineService, user: int, side: Side, qty: int, price: int, **kw: Any) -> PlaceOrder:
    return PlaceOrder(svc.stamp(), user, "BTC-USD", side, OrderType.LIMIT, TimeInForce.GTC, qty, price, **kw)


def _quiet(svc: EngineService) -> None:
    """No tick or heartbeat in the next turns: only what the test sends happens."""
    svc._next_tick = svc._next_heartbeat = float("inf")


# --------------------------------------------------------------------------- submit
def test_a_batch_is_journaled_and_flushed_before_any_of_it_is_published(make: _Maker) -> None:
    svc, feed, calls = make()
    results = svc.submit([Deposit(svc.stamp(), 1, "USD", 10), Deposit(svc.stamp(), 2, "BTC", 5)])
    assert [r.accepted for r in results] == [True, True]
    kinds = [k for k, _ in calls]
    assert kinds[: kinds.index("send")] == ["add", "add", "flush"], kinds
    # The bytes journaled are the bytes sent: encoded once.
    journaled = b"".join(args[3] for k, args in calls if k == "add")
    assert b"".join(feed.messages) == journaled
    assert _feed_seqs(feed.messages) == [1, 2] and svc.engine.last_seq == 2


def test_a_journal_that_cannot_be_written_stops_the_engine_before_anything_is_sent(
    make: _Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, feed, _ = make()

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(svc.journal, "flush", full_disk)
    with pytest.raises(EngineFatal, match="writing the journal"):
        svc.submit([Deposit(svc.stamp(), 1, "USD", 10)])
    assert feed.messages == [], "an event the journal may not hold is never published"


def test_a_failure_mid_batch_is_fatal_names_its_command_and_publishes_nothing_of_the_batch(
    make: _Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, feed, calls = make()
    stage = svc.journal.add
    staged: list[Any] = []

    def failing_stage(cmd: Any, *args: Any) -> None:
        staged.append(cmd)
        if len(staged) == 2:
            raise ZeroDivisionError("a bug in the journal")
        stage(cmd, *args)

    monkeypatch.setattr(svc.journal, "add", failing_stage)
    with pytest.raises(EngineFatal, match=r"ZeroDivisionError executing or journaling Deposit\(.*user_id=2"):
        svc.submit([Deposit(svc.stamp(), 1, "USD", 10), Deposit(svc.stamp(), 2, "USD", 10)])
    assert feed.messages == [] and ("flush", None) not in calls


def test_a_non_command_in_a_batch_is_fatal_and_publishes_nothing_of_the_batch(make: _Maker) -> None:
    """A bug upstream (the core refuses it: the compiled build by its type, the source as no command)."""
    svc, feed, calls = make()
    with pytest.raises(EngineFatal, match=r"(TypeError|AttributeError) executing or journaling 'not a command'"):
        svc.submit([Deposit(svc.stamp(), 1, "USD", 10), "not a command"])  # type: ignore[list-item]
    assert feed.messages == [] and ("flush", None) not in calls


def test_rejections_are_values_journaled_like_any_command(make: _Maker) -> None:
    svc, feed, calls = make()
    withdraw, place = svc.submit([Withdraw(svc.stamp(), 1, "USD", 5), _place(svc, 1, Side.BUY, 1, 100)])
    # A rejected withdraw changes nothing and has no event, but is journaled (recovery replays it).
    assert withdraw.astuple() == (False, RejectReason.INSUFFICIENT_FUNDS, 0, 0, 0)
    adds = [(type(a[0]), a[1], a[2]) for k, a in calls if k == "add"]
    assert adds == [(Withdraw, 0, 0), (PlaceOrder, 1, 1)]
    # A rejected order gets an id and one REJECTED update, published like any event.
    assert not place.accepted and place.reason is RejectReason.INSUFFICIENT_FUNDS and place.order_id > 0
    [(header, payload)] = _feed_entries(feed.messages)
    ev = decode(payload)
    assert ev.status is OrderStatus.REJECTED and ev.order_id == place.order_id and unpack(header).seq == 1
    assert (svc.stats.commands, svc.stats.rejected, svc.stats.events) == (2, 2, 1)


def test_out_of_range_commands_are_neither_executed_nor_journaled(make: _Maker) -> None:
    svc, feed, calls = make()
    ok, bad = svc.submit([Deposit(svc.stamp(), 1, "USD", 1), Deposit(svc.stamp(), 2**64, "USD", 1)])
    assert ok.accepted and (bad.accepted, bad.reason) == (False, RejectReason.INVALID_USER)
    assert [a[0].user_id for k, a in calls if k == "add"] == [1]
    assert svc.stats.out_of_range == 1 and _feed_seqs(feed.messages) == [1]


def test_the_feed_batches_entries_by_size_in_seq_order_and_never_splits_a_command(
    make: _Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_mod, "_BATCH_BYTES", 600)
    svc, feed, calls = make()
    svc.submit([Deposit(svc.stamp(), u, "BTC", 10) for u in range(1, 4)] + [Deposit(svc.stamp(), 9, "USD", 10_000)])
    feed.messages.clear()
    sells = [_place(svc, u, Side.SELL, 1, 100 + u) for u in range(1, 4)]
    svc.submit([*sells, _place(svc, 9, Side.BUY, 3, 200)])  # the buy trades with all three sells
    sections = [a[3] for k, a in calls if k == "add"][-4:]
    assert len(sections[-1]) > 600, "the sweeping buy's events are one section bigger than a batch"
    assert b"".join(feed.messages) == b"".join(sections)
    # Messages end only where a command's section ends, and only a lone section exceeds the size.
    ends, at = set(), 0
    for section in sections:
        at += len(section)
        ends.add(at)
    at = 0
    for m in feed.messages:
        at += len(m)
        assert at in ends, "a command's events were split across messages"
        assert len(m) <= 600 or m in sections
    assert len(feed.messages) >= 2
    assert _feed_seqs(feed.messages) == list(range(5, svc.engine.last_seq + 1))
    assert svc.stats.feed_messages == 1 + len(feed.messages)
    # Every entry bigger than a batch: one message per command, never an empty one.
    monkeypatch.setattr(service_mod, "_BATCH_BYTES", 10)
    feed.messages.clear()
    svc.submit([Deposit(svc.stamp(), 1, "USD", 1), Deposit(svc.stamp(), 2, "USD", 1)])
    assert [len(split_batch(m)[0]) for m in feed.messages] == [1, 1]


def test_a_refused_send_is_counted_and_the_events_stay_in_the_journal(make: _Maker) -> None:
    svc, feed, _ = make()
    feed.refuse = True
    [result] = svc.submit([Deposit(svc.stamp(), 1, "USD", 10)])
    assert result.accepted and svc.stats.feed_dropped == 1 and svc.stats.feed_messages == 0
    svc.journal.sync()
    assert [seq for seq, _ in svc.journal.read_entries(1, 1)] == [1], "the replay service still has it"


def test_engine_time_never_goes_backwards(make: _Maker, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, _, _ = make()
    first = svc.stamp()
    monkeypatch.setattr(service_mod.time, "time_ns", lambda: first - 10**9)  # the wall clock steps back
    assert svc.stamp() == first
    monkeypatch.setattr(service_mod.time, "time_ns", lambda: first + 5)
    assert svc.stamp() == first + 5


# --------------------------------------------------------------------------- service_io
def test_heartbeats_carry_the_epoch_and_last_seq_and_ticks_advance_time(make: _Maker) -> None:
    svc, feed, calls = make()
    svc.submit([Deposit(svc.stamp(), 1, "USD", 10)])
    feed.messages.clear()
    calls.clear()
    svc._next_heartbeat = 0.0
    svc._next_tick = float("inf")
    svc.service_io(0)
    [(header, payload)] = _feed_entries(feed.messages)
    hb = unpack(header)
    assert (hb.type, hb.epoch, hb.seq, payload) == (HEARTBEAT, svc.engine.epoch, 1, b"")
    assert not [c for c in calls if c[0] == "add"], "no tick was due"
    svc._next_tick = 0.0
    svc.service_io(0)
    ticks = [a[0] for k, a in calls if k == "add"]
    assert len(ticks) == 1 and isinstance(ticks[0], AdvanceTime), "a due tick is a journaled AdvanceTime"
    assert svc.stats.commands == 2


def test_the_gateway_answers_each_command_with_its_id_and_seqs(make: _Maker) -> None:
    svc, _, _ = make()
    _quiet(svc)
    gw = make.dealer("gateway")
    place = {
        "type": "place", "user_id": 1, "symbol": "BTC-USD", "side": "BUY", "order_type": "LIMIT",
        "time_in_force": "GTC", "qty": 1, "price": 100,
    }  # fmt: skip
    cmds = [{"type": "deposit", "user_id": 1, "asset": "USD", "amount": 1000}, place, place | {"qty": 10**6}]
    gw.send_multipart([b"CMD", json.dumps(cmds).encode()])
    svc.service_io(0)
    [(status, body)] = _drain(gw, 1000)
    dep, placed, rejected = json.loads(body)
    assert status == b"OK"
    assert dep == {"accepted": True, "reason": "NONE", "order_id": 0, "first_seq": 1, "last_seq": 1}
    assert placed["accepted"] and placed["order_id"] > 0 and placed["first_seq"] == 2 <= placed["last_seq"]
    assert rejected["reason"] == "INSUFFICIENT_FUNDS" and rejected["first_seq"] == placed["last_seq"] + 1
    assert rejected["last_seq"] == svc.engine.last_seq
    assert rejected["order_id"] not in (0, placed["order_id"])


# ------------------------------------------------------------------------------ replay
def _replay(svc: EngineService, sock: zmq.Socket[bytes], epoch: int, lo: int, hi: int) -> list[list[bytes]]:
    sock.send_multipart([b"REPLAY", QQQ.pack(epoch, lo, hi)])
    got: list[list[bytes]] = []
    for _ in range(100):
        svc.service_io(1)
        got += _drain(sock)
        if got and got[-1][0] in (b"END", b"ERR"):
            break
    return got


def _replayed(frames: list[list[bytes]]) -> list[int]:
    seqs = []
    for f in frames:
        if f[0] == b"EVS":
            entries, problem = split_batch(f[1])
            assert not problem
            seqs += [decode(p).seq for _, p in entries]
    return seqs


@pytest.mark.parametrize(
    ("lo", "hi", "want"),
    [(0, 0, range(1, 21)), (5, 8, range(5, 9)), (15, 99, range(15, 21)), (21, 0, range(0)), (9, 3, range(0))],
    ids=["all", "slice", "hi-beyond-last", "lo-beyond-last", "lo-above-hi"],
)
def test_a_replay_returns_the_range_clamped_to_the_journal_then_end(
    make: _Maker, lo: int, hi: int, want: range
) -> None:
    svc, _, calls = make(replay_chunk=3)
    _quiet(svc)
    svc.submit([Deposit(svc.stamp(), 1 + i, "USD", 1) for i in range(20)])
    calls.clear()
    frames = _replay(svc, make.dealer("replay"), svc.engine.epoch, lo, hi)
    assert frames[-1] == [b"END", QQ.pack(svc.engine.epoch, 20)]
    assert _replayed(frames) == list(want)
    assert all(len(split_batch(f[1])[0]) <= 3 for f in frames if f[0] == b"EVS"), "sliced per replay_chunk"
    assert calls[0] == ("sync", None), "what is replayed is durable first"


def test_a_replay_of_another_epoch_is_refused_with_the_current_one(make: _Maker) -> None:
    svc, _, _ = make()
    _quiet(svc)
    svc.submit([Deposit(svc.stamp(), 1, "USD", 1)])
    frames = _replay(svc, make.dealer("replay"), svc.engine.epoch + 1, 1, 0)
    assert frames == [[b"ERR", f"epoch_mismatch:{svc.engine.epoch}".encode()]]
    assert svc.stats.replay_requests == 0


def test_a_journal_read_error_ends_that_replay_with_err_and_the_service_goes_on(
    make: _Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, _, _ = make()
    _quiet(svc)
    svc.submit([Deposit(svc.stamp(), 1 + i, "USD", 1) for i in range(5)])

    def broken(lo: int, hi: int, limit: int) -> Iterator[tuple[int, bytes]]:
        raise OSError("bad sector")
        yield  # pragma: no cover

    monkeypatch.setattr(svc.journal, "read_entries", broken)
    sock = make.dealer("replay")
    frames = _replay(svc, sock, svc.engine.epoch, 1, 0)
    assert frames == [[b"ERR", b"journal_error"]]
    assert svc.stats.handler_errors == 1 and not svc.replays.active
    sock.send_multipart([b"INFO"])
    svc.service_io(1)
    assert _drain(sock, 1000) == [[b"INFO", QQ.pack(svc.engine.epoch, 5)]]


def test_a_restarted_service_recovers_its_epoch_and_seq_from_the_journal(make: _Maker) -> None:
    svc, _, _ = make()
    svc.submit([Deposit(svc.stamp(), 1, "USD", 100), _place(svc, 1, Side.BUY, 1, 50)])
    epoch, last = svc.engine.epoch, svc.engine.last_seq
    make.close(svc)
    again, feed, _ = make()
    assert (again.engine.epoch, again.engine.last_seq) == (epoch, last)
    assert again.status()["last_seq"] == last and again.status()["epoch"] == epoch
    # The order placed before the restart is still resting: its funds are still held.
    [w] = again.submit([Withdraw(again.stamp(), 1, "USD", 100)])
    assert (w.accepted, w.reason) == (False, RejectReason.INSUFFICIENT_FUNDS)
    [d] = again.submit([Deposit(again.stamp(), 2, "USD", 1)])
    assert d.first_seq == d.last_seq == last + 1 and _feed_seqs(feed.messages) == [last + 1]


def test_the_service_says_which_encoder_it_uses(make: _Maker, caplog: pytest.LogCaptureFixture) -> None:
    """Without the C build the engine runs at about half its rate: the log and /health say so."""
    built = wire.use_native(True)
    try:
        wire.use_native(False)
        with caplog.at_level("INFO", logger="ohs.engine"):
            svc, _, _ = make()
        assert svc.status()["encoder"] == "Python"
        assert "event encoder: Python" in caplog.text
        make.close(svc)
        if built:
            wire.use_native(True)
            svc, _, _ = make()
            assert svc.status()["encoder"] == "C"
    finally:
        wire.use_native(built)


def test_the_service_says_which_core_runs(make: _Maker, caplog: pytest.LogCaptureFixture) -> None:
    """The compiled core (optional build) or its source: the log and /health say which, and why."""
    import engine

    with caplog.at_level("INFO", logger="ohs.engine"):
        svc, _, _ = make()
    core = svc.status()["core"]
    assert core == engine.core_build() and f"engine core: {core}" in caplog.text
    assert core == "compiled (mypyc)" or str(core).startswith("Python (")


def test_each_outcome_names_the_seqs_of_its_commands_events(make: _Maker) -> None:
    """What the gateway replies: first_seq..last_seq are exactly the seqs the feed carries for it."""
    svc, feed, _ = make()
    _quiet(svc)
    outcomes = svc.submit(
        [
            Deposit(svc.stamp(), 1, "BTC", 10),
            Deposit(svc.stamp(), 2, "USD", 10_000),
            _place(svc, 1, Side.SELL, 2, 100),
            Withdraw(svc.stamp(), 3, "USD", 1),  # rejected: no event
            _place(svc, 2, Side.BUY, 3, 100),  # fills 2, rests 1: a trade, updates, balances
        ]
    )
    seqs = _feed_seqs(feed.messages)
    spans = [list(range(o.first_seq, o.last_seq + 1)) if o.first_seq else [] for o in outcomes]
    assert [len(s) for s in spans[:4]] == [1, 1, 2, 0] and len(spans[4]) > 5
    assert [seq for s in spans for seq in s] == seqs == list(range(1, len(seqs) + 1))
    assert [(o.accepted, o.order_id > 0) for o in outcomes] == [
        (True, False),
        (True, False),
        (True, True),
        (False, False),
        (True, True),
    ]
