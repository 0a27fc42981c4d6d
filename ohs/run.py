"""``ohs run``: the main job, end to end on the stack in the environment.

Starts the same commands users run by hand, as separate processes:
``ohs engine simulate --serve`` (engine + seeded order flow), ``ohs bridge``
and ``ohs worker`` (= ``faust -A streams.app worker``); shows live progress
(events emitted, in Kafka, worker lag), waits until everything emitted is in
Cassandra, stops the processes with SIGTERM and prints a summary with where
to look at the data.

The children never outlive it, however it ends: a normal end, an error, a
signal (SIGINT, SIGTERM, SIGHUP: stop the children, then exit), and on Linux
even a kill -9 or a crash of ``ohs run`` itself (each child asks the kernel for
SIGTERM when its parent dies, ``PR_SET_PDEATHSIG``). Before that, a crashed
``ohs run`` left the engine, bridge and worker running with parent 1.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

__all__ = ["progress_line", "run"]

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class _WorkerLag:
    """Records of the updates topic the worker group has not committed yet, or None when unknown.

    Not ``streams.lag.group_lag``: that one reads the offsets with librdkafka's AdminClient
    ListConsumerGroupOffsets, which on a fresh cluster (the group coordinator not loaded yet:
    NOT_COORDINATOR) dereferences the admin client's absent consumer group and kills the process
    with SIGSEGV (librdkafka #5040), or times out with a bare TimeoutError. That is the
    ``Segmentation fault`` (rc 139) of the first ``ohs run`` on a fresh stack. A consumer of the
    worker's group that never subscribes reads them through its own OffsetFetch path instead: it
    never joins, rebalances or commits to the group."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "log_level": 2,  # unreachable brokers show as "n/a" in the progress line, not a log flood
            }
        )

    def __call__(self) -> int | None:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            meta = self.consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                return None
            tps = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
            lag = 0
            for tp in self.consumer.committed(tps, timeout=2):
                low, high = self.consumer.get_watermark_offsets(tp, timeout=2)
                lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
            return lag
        except KafkaException:
            return None

    def close(self) -> None:
        self.consumer.close()


def _count(value: int | None, width: int) -> str:
    return f"{value:>{width},}" if value is not None else f"{'n/a':>{width}}"


def progress_line(elapsed_s: float, engine_seq: int | None, in_kafka: int | None, lag: int | None) -> str:
    """One progress line; a figure that could not be read is "n/a", never a 0 that looks like one."""
    return (
        f"[{elapsed_s:6.1f}s] engine seq {_count(engine_seq, 9)}  in Kafka {_count(in_kafka, 9)}"
        f"  worker lag {_count(lag, 7)}"
    )


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel send the child SIGTERM when ``ohs run`` dies (Linux only).

    Covers what no handler of ours can: kill -9 and crashes. libc is loaded here, before the fork:
    the child between fork and exec should only call into it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Children:
    """The started processes, and the one way to stop them (idempotent: every exit path calls it)."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def signal_all(self, sig: int) -> None:
        for name in ("engine", "bridge", "worker"):  # the source first: nothing new enters the pipeline
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it exited since poll()
                    proc.send_signal(sig)

    def stop(self, timeout_s: float = 60.0) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                click.echo(f"{name} did not stop in {timeout_s:.0f} s: killed", err=True)


@click.command()
@click.option("--duration", default=60.0, show_default=True, help="Seconds of order flow.")
@click.option("--rate", default=2_000.0, show_default=True, help="Commands per second.")
@click.option("--users", default=200, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--forever", is_flag=True, help="Demo mode: keep the flow running until Ctrl-C.")
def run(duration: float, rate: float, users: int, seed: int, forever: bool) -> None:
    """Engine simulator -> bridge -> Kafka -> Faust worker -> Cassandra, with live progress.

    Ctrl-C stops the flow and the processes and prints the summary; SIGTERM or SIGHUP stops the
    processes and exits 143 or 129; a second signal kills them at once."""
    from bridge.settings import BridgeSettings
    from engine.client import engine_info
    from engine.settings import EngineSettings
    from streams.settings import WorkerSettings

    engine_s, bridge_s, worker_s = EngineSettings(), BridgeSettings(), WorkerSettings()
    logs = Path(os.environ.get("OHS_STATE", ".ohs")).resolve() / "run"
    logs.mkdir(parents=True, exist_ok=True)
    children = _Children()
    env = dict(os.environ)
    # Children run in the log dir (Faust keeps its table data in its cwd): make paths absolute.
    env.setdefault("OHS_ENGINE_JOURNAL_DIR", str(engine_s.journal_dir.resolve()))
    # Python tracebacks of every thread on a fatal signal, in each child's log; this reaches the worker
    # too, which execs faust (a new interpreter: ohs.cli's own faulthandler.enable() is gone there).
    env.setdefault("PYTHONFAULTHANDLER", "1")
    preexec = _die_with_parent()
    stopped: dict[str, Any] = {"signal": None}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopped["signal"] is not None:
            children.signal_all(signal.SIGKILL)
            os._exit(128 + signum)
        stopped["signal"] = signum
        click.echo(f"\n{signal.Signals(signum).name}: stopping the pipeline (again to kill it now)", err=True)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    # Whatever ends this process from here on (an uncaught exception, sys.exit anywhere), the children go too.
    atexit.register(children.stop, 10.0)

    def start(name: str, args: list[str]) -> None:
        with (logs / f"{name}.log").open("ab") as log:
            children.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", *args],
                stdout=log,
                stderr=log,
                cwd=logs,
                env=env,
                # Own session: a Ctrl-C at the terminal reaches us only, and we stop them in order.
                start_new_session=True,
                preexec_fn=preexec,
            )
        click.echo(f"started {name} (pid {children.procs[name].pid}), log {logs / f'{name}.log'}")

    flow = 10**9 if forever else duration
    t0 = time.monotonic()
    emitted: int | None = None
    worker_lag: _WorkerLag | None = None
    try:
        # Children first, before this process has threads of its own (Kafka, ZeroMQ): fork + preexec_fn
        # are only safe in a single-threaded parent.
        start("worker", ["worker"])
        start("bridge", ["bridge"])
        sim = ["engine", "simulate", "--users", str(users), "--rate", str(rate), "--duration", str(flow)]
        start("engine", [*sim, "--seed", str(seed), "--serve"])
        worker_lag = _WorkerLag(worker_s.kafka_bootstrap, worker_s.group, worker_s.topic_updates)
        last_line = ""
        drained_since = None
        while stopped["signal"] is None:
            time.sleep(1.0)
            for name, proc in children.procs.items():
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with {proc.returncode}; see {logs / f'{name}.log'}")
            info = engine_info(engine_s.replay_endpoint)
            in_kafka_raw = _metric(bridge_s.metrics_port, "ohs_bridge_watermark") if bridge_s.metrics_port else None
            in_kafka = int(in_kafka_raw) if in_kafka_raw is not None else None
            lag = worker_lag()
            if info is not None:
                emitted = info[1]  # the last value read stays the summary's figure
            line = progress_line(time.monotonic() - t0, info[1] if info else None, in_kafka, lag)
            if line != last_line:
                click.echo(line)
                last_line = line
            flowing = time.monotonic() - t0 < flow + 5
            drained = info is not None and in_kafka is not None and in_kafka >= info[1] and lag == 0
            if not flowing and drained:
                drained_since = drained_since or time.monotonic()
                if time.monotonic() - drained_since > 3:
                    break
            if not flowing and time.monotonic() - t0 > flow + 300:
                raise click.ClickException("the pipeline did not drain within 5 minutes of the flow's end")
    finally:
        if worker_lag is not None:
            worker_lag.close()
        children.stop()
    if stopped["signal"] in (signal.SIGTERM, signal.SIGHUP):
        sys.exit(128 + stopped["signal"])
    _summary(worker_s, emitted, logs, interrupted=stopped["signal"] is not None)


def _summary(s: object, emitted: int | None, logs: Path, interrupted: bool = False) -> None:
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
    if emitted is None:
        click.echo("done: the engine's last seq was never read (see the engine log).")
    elif interrupted:
        click.echo(f"stopped: {emitted:,} events emitted by the engine; the pipeline may not have drained them.")
    else:
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
