"""Per-user state of the worker: which events were applied, and the user's statistics.

Pure (standard library only). The worker keeps one ``UserState`` per user in a
Faust table (changelogged, so it survives restarts), encoded by ``to_bytes``.
``apply`` is the only way state changes, and it decides exactly whether an
event was already applied:

* Every OrderUpdate carries ``user_seq``, the engine's gapless counter of that
  user's order updates within an epoch (1, 2, 3, ...). The state keeps, per
  epoch, the set of applied ``user_seq`` values as sorted inclusive intervals:
  normally one, ``[1, n]``. An event whose ``user_seq`` is in the set is a
  duplicate (a re-send, a replayed record, a re-driven dead letter applied
  before); any other is applied, however late it comes (a record re-produced
  out of order, a dead letter re-driven after a fix), and its ``user_seq`` is
  added. So "already applied?" never depends on arrival order.
* Memory is bounded: a gap in the set exists only while an event is missing
  (in flight, or dead-lettered), and the set of an epoch holds at most
  ``MAX_SPANS`` intervals. Past that bound the oldest gap is given up: the
  intervals are merged and every ``user_seq`` at or below it becomes
  ambiguous, so a record arriving there is reported (``LATE``, dead-lettered
  by the worker), never silently counted or dropped. The newest
  ``MAX_EPOCHS`` epochs are kept; an event of an older one is ``LATE`` too.
* Events without a ``user_seq`` (written before the field existed) are deduped
  by the user's last applied (epoch, seq), the old rule.

Statistics are sums, so they are not idempotent by themselves: the decision
above, and storing the state only after Cassandra has the batch (and before
the batch's offsets are committed), make re-applying a batch after a crash
produce the same numbers. ``version`` counts the events ever applied for the
user; the statistics rows are written ``USING TIMESTAMP newest epoch +
version`` (``stats_timestamp``), which grows with every change, late events
included, so the newest write always wins.
"""

from __future__ import annotations

import bisect
import enum
import json
import struct
from dataclasses import dataclass, field

from schemas.events import OrderStatus, OrderUpdate
from schemas.tables import ALL_SYMBOLS, STAT_FIELDS
from streams.errors import StreamsError

__all__ = [
    "ALL_SYMBOLS",
    "MAX_EPOCHS",
    "MAX_SPANS",
    "STAT_FIELDS",
    "AppliedSet",
    "StateError",
    "UserState",
    "Verdict",
    "increments",
]

_N_STATS = len(STAT_FIELDS)
_MAX_BIGINT = 2**63 - 1
_STATUS_INDEX = {s: STAT_FIELDS.index(f"orders_{s.value.lower()}") for s in OrderStatus}
_FILLS, _FILLED_QTY, _FILLED_NOTIONAL = 6, 7, 8
MAX_SPANS = 512
"""Intervals of applied user_seqs kept per epoch (one per missing event, plus one)."""
MAX_EPOCHS = 2
"""Engine epochs whose applied sets are kept (a new epoch starts only with a new journal)."""


class StateError(StreamsError, ValueError):
    """Stored state that cannot be read (a foreign or corrupt table value)."""

    retriable = False


class Verdict(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"
    """Older than what the state can still decide: reported, not applied."""


def increments(ev: OrderUpdate) -> list[int]:
    """What one event adds to its statistics (STAT_FIELDS order)."""
    inc = [0] * _N_STATS
    inc[_STATUS_INDEX[ev.status]] = 1
    if ev.last_fill_qty:
        inc[_FILLS] = 1
        inc[_FILLED_QTY] = ev.last_fill_qty
        inc[_FILLED_NOTIONAL] = ev.last_fill_qty * ev.last_fill_price
    return inc


@dataclass(slots=True)
class AppliedSet:
    """The applied user_seqs of one epoch: sorted, disjoint, inclusive intervals, flattened."""

    epoch: int
    spans: list[int] = field(default_factory=list)
    """[lo1, hi1, lo2, hi2, ...], lo1 <= hi1 < lo2 - 1 ..."""
    ambiguous_upto: int = 0
    """user_seqs at or below this were in a gap given up at the bound: neither known applied nor known missing."""

    def add(self, n: int) -> Verdict:
        spans = self.spans
        if n <= self.ambiguous_upto:
            return Verdict.LATE
        # The common case: the next one of a contiguous run.
        if spans and spans[-1] + 1 == n:
            spans[-1] = n
            return Verdict.APPLIED
        i = bisect.bisect_left(spans, n)
        if i < len(spans) and (spans[i] == n or i % 2 == 1):
            return Verdict.DUPLICATE  # on a boundary, or inside [lo, hi]
        # n lies in the gap before spans[i] (i even): extend a neighbour or open a span.
        joins_left = i > 0 and spans[i - 1] + 1 == n
        joins_right = i < len(spans) and spans[i] - 1 == n
        if joins_left and joins_right:
            del spans[i - 1 : i + 1]
        elif joins_left:
            spans[i - 1] = n
        elif joins_right:
            spans[i] = n
        else:
            spans[i:i] = [n, n]
            if len(spans) > 2 * MAX_SPANS:
                # Give up the oldest gap: merge the first two intervals.
                self.ambiguous_upto = max(self.ambiguous_upto, spans[2] - 1)
                del spans[1:3]
        return Verdict.APPLIED

    def gaps(self) -> int:
        """Missing user_seqs between applied ones (events dead-lettered or not yet arrived)."""
        first_gap = self.spans[0] - 1 if self.spans else 0
        inner = sum(self.spans[i + 1] - self.spans[i] - 1 for i in range(1, len(self.spans) - 1, 2))
        return first_gap + inner


@dataclass(slots=True)
class UserState:
    applied: list[AppliedSet] = field(default_factory=list)
    """Newest epoch first, at most MAX_EPOCHS."""
    version: int = 0
    """Events ever applied for this user (the statistics rows' write-timestamp offset)."""
    legacy: tuple[int, int] = (0, 0)
    """Last applied (epoch, seq) of events without a user_seq."""
    stats: dict[str, list[int]] = field(default_factory=dict)
    """symbol (and '*') -> STAT_FIELDS values, then the (epoch, seq) of the newest event counted."""

    # ------------------------------------------------------------------ applying
    def apply(self, ev: OrderUpdate) -> Verdict:
        """Apply one order update if it was not applied before (see the module docstring)."""
        verdict = self._admit(ev)
        if verdict is Verdict.APPLIED:
            self.version += 1
            inc = increments(ev)
            for symbol in (ev.symbol, ALL_SYMBOLS):
                row = self.stats.get(symbol)
                if row is None:
                    row = self.stats[symbol] = [0] * (_N_STATS + 2)
                for i, v in enumerate(inc):
                    if v:
                        # Sums saturate at the largest CQL bigint rather than overflow the column:
                        # fills of up to 2**62 each can pass it (docs/architecture.md).
                        row[i] = min(row[i] + v, _MAX_BIGINT)
                if (ev.epoch, ev.seq) > (row[_N_STATS], row[_N_STATS + 1]):
                    row[_N_STATS], row[_N_STATS + 1] = ev.epoch, ev.seq
        return verdict

    def _admit(self, ev: OrderUpdate) -> Verdict:
        n = ev.user_seq
        if n <= 0:
            if (ev.epoch, ev.seq) <= self.legacy:
                return Verdict.DUPLICATE
            self.legacy = (ev.epoch, ev.seq)
            return Verdict.APPLIED
        for s in self.applied:
            if s.epoch == ev.epoch:
                return s.add(n)
        if self.applied and len(self.applied) >= MAX_EPOCHS and ev.epoch < self.applied[-1].epoch:
            return Verdict.LATE  # an epoch older than every one kept
        new = AppliedSet(ev.epoch)
        new.add(n)
        self.applied.append(new)
        self.applied.sort(key=lambda s: s.epoch, reverse=True)
        del self.applied[MAX_EPOCHS:]
        return Verdict.APPLIED

    # ------------------------------------------------------------------- reading
    @property
    def newest_epoch(self) -> int:
        return max(self.applied[0].epoch if self.applied else 0, self.legacy[0])

    def stats_timestamp(self) -> int:
        """Write timestamp of this user's statistics rows: grows with every event applied."""
        return self.newest_epoch + self.version

    def stat_values(self, symbol: str) -> dict[str, int]:
        row = self.stats[symbol]
        return dict(zip(STAT_FIELDS, row[:_N_STATS], strict=True))

    def last_counted(self, symbol: str) -> tuple[int, int]:
        row = self.stats[symbol]
        return row[_N_STATS], row[_N_STATS + 1]

    def gaps(self) -> int:
        return sum(s.gaps() for s in self.applied)

    # ------------------------------------------------------------------ encoding
    def to_bytes(self) -> bytes:
        out = [_HEAD.pack(_VERSION, self.version, *self.legacy, len(self.applied), len(self.stats))]
        for s in self.applied:
            out.append(_EPOCH.pack(s.epoch, s.ambiguous_upto, len(s.spans)))
            out.append(struct.pack(f">{len(s.spans)}q", *s.spans))
        for symbol, row in self.stats.items():
            name = symbol.encode()
            out.append(struct.pack(">B", len(name)) + name)
            out.append(_ROW.pack(*row))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> UserState:
        if not data:
            return cls()
        if data[:1] == b"{":
            return cls._from_json(data)
        try:
            version, applied_n, legacy_epoch, legacy_seq, n_epochs, n_stats = _HEAD.unpack_from(data)
            if version != _VERSION:
                raise StateError(f"user state format {version}, want {_VERSION}")
            pos = _HEAD.size
            state = cls(version=applied_n, legacy=(legacy_epoch, legacy_seq))
            for _ in range(n_epochs):
                epoch, ambiguous, n = _EPOCH.unpack_from(data, pos)
                pos += _EPOCH.size
                spans = list(struct.unpack_from(f">{n}q", data, pos))
                pos += 8 * n
                state.applied.append(AppliedSet(epoch, spans, ambiguous))
            for _ in range(n_stats):
                length = data[pos]
                symbol = data[pos + 1 : pos + 1 + length].decode()
                pos += 1 + length
                state.stats[symbol] = list(_ROW.unpack_from(data, pos))
                pos += _ROW.size
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise StateError(f"unreadable user state ({len(data)} bytes): {exc}") from exc
        if pos != len(data):
            raise StateError(f"{len(data) - pos} bytes after the user state")
        return state

    @classmethod
    def _from_json(cls, data: bytes) -> UserState:
        """The JSON state of earlier releases (last applied seq, stats): deduped by the old rule."""
        try:
            d = json.loads(data)
            state = cls(legacy=(int(d["epoch"]), int(d["last_seq"])))
            for symbol, values in d["stats"].items():
                epoch, seq = d["stats_version"].get(symbol, (0, 0))
                state.stats[symbol] = [int(values.get(f, 0)) for f in STAT_FIELDS] + [int(epoch), int(seq)]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"unreadable JSON user state: {exc}") from exc
        # Every event counted once under '*': the number of events applied so far.
        if ALL_SYMBOLS in state.stats:
            state.version = sum(state.stats[ALL_SYMBOLS][:6])
        return state


_VERSION = 2
_HEAD = struct.Struct(">BqqqBH")
_EPOCH = struct.Struct(">qqI")
_ROW = struct.Struct(f">{_N_STATS + 2}q")
