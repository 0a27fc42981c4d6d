"""Journal format 3: the feed's bytes stored once, commands packed, older formats refused with the
way out, and ``ohs engine migrate-journal`` proving what it writes."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import pytest
from click.testing import CliRunner

from engine.commands import MAX_AMOUNT, AdvanceTime, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import FORMAT, Journal, JournalError, _pack_command, _unpack_command, read_tail
from engine.migrate import migrate
from engine.recovery import RecoveryReport, recover
from schemas import stdavro
from schemas.codec import decode
from schemas.events import OrderType, OrderUpdate, Side, TimeInForce
from schemas.wire import ENTRY, UNPUBLISHABLE, encode_events, entry, header_for, split_batch
from tests.unit.engine_edges import old_journal

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD"), SymbolSpec("ETH-USD", "ETH", "USD", tick_size=5, lot_size=2)]
BUY, SELL, LIMIT, MARKET, GTC, IOC = (
    Side.BUY,
    Side.SELL,
    OrderType.LIMIT,
    OrderType.MARKET,
    TimeInForce.GTC,
    TimeInForce.IOC,
)


def _flow(n=200, ts0=1_700_000_000_000_000_000):
    """(command, journaled before the rules) of a flow that trades, cancels and expires."""
    ts = ts0
    out = [(Deposit(ts, 1, "USD", 10**9), False), (Deposit(ts, 2, "BTC", 10**6), False)]
    out.append((Deposit(ts, 3, "ETH", 10**6), False))
    for i in range(n):
        ts += 1_000
        if i % 2:
            cmd = PlaceOrder(ts, 1, "BTC-USD", BUY, LIMIT, GTC, 1 + i % 3, 100 + i % 5, client_order_id=f"b{i}")
        else:
            cmd = PlaceOrder(ts, 2, "BTC-USD", SELL, LIMIT, GTC, 1 + i % 4, 101 + i % 5)
        out.append((cmd, False))
        if i % 7 == 0:
            out.append((CancelOrder(ts, 1, client_order_id=f"b{i - 1}"), False))
        if i % 11 == 0:
            gtt = PlaceOrder(ts, 3, "ETH-USD", SELL, LIMIT, TimeInForce.GTT, 2, 500, expire_ns=ts + 1500)
            out.append((gtt, False))
            out.append((AdvanceTime(ts + 2000), False))
    return out


def _journal(tmp_path, commands, fsync="never"):
    journal = Journal.open(tmp_path, SYMBOLS, fsync=fsync)
    engine = Engine(SYMBOLS, journal.epoch)
    for cmd, unchecked in commands:
        if not unchecked and engine.range_reason(cmd).value != "NONE":
            continue
        result = engine.execute_unchecked(cmd) if unchecked else engine.execute(cmd)
        journal.append(cmd, result.events)
    journal.close()
    return engine


# ------------------------------------------------------------------------------------ format 3
def test_the_journal_holds_the_feeds_bytes_and_replays_them_untouched(tmp_path):
    engine = _journal(tmp_path, _flow())
    with Journal.open(tmp_path, SYMBOLS, fsync="never") as journal:
        events = list(journal.read_events(1, 0, 10**9))
        entries = list(journal.read_entries(1, 0, 10**9))
        assert journal.header.format == FORMAT == 3
    assert [e.seq for e in events] == list(range(1, engine.last_seq + 1))
    assert [seq for seq, _ in entries] == [e.seq for e in events]
    for (_seq, raw), ev in zip(entries, events, strict=True):
        (header, payload), *_ = split_batch(raw)[0]
        assert header == header_for(ev) and payload == stdavro.encode(ev) and decode(payload) == ev
    assert b"".join(e for _, e in entries) == encode_events(events)[0]
    sub = list(journal.read_entries(37, 80, limit=20))
    assert [s for s, _ in sub] == list(range(37, 57))


def test_every_record_carries_zlibs_crc32(tmp_path):
    """The journal computes its checksums with zlib-ng: the very CRC-32 of the standard library's
    zlib, so the format did not change with it (records written before read, and the reverse)."""
    _journal(tmp_path, _flow(60))
    data = (tmp_path / "journal.log").read_bytes()
    pos, checked = 0, 0
    while pos < len(data):
        length, crc = struct.unpack_from(">II", data, pos)
        assert zlib.crc32(data[pos + 8 : pos + 8 + length]) == crc
        pos, checked = pos + 8 + length, checked + 1
    assert pos == len(data) and checked > 60


def test_every_command_round_trips_and_what_no_layout_holds_goes_as_json():
    ts = 1_700_000_000_000_000_000
    commands = [
        PlaceOrder(ts, 1, "BTC-USD", BUY, LIMIT, GTC, 3, 100, 0, "é-cid", 0),
        PlaceOrder(ts, 2, "ETH-USD", SELL, MARKET, IOC, 2, 0, 5, "", 0),
        PlaceOrder(ts, 2, "ETH-USD", SELL, LIMIT, TimeInForce.GTT, 2, 5, 0, "x" * 64, ts + 5),
        CancelOrder(ts, 1, 9),
        CancelOrder(ts, 1, 0, "cid"),
        Deposit(ts, 1, "USD", MAX_AMOUNT),
        Withdraw(ts, 1, "USD", 1),
        AdvanceTime(ts),
        # Journaled before the rules (only a migrated journal holds these): JSON.
        PlaceOrder(ts, 2**64, "BTC-USD", BUY, LIMIT, GTC, 1, 100),
        PlaceOrder(ts, 1, "BTC-USD", BUY, LIMIT, GTC, 1, 100, client_order_id="\ud800"),
        Deposit(ts, 3, "USD", 2**63 + 500),
        PlaceOrder(ts, 1, "BTC-USD", BUY, LIMIT, GTC, 1, 100, client_order_id="c" * 70_000),
    ]
    for cmd in commands:
        packed = _pack_command(cmd)
        assert _unpack_command(packed) == cmd
        assert (packed[0] == 0) == (commands.index(cmd) >= 8), cmd


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_journal_is_refused_with_the_way_out(tmp_path, version):
    old_journal.write(tmp_path, SYMBOLS, _flow(10), version=version)
    with pytest.raises(JournalError, match=rf"format {version} is older.*ohs engine migrate-journal"):
        Journal.open(tmp_path, SYMBOLS)
    with pytest.raises(JournalError, match="migrate-journal"):
        read_tail(tmp_path / "journal.log", 0)


def test_a_journal_of_a_newer_format_is_refused(tmp_path):
    head = json.dumps({"format": 4, "epoch": 1, "symbols": [], "maker_fee_bps": 0, "taker_fee_bps": 0,
                       "fee_account": 0}).encode()  # fmt: skip
    (tmp_path / "journal.log").write_bytes(struct.pack(">II", len(head), zlib.crc32(head)) + head)
    with pytest.raises(JournalError, match="newer engine"):
        Journal.open(tmp_path, SYMBOLS)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 15,
        struct.pack(">QII", 1, 1, 500) + b"\x01",
        struct.pack(">QII", 0, 3, 0),
        struct.pack(">QII", 5, 1, 9) + _pack_command(AdvanceTime(1)),  # seq 5 after nothing
        struct.pack(">QII", 1, 1, 9) + _pack_command(AdvanceTime(1)) + b"\x00\x00\x00\x09",
        struct.pack(">QII", 1, 1, 3) + b"\x09xx" + entry(b"h" * 36, b"p"),
        struct.pack(">QII", 1, 1, 9) + _pack_command(AdvanceTime(1)) + entry(b"\x00" * 36, b"\xc3\x01" + b"\x00" * 8),
    ],
    ids=["short", "command-past-end", "count-without-seq", "seq-gap", "entry-past-end", "tag", "not-an-event"],
)
def test_a_record_with_a_valid_crc_that_is_not_ours_is_an_error_never_a_crash(tmp_path, payload):
    Journal.open(tmp_path, SYMBOLS, fsync="never").close()
    with (tmp_path / "journal.log").open("ab") as fh:
        fh.write(struct.pack(">II", len(payload), zlib.crc32(payload)) + payload)
    # Found when the journal is opened, recovered or read: an error, never a crash.
    with pytest.raises(JournalError, match=r"undecodable|diverged"), Journal.open(tmp_path, SYMBOLS) as journal:
        recover(journal)
    with pytest.raises(JournalError, match="undecodable"), Journal.open(tmp_path, SYMBOLS) as journal:
        list(journal.records())


def test_frames_of_an_older_writer_recover_and_a_changed_one_does_not(tmp_path):
    """After a compatible schema change the journal holds frames of the old writer: recovery encodes
    the regenerated event with that writer and compares, so the journal stays checkable."""
    (v1,) = [w for w in stdavro.writers().values() if w.name == "OrderUpdate" and not w.current]
    commands = _flow(30)

    def write(tamper):
        journal = Journal.open(tmp_path, SYMBOLS, fsync="never")
        engine = Engine(SYMBOLS, journal.epoch)
        for cmd, _ in commands:
            evs = engine.execute(cmd).events
            parts = []
            for ev in evs:
                if isinstance(ev, OrderUpdate):
                    old = ev
                    if tamper and ev.seq >= 20:  # the first order update from seq 20 on, with another price
                        old, tamper = dataclasses.replace(ev, price=ev.price + 1), False
                    parts.append(entry(header_for(ev), v1.encode(old)))
                else:
                    parts.append(encode_events([ev])[0])
            journal.add(cmd, evs[0].seq if evs else 0, len(evs), b"".join(parts))
        journal.close()
        return engine

    engine = write(tamper=False)
    with Journal.open(tmp_path, SYMBOLS, fsync="never") as journal:
        assert recover(journal)[0].state_hash() == engine.state_hash()
        updates = [e for e in journal.read_events(1, 0, 10**9) if isinstance(e, OrderUpdate)]
    assert updates and all(e.user_seq == 0 for e in updates), "the old writer had no user_seq: its default"
    (tmp_path / "journal.log").unlink()
    write(tamper=True)
    with Journal.open(tmp_path, SYMBOLS, fsync="never") as journal, pytest.raises(JournalError, match="diverged"):
        recover(journal)


def test_the_tail_reader_sees_only_complete_records(tmp_path):
    journal = Journal.open(tmp_path, SYMBOLS, fsync="never")
    engine = Engine(SYMBOLS, journal.epoch)
    start = journal.path.stat().st_size
    for i in range(3):
        cmd = Deposit(i, 1, "USD", 10)
        journal.add(cmd, i + 1, 1, encode_events(engine.execute(cmd).events)[0])
    assert read_tail(journal.path, start) == (journal.epoch, 0, start), "staged, not yet written"
    journal.flush()
    assert read_tail(journal.path, start) == (journal.epoch, 3, journal.path.stat().st_size)
    journal.close()


# ----------------------------------------------------------------------------------- migration
@pytest.mark.parametrize("version", [1, 2])
def test_migration_re_executes_verifies_and_writes_beside(tmp_path, version):
    engine, events = old_journal.write(tmp_path, SYMBOLS, _flow(), version=version)
    before = (tmp_path / "journal.log").read_bytes()
    report = migrate(tmp_path)
    assert (tmp_path / "journal.log").read_bytes() == before, "the old journal is never touched"
    assert report.target == tmp_path / "journal.format3.log" and report.target.exists()
    assert (report.format, report.events, report.last_seq) == (version, len(events), engine.last_seq)
    assert not list(tmp_path.glob("*.partial"))
    (tmp_path / "journal.log").rename(tmp_path / f"journal.format{version}.log")
    report.target.rename(tmp_path / "journal.log")
    with Journal.open(tmp_path, SYMBOLS, fsync="never") as journal:
        recovered, commands = recover(journal)
        migrated = list(journal.read_events(1, 0, 10**9))
        assert journal.epoch == 1_700_000_000_000_000
    assert recovered.state_hash() == engine.state_hash() and commands == report.commands
    # Format 2 kept every field; format 1 had no user_seq: the new journal holds the engine's.
    assert migrated == events
    assert all(e.user_seq > 0 for e in migrated if isinstance(e, OrderUpdate))


def test_migration_of_a_journal_from_before_the_wire_ranges_keeps_its_markers(tmp_path):
    ts = 1_700_000_000_000_000_000
    commands = [
        *_flow(20),
        (PlaceOrder(ts, 2**64, "BTC-USD", BUY, LIMIT, GTC, 1, 100), True),
        (Deposit(ts, 3, "USD", 2**63 + 500), True),
        (PlaceOrder(ts + 1, 3, "BTC-USD", BUY, LIMIT, GTC, 1, 120), False),  # its balance cannot be published
    ]
    engine, events = old_journal.write(tmp_path, SYMBOLS, commands)
    report = migrate(tmp_path)
    assert report.unchecked == 2 and report.unpublishable >= 3
    journal = Journal.open(tmp_path, SYMBOLS, fsync="never", name="journal.format3.log")
    rec = RecoveryReport()
    recovered, _ = recover(journal, rec)
    assert recovered.state_hash() == engine.state_hash()
    assert (rec.unchecked, rec.unpublishable) == (2, report.unpublishable)
    markers = [seq for seq, e in journal.read_entries(1, 0, 10**9) if e[ENTRY.size - 33] == UNPUBLISHABLE]
    assert markers == [seq for seq, _, _ in rec.examples]
    assert list(journal.read_events(1, 0, 10**9)) == events, "the journal still holds every event whole"
    journal.close()


def test_migration_refuses_a_journal_that_does_not_replay_and_switches_nothing(tmp_path):
    old_journal.write(tmp_path, SYMBOLS, _flow(40))
    path = tmp_path / "journal.log"
    raw = path.read_bytes()
    records, pos = [], 0
    while pos < len(raw):
        n, _ = struct.unpack_from(">II", raw, pos)
        records.append(raw[pos + 8 : pos + 8 + n])
        pos += 8 + n
    # One journaled price changed (the CRC made valid again): the engine produces something else.
    cmd, rows = json.loads(records[10])
    assert rows[0][0] == "o"
    rows[0][11] += 1  # [tag, epoch, seq, ts_ns, order_id, cid, user_id, symbol, side, type, tif, price, ...]
    records[10] = json.dumps([cmd, rows], separators=(",", ":")).encode()
    path.write_bytes(b"".join(struct.pack(">II", len(r), zlib.crc32(r)) + r for r in records))
    with pytest.raises(JournalError, match="diverged"):
        migrate(tmp_path)
    assert not (tmp_path / "journal.format3.log").exists()


def test_migration_never_writes_in_place_nor_over_a_file_and_only_migrates_old_formats(tmp_path):
    old_journal.write(tmp_path, SYMBOLS, _flow(5))
    with pytest.raises(JournalError, match="in place"):
        migrate(tmp_path, target=tmp_path / "journal.log")
    (tmp_path / "journal.format3.log").write_bytes(b"x")
    with pytest.raises(JournalError, match="exists"):
        migrate(tmp_path)
    migrate(tmp_path, force=True)
    fresh = tmp_path / "fresh"
    Journal.open(fresh, SYMBOLS).close()
    with pytest.raises(JournalError, match="only formats 1 and 2"):
        migrate(fresh)


def test_the_cli_migrates_and_says_how_to_switch(tmp_path, monkeypatch):
    from engine.cli import engine as engine_cli

    old_journal.write(tmp_path, SYMBOLS, _flow(30), version=1)
    env = {"OHS_ENGINE_JOURNAL_DIR": str(tmp_path), "OHS_ENGINE_SYMBOLS": "BTC-USD:BTC:USD:1:1,ETH-USD:ETH:USD:5:2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    result = runner.invoke(engine_cli, ["info"])
    assert result.exit_code != 0 and "migrate-journal" in str(result.exception)
    result = runner.invoke(engine_cli, ["migrate-journal"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.splitlines()[0])
    assert out["format"] == 1 and out["target"].endswith("journal.format3.log")
    assert "mv" in result.stderr and "journal.format1.log" in result.stderr
    (tmp_path / "journal.log").rename(tmp_path / "journal.format1.log")
    (tmp_path / "journal.format3.log").rename(tmp_path / "journal.log")
    result = runner.invoke(engine_cli, ["info"])
    assert result.exit_code == 0 and json.loads(result.stdout)["last_seq"] == out["last_seq"]
