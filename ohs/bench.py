"""``ohs bench <component>``: one harness, one output format, figures beside raw limits.

Benchmarks are not tests: they print figures (and ``--json``), they assert
nothing about speed. Every component benchmark reports a table of named
measurements with the unit and, where one exists, the raw limit measured in
the same run and our figure as a ratio of it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click

__all__ = ["Figure", "bench"]


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    runs: list[float] = field(default_factory=list)
    limit_of: str = ""
    """Name of the raw-limit figure this one is a ratio of."""


def _median_of(runs: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def _print(title: str, figures: list[Figure], as_json: bool) -> None:
    if as_json:
        doc = {"bench": title, "machine": _machine(), "figures": [asdict(f) for f in figures]}
        click.echo(json.dumps(doc))
        return
    by_name = {f.name: f for f in figures}
    click.echo(f"== {title}  ({_machine()['summary']})")
    for f in figures:
        ratio = ""
        if f.limit_of and by_name.get(f.limit_of) and by_name[f.limit_of].value:
            ratio = f"  = {100 * f.value / by_name[f.limit_of].value:.0f}% of {f.limit_of}"
        runs = ", ".join(f"{r:,.0f}" for r in f.runs)
        click.echo(f"{f.name:42} {f.value:>12,.0f} {f.unit:10} (median of [{runs}]){ratio}")


def _machine() -> dict[str, str]:
    import os

    return {"summary": f"{os.cpu_count()} cpu, Python {platform.python_version()}, {platform.machine()}"}


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
    core_med, core_runs = _median_of(runs, core)
    full_med, full_runs = _median_of(runs, full)
    _print(
        f"engine: {len(commands):,} commands -> {events_per_run:,} events",
        [
            Figure(CORE, core_med, "cmd/s", core_runs),
            Figure("core events/s", core_med * events_per_run / len(commands), "ev/s"),
            Figure("core+journal+feed commands/s", full_med, "cmd/s", full_runs, CORE),
        ],
        as_json,
    )
