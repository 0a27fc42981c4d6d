"""The worker's sink on acsylla (asyncio bindings of the DataStax C++ driver), the default.

Measured on this project's machine (docs/benchmarks.md, ``ohs bench drivers``): acsylla spends
~7 µs of client CPU per row in UNLOGGED batches where cassandra-driver spends 27-38 µs and
scylla-driver 30-34 µs; at 3.7 rows per order update that is the difference between the driver
alone exceeding the worker's per-update budget and a small share of it. Binding, encoding,
sending and decoding happen in C++ threads; completions arrive as asyncio futures, so nothing
here blocks the event loop or needs an executor.

Everything else stays with cassandra-driver: migrations, and the cluster metadata (token map)
that the replica grouping of ``streams.planning.ReplicaMap`` reads. The rows, their grouping into
requests and the failure contract are the same as ``CassandraSink``'s: both build their rows
with ``RowBuilder``; a failed ``write`` raises ``SinkError`` and a second call sends only the
requests that did not succeed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from streams.errors import SinkError, SinkRejected, SinkUnavailable
from streams.planning import Pending, ReplicaMap, plan_requests
from streams.rows import Applied, Fill, FillMonth, RowBuilder, StatsRow, statement_cql
from streams.settings import WorkerSettings

__all__ = ["AcsyllaSink", "translate_acsylla"]


class _NotScylla(logging.Filter):
    """The C++ driver (ScyllaDB's fork) reports at ERROR, once per connection, that Apache
    Cassandra has no shard map: expected, and no error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "sharding info" not in record.getMessage()


logging.getLogger("acsylla").addFilter(_NotScylla())

# Errors retrying cannot cure: the statement or the schema is wrong. Everything else the C++
# driver reports (no host, timeouts, overload, a write failure, a closed connection) can pass.
_PERMANENT = frozenset(
    {
        "CassExceptionSyntaxError",
        "CassExceptionInvalidQuery",
        "CassErrorServerSyntaxError",
        "CassErrorServerInvalidQuery",
        "CassErrorServerConfigError",
        "CassErrorServerUnauthorized",
        "CassErrorServerBadCredentials",
        "CassErrorLibBadParams",
        "CassErrorLibInvalidValueType",
        "CassErrorLibIndexOutOfBounds",
        "CassErrorLibNameDoesNotExist",
        "CassErrorLibInvalidItemCount",
        "CassErrorLibNullValue",
        "CassErrorLibInvalidData",
    }
)


def translate_acsylla(exc: BaseException) -> SinkError:
    """acsylla's exceptions as the streams package's, once (their classes share no useful base)."""
    if isinstance(exc, SinkError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _PERMANENT:
        return SinkRejected(f"Cassandra rejected a request: {type(exc).__name__}: {exc}")
    return SinkUnavailable(f"Cassandra unavailable: {type(exc).__name__}: {exc}")


class _Stmt:
    __slots__ = ("group", "size", "statement")

    def __init__(self, group: Any, statement: Any, size: int) -> None:
        self.group, self.statement, self.size = group, statement, size


class AcsyllaSink(RowBuilder):
    def __init__(self, session: Any, prepared: dict[str, Any], replicas: ReplicaMap, s: WorkerSettings) -> None:
        self.session = session
        self.handles = prepared
        self.replicas = replicas
        self.max_statements = s.batch_max_statements
        self.max_bytes = s.batch_max_bytes
        self.concurrency = s.write_concurrency
        self.answer_bound_s = 2 * s.request_timeout_s + 10.0
        """The longest a request's answer is awaited. The C++ driver times a request out itself
        (``request_timeout``); this bounds the await even if its future were never resolved, so
        a lost answer becomes a retried timeout, never a worker that waits forever (a CI run
        once found both agents without a durable batch for minutes after Cassandra restarted
        under a frozen worker; the cause was not established, this rules out one)."""
        self._days = {}

    @classmethod
    async def open(cls, s: WorkerSettings, cluster: Any, keyspace: str | None = None) -> AcsyllaSink:
        """Connect (waiting at most the connect timeout) and prepare the statements.
        ``cluster``: an open cassandra-driver Cluster, for the token map. Raises SinkError."""
        import acsylla

        ks = keyspace or s.keyspace
        try:
            acluster = acsylla.create_cluster(
                s.hosts,
                port=s.cql_port,
                protocol_version=s.cql_protocol_version,
                consistency="LOCAL_QUORUM",
                connect_timeout=10.0,
                request_timeout=s.request_timeout_s,
                # The C++ driver's own back-off reaches a minute: bounded like cassandra-driver's.
                exponential_reconnect_base_delay_ms=500,
                exponential_reconnect_max_delay_ms=10_000,
                token_aware_routing=True,
                load_balance_dc_aware=s.cql_local_dc,
                **s.cql_auth.acsylla(),
                log_level="warn",  # to logging.getLogger("acsylla")
            )
            session = await asyncio.wait_for(acluster.create_session(), 30)
            prepared = {}
            for name, cql in statement_cql(ks).items():
                prepared[name] = await asyncio.wait_for(session.create_prepared(cql), 30)
        except TimeoutError as exc:
            raise SinkUnavailable(f"acsylla: no answer from {s.hosts}:{s.cql_port}") from exc
        except Exception as exc:
            raise translate_acsylla(exc) from exc
        return cls(session, prepared, ReplicaMap(cluster, ks), s)

    async def close(self) -> None:
        await self.session.close()

    def statements(self, applied: Sequence[Applied], stats: Sequence[StatsRow]) -> Pending:
        stmts = []
        for group, prepared, values, size in self.rows(applied, stats):
            st = prepared.bind()
            st.bind_list(list(values))
            st.set_is_idempotent(True)  # every write is timestamped: the driver may retry it
            stmts.append(_Stmt(group, st, size))
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    def fill_statements(self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()) -> Pending:
        """``statements`` for a batch of fills (``streams.trades``); written by the same ``write``."""
        stmts = []
        for group, prepared, values, size in self.fill_rows(fills, months):
            st = prepared.bind()
            st.bind_list(list(values))
            st.set_is_idempotent(True)
            stmts.append(_Stmt(group, st, size))
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    @staticmethod
    def _request(stmts: list[_Stmt]) -> Any:
        if len(stmts) == 1:
            return stmts[0].statement
        import acsylla

        # UNLOGGED: every statement lives on the same replicas (see streams.planning).
        batch = acsylla.create_batch_unlogged()
        batch.set_is_idempotent(True)
        for st in stmts:
            batch.add_statement(st.statement)
        return batch

    async def write(self, pending: Pending) -> None:
        todo = [i for i, done in enumerate(pending.done) if not done]
        if not todo:
            return
        sem = asyncio.Semaphore(self.concurrency)
        errors: list[BaseException] = []
        execute, execute_batch = self.session.execute, self.session.execute_batch
        bound = self.answer_bound_s

        async def one(i: int) -> None:
            request = pending.requests[i]
            async with sem:
                call = execute_batch if hasattr(request, "add_statement") else execute
                try:
                    await asyncio.wait_for(call(request), bound)
                    pending.done[i] = True
                except TimeoutError:  # asyncio's bound; the driver's own timeouts are its exceptions
                    errors.append(SinkUnavailable(f"no answer from Cassandra within {bound:.0f} s"))
                except Exception as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(i) for i in todo))
        if errors:
            translated = [translate_acsylla(e) for e in errors]
            cls = SinkUnavailable if all(t.retriable for t in translated) else SinkRejected
            raise cls(f"{len(errors)} of {len(todo)} requests failed, e.g. {translated[0]}")
