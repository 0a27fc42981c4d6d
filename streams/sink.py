"""The idempotent Cassandra/ScyllaDB sink of order updates, behind the ``Sink`` protocol.

Why re-applying anything converges to the same rows: every statement is
``USING TIMESTAMP`` of the event that determined the values it writes
(``epoch + seq``, see ``docs/architecture.md``: later events always have
larger timestamps), and one seq always carries the same payload. So a
duplicate, a replayed event or a whole batch written twice (a crash between
the write and the offset commit) rewrites identical cells with identical
timestamps, and an older event arriving after a newer one loses to it cell by
cell. A terminal status deletes the ``active_orders`` row with a tombstone at
its timestamp, which an older NEW (lower timestamp) cannot resurrect.
Statistics are full values written with a per-user timestamp that grows with
every applied event (``UserState.stats_timestamp``). No counters, no list
appends: those are not idempotent (a map entry keyed by seq is).

Rows per order update (which query each serves is in ``docs/architecture.md``):
``order_history`` (latest state, plus the event in its ``events`` map),
``active_orders`` (upsert while open, tombstone once terminal), ``user_updates``
(the user's event log) and, only for the events of the command that created
the order, ``orders_by_id``. Within one batch an order's history and active
rows are written once, for its newest event: the cells of the older ones
would lose to it anyway.

Writing (``CassandraSink.write``): the statements are bound, grouped by the
replica set that owns their partition (the driver's token map; one group on a
single node), and sent as UNLOGGED batches of at most ``batch_max_statements``
statements and ``batch_max_bytes`` bytes per group, all concurrently from the
event loop (the driver's I/O thread completes asyncio futures). Every
statement of a request lives on the same replicas, so a batch is one round
trip to one coordinator that owns all of it, never a distributed batchlog.
A failed write raises ``SinkError``; calling ``write`` again sends only the
requests that did not succeed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cassandra import ConsistencyLevel, InvalidRequest
from cassandra.cluster import Cluster, ExecutionProfile, Session
from cassandra.query import BatchStatement, BatchType, BoundStatement, PreparedStatement

from kit.cql import TRANSIENT_ERRORS, load_balancing, make_cluster
from schemas.events import OrderStatus, OrderUpdate, RejectReason
from schemas.tables import STAT_FIELDS, Fill, FillMonth
from streams.cqlbind import Binder
from streams.errors import SinkError, SinkRejected, SinkUnavailable
from streams.settings import WorkerSettings
from streams.state import UserState

__all__ = [
    "Applied",
    "CassandraSink",
    "Fill",
    "FillMonth",
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

_OPEN = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)
_Q = struct.Struct(">q").pack

Applied = tuple[OrderUpdate, bytes]
"""An order update to write, with its single-object encoded payload."""


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One order_statistics row: full values, written with the user's statistics timestamp."""

    user_id: int
    symbol: str
    values: Sequence[int]
    """STAT_FIELDS, in order."""
    last_epoch: int
    last_seq: int
    timestamp: int


class Sink(Protocol):
    """What the processor writes through: the Cassandra sink, its in-memory twin, a dry run."""

    def statements(self, applied: Sequence[Applied], stats: Sequence[StatsRow]) -> Any:
        """Everything one batch writes, in the sink's own form (opaque to the processor)."""

    async def write(self, pending: Any) -> None:
        """Make ``pending`` durable or raise SinkError; called again with the same ``pending``
        after a failure, it writes what is still missing (writes are idempotent)."""


def stats_rows(user_id: int, state: UserState, symbols: Iterable[str] | None = None) -> list[StatsRow]:
    """The order_statistics rows of ``symbols`` (default: all) of one user's state, with its timestamp."""
    ts = state.stats_timestamp()
    out = []
    for symbol in state.stats if symbols is None else symbols:
        epoch, seq = state.last_counted(symbol)
        out.append(StatsRow(user_id, symbol, state.stats[symbol][: len(STAT_FIELDS)], epoch, seq, ts))
    return out


def write_timestamp(epoch: int, seq: int) -> int:
    """Cassandra write timestamp (microseconds) of an event: see docs/architecture.md."""
    return epoch + seq


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


# ------------------------------------------------------------------ request planning
@dataclass(slots=True)
class _Stmt:
    group: Hashable
    """The partition the statement writes (statements of one partition share its replicas)."""
    bound: BoundStatement
    size: int


def plan_requests(
    stmts: Sequence[Any],
    replicas_of: Callable[[Any], Hashable],
    max_statements: int,
    max_bytes: int,
) -> list[list[Any]]:
    """Split statements into requests: each holds statements of one replica set only, at most
    ``max_statements`` of them and at most ``max_bytes`` (one oversized statement goes alone).

    ``stmts`` have ``.group`` (their partition) and ``.size``; ``replicas_of(stmt)`` names the
    replica set of a statement's partition and is called once per partition. A partition's
    statements stay together in one request unless they alone exceed the bounds: Cassandra applies
    one request's mutations of a partition atomically, so a reader of that partition (the API's
    stream backfill, a page of a user's fills) never sees a later row of the batch without the
    earlier ones, which concurrent requests would otherwise allow. Order within a partition is kept.
    """
    by_group: dict[Hashable, Hashable] = {}
    sets: dict[Hashable, dict[Hashable, list[Any]]] = {}
    for st in stmts:
        owner = by_group.get(st.group)
        if owner is None:
            owner = by_group[st.group] = replicas_of(st)
        sets.setdefault(owner, {}).setdefault(st.group, []).append(st)
    requests: list[list[Any]] = []
    for partitions in sets.values():
        current: list[Any] = []
        size = 0
        for members in partitions.values():
            whole = sum(st.size for st in members)
            if current and (len(current) + len(members) > max_statements or size + whole > max_bytes):
                requests.append(current)
                current, size = [], 0
            for st in members:  # only a partition bigger than a request is cut
                if current and (len(current) >= max_statements or size + st.size > max_bytes):
                    requests.append(current)
                    current, size = [], 0
                current.append(st)
                size += st.size
        if current:
            requests.append(current)
    return requests


@dataclass
class Pending:
    """One batch's requests and which of them are durable already."""

    requests: list[Any]
    done: list[bool] = field(default_factory=list)
    rows: int = 0

    def __post_init__(self) -> None:
        self.done = [False] * len(self.requests)


# ----------------------------------------------------------------------- the sink
def statement_cql(ks: str) -> dict[str, str]:
    """The CQL of every statement the sink writes, by name (the same for every driver)."""
    cols = ", ".join(STAT_FIELDS)
    marks = ", ".join("?" for _ in STAT_FIELDS)
    return {
        "history": (
            f"UPDATE {ks}.order_history USING TIMESTAMP ? SET client_order_id = ?, symbol = ?, side = ?, "
            "order_type = ?, time_in_force = ?, price = ?, qty = ?, quote_budget = ?, filled_qty = ?, "
            "remaining_qty = ?, quote_filled = ?, status = ?, reason = ?, created_ns = ?, updated_ns = ?, "
            "expire_ns = ?, seq = ?, events = events + ? WHERE user_id = ? AND epoch = ? AND order_id = ?"
        ),
        "active_upsert": (
            f"INSERT INTO {ks}.active_orders (user_id, epoch, order_id, client_order_id, symbol, side, order_type, "
            "time_in_force, price, qty, quote_budget, filled_qty, remaining_qty, quote_filled, status, created_ns, "
            "updated_ns, expire_ns, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        ),
        "active_delete": (
            f"DELETE FROM {ks}.active_orders USING TIMESTAMP ? WHERE user_id = ? AND epoch = ? AND order_id = ?"
        ),
        "by_id": (
            f"INSERT INTO {ks}.orders_by_id (order_id, epoch, user_id, symbol) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "user_updates": (
            f"INSERT INTO {ks}.user_updates (user_id, day, epoch, seq, order_id, status, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "stats": (
            f"INSERT INTO {ks}.order_statistics (user_id, symbol, {cols}, last_epoch, last_seq) "
            f"VALUES (?, ?, {marks}, ?, ?) USING TIMESTAMP ?"
        ),
        # streams.trades and the query API's lookups (streams/cql/003_fills_and_lookups.cql)
        "by_client_id": (
            f"INSERT INTO {ks}.orders_by_client_id (user_id, client_order_id, epoch, order_id) "
            "VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ),
        "fill": (
            f"INSERT INTO {ks}.user_trades (user_id, month, ts_ns, epoch, seq, liquidity, trade_id, order_id, "
            "symbol, side, price, qty, quote_qty, fee) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        ),
        "fill_month": f"INSERT INTO {ks}.user_trade_months (user_id, month) VALUES (?, ?) USING TIMESTAMP ?",
    }


_DATE = struct.Struct(">I")
_I = struct.Struct(">i").pack
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def routing_key(group: Hashable) -> bytes:
    """The serialized partition key of a row group, as Cassandra hashes it into a token: a
    single bigint is its 8 bytes; a composite key is each component as 2-byte length, bytes, 0."""
    kind = group[0]  # type: ignore[index]
    if kind in ("u", "i"):
        return _Q(group[1])  # type: ignore[index]
    if kind == "d":
        user: int = group[1]  # type: ignore[index]
        day: dt.date = group[2]  # type: ignore[index]
        parts = (_Q(user), _DATE.pack(day.toordinal() - _EPOCH_ORDINAL + 2**31))
        return b"".join(len(p).to_bytes(2, "big") + p + b"\x00" for p in parts)
    if kind in ("m", "c"):  # user_trades (user_id, month int); orders_by_client_id (user_id, text)
        second = group[2]  # type: ignore[index]
        parts = (_Q(group[1]), _I(second) if kind == "m" else second.encode())  # type: ignore[index]
        return b"".join(len(p).to_bytes(2, "big") + p + b"\x00" for p in parts)
    raise ValueError(f"unknown row group {group!r}")


class ReplicaMap:
    """Which replicas own a row group's partition, from cassandra-driver's token map (kept up to
    date by its control connection). One node, or every node holding every partition: one set."""

    def __init__(self, cluster: Cluster, keyspace: str) -> None:
        self.cluster, self.keyspace = cluster, keyspace

    def lookup(self) -> Callable[[Any], Hashable] | None:
        """A function statement -> replica set for this batch, or None when there is one set."""
        metadata = self.cluster.metadata
        token_map = metadata.token_map
        hosts = metadata.all_hosts()
        if token_map is None or len(hosts) <= 1:
            return None
        ks = metadata.keyspaces.get(self.keyspace)
        strategy = getattr(ks, "replication_strategy", None)
        rf = getattr(strategy, "replication_factor", None)
        if isinstance(rf, int) and rf >= len(hosts):
            return None
        token_class = token_map.token_class
        get_replicas = token_map.get_replicas
        keyspace = self.keyspace

        def replicas_of(st: Any) -> Hashable:
            token = token_class.from_key(routing_key(st.group))
            return tuple(sorted(str(h.endpoint) for h in get_replicas(keyspace, token)))

        return replicas_of


class RowBuilder:
    """The rows of a batch, for any driver: ``self.handles[name]`` is the driver's statement."""

    handles: dict[str, Any]
    _days: dict[int, dt.date]

    # --------------------------------------------------------------- statements
    def _day(self, ts_ns: int) -> dt.date:
        # Events of one batch fall on very few days: one datetime per hour of engine time.
        hour = ts_ns // 3_600_000_000_000
        day = self._days.get(hour)
        if day is None:
            if len(self._days) > 1024:
                self._days.clear()
            day = self._days[hour] = dt.datetime.fromtimestamp(hour * 3600, tz=dt.UTC).date()
        return day

    def rows(
        self, applied: Sequence[Applied], stats: Sequence[StatsRow]
    ) -> list[tuple[Hashable, Any, tuple[Any, ...], int]]:
        """Every row of a batch as (partition, statement, values, estimated bytes), before binding."""
        out: list[tuple[Hashable, Any, tuple[Any, ...], int]] = []
        h = self.handles
        newest: dict[tuple[int, int], OrderUpdate] = {}
        events: dict[tuple[int, int], dict[int, bytes]] = {}
        cids: set[tuple[int, int]] = set()
        for ev, payload in applied:
            key = (ev.epoch, ev.order_id)
            seen = newest.get(key)
            if seen is None:
                newest[key] = ev
                events[key] = {ev.seq: payload}
            else:
                events[key][ev.seq] = payload
                if ev.seq > seen.seq:
                    newest[key] = ev
            ts = ev.epoch + ev.seq
            user = ev.user_id
            day = self._day(ev.ts_ns)
            out.append(
                (
                    ("d", user, day),
                    h["user_updates"],
                    (user, day, ev.epoch, ev.seq, ev.order_id, ev.status.value, payload, ts),
                    80 + len(payload),
                )
            )
            if ev.created_ns == ev.updated_ns:
                # An event of the command that placed the order: its (user, epoch) never change.
                out.append((("i", ev.order_id), h["by_id"], (ev.order_id, ev.epoch, user, ev.symbol, ts), 60))
                # The query API's lookup by client id: once per order (a dict test, not a row per event),
                # never for a duplicate's rejection (it would shadow the open order that owns the id).
                if ev.client_order_id and key not in cids and ev.reason is not RejectReason.DUPLICATE_CLIENT_ORDER_ID:
                    cids.add(key)
                    cid = ev.client_order_id
                    out.append(
                        (("c", user, cid), h["by_client_id"], (user, cid, ev.epoch, ev.order_id, ts), 40 + len(cid))
                    )
        for key, ev in newest.items():
            ts = ev.epoch + ev.seq
            user = ev.user_id
            group = ("u", user)
            common = (
                ev.client_order_id,
                ev.symbol,
                ev.side.value,
                ev.order_type.value,
                ev.time_in_force.value,
                ev.price,
                ev.qty,
                ev.quote_budget,
                ev.filled_qty,
                ev.remaining_qty,
                ev.quote_filled,
                ev.status.value,
            )
            out.append(
                (
                    group,
                    h["history"],
                    (
                        ts,
                        *common,
                        ev.reason.value,
                        ev.created_ns,
                        ev.updated_ns,
                        ev.expire_ns,
                        ev.seq,
                        events[key],
                        user,
                        ev.epoch,
                        ev.order_id,
                    ),
                    200 + sum(len(p) + 16 for p in events[key].values()),
                )
            )
            if ev.status in _OPEN:
                out.append(
                    (
                        group,
                        h["active_upsert"],
                        (user, ev.epoch, ev.order_id, *common, ev.created_ns, ev.updated_ns, ev.expire_ns, ev.seq, ts),
                        200,
                    )
                )
            else:
                out.append((group, h["active_delete"], (ts, user, ev.epoch, ev.order_id), 40))
        for row in stats:
            out.append(
                (
                    ("u", row.user_id),
                    h["stats"],
                    (row.user_id, row.symbol, *row.values, row.last_epoch, row.last_seq, row.timestamp),
                    140,
                )
            )
        return out

    def fill_rows(
        self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()
    ) -> list[tuple[Hashable, Any, tuple[Any, ...], int]]:
        """The rows of a batch of fills (``streams.trades``): a user_trades row each, and the
        user_trade_months rows asked for (they share the user's partition token with the user's
        other rows)."""
        h = self.handles
        fill, month_row = h["fill"], h["fill_month"]
        out: list[tuple[Hashable, Any, tuple[Any, ...], int]] = []
        for f in fills:
            values = (
                f.user_id, f.month, f.ts_ns, f.epoch, f.seq, f.liquidity, f.trade_id, f.order_id, f.symbol,
                f.side, f.price, f.qty, f.quote_qty, f.fee, f.epoch + f.seq,
            )  # fmt: skip
            out.append((("m", f.user_id, f.month), fill, values, 120 + len(f.symbol)))
        for user_id, month, ts in months:
            out.append((("u", user_id), month_row, (user_id, month, ts), 30))
        return out


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
        stmts = [_Stmt(group, binder.bind(values), size) for group, binder, values, size in self.rows(applied, stats)]
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    def fill_statements(self, fills: Sequence[Fill], months: Sequence[FillMonth] = ()) -> Pending:
        """``statements`` for a batch of fills (``streams.trades``); written by the same ``write``."""
        rows = self.fill_rows(fills, months)
        stmts = [_Stmt(group, binder.bind(values), size) for group, binder, values, size in rows]
        replicas_of = self.replicas.lookup() or (lambda _st: ())
        requests = plan_requests(stmts, replicas_of, self.max_statements, self.max_bytes)
        pending = Pending([self._request(r) for r in requests])
        pending.rows = len(stmts)
        return pending

    @staticmethod
    def _request(stmts: list[_Stmt]) -> Any:
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
