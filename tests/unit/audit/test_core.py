"""The audit's pure parts: the journal's truth, payload verdicts, per-partition order, the Kafka
ledger's accounting (records as data, in the bridge's layout), the statistics verdicts and the
fills ledger (user_trades rows as data, in the worker's layout)."""

from __future__ import annotations

import copy
import io
import json
import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from audit.core import (
    ACTIVE_COLUMNS,
    BY_ID_COLUMNS,
    FILL_COLUMNS,
    HISTORY_COLUMNS,
    INFO_CATEGORIES,
    AuditError,
    FillLedger,
    Findings,
    PartitionOrder,
    check_journal,
    digest,
    event_row,
    fill_row,
    load_truth,
    payload_verdict,
    row_digest,
    stats_verdict,
    trade_fills,
)
from audit.kafka import KafkaLedger
from engine.commands import Deposit, PlaceOrder
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.journal import Journal
from engine.recovery import recover
from engine.simulator import FlowGenerator
from schemas import codec
from schemas.codec import encode
from schemas.events import OrderUpdate, Trade
from schemas.registry import Registry
from streams.state import STAT_FIELDS, UserState
from streams.trades import MAKER, TAKER, fills_of, month_of
from tests.unit.engine_edges.legacy_journal import build as build_legacy
from tests.unit.schemas.test_registry import TwinClient

SYMBOLS = [SymbolSpec("BTC-USD", "BTC", "USD", 1, 1), SymbolSpec("ETH-USD", "ETH", "USD", 1, 1)]
MIDNIGHT_NS = 1_700_006_400 * 10**9  # 2023-11-15T00:00:00Z: the flow crosses into a second UTC day
USERS = 6
PARTITIONS = 3


def _fill(directory: Path, commands: int = 600, seed: int = 7) -> Engine:
    journal = Journal.open(directory, SYMBOLS, fsync="never")
    engine = Engine(SYMBOLS, journal.epoch)
    gen = FlowGenerator(SYMBOLS, USERS, seed)
    ts = MIDNIGHT_NS - 300_000_000
    for cmd in list(gen.deposits()) + [None] * commands:
        ts += 1_000_000
        cmd = replace(cmd if cmd is not None else gen.next(ts), ts_ns=ts)
        result = engine.execute(cmd)
        if isinstance(cmd, PlaceOrder) and result.accepted:
            gen.record(cmd.user_id, result.order_id)
        journal.append(cmd, result.events)
    journal.close()
    return engine


def _truth(directory: Path, **kw):
    return load_truth(directory, SYMBOLS, maker_fee_bps=0, taker_fee_bps=0, fee_account=0, **kw)


@pytest.fixture(scope="module")
def journal_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("journal")
    _fill(directory)
    return directory


@pytest.fixture
def truth(journal_dir):
    with _truth(journal_dir) as t:
        yield t


def _events(truth):
    return list(truth.journal.read_events(1, 0, limit=10**9))


# ------------------------------------------------------------------------------------ the truth
def test_the_truth_is_what_recovery_and_the_engine_say(journal_dir, truth):
    with Journal.open(journal_dir, SYMBOLS, fsync="never") as journal:
        engine, commands = recover(journal)
    events = _events(truth)
    summary = truth.summary()
    assert summary["events"] == len(events) == engine.last_seq == truth.last_seq
    assert summary["commands"] == commands
    assert summary["Trade"] > 0 and summary["open_orders"] > 0
    assert all(truth.hashes[e.seq] == digest(encode(e)) for e in events)
    # The open orders derived from the last update of each order are exactly the engine's.
    derived = truth.open_orders()
    for user in range(1, USERS + 1):
        opened = engine.open_orders(user)
        assert derived.get(user, []) == [o.order_id for o in opened]
        assert all(truth.order_active[o.order_id] == row_digest(event_row(o, ACTIVE_COLUMNS)) for o in opened)
    last: dict[int, OrderUpdate] = {}
    states: dict[int, UserState] = {}
    for e in events:
        if isinstance(e, OrderUpdate):
            last[e.order_id] = e
            states.setdefault(e.user_id, UserState()).apply(e)
    assert summary["orders"] == len(last)
    for oid, e in last.items():
        assert (truth.order_user[oid], truth.order_last[oid]) == (e.user_id, e.seq)
        assert truth.order_history[oid] == row_digest(event_row(e, HISTORY_COLUMNS))
        assert truth.order_by_id[oid] == row_digest(event_row(e, BY_ID_COLUMNS))
    assert {u: s.stats for u, s in truth.states.items()} == {u: s.stats for u, s in states.items()}
    assert len(truth.day_seqs) == 2, "the flow crosses midnight: two stream days"


def test_a_live_journal_is_read_from_a_copy_and_never_cut(journal_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    whole = (journal_dir / "journal.log").read_bytes()
    # The engine is half-way through appending a record: Journal.open would cut it in place.
    (live / "journal.log").write_bytes(whole + struct.pack(">II", 100, 0) + b"[{")
    size = (live / "journal.log").stat().st_size
    with _truth(live) as truth, Journal.open(journal_dir, SYMBOLS, fsync="never") as original:
        assert truth.last_seq == original.last_seq
        assert truth.directory == live and truth.journal.path.parent != live
    assert (live / "journal.log").stat().st_size == size


def test_an_unexpected_epoch_or_no_journal_is_an_error(journal_dir, tmp_path, truth):
    with pytest.raises(AuditError, match="holds epoch"), _truth(journal_dir, epoch=truth.epoch + 1):
        pass
    with pytest.raises(AuditError, match="no journal"), _truth(tmp_path):
        pass


def test_audited_columns_are_columns_of_the_worker_tables():
    cql_dir = Path(__file__).resolve().parents[3] / "streams" / "cql"
    cql = (cql_dir / "001_tables.cql").read_text()
    added = re.findall(r"ALTER TABLE \{ks\}\.(\w+) ADD (\w+)", (cql_dir / "002_fewer_rows.cql").read_text())

    def columns(table: str) -> set[str]:
        body = re.search(rf"\.{table} \((.*?)PRIMARY KEY", cql, re.S).group(1)  # type: ignore[union-attr]
        return {line.split()[0] for line in body.strip().splitlines()} | {c for t, c in added if t == table}

    assert set(ACTIVE_COLUMNS) <= columns("active_orders")
    assert set(HISTORY_COLUMNS) <= columns("order_history")
    assert set(BY_ID_COLUMNS) <= columns("orders_by_id")
    assert {"day", "seq", "user_id", "payload"} <= columns("user_updates")
    assert "events" in columns("order_history")
    assert {*STAT_FIELDS, "last_epoch", "last_seq"} <= columns("order_statistics")
    fills = (cql_dir / "003_fills_and_lookups.cql").read_text()
    body = re.search(r"\.user_trades \((.*?)PRIMARY KEY", fills, re.S).group(1)  # type: ignore[union-attr]
    assert tuple(line.split()[0] for line in body.strip().splitlines()) == FILL_COLUMNS


# --------------------------------------------------------------------------------- pure checks
def test_partition_order_allows_resends_only():
    order = PartitionOrder()
    assert order.offer(3, resend=False) and order.offer(5, resend=False) and order.offer(5, resend=False)
    assert order.offer(4, resend=True), "a re-send of a seq already seen is at-least-once, not disorder"
    assert not order.offer(4, resend=False)
    assert order.high == 5


def _newer_writer_payload(event: OrderUpdate) -> bytes:
    schema = json.loads((codec.SCHEMA_DIR / "OrderUpdate.avsc").read_text())
    newer = copy.deepcopy(schema)
    newer["fields"].append({"name": "venue", "type": "string", "default": "main"})
    fp = codec.add_writer(json.dumps(newer))
    record = {k: getattr(v, "value", v) for k, v in codec.decode_dict(encode(event))[1].items()}
    buf = io.BytesIO()
    buf.write(struct.pack("<2sQ", codec.MAGIC, fp))
    schemaless_writer(buf, parse_schema(newer), {**record, "venue": "other"})
    return buf.getvalue()


def test_payload_verdicts(truth, monkeypatch):
    # The newer writer is made known to this test only: codec's writer table is process-wide, and a
    # leftover writer would fail tests/unit/schemas/test_stdavro.py's writers-match check.
    monkeypatch.setattr(codec, "_WRITERS", dict(codec._WRITERS))
    ev = next(e for e in _events(truth) if isinstance(e, OrderUpdate))
    want = truth.hashes[ev.seq]
    assert payload_verdict(encode(ev), want, ev.epoch, ev.seq) == ("ok", "")
    # Other bytes, same event: a record written with another (here newer) writer schema.
    newer = _newer_writer_payload(ev)
    assert newer != encode(ev) and payload_verdict(newer, want, ev.epoch, ev.seq) == ("ok", "")
    changed = encode(replace(ev, filled_qty=ev.filled_qty + 1))
    assert payload_verdict(changed, want, ev.epoch, ev.seq) == ("inconsistent", "payload_differs")
    other_seq = encode(replace(ev, seq=ev.seq + 1))
    assert payload_verdict(other_seq, want, ev.epoch, ev.seq) == ("inconsistent", "seq_mismatch")
    assert payload_verdict(b"garbage", want, ev.epoch, ev.seq) == ("unknown", "truncated")


def test_stats_verdicts():
    want, v = (2, 1, 1, 0, 0, 0, 1, 5, 500), (9, 40)
    assert stats_verdict(want, want, v, v) is None
    assert stats_verdict((3, *want[1:]), want, v, v) == "applied_twice"
    assert stats_verdict((1, *want[1:]), want, (9, 30), v) == "stale"
    assert stats_verdict((3, *want[1:]), want, (9, 30), v) == "mismatch"
    assert stats_verdict((None, *want[1:]), want, v, v) == "mismatch"
    assert stats_verdict(want, want, (None, None), v) == "mismatch"


def test_findings_keep_the_first_examples_and_do_not_fail_on_information():
    f = Findings(limit=2)
    for seq in range(5):
        f.add("kafka.updates", "duplicates", 1, seq=seq)
        f.add("kafka.updates", "ahead")
    assert f.ok and not f.examples and not f.per_user
    for seq in range(5):
        f.add("kafka.updates", "lost", 7, seq=seq)
    assert not f.ok
    assert [e["seq"] for e in f.examples] == [0, 1]
    assert f.per_user == {7: {"kafka.updates.lost": 5}}
    assert f.area("kafka.updates")["lost"] == 5 and f.area("kafka.updates")["duplicates"] == 5
    f = Findings()
    f.notes.append("topic x does not exist")
    assert not f.ok


# ------------------------------------------------------------------------- the Kafka ledger
ROLE = {OrderUpdate: "updates", Trade: "trades"}


def _records(truth):
    """Every record the bridge writes for the journal, in its order: (role, partition, key, headers, value)."""
    out = []
    for e in _events(truth):
        keys = [e.taker_user_id, e.maker_user_id] if isinstance(e, Trade) else [e.user_id]
        for key in dict.fromkeys(keys):
            headers = [("epoch", str(e.epoch).encode()), ("seq", str(e.seq).encode())]
            out.append((ROLE.get(type(e), "balances"), key % PARTITIONS, str(key).encode(), headers, encode(e)))
    return out


def _ledger(truth, records, registry=None) -> Findings:
    f = Findings(limit=50)
    ledger = KafkaLedger(truth, f, registry)
    offsets: dict[tuple[str, int], int] = {}
    for role, partition, key, headers, value in records:
        offset = offsets[(role, partition)] = offsets.get((role, partition), -1) + 1
        ledger.offer(role, partition, offset, key, headers, value)
    ledger.finish()
    return f


def _failing(f: Findings) -> dict[str, int]:
    return {f"{a}.{c}": n for a, cs in f.counts.items() for c, n in cs.items() if n and c not in ("duplicates",)}


def test_every_record_in_place_is_clean(truth):
    records = _records(truth)
    f = _ledger(truth, records)
    assert f.ok, f.examples[:3]
    for role in ("updates", "trades", "balances"):
        assert f.read[f"kafka.{role}"] == f.expected[f"kafka.{role}"] > 0
    assert sum(f.read.values()) == len(records)


def test_resends_are_duplicates_not_disorder(truth):
    records = _records(truth)
    # A bridge restart: the tail of each partition written again after what came before.
    f = _ledger(truth, records + records[-40:])
    assert f.ok
    assert sum(f.counts[a]["duplicates"] for a in list(f.counts)) == 40


def _index(records, role, pred=lambda r: True):
    return next(i for i, r in enumerate(records) if r[0] == role and pred(r))


def test_lost_records_are_counted_per_side_and_user(truth):
    records = _records(truth)
    u = _index(records, "updates")
    # The maker copy of a trade between two users: the second record of its seq.
    t = next(i for i in range(1, len(records)) if records[i][0] == "trades" and records[i][3] == records[i - 1][3])
    lost_user, maker_user = int(records[u][2]), int(records[t][2])
    f = _ledger(truth, [r for i, r in enumerate(records) if i not in (u, t)])
    assert _failing(f) == {"kafka.updates.lost": 1, "kafka.trades.lost": 1}
    maker = next(e for e in f.examples if e["area"] == "kafka.trades")
    assert maker["side"] == "maker" and maker["user_id"] == maker_user
    assert f.per_user[lost_user]["kafka.updates.lost"] == 1


def test_changed_payload_is_inconsistent_with_the_differing_fields(truth):
    records = _records(truth)
    i = _index(records, "updates")
    role, partition, key, headers, value = records[i]
    ev = codec.decode(value)
    bad = encode(replace(ev, filled_qty=ev.filled_qty + 3))
    # Written again, changed, after the good copy: a seq seen twice with different payloads.
    f = _ledger(truth, [*records, (role, partition, key, headers, bad)])
    assert _failing(f) == {"kafka.updates.inconsistent": 1}
    (example,) = f.examples
    assert example["seq"] == ev.seq and example["fields"] == {"filled_qty": [ev.filled_qty, ev.filled_qty + 3]}
    # The only copy changed: inconsistent and lost.
    records[i] = (role, partition, key, headers, bad)
    assert _failing(_ledger(truth, records)) == {"kafka.updates.inconsistent": 1, "kafka.updates.lost": 1}


def test_disorder_within_a_partition(truth):
    records = _records(truth)
    a = _index(records, "balances", lambda r: r[1] == 0)
    b = _index(records[a + 1 :], "balances", lambda r: r[1] == 0) + a + 1
    records[a], records[b] = records[b], records[a]
    assert _failing(_ledger(truth, records)) == {"kafka.balances.out_of_order": 1}


def test_unknown_misrouted_and_foreign_records(truth):
    records = _records(truth)
    epoch, last = truth.epoch, truth.last_seq
    u = records[_index(records, "updates")]
    b = records[_index(records, "balances")]
    other_user = str(int(u[2]) % USERS + 1).encode()
    extra = [
        ("updates", 0, u[2], None, b"not avro at all"),  # no headers and undecodable
        ("updates", u[1], u[2], u[3], None),  # a tombstone
        ("updates", 0, other_user, u[3], u[4]),  # keyed by another user
        ("updates", b[1], b[2], b[3], b[4]),  # a balance update on the updates topic
        ("updates", 1, u[2], [("epoch", str(epoch - 1).encode()), ("seq", b"1")], u[4]),  # an older epoch
        # Beyond anything the journal holds, even the live one: never produced by the engine.
        ("updates", 2, u[2], [("epoch", str(epoch).encode()), ("seq", str(last + 1).encode())], u[4]),
        ("updates", 2, u[2], [("epoch", str(epoch + 1).encode()), ("seq", b"3")], u[4]),  # a later epoch
        ("updates", u[1], u[2], [("epoch", str(epoch).encode()), ("seq", b"0")], u[4]),  # no such seq
        ("updates", u[1], u[2], u[3], b"\x00\x00\x00\x00\x01" + u[4][10:]),  # registry frame, no registry
    ]
    f = _ledger(truth, records + extra)
    assert _failing(f) == {
        "kafka.updates.unknown": 4,
        "kafka.updates.inconsistent": 2,
        "kafka.updates.other_epoch": 1,
        "kafka.updates.beyond_journal": 2,
    }
    assert not f.ok
    beyond = [e for e in f.examples if e["category"] == "beyond_journal"]
    assert [(e["seq"], e.get("epoch", epoch), e["user_id"]) for e in beyond] == [
        (last + 1, epoch, int(u[2])),
        (3, epoch + 1, int(u[2])),
    ]
    reasons = sorted(e["reason"] for e in f.examples if e["category"] != "beyond_journal")
    assert reasons == sorted(
        ["bad_magic", "tombstone", "wrong_key", "wrong_topic", "not_in_journal", "registry_frame_without_registry_url"]
    )


def test_records_without_headers_are_identified_by_their_payload(truth):
    records = [(r, p, k, None, v) for r, p, k, _, v in _records(truth)]
    assert _ledger(truth, records).ok


def test_registry_framed_records_are_read_through_the_registry(truth):
    writer = Registry("http://twin", TwinClient())
    writer.register({"OrderUpdate": "u", "Trade": "t", "BalanceUpdate": "b"})
    records = [(r, p, k, h, writer.to_registry(v)) for r, p, k, h, v in _records(truth)]
    # The auditor is a fresh process: it learns each schema id from the registry on first sight.
    assert _ledger(truth, records, Registry("http://twin", writer.client)).ok
    unknown = [*records[:-1], (*records[-1][:4], b"\x00\x00\x00\x00\x63" + records[-1][4][5:])]
    f = _ledger(truth, unknown, Registry("http://twin", writer.client))
    assert {e["reason"] for e in f.examples if e["category"] == "unknown"} == {"unknown_schema_id"}


# ----------------------------------------------------------------- beyond the journal (item 10)
def _claim(role, key, epoch, seq, value):
    return (
        role,
        int(key) % PARTITIONS,
        str(key).encode(),
        [("epoch", str(epoch).encode()), ("seq", str(seq).encode())],
        value,
    )


def test_what_the_live_journal_got_after_the_snapshot_is_ahead_and_the_rest_fails(journal_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "journal.log").write_bytes((journal_dir / "journal.log").read_bytes())
    with _truth(live) as truth:
        # The engine goes on after the snapshot: a deposit journaled (and published) meanwhile.
        with Journal.open(live, SYMBOLS, fsync="never") as journal:
            engine, _ = recover(journal)
            cmd = Deposit(_events(truth)[-1].ts_ns, 1, "USD", 5)  # no later time: no GTT expires
            result = engine.execute(cmd)
            journal.append(cmd, result.events)
        (new,) = result.events
        assert new.seq == truth.last_seq + 1
        records = [r for r in _records(truth)]
        records.append(_claim("balances", 1, truth.epoch, new.seq, encode(new)))
        forged = replace(new, seq=new.seq + 10_000)
        records.append(_claim("balances", 1, truth.epoch, forged.seq, encode(forged)))
        f = _ledger(truth, records)
        assert f.counts["kafka.balances"]["ahead"] == 1
        assert f.counts["kafka.balances"]["beyond_journal"] == 1 and not f.ok
        (example,) = [e for e in f.examples if e["category"] == "beyond_journal"]
        assert (example["seq"], example["user_id"]) == (forged.seq, 1)
        assert f.per_user == {1: {"kafka.balances.beyond_journal": 1}}
        assert truth.live is not None and truth.live.last == new.seq


def test_a_replaced_live_journal_cannot_judge_and_counts_ahead(journal_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "journal.log").write_bytes((journal_dir / "journal.log").read_bytes())
    with _truth(live) as truth:
        (live / "journal.log").unlink()
        Journal.open(live, SYMBOLS, fsync="never", epoch=truth.epoch + 1).close()  # a fresh engine, a new epoch
        ev = _events(truth)[-1]
        f = _ledger(truth, [*_records(truth), _claim("balances", 1, truth.epoch, truth.last_seq + 10_000, encode(ev))])
        assert f.ok and f.counts["kafka.balances"]["ahead"] == 1
        assert truth.live is not None and truth.live.replaced


# ------------------------------------------------------------------- unpublishable seqs (item 4)
def test_a_journal_with_unpublishable_events_is_audited_not_crashed(tmp_path):
    """Before the wire-range rules a journal could hold user_id 2**64: ``ohs audit`` died on it with
    OverflowError. Now such seqs are a category of their own, and expected nowhere downstream."""
    legacy = build_legacy(tmp_path, SYMBOLS)
    with _truth(tmp_path) as truth:
        assert [seq for seq, _, _ in truth.unpublishable] == sorted(legacy.unpublishable)
        assert truth.summary()["unpublishable_seqs"] == sorted(legacy.unpublishable)
        assert 2**64 not in truth.states and 2**64 not in set(truth.order_user)
        f = Findings(limit=50)
        check_journal(truth, f)
        assert f.counts["journal"]["unpublishable"] == len(legacy.unpublishable) and not f.ok
        assert {e["seq"]: e["reason"] for e in f.examples} == legacy.unpublishable
        # Kafka holds every publishable event and nothing else: no "lost" for the markers' seqs.
        good = [e for e in legacy.events if e.seq not in legacy.unpublishable]
        records = []
        for e in good:
            keys = [e.taker_user_id, e.maker_user_id] if isinstance(e, Trade) else [e.user_id]
            for key in dict.fromkeys(keys):
                records.append(_claim(ROLE.get(type(e), "balances"), key, e.epoch, e.seq, encode(e)))
        f = _ledger(truth, records)
        assert f.ok, f.examples[:3]
        # A record that claims an unpublishable seq was not written by the bridge.
        seq = min(legacy.unpublishable)
        f = _ledger(truth, [*records, _claim("updates", 1, truth.epoch, seq, encode(good[0]))])
        assert [(e["category"], e["reason"]) for e in f.examples] == [("inconsistent", "unpublishable_in_journal")]


# --------------------------------------------------------------------- fills (user_trades)
def _trades(truth) -> list[Trade]:
    return [e for e in _events(truth) if isinstance(e, Trade)]


def _fill_rows(truth) -> list[tuple]:
    """Every user_trades row the worker writes for the journal, in FILL_COLUMNS order."""
    return [fill_row(f) for t in _trades(truth) for f in trade_fills(t)]


def _fills(truth, rows, months=None) -> Findings:
    """The fills ledger fed like audit_cassandra does: the month index, then every partition's rows."""
    f = Findings(limit=50)
    ledger = FillLedger(truth, f)
    months = {(r[0], r[1]) for r in rows} if months is None else months
    for user in ledger.users():
        for m in sorted((m for u, m in months if u == user), reverse=True):
            ledger.offer_month(user, m)
    wanted = set(ledger.partitions())
    for row in rows:
        if (row[0], row[1]) in wanted:  # a partition nothing names is never read
            ledger.offer(row)
    ledger.finish()
    return f


def _fills_failing(f: Findings) -> dict[str, int]:
    return {f"{a}.{c}": n for a, cs in f.counts.items() for c, n in cs.items() if n and c not in INFO_CATEGORIES}


def test_a_trade_implies_one_fill_per_side_in_each_users_partition(truth):
    trades = _trades(truth)
    assert any(t.taker_user_id == t.maker_user_id for t in trades), "the flow has self-trades"
    for t in trades:
        taker, maker = trade_fills(t)
        assert (taker.liquidity, taker.user_id, taker.order_id) == (TAKER, t.taker_user_id, t.taker_order_id)
        assert (maker.liquidity, maker.user_id, maker.order_id) == (MAKER, t.maker_user_id, t.maker_order_id)
        assert taker.side != maker.side and taker.fee == t.taker_fee and maker.fee == t.maker_fee
        assert taker.month == maker.month == month_of(t.ts_ns)
        # Exactly what the worker writes from the trade's records, one per user (streams.trades).
        assert sorted(trade_fills(t), key=str) == sorted(
            (f for u in {t.taker_user_id, t.maker_user_id} for f in fills_of(t, u)), key=str
        )
        assert (truth.months[t.seq], truth.fill_taker[t.seq], truth.fill_maker[t.seq]) == (
            taker.month,
            row_digest(fill_row(taker)),
            row_digest(fill_row(maker)),
        )
    assert list(truth.trade_seqs()) == [t.seq for t in trades]
    assert truth.summary()["fills"] == 2 * len(trades)
    assert truth.fill_months() == {(r[0], r[1]) for r in _fill_rows(truth)}


def test_every_fill_once_with_its_month_is_clean(truth):
    rows = _fill_rows(truth)
    f = _fills(truth, rows)
    assert f.ok, f.examples[:3]
    assert f.read["user_trades"] == f.expected["user_trades"] == len(rows) == 2 * len(_trades(truth))
    assert f.read["user_trade_months"] == f.expected["user_trade_months"] == len(truth.fill_months())
    assert f.area("user_trades")["lost"] == 0 and set(f.area("user_trade_months")) >= {"lost", "extra"}


def test_lost_changed_and_forged_fills_each_fail(truth):
    rows = _fill_rows(truth)
    cols = {c: i for i, c in enumerate(FILL_COLUMNS)}
    trades = _trades(truth)
    pair = next(t for t in trades if t.taker_user_id != t.maker_user_id)
    lost = next(i for i, r in enumerate(rows) if (r[cols["seq"]], r[cols["liquidity"]]) == (pair.seq, MAKER))
    changed = next(i for i, r in enumerate(rows) if r[cols["seq"]] != pair.seq)
    good = list(rows)
    rows = [r for i, r in enumerate(good) if i != lost]
    victim = list(good[changed])
    victim[cols["qty"]] += 1
    rows[rows.index(good[changed])] = tuple(victim)
    third = next(u for u in range(1, USERS + 1) if u not in (pair.taker_user_id, pair.maker_user_id))
    taker_row = next(r for r in good if (r[cols["seq"]], r[cols["liquidity"]]) == (pair.seq, TAKER))
    update_seq = next(e.seq for e in _events(truth) if isinstance(e, OrderUpdate))
    forged = [
        (third, *taker_row[1:]),  # a real fill in another user's partition
        (*taker_row[:2], taker_row[2] + 1, *taker_row[3:]),  # the same side again, at another time
        (*taker_row[:4], update_seq, *taker_row[5:]),  # a seq that is no trade
        (*taker_row[:4], truth.last_seq + 10**6, *taker_row[5:]),  # beyond the live journal
    ]
    f = _fills(truth, rows + forged)
    assert _fills_failing(f) == {
        "user_trades.lost": 1,
        "user_trades.mismatch": 1,
        "user_trades.extra": 3,
        "user_trades.beyond_journal": 1,
    }
    by = {(e["category"], e.get("reason")): e for e in f.examples}
    gone = by[("lost", None)]
    assert (gone["user_id"], gone["seq"], gone["liquidity"]) == (pair.maker_user_id, pair.seq, MAKER)
    assert by[("mismatch", None)]["fields"] == {"qty": [good[changed][cols["qty"]], victim[cols["qty"]]]}
    misplaced = by[("extra", "misplaced")]
    assert (misplaced["user_id"], misplaced["journal_user"]) == (third, pair.taker_user_id)
    assert by[("extra", "twice")]["seq"] == pair.seq and by[("extra", "not_a_fill")]["seq"] == update_seq
    assert by[("beyond_journal", None)]["seq"] == truth.last_seq + 10**6
    assert f.per_user[pair.maker_user_id]["user_trades.lost"] == 1 and not f.ok
    assert f.read["user_trades"] == len(rows) + len(forged)


def test_the_month_index_must_name_every_partition_of_fills(truth):
    rows = _fill_rows(truth)
    months = truth.fill_months()
    dropped = min(months)
    f = _fills(truth, rows, months - {dropped})
    assert _fills_failing(f) == {"user_trade_months.lost": 1}
    (example,) = f.examples
    assert (example["user_id"], example["month"]) == dropped
    # A month naming no fills at all is extra; one whose fills are all of an earlier epoch is history.
    old = (dropped[0], 202001)
    older = (*old, rows[0][2], truth.epoch - 1, *rows[0][4:])
    f = _fills(truth, [*rows, older], months | {old, (dropped[0], 202002)})
    assert _fills_failing(f) == {"user_trade_months.extra": 1}
    assert f.counts["user_trade_months"]["other_epoch"] == 1 and f.counts["user_trades"]["other_epoch"] == 1
    assert f.read["user_trades"] == len(rows), "other epochs' rows are not this journal's to count"


def test_fills_journaled_after_the_snapshot_are_ahead(journal_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "journal.log").write_bytes((journal_dir / "journal.log").read_bytes())
    with _truth(live) as truth:
        with Journal.open(live, SYMBOLS, fsync="never") as journal:
            engine, _ = recover(journal)
            cmd = Deposit(_events(truth)[-1].ts_ns, 1, "USD", 5)
            journal.append(cmd, engine.execute(cmd).events)
        row = _fill_rows(truth)[0]
        later = (row[0], 209912, row[2], row[3], truth.last_seq + 1, *row[5:])
        f = _fills(truth, [*_fill_rows(truth), later], truth.fill_months() | {(row[0], 209912)})
        assert f.ok, f.examples
        assert f.counts["user_trades"]["ahead"] == 1 and f.counts["user_trade_months"]["ahead"] == 1
