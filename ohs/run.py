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
    """The worker group's lag on the updates topic: (records not committed yet, age in seconds of
    the oldest of them), or None when it cannot be read. The seconds are what "the worker keeps
    up" means (how stale what users read is); the records alone cannot say it on a flow whose
    rate varies. Read by ``streams.lag.LagReader``: a consumer of the worker's group that never
    subscribes, so it never joins, rebalances or commits to the group (and never calls librdkafka's
    AdminClient ListConsumerGroupOffsets, which kills the process with SIGSEGV on a fresh cluster,
    librdkafka #5040: the ``Segmentation fault`` of a first ``ohs run`` before)."""

    def __init__(self, bootstrap: str, group: str, topic: str, config: dict[str, Any] | None = None) -> None:
        from streams.lag import LagReader

        self.topic = topic
        # librdkafka logs nothing here: unreachable brokers show as "n/a" in the progress line.
        self.reader = LagReader(bootstrap, group, config=config)
        self.peak: tuple[int, float] = (0, 0.0)
        """The highest lag read: (records, seconds), each its own maximum."""

    def __call__(self) -> tuple[int, float | None] | None:
        from streams.lag import LagError

        try:
            rows = self.reader.read([self.topic], timeout_s=2.0)
        except LagError:
            return None
        if not rows:
            return None
        records = sum(r.lag_messages for r in rows)
        # A partition behind whose oldest record could not be read in time has age 0.0: unknown
        # ("n/a" on the line), not a worker that is caught up.
        unknown = any(r.lag_messages and not r.lag_seconds for r in rows)
        seconds = None if unknown else max(r.lag_seconds for r in rows)
        self.peak = max(self.peak[0], records), max(self.peak[1], seconds or 0.0)
        return records, seconds

    def close(self) -> None:
        self.reader.close()


def _healthy(port: int) -> bool:
    """A 200 from ``/health`` on ``port`` (the worker: Cassandra open and its schema migrated;
    the bridge: connected to Kafka, main loop running)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):  # refused while starting; 503 raises HTTPError, an OSError
        return False


def _count(value: int | None, width: int) -> str:
    return f"{value:>{width},}" if value is not None else f"{'n/a':>{width}}"


def progress_line(
    elapsed_s: float, engine_seq: int | None, in_kafka: int | None, lag: tuple[int, float | None] | None
) -> str:
    """One progress line; a figure that could not be read is "n/a", never a 0 that looks like one.
    The worker's lag: records not committed yet, and the age of the oldest of them."""
    records, seconds = lag if lag is not None else (None, None)
    age = f"{seconds:5.1f} s" if seconds is not None else f"{'n/a':>7}"
    return (
        f"[{elapsed_s:6.1f}s] engine seq {_count(engine_seq, 9)}  in Kafka {_count(in_kafka, 9)}"
        f"  worker lag {_count(records, 7)} records {age}"
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
@click.option(
    "--ready-timeout",
    default=180.0,
    show_default=True,
    help="Seconds the worker and the bridge may take to answer healthy before the flow starts.",
)
def run(duration: float, rate: float, users: int, seed: int, forever: bool, ready_timeout: float) -> None:
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
        # The flow starts once both answer healthy: on a fresh stack the worker needs seconds to
        # create the keyspace and join its group, and events emitted meanwhile would only queue
        # (the first `make run` of a fresh clone measured ~20 s of lag from that start alone).
        waiting: dict[str, int] = {"worker": worker_s.web_port, "bridge": bridge_s.metrics_port}
        deadline = time.monotonic() + ready_timeout
        while waiting and stopped["signal"] is None:
            for name, port in list(waiting.items()):
                proc = children.procs[name]
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with {proc.returncode}; see {logs / f'{name}.log'}")
                if not port or _healthy(port):  # no port to ask (metrics off): not waited for
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise click.ClickException(
                    f"{' and '.join(waiting)} not healthy within {ready_timeout:.0f} s; see the logs in {logs}"
                )
            if waiting:
                time.sleep(0.5)
        if stopped["signal"] is None:
            click.echo(f"worker and bridge healthy after {time.monotonic() - t0:.1f} s: starting the flow")
            t0 = time.monotonic()
            sim = ["engine", "simulate", "--users", str(users), "--rate", str(rate), "--duration", str(flow)]
            start("engine", [*sim, "--seed", str(seed), "--serve"])
        worker_lag = _WorkerLag(
            worker_s.kafka_bootstrap, worker_s.group, worker_s.topic_updates, worker_s.kafka_auth.librdkafka()
        )
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
            caught_up = lag is not None and lag[0] == 0
            drained = info is not None and in_kafka is not None and in_kafka >= info[1] and caught_up
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
    peak = worker_lag.peak if worker_lag is not None else None
    _summary(worker_s, emitted, logs, interrupted=stopped["signal"] is not None, peak_lag=peak)


def _summary(
    s: object, emitted: int | None, logs: Path, interrupted: bool = False, peak_lag: tuple[int, float] | None = None
) -> None:
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
    if peak_lag is not None:
        click.echo(f"worker lag at most {peak_lag[1]:.1f} s ({peak_lag[0]:,} records) behind the engine's flow")
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
