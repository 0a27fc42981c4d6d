"""``ohs replay``'s pure parts: what it replays from which topic into which group, and the trades
replay's loop (a fake consumer, the in-memory fills twin) writing each user's fills once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from streams.processor import Processor, Record
from streams.replay import GROUPS, PartitionSummary, Replay, ReplayError, ReplayOptions, ReplaySummary, _Sink
from streams.settings import WorkerSettings
from streams.trades import TradeProcessor
from tests.unit.streams.test_trades import FillTwin, _all, _got, _records, _truth


@pytest.fixture
def settings(monkeypatch) -> WorkerSettings:
    for name in ("OHS_WORKER_TOPIC_UPDATES", "OHS_WORKER_TOPIC_TRADES", "OHS_BRIDGE_TOPIC_TRADES", "OHS_WORKER_GROUP"):
        monkeypatch.delenv(name, raising=False)
    return WorkerSettings()


def test_each_kind_has_its_topic_and_group_and_updates_stay_the_default(settings, monkeypatch):
    updates = Replay(settings, ReplayOptions())
    assert (updates.topic, updates.o.group, updates.trades) == (settings.topic_updates, "ohs-replay", False)
    trades = Replay(settings, ReplayOptions(what="trades"))
    assert (trades.topic, trades.o.group, trades.trades) == ("orders.trades", GROUPS["trades"], True)
    monkeypatch.setenv("OHS_BRIDGE_TOPIC_TRADES", "orders.trades.x")  # the bridge's topic is the worker's
    assert Replay(settings, ReplayOptions(what="trades")).topic == "orders.trades.x"
    given = Replay(settings, ReplayOptions(what="trades", topic="t", group="g"))
    assert (given.topic, given.o.group) == ("t", "g")
    with pytest.raises(ReplayError, match="cannot replay 'balances'"):
        Replay(settings, ReplayOptions(what="balances"))
    with pytest.raises(ReplayError, match="the live worker's"):
        Replay(settings, ReplayOptions(what="trades", group=settings.group))


async def _no_letters(_rec: Record, _reason: str, _detail: str) -> None:
    raise AssertionError("nothing is dead-lettered here")


def test_the_worker_processor_of_each_kind(settings):
    twin = FillTwin()
    trades = Replay(settings, ReplayOptions(what="trades"))._processor(_Sink(), twin, _no_letters, None)  # type: ignore[arg-type]
    assert isinstance(trades, TradeProcessor) and trades.fill_sink is twin
    updates = Replay(settings, ReplayOptions())._processor(_Sink(), None, _no_letters, None)
    assert type(updates) is Processor and isinstance(updates.sink, _Sink)


class _Msg:
    def __init__(self, rec: Record) -> None:
        self.rec = rec

    def partition(self) -> int:
        return self.rec.partition

    def offset(self) -> int:
        return self.rec.offset

    def error(self) -> None:
        return None

    def key(self) -> bytes | None:
        return self.rec.key

    def value(self) -> bytes | None:
        return self.rec.value

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


class _Consumer:
    """Hands out every record at once; commits are recorded."""

    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.batches = [[_Msg(r) for r in records[i : i + size]] for i in range(0, len(records), size)]
        self.commits: list[dict[int, int]] = []

    def assign(self, _tps: Any) -> None:
        pass

    def pause(self, _tps: Any) -> None:
        pass

    def consume(self, _n: int, _timeout: float) -> list[_Msg]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: Any, asynchronous: bool) -> list[Any]:
        self.commits.append({tp.partition: tp.offset for tp in offsets})
        return []


def _replay(settings: WorkerSettings, twin: FillTwin | None, records: list[Record], size: int) -> ReplaySummary:
    """The replay's loop over ``records`` (their offsets renumbered per partition), into ``twin``."""
    per: dict[int, int] = {}
    laid = []
    for r in records:
        per[r.partition] = per.get(r.partition, -1) + 1
        laid.append(Record(r.key, r.value, "trades", r.partition, per[r.partition]))  # no headers, as replay reads
    job = Replay(settings, ReplayOptions(what="trades", dry_run=twin is None, batch_size=size))
    summary = ReplaySummary(
        "trades", "g", "ks", twin is None, False, "", [PartitionSummary(p, 0, n + 1, 0) for p, n in sorted(per.items())]
    )
    consumer = _Consumer(laid, size)
    proc = job._processor(_Sink(), twin, _no_letters, None)  # type: ignore[arg-type]
    asyncio.run(job._loop(consumer, None, proc, summary))  # type: ignore[arg-type]
    if twin is None:
        assert not consumer.commits, "a dry run commits nothing"
    else:
        assert consumer.commits[-1] == {p.partition: p.end for p in summary.partitions}
    return summary


def test_a_trades_replay_writes_every_users_fills_once_and_counts_records_as_read(settings):
    # Every tenth a self-trade: one record, two fills.
    trades = [replace(t, maker_user_id=t.taker_user_id) if i % 10 == 0 else t for i, t in enumerate(_all(12_000))]
    selfs = sum(t.taker_user_id == t.maker_user_id for t in trades)
    assert selfs > 0
    records = _records(trades)
    twin = FillTwin()
    s = _replay(settings, twin, records, 100)
    want = _truth(trades)
    assert _got(twin) == want and set(twin.months) == {(f.user_id, f.month) for f in want.values()}
    assert (s.sum("records"), s.sum("applied"), s.sum("dead_lettered")) == (len(records), len(want), 0)
    assert len(records) == 2 * len(trades) - selfs and len(want) == 2 * len(trades)
    assert {p.partition: p.offset for p in s.partitions} == {p.partition: p.end for p in s.partitions}
    # Again over the same rows: identical cells (the worker's timestamps), nothing new.
    rows = dict(twin.rows)
    _replay(settings, twin, records, 37)
    assert twin.rows == rows


def test_a_dry_trades_replay_counts_fills_and_writes_nothing(settings):
    trades = list(_all(12_000))[:200]
    records = _records(trades)
    s = _replay(settings, None, records, 64)
    assert (s.sum("records"), s.sum("applied")) == (len(records), len(_truth(trades)))
