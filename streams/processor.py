"""One batch of ``orders.updates`` records -> the sink, with state, retries and dead letters.

Called by the worker's agent (and by ``ohs replay``) for each batch, in
partition order. It never raises for a record: anything it cannot decode or
that breaks a rule goes to the dead-letter topic with a reason, and a failure
inside the handling of one record dead-letters that record. Write failures
the sink calls retriable (Cassandra away or slow) are retried with jittered
back-off until they succeed: the batch simply stays where it is, no offset
moves, and an outage shows in the retry metric while it lasts. A write
Cassandra rejects (``SinkRejected``: schema or configuration) cannot succeed
by retrying and raises ``ProcessorStop``; the worker then stops without
committing, as documented in docs/operations.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying

from kit.retry import retrying
from schemas.codec import CodecError, decode
from schemas.events import OrderUpdate
from schemas.registry import Registry, is_registry_frame
from streams.errors import SinkError, StreamsError
from streams.rows import Applied, StatsRow, stats_rows
from streams.sink import Sink
from streams.state import ALL_SYMBOLS, StateError, UserState, Verdict

__all__ = ["BatchResult", "DeadLetter", "Limits", "Prepared", "Processor", "ProcessorStop", "Record", "SeqGuard"]

log = logging.getLogger("ohs.worker")

_MAX_ID = 2**63 - 1


class ProcessorStop(StreamsError):
    """The batch cannot be written by retrying (Cassandra rejects it): stop without committing."""

    retriable = False


@dataclass(frozen=True, slots=True)
class Record:
    """What the processor needs of one Kafka record."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...] = ()
    """The record's headers (the bridge's epoch and seq travel there)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a valid order update may hold, beyond what its Avro schema says (checked at the edge)."""

    max_value_bytes: int = 64 * 1024
    max_text_chars: int = 256
    """client_order_id and symbol: the engine bounds them far lower; anything longer is not its output."""


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    late: int = 0
    retries: int = 0
    rows: int = 0
    requests: int = 0
    write_seconds: float = 0.0
    durable_at_ns: int = 0
    """Wall clock when the batch's writes were all acknowledged (the rows are readable)."""
    emitted_ns: list[int] = field(default_factory=list)
    """The engine's emit time of each applied event: durable_at_ns - emitted_ns is its latency."""


DeadLetter = Callable[[Record, str, str], Awaitable[None]]


@dataclass
class Prepared:
    """A batch ready to write: what ``Processor.prepare`` made, what ``complete`` writes."""

    result: BatchResult
    changed: dict[bytes, UserState]
    """The users' new states, as objects: the cache of the next batches prepared (the worker
    prepares batch N+1 on top of N while N is being written, changing these same objects)."""
    pending: Any
    """The sink's statements (None when nothing is to be written)."""
    states: dict[bytes, bytes] = field(default_factory=dict)
    """The same states serialized right after this batch, before any later batch can change the
    objects: what to store once this batch is durable. Storing the objects at that time instead
    would store the effects of a later batch that is not durable yet, and after a crash its
    events would be taken for duplicates and never written (found by the fault suite's
    worst-order crash: 43 updates of one user lost)."""


class SeqGuard:
    """Decides whether an event's (epoch, seq) can be one the bridge produced (see streams.ceiling)."""

    def covers(self, epoch: int, seq: int) -> bool:
        return True

    async def refresh(self) -> None:
        """Catch up with the bridge's newest checkpoint; raises StreamsError (retriable) if it cannot."""


class Processor:
    def __init__(
        self,
        sink: Sink,
        dead_letter: DeadLetter,
        *,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        registry: Registry | None = None,
        guard: SeqGuard | None = None,
        limits: Limits = Limits(),
        on_retry: Callable[[], None] = lambda: None,
        stats: bool = True,
    ) -> None:
        self.sink = sink
        self.dead_letter = dead_letter
        self.registry = registry
        self.guard = guard
        self.limits = limits
        self.on_retry = on_retry
        """Called at each failed attempt, as it happens: an outage shows in metrics while it lasts."""
        self.stats = stats
        """Write statistics rows (replay turns this off when it cannot know whole histories)."""
        self._backoff = (retry_initial_s, retry_max_s)

    # ------------------------------------------------------------------ batch
    async def process(
        self, records: Sequence[Record], load: Callable[[bytes], UserState]
    ) -> tuple[BatchResult, dict[bytes, UserState]]:
        """Apply ``records`` on top of the users' states (``load(key)`` reads one).

        Returns the result and the new states of the users that changed; the caller stores
        those only after this returns, i.e. after the sink has the batch.
        """
        prepared = await self.prepare(records, load)
        await self.complete(prepared)
        return prepared.result, prepared.changed

    async def prepare(self, records: Sequence[Record], load: Callable[[bytes], UserState]) -> Prepared:
        """Everything of a batch but its write: checks, dead letters, dedupe, the users' new
        states (the objects ``load`` returned, changed in place) and the sink's statements.
        ``complete`` writes it. The caller must not store the states before ``complete`` returns."""
        result = BatchResult()
        events: list[tuple[Record, OrderUpdate, bytes]] = []
        for rec in records:
            try:
                checked = await self._checked(rec)
            except Exception as exc:  # a bug meeting one record must not stop the partition
                log.exception("unexpected error checking %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                checked = ("internal_error", f"{type(exc).__name__}: {exc}")
            if isinstance(checked, tuple) and len(checked) == 2:
                result.dead_lettered += 1
                await self.dead_letter(rec, *checked)
            else:
                events.append(checked)
        events = await self._guarded(events, result)

        users: dict[bytes, UserState] = {}
        applied: list[Applied] = []
        touched: dict[bytes, set[str]] = {}
        for rec, ev, payload in events:
            key = rec.key or b""
            state = users.get(key)
            if state is None:
                try:
                    state = users[key] = load(key)
                except StateError as exc:
                    # The stored state cannot be read: starting the user afresh would count their
                    # history again; stop instead (the value is kept for a person to look at).
                    raise ProcessorStop(f"state of user key {key!r}: {exc}") from exc
            verdict = state.apply(ev)
            if verdict is Verdict.APPLIED:
                applied.append((ev, payload))
                touched.setdefault(key, set()).add(ev.symbol)
            elif verdict is Verdict.DUPLICATE:
                result.duplicates += 1
            else:
                result.late += 1
                result.dead_lettered += 1
                await self.dead_letter(
                    rec,
                    "late_beyond_window",
                    f"user {ev.user_id} epoch {ev.epoch} user_seq {ev.user_seq} seq {ev.seq}: older than "
                    "what the worker's state can still decide; not applied",
                )
        result.applied = len(applied)
        stats: list[StatsRow] = []
        if self.stats:
            for key, symbols in touched.items():
                stats += stats_rows(int(key), users[key], (*sorted(symbols), ALL_SYMBOLS))
        changed = {key: users[key] for key in touched}
        pending = None
        if applied or stats:
            pending = self.sink.statements(applied, stats)
            result.rows = getattr(pending, "rows", 0)
            result.requests = len(getattr(pending, "requests", ()))
        result.emitted_ns = [ev.ts_ns for ev, _ in applied]
        return Prepared(result, changed, pending, {key: state.to_bytes() for key, state in changed.items()})

    async def complete(self, prepared: Prepared) -> BatchResult:
        """Write a prepared batch, retrying what is retriable until it is durable."""
        result = prepared.result
        if prepared.pending is not None:
            t0 = time.monotonic()
            result.retries = await self._write_until_done(prepared.pending)
            result.write_seconds = time.monotonic() - t0
        result.durable_at_ns = time.time_ns()
        return result

    # ----------------------------------------------------------------- checks
    async def _checked(self, rec: Record) -> tuple[Record, OrderUpdate, bytes] | tuple[str, str]:
        """(record, event, single-object payload), or (reason, detail) for a dead letter."""
        if rec.value is None:
            return "null_value", "a tombstone (null value) is not an order update"
        if len(rec.value) > self.limits.max_value_bytes:
            return "oversized", f"{len(rec.value)} bytes > {self.limits.max_value_bytes}"
        value = await self._single_object(rec.value)
        if isinstance(value, CodecError):
            return value.reason, value.detail
        try:
            event = decode(value)
        except CodecError as exc:
            return exc.reason, exc.detail
        if not isinstance(event, OrderUpdate):
            return "unexpected_type", type(event).__name__
        problem = self._rule_violation(rec, event)
        if problem:
            return problem
        return rec, event, value

    def _rule_violation(self, rec: Record, ev: OrderUpdate) -> tuple[str, str] | None:
        if rec.key is None or not rec.key.isdigit() or len(rec.key) > 19 or int(rec.key) != ev.user_id:
            return "bad_key", f"key {rec.key!r:.60} is not user_id {ev.user_id}"
        if not (0 < ev.epoch <= _MAX_ID and 0 < ev.seq <= _MAX_ID - ev.epoch and 0 <= ev.user_seq <= _MAX_ID):
            return "rule_violation", f"epoch {ev.epoch} seq {ev.seq} user_seq {ev.user_seq}"
        if ev.user_id <= 0 or ev.order_id <= 0:
            return "rule_violation", f"user {ev.user_id} order {ev.order_id}"
        if ev.qty < 0 or ev.filled_qty < 0 or ev.filled_qty > max(ev.qty, 0) or ev.last_fill_qty < 0:
            return "rule_violation", f"user {ev.user_id} qty {ev.qty} filled {ev.filled_qty}"
        if len(ev.client_order_id) > self.limits.max_text_chars or len(ev.symbol) > self.limits.max_text_chars:
            return "rule_violation", f"text fields longer than {self.limits.max_text_chars} characters"
        return None

    async def _guarded(
        self, events: list[tuple[Record, OrderUpdate, bytes]], result: BatchResult
    ) -> list[tuple[Record, OrderUpdate, bytes]]:
        """Drop (dead-letter) events beyond what the bridge could have produced: a forged far-future
        seq would otherwise shadow real writes (its timestamp beats theirs)."""
        guard = self.guard
        if guard is None or all(guard.covers(ev.epoch, ev.seq) for _, ev, _ in events):
            return events
        # A checkpoint covering every genuine record is in the topic before the record is: read
        # up to its end, then judge (a reader that cannot reach it retries, never guesses).
        async for attempt in self._retrying("reading the bridge's checkpoint"):
            with attempt:
                await guard.refresh()
        kept = []
        for rec, ev, payload in events:
            if guard.covers(ev.epoch, ev.seq):
                kept.append((rec, ev, payload))
                continue
            result.dead_lettered += 1
            await self.dead_letter(
                rec,
                "beyond_ceiling",
                f"epoch {ev.epoch} seq {ev.seq} is beyond every seq the bridge has acknowledged: not from the bridge",
            )
        return kept

    async def _single_object(self, value: bytes) -> bytes | CodecError:
        """A registry-framed record as single-object encoding (what Cassandra's payload columns
        hold: readable without a registry). Waits out an unreachable registry: the record is not
        bad, so it must not be dead-lettered."""
        registry = self.registry
        if registry is None or not is_registry_frame(value):
            return value
        try:
            async for attempt in self._retrying("resolving a schema id"):
                with attempt:
                    return registry.to_single_object(value)
        except CodecError as exc:
            return exc  # an id no registry knows: dead-lettered as it came
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- writes
    def _retrying(self, what: str) -> AsyncRetrying:
        """Retries what its class calls retriable (``SinkUnavailable``, ``CheckpointUnavailable``,
        ``RegistryUnavailable``), forever; anything else propagates at its first failure."""
        return retrying(*self._backoff, on_retry=lambda _state: self.on_retry(), what=what, log=log)

    async def _write_until_done(self, pending: Any) -> int:
        attempts = 0
        try:
            async for attempt in self._retrying("batch write"):
                with attempt:
                    attempts = attempt.retry_state.attempt_number - 1
                    await self.sink.write(pending)
        except SinkError as exc:  # not retriable (a retriable one is retried until it passes)
            raise ProcessorStop(f"Cassandra rejects the batch, retrying cannot help: {exc}") from exc
        return attempts
