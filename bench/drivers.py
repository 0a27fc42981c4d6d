"""Client CPU per written row of the Python CQL drivers (issue 13, item 2), and the rows file they share
with the JVM raw-limit client (``bench/jvm/RawWrite.java``).

This module is self-contained on purpose: ``python bench/drivers.py --driver X ...`` runs in a venv
that holds only that driver (scylla-driver installs the same ``cassandra`` module as cassandra-driver,
so the two cannot share a venv), with the standard library and nothing of the project. ``ohs bench
drivers`` (``bench/raw.py``) writes the rows file from the worker's sink and runs this script in each
venv. Nothing here imports a driver at module level.

The rows file (big-endian; read by ``RawWrite.java`` with a DataInputStream)::

    b"OHSR" int32 version(=1)
    int32 n_statements, each: int32 len + UTF-8 CQL with ? markers (incl. USING TIMESTAMP ?)
    rows, each: int32 stmt_index (-1 ends them), int64 group, int16 n_values, values
    value: int8 tag + payload: 0 null, 1 integer int64, 2 text int32 len + UTF-8, 3 blob int32 len + bytes,
           4 date int32 days since 1970-01-01, 5 boolean int8, 6 double float64,
           7 map int32 n + n (key, value) values, 8 list int32 n + n values, 9 set likewise (nesting <= 8)
    trailer: int64 row count

An integer carries no CQL type: the reader binds it as the prepared marker's own type (bigint, int, ...),
so the writer needs no schema. Rows with the same group may share an UNLOGGED batch: the writer promises
they live on the same replicas (the sink's partition group, or the token map's replica set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import struct
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, BinaryIO, NamedTuple

__all__ = [
    "FormatError",
    "Row",
    "Snapshot",
    "chunk_requests",
    "cpu_snapshot",
    "driver_write",
    "measured",
    "read_rows_file",
    "write_rows_file",
]

MAGIC = b"OHSR"
VERSION = 1
NULL, INTEGER, TEXT, BLOB, DATE, BOOLEAN, DOUBLE, MAP, LIST, SET = range(10)
MAX_DEPTH = 8
"""Deepest nesting of collections (a frozen map of lists is 2)."""
MAX_LEN = 16 << 20
"""Longest statement or value: far above any row of ours, and it bounds what a corrupt file can make us allocate."""
MAX_STATEMENTS = 10_000
_INT64 = (-(1 << 63), (1 << 63) - 1)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_HEAD = struct.Struct(">iqh")
_I8, _I32, _I64, _F64 = struct.Struct(">b"), struct.Struct(">i"), struct.Struct(">q"), struct.Struct(">d")

Row = tuple[int, Hashable, tuple[Any, ...]]
"""(statement index, group key, bound values)."""


class FormatError(ValueError):
    """A rows file, or a row given to the writer, that does not follow the format above.

    Not under ``bench.errors.BenchError``: this module runs as a script in other virtualenvs and
    imports nothing of the project."""

    retriable = False


def _value(v: Any, depth: int = 0) -> bytes:
    # bool before int: True is an int to Python, a boolean to CQL.
    if v is None:
        return b"\x00"
    if isinstance(v, bool):
        return b"\x05\x01" if v else b"\x05\x00"
    if isinstance(v, int):
        if not _INT64[0] <= v <= _INT64[1]:
            raise FormatError(f"integer {v} does not fit in 64 bits")
        return b"\x01" + _I64.pack(v)
    if isinstance(v, str):
        raw = v.encode()
        if len(raw) > MAX_LEN:
            raise FormatError(f"text of {len(raw)} bytes is over {MAX_LEN}")
        return b"\x02" + _I32.pack(len(raw)) + raw
    if isinstance(v, bytes | bytearray | memoryview):
        raw = bytes(v)
        if len(raw) > MAX_LEN:
            raise FormatError(f"blob of {len(raw)} bytes is over {MAX_LEN}")
        return b"\x03" + _I32.pack(len(raw)) + raw
    if isinstance(v, dt.datetime):
        # A datetime is a date too: refuse it rather than silently drop its time of day.
        raise FormatError("datetime values are not supported (pass an int of the unit the column wants)")
    if isinstance(v, dt.date):
        return b"\x04" + _I32.pack(v.toordinal() - _EPOCH_ORDINAL)
    if isinstance(v, float):
        return b"\x06" + _F64.pack(v)
    if isinstance(v, dict | list | set | frozenset):
        if depth >= MAX_DEPTH:
            raise FormatError(f"collections nested deeper than {MAX_DEPTH}")
        if isinstance(v, dict):
            items = b"".join(_value(k, depth + 1) + _value(x, depth + 1) for k, x in v.items())
            return b"\x07" + _I32.pack(len(v)) + items
        tag = b"\x08" if isinstance(v, list) else b"\x09"
        return tag + _I32.pack(len(v)) + b"".join(_value(x, depth + 1) for x in v)
    # A tuple would be a CQL tuple (or a UDT): not needed by any table of ours.
    raise FormatError(f"unsupported value type {type(v).__name__}")


def write_rows_file(path: str | os.PathLike[str], statements: Sequence[str], rows: Iterable[Row]) -> dict[str, int]:
    """Write ``statements`` and ``rows`` to ``path``; any hashable group key (mapped to a dense int64).
    Returns ``{"rows": n, "groups": g}``."""
    if not 0 < len(statements) <= MAX_STATEMENTS:
        raise FormatError(f"{len(statements)} statements (need 1..{MAX_STATEMENTS})")
    groups: dict[Hashable, int] = {}
    n = 0
    with open(path, "wb") as f:
        f.write(MAGIC + _I32.pack(VERSION) + _I32.pack(len(statements)))
        for cql in statements:
            raw = cql.encode()
            if len(raw) > MAX_LEN:
                raise FormatError(f"statement of {len(raw)} bytes")
            f.write(_I32.pack(len(raw)) + raw)
        for index, group, values in rows:
            if not 0 <= index < len(statements):
                raise FormatError(f"row {n}: statement index {index} of {len(statements)}")
            if len(values) > 0x7FFF:
                raise FormatError(f"row {n}: {len(values)} values")
            gid = groups.setdefault(group, len(groups))
            try:
                f.write(_HEAD.pack(index, gid, len(values)) + b"".join(_value(v) for v in values))
            except FormatError as exc:
                raise FormatError(f"row {n}: {exc}") from None
            n += 1
        f.write(_I32.pack(-1) + _I64.pack(n))
    return {"rows": n, "groups": len(groups)}


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise FormatError("rows file is truncated")
    return b


def _read_len(f: BinaryIO, what: str) -> int:
    n: int = _I32.unpack(_read(f, 4))[0]
    if not 0 <= n <= MAX_LEN:
        raise FormatError(f"{what}: bad length {n}")
    return n


def _payload(f: BinaryIO, tag: int, depth: int) -> Any:
    if tag == NULL:
        return None
    if tag == INTEGER:
        return _I64.unpack(_read(f, 8))[0]
    if tag == TEXT:
        return _read(f, _read_len(f, "text")).decode()
    if tag == BLOB:
        return _read(f, _read_len(f, "blob"))
    if tag == DATE:
        return dt.date.fromordinal(_I32.unpack(_read(f, 4))[0] + _EPOCH_ORDINAL)
    if tag == BOOLEAN:
        return _read(f, 1) != b"\x00"
    if tag == DOUBLE:
        return _F64.unpack(_read(f, 8))[0]
    if tag in (MAP, LIST, SET):
        if depth >= MAX_DEPTH:
            raise FormatError(f"collections nested deeper than {MAX_DEPTH}")
        n = _read_len(f, "collection")
        if tag == MAP:
            out: dict[Any, Any] = {}
            for _ in range(n):
                k = _payload(f, _read(f, 1)[0], depth + 1)
                out[k] = _payload(f, _read(f, 1)[0], depth + 1)
            return out
        items = [_payload(f, _read(f, 1)[0], depth + 1) for _ in range(n)]
        try:
            return items if tag == LIST else set(items)
        except TypeError as exc:
            raise FormatError(f"set of unhashable values: {exc}") from None
    raise FormatError(f"unknown value tag {tag}")


def read_rows_file(path: str | os.PathLike[str]) -> tuple[list[str], list[tuple[int, int, tuple[Any, ...]]]]:
    """The statements and rows of a rows file (group keys as the file's ints); FormatError if malformed."""
    with open(path, "rb") as f:
        if _read(f, 4) != MAGIC:
            raise FormatError("not a rows file")
        (version,) = _I32.unpack(_read(f, 4))
        if version != VERSION:
            raise FormatError(f"rows file version {version}, expected {VERSION}")
        (count,) = _I32.unpack(_read(f, 4))
        if not 0 < count <= MAX_STATEMENTS:
            raise FormatError(f"bad statement count {count}")
        statements = [_read(f, _read_len(f, "statement")).decode() for _ in range(count)]
        rows: list[tuple[int, int, tuple[Any, ...]]] = []
        while True:
            (index,) = _I32.unpack(_read(f, 4))
            if index == -1:
                break
            if not 0 <= index < count:
                raise FormatError(f"row {len(rows)}: statement {index}")
            _, group, nv = _HEAD.unpack(_I32.pack(index) + _read(f, 10))
            if nv < 0:
                raise FormatError(f"row {len(rows)}: {nv} values")
            try:
                values = [_payload(f, _read(f, 1)[0], 0) for _ in range(nv)]
            except FormatError as exc:
                raise FormatError(f"row {len(rows)}: {exc}") from None
            rows.append((index, group, tuple(values)))
        (trailer,) = _I64.unpack(_read(f, 8))
        if trailer != len(rows):
            raise FormatError(f"trailer says {trailer} rows, read {len(rows)}")
    return statements, rows


def chunk_requests(rows: Sequence[Row], batch: int) -> list[list[Row]]:
    """The requests of ``rows``, exactly as RawWrite.java cuts them: each group (in order of first
    appearance) in chunks of at most ``batch``; ``batch`` <= 1 sends every row alone."""
    if batch <= 1:
        return [[r] for r in rows]
    groups: dict[Hashable, list[Row]] = {}
    for r in rows:
        groups.setdefault(r[1], []).append(r)
    return [members[i : i + batch] for members in groups.values() for i in range(0, len(members), batch)]


def _proc_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _machine_busy_ticks() -> int | None:
    """Busy clock ticks of every core since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        return cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7]
    except (OSError, IndexError, ValueError):
        return None


class Snapshot(NamedTuple):
    wall: float
    cpu: float
    """CPU seconds of this process, every thread of it (the drivers' I/O threads are in-process)."""
    server_pid: int | None
    server_ticks: int | None
    busy_ticks: int | None


def cpu_snapshot(server_pid: int | None) -> Snapshot:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return Snapshot(
        time.perf_counter(),
        ru.ru_utime + ru.ru_stime,
        server_pid,
        _proc_ticks(server_pid) if server_pid else None,
        _machine_busy_ticks(),
    )


def _delta(a: int | None, b: int | None) -> float | None:
    return (b - a) / os.sysconf("SC_CLK_TCK") if a is not None and b is not None else None


def measured(rows: int, requests: int, before: Snapshot, errors: int, first_error: str | None) -> dict[str, Any]:
    """One run's figures since the ``before`` snapshot."""
    after = cpu_snapshot(before.server_pid)
    wall, cpu = after.wall - before.wall, after.cpu - before.cpu
    return {
        "rows": rows,
        "requests": requests,
        "wall_s": wall,
        "rows_per_s": rows / wall if wall else 0.0,
        "client_cpu_s": cpu,
        "client_cpu_us_per_row": 1e6 * cpu / rows if rows else 0.0,
        "server_cpu_s": _delta(before.server_ticks, after.server_ticks),
        # CPU of the whole machine in the same window: what is left after client and server is the
        # noise of whatever else ran (other engineers' tests), which wall rates depend on.
        "machine_busy_s": _delta(before.busy_ticks, after.busy_ticks),
        "errors": errors,
        "first_error": first_error,
    }


def driver_write(
    session: Any, prepared: Sequence[Any], rows: Sequence[Row], batch: int, inflight: int, server_pid: int | None = None
) -> dict[str, Any]:
    """Write ``rows`` with cassandra-driver (or scylla-driver: the same ``cassandra`` module) the way
    RawWrite.java does: UNLOGGED batches of at most ``batch`` per group, a chunk of one as a plain
    statement, ``inflight`` requests outstanding (execute_concurrent). Client CPU is getrusage(SELF):
    the driver's I/O thread is in this process, so it is counted."""
    from cassandra.concurrent import execute_concurrent
    from cassandra.query import BatchStatement, BatchType

    before = cpu_snapshot(server_pid)
    requests: list[tuple[Any, Sequence[Any]]] = []
    for chunk in chunk_requests(rows, batch):
        if len(chunk) == 1:
            requests.append((prepared[chunk[0][0]], chunk[0][2]))
            continue
        b = BatchStatement(batch_type=BatchType.UNLOGGED)
        for index, _, values in chunk:
            b.add(prepared[index], values)
        requests.append((b, ()))
    results = execute_concurrent(session, requests, concurrency=inflight, raise_on_first_error=False)
    failures = [r.result_or_exc for r in results if not r.success]
    return measured(len(rows), len(requests), before, len(failures), repr(failures[0]) if failures else None)


async def _acsylla_write(
    session: Any,
    prepared: Sequence[Any],
    rows: Sequence[Row],
    batch: int,
    inflight: int,
    timeout_s: float,
    server_pid: int | None,
) -> dict[str, Any]:
    import asyncio

    import acsylla

    chunks = chunk_requests(rows, batch)
    before = cpu_snapshot(server_pid)
    todo = iter(chunks)
    errors: list[BaseException] = []

    def bound(row: Row) -> Any:
        st = prepared[row[0]].bind()
        st.bind_list(list(row[2]))
        return st

    async def sender() -> None:
        # One shared iterator, `inflight` coroutines: at most that many requests outstanding.
        for chunk in todo:
            try:
                if len(chunk) == 1:
                    await session.execute(bound(chunk[0]))
                else:
                    b = acsylla.create_batch_unlogged()
                    for row in chunk:
                        b.add_statement(bound(row))
                    await session.execute_batch(b)
            except Exception as exc:
                errors.append(exc)

    try:
        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(inflight))), timeout_s)
    except TimeoutError:
        errors.append(TimeoutError(f"acsylla: not every request answered within {timeout_s} s"))
    return measured(len(rows), len(chunks), before, len(errors), repr(errors[0]) if errors else None)


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        vals = [r[k] for r in runs if isinstance(r.get(k), int | float)]
        out[k] = statistics.median(vals) if len(vals) == len(runs) and not isinstance(v, bool) else v
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _result(protocol: int, asked: int, batch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"protocol": protocol, "asked_protocol": asked, "batch": batch, "runs": runs, "median": _median(runs)}


def _bench_cassandra(args: argparse.Namespace, statements: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    import logging

    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile

    # A batch across partitions draws a server warning that the driver logs once per response.
    logging.getLogger("cassandra").setLevel(logging.ERROR)
    out = []
    for protocol in args.protocol:
        profile = ExecutionProfile(
            consistency_level=getattr(ConsistencyLevel, args.consistency), request_timeout=args.request_timeout_s
        )
        cluster = Cluster(
            args.hosts.split(","),
            port=args.port,
            protocol_version=protocol,
            connect_timeout=10,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        )
        try:
            session = cluster.connect()
            negotiated = cluster.protocol_version
            prepared = [session.prepare(cql) for cql in statements]
            for p in prepared:
                p.is_idempotent = True
            for b in args.batch:
                runs = [
                    driver_write(session, prepared, rows, b, args.inflight, args.server_pid) for _ in range(args.runs)
                ]
                out.append(_result(negotiated, protocol, b, runs))
        except Exception as exc:
            out.append({"asked_protocol": protocol, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            cluster.shutdown()
    return out


def _bench_acsylla(args: argparse.Namespace, statements: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    import asyncio

    import acsylla

    async def one(protocol: int) -> list[dict[str, Any]]:
        cluster = acsylla.create_cluster(
            args.hosts.split(","),
            port=args.port,
            # The C++ driver knows v5 only as its pre-release beta: asking for 5 is refused outright,
            # so v5 means "the newest beta", which is what a server speaking final v5 is offered.
            protocol_version=protocol if protocol < 5 else None,
            use_beta_protocol_version=protocol >= 5,
            consistency=args.consistency,
            connect_timeout=10.0,
            request_timeout=args.request_timeout_s,
        )
        session = await asyncio.wait_for(cluster.create_session(), 30)
        try:
            prepared = [await asyncio.wait_for(session.create_prepared(cql), 30) for cql in statements]
            res = []
            for b in args.batch:
                runs = [
                    await _acsylla_write(session, prepared, rows, b, args.inflight, args.timeout_s, args.server_pid)
                    for _ in range(args.runs)
                ]
                res.append(_result(protocol, protocol, b, runs))
            return res
        finally:
            await asyncio.wait_for(session.close(), 30)

    out: list[dict[str, Any]] = []
    for protocol in args.protocol:
        try:
            out.extend(asyncio.run(one(protocol)))
        except Exception as exc:
            out.append({"asked_protocol": protocol, "error": f"{type(exc).__name__}: {exc}"})
    return out


_DRIVERS: dict[str, Callable[[argparse.Namespace, list[str], list[Row]], list[dict[str, Any]]]] = {
    "cassandra-driver": _bench_cassandra,
    "scylla-driver": _bench_cassandra,
    "acsylla": _bench_acsylla,
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Client CPU per written row of one CQL driver (prints one JSON document).")
    p.add_argument("--driver", required=True, choices=sorted(_DRIVERS))
    p.add_argument("--rows-file", required=True, help="written by `ohs bench drivers` / bench.raw.write_rows_file")
    p.add_argument("--hosts", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9042)
    p.add_argument("--batch", type=_ints, default=[1, 100], help="comma-separated; 1 = one statement per request")
    p.add_argument("--protocol", type=_ints, default=[4, 5], help="comma-separated protocol versions")
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--consistency", default="LOCAL_ONE")
    p.add_argument("--server-pid", type=int, default=None, help="Cassandra's pid: its CPU over each run from /proc")
    p.add_argument("--request-timeout-s", type=float, default=30.0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="bound of one run (acsylla)")
    args = p.parse_args(argv)
    if not 1 <= args.inflight <= 1024 or args.runs < 1 or not args.batch or min(args.batch) < 1:
        p.error("need 1 <= --inflight <= 1024, --runs >= 1, every --batch >= 1")
    dist = "acsylla" if args.driver == "acsylla" else args.driver
    version = _installed(dist)
    if version is None:
        p.error(f"{dist} is not installed in {sys.prefix}")
    if args.driver != "acsylla":
        other = "scylla-driver" if args.driver == "cassandra-driver" else "cassandra-driver"
        if _installed(other):
            p.error(f"{other} is installed too in {sys.prefix}: both provide `cassandra`, use a venv with one")
    statements, rows = read_rows_file(args.rows_file)
    results = _DRIVERS[args.driver](args, statements, list(rows))
    doc = {
        "driver": args.driver,
        "version": version,
        "python": sys.version.split()[0],
        "rows": len(rows),
        "inflight": args.inflight,
        "consistency": args.consistency,
        "results": results,
    }
    print(json.dumps(doc))
    return 0 if all("error" not in r and r["median"]["errors"] == 0 for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
