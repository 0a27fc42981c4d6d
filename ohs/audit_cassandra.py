"""The Cassandra side of ``ohs audit``: the worker's tables against the journal's truth.

Reads are whole partitions, paged, many in flight (``execute_concurrent_with_args``), restricted
to the audited epoch wherever it is part of the key. The journal names every partition that
should exist: the stream's (day, bucket) pairs (each split by seq range so a query is about one
page) and the users of the user-keyed tables. ``orders_by_id`` has a partition per order, so it
is scanned by token ranges instead of a query per order.

A row behind its order's last event (a lower seq) is ``applied_twice`` when that last event did
reach Cassandra (its stream row is there: an older effect was written over it) and ``stale``
when it did not (the event was lost upstream, see the stream's ``lost``). Statistics that are
higher than the user's events imply are ``applied_twice``, unless the user also has history in an
earlier epoch, whose events the sums rightly include (``prior_epochs``: this journal cannot tell).
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

from ohs.auditlib import (
    ACTIVE_COLUMNS,
    BY_ID_COLUMNS,
    HISTORY_COLUMNS,
    UPDATE,
    AuditError,
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


def check_cassandra(truth: Truth, findings: Findings, settings: WorkerSettings, keyspace: str) -> None:
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
        CassandraAudit(session, keyspace, truth, findings, buckets=settings.stream_buckets).run()
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
        buckets: int,
        concurrency: int = 32,
        page: int = 5_000,
    ) -> None:
        self.session, self.ks, self.truth, self.f = session, keyspace, truth, findings
        self.buckets, self.concurrency, self.page = buckets, concurrency, page
        self.stream_seen = bytearray(truth.last_seq + 1)

    def run(self) -> None:
        try:
            self.stream()
            self.active_orders()
            self.order_history()
            self.orders_by_id()
            self.order_statistics()
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

    # ---------------------------------------------------------------- the stream
    def stream(self) -> None:
        area, t, f = "order_updates_stream", self.truth, self.f
        step = self.page * self.buckets
        params = []
        for day, (first, last) in sorted(t.day_seqs.items()):
            starts = list(range(first, last + 1, step))
            # The outer bounds are open so that a row filed under the wrong seq range is read too.
            lows = [0, *starts[1:]]
            highs = [s - 1 for s in starts[1:]] + [_MAX_BIGINT]
            params += [
                (Date(day), b, t.epoch, lo, hi) for b in range(self.buckets) for lo, hi in zip(lows, highs, strict=True)
            ]
        cql = (
            f"SELECT day, bucket, seq, user_id, payload FROM {self.ks}.order_updates_stream "
            "WHERE day = ? AND bucket = ? AND epoch = ? AND seq >= ? AND seq <= ?"
        )
        seen, kinds, days, buckets = self.stream_seen, t.kinds, t.days, self.buckets
        for _, rows in self._read(cql, params):
            for day, bucket, seq, user, payload in rows:
                f.read[area] += 1
                if seq > t.last_seq:
                    f.add(area, "ahead")
                elif seq < 1 or kinds[seq] != UPDATE:
                    f.add(area, "extra", user, seq=seq, reason="not_an_order_update")
                elif seen[seq]:
                    f.add(area, "extra", user, seq=seq, reason="twice", day=str(day), bucket=bucket)
                elif day.days_from_epoch != days[seq] or bucket != seq % buckets:
                    f.add(area, "extra", user, seq=seq, reason="misplaced", day=str(day), bucket=bucket)
                else:
                    seen[seq] = 1
                    if user != t.key1[seq]:
                        f.add(area, "inconsistent", user, seq=seq, reason="user_id", journal_user=t.key1[seq])
                        continue
                    verdict, reason = payload_verdict(payload or b"", t.hashes[seq], t.epoch, seq)
                    if verdict != "ok":
                        f.add(area, "inconsistent", user, seq=seq, reason=reason)
        f.expected[area] = t.type_counts["OrderUpdate"]
        for seq in range(1, t.last_seq + 1):
            if kinds[seq] == UPDATE and not seen[seq]:
                f.add(area, "lost", t.key1[seq], seq=seq)

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
            f"SELECT order_id, epoch, {', '.join(BY_ID_COLUMNS)} FROM {self.ks}.orders_by_id "
            "WHERE token(order_id) > ? AND token(order_id) <= ?"
        )
        seen = bytearray(len(t.order_user))
        for _, rows in self._read(cql, list(pairwise(bounds))):
            for row in rows:
                if row[1] != t.epoch:
                    f.add(area, "other_epoch")
                    continue
                f.read[area] += 1
                oid, got = row[0], row[2:]
                user = t.order_user[oid] if 0 < oid < len(t.order_user) else 0
                last = t.order_last[oid] if user else 0
                if last:
                    seen[oid] = 1
                self._order_row(area, BY_ID_COLUMNS, t.order_by_id, user or got[0], oid, got, got[-1], last)
        self._lost_orders(area, seen)

    def _order_row(
        self, area: str, columns: Sequence[str], digests: Any, user: int, oid: int, got: Any, seq: int, last: int
    ) -> None:
        t, f = self.truth, self.f
        if seq > t.last_seq:
            f.add(area, "ahead")
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
                    f.add(area, "ahead")
                    continue
                if symbol not in state.stats:
                    f.add(area, "extra", user, symbol=symbol)
                    continue
                want = tuple(state.stats[symbol][name] for name in STAT_FIELDS)
                want_version = state.stats_version[symbol]
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
