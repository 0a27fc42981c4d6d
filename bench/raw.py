"""Raw Cassandra write limits of the worker's own rows (issue 13, item 5) and the driver comparison
(item 2): ``ohs bench raw-cql`` and ``ohs bench drivers``.

The rows come from the sink itself (``sink_rows``: the one function to change when the sink changes),
so the limit is always that of the statements the worker really sends. They are written to a rows file
(``bench.drivers``: format and reader, standard library only) that three clients read:

- ``RawWrite.java``, a JVM client on the DataStax Java driver 3.x from Cassandra's own ``lib/``
  (compiled here with ``javac``, cached by source hash): the honest raw limit, a client that costs
  almost nothing, so the figure is the database's;
- ``python_batched``: cassandra-driver with the very same batching;
- ``python bench/drivers.py`` in one venv per driver (cassandra-driver, scylla-driver, acsylla).

Throughput figures on the shared 2-core machine depend on whatever else runs; CPU seconds per row
(client: getrusage / the JVM's process CPU; Cassandra: /proc/<pid>/stat) are the stable figures, and
every run reports how busy the whole machine was in the same window.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bench.drivers import Row, chunk_requests, driver_write, write_rows_file
from bench.errors import BenchError

if TYPE_CHECKING:
    from stack.settings import StackSettings

__all__ = [
    "RawBenchError",
    "SinkRows",
    "bench_drivers",
    "bench_raw_cql",
    "cassandra_lib",
    "compile_jvm",
    "group_rows",
    "python_batched",
    "run_jvm",
    "sink_rows",
    "write_rows_file",
]

_JAVAC_TIMEOUT_S = 180.0
_LOGBACK = """<configuration>
  <appender name="ERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %logger{20} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="ERR"/></root>
</configuration>
"""


class RawBenchError(BenchError, RuntimeError):
    """A raw-limit measurement that could not be made (no JDK, no Cassandra lib, a client that failed)."""

    retriable = False


# --- the JVM client -------------------------------------------------------------------------------


def _stack_settings() -> StackSettings:
    from stack.settings import StackSettings

    return StackSettings()


def cassandra_lib() -> Path:
    """The local stack's Cassandra ``lib/`` (the Java driver ships in it); RawBenchError if absent."""
    s = _stack_settings()
    lib = s.cache_dir / f"cassandra-{s.cassandra_version}" / "lib"
    if not any(lib.glob("cassandra-driver-core-*.jar")):
        raise RawBenchError(
            f"no DataStax Java driver (cassandra-driver-core-*.jar) under {lib}: `ohs stack up` fetches it"
        )
    return lib


def _java() -> tuple[str, str]:
    java = _stack_settings().java
    javac = Path(shutil.which(java) or java).resolve().parent / "javac"
    if not javac.exists():
        found = shutil.which("javac")
        if found is None:
            raise RawBenchError(f"no javac beside {java} nor on PATH: the JVM client needs a JDK 17+")
        javac = Path(found)
    return java, str(javac)


def jvm_source() -> bytes:
    return resources.files("bench").joinpath("jvm", "RawWrite.java").read_bytes()


def compile_jvm(lib: Path | None = None) -> Path:
    """The directory of the compiled RawWrite class (and its logback.xml), compiled once per source
    and driver under ``<stack cache>/jvm-bench/<hash>``."""
    lib = lib or cassandra_lib()
    _, javac = _java()
    source = jvm_source()
    driver = sorted(p.name for p in lib.glob("cassandra-driver-core-*.jar"))
    key = hashlib.sha256(source + "\0".join([str(lib), *driver, javac]).encode()).hexdigest()[:16]
    root = _stack_settings().cache_dir / "jvm-bench"
    out = root / key
    if (out / "RawWrite.class").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        (staging / "RawWrite.java").write_bytes(source)
        (staging / "logback.xml").write_text(_LOGBACK)
        cmd = [
            javac,
            "--release",
            "17",
            "-nowarn",
            "-cp",
            f"{lib}/*",
            "-d",
            str(staging),
            str(staging / "RawWrite.java"),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_JAVAC_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RawBenchError(f"javac did not finish within {_JAVAC_TIMEOUT_S:.0f} s") from exc
        if proc.returncode != 0 or not (staging / "RawWrite.class").exists():
            raise RawBenchError(f"javac failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        try:
            staging.rename(out)  # atomic: a concurrent compile of the same key loses the race harmlessly
        except OSError:
            if not (out / "RawWrite.class").exists():
                raise
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                return None
            return doc if isinstance(doc, dict) else None
    return None


def run_jvm(
    path: str | os.PathLike[str],
    hosts: Sequence[str],
    port: int,
    batch: int,
    inflight: int,
    consistency: str = "LOCAL_ONE",
    *,
    protocol: int = 4,
    warmup_requests: int = 0,
    timeout_s: float = 600.0,
    server_pid: int | None = None,
    check: bool = False,
) -> dict[str, Any]:
    """Run RawWrite on a rows file; its JSON result (``errors``/``timed_out`` say whether all went
    in). ``check``: parse the file and count requests only, no server."""
    lib = cassandra_lib()
    classes = compile_jvm(lib)
    java, _ = _java()
    cmd = [
        java,
        "-Xmx2g",
        f"-Dlogback.configurationFile={classes / 'logback.xml'}",
        # Driver 3.x logs every server warning (a batch across partitions draws one) at WARN.
        "-Dcom.datastax.driver.DISABLE_QUERY_WARNING_LOGS=true",
        "-cp",
        f"{classes}{os.pathsep}{lib}/*",
        "RawWrite",
        "--file",
        str(path),
        "--hosts",
        ",".join(hosts),
        "--port",
        str(port),
        "--batch",
        str(batch),
        "--inflight",
        str(inflight),
        "--consistency",
        consistency,
        "--protocol",
        str(protocol),
        "--warmup",
        str(warmup_requests),
        "--timeout-s",
        str(timeout_s),
        "--server-pid",
        str(server_pid or 0),
        "--clk-tck",
        str(os.sysconf("SC_CLK_TCK")),
        "--check",
        str(check).lower(),
    ]
    bound = timeout_s + 60  # the client's own deadline plus JVM start, connect and close
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bound, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RawBenchError(f"the JVM client gave no result within {bound:.0f} s (file {path})") from exc
    doc = _last_json(proc.stdout)
    if doc is None:
        raise RawBenchError(f"the JVM client printed no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    doc["exit_code"] = proc.returncode
    if proc.returncode != 0:
        doc["stderr_tail"] = proc.stderr[-2000:]
    return doc


# --- the Python client ----------------------------------------------------------------------------


def python_batched(
    session: Any,
    prepared: Sequence[Any],
    rows: Sequence[Row],
    batch: int,
    inflight: int,
    *,
    warmup_requests: int = 0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """The rows by cassandra-driver with RawWrite's batching (``bench.drivers.driver_write``):
    UNLOGGED batches of at most ``batch`` per group key, ``inflight`` requests outstanding
    (execute_concurrent). Client CPU from getrusage(RUSAGE_SELF), which counts the driver's I/O
    thread (it runs in this process)."""
    import cassandra

    if warmup_requests:
        warm = [r for chunk in chunk_requests(rows, batch)[:warmup_requests] for r in chunk]
        driver_write(session, prepared, warm, batch, inflight)
    doc = driver_write(session, prepared, rows, batch, inflight, server_pid)
    return {
        "client": "python",
        "driver": f"cassandra-driver {cassandra.__version__}",
        "protocol": session.cluster.protocol_version,
        "batch": batch,
        "inflight": inflight,
        "warmup_requests": warmup_requests,
        **doc,
    }


# --- rows of the sink -----------------------------------------------------------------------------


@dataclass
class SinkRows:
    statements: list[str]
    """CQL of each prepared statement, by index."""
    prepared: list[Any]
    rows: list[Row]
    """(statement index, the sink's partition group, bound values)."""
    updates: int
    """Order updates these rows are the writes of."""


def sink_rows(session: Any, s: Any, keyspace: str, n_rows: int, records_per_batch: int | None = None) -> SinkRows:
    """At least ``n_rows`` rows, exactly as the worker's sink writes them for the engine's seeded flow,
    batch by batch of ``records_per_batch`` order updates (default: the worker's ``batch_size``; the
    sink writes an order's history once per batch, so the batch size changes the rows).

    The adapter to the sink: the only code here that knows its interface (today
    ``CassandraSink.triples(applied, stats)`` -> (group, prepared, params), with the statistics rows
    the processor adds for the users and symbols a batch touched); a new sink needs only this changed."""
    from bench.kit import engine_events
    from schemas.codec import encode
    from schemas.events import OrderUpdate
    from streams.sink import CassandraSink, stats_rows
    from streams.state import ALL_SYMBOLS, UserState, Verdict

    sink = CassandraSink(session, s, keyspace)
    per_batch = records_per_batch or s.batch_size
    n_events = max(1000, n_rows)
    while True:
        updates = [e for e in engine_events(n_events) if isinstance(e, OrderUpdate)]
        states: dict[int, UserState] = {}
        k = 0
        triples: list[Any] = []
        # Whole batches only: the first batches of the flow until there are n_rows rows.
        while k < len(updates) and len(triples) < n_rows:
            part = updates[k : k + per_batch]
            k += len(part)
            applied = []
            touched: dict[int, set[str]] = {}
            for e in part:
                if states.setdefault(e.user_id, UserState()).apply(e) is Verdict.APPLIED:
                    applied.append((e, encode(e)))
                    touched.setdefault(e.user_id, set()).add(e.symbol)
            stats = [
                row for u, syms in touched.items() for row in stats_rows(u, states[u], (*sorted(syms), ALL_SYMBOLS))
            ]
            triples += sink.triples(applied, stats)
        if len(triples) >= n_rows:
            break
        n_events *= 2
    index: dict[int, int] = {}
    prepared: list[Any] = []
    rows: list[Row] = []
    for group, stmt, params in triples:
        i = index.get(id(stmt))
        if i is None:
            i = index[id(stmt)] = len(prepared)
            prepared.append(stmt)
        rows.append((i, group, tuple(params)))
    return SinkRows([p.query_string for p in prepared], prepared, rows, k)


def group_rows(rows: Sequence[Row], mode: str, prepared: Sequence[Any] = (), cluster: Any = None) -> list[Row]:
    """The rows with the group key a client batches by: ``sink`` (the sink's partition group, as is),
    ``replica`` (the replica set owning the row's partition, from the driver's token map: what may
    share an UNLOGGED batch on any cluster; on one node, everything), ``none`` (every row alone)."""
    if mode == "sink":
        return list(rows)
    if mode == "none":
        return [(i, n, v) for n, (i, _, v) in enumerate(rows)]
    if mode != "replica":
        raise ValueError(f"unknown grouping {mode!r}")
    out: list[Row] = []
    replicas_of: dict[tuple[str, bytes], Hashable] = {}
    for i, _, values in rows:
        p = prepared[i]
        rk = p.bind(values).routing_key
        # The statement's own keyspace (PreparedStatement.keyspace is None for a qualified table name).
        ks = p.column_metadata[0].keyspace_name if p.column_metadata else p.keyspace
        key = (ks, rk)
        group = replicas_of.get(key)
        if group is None:
            hosts = cluster.metadata.get_replicas(ks, rk) if rk is not None and ks else []
            group = replicas_of[key] = frozenset(str(h.endpoint) for h in hosts) or ("no-replica", rk)
        out.append((i, group, values))
    return out


_INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)\.(\w+)\s*\(([^)]*)\)", re.IGNORECASE)
_DELETE = re.compile(r"^\s*DELETE\s+FROM\s+(\w+)\.(\w+)", re.IGNORECASE)


def check_target(statements: Sequence[str], rows: Sequence[Row], primary_key: Any) -> tuple[str, str, int]:
    """(keyspace, table, expected row count) of the insert-only table with the most rows: the table a
    run's correctness is checked on (``primary_key(ks, table)`` gives its key column names)."""
    deleted = {(m[1], m[2]) for cql in statements if (m := _DELETE.match(cql))}
    per_table: dict[tuple[str, str], list[int]] = {}
    for i, cql in enumerate(statements):
        m = _INSERT.match(cql)
        if m and (m[1], m[2]) not in deleted:
            per_table.setdefault((m[1], m[2]), []).append(i)
    if not per_table:
        raise RawBenchError("no insert-only table among the statements to check a run against")
    counts = {t: sum(1 for r in rows if r[0] in idx) for t, idx in per_table.items()}
    (ks, table), _ = max(counts.items(), key=lambda kv: kv[1])
    keys: set[tuple[Any, ...]] = set()
    for i in per_table[(ks, table)]:
        cols = [c.strip() for c in _INSERT.match(statements[i]).group(3).split(",")]  # type: ignore[union-attr]
        at = [cols.index(k) for k in primary_key(ks, table)]
        keys.update(tuple(v[j] for j in at) for idx, _, v in rows if idx == i)
    return ks, table, len(keys)


# --- commands -------------------------------------------------------------------------------------


def _cassandra_pid() -> int | None:
    from stack.process import ManagedProcess

    s = _stack_settings()
    return ManagedProcess("cassandra", s.state_dir / "cassandra.pid", s.state_dir / "cassandra" / "console.log").pid()


def _connect(protocol: int, consistency: str) -> tuple[Any, Any, Any]:
    import logging

    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    from streams.settings import WorkerSettings

    # Batches across partitions draw a server warning that the driver would log once per response.
    logging.getLogger("cassandra").setLevel(logging.ERROR)
    s = WorkerSettings()
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        consistency_level=getattr(ConsistencyLevel, consistency),
        request_timeout=30,
    )
    cluster = Cluster(
        s.hosts,
        port=s.cql_port,
        protocol_version=protocol,
        connect_timeout=10,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    try:
        return s, cluster, cluster.connect()
    except Exception as exc:
        cluster.shutdown()
        raise click.ClickException(f"no Cassandra at {s.hosts}:{s.cql_port} (protocol v{protocol}): {exc}") from exc


def _fresh_keyspace(session: Any, cluster: Any, s: Any) -> str:
    from streams.migrate import migrate

    ks = f"bench_raw_{uuid.uuid4().hex[:8]}"
    migrate(session, s, ks)
    cluster.refresh_schema_metadata(max_schema_agreement_wait=30)
    return ks


def _rows(
    session: Any, cluster: Any, s: Any, ks: str, n_rows: int, grouping: str, per_batch: int | None = None
) -> SinkRows:
    made = sink_rows(session, s, ks, n_rows, per_batch)
    made.rows = group_rows(made.rows, grouping, made.prepared, cluster)
    return made


def _med(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return statistics.median(vals) if vals else float("nan")


def _summary(client: str, batch: int, runs: list[dict[str, Any]], rows_per_update: float) -> dict[str, Any]:
    rows = runs[0]["rows"]
    wall = _med(runs, "wall_s")
    # Cores the rest of the machine used meanwhile: the noise that wall rates depend on.
    others = [
        (r["machine_busy_s"] - r["client_cpu_s"] - (r["server_cpu_s"] or 0.0)) / r["wall_s"]
        for r in runs
        if r.get("machine_busy_s") is not None and r["wall_s"]
    ]
    return {
        "client": client,
        "batch": batch,
        "rows": rows,
        "requests": runs[0]["requests"],
        "rows_per_s": _med(runs, "rows_per_s"),
        "updates_per_s": _med(runs, "rows_per_s") / rows_per_update,
        "client_cpu_us_per_row": _med(runs, "client_cpu_us_per_row"),
        "server_cpu_us_per_row": 1e6 * _med(runs, "server_cpu_s") / rows,
        "server_cores": _med(runs, "server_cpu_s") / wall if wall else float("nan"),
        "other_cores": statistics.median(others) if others else float("nan"),
        "errors": sum(int(r["errors"]) for r in runs),
        "runs": runs,
    }


def _print_table(title: str, lines: list[dict[str, Any]], as_json: bool, extra: dict[str, Any]) -> None:
    from bench.kit import machine

    if as_json:
        click.echo(json.dumps({"bench": title, "machine": machine(), **extra, "results": lines}))
        return
    click.echo(f"== {title}  ({machine()['summary']})")
    head = (
        f"{'client':34} {'B':>4} {'requests':>9} {'rows/s':>9} {'upd/s':>8} {'cli us/row':>10} "
        f"{'C* us/row':>9} {'C* cores':>8} {'others':>6} {'err':>4}"
    )
    click.echo(head)
    for ln in lines:
        if "error" in ln:
            click.echo(f"{ln['client']:34} {ln.get('batch', ''):>4}  not measured: {ln['error']}")
            continue
        click.echo(
            f"{ln['client']:34} {ln['batch']:>4} {ln['requests']:>9,} {ln['rows_per_s']:>9,.0f} "
            f"{ln['updates_per_s']:>8,.0f} {ln['client_cpu_us_per_row']:>10.1f} {ln['server_cpu_us_per_row']:>9.1f} "
            f"{ln['server_cores']:>8.2f} {ln['other_cores']:>6.2f} {ln['errors']:>4}"
        )
    click.echo(
        "cli/C* us/row: CPU microseconds per written row of the client and of Cassandra (the stable figures); "
        "C* cores / others: cores Cassandra and everything else on the machine used during the run "
        "(others > 0.3 means a noisy machine: wall rates are low)."
    )


@click.command("raw-cql")
@click.option("--rows", "n_rows", default=120_000, show_default=True, help="Rows (whole order updates' worth).")
@click.option(
    "--batch",
    "batches",
    multiple=True,
    type=int,
    default=(1, 100),
    show_default=True,
    help="Most statements per UNLOGGED batch (repeatable); 1 = one statement per request.",
)
@click.option("--inflight", default=32, show_default=True, help="Requests in flight.")
@click.option("--client", type=click.Choice(["jvm", "python", "both"]), default="both", show_default=True)
@click.option("--consistency", type=click.Choice(["LOCAL_ONE", "LOCAL_QUORUM"]), default="LOCAL_ONE", show_default=True)
@click.option("--protocol", type=click.IntRange(3, 5), default=4, show_default=True, help="CQL protocol version.")
@click.option(
    "--group",
    "grouping",
    type=click.Choice(["replica", "sink", "none"]),
    default="replica",
    show_default=True,
    help="What rows may share a batch: same replica set, the sink's partition group, nothing.",
)
@click.option("--warmup-rows", default=10_000, show_default=True, help="Rows sent (and sent again) before the clock.")
@click.option("--runs", default=1, show_default=True)
@click.option(
    "--sink-batch",
    type=int,
    default=None,
    help="Order updates per sink batch the rows are made in (default: the worker's).",
)
@click.option("--timeout-s", default=600.0, show_default=True, help="Bound of one client run.")
@click.option("--keep-file", type=click.Path(dir_okay=False), default=None, help="Also keep the rows file here.")
@click.option("--json", "as_json", is_flag=True)
def bench_raw_cql(
    n_rows: int,
    batches: tuple[int, ...],
    inflight: int,
    client: str,
    consistency: str,
    protocol: int,
    grouping: str,
    warmup_rows: int,
    runs: int,
    sink_batch: int | None,
    timeout_s: float,
    keep_file: str | None,
    as_json: bool,
) -> None:
    """Raw CQL write limit of the sink's own rows: the JVM client (Java driver from Cassandra's lib/)
    and cassandra-driver, same rows, same batching, into a fresh keyspace (dropped after)."""
    if min(batches) < 1 or not 1 <= inflight <= 1024 or runs < 1:
        raise click.BadParameter("need --batch >= 1, 1 <= --inflight <= 1024, --runs >= 1")
    server_pid = _cassandra_pid()
    s, cluster, session = _connect(protocol, consistency)
    lines: list[dict[str, Any]] = []
    bad: list[str] = []
    ks = ""
    try:
        ks = _fresh_keyspace(session, cluster, s)
        made = _rows(session, cluster, s, ks, n_rows, grouping, sink_batch)

        def primary_key(k: str, t: str) -> list[str]:
            return [c.name for c in cluster.metadata.keyspaces[k].tables[t].primary_key]

        ck_ks, ck_table, expected = check_target(made.statements, made.rows, primary_key)
        rows_per_update = len(made.rows) / made.updates

        def checked(run: dict[str, Any], who: str) -> dict[str, Any]:
            got = session.execute(f"SELECT count(*) FROM {ck_ks}.{ck_table}", timeout=120).one()[0]
            run["check"] = {"table": ck_table, "expected": expected, "found": got}
            if got != expected or run["errors"] or run.get("timed_out"):
                bad.append(
                    f"{who}: {ck_table} has {got} rows, expected {expected}; {run['errors']} errors "
                    f"(first: {run.get('first_error')}); timed out: {bool(run.get('timed_out'))}"
                )
            return run

        def one_run(path: Path, who: str, b: int, warm: int) -> dict[str, Any]:
            # Each run starts from an empty checked table, so each run's count is its own.
            session.execute(f"TRUNCATE {ck_ks}.{ck_table}", timeout=120)
            if who == "jvm":
                return run_jvm(
                    path,
                    s.hosts,
                    s.cql_port,
                    b,
                    inflight,
                    consistency,
                    protocol=protocol,
                    warmup_requests=warm,
                    timeout_s=timeout_s,
                    server_pid=server_pid,
                )
            return python_batched(
                session, made.prepared, made.rows, b, inflight, warmup_requests=warm, server_pid=server_pid
            )

        with tempfile.TemporaryDirectory(prefix="ohs-raw-") as tmp:
            path = Path(tmp) / "rows.bin"
            write_rows_file(path, made.statements, made.rows)
            if keep_file:
                shutil.copyfile(path, keep_file)
            for b in batches:
                warm = math.ceil(warmup_rows / b) if warmup_rows else 0
                for who in ("jvm", "python"):
                    if client not in (who, "both"):
                        continue
                    done = []
                    try:
                        for _ in range(runs):
                            done.append(checked(one_run(path, who, b, warm), f"{who} B={b}"))
                    except RawBenchError as exc:
                        bad.append(f"{who} B={b}: {exc}")
                        lines.append({"client": who, "batch": b, "error": str(exc).splitlines()[0][:200]})
                        continue
                    name = f"{done[0]['driver']} v{done[0]['protocol']}"
                    lines.append(_summary(name, b, done, rows_per_update))
        extra = {
            "rows": len(made.rows),
            "updates": made.updates,
            "rows_per_update": rows_per_update,
            "statements": made.statements,
            "grouping": grouping,
            "inflight": inflight,
            "consistency": consistency,
            "checked_table": ck_table,
            "check_failures": bad,
        }
        title = (
            f"raw-cql: {len(made.rows):,} sink rows ({made.updates:,} order updates, {rows_per_update:.2f} rows each),"
            f" grouped by {grouping}, {inflight} in flight, {consistency}"
        )
        _print_table(title, lines, as_json, extra)
    finally:
        try:
            if ks:
                session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
        finally:
            cluster.shutdown()
    if bad:
        raise click.ClickException("correctness check failed:\n" + "\n".join(bad))


def _venv(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or name not in ("cassandra-driver", "scylla-driver", "acsylla"):
        raise click.BadParameter(f"{spec!r}: expected cassandra-driver=DIR, scylla-driver=DIR or acsylla=DIR")
    py = Path(path) / "bin" / "python"
    if not py.exists():
        raise click.BadParameter(f"no {py}: create it with `python3 -m venv {path} && {path}/bin/pip install {name}`")
    return name, py


@click.command("drivers")
@click.option(
    "--venv",
    "venvs",
    multiple=True,
    required=True,
    metavar="DRIVER=DIR",
    help="A venv holding only that driver (cassandra-driver, scylla-driver, acsylla); repeatable.",
)
@click.option("--rows", "n_rows", default=120_000, show_default=True)
@click.option(
    "--table",
    "tables",
    multiple=True,
    default=("order_history",),
    show_default=True,
    help="Only the sink's rows of these tables (repeatable); 'all' = every row the sink writes.",
)
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 100), show_default=True)
@click.option("--protocol", "protocols", multiple=True, type=int, default=(4, 5), show_default=True)
@click.option("--inflight", default=32, show_default=True)
@click.option("--runs", default=3, show_default=True, help="Median of this many runs per figure.")
@click.option(
    "--group", "grouping", type=click.Choice(["replica", "sink", "none"]), default="replica", show_default=True
)
@click.option("--jvm/--no-jvm", default=True, show_default=True, help="Also the JVM client on the same rows (v4).")
@click.option("--timeout-s", default=1800.0, show_default=True, help="Bound of one driver's whole script.")
@click.option("--json", "as_json", is_flag=True)
def bench_drivers(
    venvs: tuple[str, ...],
    n_rows: int,
    tables: tuple[str, ...],
    batches: tuple[int, ...],
    protocols: tuple[int, ...],
    inflight: int,
    runs: int,
    grouping: str,
    jvm: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Client CPU per written row of cassandra-driver, scylla-driver and acsylla on the sink's rows
    (``python bench/drivers.py`` in each venv), one statement per request and in UNLOGGED batches."""
    envs = [_venv(v) for v in venvs]
    script = resources.files("bench").joinpath("drivers.py")
    server_pid = _cassandra_pid()
    s, cluster, session = _connect(4, "LOCAL_ONE")
    lines: list[dict[str, Any]] = []
    docs: list[dict[str, Any]] = []
    ks = ""
    try:
        ks = _fresh_keyspace(session, cluster, s)
        target = n_rows
        while True:
            made = _rows(session, cluster, s, ks, target, grouping)
            keep = [
                i
                for i, cql in enumerate(made.statements)
                if "all" in tables or any(re.search(rf"\b{ks}\.{t}\b", cql) for t in tables)
            ]
            if not keep:
                raise click.ClickException(f"the sink writes none of the tables {list(tables)}")
            renumber = {old: new for new, old in enumerate(keep)}
            rows = [(renumber[i], g, v) for i, g, v in made.rows if i in renumber]
            if len(rows) >= n_rows:
                break
            # Only some tables: more updates until there are n_rows of theirs.
            target = math.ceil(target * n_rows / max(1, len(rows)) * 1.05)
        statements = [made.statements[i] for i in keep]
        rows_per_update = len(rows) / made.updates
        rows = rows[:n_rows]
        with tempfile.TemporaryDirectory(prefix="ohs-drivers-") as tmp:
            path = Path(tmp) / "rows.bin"
            write_rows_file(path, statements, rows)
            if jvm:
                for b in batches:
                    run = [
                        run_jvm(
                            path,
                            s.hosts,
                            s.cql_port,
                            b,
                            inflight,
                            server_pid=server_pid,
                            warmup_requests=math.ceil(10_000 / b),
                        )
                        for _ in range(runs)
                    ]
                    lines.append(_summary(f"{run[0]['driver']} v4", b, run, rows_per_update))
            with resources.as_file(script) as script_path:
                for name, py in envs:
                    cmd = [
                        str(py),
                        str(script_path),
                        "--driver",
                        name,
                        "--rows-file",
                        str(path),
                        "--hosts",
                        ",".join(s.hosts),
                        "--port",
                        str(s.cql_port),
                        "--batch",
                        ",".join(map(str, batches)),
                        "--protocol",
                        ",".join(map(str, protocols)),
                        "--inflight",
                        str(inflight),
                        "--runs",
                        str(runs),
                        "--server-pid",
                        str(server_pid or 0),
                    ]
                    t0 = time.monotonic()
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
                    except subprocess.TimeoutExpired:
                        lines.append({"client": name, "error": f"no result within {timeout_s:.0f} s"})
                        continue
                    doc = _last_json(proc.stdout)
                    if doc is None:
                        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                        lines.append({"client": name, "error": tail[0]})
                        continue
                    doc["elapsed_s"] = time.monotonic() - t0
                    docs.append(doc)
                    for r in doc["results"]:
                        label = f"{name} {doc['version']} v{r.get('protocol', r['asked_protocol'])}"
                        if "error" in r:
                            lines.append(
                                {"client": f"{name} {doc['version']} v{r['asked_protocol']}", "error": r["error"][:200]}
                            )
                        else:
                            lines.append(_summary(label, r["batch"], r["runs"], rows_per_update))
        title = (
            f"drivers: {len(rows):,} rows of {', '.join(tables)} from the sink, grouped by {grouping}, "
            f"{inflight} in flight, median of {runs}"
        )
        _print_table(
            title, lines, as_json, {"statements": statements, "drivers": docs, "python": sys.version.split()[0]}
        )
    finally:
        try:
            if ks:
                session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
        finally:
            cluster.shutdown()
