"""One batch of ``orders.trades`` records -> the ``user_trades`` rows: each user's fills, exactly once.

The bridge produces every Trade twice, keyed by its taker and by its maker (header ``side`` =
``taker`` | ``maker``; a self-trade, whose two sides are one user, once), so each user's partition
holds all their trades. A record keyed by user U becomes U's fill of every side U took in the trade:
one row, or two for a self-trade (MAKER and TAKER), in U's ``(user_id, month)`` partition.

Why no per-user state (no Faust table), unlike order updates: a fill row depends on its trade
alone, never on what came before it, and is written ``USING TIMESTAMP epoch + seq`` of the trade,
so a duplicate, a re-sent record or a whole batch written twice rewrites identical cells. What is
left is the order-updates processor's edge, reused from ``streams.processor``: bounded, decoded and
checked records (anything else dead-lettered with a reason, never a crash), the seq guard against
forged far-future seqs, and writes retried with jittered back-off until they succeed (a rejected
write stops the worker without committing).

The ``user_trade_months`` index (which partitions a query reads) is written once per user and month
per batch at most, and not again while this process remembers having written it: on average far
below one row per batch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from prometheus_client import Counter
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.codec import CodecError, decode
from schemas.events import Trade
from schemas.tables import MAKER, MAX_TS_NS, TAKER, Fill, FillMonth, fills_of, month_of, month_start_ns
from streams.processor import BatchResult, DeadLetter, Limits, Processor, Record, SeqGuard
from streams.state import UserState

__all__ = [
    "MAKER",
    "MAX_TS_NS",
    "TAKER",
    "FillSink",
    "TradeProcessor",
    "TradesSettings",
    "fills_of",
    "month_of",
    "month_start_ns",
]

log = logging.getLogger("ohs.worker")

_MAX_ID = 2**63 - 1
_MONTHS_REMEMBERED = 100_000

FILLS = Counter("ohs_worker_fills_total", "Fills (user_trades rows) written from the trades topic")
TRADE_RECORDS = Counter("ohs_worker_trade_records_total", "Records taken from the trades topic")


class TradesSettings(BaseSettings):
    """The worker's trades settings. (To be folded into ``WorkerSettings``: kept apart only while that
    class has another owner.)"""

    model_config = SettingsConfigDict(env_prefix="OHS_WORKER_", frozen=True, extra="ignore")

    trades: bool = Field(default=True, description="Consume the trades topic into user_trades (the users' fills).")
    topic_trades: str = Field(
        default="orders.trades",
        validation_alias=AliasChoices("OHS_WORKER_TOPIC_TRADES", "OHS_BRIDGE_TOPIC_TRADES"),
        description="Trade topic the worker turns into each user's fills (the bridge's).",
    )


class FillSink(Protocol):
    """What the trades processor writes through: the worker's sinks (``fill_statements`` + ``write``)."""

    def fill_statements(self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()) -> Any: ...

    async def write(self, pending: Any) -> None: ...


class TradeProcessor(Processor):
    """``Processor``'s edge (limits, registry frames, dead letters, seq guard, write retries) for Trades."""

    def __init__(
        self,
        sink: FillSink | None,
        dead_letter: DeadLetter,
        *,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        registry: Any = None,
        guard: SeqGuard | None = None,
        limits: Limits | None = None,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        # The order-updates sink protocol is not used: every write goes through fill_statements.
        super().__init__(
            cast(Any, sink),
            dead_letter,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            registry=registry,
            guard=guard,
            limits=limits or Limits(),
            on_retry=on_retry,
            stats=False,
        )
        self.fill_sink = sink
        self._months: OrderedDict[tuple[int, int], None] = OrderedDict()

    async def process(
        self, records: Sequence[Record], load: Callable[[bytes], UserState] | None = None
    ) -> tuple[BatchResult, dict[bytes, UserState]]:
        """Write the fills of ``records`` (``load`` is unused: fills need no state). Returns the result
        and no changed state, like ``Processor.process``."""
        result = BatchResult()
        checked: list[tuple[Record, Any, bytes]] = []
        for rec in records:
            try:
                outcome = await self._checked_trade(rec)
            except Exception as exc:  # a bug meeting one record must not stop the partition
                log.exception("unexpected error checking %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                outcome = ("internal_error", f"{type(exc).__name__}: {exc}")
            if isinstance(outcome[0], str):
                result.dead_lettered += 1
                await self.dead_letter(rec, outcome[0], str(outcome[1]))
            else:
                checked.append(cast(tuple[Record, Any, bytes], outcome))
        checked = cast(list[tuple[Record, Any, bytes]], await self._guarded(cast(Any, checked), result))
        fills: dict[tuple[int, int, int, str], Fill] = {}
        for rec, trade, _payload in checked:
            user = int(rec.key or b"0")
            for fill in fills_of(trade, user):
                key = (fill.user_id, fill.epoch, fill.seq, fill.liquidity)
                if key in fills:
                    result.duplicates += 1  # the same record twice in one batch: one write is enough
                fills[key] = fill
        months: dict[tuple[int, int], int] = {}
        for f in fills.values():
            if (f.user_id, f.month) not in self._months:
                months[(f.user_id, f.month)] = max(months.get((f.user_id, f.month), 0), f.epoch + f.seq)
        result.applied = len(fills)
        if fills and self.fill_sink is not None:
            pending = self.fill_sink.fill_statements(
                list(fills.values()), [(u, m, ts) for (u, m), ts in months.items()]
            )
            result.rows = getattr(pending, "rows", 0)
            result.requests = len(getattr(pending, "requests", ()))
            t0 = time.monotonic()
            result.retries = await self._write_until_done(pending)
            result.write_seconds = time.monotonic() - t0
            for month in months:  # only once durable: a month row must never be skipped unwritten
                self._months[month] = None
                self._months.move_to_end(month)
            while len(self._months) > _MONTHS_REMEMBERED:
                self._months.popitem(last=False)
        result.durable_at_ns = time.time_ns()
        result.emitted_ns = [f.ts_ns for f in fills.values()]
        return result, {}

    async def _checked_trade(self, rec: Record) -> tuple[Record, Trade, bytes] | tuple[str, str]:
        """(record, trade, single-object payload), or (reason, detail) for a dead letter."""
        if rec.value is None:
            return "null_value", "a tombstone (null value) is not a trade"
        if len(rec.value) > self.limits.max_value_bytes:
            return "oversized", f"{len(rec.value)} bytes > {self.limits.max_value_bytes}"
        value = await self._single_object(rec.value)
        if isinstance(value, CodecError):
            return value.reason, value.detail
        try:
            event = decode(value)
        except CodecError as exc:
            return exc.reason, exc.detail
        if not isinstance(event, Trade):
            return "unexpected_type", type(event).__name__
        problem = self._trade_violation(rec, event)
        if problem:
            return problem
        return rec, event, value

    def _trade_violation(self, rec: Record, t: Trade) -> tuple[str, str] | None:
        key = rec.key
        if key is None or not key.isdigit() or len(key) > 19 or int(key) not in (t.taker_user_id, t.maker_user_id):
            return "bad_key", f"key {key!r:.60} is neither taker {t.taker_user_id} nor maker {t.maker_user_id}"
        side = dict(rec.headers).get("side")
        if side is not None:
            sides = {b"taker": t.taker_user_id, b"maker": t.maker_user_id}
            if side not in sides or sides[side] != int(key):
                return "bad_key", f"side header {side[:20]!r} does not name key {key!r:.60}"
        if not (0 < t.epoch <= _MAX_ID and 0 < t.seq <= _MAX_ID - t.epoch):
            return "rule_violation", f"epoch {t.epoch} seq {t.seq}"
        if min(t.trade_id, t.taker_user_id, t.maker_user_id, t.taker_order_id, t.maker_order_id) <= 0:
            return "rule_violation", f"trade {t.trade_id}: ids must be positive"
        if t.price <= 0 or t.qty <= 0 or t.quote_qty != t.price * t.qty:
            return "rule_violation", f"trade {t.trade_id}: price {t.price} qty {t.qty} quote_qty {t.quote_qty}"
        if t.maker_fee < 0 or t.taker_fee < 0 or not 0 <= t.ts_ns <= MAX_TS_NS:
            return "rule_violation", f"trade {t.trade_id}: fees {t.maker_fee}/{t.taker_fee} ts_ns {t.ts_ns}"
        if len(t.symbol) > self.limits.max_text_chars:
            return "rule_violation", f"symbol longer than {self.limits.max_text_chars} characters"
        return None
