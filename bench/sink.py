"""``ohs bench sink``: the worker alone (a pre-filled topic -> Cassandra), beside the raw limits of
the same rows measured in the same run.

* the worker: a real ``ohs worker`` (Faust) on a fresh group, topic and keyspace; the topic is
  filled beforehand by an idempotent producer (a benchmark measures the worker, not a reordering
  accident), and the bridge's checkpoint record covering every seq is written, so the worker's seq
  guard runs as in production. Timed from its first write to its last; CPU seconds of its
  process from /proc over the same window; rows and requests from its own counters.
* raw (a), the same driver with the same batching: the worker's sink (``AcsyllaSink``) writing
  the same updates in batches of the worker's ``batch_size``, one batch at a time, no Kafka, no
  Faust.
* raw (b), a JVM client (``bench/jvm/RawWrite.java`` on the DataStax Java driver of Cassandra's own
  ``lib/``): the same rows, UNLOGGED batches per replica set, 32 requests in flight — a client that
  costs almost nothing, so its rate is the database's limit on this machine.

Every throughput is printed as a ratio of (b). CPU seconds per update are the stable figures on a
shared 2-core machine; rates move with whatever else runs (``machine`` notes the load average).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bench.errors import BenchError
from bench.kit import engine_events, metric, proc_cpu_seconds

__all__ = ["bench_sink", "raw_cassandra", "run_worker"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cassandra_cpu() -> float:
    from bench.raw import _cassandra_pid

    pid = _cassandra_pid()
    return proc_cpu_seconds(pid) if pid else 0.0


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _updates(n: int) -> list[Any]:
    from schemas.events import OrderUpdate

    out: list[Any] = []
    k = n * 3
    while len(out) < n:
        out = [e for e in engine_events(k) if isinstance(e, OrderUpdate)][:n]
        k *= 2
    return out


# ---------------------------------------------------------------------------------- raw limits
def raw_cassandra(n_updates: int, *, jvm: bool = True) -> dict[str, Any]:
    """Raw limits of the worker's rows for ``n_updates`` updates: (a) the worker's own sink and
    driver with its batching, (b) the JVM client. Fresh keyspaces, dropped after."""
    from schemas.codec import encode
    from streams.acsylla_sink import AcsyllaSink
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import connect, stats_rows
    from streams.state import ALL_SYMBOLS, UserState, Verdict

    s = WorkerSettings()
    updates = _updates(n_updates)
    cluster, session = connect(s)
    out: dict[str, Any] = {"updates": len(updates)}
    try:
        # (a) the sink itself.
        ks = f"bench_rawa_{uuid.uuid4().hex[:8]}"
        migrate(session, s, ks)
        states: dict[int, UserState] = {}
        chunks = []
        for i in range(0, len(updates), s.batch_size):
            applied: list[Any] = []
            touched: dict[int, set[str]] = {}
            for e in updates[i : i + s.batch_size]:
                if states.setdefault(e.user_id, UserState()).apply(e) is Verdict.APPLIED:
                    applied.append((e, encode(e)))
                    touched.setdefault(e.user_id, set()).add(e.symbol)
            stats = [r for u, sy in touched.items() for r in stats_rows(u, states[u], (*sorted(sy), ALL_SYMBOLS))]
            chunks.append((applied, stats))

        async def sink_run() -> dict[str, Any]:
            sink = await AcsyllaSink.open(s, cluster, ks)
            try:
                rows = requests = 0
                c0, s0, t0 = _self_cpu(), _cassandra_cpu(), time.perf_counter()
                for applied, stats in chunks:
                    pending = sink.statements(applied, stats)
                    rows, requests = rows + pending.rows, requests + len(pending.requests)
                    await sink.write(pending)
                wall = time.perf_counter() - t0
                return {
                    "updates_s": len(updates) / wall,
                    "rows": rows,
                    "requests": requests,
                    "client_us_per_row": 1e6 * (_self_cpu() - c0) / rows,
                    "cassandra_us_per_update": 1e6 * (_cassandra_cpu() - s0) / len(updates),
                }
            finally:
                await sink.close()

        out["sink"] = asyncio.run(sink_run())
        session.execute(f"DROP KEYSPACE {ks}", timeout=120)
        # (b) the JVM client on the same rows.
        if jvm:
            out["jvm"] = _jvm(s, session, cluster, len(updates))
    finally:
        cluster.shutdown()
    return out


def _jvm(s: Any, session: Any, cluster: Any, n_updates: int) -> dict[str, Any]:
    from bench.raw import _cassandra_pid, group_rows, run_jvm, sink_rows, write_rows_file
    from streams.migrate import migrate

    ks = f"bench_rawb_{uuid.uuid4().hex[:8]}"
    migrate(session, s, ks)
    cluster.refresh_schema_metadata(max_schema_agreement_wait=30)
    try:
        made = sink_rows(session, s, ks, 1, None)
        # sink_rows grows to n_rows; ask for the rows of exactly these updates' batches.
        target = max(1, int(n_updates * len(made.rows) / max(made.updates, 1)))
        made = sink_rows(session, s, ks, target, None)
        rows = group_rows(made.rows, "replica", made.prepared, cluster)
        with tempfile.TemporaryDirectory(prefix="ohs-bench-jvm-") as tmp:
            path = Path(tmp) / "rows.bin"
            write_rows_file(path, made.statements, rows)
            doc = run_jvm(path, s.hosts, s.cql_port, 200, 32, "LOCAL_QUORUM", server_pid=_cassandra_pid())
        if doc.get("errors"):
            raise BenchError(f"the JVM client saw {doc['errors']} errors, e.g. {doc.get('first_error')}")
        per_update = len(rows) / made.updates
        return {
            "updates_s": doc["rows_per_s"] / per_update,
            "rows": len(rows),
            "rows_per_update": per_update,
            "cassandra_us_per_update": 1e6 * (doc.get("server_cpu_s") or 0.0) / made.updates,
        }
    finally:
        session.execute(f"DROP KEYSPACE {ks}", timeout=120)


# ------------------------------------------------------------------------------------ the worker
@dataclass
class WorkerRun:
    updates: int
    wall_s: float
    cpu_s: float
    rows: float
    requests: float
    batches: float
    cassandra_cpu_s: float

    def figures(self) -> dict[str, float]:
        return {
            "updates_s": self.updates / self.wall_s,
            "worker_us_per_update": 1e6 * self.cpu_s / self.updates,
            "rows_per_update": self.rows / self.updates,
            "requests_per_update": self.requests / self.updates,
            "records_per_batch": self.updates / max(self.batches, 1),
            "cassandra_us_per_update": 1e6 * self.cassandra_cpu_s / self.updates,
        }


def run_worker(n_updates: int, timeout_s: float = 600.0) -> WorkerRun:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from schemas.checkpoint import Checkpoint
    from schemas.codec import encode
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import connect

    s = WorkerSettings()
    updates = _updates(n_updates)
    tag = uuid.uuid4().hex[:8]
    topic, checkpoint, ks = f"bench.sink.{tag}", f"bench.sink.cp.{tag}", f"bench_sink_{tag}"
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, s.partitions, 1), NewTopic(checkpoint, 1, 1, config={"cleanup.policy": "compact"})]
    )
    for fut in futures.values():
        fut.result(30)
    producer = Producer(
        {
            "bootstrap.servers": s.kafka_bootstrap,
            "enable.idempotence": True,  # no reordering, no duplicates: the worker is measured
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    last = max(e.seq for e in updates)
    cp = Checkpoint(updates[0].epoch, last, last)
    producer.produce(checkpoint, cp.to_bytes(), f"bench-{tag}".encode())
    for e in updates:
        headers: list[tuple[str, str | bytes | None]] = [("epoch", str(e.epoch).encode()), ("seq", str(e.seq).encode())]
        while True:
            try:
                producer.produce(topic, encode(e), str(e.user_id).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise BenchError(f"the pre-fill of {topic} was not acknowledged in 120 s")
    cluster, session = connect(s)
    migrate(session, s, ks)  # schema creation is not part of the measurement
    web = _port()
    env = {
        **os.environ,
        "OHS_WORKER_TOPIC_UPDATES": topic,
        "OHS_WORKER_TOPIC_CHECKPOINT": checkpoint,
        "OHS_WORKER_BRIDGE_ID": f"bench-{tag}",
        "OHS_WORKER_TOPIC_DLQ": f"bench.sink.dlq.{tag}",
        "OHS_KEYSPACE": ks,
        "OHS_WORKER_GROUP": f"bench-{tag}",
        "OHS_WORKER_WEB_PORT": str(web),
    }
    with tempfile.TemporaryDirectory(prefix="ohs-bench-sink-") as cwd:
        log = Path(cwd) / "worker.log"
        with log.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "ohs.cli", "worker"], env=env, cwd=cwd, stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + timeout_s
            cpu0 = t0 = s0 = None
            applied = first = 0.0
            while applied < len(updates):
                if proc.poll() is not None:
                    raise BenchError(f"the worker exited ({proc.returncode}): {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise BenchError(f"the worker applied {applied:.0f} of {len(updates)} updates in {timeout_s:.0f} s")
                time.sleep(0.05)
                try:
                    applied = metric(web, "ohs_worker_applied_total")
                except OSError:
                    continue
                if cpu0 is None and applied > 0:
                    # From its first write: start-up and the group join are not the worker's rate.
                    cpu0, t0, s0 = proc_cpu_seconds(proc.pid), time.perf_counter(), _cassandra_cpu()
                    first = applied
            assert cpu0 is not None and t0 is not None and s0 is not None
            wall, cpu = time.perf_counter() - t0, proc_cpu_seconds(proc.pid) - cpu0
            cass = _cassandra_cpu() - s0
            rows = metric(web, "ohs_worker_rows_total")
            requests = metric(web, "ohs_worker_cql_requests_total")
            batches = metric(web, "ohs_worker_batch_records_count")
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    session.execute(f"DROP KEYSPACE {ks}", timeout=120)
    cluster.shutdown()
    counted = len(updates) - first  # the first batch's work is before the window
    return WorkerRun(int(counted), wall, cpu, rows * counted / len(updates), requests * counted / len(updates),
                     batches, cass)  # fmt: skip


# ----------------------------------------------------------------------------------- the command
def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@click.command("sink")
@click.option("--events", "n", default=50_000, show_default=True, help="Order updates per run.")
@click.option("--runs", default=3, show_default=True)
@click.option("--no-jvm", is_flag=True, help="Skip the JVM raw limit (no javac or no Cassandra lib/).")
@click.option("--json", "as_json", is_flag=True)
def bench_sink(n: int, runs: int, no_jvm: bool, as_json: bool) -> None:
    """The worker from a pre-filled topic into Cassandra, beside the raw limits of the same rows."""
    worker_runs, raw_runs = [], []
    for _ in range(runs):
        raw_runs.append(raw_cassandra(n, jvm=not no_jvm))
        worker_runs.append(run_worker(n).figures())
    fig = {k: _med([r[k] for r in worker_runs]) for k in worker_runs[0]}
    sink = {
        k: _med([r["sink"][k] for r in raw_runs]) for k in ("updates_s", "client_us_per_row", "cassandra_us_per_update")
    }
    jvm = (
        {k: _med([r["jvm"][k] for r in raw_runs]) for k in ("updates_s", "cassandra_us_per_update")}
        if not no_jvm
        else {}
    )
    doc = {"bench": "sink", "updates": n, "runs": runs, "load_average": os.getloadavg(), "worker": fig,
           "worker_runs": worker_runs, "raw_sink": sink, "raw_jvm": jvm, "raw_runs": raw_runs}  # fmt: skip
    if as_json:
        click.echo(json.dumps(doc))
        return
    limit = jvm.get("updates_s")

    def ratio(v: float) -> str:
        return f"  = {100 * v / limit:.0f}% of the JVM raw limit" if limit else ""

    click.echo(f"== sink: {n:,} order updates per run, median of {runs}; load average {os.getloadavg()[0]:.1f}")
    if limit:
        click.echo(f"raw (b) JVM client, same rows, batches of 200 per replica set  {limit:>10,.0f} upd/s"
                   f"   Cassandra {jvm['cassandra_us_per_update']:.0f} µs/update")  # fmt: skip
    click.echo(f"raw (a) the worker's sink and driver alone                      {sink['updates_s']:>10,.0f} upd/s"
               f"{ratio(sink['updates_s'])}   client {sink['client_us_per_row']:.1f} µs/row")  # fmt: skip
    click.echo(f"worker (Faust) topic -> Cassandra                              {fig['updates_s']:>10,.0f} upd/s"
               f"{ratio(fig['updates_s'])}")  # fmt: skip
    click.echo(f"worker CPU per update {fig['worker_us_per_update']:.0f} µs; rows/update {fig['rows_per_update']:.2f}; "
               f"CQL requests/update {fig['requests_per_update']:.3f}; records/batch {fig['records_per_batch']:.0f}; "
               f"Cassandra CPU {fig['cassandra_us_per_update']:.0f} µs/update")  # fmt: skip
