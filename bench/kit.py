"""The benchmark harness shared by every ``ohs bench`` command: figures, medians, one output
format (a table, or ``--json``), and the engine's seeded flow as benchmark input."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import click

__all__ = [
    "Figure",
    "engine_events",
    "machine",
    "median_of",
    "metric",
    "print_figures",
    "proc_cpu_seconds",
    "raw_produce_rate",
]


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    runs: list[float] = field(default_factory=list)
    limit_of: str = ""
    """Name of the raw-limit figure this one is a ratio of."""


def median_of(runs: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def print_figures(title: str, figures: list[Figure], as_json: bool) -> None:
    if as_json:
        doc = {"bench": title, "machine": machine(), "figures": [asdict(f) for f in figures]}
        click.echo(json.dumps(doc))
        return
    by_name = {f.name: f for f in figures}
    click.echo(f"== {title}  ({machine()['summary']})")
    for f in figures:
        ratio = ""
        if f.limit_of and by_name.get(f.limit_of) and by_name[f.limit_of].value:
            ratio = f"  = {100 * f.value / by_name[f.limit_of].value:.0f}% of {f.limit_of}"
        runs = f"  (median of [{', '.join(_fmt(r) for r in f.runs)}])" if f.runs else ""
        click.echo(f"{f.name:48} {_fmt(f.value):>12} {f.unit:6}{runs}{ratio}")


def _fmt(value: float) -> str:
    # Rates read best as whole numbers; latencies and CPU seconds need their decimals.
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def machine() -> dict[str, str]:
    return {"summary": f"{os.cpu_count()} cpu, Python {platform.python_version()}, {platform.machine()}"}


def engine_events(n: int) -> list[Any]:
    """At least ``n`` events from the real engine running the simulator's seeded flow."""
    from engine.core import Engine
    from engine.settings import EngineSettings
    from engine.simulator import FlowGenerator

    specs = EngineSettings(_env_file=None).symbol_specs()  # type: ignore[call-arg]
    gen = FlowGenerator(specs, 1000, seed=1)
    engine = Engine(specs, epoch=time.time_ns() // 1000)
    events: list[Any] = []
    for c in gen.deposits():
        events.extend(engine.execute(replace(c, ts_ns=1)).events)
    ts = 1
    while len(events) < n:
        ts += 1000
        c = replace(gen.next(ts), ts_ns=ts)
        r = engine.execute(c)
        if r.accepted and type(c).__name__ == "PlaceOrder":
            gen.record(c.user_id, r.order_id)  # type: ignore[union-attr]
        events.extend(r.events)
    return events


def metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / ticks


def raw_produce_rate(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Records/s of confluent-kafka producing ``(key, value)`` pairs with the bridge's settings
    (idempotent, acks=all, lz4, linger 5 ms, murmur2): the raw limit the bridge is compared with."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "batch.size": 1_000_000,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 2_000_000,
        }
    )
    t0 = time.perf_counter()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    return len(records) / (time.perf_counter() - t0)
