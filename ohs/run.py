"""``ohs run``: the main job, end to end on the stack in the environment.

Starts the same commands users run by hand, as separate processes:
``ohs engine simulate --serve`` (engine + seeded order flow), ``ohs bridge``
and ``ohs worker`` (= ``faust -A streams.app worker``); shows live progress
(events emitted, in Kafka, worker lag), waits until everything emitted is in
Cassandra, stops the processes with SIGTERM and prints a summary with where
to look at the data.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

__all__ = ["run"]


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _engine_info(endpoint: str) -> tuple[int, int] | None:
    import zmq

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"INFO"])
        if not sock.poll(1000):
            return None
        _, body = sock.recv_multipart()
        epoch, last = struct.unpack(">QQ", body)
        return int(epoch), int(last)
    finally:
        sock.close(linger=0)


@click.command()
@click.option("--duration", default=60.0, show_default=True, help="Seconds of order flow.")
@click.option("--rate", default=2_000.0, show_default=True, help="Commands per second.")
@click.option("--users", default=200, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--forever", is_flag=True, help="Demo mode: keep the flow running until Ctrl-C.")
def run(duration: float, rate: float, users: int, seed: int, forever: bool) -> None:
    """Engine simulator -> bridge -> Kafka -> Faust worker -> Cassandra, with live progress."""
    from bridge.settings import BridgeSettings
    from engine.settings import EngineSettings
    from streams.lag import LagError, group_lag
    from streams.settings import WorkerSettings

    engine_s, bridge_s, worker_s = EngineSettings(), BridgeSettings(), WorkerSettings()
    logs = Path(os.environ.get("OHS_STATE", ".ohs")).resolve() / "run"
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = dict(os.environ)
    # Children run in the log dir (Faust keeps its table data in its cwd): make paths absolute.
    env.setdefault("OHS_ENGINE_JOURNAL_DIR", str(engine_s.journal_dir.resolve()))
    emitted = 0

    def start(name: str, args: list[str]) -> None:
        with (logs / f"{name}.log").open("ab") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", *args],
                stdout=log,
                stderr=log,
                cwd=logs,
                env=env,
                start_new_session=True,
            )
        click.echo(f"started {name} (pid {procs[name].pid}), log {logs / f'{name}.log'}")

    flow = 10**9 if forever else duration
    t0 = time.monotonic()
    stopped = {"flag": False}
    signal.signal(signal.SIGINT, lambda *_: stopped.__setitem__("flag", True))
    try:
        start("worker", ["worker"])
        start("bridge", ["bridge"])
        sim = ["engine", "simulate", "--users", str(users), "--rate", str(rate), "--duration", str(flow)]
        start("engine", [*sim, "--seed", str(seed), "--serve"])
        last_line = ""
        drained_since = None
        while not stopped["flag"]:
            time.sleep(1.0)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with {proc.returncode}; see {logs / f'{name}.log'}")
            info = _engine_info(engine_s.replay_endpoint)
            in_kafka = _metric(bridge_s.metrics_port, "ohs_bridge_watermark")
            try:
                lag = sum(r.lag_messages for r in group_lag(worker_s.kafka_bootstrap, worker_s.group))
            except LagError:
                lag = -1
            emitted = info[1] if info else 0
            line = (
                f"[{time.monotonic() - t0:6.1f}s] engine seq {emitted:>9,}  in Kafka {int(in_kafka or 0):>9,}"
                f"  worker lag {lag:>7,}"
            )
            if line != last_line:
                click.echo(line)
                last_line = line
            flowing = time.monotonic() - t0 < flow + 5
            drained = info is not None and in_kafka is not None and int(in_kafka) >= emitted and lag == 0
            if not flowing and drained:
                drained_since = drained_since or time.monotonic()
                if time.monotonic() - drained_since > 3:
                    break
            if not flowing and time.monotonic() - t0 > flow + 300:
                raise click.ClickException("the pipeline did not drain within 5 minutes of the flow's end")
    finally:
        for name in ("engine", "bridge", "worker"):
            running = procs.get(name)
            if running is not None and running.poll() is None:
                running.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                click.echo(f"{name} did not stop in 60 s: killed")
    _summary(worker_s, emitted, logs)


def _summary(s: object, emitted: int, logs: Path) -> None:
    from streams.settings import WorkerSettings
    from streams.sink import connect

    assert isinstance(s, WorkerSettings)
    cluster, session = connect(s)
    try:
        ks = s.keyspace
        totals = session.execute(
            f"SELECT orders_new, orders_filled, orders_cancelled, orders_rejected, orders_expired, fills "
            f"FROM {ks}.order_statistics WHERE user_id = 1 AND symbol = '*'"
        ).one()
        active = session.execute(f"SELECT count(*) FROM {ks}.active_orders WHERE user_id = 1").one()
    finally:
        cluster.shutdown()
    click.echo("")
    click.echo(f"done: {emitted:,} events emitted by the engine, all in Kafka and applied by the worker.")
    if totals is not None:
        click.echo(
            f"user 1: {active[0]} open orders; {totals.orders_new} new, {totals.orders_filled} filled, "
            f"{totals.orders_cancelled} cancelled, {totals.orders_rejected} rejected, "
            f"{totals.orders_expired} expired, {totals.fills} fills"
        )
    click.echo(f"logs: {logs}")
    click.echo(f"look at the data (cqlsh, or any CQL client on {s.hosts[0]}:{s.cql_port}):")
    click.echo(f"  SELECT * FROM {s.keyspace}.active_orders WHERE user_id = 1;")
    click.echo(f"  SELECT * FROM {s.keyspace}.order_history WHERE user_id = 1 LIMIT 20;")
    click.echo(f"  SELECT * FROM {s.keyspace}.order_statistics WHERE user_id = 1;")
