"""The idempotent Cassandra/ScyllaDB sink of order updates, behind the ``Sink`` protocol.

The processor writes through ``Sink``: ``statements`` turns a batch into the sink's own form,
``write`` makes it durable. ``CassandraSink`` (cassandra-driver) builds the rows of
``streams.rows`` (which says why re-applying anything converges to the same rows), plans them
into requests with ``streams.planning`` and sends them all concurrently from the event loop (the
driver's I/O thread completes asyncio futures). A failed write raises ``SinkError``; calling
``write`` again sends only the requests that did not succeed. ``streams.acsylla_sink`` is the
same over the C++ driver; ``streams.memory`` the in-memory twin.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from cassandra import ConsistencyLevel, InvalidRequest
from cassandra.cluster import Cluster, ExecutionProfile, Session
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from kit.cql import TRANSIENT_ERRORS, load_balancing, make_cluster
from streams.cqlbind import Binder
from streams.errors import SinkError, SinkRejected, SinkUnavailable
from streams.planning import Pending, ReplicaMap, Stmt, plan_requests, routing_key
from streams.rows import (
    Applied,
    Fill,
    FillMonth,
    RowBuilder,
    StatsRow,
    statement_cql,
    stats_rows,
    write_timestamp,
)
from streams.settings import WorkerSettings

# The rows' and the planning's names stay importable from here (older imports, tests).
__all__ = [
    "Applied",
    "CassandraSink",
    "Fill",
    "FillMonth",
    "Pending",
    "ReplicaMap",
    "RowBuilder",
    "Sink",
    "StatsRow",
    "connect",
    "plan_requests",
    "routing_key",
    "statement_cql",
    "stats_rows",
    "translate",
    "write_timestamp",
]


class Sink(Protocol):
    """What the processor writes through: the Cassandra sink, its in-memory twin, a dry run."""

    def statements(self, applied: Sequence[Applied], stats: Sequence[StatsRow]) -> Any:
        """Everything one batch writes, in the sink's own form (opaque to the processor)."""

    async def write(self, pending: Any) -> None:
        """Make ``pending`` durable or raise SinkError; called again with the same ``pending``
        after a failure, it writes what is still missing (writes are idempotent)."""


def translate(exc: BaseException) -> SinkError:
    """The driver's exceptions as the streams package's, once, for every caller."""
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, TRANSIENT_ERRORS):
        return SinkUnavailable(f"Cassandra unavailable: {exc!r}")
    if isinstance(exc, InvalidRequest):
        return SinkRejected(f"Cassandra rejected a statement: {exc}")
    # Anything else from the driver (a bug, a protocol error) may pass on a new connection.
    return SinkUnavailable(f"unexpected driver error: {exc!r}")


def connect(s: WorkerSettings) -> tuple[Cluster, Session]:
    """Open the worker's session (blocking: call it off the event loop). Raises SinkUnavailable."""
    profile = ExecutionProfile(
        load_balancing_policy=load_balancing(s.cql_local_dc),
        # QUORUM of the local DC: with RF > 1 a read at the same level (the query API) sees
        # every write the worker has committed an offset for.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        request_timeout=s.request_timeout_s,
    )
    cluster = make_cluster(s.hosts, s.cql_port, profile, s.cql_protocol_version, s.cql_auth)
    try:
        return cluster, cluster.connect()
    except Exception as exc:
        cluster.shutdown()
        raise SinkUnavailable(f"no Cassandra at {s.hosts}:{s.cql_port}: {exc}") from exc


class CassandraSink(RowBuilder):
    def __init__(self, session: Session, s: WorkerSettings, keyspace: str | None = None) -> None:
        self.session = session
        self.s = s
        ks = keyspace or s.keyspace
        self.keyspace = ks
        self.max_statements = s.batch_max_statements
        self.max_bytes = s.batch_max_bytes
        self.concurrency = s.write_concurrency
        self.replicas = ReplicaMap(session.cluster, ks)

        def prep(cql: str) -> Binder:
            stmt = session.prepare(cql)
            stmt.is_idempotent = True
            return Binder(stmt)

        self.handles = {name: prep(cql) for name, cql in statement_cql(ks).items()}
        self._days: dict[int, dt.date] = {}

    def triples(
        self, applied: Sequence[Applied], stats: Sequence[StatsRow]
    ) -> list[tuple[Hashable, PreparedStatement, tuple[Any, ...]]]:
        """The same rows as (partition, prepared statement, values): what benchmarks write raw."""
        return [(group, binder.prepared, values) for group, binder, values, _ in self.rows(applied, stats)]

    def statements(self, applied: Sequence[Applied], stats: Sequence[StatsRow]) -> Pending:
        stmts = [Stmt(group, binder.bind(values), size) for group, binder, values, size in self.rows(applied, stats)]
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    def fill_statements(self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()) -> Pending:
        """``statements`` for a batch of fills (``streams.trades``); written by the same ``write``."""
        rows = self.fill_rows(fills, months)
        stmts = [Stmt(group, binder.bind(values), size) for group, binder, values, size in rows]
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    @staticmethod
    def _request(stmts: list[Stmt]) -> Any:
        if len(stmts) == 1:
            return stmts[0].bound
        # UNLOGGED: every statement lives on the same replicas, so the batch is one round trip
        # to a coordinator that owns all of it (the routing key is the first statement's).
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        batch.is_idempotent = True
        for st in stmts:
            batch.add(st.bound)
        return batch

    # ------------------------------------------------------------------ writing
    async def write(self, pending: Pending) -> None:
        todo = [i for i, done in enumerate(pending.done) if not done]
        if not todo:
            return
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(self.concurrency)
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            async with sem:
                fut: asyncio.Future[None] = loop.create_future()

                def ok(_rows: Any) -> None:
                    loop.call_soon_threadsafe(_settle, fut, None)

                def failed(exc: BaseException) -> None:
                    loop.call_soon_threadsafe(_settle, fut, exc)

                try:
                    self.session.execute_async(pending.requests[i]).add_callbacks(ok, failed)
                except Exception as exc:  # e.g. NoHostAvailable raised at once
                    errors.append(exc)
                    return
                try:
                    await fut
                    pending.done[i] = True
                except Exception as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(i) for i in todo))
        if errors:
            first = translate(errors[0])
            retriable = all(translate(e).retriable for e in errors)
            cls = SinkUnavailable if retriable else SinkRejected
            raise cls(f"{len(errors)} of {len(todo)} requests failed, e.g. {first}")


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
