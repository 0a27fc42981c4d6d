"""The Cassandra side of ``ohs audit``: the worker's tables against the journal's truth.

Reads are whole partitions, paged, many in flight (``execute_concurrent_with_args``), restricted
to the audited epoch wherever it is part of the key. The journal names every partition that
should exist: each user's days of ``user_updates`` (the per-user event log) and the users of the
user-keyed tables. ``orders_by_id`` has a partition per order, so it is scanned by token ranges
instead of a query per order; its rows carry no seq, so the write time of a row (the creating
event's ``epoch + seq``) tells whether it is older than the snapshot.

A row behind its order's last event (a lower seq) is ``applied_twice`` when that last event did
reach Cassandra (its stream row is there: an older effect was written over it) and ``stale``
when it did not (the event was lost upstream, see the stream's ``lost``). Statistics that are
higher than the user's events imply are ``applied_twice``, unless the user also has history in an
earlier epoch, whose events the sums rightly include (``prior_epochs``: this journal cannot tell).

The users' fills (``user_trades``, two rows per trade) are read by month partition: every partition
of the journal's fills and every one the users' month index (``user_trade_months``) names, which
is what the API reads; ``audit.core.FillLedger`` judges the rows. They are skipped (with a note)
when the worker's trades consumer is off (``OHS_WORKER_TRADES=false``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any

from cassandra import DriverException, RequestExecutionException, RequestValidationException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, NoHostAvailable, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.query import tuple_factory
from cassandra.util import Date

from audit.core import (
    ACTIVE_COLUMNS,
    BY_ID_COLUMNS,
    FILL_COLUMNS,
    HISTORY_COLUMNS,
    UPDATE,
    AuditError,
    FillLedger,
    Findings,
    Truth,
    diff_row,
    event_row,
    payload_verdict,
    row_digest,
    stats_verdict,
)
from streams.errors import SinkError
from streams.settings import WorkerSettings
from streams.sink import connect
from streams.state import STAT_FIELDS

__all__ = ["CassandraAudit", "check_cassandra"]

_PROFILE = "ohs-audit"
_MIN_BIGINT, _MAX_BIGINT = -(2**63), 2**63 - 1
"""Bounds of a bigint, and so of a seq and of a Murmur3 token."""
_DRIVER_ERRORS = (DriverException, RequestExecutionException, RequestValidationException, NoHostAvailable)


def check_cassandra(
    truth: Truth, findings: Findings, settings: WorkerSettings, keyspace: str, *, fills: bool = True
) -> None:
    try:
        cluster, session = connect(settings)
    except SinkError as exc:
        raise AuditError(str(exc)) from exc
    try:
        if keyspace not in cluster.metadata.keyspaces:
            findings.notes.append(f"keyspace {keyspace} does not exist")
            return
        # The worker's connection settings, with plain tuples (the checks slice rows by the column
        # order of their own SELECTs) and room for pages of wide partitions.
        profile = session.execution_profile_clone_update(EXEC_PROFILE_DEFAULT, row_factory=tuple_factory)
        profile.request_timeout = max(profile.request_timeout, 60.0)
        cluster.add_execution_profile(_PROFILE, profile)
        tables = cluster.metadata.keyspaces[keyspace].tables
        if fills and not {FillLedger.AREA, FillLedger.MONTHS} <= set(tables):
            findings.notes.append(f"keyspace {keyspace} has no user_trades/user_trade_months (not migrated)")
            fills = False
        CassandraAudit(session, keyspace, truth, findings, fills=fills).run()
    finally:
        cluster.shutdown()


class CassandraAudit:
    def __init__(
        self,
        session: Session,
        keyspace: str,
        truth: Truth,
        findings: Findings,
        *,
        concurrency: int = 32,
        page: int = 5_000,
        fills: bool = True,
    ) -> None:
        self.session, self.ks, self.truth, self.f = session, keyspace, truth, findings
        self.concurrency, self.page, self.with_fills = concurrency, page, fills
        self.stream_seen = bytearray(truth.last_seq + 1)

    def run(self) -> None:
        try:
            self.stream()
            self.active_orders()
            self.order_history()
            self.orders_by_id()
            self.order_statistics()
            if self.with_fills:
                self.fills()
        except _DRIVER_ERRORS as exc:
            raise AuditError(f"Cassandra: {type(exc).__name__}: {exc}") from exc

    def _read(self, cql: str, params: Sequence[tuple[Any, ...]]) -> Iterator[tuple[tuple[Any, ...], Any]]:
        """(params, rows) per statement, in order; iterating rows fetches further pages."""
        stmt = self.session.prepare(cql)
        stmt.fetch_size = self.page
        results = execute_concurrent_with_args(
            self.session, stmt, params, concurrency=self.concurrency, results_generator=True, execution_profile=_PROFILE
        )
        for p, (_ok, rows) in zip(params, results, strict=True):
            yield p, rows

    def _last_of(self, order_id: int, user: int) -> int:
        """Seq of the order's last update if the journal has it for this user, else 0."""
        t = self.truth
        if 0 < order_id < len(t.order_user) and t.order_user[order_id] == user:
            return t.order_last[order_id]
        return 0

    def _behind(self, area: str, user: int, order_id: int, seq: int, last: int) -> None:
        category = "applied_twice" if self.stream_seen[last] else "stale"
        self.f.add(area, category, user, order_id=order_id, seq=seq, last_seq=last)

    # ------------------------------------------------------------ the event log
    def stream(self) -> None:
        """``user_updates``: every order update once, in its user's partition of its day."""
        area, t, f = "user_updates", self.truth, self.f
        kinds, days, key1 = t.kinds, t.days, t.key1
        partitions = sorted({(key1[seq], days[seq]) for seq in range(1, t.last_seq + 1) if kinds[seq] == UPDATE})
        cql = (
            f"SELECT day, seq, user_id, payload FROM {self.ks}.user_updates WHERE user_id = ? AND day = ? AND epoch = ?"
        )
        seen = self.stream_seen
        for _, rows in self._read(cql, [(user, Date(day), t.epoch) for user, day in partitions]):
            for day, seq, user, payload in rows:
                f.read[area] += 1
                if seq > t.last_seq:
                    f.add(area, t.after_snapshot(t.epoch, seq), user, seq=seq, day=str(day))
                elif seq < 1 or kinds[seq] != UPDATE:
                    f.add(area, "extra", user, seq=seq, reason="not_an_order_update")
                elif seen[seq]:
                    f.add(area, "extra", user, seq=seq, reason="twice", day=str(day))
                elif day.days_from_epoch != days[seq] or user != key1[seq]:
                    f.add(area, "extra", user, seq=seq, reason="misplaced", day=str(day), journal_user=key1[seq])
                else:
                    seen[seq] = 1
                    verdict, reason = payload_verdict(payload or b"", t.hashes[seq], t.epoch, seq)
                    if verdict != "ok":
                        f.add(area, "inconsistent", user, seq=seq, reason=reason)
        f.expected[area] = t.type_counts["OrderUpdate"]
        for seq in range(1, t.last_seq + 1):
            if kinds[seq] == UPDATE and not seen[seq]:
                f.add(area, "lost", key1[seq], seq=seq)

    # ------------------------------------------------------------ per-user tables
    def active_orders(self) -> None:
        area, t, f = "active_orders", self.truth, self.f
        cql = (
            f"SELECT order_id, {', '.join(ACTIVE_COLUMNS)} FROM {self.ks}.active_orders WHERE user_id = ? AND epoch = ?"
        )
        open_orders = t.open_orders()
        f.expected[area] = sum(map(len, open_orders.values()))
        for (user, _), rows in self._read(cql, [(u, t.epoch) for u in sorted(t.states)]):
            missing = set(open_orders.get(user, ()))
            for row in rows:
                f.read[area] += 1
                oid, got = row[0], row[1:]
                missing.discard(oid)
                self._order_row(area, ACTIVE_COLUMNS, t.order_active, user, oid, got, got[-1], self._last_of(oid, user))
            for oid in sorted(missing):
                f.add(area, "lost", user, order_id=oid, seq=t.order_last[oid])

    def order_history(self) -> None:
        area, t, f = "order_history", self.truth, self.f
        cql = (
            f"SELECT order_id, {', '.join(HISTORY_COLUMNS)} FROM {self.ks}.order_history "
            "WHERE user_id = ? AND epoch = ?"
        )
        seen = bytearray(len(t.order_user))
        for (user, _), rows in self._read(cql, [(u, t.epoch) for u in sorted(t.states)]):
            for row in rows:
                f.read[area] += 1
                oid, got = row[0], row[1:]
                seq, last = got[-1], self._last_of(oid, user)
                if last:
                    seen[oid] = 1
                self._order_row(area, HISTORY_COLUMNS, t.order_history, user, oid, got, seq, last)
        self._lost_orders(area, seen)

    def orders_by_id(self) -> None:
        area, t, f = "orders_by_id", self.truth, self.f
        splits = min(4096, max(16, t.orders // 2_000))
        bounds = [_MIN_BIGINT + (_MAX_BIGINT - _MIN_BIGINT) * i // splits for i in range(splits + 1)]
        cql = (
            f"SELECT order_id, epoch, {', '.join(BY_ID_COLUMNS)}, writetime(user_id) FROM {self.ks}.orders_by_id "
            "WHERE token(order_id) > ? AND token(order_id) <= ?"
        )
        seen = bytearray(len(t.order_user))
        for _, rows in self._read(cql, list(pairwise(bounds))):
            for row in rows:
                oid, epoch, got, written = row[0], row[1], row[2:-1], row[-1]
                seq = (written or 0) - epoch  # the creating event's seq (write time = epoch + seq)
                if epoch != t.epoch:
                    if epoch > t.epoch and t.after_snapshot(epoch, seq) == "beyond_journal":
                        f.add(area, "beyond_journal", got[0], order_id=oid, epoch=epoch, seq=seq)
                    else:
                        f.add(area, "other_epoch")
                    continue
                f.read[area] += 1
                user = t.order_user[oid] if 0 < oid < len(t.order_user) else 0
                if seq > t.last_seq:
                    f.add(area, t.after_snapshot(t.epoch, seq), got[0], order_id=oid, seq=seq)
                elif not user:
                    f.add(area, "extra", got[0], order_id=oid, seq=seq)
                else:
                    seen[oid] = 1
                    if row_digest(got) != t.order_by_id[oid]:
                        f.add(area, "mismatch", user, order_id=oid, fields=diff_row(BY_ID_COLUMNS, (user, "?"), got))
        self._lost_orders(area, seen)

    def _order_row(
        self, area: str, columns: Sequence[str], digests: Any, user: int, oid: int, got: Any, seq: int, last: int
    ) -> None:
        t, f = self.truth, self.f
        if seq > t.last_seq:
            f.add(area, t.after_snapshot(t.epoch, seq), user, order_id=oid, seq=seq)
        elif not last:
            f.add(area, "extra", user, order_id=oid, seq=seq)
        elif seq < last:
            self._behind(area, user, oid, seq, last)
        elif not digests[oid]:  # active_orders: a row for an order its last update closed
            f.add(area, "extra", user, order_id=oid, seq=seq)
        elif row_digest(got) != digests[oid]:
            detail = {}
            ev = t.event(last) if f.wants_example(area, "mismatch") else None
            if ev is not None:
                detail["fields"] = diff_row(columns, event_row(ev, columns), got)
            f.add(area, "mismatch", user, order_id=oid, seq=seq, **detail)

    def _lost_orders(self, area: str, seen: bytearray) -> None:
        t = self.truth
        self.f.expected[area] = t.orders
        for oid in range(1, len(seen)):
            if t.order_user[oid] and not seen[oid]:
                self.f.add(area, "lost", t.order_user[oid], order_id=oid, seq=t.order_last[oid])

    def order_statistics(self) -> None:
        area, t, f = "order_statistics", self.truth, self.f
        cql = (
            f"SELECT symbol, {', '.join(STAT_FIELDS)}, last_epoch, last_seq FROM {self.ks}.order_statistics "
            "WHERE user_id = ?"
        )
        snapshot = (t.epoch, t.last_seq)
        higher: list[tuple[int, dict[str, Any]]] = []
        for (user,), rows in self._read(cql, [(u,) for u in sorted(t.states)]):
            state = t.states[user]
            f.expected[area] += len(state.stats)
            missing = set(state.stats)
            for row in rows:
                f.read[area] += 1
                symbol, got, version = row[0], row[1:-2], (row[-2], row[-1])
                missing.discard(symbol)
                if None not in version and version > snapshot:
                    f.add(area, t.after_snapshot(*version), user, symbol=symbol, epoch=version[0], seq=version[1])
                    continue
                if symbol not in state.stats:
                    f.add(area, "extra", user, symbol=symbol)
                    continue
                want = tuple(state.stats[symbol][: len(STAT_FIELDS)])
                want_version = state.last_counted(symbol)
                verdict = stats_verdict(got, want, version, want_version)
                if verdict is None:
                    continue
                detail = {"symbol": symbol, "fields": diff_row(STAT_FIELDS, want, got)}
                detail["version"] = [list(want_version), list(version)]
                if verdict == "applied_twice":
                    higher.append((user, detail))  # or earlier epochs' events in the sums: decided below
                else:
                    f.add(area, verdict, user, **detail)
            for symbol in sorted(missing):
                f.add(area, "lost", user, symbol=symbol)
        earlier = {user for user, _ in higher}
        if earlier:
            cql = f"SELECT user_id FROM {self.ks}.order_history WHERE user_id = ? AND epoch < ? LIMIT 1"
            found = {p[0] for p, rows in self._read(cql, [(u, t.epoch) for u in sorted(earlier)]) if list(rows)}
            for user, detail in higher:
                f.add(area, "prior_epochs" if user in found else "applied_twice", user, **detail)

    # ------------------------------------------------------------ the users' fills
    def fills(self) -> None:
        """``user_trade_months`` of every user, then ``user_trades`` by month partition."""
        ledger = FillLedger(self.truth, self.f)
        cql = f"SELECT month FROM {self.ks}.user_trade_months WHERE user_id = ?"
        for (user,), rows in self._read(cql, [(u,) for u in ledger.users()]):
            for (month,) in rows:
                ledger.offer_month(user, month)
        cql = f"SELECT {', '.join(FILL_COLUMNS)} FROM {self.ks}.user_trades WHERE user_id = ? AND month = ?"
        for _, rows in self._read(cql, ledger.partitions()):
            for row in rows:
                ledger.offer(row)
        ledger.finish()
