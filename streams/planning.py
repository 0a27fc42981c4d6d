"""How a batch's rows become requests: grouped by the replicas that own them, bounded in size.

A batch's statements are grouped by the replica set that owns their partition (the driver's
token map; one group on a single node) and packed into UNLOGGED batches of at most
``batch_max_statements`` statements and ``batch_max_bytes`` bytes per group. Every statement of
a request lives on the same replicas, so a batch is one round trip to one coordinator that owns
all of it, never a distributed batchlog. A partition's statements stay in one request (see
``plan_requests``). Pure, apart from ``ReplicaMap`` reading the driver's token map.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cassandra.cluster import Cluster
from cassandra.query import BoundStatement

__all__ = ["Pending", "ReplicaMap", "Stmt", "plan_requests", "routing_key"]

_Q = struct.Struct(">q").pack


@dataclass(slots=True)
class Stmt:
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
