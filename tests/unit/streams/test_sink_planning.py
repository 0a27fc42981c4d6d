"""The sink's pure parts: the binder gives the driver's bytes; requests never span replica sets."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest
from cassandra import cqltypes
from cassandra.protocol import ColumnMetadata
from cassandra.query import PreparedStatement

from streams.cqlbind import Binder
from streams.sink import plan_requests


def _prepared(types: list[Any], version: int = 4) -> PreparedStatement:
    cols = [ColumnMetadata("ks", "t", f"c{i}", t) for i, t in enumerate(types)]
    return PreparedStatement(cols, b"id", [0], "INSERT ...", "ks", version, [], None)


MAP = cqltypes.MapType.apply_parameters([cqltypes.LongType, cqltypes.BytesType])
TYPES = [
    cqltypes.LongType,
    cqltypes.Int32Type,
    cqltypes.UTF8Type,
    cqltypes.BytesType,
    cqltypes.SimpleDateType,
    MAP,
    cqltypes.BooleanType,  # not special-cased: serialized by the driver's own type
]
VALUES = [
    [2**63 - 1, 7, "héllo", b"\x00\xff", dt.date(2026, 12, 2), {3: b"a", 1: b"bc"}, True],
    [-(2**63), -1, "", b"", dt.date(1969, 12, 31), {}, False],
    [0, 0, "x" * 300, bytes(range(256)), dt.date(1970, 1, 1), {2**40: b"z" * 1000}, None],
]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("values", VALUES)
def test_binder_gives_the_drivers_bytes(values, version):
    prepared = _prepared(TYPES, version)
    ours = Binder(prepared).bind(values)
    theirs = prepared.bind(values)
    assert ours.values == theirs.values
    assert ours.routing_key == theirs.routing_key
    assert ours.prepared_statement is prepared


def test_binder_refuses_bad_values_with_the_column_name():
    binder = Binder(_prepared(TYPES))
    with pytest.raises(TypeError, match="c0"):
        binder.bind(["not an int", 1, "a", b"", dt.date.today(), {}, True])
    with pytest.raises(ValueError):
        binder.bind([1])


@dataclass
class S:
    group: Any
    size: int = 100
    name: str = ""


def _ring(nodes: int, rf: int):
    """A fake token map: partition p is owned by nodes p % n .. p % n + rf - 1."""
    calls: list[Any] = []

    def replicas_of(st: S) -> tuple[int, ...]:
        calls.append(st.group)
        first = hash(st.group) % nodes
        return tuple(sorted({(first + i) % nodes for i in range(min(rf, nodes))}))

    return replicas_of, calls


@pytest.mark.parametrize(("nodes", "rf"), [(1, 1), (3, 1), (3, 3)])
def test_requests_hold_one_replica_set_and_respect_the_bounds(nodes, rf):
    stmts = [S(("u", u), size=100 + u % 7) for u in range(200) for _ in range(5)]
    stmts += [S(("i", o), size=60) for o in range(500)]
    replicas_of, calls = _ring(nodes, rf)
    requests = plan_requests(stmts, replicas_of, max_statements=50, max_bytes=3000)
    assert len(calls) == len({s.group for s in stmts})  # once per partition, not per statement
    assert sorted(id(s) for r in requests for s in r) == sorted(id(s) for s in stmts)  # each once
    owner = {s.group: replicas_of(s) for s in stmts}
    for r in requests:
        assert len({owner[s.group] for s in r}) == 1
        assert len(r) <= 50
        assert sum(s.size for s in r) <= 3000
    distinct_sets = len(set(owner.values()))
    if (nodes, rf) in ((1, 1), (3, 3)):
        assert distinct_sets == 1
    else:
        assert distinct_sets == 3
    # Few requests: bounded by the sizes, not by the number of partitions.
    total = sum(s.size for s in stmts)
    assert len(requests) <= distinct_sets + total // 2500 + len(stmts) // 50


def test_an_oversized_statement_goes_alone():
    stmts = [S("a", 10), S("a", 10_000), S("a", 10)]
    requests = plan_requests(stmts, lambda s: (), max_statements=100, max_bytes=1000)
    assert [len(r) for r in requests] == [1, 1, 1]


def test_a_partition_stays_in_one_request_unless_it_alone_exceeds_the_bounds():
    """One request's mutations of a partition are applied atomically: a reader of a user's partition
    never sees a later row of a batch without the earlier ones (concurrent requests would allow it)."""
    # Interleaved as a batch of several users' events arrives: u1 u2 u3 u1 u2 u3 ...
    stmts = [S(("u", u), size=100, name=f"{u}:{i}") for i in range(6) for u in range(1, 8)]
    stmts += [S(("big", 0), size=100, name=f"big:{i}") for i in range(25)]  # 2,500 bytes: more than a request
    requests = plan_requests(stmts, lambda s: (), max_statements=20, max_bytes=1000)
    where: dict[Any, set[int]] = {}
    for n, r in enumerate(requests):
        for s in r:
            where.setdefault(s.group, set()).add(n)
        assert len(r) <= 20 and sum(s.size for s in r) <= 1000
    assert all(len(where[("u", u)]) == 1 for u in range(1, 8))
    assert len(where[("big", 0)]) == 3  # cut only because it cannot fit, in order
    big = [s.name for r in requests for s in r if s.group == ("big", 0)]
    assert big == [f"big:{i}" for i in range(25)]
    for u in range(1, 8):  # a partition's statements keep their order
        assert [s.name for r in requests for s in r if s.group == ("u", u)] == [f"{u}:{i}" for i in range(6)]
