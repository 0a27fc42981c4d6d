"""The core of ``ohs audit``: the journal's truth in compact form, payload verdicts, findings.

The engine's journal is the drop copy: everything downstream is compared with it. One pass over
the journal (the pass ``recover`` makes, tapped, so recovery both verifies the journal and hands
over every event) fills per-seq arrays: the event type, the keys it is published under, the UTC
day of an order update and an 8-byte blake2b digest of its Avro single-object encoding. That
encoding is deterministic and is what the bridge relays byte for byte, so a Kafka record or a
Cassandra payload is checked by hashing its bytes; only a digest mismatch pays for a decode (a
record written with another writer schema still decodes to the same event). Per order the pass
keeps its user, the seq of its last update and digests of the rows that update implies; per user
the ``UserState`` the worker would have built; per Trade the UTC month of its fills and digests of the two
``user_trades`` rows it implies (taker's and maker's, ``streams.trades.fills_of``). A million
events cost some tens of MB.

The journal is read as a snapshot (a copy: see ``load_truth``). A row or record with a higher
(epoch, seq) than the snapshot holds is checked against the live journal when it is met
(``LiveTail``): the engine journals an event before it publishes it, so anything downstream that
the live journal does not hold *after* it was read was never produced by the engine. It is a
failure, ``beyond_journal`` (a forged record, and the rows it made); what the live journal does
hold is ``ahead`` (journaled after the snapshot: information). On a pipeline still running, what
was journaled just before the snapshot may not have reached Kafka or Cassandra yet: audit a
settled pipeline, or read a ``lost`` near the end as lag and run the audit again.

A journaled event that cannot be published (only a journal written before the engine bounded its
input holds one: a user id beyond 64 bits, a balance beyond a long; ``engine.publish``) is
expected nowhere downstream: the engine sends a marker in its place, which the bridge
dead-letters. The audit counts such seqs as ``journal.unpublishable``, a failure of its own: the
journal holds history that no consumer will ever see, which is not the same as ``lost``.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import shutil
import tempfile
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, cast

from engine.interfaces import SymbolSpec
from engine.journal import Journal, JournalError, read_tail
from engine.publish import Unpublishable, frames_or_problem
from engine.recovery import recover
from schemas.codec import CodecError, decode, encode
from schemas.events import BalanceUpdate, Event, EventType, OrderStatus, OrderUpdate, Trade
from streams.rows import Fill
from streams.state import UserState
from streams.trades import MAKER, TAKER, fills_of, month_of

__all__ = [
    "ACTIVE_COLUMNS",
    "BY_ID_COLUMNS",
    "CATEGORIES",
    "FILL_COLUMNS",
    "HISTORY_COLUMNS",
    "INFO_CATEGORIES",
    "AuditError",
    "FillLedger",
    "Findings",
    "LiveTail",
    "PartitionOrder",
    "Truth",
    "check_journal",
    "diff_event",
    "diff_row",
    "digest",
    "event_row",
    "fill_row",
    "load_truth",
    "payload_verdict",
    "row_digest",
    "stats_verdict",
    "trade_fills",
]

UPDATE, TRADE, BALANCE = int(EventType.ORDER_UPDATE), int(EventType.TRADE), int(EventType.BALANCE_UPDATE)
UNPUBLISHABLE = 4
"""Kind of a journaled seq that cannot be published (expected nowhere downstream)."""

# Columns as the sink writes them, named after the OrderUpdate fields they come from.
ACTIVE_COLUMNS = (
    "client_order_id",
    "symbol",
    "side",
    "order_type",
    "time_in_force",
    "price",
    "qty",
    "quote_budget",
    "filled_qty",
    "remaining_qty",
    "quote_filled",
    "status",
    "created_ns",
    "updated_ns",
    "expire_ns",
    "seq",
)
HISTORY_COLUMNS = (*ACTIVE_COLUMNS[:12], "reason", *ACTIVE_COLUMNS[12:])
BY_ID_COLUMNS = ("user_id", "symbol")
"""orders_by_id locates an order: written once, at its creation, with the creating event's timestamp."""
FILL_COLUMNS = tuple(f.name for f in fields(Fill))
"""Every user_trades column, in the order of ``Fill`` (the sink writes them all)."""

ROW_CATEGORIES = ("lost", "extra", "mismatch", "applied_twice", "stale", "ahead", "beyond_journal")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "journal": ("unpublishable",),
    "kafka": (
        "lost",
        "inconsistent",
        "out_of_order",
        "unknown",
        "duplicates",
        "other_epoch",
        "ahead",
        "beyond_journal",
    ),
    "user_updates": ("lost", "extra", "inconsistent", "ahead", "beyond_journal"),
    "active_orders": ROW_CATEGORIES,
    "order_history": ROW_CATEGORIES,
    "orders_by_id": (*ROW_CATEGORIES, "other_epoch"),
    "order_statistics": (*ROW_CATEGORIES, "prior_epochs"),
    "user_trades": ("lost", "extra", "mismatch", "ahead", "beyond_journal", "other_epoch"),
    "user_trade_months": ("lost", "extra", "ahead", "other_epoch"),
}
INFO_CATEGORIES = frozenset({"duplicates", "other_epoch", "ahead", "prior_epochs"})
"""At-least-once delivery, other epochs' history and what the live journal got after the snapshot:
reported, never a reason to fail. (``beyond_journal``, what the live journal never got, fails.)"""


class AuditError(Exception):
    """The audit cannot run: no journal, a journal that does not replay, a store out of reach."""

    retriable: bool = False


def digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def row_digest(values: Sequence[object]) -> int:
    # Text and bigint columns only, whose repr is exact and unambiguous (client_order_id is any text).
    return digest(repr(tuple(values)).encode())


def event_row(ev: Event, columns: Sequence[str]) -> tuple[Any, ...]:
    """The values the sink writes for ``columns`` (enums by their value, as in the text columns)."""
    values = attrgetter(*columns)(ev) if len(columns) > 1 else (getattr(ev, columns[0]),)
    return tuple(v.value if isinstance(v, enum.Enum) else v for v in values)


_ACTIVE_OF_HISTORY = itemgetter(*(HISTORY_COLUMNS.index(c) for c in ACTIVE_COLUMNS))


def trade_fills(trade: Trade) -> list[Fill]:
    """The two ``user_trades`` rows of a trade, TAKER then MAKER: one in each user's partition, or
    both in one for a self-trade (what the worker writes from the trade's records, one per user)."""
    month = month_of(trade.ts_ns)
    out = fills_of(trade, trade.taker_user_id, month)
    if trade.maker_user_id != trade.taker_user_id:
        out += fills_of(trade, trade.maker_user_id, month)
    return out


def fill_row(fill: Fill) -> tuple[Any, ...]:
    """A fill's values in ``FILL_COLUMNS`` order: what a user_trades row read back holds."""
    return tuple(getattr(fill, c) for c in FILL_COLUMNS)


def diff_row(columns: Sequence[str], want: Sequence[Any], got: Sequence[Any]) -> dict[str, list[Any]]:
    return {c: [w, g] for c, w, g in zip(columns, want, got, strict=True) if w != g}


def diff_event(want: Event, got: Event) -> dict[str, list[Any]]:
    if type(want) is not type(got):
        return {"type": [type(want).__name__, type(got).__name__]}
    names = [f.name for f in fields(want)]
    return diff_row(names, event_row(want, names), event_row(got, names))


def payload_verdict(value: bytes, expected: int, epoch: int, seq: int) -> tuple[str, str]:
    """("ok" | "unknown" | "inconsistent", reason) of a single-object payload claiming (epoch, seq)."""
    if digest(value) == expected:
        return "ok", ""
    try:
        event = decode(value)
    except CodecError as exc:
        return "unknown", exc.reason
    if (event.epoch, event.seq) != (epoch, seq):
        return "inconsistent", "seq_mismatch"
    # Another writer schema gives other bytes for the same event: compare in the current encoding.
    return ("ok", "") if digest(encode(event)) == expected else ("inconsistent", "payload_differs")


def stats_verdict(
    got: Sequence[int | None], want: Sequence[int], version: tuple[Any, Any], want_version: tuple[int, int]
) -> str | None:
    """None if a statistics row equals what the events imply. Counts higher at the version of the
    last event: ``applied_twice``; an older version with no count higher: ``stale`` (the latest
    events never applied); anything else: ``mismatch``."""
    if tuple(got) == tuple(want) and version == want_version:
        return None
    if None in got or None in version:
        return "mismatch"
    pairs = list(zip(got, want, strict=True))
    if version == want_version and all(g >= w for g, w in pairs):  # type: ignore[operator]
        return "applied_twice"
    if version < want_version and all(g <= w for g, w in pairs):  # type: ignore[operator]
        return "stale"
    return "mismatch"


class PartitionOrder:
    """Highest seq seen so far in one partition. A lower seq is out of order unless it re-sends a
    seq already seen (the bridge re-sends from its checkpoint after a restart: at-least-once)."""

    __slots__ = ("high",)

    def __init__(self) -> None:
        self.high = 0

    def offer(self, seq: int, resend: bool) -> bool:
        if seq < self.high:
            return resend
        self.high = seq
        return True


class LiveTail:
    """The live journal's end, read on demand: does it hold (epoch, seq)?

    Starts where the snapshot ended and reads only what was appended since, when a seq beyond what
    it knows is asked about. A live journal of another epoch, or shorter than the snapshot, was
    replaced: nothing can be judged against it, and everything counts as held (``replaced``)."""

    def __init__(self, path: Path, epoch: int, last_seq: int, offset: int) -> None:
        self.path, self.epoch, self.last, self.offset = path, epoch, last_seq, offset
        self.replaced = False
        self.reads = 0

    def holds(self, epoch: int, seq: int) -> bool:
        if self.replaced or (epoch, seq) <= (self.epoch, self.last):
            return True
        self._refresh()
        return self.replaced or (epoch, seq) <= (self.epoch, self.last)

    def _refresh(self) -> None:
        self.reads += 1
        try:
            if self.path.stat().st_size < self.offset:
                self.replaced = True
                return
            epoch, last, offset = read_tail(self.path, self.offset)
        except (OSError, ValueError, KeyError, TypeError, IndexError, JournalError):
            self.replaced = True
            return
        if epoch != self.epoch:
            self.replaced = True
            return
        self.offset = offset
        self.last = max(self.last, last)


@dataclass
class Findings:
    """Counts per area and category, the first ``limit`` examples of each, counts per user."""

    limit: int = 10
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    read: Counter[str] = field(default_factory=Counter)
    """Records or rows read per area."""
    expected: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    per_user: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    notes: list[str] = field(default_factory=list)
    """Failures that are not about one record or row (a topic that does not exist)."""
    info: list[str] = field(default_factory=list)
    _kept: Counter[tuple[str, str]] = field(default_factory=Counter)

    def wants_example(self, area: str, category: str) -> bool:
        return self._kept[(area, category)] < self.limit

    def add(self, area: str, category: str, user: int | None = None, **detail: Any) -> None:
        self.counts[area][category] += 1
        if category in INFO_CATEGORIES:
            return
        if user is not None:
            self.per_user[user][f"{area}.{category}"] += 1
        if self.wants_example(area, category):
            self._kept[(area, category)] += 1
            self.examples.append({"area": area, "category": category, "user_id": user, **detail})

    @property
    def ok(self) -> bool:
        return not self.notes and not any(
            n for counts in self.counts.values() for c, n in counts.items() if c not in INFO_CATEGORIES
        )

    def area(self, area: str) -> dict[str, int]:
        family = area.split(".")[0]
        out = {"read": self.read[area], "expected": self.expected[area]}
        out.update({c: self.counts[area][c] for c in CATEGORIES[family]})
        return out


_EPOCH_DAY = dt.date(1970, 1, 1)
_OPEN = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)


class _Tapped(Journal):
    """A journal whose record stream also feeds ``tap``: the one pass ``recover`` makes (which
    proves every event equal to what the engine produces) also builds the truth."""

    tap: Callable[[list[Event]], None] | None = None

    def records(self, from_offset: int = 0) -> Iterator[tuple[Any, list[Event]]]:
        for cmd, events in super().records(from_offset):
            if self.tap is not None:
                self.tap(events)
            yield cmd, events


@dataclass
class Truth:
    """What the journal says, in compact per-seq and per-order arrays (index = seq / order id)."""

    directory: Path
    """The audited journal's directory (``journal`` is a copy of it)."""
    journal: Journal
    commands: int
    kinds: bytearray
    hashes: array[int]
    key1: array[int]
    """OrderUpdate/BalanceUpdate: user_id; Trade: taker_user_id."""
    key2: array[int]
    """Trade: maker_user_id."""
    days: array[int]
    """OrderUpdate: days since 1970-01-01 of the UTC day of ts_ns (the stream table's partition)."""
    day_seqs: dict[int, list[int]]
    """Day -> [first, last] OrderUpdate seq of that day."""
    order_user: array[int]
    order_last: array[int]
    """Seq of the order's last update."""
    order_history: array[int]
    """Digests of the order_history, orders_by_id and active_orders rows the last update implies
    (active: 0 once the order is closed)."""
    order_by_id: array[int]
    order_active: array[int]
    months: array[int]
    """Trade: YYYYMM (UTC) of ts_ns, the month of its fills' user_trades partitions."""
    fill_taker: array[int]
    fill_maker: array[int]
    """Trade: digests of its TAKER and MAKER user_trades rows (``trade_fills``)."""
    states: dict[int, UserState]
    type_counts: Counter[str]
    unpublishable: list[tuple[int, str, str]] = field(default_factory=list)
    """(seq, reason, detail) of every journaled event that cannot be published."""
    live: LiveTail | None = None

    def after_snapshot(self, epoch: int, seq: int) -> str:
        """The category of something downstream with a higher (epoch, seq) than the snapshot:
        ``ahead`` if the live journal holds it (now), else ``beyond_journal``."""
        if self.live is None or self.live.holds(epoch, seq):
            return "ahead"
        return "beyond_journal"

    @property
    def epoch(self) -> int:
        return self.journal.epoch

    @property
    def last_seq(self) -> int:
        return self.journal.last_seq

    @property
    def orders(self) -> int:
        return sum(1 for u in self.order_user if u)

    def event(self, seq: int) -> Event | None:
        """One journaled event, for the detail of an example (the journal's sparse index makes it cheap)."""
        return next(iter(self.journal.read_events(seq, seq, 1)), None)

    def trade_seqs(self) -> Iterator[int]:
        """Seqs of the journal's (publishable) trades, ascending."""
        kinds, seq = self.kinds, 0
        while (seq := kinds.find(TRADE, seq + 1)) > 0:
            yield seq

    def fill_months(self) -> set[tuple[int, int]]:
        """(user_id, month) of every user_trades partition the journal's fills live in."""
        out = set()
        for seq in self.trade_seqs():
            out.add((self.key1[seq], self.months[seq]))
            out.add((self.key2[seq], self.months[seq]))
        return out

    def open_orders(self) -> dict[int, list[int]]:
        """User -> ids of their open orders.

        The orders whose last update is open: what ``engine.open_orders`` returns, since recovery
        has just proven every journaled event equal to the engine's. Asking the engine per user
        costs a sort of every open order per user (a second per thousand users here)."""
        out: dict[int, list[int]] = {}
        for oid, active in enumerate(self.order_active):
            if active:
                out.setdefault(self.order_user[oid], []).append(oid)
        return out

    def summary(self) -> dict[str, Any]:
        open_orders = sum(1 for d in self.order_active if d)
        return {
            "dir": str(self.directory),
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "commands": self.commands,
            "events": sum(self.type_counts.values()),
            **{k: self.type_counts[k] for k in ("OrderUpdate", "Trade", "BalanceUpdate")},
            "fills": 2 * self.type_counts["Trade"],
            "orders": self.orders,
            "open_orders": open_orders,
            "users": len(self.states),
            "unpublishable": len(self.unpublishable),
            "unpublishable_seqs": [seq for seq, _, _ in self.unpublishable[:100]],
        }


def _grow(arrays: Sequence[array[int]], index: int) -> None:
    size = len(arrays[0])
    if index >= size:
        extra = bytes(arrays[0].itemsize * max(index + 1 - size, size, 1024))
        for a in arrays:
            a.frombytes(extra)


@contextmanager
def load_truth(
    directory: Path,
    symbols: Sequence[SymbolSpec],
    *,
    maker_fee_bps: int,
    taker_fee_bps: int,
    fee_account: int,
    epoch: int | None = None,
) -> Iterator[Truth]:
    """The truth of the journal in ``directory`` as it is now, for the duration of the block.

    A running engine appends to its journal all the time (a tick every ``tick_ms`` even when
    idle), and ``Journal.open`` cuts whatever follows the last complete record it read: opened
    in place, that could cut a record the engine has just appended. So the audit reads a copy
    (in the temp dir, as large as the journal), which is also a consistent snapshot."""
    source = directory / "journal.log"
    if not source.exists():
        raise AuditError(f"no journal at {directory}")
    with tempfile.TemporaryDirectory(prefix="ohs-audit-") as tmp:
        shutil.copyfile(source, Path(tmp) / "journal.log")
        try:
            journal = cast(
                _Tapped,
                _Tapped.open(
                    Path(tmp),
                    symbols,
                    maker_fee_bps=maker_fee_bps,
                    taker_fee_bps=taker_fee_bps,
                    fee_account=fee_account,
                    fsync="never",
                ),
            )
        except JournalError as exc:
            raise AuditError(f"{directory}: {exc}") from exc
        try:
            if epoch is not None and epoch != journal.epoch:
                raise AuditError(f"the journal at {directory} holds epoch {journal.epoch}, not {epoch}")
            truth = _read(directory, journal)
            truth.live = LiveTail(source, journal.epoch, journal.last_seq, journal.path.stat().st_size)
            yield truth
        finally:
            journal.close()


def _read(directory: Path, journal: _Tapped) -> Truth:
    n = journal.last_seq + 1
    kinds, hashes = bytearray(n), array("Q", bytes(8 * n))
    key1, key2, days = array("q", bytes(8 * n)), array("q", bytes(8 * n)), array("q", bytes(8 * n))
    months, fill_taker, fill_maker = array("q", bytes(8 * n)), array("Q", bytes(8 * n)), array("Q", bytes(8 * n))
    day_seqs: dict[int, list[int]] = {}
    orders = [array("q"), array("q"), array("Q"), array("Q"), array("Q")]
    order_user, order_last, order_history, order_by_id, order_active = orders
    states: dict[int, UserState] = {}
    counts: Counter[str] = Counter()
    unpublishable: list[tuple[int, str, str]] = []

    def absorb(events: list[Event]) -> None:
        for ev in events:
            seq = ev.seq
            frames = frames_or_problem(ev)
            if isinstance(frames, Unpublishable):
                # The engine sends a marker instead: nothing of it is expected downstream.
                kinds[seq] = UNPUBLISHABLE
                unpublishable.append((seq, frames.reason, frames.detail))
                continue
            hashes[seq] = digest(frames[1])
            if type(ev) is OrderUpdate:
                kinds[seq], key1[seq] = UPDATE, ev.user_id
                day = (dt.datetime.fromtimestamp(ev.ts_ns / 1e9, tz=dt.UTC).date() - _EPOCH_DAY).days
                days[seq] = day
                span = day_seqs.setdefault(day, [seq, seq])
                span[1] = seq
                oid = ev.order_id
                _grow(orders, oid)
                order_user[oid], order_last[oid] = ev.user_id, seq
                history = event_row(ev, HISTORY_COLUMNS)
                order_history[oid] = row_digest(history)
                order_by_id[oid] = row_digest((ev.user_id, ev.symbol))
                order_active[oid] = row_digest(_ACTIVE_OF_HISTORY(history)) if ev.status in _OPEN else 0
                state = states.get(ev.user_id)
                if state is None:
                    state = states[ev.user_id] = UserState()
                state.apply(ev)
            elif type(ev) is Trade:
                kinds[seq], key1[seq], key2[seq] = TRADE, ev.taker_user_id, ev.maker_user_id
                taker, maker = trade_fills(ev)
                months[seq] = taker.month
                fill_taker[seq], fill_maker[seq] = row_digest(fill_row(taker)), row_digest(fill_row(maker))
            elif type(ev) is BalanceUpdate:
                kinds[seq], key1[seq] = BALANCE, ev.user_id
            counts[type(ev).__name__] += 1

    journal.tap = absorb
    try:
        _engine, commands = recover(journal)
    except JournalError as exc:
        raise AuditError(f"the journal does not replay: {exc}") from exc
    finally:
        journal.tap = None
    return Truth(
        directory,
        journal,
        commands,
        kinds,
        hashes,
        key1,
        key2,
        days,
        day_seqs,
        order_user,
        order_last,
        order_history,
        order_by_id,
        order_active,
        months,
        fill_taker,
        fill_maker,
        states,
        counts,
        unpublishable,
    )


def check_journal(truth: Truth, findings: Findings) -> None:
    """The journal's own failures: events it holds that no consumer will ever see."""
    findings.read["journal"] = sum(truth.type_counts.values()) + len(truth.unpublishable)
    for seq, reason, detail in truth.unpublishable:
        findings.add("journal", "unpublishable", None, seq=seq, reason=reason, detail=detail[:300])


class FillLedger:
    """``user_trades`` and its month index ``user_trade_months`` against the fills the journal implies.

    Every Trade implies two rows (``trade_fills``): TAKER in the taker's ``(user_id, month)``
    partition, MAKER in the maker's. Each must be there exactly once, equal to what the trade
    says; a row the journal did not produce (no such trade, the wrong user or month, a second row
    of one side) is ``extra``; one claiming a seq or epoch beyond the live journal is
    ``beyond_journal``. Older epochs' rows share the month partitions: ``other_epoch``
    (information). Every partition of the journal's fills must be in the user's month index (the
    API reads a user's fills through it: a missing month hides them), ``lost`` if not; an index
    month without fills of this journal is ``extra`` unless its partition holds another epoch's
    or later fills.

    The caller reads: first the month index of ``users()`` (``offer_month``), then every row of
    ``partitions()`` (``offer``, columns in ``FILL_COLUMNS`` order), then calls ``finish``.
    """

    AREA, MONTHS = "user_trades", "user_trade_months"
    _SIDE = {TAKER: 1, MAKER: 2}

    def __init__(self, truth: Truth, findings: Findings) -> None:
        self.t, self.f = truth, findings
        self.seen = bytearray(truth.last_seq + 1)
        """Per trade seq: bit 1 its TAKER row met, bit 2 its MAKER row."""
        self.expected_months = truth.fill_months()
        self.index: set[tuple[int, int]] = set()
        self.held: dict[tuple[int, int], str] = {}
        """Partitions holding fills of other epochs or ahead of the snapshot: why an index month can be there."""

    def users(self) -> list[int]:
        return sorted({u for u, _ in self.expected_months} | set(self.t.states))

    def offer_month(self, user: int, month: int) -> None:
        self.f.read[self.MONTHS] += 1
        self.index.add((user, month))

    def partitions(self) -> list[tuple[int, int]]:
        """Those of the journal's fills and those the index names (what the API would read)."""
        return sorted(self.expected_months | self.index)

    def offer(self, row: Sequence[Any]) -> None:
        t, f, area = self.t, self.f, self.AREA
        user, month, _ts, epoch, seq, liquidity = row[:6]
        if epoch != t.epoch:
            if epoch > t.epoch and t.after_snapshot(epoch, seq) == "beyond_journal":
                f.add(area, "beyond_journal", user, month=month, epoch=epoch, seq=seq, liquidity=liquidity)
            else:
                f.add(area, "other_epoch")
                self.held[(user, month)] = "other_epoch"
            return
        f.read[area] += 1
        if seq > t.last_seq:
            category = t.after_snapshot(epoch, seq)
            f.add(area, category, user, month=month, seq=seq, liquidity=liquidity)
            if category == "ahead":
                self.held.setdefault((user, month), "ahead")
            return
        bit = self._SIDE.get(liquidity, 0)
        if seq < 1 or t.kinds[seq] != TRADE or not bit:
            f.add(area, "extra", user, month=month, seq=seq, liquidity=liquidity, reason="not_a_fill")
        elif user != (t.key1 if bit == 1 else t.key2)[seq] or month != t.months[seq]:
            journal_user = (t.key1 if bit == 1 else t.key2)[seq]
            detail = {"journal_user": journal_user, "journal_month": t.months[seq]}
            f.add(area, "extra", user, month=month, seq=seq, liquidity=liquidity, reason="misplaced", **detail)
        elif self.seen[seq] & bit:
            f.add(area, "extra", user, month=month, seq=seq, liquidity=liquidity, reason="twice")
        else:
            self.seen[seq] |= bit
            want = (t.fill_taker if bit == 1 else t.fill_maker)[seq]
            if row_digest(row) != want:
                extra: dict[str, Any] = {}
                ev = t.event(seq) if f.wants_example(area, "mismatch") else None
                if isinstance(ev, Trade):
                    extra["fields"] = diff_row(FILL_COLUMNS, fill_row(trade_fills(ev)[bit - 1]), row)
                f.add(area, "mismatch", user, month=month, seq=seq, liquidity=liquidity, **extra)

    def finish(self) -> None:
        t, f = self.t, self.f
        f.expected[self.AREA] = 2 * t.type_counts["Trade"]
        for seq in t.trade_seqs():
            seen = self.seen[seq]
            if not seen & 1:
                f.add(self.AREA, "lost", t.key1[seq], month=t.months[seq], seq=seq, liquidity=TAKER)
            if not seen & 2:
                f.add(self.AREA, "lost", t.key2[seq], month=t.months[seq], seq=seq, liquidity=MAKER)
        f.expected[self.MONTHS] = len(self.expected_months)
        for user, month in sorted(self.expected_months - self.index):
            f.add(self.MONTHS, "lost", user, month=month)
        for user, month in sorted(self.index - self.expected_months):
            category = self.held.get((user, month), "extra")
            f.add(self.MONTHS, category, user, month=month)
