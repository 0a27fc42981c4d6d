"""One batch of ``orders.updates`` records -> Cassandra, with state, retries and dead letters.

Called by the Faust agent for each ``stream.take_events`` batch, in partition
order. It never raises: decoding failures and records that break a rule go
to the dead-letter topic; Cassandra failures are retried with back-off until
they succeed (the agent simply stays on this batch, so no offset moves and
the partition keeps its place), because an exception leaving the loop would
make Faust ack the batch unwritten (``stream.take`` acks in a ``finally``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.events import OrderUpdate
from schemas.codec import CodecError, decode
from schemas.registry import Registry, is_registry_frame
from streams.errors import SinkError
from streams.sink import CassandraSink
from streams.state import ALL_SYMBOLS, UserState

__all__ = ["BatchResult", "Processor", "Record"]

log = logging.getLogger("ohs.worker")


@dataclass(frozen=True, slots=True)
class Record:
    """What the processor needs of one Kafka record."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0
    write_seconds: float = 0.0
    durable_at_ns: int = 0
    """Wall clock when the batch's writes were all acknowledged (the rows are readable)."""
    emitted_ns: list[int] = field(default_factory=list)
    """The engine's emit time of each applied event: durable_at_ns - emitted_ns is its latency."""


DeadLetter = Callable[[Record, str, str], Awaitable[None]]


class Processor:
    def __init__(
        self,
        sink: CassandraSink,
        dead_letter: DeadLetter,
        *,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        registry: Registry | None = None,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_retry = on_retry
        """Called at each failed attempt, as it happens: an outage shows in metrics while it lasts."""
        self.registry = registry
        self.sink = sink
        self.dead_letter = dead_letter
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s

    async def process(
        self, records: Sequence[Record], states: dict[bytes, dict[str, Any] | None]
    ) -> tuple[BatchResult, dict[bytes, dict[str, Any]]]:
        """Apply ``records`` on top of ``states`` (the users' table values, by key).

        Returns the result and the new table values of the users that changed; the caller
        stores those only after this returns, i.e. after Cassandra has the batch.
        """
        result = BatchResult()
        users: dict[bytes, UserState] = {}
        applied: list[tuple[OrderUpdate, bytes]] = []
        for rec in records:
            value = await self._single_object(rec.value)
            if isinstance(value, CodecError):
                event, reason, detail = None, value.reason, value.detail
            else:
                event, reason, detail = self._check(rec, value)
            if event is None:
                result.dead_lettered += 1
                await self.dead_letter(rec, reason, detail)
                continue
            key = rec.key or b""
            state = users.get(key)
            if state is None:
                state = users[key] = UserState.from_dict(states.get(key))
            if state.apply(event):
                applied.append((event, value))  # type: ignore[arg-type]
            else:
                result.duplicates += 1
        result.applied = len(applied)
        touched = {event.user_id for event, _ in applied}
        stats = []
        changed: dict[bytes, dict[str, Any]] = {}
        for key, state in users.items():
            user_id = int(key)
            if user_id not in touched:
                continue
            changed[key] = state.to_dict()
            symbols = {ev.symbol for ev, _ in applied if ev.user_id == user_id} | {ALL_SYMBOLS}
            for symbol in symbols:
                stats.append((user_id, symbol, state.stats[symbol], state.stats_version[symbol]))
        statements = self.sink.statements(applied, stats)
        t0 = time.monotonic()
        result.retries = await self._write_until_done(statements)
        result.write_seconds = time.monotonic() - t0
        result.durable_at_ns = time.time_ns()
        result.emitted_ns = [ev.ts_ns for ev, _ in applied]
        return result, changed

    async def _single_object(self, value: bytes) -> bytes | CodecError:
        """A registry-framed record as single-object encoding (what Cassandra's payload columns
        hold: readable without a registry). Waits out an unreachable registry: the record is not
        bad, so it must not be dead-lettered."""
        if self.registry is None or not is_registry_frame(value):
            return value
        delay = self.retry_initial_s
        while True:
            try:
                return self.registry.to_single_object(value)
            except CodecError as exc:
                if not exc.retriable:
                    return exc  # an id no registry knows: dead-lettered as it came
                log.warning("schema registry unreachable, retry in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)

    def _check(self, rec: Record, value: bytes) -> tuple[OrderUpdate | None, str, str]:
        try:
            event = decode(value)
        except CodecError as exc:
            return None, exc.reason, exc.detail
        if not isinstance(event, OrderUpdate):
            return None, "unexpected_type", type(event).__name__
        if rec.key is None or not rec.key.isdigit() or int(rec.key) != event.user_id:
            return None, "bad_key", f"key {rec.key!r} is not user_id {event.user_id}"
        if event.user_id <= 0 or event.qty < 0 or event.filled_qty < 0 or event.filled_qty > max(event.qty, 0):
            return None, "rule_violation", f"user {event.user_id} qty {event.qty} filled {event.filled_qty}"
        if event.epoch <= 0 or event.seq <= 0:
            return None, "rule_violation", f"epoch {event.epoch} seq {event.seq}"
        return event, "", ""

    async def _write_until_done(self, statements: list[Any]) -> int:
        loop = asyncio.get_running_loop()
        delay, attempt = self.retry_initial_s, 0
        while True:
            try:
                # The driver blocks; run it off the event loop so Kafka heartbeats keep going.
                await loop.run_in_executor(None, self.sink.write, statements)
                return attempt
            except SinkError as exc:
                attempt += 1
                self.on_retry()
                level = logging.WARNING if exc.retriable else logging.ERROR
                log.log(level, "batch write failed (attempt %d, retry in %.1fs): %s", attempt, delay, exc)
            except Exception as exc:  # never let anything escape the batch loop
                attempt += 1
                self.on_retry()
                log.exception("unexpected error writing a batch (attempt %d): %s", attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
