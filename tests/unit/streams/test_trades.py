"""The trades processor against an in-memory twin: each user's fills exactly once, bad records dead-lettered."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from bench.kit import engine_events
from schemas.codec import encode
from schemas.events import OrderUpdate, Side, Trade
from streams.errors import SinkRejected, SinkUnavailable
from streams.processor import ProcessorStop, Record, SeqGuard
from streams.sink import Fill, FillMonth, RowBuilder, routing_key, statement_cql
from streams.trades import MAKER, TAKER, TradeProcessor, fills_of, month_of, month_start_ns


@functools.cache
def _events(n: int) -> tuple[Any, ...]:
    return tuple(engine_events(n))


def _all(n: int) -> tuple[Trade, ...]:
    return tuple(e for e in _events(n) if isinstance(e, Trade))


def _records(trades: Sequence[Trade], headers: bool = True) -> list[Record]:
    """What the bridge produces: each trade keyed by its taker (side=taker) and, unless the maker is the
    same user, by its maker (side=maker)."""
    out = []
    for t in trades:
        sides = [(t.taker_user_id, b"taker")]
        if t.maker_user_id != t.taker_user_id:
            sides.append((t.maker_user_id, b"maker"))
        for user, side in sides:
            h = (("epoch", str(t.epoch).encode()), ("seq", str(t.seq).encode()))
            h += (("side", side),) if headers else ()
            out.append(Record(str(user).encode(), encode(t), "trades", user % 3, len(out), h))
    return out


@dataclass
class FillTwin:
    """user_trades and user_trade_months as last-write-wins dicts; can fail retriably or reject."""

    fail_retriably: int = 0
    reject: bool = False
    rows: dict[tuple[int, int, int, int, int, str], tuple[int, Fill]] = field(default_factory=dict)
    months: dict[tuple[int, int], int] = field(default_factory=dict)
    month_writes: int = 0
    writes: int = 0

    def fill_statements(self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()) -> Any:
        return list(fills), list(months)

    async def write(self, pending: Any) -> None:
        if self.reject:
            raise SinkRejected("rejected (twin)")
        if self.fail_retriably:
            self.fail_retriably -= 1
            raise SinkUnavailable("unavailable (twin)")
        self.writes += 1
        fills, months = pending
        for f in fills:
            key = (f.user_id, f.month, f.ts_ns, f.epoch, f.seq, f.liquidity)
            ts = f.epoch + f.seq
            if key not in self.rows or ts >= self.rows[key][0]:
                self.rows[key] = (ts, f)
        for user, month, ts in months:
            self.month_writes += 1
            self.months[(user, month)] = max(ts, self.months.get((user, month), 0))


class Harness:
    def __init__(self, sink: FillTwin | None = None, guard: SeqGuard | None = None) -> None:
        self.sink = sink or FillTwin()
        self.letters: list[tuple[Record, str, str]] = []

        async def dead_letter(rec: Record, reason: str, detail: str) -> None:
            self.letters.append((rec, reason, detail))

        self.proc = TradeProcessor(self.sink, dead_letter, guard=guard, retry_initial_s=0.001, retry_max_s=0.002)

    def run(self, records: list[Record], batch: int = 300) -> list[Any]:
        return [asyncio.run(self.proc.process(records[i : i + batch]))[0] for i in range(0, len(records), batch)]


def _truth(trades: Sequence[Trade]) -> dict[tuple[int, int, str], Fill]:
    """(user, seq, liquidity) -> the fill each side of each trade gives its user."""
    out = {}
    for t in trades:
        for user in {t.taker_user_id, t.maker_user_id}:
            for f in fills_of(t, user):
                out[(f.user_id, f.seq, f.liquidity)] = f
    return out


def _got(sink: FillTwin) -> dict[tuple[int, int, str], Fill]:
    return {(f.user_id, f.seq, f.liquidity): f for _ts, f in sink.rows.values()}


def test_every_side_of_every_trade_once_whatever_the_duplicates_and_order():
    trades = list(_all(12_000))
    assert len(trades) > 100
    records = _records(trades)
    twice = records * 2
    random.Random(5).shuffle(twice)
    h = Harness()
    results = h.run(twice)
    assert not h.letters
    want = _truth(trades)
    assert _got(h.sink) == want
    assert len(h.sink.rows) == len(want) == 2 * len(trades) - sum(t.taker_user_id == t.maker_user_id for t in trades)
    assert sum(r.applied for r in results) >= len(want)
    # Every (user, month) of a fill is indexed, and written once however many batches had it.
    assert set(h.sink.months) == {(f.user_id, f.month) for f in want.values()}
    assert h.sink.month_writes == len(h.sink.months)


def test_a_fill_is_what_the_user_did_on_their_side():
    t = _all(12_000)[0]
    t = replace(t, taker_side=Side.BUY, taker_fee=7, maker_fee=3)
    taker, maker = fills_of(t, t.taker_user_id)[0], fills_of(t, t.maker_user_id)[-1]
    assert (taker.liquidity, taker.side, taker.order_id, taker.fee) == (TAKER, "BUY", t.taker_order_id, 7)
    assert (maker.liquidity, maker.side, maker.order_id, maker.fee) == (MAKER, "SELL", t.maker_order_id, 3)
    assert taker.price == maker.price == t.price and taker.quote_qty == t.quote_qty
    self_trade = replace(t, maker_user_id=t.taker_user_id)
    assert [f.liquidity for f in fills_of(self_trade, t.taker_user_id)] == [TAKER, MAKER]
    assert fills_of(t, 10**12) == []


def test_a_self_trade_record_gives_both_sides_to_its_one_user():
    t = replace(_all(12_000)[0], maker_user_id=_all(12_000)[0].taker_user_id)
    h = Harness()
    h.run(_records([t]))
    assert sorted(liq for (_u, _s, liq) in _got(h.sink)) == [MAKER, TAKER]


def test_months_are_utc_calendar_months():
    day = dt.datetime(2025, 1, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC)
    ns = int(day.timestamp()) * 10**9 + 999_999_999
    assert month_of(ns) == 202501 and month_of(ns + 1) == 202502
    assert month_start_ns(202502) == ns + 1
    assert month_of(0) == 197001 and month_start_ns(197001) == 0


def test_bad_records_are_dead_lettered_with_a_reason_and_the_rest_written():
    good = list(_all(12_000)[:20])
    t = good[0]
    taker = str(t.taker_user_id).encode()
    other = str(t.taker_user_id + t.maker_user_id + 1).encode()
    bad = [
        Record(taker, None, "trades", 0, 1),
        Record(taker, b"\x00" * 10, "trades", 0, 2),
        Record(taker, b"x" * 70_000, "trades", 0, 3),
        Record(other, encode(t), "trades", 0, 4),
        Record(None, encode(t), "trades", 0, 5),
        Record(taker, encode(t), "trades", 0, 6, (("side", b"maker"),)) if t.maker_user_id != t.taker_user_id else None,
        Record(taker, encode(t), "trades", 0, 7, (("side", b"nobody"),)),
        Record(taker, encode(replace(t, quote_qty=t.quote_qty + 1)), "trades", 0, 8),
        Record(taker, encode(replace(t, price=0, quote_qty=0)), "trades", 0, 9),
        Record(taker, encode(replace(t, maker_fee=-1)), "trades", 0, 10),
        Record(taker, encode(replace(t, trade_id=0)), "trades", 0, 11),
        Record(taker, encode(replace(t, symbol="S" * 300)), "trades", 0, 12),
    ]
    bad = [r for r in bad if r is not None]
    upd = next(e for e in _events(12_000) if isinstance(e, OrderUpdate))
    bad.append(Record(str(upd.user_id).encode(), encode(upd), "trades", 0, 13))
    h = Harness()
    h.run([*bad, *_records(good)])
    reasons = [reason for _, reason, _ in h.letters]
    assert len(reasons) == len(bad)
    assert {"null_value", "oversized", "bad_key", "rule_violation", "unexpected_type"} <= set(reasons)
    assert _got(h.sink) == _truth(good)


def test_records_without_a_side_header_are_judged_by_their_key():
    good = list(_all(12_000)[:30])
    h = Harness()
    h.run(_records(good, headers=False))
    assert not h.letters and _got(h.sink) == _truth(good)


def test_unavailable_cassandra_is_waited_out_and_a_rejection_stops():
    good = list(_all(12_000)[:10])
    h = Harness(FillTwin(fail_retriably=3))
    h.run(_records(good))
    assert _got(h.sink) == _truth(good)
    stopped = Harness(FillTwin(reject=True))
    with pytest.raises(ProcessorStop):
        stopped.run(_records(good))
    assert stopped.sink.months == {}  # nothing written, nothing remembered as written


class _Ceiling(SeqGuard):
    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling

    def covers(self, epoch: int, seq: int) -> bool:
        return seq <= self.ceiling


def test_the_seq_guard_dead_letters_forged_far_future_trades():
    good = list(_all(12_000)[:10])
    forged = replace(good[-1], seq=good[-1].seq + 10**9)
    h = Harness(guard=_Ceiling(good[-1].seq))
    h.run(_records([*good, forged]))
    assert {reason for _, reason, _ in h.letters} == {"beyond_ceiling"}
    assert _got(h.sink) == _truth(good)


class _Builder(RowBuilder):
    def __init__(self) -> None:
        self.handles = {name: name for name in statement_cql("ks")}
        self._days = {}


def test_fill_rows_bind_every_column_and_route_by_their_partition():
    t = _all(12_000)[0]
    fills = fills_of(t, t.taker_user_id)
    rows = _Builder().fill_rows(fills, [(t.taker_user_id, fills[0].month, t.epoch + t.seq)])
    (group, name, values, _size), (mgroup, mname, mvalues, _) = rows
    assert name == "fill" and group == ("m", t.taker_user_id, fills[0].month)
    assert statement_cql("ks")["fill"].count("?") == len(values) and values[-1] == t.epoch + t.seq
    assert mname == "fill_month" and mgroup == ("u", t.taker_user_id) and mvalues[-1] == t.epoch + t.seq
    # The composite keys serialize as Cassandra hashes them: 2-byte length, bytes, 0 per component.
    assert (
        routing_key(("m", 1, 202501))
        == b"\x00\x08" + (1).to_bytes(8, "big") + b"\x00\x00\x04" + (202501).to_bytes(4, "big") + b"\x00"
    )
    assert routing_key(("c", 1, "é")) == b"\x00\x08" + (1).to_bytes(8, "big") + b"\x00\x00\x02\xc3\xa9\x00"


def test_an_order_with_a_client_id_gets_one_lookup_row_and_a_duplicate_rejection_none():
    from schemas.events import OrderStatus, RejectReason

    ev = next(e for e in _events(12_000) if isinstance(e, OrderUpdate) and e.created_ns == e.updated_ns)
    placed = replace(ev, client_order_id="my-1")
    second = replace(placed, seq=placed.seq + 1, status=OrderStatus.FILLED)  # same command, same order
    dup = replace(
        placed, order_id=placed.order_id + 1, seq=placed.seq + 2, status=OrderStatus.REJECTED,
        reason=RejectReason.DUPLICATE_CLIENT_ORDER_ID,
    )  # fmt: skip
    rows = _Builder().rows([(placed, b"p"), (second, b"s"), (dup, b"d")], [])
    lookups = [r for r in rows if r[1] == "by_client_id"]
    assert lookups == [
        (("c", ev.user_id, "my-1"), "by_client_id", (ev.user_id, "my-1", ev.epoch, ev.order_id, ev.epoch + ev.seq), 44)
    ]
    assert not [r for r in _Builder().rows([(ev, b"x")], []) if r[1] == "by_client_id" and not ev.client_order_id]
