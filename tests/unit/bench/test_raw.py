"""The raw-limit benchmark's pure parts: the rows file the JVM client and the driver scripts read,
how rows are cut into requests, the replica grouping (fake token map) and the correctness target.
No server: the one JVM test only parses a file (``RawWrite --check``) and is skipped without a JDK
or the stack's Cassandra lib."""

from __future__ import annotations

import datetime as dt
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.drivers import FormatError, chunk_requests, read_rows_file, write_rows_file
from bench.raw import RawBenchError, _summary, check_target, group_rows

STATEMENTS = [
    "INSERT INTO ks.a (k, c, v) VALUES (?, ?, ?) USING TIMESTAMP ?",
    "DELETE FROM ks.b USING TIMESTAMP ? WHERE k = ?",
    "INSERT INTO ks.b (k, v) VALUES (?, ?) USING TIMESTAMP ?",
]


def test_every_value_type_round_trips(tmp_path: Path) -> None:
    values = (
        None,
        True,
        False,
        0,
        -(1 << 63),
        (1 << 63) - 1,
        "ünïcode",
        "",
        b"\x00\xff",
        bytearray(b"ab"),
        dt.date(1969, 12, 31),
        dt.date(2030, 1, 2),
        1.5,
        {7: b"payload", -1: b""},
        [1, "a", None],
        {3, 4},
        {},
    )
    rows = [(0, ("u", 7), values), (2, ("u", 7), (1, 2, 3)), (1, ("o", 1, 2), (5, 6))]
    summary = write_rows_file(tmp_path / "r", STATEMENTS, rows)
    assert summary == {"rows": 3, "groups": 2}
    statements, back = read_rows_file(tmp_path / "r")
    assert statements == STATEMENTS
    assert [r[0] for r in back] == [0, 2, 1]
    assert [r[1] for r in back] == [0, 0, 1], "group keys become dense ints in order of first appearance"
    got = back[0][2]
    assert got[:10] == (None, True, False, 0, -(1 << 63), (1 << 63) - 1, "ünïcode", "", b"\x00\xff", b"ab")
    assert got[10:13] == (dt.date(1969, 12, 31), dt.date(2030, 1, 2), 1.5)
    assert got[13:] == ({7: b"payload", -1: b""}, [1, "a", None], {3, 4}, {})
    assert list(got[13]) == [7, -1], "map order kept"
    assert type(got[1]) is bool and type(got[3]) is int, "a bool stays a boolean, an int an integer"


def test_collections_nest_but_only_so_deep(tmp_path: Path) -> None:
    nested: Any = [1]
    for _ in range(6):
        nested = [nested]  # 7 lists in a map: 8 levels
    write_rows_file(tmp_path / "r", STATEMENTS, [(0, 1, ({1: nested},))])
    assert read_rows_file(tmp_path / "r")[1][0][2] == ({1: nested},)
    with pytest.raises(FormatError, match="nested deeper than 8"):
        write_rows_file(tmp_path / "r", STATEMENTS, [(0, 1, ([[nested]],))])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1 << 63, "64 bits"),
        (dt.datetime(2024, 1, 1), "datetime"),
        (1j, "unsupported value type complex"),
        (object(), "unsupported value type object"),
        ((1, 2), "unsupported value type tuple"),
        ({1: dt.datetime(2024, 1, 1)}, "datetime"),
    ],
)
def test_the_writer_refuses_what_it_cannot_encode(tmp_path: Path, value: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        write_rows_file(tmp_path / "r", STATEMENTS, [(0, 1, (1, 2, 3, 4)), (0, 1, (1, value, 3, 4))])


def test_the_writer_refuses_a_bad_statement_index_or_no_statements(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="row 0: statement index 3"):
        write_rows_file(tmp_path / "r", STATEMENTS, [(3, 1, ())])
    with pytest.raises(FormatError, match="0 statements"):
        write_rows_file(tmp_path / "r", [], [])


def test_the_reader_refuses_a_truncated_or_foreign_or_corrupt_file(tmp_path: Path) -> None:
    write_rows_file(tmp_path / "r", STATEMENTS, [(0, 1, (1, "x", b"y", 4))] * 3)
    data = (tmp_path / "r").read_bytes()
    for cut in (5, len(data) // 2, len(data) - 1):
        (tmp_path / "t").write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated"):
            read_rows_file(tmp_path / "t")
    (tmp_path / "m").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(FormatError, match="not a rows file"):
        read_rows_file(tmp_path / "m")
    # The trailer's count must match the rows read.
    (tmp_path / "c").write_bytes(data[:-8] + struct.pack(">q", 2))
    with pytest.raises(FormatError, match="trailer says 2 rows, read 3"):
        read_rows_file(tmp_path / "c")
    # A huge length field is refused before anything is allocated.
    header = 12 + 4 + len(STATEMENTS[0].encode())
    (tmp_path / "l").write_bytes(data[:12] + struct.pack(">i", 1 << 30) + data[16:header])
    with pytest.raises(FormatError, match="bad length"):
        read_rows_file(tmp_path / "l")


def test_requests_are_groups_cut_into_batches_in_order_of_first_appearance() -> None:
    rows = [(0, g, (i,)) for i, g in enumerate("aabacaaab")]
    assert chunk_requests(rows, 1) == [[r] for r in rows]
    chunks = chunk_requests(rows, 3)
    assert [[r[2][0] for r in c] for c in chunks] == [[0, 1, 3], [5, 6, 7], [2, 8], [4]]
    assert sorted(r for c in chunk_requests(rows, 100) for r in c) == sorted(rows), "every row exactly once"


class _Host:
    def __init__(self, name: str) -> None:
        self.endpoint = name


def _fake_cluster(nodes: int, rf: int) -> Any:
    """A token map of ``nodes`` hosts where a partition key k lives on rf consecutive hosts from k % nodes."""
    hosts = [_Host(f"10.0.0.{i}:9042") for i in range(nodes)]

    def get_replicas(keyspace: str, routing_key: bytes) -> list[_Host]:
        assert keyspace == "ks"
        k = int.from_bytes(routing_key, "big")
        return [hosts[(k + j) % nodes] for j in range(rf)]

    return SimpleNamespace(metadata=SimpleNamespace(get_replicas=get_replicas))


class _Prepared:
    """The two things group_rows asks a prepared statement: its keyspace and a bound routing key."""

    def __init__(self) -> None:
        self.column_metadata = [SimpleNamespace(keyspace_name="ks")]
        self.keyspace = None

    def bind(self, values: tuple[Any, ...]) -> Any:
        return SimpleNamespace(routing_key=values[0].to_bytes(8, "big"))


@pytest.mark.parametrize(("nodes", "rf", "groups"), [(1, 1, 1), (3, 1, 3), (3, 3, 1), (5, 3, 5), (1, 3, 1)])
def test_replica_grouping_puts_rows_together_only_when_they_share_every_replica(
    nodes: int, rf: int, groups: int
) -> None:
    prepared = [_Prepared()]
    rows = [(0, ("sink", k), (k, "v")) for k in range(12)]
    grouped = group_rows(rows, "replica", prepared, _fake_cluster(nodes, rf))
    assert [(i, v) for i, _, v in grouped] == [(i, v) for i, _, v in rows], "rows and order unchanged"
    assert len({g for _, g, _ in grouped}) == groups
    cluster = _fake_cluster(nodes, rf)
    for _, g, v in grouped:
        replicas = frozenset(h.endpoint for h in cluster.metadata.get_replicas("ks", v[0].to_bytes(8, "big")))
        assert g == replicas


def test_sink_grouping_keeps_the_sinks_keys_and_none_makes_every_row_alone() -> None:
    rows = [(0, ("u", 1), (1,)), (0, ("u", 1), (2,)), (0, ("u", 2), (3,))]
    assert group_rows(rows, "sink") == rows
    assert len({g for _, g, _ in group_rows(rows, "none")}) == 3
    with pytest.raises(ValueError, match="unknown grouping"):
        group_rows(rows, "partition")


def test_the_check_targets_the_insert_only_table_with_most_rows_and_counts_distinct_keys() -> None:
    rows = [
        (0, 1, (1, 10, "x", 100)),
        (0, 1, (1, 10, "y", 101)),  # same key (1, 10): one row in the table
        (0, 1, (1, 11, "x", 102)),
        (2, 2, (5, "v", 1)),
        (2, 2, (6, "v", 1)),
        (2, 2, (7, "v", 1)),
        (2, 2, (8, "v", 1)),  # b has more rows, but b is also deleted from: its count is not predictable
        (1, 2, (1, 5)),
    ]
    keys = {("ks", "a"): ["k", "c"], ("ks", "b"): ["k"]}
    assert check_target(STATEMENTS, rows, lambda ks, t: keys[(ks, t)]) == ("ks", "a", 2)
    with pytest.raises(RawBenchError, match="no insert-only table"):
        check_target(STATEMENTS[1:2], [], lambda ks, t: [])


def test_summary_takes_medians_and_what_the_rest_of_the_machine_used() -> None:
    def run(wall: float, cpu: float, server: float, busy: float) -> dict[str, Any]:
        return {
            "rows": 1000,
            "requests": 10,
            "rows_per_s": 1000 / wall,
            "wall_s": wall,
            "client_cpu_s": cpu,
            "client_cpu_us_per_row": 1000 * cpu,
            "server_cpu_s": server,
            "machine_busy_s": busy,
            "errors": 0,
        }

    s = _summary("x", 100, [run(1.0, 0.1, 0.5, 1.0), run(2.0, 0.2, 1.0, 1.2), run(4.0, 0.3, 1.0, 2.0)], 6.0)
    assert s["rows_per_s"] == 500 and s["updates_per_s"] == pytest.approx(500 / 6)
    assert s["client_cpu_us_per_row"] == 200 and s["server_cpu_us_per_row"] == 1000
    assert s["other_cores"] == pytest.approx(0.175), "median of 0.4, 0.0 and 0.175 cores used by others"


def test_the_jvm_client_reads_the_file_and_cuts_requests_as_python_does(tmp_path: Path) -> None:
    from bench.raw import cassandra_lib, run_jvm

    try:
        cassandra_lib()
    except RawBenchError as exc:
        pytest.skip(str(exc))
    if shutil.which("javac") is None:
        pytest.skip("no javac")
    rows = [
        (
            i % 3,
            f"g{i % 7}",
            (i, f"t{i}", bytes([i % 256]) * (i % 5), dt.date(2024, 1, 1 + i % 28), {i: b"x", 1: b""}, [i], {i}),
        )
        for i in range(500)
    ]
    write_rows_file(tmp_path / "r", STATEMENTS, rows)
    for batch in (1, 8):
        doc = run_jvm(tmp_path / "r", ["127.0.0.1"], 1, batch, 1, check=True, timeout_s=60)
        assert doc["exit_code"] == 0
        assert doc["statements"] == 3 and doc["rows"] == 500 and doc["groups"] == 7 and doc["values"] == 3500
        assert doc["requests"] == len(chunk_requests(rows, batch))
    (tmp_path / "bad").write_bytes((tmp_path / "r").read_bytes()[:-9])
    with pytest.raises(RawBenchError, match="truncated"):
        run_jvm(tmp_path / "bad", ["127.0.0.1"], 1, 1, 1, check=True, timeout_s=60)
