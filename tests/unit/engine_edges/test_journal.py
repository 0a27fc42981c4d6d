"""Journal: round trip, torn tail, corruption, configuration mismatch, seq ranges, recovery."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.commands import CancelOrder, Deposit, PlaceOrder
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import Journal, JournalError, command_from_dict, command_to_dict
from engine.recovery import recover
from schemas.events import OrderType, Side, TimeInForce
from schemas.wire import HEARTBEAT, WireError, header_for, pack, unpack

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD")]


def _commands(n: int):
    yield Deposit(1, 1, "USD", 10**9)
    yield Deposit(2, 2, "BTC", 10**6)
    for i in range(n):
        # user 1 holds USD and buys, user 2 holds BTC and sells: prices overlap, so they trade.
        side, user = (Side.BUY, 1) if i % 2 else (Side.SELL, 2)
        yield PlaceOrder(10 + i, user, "BTC-USD", side, OrderType.LIMIT, TimeInForce.GTC, 1 + i % 5, 100 + i % 7)
        if i % 5 == 0:
            yield CancelOrder(10 + i, user, order_id=i // 2 + 1)


def _fill(journal_dir, n=300, fsync="never"):
    journal = Journal.open(journal_dir, SYMBOLS, fsync=fsync)
    engine = Engine(SYMBOLS, journal.epoch)
    for cmd in _commands(n):
        journal.append(cmd, engine.execute(cmd).events)
    journal.close()
    return engine


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_recovery_rebuilds_the_same_state_and_continues_the_seq(tmp_path, fsync):
    engine = _fill(tmp_path, fsync=fsync)
    assert engine.check_invariants() == []
    assert sum(1 for _ in engine.open_orders(1)) > 0
    with Journal.open(tmp_path, SYMBOLS, fsync=fsync) as journal:
        recovered, count = recover(journal)
    assert recovered.state_hash() == engine.state_hash()
    assert recovered.epoch == engine.epoch == journal.epoch
    assert count == len(list(_commands(300)))
    result = recovered.execute(Deposit(10_000, 1, "USD", 5))
    assert result.events[0].seq == engine.last_seq + 1


def test_read_events_returns_exact_ranges(tmp_path):
    engine = _fill(tmp_path)
    with Journal.open(tmp_path, SYMBOLS) as journal:
        _check_ranges(journal, engine)


def _check_ranges(journal, engine):
    assert [e.seq for e in journal.read_events(1, 0)] == list(range(1, engine.last_seq + 1))
    assert [e.seq for e in journal.read_events(100, 250)] == list(range(100, 251))
    assert [e.seq for e in journal.read_events(engine.last_seq, 0)] == [engine.last_seq]
    assert [e.seq for e in journal.read_events(10, 0, limit=5)] == [10, 11, 12, 13, 14]
    assert list(journal.read_events(engine.last_seq + 1, 0)) == []


def test_a_torn_tail_is_cut_off(tmp_path):
    engine = _fill(tmp_path)
    path = tmp_path / "journal.log"
    good = path.stat().st_size
    with path.open("ab") as fh:
        fh.write(b"\x00\x00\x01\x00garbage-from-a-crash")
    with Journal.open(tmp_path, SYMBOLS) as journal:
        assert path.stat().st_size == good
        assert recover(journal)[0].state_hash() == engine.state_hash()


def test_corruption_in_the_middle_is_an_error(tmp_path):
    _fill(tmp_path)
    path = tmp_path / "journal.log"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupt record"):
        Journal.open(tmp_path, SYMBOLS)


def test_a_different_configuration_is_refused(tmp_path):
    _fill(tmp_path, n=5)
    with pytest.raises(JournalError, match="other symbols or fees"):
        Journal.open(tmp_path, SYMBOLS, maker_fee_bps=5)


def test_recovery_detects_a_journal_the_engine_disagrees_with(tmp_path):
    _fill(tmp_path, n=20)
    journal = Journal.open(tmp_path, SYMBOLS)
    # Same journal, but the engine now charges fees: the regenerated events differ.
    journal.header = replace(journal.header, maker_fee_bps=5000, taker_fee_bps=5000)
    with journal, pytest.raises(JournalError, match="diverged"):
        recover(journal)


def test_command_dicts_round_trip_and_reject_bad_types():
    for cmd in _commands(10):
        assert command_from_dict(command_to_dict(cmd)) == cmd
    bad = command_to_dict(Deposit(1, 1, "USD", 5))
    with pytest.raises(TypeError):
        command_from_dict({**bad, "amount": "5"})
    with pytest.raises(ValueError):
        command_from_dict({**command_to_dict(next(iter(_commands(1)))), "type": "place", "side": "UP"})
    with pytest.raises(KeyError):
        command_from_dict({"type": "explode"})


def test_wire_header_round_trip_and_errors():
    engine = Engine(SYMBOLS, 5)
    engine.execute(Deposit(1, 7, "USD", 10))
    (ev,) = engine.execute(Deposit(2, 7, "BTC", 10)).events
    h = unpack(header_for(ev))
    assert (h.type, h.epoch, h.seq, h.key_user_id) == (3, 5, 2, 7)
    assert unpack(pack(HEARTBEAT, 5, 99)).seq == 99
    for frame, reason in [(b"x" * 5, "bad_header"), (b"XX" + header_for(ev)[2:], "bad_magic"),
                          (pack(9, 1, 1), "unknown_type")]:  # fmt: skip
        with pytest.raises(WireError) as info:
            unpack(frame)
        assert info.value.reason == reason
