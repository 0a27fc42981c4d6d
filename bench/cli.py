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
from pathlib import Path
from typing import Any

import click

from bench.kit import Figure, engine_events, median_of, metric, print_figures, raw_produce_rate

__all__ = ["bench"]


def _drain(endpoint: str, ready: Any, stop: Any) -> None:
    """A feed subscriber in its own process (as a bridge would be): reads every message."""
    import zmq

    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 2_000)
    sub.connect(endpoint)
    while not stop.is_set():
        if sub.poll(100):
            while True:
                try:
                    sub.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
            ready.set()
    sub.close(linger=0)


def _core_run(specs: Any, commands: Any) -> tuple[float, float, int]:
    """One run of the core over ``commands``: (commands/s, commands per CPU-second, events)."""
    from engine.core import Engine

    engine = Engine(specs, 1)
    t0, c0 = time.perf_counter(), time.process_time()
    events = 0
    for c in commands:
        events += len(engine.execute(c).events)
    cpu = len(commands) / (time.process_time() - c0)
    return len(commands) / (time.perf_counter() - t0), cpu, events


def _flow(n: int) -> tuple[Any, Any, int]:
    """(symbol specs, the seeded flow of ``n`` commands, the engine's collector threshold)."""
    from engine.settings import EngineSettings
    from engine.simulator import stamped_flow

    settings = EngineSettings(_env_file=None)  # type: ignore[call-arg]
    specs = settings.symbol_specs()
    return specs, stamped_flow(specs, 1000, n, seed=1), settings.gc_threshold0


def _source_core_child(n: int, runs: int) -> str:
    """In the child process of ``_source_core_rates``: the runs' figures, as JSON."""
    import json

    import engine
    from kit.runtime import tune_gc

    specs, commands, gc_threshold0 = _flow(n)
    tune_gc(gc_threshold0)
    rates = [_core_run(specs, commands)[:2] for _ in range(runs)]
    return json.dumps({"build": engine.core_build(), "rates": rates})


def _source_core_rates(n: int, runs: int) -> list[tuple[float, float]]:
    """The core's runs on its Python source while the compiled build is installed: in a child
    process, since OHS_ENGINE_PURE acts when the core is imported (engine/__init__.py)."""
    import json
    import os
    import subprocess
    import sys

    code = "import sys; from bench.cli import _source_core_child as f; print(f(int(sys.argv[1]), int(sys.argv[2])))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(n), str(runs)],
        env={**os.environ, "OHS_ENGINE_PURE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if not str(got["build"]).startswith("Python"):
        raise click.ClickException(f"the child process ran {got['build']}, not the core's source")
    return [(wall, cpu) for wall, cpu in got["rates"]]


@click.group()
def bench() -> None:
    """Benchmarks (figures, not tests). See docs/benchmarks.md."""
    from kit.runtime import GC_THRESHOLD0_DEFAULT, tune_gc

    # The harness's own clients (the raw limits) collect garbage as the processes they compare with.
    tune_gc(GC_THRESHOLD0_DEFAULT, freeze=False)


@bench.command("engine")
@click.option("--commands", "n", default=200_000, show_default=True, help="Commands per run.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_engine(n: int, runs: int, as_json: bool) -> None:
    """Commands/s of the pure core, and of core + journal (fsync every 5 ms) + PUB feed with one and
    with two subscribers draining it in their own processes. Each figure also in CPU time of the
    engine process (its ZeroMQ I/O thread included), which a loaded machine disturbs less. With the
    C encoder built (schemas/_avroc.c), the one-subscriber figure again with the Python encoder;
    with the core compiled (mypyc, setup.py), the core again from its Python source."""
    import statistics

    import engine
    from engine.service import EngineService
    from engine.settings import EngineSettings
    from kit.runtime import tune_gc
    from schemas import wire

    native_built = wire.use_native(True)
    build = engine.core_build()
    compiled = build.startswith("compiled")
    click.echo(f"engine core: {build}; event encoder: {'C' if native_built else 'Python'}", err=True)

    specs, commands, gc_threshold0 = _flow(n)
    # What an engine process does after start-up (engine/cli.py): the flow stands in for state
    # that lives as long as the process.
    tune_gc(gc_threshold0)
    events_per_run = 0
    cpu: dict[str, list[float]] = {}

    def core() -> float:
        nonlocal events_per_run
        wall, per_cpu, events_per_run = _core_run(specs, commands)
        cpu.setdefault("core", []).append(per_cpu)
        return wall

    def full(consumers: int, native: bool = True) -> float:
        was = wire.use_native(native)
        try:
            return _full(consumers, f"full{consumers}" + ("" if native else "py"))
        finally:
            wire.use_native(was)

    def _full(consumers: int, key: str) -> float:
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
            # The peers drain in their own processes, as bridges would: no GIL shared with the engine.
            stop = mp.Event()
            peers = []
            for _ in range(consumers):
                ready = mp.Event()
                peer = mp.Process(target=_drain, args=(s.feed_endpoint, ready, stop), daemon=True)
                peer.start()
                peers.append((peer, ready))
            for _, ready in peers:  # each has seen a heartbeat: subscribed
                while not ready.is_set():
                    service.service_io(50)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(commands), 1000):
                service.submit(commands[i : i + 1000])
            service.journal.sync()
            rate = len(commands) / (time.perf_counter() - t0)
            cpu.setdefault(key, []).append(len(commands) / (time.process_time() - c0))
            stop.set()
            for peer, _ in peers:
                peer.join(10)
            service.close()
            return rate

    CORE = "core commands/s (pure, one process)"
    CORE_CPU = "core commands per CPU-second"
    core_med, core_runs = median_of(runs, core)
    # The same core run from its Python source (without the optional mypyc build), interleaved
    # here in a child process: what the build gains in the same minutes, and what a machine
    # without a compiler gets.
    source = _source_core_rates(n, runs) if compiled else []
    SOURCE = "core commands/s, Python source (no mypyc build)"
    SOURCE_CPU = "core commands per CPU-second, Python source"
    one_med, one_runs = median_of(runs, lambda: full(1))
    two_med, two_runs = median_of(runs, lambda: full(2))
    # The same without the C encoder (an optional build): what it saves, and what a machine
    # without a compiler gets.
    py_med, py_runs = median_of(runs, lambda: full(1, native=False)) if native_built else (0.0, [])
    ONE = "core+journal+feed, 1 subscriber, commands/s"
    ONE_CPU = "core+journal+feed, 1 subscriber, cmd per CPU-s"

    def med(key: str) -> float:
        return statistics.median(cpu[key])

    print_figures(
        f"engine: {len(commands):,} commands -> {events_per_run:,} events",
        [
            Figure(CORE, core_med, "cmd/s", core_runs),
            Figure("core events/s", core_med * events_per_run / len(commands), "ev/s"),
            *(
                [Figure(SOURCE, statistics.median(w for w, _ in source), "cmd/s", [w for w, _ in source], CORE)]
                if source
                else []
            ),
            Figure(ONE, one_med, "cmd/s", one_runs, CORE),
            Figure("core+journal+feed, 2 subscribers, commands/s", two_med, "cmd/s", two_runs, ONE),
            *(
                [Figure("core+journal+feed, 1 subscriber, Python encoder, commands/s", py_med, "cmd/s", py_runs, CORE)]
                if native_built
                else []
            ),
            Figure(CORE_CPU, med("core"), "cmd/s", cpu["core"]),
            *(
                [Figure(SOURCE_CPU, statistics.median(c for _, c in source), "cmd/s", [c for _, c in source], CORE_CPU)]
                if source
                else []
            ),
            Figure(ONE_CPU, med("full1"), "cmd/s", cpu["full1"], CORE_CPU),
            Figure("core+journal+feed, 2 subscribers, cmd per CPU-s", med("full2"), "cmd/s", cpu["full2"], ONE_CPU),
            *(
                [Figure("the same, Python encoder, cmd per CPU-s", med("full1py"), "cmd/s", cpu["full1py"], CORE_CPU)]
                if native_built
                else []
            ),
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
    import statistics
    import struct
    import subprocess
    import sys
    import uuid

    import zmq
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from bench.kit import proc_cpu_seconds
    from schemas.codec import encode
    from schemas.wire import HEARTBEAT, entry, header_for, pack

    bootstrap = os.environ.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    events = engine_events(n)
    frames = [(header_for(e), encode(e)) for e in events]
    epoch, last = events[0].epoch, events[-1].seq
    # As the engine sends them: one message per ~64 KiB of entries.
    batches: list[bytes] = []
    chunk: list[bytes] = []
    for header, payload in frames:
        chunk.append(entry(header, payload))
        if len(chunk) >= 400:
            batches.append(b"".join(chunk))
            chunk = []
    if chunk:
        batches.append(b"".join(chunk))
    cpu_us: list[float] = []
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
        push = ctx.socket(zmq.PUB)  # the engine's feed: batches of entries; unbounded here, so nothing drops
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
                push.send(entry(pack(HEARTBEAT, epoch, 0), b""))
                if router.poll(100):
                    ident, *req = router.recv_multipart()
                    if req == [b"INFO"]:
                        router.send_multipart([ident, b"INFO", struct.pack(">QQ", epoch, 0)])
                        break
            time.sleep(0.5)
            t0, c0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
            for message in batches:
                push.send(message, copy=False)
            while metric(metrics, "ohs_bridge_watermark") < last:
                time.sleep(0.05)
            cpu_us.append(1e6 * (proc_cpu_seconds(proc.pid) - c0) / len(frames))
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
            Figure("bridge CPU per event", statistics.median(cpu_us), "us", cpu_us),
        ],
        as_json,
    )


def _register_e2e() -> None:
    from bench.e2e import bench_e2e, bench_e2e_report
    from bench.sink import bench_sink

    bench.add_command(bench_e2e)
    bench.add_command(bench_e2e_report)
    bench.add_command(bench_sink)


_register_e2e()


def _register_raw() -> None:
    from bench.raw import bench_drivers, bench_raw_cql

    bench.add_command(bench_raw_cql)
    bench.add_command(bench_drivers)


_register_raw()


def _register_soak() -> None:
    from bench.soak import bench_soak

    bench.add_command(bench_soak)


_register_soak()
