"""``ohs bench <component>``: one harness, one output format, figures beside raw limits.

Benchmarks are not tests: they print figures (and ``--json``), they assert
nothing about speed. Every component benchmark reports a table of named
measurements with the unit and, where one exists, the raw limit measured in
the same run and our figure as a ratio of it.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ohs.benchkit import Figure, engine_events, median_of, metric, print_figures, raw_produce_rate

__all__ = ["bench"]


def _drain(endpoint: str, ready: Any, stop: Any) -> None:
    import zmq

    pull: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(endpoint)
    while not stop.is_set():
        if pull.poll(100):
            pull.recv_multipart()
            ready.set()
    pull.close(linger=0)


@click.group()
def bench() -> None:
    """Benchmarks (figures, not tests). See docs/benchmarks.md."""


@bench.command("engine")
@click.option("--commands", "n", default=200_000, show_default=True, help="Commands per run.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_engine(n: int, runs: int, as_json: bool) -> None:
    """Commands/s of the pure core, and of core + journal + ZMQ feed (a PULL peer draining)."""
    from engine.commands import PlaceOrder
    from engine.core import Engine
    from engine.service import EngineService
    from engine.settings import EngineSettings
    from engine.simulator import FlowGenerator

    settings = EngineSettings(_env_file=None)  # type: ignore[call-arg]
    specs = settings.symbol_specs()

    def flow() -> list:  # type: ignore[type-arg]
        gen = FlowGenerator(specs, 1000, seed=1)
        cmds = [replace(c, ts_ns=1) for c in gen.deposits()]
        ts = 1
        engine = Engine(specs, 1)
        for c in cmds:
            engine.execute(c)
        for _ in range(n):
            ts += 1000
            c = replace(gen.next(ts), ts_ns=ts)
            r = engine.execute(c)
            if r.accepted and isinstance(c, PlaceOrder):
                gen.record(c.user_id, r.order_id)
            cmds.append(c)
        return cmds

    commands = flow()
    events_per_run = 0

    def core() -> float:
        nonlocal events_per_run
        engine = Engine(specs, 1)
        t0 = time.perf_counter()
        events = 0
        for c in commands:
            events += len(engine.execute(c).events)
        events_per_run = events
        return len(commands) / (time.perf_counter() - t0)

    def full() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            port_base = 27_000
            s = EngineSettings(
                _env_file=None,  # type: ignore[call-arg]
                journal_dir=Path(tmp),
                feed_endpoint=f"tcp://127.0.0.1:{port_base + 6}",
                replay_endpoint=f"tcp://127.0.0.1:{port_base + 7}",
                gateway_endpoint=f"tcp://127.0.0.1:{port_base + 5}",
            )
            service = EngineService(s)
            # The peer drains in its own process, as the bridge would: no GIL shared with the engine.
            ready, stop = mp.Event(), mp.Event()
            peer = mp.Process(target=_drain, args=(s.feed_endpoint, ready, stop), daemon=True)
            peer.start()
            while not ready.is_set():  # the peer has seen a heartbeat: the feed is connected
                service.service_io(50)
            t0 = time.perf_counter()
            for i in range(0, len(commands), 1000):
                service.submit(commands[i : i + 1000])
            service.journal.sync()
            rate = len(commands) / (time.perf_counter() - t0)
            stop.set()
            peer.join(10)
            service.close()
            return rate

    CORE = "core commands/s (pure, one process)"
    core_med, core_runs = median_of(runs, core)
    full_med, full_runs = median_of(runs, full)
    print_figures(
        f"engine: {len(commands):,} commands -> {events_per_run:,} events",
        [
            Figure(CORE, core_med, "cmd/s", core_runs),
            Figure("core events/s", core_med * events_per_run / len(commands), "ev/s"),
            Figure("core+journal+feed commands/s", full_med, "cmd/s", full_runs, CORE),
        ],
        as_json,
    )


@bench.command("bridge")
@click.option("--events", "n", default=200_000, show_default=True, help="Events per run.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_bridge(n: int, runs: int, as_json: bool) -> None:
    """Events/s from ZMQ to acknowledged in Kafka, beside raw confluent-kafka produce of the same records."""
    import os
    import socket
    import struct
    import subprocess
    import sys
    import uuid

    import zmq
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from engine.wire import HEARTBEAT, header_for, pack
    from schemas.codec import encode

    bootstrap = os.environ.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    events = engine_events(n)
    frames = [(header_for(e), encode(e)) for e in events]
    epoch, last = events[0].epoch, events[-1].seq
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def raw() -> float:
        topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(topic, 6, 1)])[topic].result(30)
        keyed = [(str(struct.unpack_from(">Q", header, 20)[0]).encode(), payload) for header, payload in frames]
        return raw_produce_rate(bootstrap, topic, keyed)

    def bridge_run() -> float:
        tag = uuid.uuid4().hex[:8]
        ports = []
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        feed, replay, metrics = f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}", ports[2]
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.bind(feed)
        router = ctx.socket(zmq.ROUTER)
        router.bind(replay)
        env = {
            **os.environ,
            "OHS_BRIDGE_FEED_ENDPOINT": feed,
            "OHS_BRIDGE_REPLAY_ENDPOINT": replay,
            "OHS_BRIDGE_METRICS_PORT": str(metrics),
            "OHS_BRIDGE_BRIDGE_ID": f"bench-{tag}",
            **{
                f"OHS_BRIDGE_TOPIC_{k}": f"bench.{k.lower()}.{tag}"
                for k in ("UPDATES", "TRADES", "BALANCES", "DLQ", "CHECKPOINT")
            },
        }
        proc = subprocess.Popen([sys.executable, "-m", "ohs.cli", "bridge"], env=env, stderr=subprocess.DEVNULL)
        try:
            # Until the bridge adopts the epoch (it asks INFO), keep sending heartbeats; answer INFO.
            while True:
                push.send_multipart([pack(HEARTBEAT, epoch, 0), b""])
                if router.poll(100):
                    ident, *req = router.recv_multipart()
                    if req == [b"INFO"]:
                        router.send_multipart([ident, b"INFO", struct.pack(">QQ", epoch, 0)])
                        break
            time.sleep(0.5)
            t0 = time.perf_counter()
            for header, payload in frames:
                push.send_multipart((header, payload), copy=False)
            while metric(metrics, "ohs_bridge_watermark") < last:
                time.sleep(0.05)
            return len(frames) / (time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(60)
            push.close(linger=0)
            router.close(linger=0)

    raw_med, raw_runs = median_of(runs, raw)
    br_med, br_runs = median_of(runs, bridge_run)
    print_figures(
        f"bridge: {len(frames):,} events of the engine's seeded flow, Kafka at {bootstrap}",
        [
            Figure("raw confluent-kafka produce (same records)", raw_med, "ev/s", raw_runs),
            Figure(
                "bridge ZMQ -> acked in Kafka",
                br_med,
                "ev/s",
                br_runs,
                "raw confluent-kafka produce (same records)",
            ),
        ],
        as_json,
    )


@bench.command("sink")
@click.option("--events", "n", default=50_000, show_default=True, help="Order updates per run.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_sink(n: int, runs: int, as_json: bool) -> None:
    """Order updates/s from a pre-filled topic into Cassandra by the Faust worker, beside the raw
    CQL write rate of the same rows by the same driver (no Kafka, no Faust) at its best concurrency."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    import uuid

    from cassandra.concurrent import execute_concurrent
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from engine.events import OrderUpdate
    from schemas.codec import encode
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import CassandraSink, connect
    from streams.state import UserState

    s = WorkerSettings()
    updates = [e for e in engine_events(n * 3) if isinstance(e, OrderUpdate)][:n]
    payloads = [(str(e.user_id).encode(), encode(e)) for e in updates]
    cluster, session = connect(s)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})

    def fresh_keyspace() -> str:
        ks = f"bench_{uuid.uuid4().hex[:8]}"
        migrate(session, s, ks)
        return ks

    def raw_at(concurrency: int) -> float:
        ks = fresh_keyspace()
        sink = CassandraSink(session, s, ks)
        states: dict[int, UserState] = {}
        for e in updates:
            states.setdefault(e.user_id, UserState()).apply(e)
        stats = [(u, sym, st.stats[sym], st.stats_version[sym]) for u, st in states.items() for sym in st.stats]
        stmts = [
            (stmt, params)
            for _, stmt, params in sink.statements(list(zip(updates, [p for _, p in payloads], strict=True)), stats)
        ]
        t0 = time.perf_counter()
        execute_concurrent(session, stmts, concurrency=concurrency, raise_on_first_error=True)
        rate = len(updates) / (time.perf_counter() - t0)
        session.execute(f"DROP KEYSPACE {ks}", timeout=120)
        return rate

    def raw() -> float:
        return max(raw_at(c) for c in (64, 128, 256))

    def worker() -> float:
        tag = uuid.uuid4().hex[:8]
        topic = f"bench.sink.{tag}"
        admin.create_topics([NewTopic(topic, s.partitions, 1)])[topic].result(30)
        producer = Producer(
            {
                "bootstrap.servers": s.kafka_bootstrap,
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                "compression.type": "lz4",
            }
        )
        for key, value in payloads:
            producer.produce(topic, value, key)
            producer.poll(0)
        producer.flush(60)
        ks = fresh_keyspace()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            web_port = sock.getsockname()[1]
        env = {
            **os.environ,
            "OHS_WORKER_TOPIC_UPDATES": topic,
            "OHS_KEYSPACE": ks,
            "OHS_WORKER_GROUP": f"bench-{tag}",
            "OHS_WORKER_WEB_PORT": str(web_port),
        }
        with tempfile.TemporaryDirectory() as cwd:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", "worker"],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while True:
                    time.sleep(0.5)
                    try:
                        done = session.execute(f"SELECT count(*) FROM {ks}.order_events", timeout=60).one()[0]
                    except Exception:
                        continue
                    if done >= len(updates):
                        break
                    if proc.poll() is not None:
                        raise click.ClickException("the worker exited during the benchmark")
                rate = len(updates) / (time.perf_counter() - t0)
            finally:
                proc.terminate()
                proc.wait(60)
        session.execute(f"DROP KEYSPACE {ks}", timeout=120)
        return rate

    try:
        raw_med, raw_runs = median_of(runs, raw)
        worker_med, worker_runs = median_of(runs, worker)
    finally:
        cluster.shutdown()
    raw_name = "raw CQL writes of the same rows (best concurrency)"
    print_figures(
        f"sink: {len(updates):,} order updates (6 rows each) from a pre-filled topic",
        [
            Figure(raw_name, raw_med, "upd/s", raw_runs),
            Figure("faust worker topic -> Cassandra (incl. startup)", worker_med, "upd/s", worker_runs, raw_name),
        ],
        as_json,
    )


def _register_e2e() -> None:
    from ohs.bench_e2e import bench_e2e, bench_e2e_report

    bench.add_command(bench_e2e)
    bench.add_command(bench_e2e_report)


_register_e2e()
