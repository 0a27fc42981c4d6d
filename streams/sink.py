"""The idempotent Cassandra/ScyllaDB sink of order updates.

Why re-applying anything converges to the same rows: every statement is
``USING TIMESTAMP epoch + seq`` of the event that determined the value it
writes (``docs/architecture.md``: later events always have larger
timestamps), and one seq always carries the same payload. So a duplicate, a
replayed event or a whole batch written twice (a crash between the write and
the offset commit) rewrites identical cells with identical timestamps, and an
older event arriving after a newer one loses to it cell by cell. A terminal
status deletes the ``active_orders`` row with a tombstone at its timestamp,
which an older NEW/PARTIALLY_FILLED (lower timestamp) cannot resurrect.
Statistics are written as full values, once per (user, symbol) per batch,
with the timestamp of the last event that changed them. No counters, no list
appends: those are not idempotent.

All statements are prepared, marked idempotent (so the driver may retry and
speculatively execute them) and sent concurrently with a bounded window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from cassandra import ConsistencyLevel, OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.concurrent import execute_concurrent
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from engine.events import OrderStatus, OrderUpdate
from streams.errors import SinkError
from streams.settings import WorkerSettings
from streams.state import STAT_FIELDS

__all__ = ["CassandraSink", "connect", "make_cluster", "write_timestamp"]

_OPEN = (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)
_RETRIABLE = (OperationTimedOut, WriteTimeout, ReadTimeout, Unavailable, NoHostAvailable, ConnectionError)
_BATCH_MAX = 50
"""Statements per UNLOGGED batch: large enough to save round trips, small enough for the size limits."""
Stmt = tuple[tuple[Any, ...], PreparedStatement, tuple[Any, ...]]
"""(partition group, prepared statement, bound values)."""
_ORDER_COLS = (
    "client_order_id, symbol, side, order_type, time_in_force, price, qty, quote_budget, filled_qty, "
    "remaining_qty, quote_filled, status"
)


def write_timestamp(epoch: int, seq: int) -> int:
    """Cassandra write timestamp (microseconds) of an event: see docs/architecture.md."""
    return epoch + seq


def make_cluster(hosts: list[str], port: int, profile: ExecutionProfile) -> Cluster:
    """A Cluster as every process of the project opens one: token-aware profile given by the caller,
    protocol v5, and a bounded reconnection back-off."""
    return Cluster(
        hosts,
        port=port,
        protocol_version=5,
        connect_timeout=10,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        # The default backs off to 10 minutes: after a database restart a process would sit idle
        # long after the node is back. Ten seconds bounds that.
        reconnection_policy=ExponentialReconnectionPolicy(0.5, 10.0),
    )


def connect(s: WorkerSettings) -> tuple[Cluster, Session]:
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        # QUORUM of the local DC: with RF > 1 a read at the same level (the query API) sees
        # every write the worker has committed an offset for.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        request_timeout=s.request_timeout_s,
    )
    cluster = make_cluster(s.hosts, s.cql_port, profile)
    try:
        return cluster, cluster.connect()
    except NoHostAvailable as exc:
        cluster.shutdown()
        raise SinkError(f"no Cassandra at {s.hosts}:{s.cql_port}: {exc}", retriable=True) from exc


class CassandraSink:
    def __init__(self, session: Session, s: WorkerSettings, keyspace: str | None = None) -> None:
        self.session = session
        self.s = s
        ks = keyspace or s.keyspace
        self.concurrency = s.write_concurrency

        def prep(cql: str) -> PreparedStatement:
            stmt = session.prepare(cql)
            stmt.is_idempotent = True
            return stmt

        self.history = prep(
            f"INSERT INTO {ks}.order_history (user_id, epoch, order_id, {_ORDER_COLS}, reason, created_ns, "
            "updated_ns, expire_ns, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        )
        self.active_upsert = prep(
            f"INSERT INTO {ks}.active_orders (user_id, epoch, order_id, {_ORDER_COLS}, created_ns, updated_ns, "
            "expire_ns, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.active_delete = prep(
            f"DELETE FROM {ks}.active_orders USING TIMESTAMP ? WHERE user_id = ? AND epoch = ? AND order_id = ?"
        )
        self.by_id = prep(
            f"INSERT INTO {ks}.orders_by_id (epoch, order_id, user_id, symbol, status, filled_qty, remaining_qty, "
            "quote_filled, updated_ns, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.stream = prep(
            f"INSERT INTO {ks}.order_updates_stream (day, bucket, epoch, seq, user_id, order_id, status, ts_ns, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.user_updates = prep(
            f"INSERT INTO {ks}.user_updates (user_id, day, epoch, seq, order_id, status, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.events = prep(
            f"INSERT INTO {ks}.order_events (epoch, order_id, seq, status, filled_qty, last_fill_qty, "
            "last_fill_price, trade_id, ts_ns, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        cols = ", ".join(STAT_FIELDS)
        marks = ", ".join("?" for _ in STAT_FIELDS)
        self.stats = prep(
            f"INSERT INTO {ks}.order_statistics (user_id, symbol, {cols}, last_epoch, last_seq) "
            f"VALUES (?, ?, {marks}, ?, ?) USING TIMESTAMP ?"
        )

    def statements(
        self,
        applied: Sequence[tuple[OrderUpdate, bytes]],
        stats: Sequence[tuple[int, str, dict[str, int], tuple[int, int]]],
    ) -> list[Stmt]:
        """Every statement of a batch, each with the key of the partition group it belongs to:
        the user (order_history, active_orders and order_statistics share the user_id token), the
        order (order_events: (epoch, order_id); orders_by_id: order_id), the user's day
        (user_updates) or the stream bucket. ``write`` sends one UNLOGGED batch per group: all on one replica set."""
        out: list[Stmt] = []
        buckets = self.s.stream_buckets
        for ev, payload in applied:
            ts = write_timestamp(ev.epoch, ev.seq)
            order = (
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
            key = (ev.user_id, ev.epoch, ev.order_id)
            user_group = ("u", ev.user_id)
            order_group = ("o", ev.epoch, ev.order_id)
            day = dt.datetime.fromtimestamp(ev.ts_ns / 1e9, tz=dt.UTC).date()
            out.append(
                (
                    user_group,
                    self.history,
                    (*key, *order, ev.reason.value, ev.created_ns, ev.updated_ns, ev.expire_ns, ev.seq, ts),
                )
            )
            if ev.status in _OPEN:
                out.append(
                    (
                        user_group,
                        self.active_upsert,
                        (*key, *order, ev.created_ns, ev.updated_ns, ev.expire_ns, ev.seq, ts),
                    )
                )
            else:
                out.append((user_group, self.active_delete, (ts, *key)))
            out.append(
                (
                    ("i", ev.order_id),
                    self.by_id,
                    (
                        ev.epoch,
                        ev.order_id,
                        ev.user_id,
                        ev.symbol,
                        ev.status.value,
                        ev.filled_qty,
                        ev.remaining_qty,
                        ev.quote_filled,
                        ev.updated_ns,
                        ev.seq,
                        ts,
                    ),
                )
            )
            out.append(
                (
                    ("d", ev.user_id, day),
                    self.user_updates,
                    (ev.user_id, day, ev.epoch, ev.seq, ev.order_id, ev.status.value, payload, ts),
                )
            )
            out.append(
                (
                    ("s", day, ev.seq % buckets),
                    self.stream,
                    (
                        day,
                        ev.seq % buckets,
                        ev.epoch,
                        ev.seq,
                        ev.user_id,
                        ev.order_id,
                        ev.status.value,
                        ev.ts_ns,
                        payload,
                        ts,
                    ),
                )
            )
            out.append(
                (
                    order_group,
                    self.events,
                    (
                        ev.epoch,
                        ev.order_id,
                        ev.seq,
                        ev.status.value,
                        ev.filled_qty,
                        ev.last_fill_qty,
                        ev.last_fill_price,
                        ev.trade_id,
                        ev.ts_ns,
                        payload,
                        ts,
                    ),
                )
            )
        for user_id, symbol, values, (epoch, seq) in stats:
            row = tuple(values.get(f, 0) for f in STAT_FIELDS)
            out.append((("u", user_id), self.stats, (user_id, symbol, *row, epoch, seq, write_timestamp(epoch, seq))))
        return out

    def write(self, statements: list[Stmt]) -> None:
        """Write everything or raise SinkError; safe to call again with the same statements."""
        if not statements:
            return
        groups: dict[tuple[Any, ...], list[tuple[PreparedStatement, tuple[Any, ...]]]] = {}
        for group, stmt, params in statements:
            groups.setdefault(group, []).append((stmt, params))
        requests: list[tuple[Any, tuple[Any, ...]]] = []
        for members in groups.values():
            for i in range(0, len(members), _BATCH_MAX):
                chunk = members[i : i + _BATCH_MAX]
                if len(chunk) == 1:
                    requests.append(chunk[0])
                    continue
                # UNLOGGED: every statement of the chunk lives on the same replicas, so the batch
                # is one round trip, not a distributed batchlog write.
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                batch.is_idempotent = True
                for stmt, params in chunk:
                    batch.add(stmt, params)
                requests.append((batch, ()))
        try:
            results = execute_concurrent(
                self.session, requests, concurrency=self.concurrency, raise_on_first_error=False
            )
        except _RETRIABLE as exc:
            raise SinkError(f"Cassandra unavailable: {exc}", retriable=True) from exc
        except (TypeError, RecursionError) as exc:
            # cassandra-driver's execute_concurrent recurses through its callbacks when every
            # request fails at once (no host up) and then cannot sort the errors it collected.
            raise SinkError(f"Cassandra unavailable (driver: {exc})", retriable=True) from exc
        failures = [r.result_or_exc for r in results if not r.success]
        if failures:
            first = failures[0]
            retriable = all(isinstance(f, _RETRIABLE) for f in failures)
            raise SinkError(f"{len(failures)} of {len(requests)} writes failed, e.g. {first!r}", retriable=retriable)
