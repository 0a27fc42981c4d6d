"""``ohs bench e2e``: engine -> bridge -> Kafka -> worker -> Cassandra at offered rates, beside the
raw limits of the same Kafka and Cassandra measured in the same run.

Each rate runs the real processes (``ohs engine simulate --serve``, ``ohs bridge``, ``ohs worker``)
on fresh topics and a fresh keyspace. Latency is every applied event's, not a sample: the worker
(``OHS_WORKER_LATENCY_FILE``) appends, per event, the time from the engine stamping the command
that emitted it to the acknowledgement of the Cassandra write that made its rows readable.
A rate is *sustained* when the pipeline keeps up: the p99 emit-to-queryable latency stays within
``--max-lag-s`` and everything is committed within ``--max-lag-s`` (+ ``COMMIT_SLACK_S``) of the
flow's end. (The group's
committed-offset lag is reported too, but it cannot be the criterion: Faust commits every 2.8 s,
so its age never drops below that even when every event is queryable within milliseconds.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from pathlib import Path
from typing import Any

import click

from bench import profile
from bench.errors import BenchError
from bench.kit import Figure, engine_events, machine, metric, print_figures, proc_cpu_seconds, raw_produce_rate

__all__ = ["bench_e2e", "bench_e2e_report"]

COMMIT_SLACK_S = 4.0
"""The drain is timed until the worker's group has *committed* everything: that includes up to one
Faust commit interval (2.8 s) and one 1 s poll of the offsets beyond the last write."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _server_pids() -> dict[str, int]:
    """Pids of the local stack's Kafka and Cassandra (none for an external stack)."""
    from stack.process import ManagedProcess
    from stack.settings import StackSettings

    s = StackSettings()
    out = {}
    for name in ("kafka", "cassandra"):
        pid = ManagedProcess(name, s.state_dir / f"{name}.pid", s.state_dir / name / "console.log").pid()
        if pid is not None:
            out[name] = pid
    return out


def raw_limits(n: int) -> dict[str, float]:
    """confluent-kafka produce and consume of the same records, and the raw Cassandra limits of the
    same rows per order update (``bench.sink.raw_cassandra``: the worker's own sink and driver,
    and the JVM client that is the limit)."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from schemas.codec import encode
    from schemas.events import OrderUpdate, Trade
    from streams.settings import WorkerSettings

    events = engine_events(n)
    updates = [e for e in events if isinstance(e, OrderUpdate)]
    if not updates:  # the flow opens with every user's deposits: a short sample is only those
        raise BenchError(f"the first {n:,} events of the flow hold no order update: give --raw-events 10000 or more")
    s = WorkerSettings()
    records = [(str(e.taker_user_id if isinstance(e, Trade) else e.user_id).encode(), encode(e)) for e in events]
    topic = f"bench.e2e.raw.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, s.partitions, 1)])[topic].result(30)
    produce = raw_produce_rate(s.kafka_bootstrap, topic, records)
    from confluent_kafka import TopicPartition

    consumer = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": f"bench-{topic}"})
    # Explicit assignment: no group join inside the measurement, only fetching and decoding frames.
    t0 = time.perf_counter()
    consumer.assign([TopicPartition(topic, p, 0) for p in range(s.partitions)])
    got, deadline = 0, time.monotonic() + 120
    while got < len(records) and time.monotonic() < deadline:
        got += sum(1 for m in consumer.consume(num_messages=10_000, timeout=1.0) if not m.error())
    consume = got / (time.perf_counter() - t0)
    consumer.close()

    from bench.sink import raw_cassandra

    cassandra = raw_cassandra(len(updates))
    return {
        "kafka_produce_ev_s": produce,
        "kafka_consume_ev_s": consume,
        # (a) the worker's sink and driver alone, (b) the JVM client on the same rows: (b) is the limit.
        "cassandra_sink_upd_s": cassandra["sink"]["updates_s"],
        "cassandra_upd_s": cassandra["jvm"]["updates_s"],
        "updates_share": len(updates) / len(events),
    }


def run_rate(
    rate: float, duration: float, users: int, max_lag_s: float, workdir: Path, profile_dir: Path | None = None
) -> dict[str, Any]:
    from streams.lag import LagError, group_lag
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import connect

    tag = uuid.uuid4().hex[:8]
    topics = {k: f"bench.e2e.{k.lower()}.{tag}" for k in ("UPDATES", "TRADES", "BALANCES", "DLQ", "CHECKPOINT")}
    ks, group = f"bench_e2e_{tag}", f"bench-e2e-{tag}"
    gateway, feed, replay = (f"tcp://127.0.0.1:{_port()}" for _ in range(3))
    bridge_port, web_port = _port(), _port()
    latency_file = workdir / f"latency-{tag}.bin"
    env = {
        **os.environ,
        "OHS_ENGINE_JOURNAL_DIR": str(workdir / f"journal-{tag}"),
        "OHS_ENGINE_GATEWAY_ENDPOINT": gateway,
        "OHS_ENGINE_FEED_ENDPOINT": feed,
        "OHS_ENGINE_REPLAY_ENDPOINT": replay,
        "OHS_BRIDGE_FEED_ENDPOINT": feed,
        "OHS_BRIDGE_REPLAY_ENDPOINT": replay,
        "OHS_BRIDGE_METRICS_PORT": str(bridge_port),
        "OHS_BRIDGE_BRIDGE_ID": f"bench-{tag}",
        **{f"OHS_BRIDGE_TOPIC_{k}": v for k, v in topics.items()},
        "OHS_WORKER_TOPIC_UPDATES": topics["UPDATES"],
        "OHS_WORKER_TOPIC_DLQ": topics["DLQ"],
        "OHS_WORKER_GROUP": group,
        "OHS_WORKER_WEB_PORT": str(web_port),
        "OHS_WORKER_LATENCY_FILE": str(latency_file),
        "OHS_WORKER_DATA_DIR": str(workdir / f"worker-{tag}"),
        "OHS_KEYSPACE": ks,
    }
    s = WorkerSettings(_env_file=None, keyspace=ks)  # type: ignore[call-arg]
    cluster, session = connect(s)
    migrate(session, s, ks)  # schema creation is not part of the measurement
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> None:
        with (workdir / f"{name}-{tag}.log").open("ab") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", *args], env=env, stdout=log, stderr=log, cwd=workdir
            )

    servers = _server_pids()
    samples: list[tuple[float, int, float]] = []
    try:
        start("worker", ["worker"])
        start("bridge", ["bridge"])
        deadline = time.monotonic() + 120
        while True:  # both up before the flow starts: startup is not part of the measurement
            try:
                metric(bridge_port, "ohs_bridge_received_total")
                metric(web_port, "ohs_worker_records_total")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise click.ClickException(f"bridge/worker did not start; logs in {workdir}") from None
                time.sleep(0.5)
        time.sleep(3)  # the worker's first rebalance
        cpu0 = {n: proc_cpu_seconds(p.pid) for n, p in procs.items()} | {
            n: proc_cpu_seconds(p) for n, p in servers.items()
        }
        sim = ["engine", "simulate", "--users", str(users), "--rate", str(rate), "--duration", str(duration)]
        t0 = time.monotonic()
        start("engine", [*sim, "--serve"])
        spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        if profile_dir is not None:  # the flow only: not the start, not the drain
            profile_dir.mkdir(parents=True, exist_ok=True)
            for name in ("worker", "bridge"):
                out = profile_dir / f"{name}-{rate:.0f}-{tag}.txt"
                spy = profile.start(procs[name].pid, out, duration)
                assert spy is not None, "bench_e2e checks for py-spy before any run"
                spies[name] = (spy, out)
        drained_at = None
        while time.monotonic() - t0 < duration + 5 + 4 * max_lag_s + 60:
            time.sleep(1.0)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited; see {workdir / f'{name}-{tag}.log'}")
            try:
                lag = group_lag(s.kafka_bootstrap, group, [topics["UPDATES"]])
            except LagError:
                continue
            in_kafka = metric(bridge_port, "ohs_bridge_watermark")
            engine_seq = metric(bridge_port, "ohs_bridge_engine_seq")
            behind = sum(r.lag_messages for r in lag)
            samples.append((time.monotonic() - t0, behind, max((r.lag_seconds for r in lag), default=0.0)))
            flowing = time.monotonic() - t0 < duration + 2
            if not flowing and behind == 0 and in_kafka >= engine_seq > 0 and lag and min(r.committed for r in lag) > 0:
                drained_at = time.monotonic() - t0
                break
        cpu = {n: proc_cpu_seconds(p.pid) - cpu0.get(n, 0.0) for n, p in procs.items()} | {
            n: proc_cpu_seconds(p) - cpu0.get(n, 0.0) for n, p in servers.items()
        }
        events = int(metric(bridge_port, "ohs_bridge_engine_seq"))
        # Where the worker's time went: how large its batches grew and how long their writes took.
        batches = metric(web_port, "ohs_worker_batch_records_count")
        writes = metric(web_port, "ohs_worker_write_seconds_count")
        profiles: dict[str, Any] = {}
        for name, (spy, out) in spies.items():
            try:
                spy.wait(duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
            if out.exists():
                profiles[name] = {"file": str(out), **profile.summarize(out)}
        worker_batches = {
            "batches": int(batches),
            "mean_records": metric(web_port, "ohs_worker_batch_records_sum") / max(batches, 1),
            "mean_write_ms": 1000 * metric(web_port, "ohs_worker_write_seconds_sum") / max(writes, 1),
        }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
        finally:
            cluster.shutdown()
    latencies = array("d")
    if latency_file.exists():
        with latency_file.open("rb") as f:
            latencies.frombytes(f.read())
    ordered = sorted(latencies)
    second_half = [lag_s for t, _, lag_s in samples if duration / 2 <= t <= duration]
    drain_s = (drained_at - duration) if drained_at is not None else float("inf")
    p99_s = _percentile(ordered, 0.99)
    bounded = drained_at is not None and p99_s <= max_lag_s and drain_s <= max_lag_s + COMMIT_SLACK_S
    return {
        "offered_cmd_s": rate,
        "engine_events": events,
        "events_s": events / (drained_at if drained_at else duration + 60),
        "offered_events_s": events / duration,
        "updates_applied": len(latencies),
        "updates_s": len(latencies) / (drained_at if drained_at else duration + 60),
        "bounded": bounded,
        "drain_s": drain_s,
        "max_lag_s_second_half": max(second_half, default=0.0),
        "latency_ms": {q: 1000 * _percentile(ordered, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))},
        "cpu_s": cpu,
        "worker_us_per_update": 1e6 * cpu.get("worker", 0.0) / max(len(latencies), 1),
        "worker_batches": worker_batches,
        **({"profiles": profiles} if profile_dir is not None else {}),
    }


@click.command("e2e")
@click.option("--rate", "rates", multiple=True, type=float, default=[1000.0], show_default=True,
              help="Offered engine commands/s; repeat for a sweep.")  # fmt: skip
@click.option("--duration", default=30.0, show_default=True, help="Seconds of flow per rate.")
@click.option("--users", default=1000, show_default=True)
@click.option("--max-lag-s", default=5.0, show_default=True, help="Lag bound of a sustained rate.")
@click.option("--raw-events", default=30_000, show_default=True, help="Events for the raw limits.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a latency-vs-load PNG here.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Profile the worker and bridge (py-spy) during each flow; stacks, summaries here.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
def bench_e2e(
    rates: tuple[float, ...],
    duration: float,
    users: int,
    max_lag_s: float,
    raw_events: int,
    plot: str | None,
    profile_dir: str | None,
    as_json: bool,
) -> None:
    """Engine -> Cassandra throughput, emit-to-queryable latency and CPU, beside raw Kafka/Cassandra."""
    if profile_dir and profile.py_spy() is None:  # before minutes of raw limits, not after
        raise click.ClickException("--profile needs py-spy (a dev dependency: pip install -e '.[dev]')")
    raw = raw_limits(raw_events)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ohs-bench-e2e-") as tmp:
        for rate in rates:
            runs.append(
                run_rate(rate, duration, users, max_lag_s, Path(tmp), Path(profile_dir) if profile_dir else None)
            )
            if not as_json:
                click.echo(f"rate {rate:,.0f} cmd/s: {json.dumps(runs[-1], default=str)}", err=True)
    sustained = [r for r in runs if r["bounded"]]
    best = max(sustained, key=lambda r: r["events_s"]) if sustained else None
    kafka_limit = min(raw["kafka_produce_ev_s"], raw["kafka_consume_ev_s"])
    if plot:
        _plot(runs, Path(plot))
    if as_json:
        doc = {"bench": "e2e", "machine": machine(), "raw": raw, "runs": runs, "sustained": best}
        click.echo(json.dumps(doc, default=str))
        return
    figures = [
        Figure("raw Kafka produce (same records)", raw["kafka_produce_ev_s"], "ev/s"),
        Figure("raw Kafka consume (same records)", raw["kafka_consume_ev_s"], "ev/s"),
        Figure("raw Kafka limit (min of the two)", kafka_limit, "ev/s"),
        Figure("raw Cassandra, JVM client (the limit)", raw["cassandra_upd_s"], "upd/s"),
        Figure(
            "raw Cassandra, the worker's sink alone",
            raw["cassandra_sink_upd_s"],
            "upd/s",
            limit_of="raw Cassandra, JVM client (the limit)",
        ),
    ]
    for r in runs:
        tag = f"@{r['offered_cmd_s']:,.0f} cmd/s{'' if r['bounded'] else ' (lag unbounded)'}"
        figures += [
            Figure(f"e2e events/s {tag}", r["events_s"], "ev/s", limit_of="raw Kafka limit (min of the two)"),
            Figure(f"e2e updates/s {tag}", r["updates_s"], "upd/s", limit_of="raw Cassandra, JVM client (the limit)"),
            Figure(f"worker CPU per update {tag}", r["worker_us_per_update"], "µs"),
            *(Figure(f"latency {q} {tag}", v, "ms") for q, v in r["latency_ms"].items()),
            *(Figure(f"cpu {name} {tag}", v, "s") for name, v in sorted(r["cpu_s"].items())),
            Figure(f"worker mean batch {tag}", r["worker_batches"]["mean_records"], "records"),
            Figure(f"worker mean batch write {tag}", r["worker_batches"]["mean_write_ms"], "ms"),
        ]
    if best:
        figures.append(
            Figure("sustained e2e events/s", best["events_s"], "ev/s", limit_of="raw Kafka limit (min of the two)")
        )
    print_figures(f"e2e: {duration:.0f} s per rate, {users} users", figures, False)


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["offered_events_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for q in ("p50", "p99", "p99.9"):
        ax.plot(xs, [r["latency_ms"][q] for r in runs], marker="o", label=q)
    ax.set_xlabel("offered load (engine events/s)")
    ax.set_ylabel("emit -> queryable in Cassandra (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("End-to-end latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command("e2e-report")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the latency-vs-load PNG here.")
@click.option("--max-lag-s", default=5.0, show_default=True, help="Lag bound of a sustained rate.")
def bench_e2e_report(files: tuple[str, ...], plot: str | None, max_lag_s: float) -> None:
    """Medians over several `ohs bench e2e --json` outputs, as a markdown table (and the plot)."""
    import statistics

    docs = [json.loads(Path(f).read_text()) for f in files]
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for doc in docs:
        for r in doc["runs"]:
            by_rate.setdefault(r["offered_cmd_s"], []).append(r)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    raw = {k: med([d["raw"][k] for d in docs]) for k in ("kafka_produce_ev_s", "kafka_consume_ev_s", "cassandra_upd_s")}
    kafka_limit = min(raw["kafka_produce_ev_s"], raw["kafka_consume_ev_s"])
    click.echo(f"raw limits (median of {len(docs)}): Kafka produce {raw['kafka_produce_ev_s']:,.0f} ev/s, consume "
               f"{raw['kafka_consume_ev_s']:,.0f} ev/s; Cassandra {raw['cassandra_upd_s']:,.0f} updates/s")  # fmt: skip
    click.echo("")
    click.echo("| offered cmd/s | engine events/s | e2e events/s | % of Kafka limit | updates/s into Cassandra "
               "| % of raw Cassandra | p50 ms | p99 ms | p99.9 ms | drain s | sustained | CPU s worker / bridge / "
               "engine / kafka / cassandra |")  # fmt: skip
    click.echo("|" + "---|" * 12)
    medians = []
    for rate in sorted(by_rate):
        runs = by_rate[rate]
        lat = {q: med([r["latency_ms"][q] for r in runs]) for q in ("p50", "p99", "p99.9")}
        drain = med([r["drain_s"] for r in runs])
        events_s, updates_s = med([r["events_s"] for r in runs]), med([r["updates_s"] for r in runs])
        ok = sum(
            1 for r in runs if r["latency_ms"]["p99"] / 1000 <= max_lag_s and r["drain_s"] <= max_lag_s + COMMIT_SLACK_S
        )
        procs = ("worker", "bridge", "engine", "kafka", "cassandra")
        cpu = " / ".join(f"{med([r['cpu_s'].get(n, 0.0) for r in runs]):.1f}" for n in procs)
        offered = med([r["offered_events_s"] for r in runs])
        of_kafka, of_cassandra = 100 * events_s / kafka_limit, 100 * updates_s / raw["cassandra_upd_s"]
        click.echo(
            f"| {rate:,.0f} | {offered:,.0f} | {events_s:,.0f} | {of_kafka:.0f}% | {updates_s:,.0f} | "
            f"{of_cassandra:.0f}% | {lat['p50']:,.0f} | {lat['p99']:,.0f} | {lat['p99.9']:,.0f} | {drain:.1f} | "
            f"{ok}/{len(runs)} | {cpu} |"
        )
        medians.append({"offered_events_s": med([r["offered_events_s"] for r in runs]), "latency_ms": lat})
    if plot:
        _plot(medians, Path(plot))
        click.echo(f"\nplot: {plot}")
