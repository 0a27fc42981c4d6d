"""Recovery of a journal written before the wire-range rules, and the journal's defensive reading.

Before: a journal holding ``place`` with user_id 2**64 could not be served (every restart died
publishing it); recovery itself would now diverge on it, since today's rules refuse the command.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from engine.commands import Deposit
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import Journal, JournalError, read_tail
from engine.recovery import RecoveryReport, recover
from tests.unit.engine_edges.legacy_journal import build

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD")]


def test_a_journal_from_before_the_rules_recovers_and_names_what_cannot_be_published(tmp_path):
    legacy = build(tmp_path, SYMBOLS)
    report = RecoveryReport()
    with Journal.open(tmp_path, SYMBOLS, fsync="never") as journal:
        engine, commands = recover(journal, report)
        events = list(journal.read_events(1, 0, 10**9))
    assert engine.last_seq == legacy.last_seq and events == legacy.events
    assert report.unchecked == legacy.bad_commands == 3
    assert {seq: reason for seq, reason, _ in report.examples} == legacy.unpublishable
    assert report.unpublishable == len(legacy.unpublishable) and report.commands == commands
    assert engine.check_invariants() == []
    # The same engine goes on under today's rules: what they refuse is refused.
    assert not engine.execute(Deposit(1, 1, "USD", 1)).accepted, "USD's supply is beyond MAX_AMOUNT now"
    assert engine.execute(Deposit(1, 1, "BTC", 1)).accepted


def test_an_ordinary_journal_pays_nothing_for_it(tmp_path):
    journal = Journal.open(tmp_path, SYMBOLS, fsync="never")
    engine = Engine(SYMBOLS, journal.epoch)
    for i in range(5):
        cmd = Deposit(i, 1, "USD", 10)
        journal.append(cmd, engine.execute(cmd).events)
    report = RecoveryReport()
    recover(journal, report)
    assert (report.commands, report.unchecked, report.unpublishable) == (5, 0, 0)
    journal.close()


def _append_raw(path, payload: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(struct.pack(">II", len(payload), zlib.crc32(payload)) + payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"[1,2]",
        b'[{"type":"nope"},[]]',
        b'[{"type":"deposit"},[]]',
        b"[" * 5000,
        b'[{"type":"tick","ts_ns":1},[["z"]]]',
    ],
    ids=["shape", "type", "fields", "deep", "event-tag"],
)
def test_a_record_with_a_valid_crc_that_is_not_ours_is_a_journal_error(tmp_path, payload):
    Journal.open(tmp_path, SYMBOLS, fsync="never").close()
    _append_raw(tmp_path / "journal.log", payload)
    # Found when the journal is opened (its index is built) or recovered: an error, never a crash.
    with pytest.raises(JournalError, match="undecodable"), Journal.open(tmp_path, SYMBOLS, fsync="never") as journal:
        recover(journal)


def test_the_tail_of_a_journal_being_written_is_read_up_to_its_last_complete_record(tmp_path):
    journal = Journal.open(tmp_path, SYMBOLS, fsync="never")
    engine = Engine(SYMBOLS, journal.epoch)
    path = journal.path
    start = path.stat().st_size
    assert read_tail(path, start) == (journal.epoch, 0, start)
    for i in range(3):
        cmd = Deposit(i, 1, "USD", 10)
        journal.append(cmd, engine.execute(cmd).events)
    epoch, last, end = read_tail(path, start)
    assert (epoch, last, end) == (journal.epoch, 3, path.stat().st_size)
    payload = json.dumps([{"type": "tick", "ts_ns": 9}, []]).encode()
    with path.open("ab") as fh:  # a record half written by the engine
        fh.write(struct.pack(">II", len(payload), zlib.crc32(payload)) + payload[:5])
    assert read_tail(path, end) == (journal.epoch, 0, end)
    journal.close()
