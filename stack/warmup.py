"""Warm the JVMs of servers ``ohs stack up`` has just started, before anyone measures them.

A fresh JVM runs its hot paths interpreted, then compiles them with C1 and C2 in background
threads that take the CPU the workload needs. On this project's 2-core machine a fresh stack's
C2 compiler threads used ~22 CPU-seconds in Cassandra and ~10 in Kafka during the first
`make run` (per-thread CPU from ``/proc/<pid>/task/*/stat``, docs/benchmarks.md): a quarter of
the machine during a minute of flow, and the worker fell ~12 s behind where a warm stack kept
it under 4 s. So ``up`` drives both servers through the paths the pipeline uses for
``warmup_s`` seconds (``OHS_WARMUP_S``; 0 skips it), then removes what it wrote:

- Kafka: lz4-compressed, idempotent ``acks=all`` produce in small lingering batches (the
  bridge's settings), a consumer group reading them back and committing as it goes (the worker).
- Kafka: also a compacted topic written by key (the bridge's checkpoint), and the topics'
  creation and deletion (the controller's paths, which the pipeline's first start takes).
- Cassandra: prepared statements with ``USING TIMESTAMP`` in UNLOGGED batches over many
  partitions (the worker's sink): inserts into a narrow and a wide table, map-cell updates and
  row deletions; tables flushed every few seconds, so sstables are written, compacted and read.

Best effort: the servers are already up and healthy, so a warm-up that fails is logged and
``up`` still succeeds. Only the stack's own client libraries are used (the stack imports no
package of the pipeline).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stack.settings import StackSettings

__all__ = ["WARMUP_KEYSPACE", "WARMUP_TOPIC", "WarmupReport", "compiler_cpu_s", "warm_up"]

WARMUP_TOPIC = "__ohs_warmup"
WARMUP_COMPACTED = "__ohs_warmup_compacted"
"""Like the bridge's checkpoint topic: compacted, written by key."""
WARMUP_KEYSPACE = "ohs_warmup"
_CONNECT_S = 10.0
"""How long each client waits to reach its server."""
_KAFKA_RATE = 30_000
"""Records per second the Kafka warm-up produces."""
_VALUE = (b"order-update " * 24)[:280]
"""About an Avro order update's size, repetitive enough for lz4 to find something."""


@dataclass
class WarmupReport:
    seconds: float = 0.0
    kafka_records: int = 0
    """Records produced and read back."""
    cassandra_rows: int = 0
    """Statements written in batches."""
    errors: list[str] = field(default_factory=list)
    """What failed (the warm-up is best effort: failures are only logged)."""


def warm_up(s: StackSettings, seconds: float, servers: set[str], log: Callable[[str], None]) -> WarmupReport:
    """Drive the ``servers`` named ("kafka", "cassandra") for ``seconds``, in parallel; never raises."""
    report = WarmupReport()
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    jobs = {"kafka": _kafka, "cassandra": _cassandra}
    threads = []
    for name in sorted(servers & set(jobs)):

        def work(name: str = name) -> None:
            try:
                jobs[name](s, deadline, report)
            except Exception as exc:  # best effort: the stack is up either way
                first = (str(exc).splitlines() or [""])[0][:200]
                report.errors.append(f"{name}: {type(exc).__name__}: {first}")

        thread = threading.Thread(target=work, name=f"warmup-{name}", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(seconds + 120)  # the clean-up after the deadline is bounded by its own timeouts
    report.seconds = time.monotonic() - t0
    for err in report.errors:
        log(f"warm-up: {err} (the stack is up; only its first minutes are slower)")
    return report


def _kafka(s: StackSettings, deadline: float, report: WarmupReport) -> None:
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    quiet: dict[str, Any] = {"bootstrap.servers": s.kafka_bootstrap, "log_level": 0, **s.kafka_admin_config()}
    admin = AdminClient(quiet)
    existing = admin.list_topics(timeout=_CONNECT_S).topics
    wanted = [
        NewTopic(WARMUP_TOPIC, s.kafka_partitions, 1),
        NewTopic(WARMUP_COMPACTED, 1, 1, config={"cleanup.policy": "compact", "segment.ms": "5000"}),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    for future in (admin.create_topics(missing) if missing else {}).values():
        try:
            future.result(30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    producer = Producer({**quiet, "linger.ms": 5, "compression.type": "lz4", "enable.idempotence": True, "acks": "all"})
    consumer = Consumer(
        {
            **quiet,
            "group.id": "__ohs-warmup",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([WARMUP_TOPIC])
    produced = read = 0
    start = time.monotonic()
    try:
        while time.monotonic() < deadline:
            # A paced flow, about what the pipeline's topics carry at its top rate: unpaced, this
            # loop produced ~165K records/s and left Cassandra's warm-up too little CPU.
            allowed = min(int((time.monotonic() - start) * _KAFKA_RATE), read + 50_000)
            if produced < allowed:
                for i in range(min(2_000, allowed - produced)):
                    key = str((produced + i) % 997).encode()
                    try:
                        producer.produce(WARMUP_TOPIC, key=key, value=_VALUE)
                        if i % 20 == 0:
                            producer.produce(WARMUP_COMPACTED, key=key[-1:], value=_VALUE[:64])
                    except BufferError:
                        producer.poll(0.05)
                        break
                    produced += 1
            producer.poll(0)
            msgs = consumer.consume(2_000, 0.05)
            if msgs:
                read += sum(1 for m in msgs if not m.error())
                consumer.commit(asynchronous=True)
        producer.flush(30)
    finally:
        consumer.close()
        report.kafka_records = read
        for topic, future in admin.delete_topics([WARMUP_TOPIC, WARMUP_COMPACTED]).items():
            try:
                future.result(30)
            except Exception:  # left behind is harmless: the next warm-up reuses it
                logging.getLogger("ohs.stack").debug("warm-up topic %s not deleted", topic, exc_info=True)


def _cassandra(s: StackSettings, deadline: float, report: WarmupReport) -> None:
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster
    from cassandra.query import BatchStatement, BatchType

    provider = PlainTextAuthProvider("cassandra", s.cassandra_superuser_password.get_secret_value()) if s.auth else None
    # Protocol v4, as the worker writes.
    cluster = Cluster([s.host], port=s.cql_port, connect_timeout=_CONNECT_S, protocol_version=4, auth_provider=provider)
    try:
        session = cluster.connect()
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {WARMUP_KEYSPACE} "
            "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            timeout=60,
        )
        # Flushed every few seconds, so the warm-up also writes sstables, compacts them (two are
        # enough) and reads from them: a first `make run` compiled those paths otherwise
        # (``jcmd <pid> Compiler.codelist`` before and after its flow).
        options = (
            "WITH CLUSTERING ORDER BY ({order}) AND memtable_flush_period_in_ms = 4000 "
            "AND compaction = {{'class': 'SizeTieredCompactionStrategy', 'min_threshold': 2}}"
        )
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {WARMUP_KEYSPACE}.rows (k bigint, c bigint, s text, n bigint, "
            "m map<bigint, blob>, PRIMARY KEY (k, c)) " + options.format(order="c DESC"),
            timeout=60,
        )
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {WARMUP_KEYSPACE}.wide (k bigint, e bigint, o bigint, "
            + ", ".join(f"t{i} text" for i in range(6))
            + ", "
            + ", ".join(f"b{i} bigint" for i in range(10))
            + ", PRIMARY KEY ((k), e, o)) "
            + options.format(order="e DESC, o DESC"),
            timeout=60,
        )
        ks = WARMUP_KEYSPACE
        insert = session.prepare(f"INSERT INTO {ks}.rows (k, c, s, n) VALUES (?, ?, ?, ?) USING TIMESTAMP ?")
        update = session.prepare(f"UPDATE {ks}.rows USING TIMESTAMP ? SET m = m + ? WHERE k = ? AND c = ?")
        delete = session.prepare(f"DELETE FROM {ks}.rows USING TIMESTAMP ? WHERE k = ? AND c = ?")
        cols = [f"t{i}" for i in range(6)] + [f"b{i}" for i in range(10)]
        wide = session.prepare(
            f"INSERT INTO {ks}.wide (k, e, o, {', '.join(cols)}) VALUES ({', '.join('?' * (3 + len(cols)))}) "
            "USING TIMESTAMP ?"
        )
        reads = [
            session.prepare(f"SELECT * FROM {ks}.rows WHERE k = ? LIMIT 20"),
            session.prepare(f"SELECT * FROM {ks}.wide WHERE k = ? LIMIT 20"),
        ]
        texts = ("BTC-USD", "BUY", "LIMIT", "GTC", "FILLED", "NONE")
        in_flight: list[Any] = []
        n = 0
        while time.monotonic() < deadline:
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for _ in range(50):  # 200 statements over 50 partitions
                n += 1
                k, c = n % 2_000, n
                batch.add(insert, (k, c, "BTC-USD", n, n))
                batch.add(update, (n, {n: _VALUE[:120]}, k, c))
                batch.add(delete, (n + 1, k, c - 7))
                batch.add(wide, (k, 1, c, *texts, *range(n, n + 10), n))
            in_flight.append(session.execute_async(batch, timeout=30))
            if n % 1_000 == 0:
                for read in reads:
                    in_flight.append(session.execute_async(read, (n % 2_000,), timeout=30))
            while len(in_flight) >= 8:
                in_flight.pop(0).result()
        for future in in_flight:
            future.result()
        written = n * 4
        report.cassandra_rows = written
        session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
    finally:
        cluster.shutdown()


def compiler_cpu_s(pid: int) -> float:
    """CPU seconds the JIT compiler threads of JVM ``pid`` have used (0.0 if it cannot be read)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if "CompilerThre" not in f.read():
                        continue
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    return total / ticks
