"""``ohs bench soak``: the full pipeline at a steady rate for a long time, sampled every interval.

The real processes (``ohs engine simulate --serve``, ``ohs bridge``, ``ohs worker``) run on fresh
topics and a fresh keyspace of the stack in the environment, at ``--rate`` engine commands/s for
``--minutes``. Every ``--interval`` the sampler records, from ``/proc``: the RSS, open file
descriptors and CPU of the engine, bridge, worker, Kafka and Cassandra; the JVMs' heap from
``jstat -gc`` (one ``jstat`` per JVM for the whole run, reading the JVM's perf-data file: nothing
is forced, no safepoint); the worker group's lag (records and seconds) and the bridge's backlog;
and the emit-to-queryable latency percentiles of every order update applied in the interval
(``OHS_WORKER_LATENCY_FILE``, as ``ohs bench e2e``). After the flow the pipeline drains, the
engine stops, and ``ohs audit`` must come out clean.

Flatness. A series is *flat* when the straight line fitted (least squares) to its samples of the
second half of the run rises by less than ``--growth-limit`` (10 %) of the series' mean over that
half (fds: by less than max(3, 10 %)). The first half is warm-up (JIT, caches, RocksDB and
memtables filling, Python arenas), not a leak. The JVM heap is a sawtooth (allocation, then a
collection); its series is the *floor* of each interval, the least heap used that jstat saw in
it, i.e. what survived the interval's collections. Lag is *bounded* when every second-half
interval's p99 latency and consumer lag stay within ``--max-lag-s`` and the pipeline drains
within ``--max-lag-s`` + one commit interval of the flow's end.

Exit status 0 when the audit is clean, no process died, the lag was bounded and (with
``--fail-on-growth``) every series was flat; 1 otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from bench.e2e import COMMIT_SLACK_S, _percentile, _port, _server_pids
from bench.kit import machine, metric, proc_cpu_seconds

__all__ = ["bench_soak", "flatness", "growth"]

DEFAULT_RATE = 150.0
"""Engine commands/s (~4.8 events each): half of the highest rate ``ohs bench e2e`` sustained on
the 2-core machine (docs/reliability.md, "Soak", says how it was measured)."""
PROCESSES = ("engine", "bridge", "worker", "kafka", "cassandra")
JVMS = ("kafka", "cassandra")
QUANTILES = (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
MIN_FD_GROWTH = 3
"""A few descriptors come and go (a reconnect, a compaction's files): growth below this is noise."""


# ------------------------------------------------------------------------------------ /proc
def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class HeapReader:
    """``jstat -gc <pid> <ms>`` for the whole run: heap used (S0U+S1U+EU+OU, MiB) every tick, kept
    until the next ``take``. jstat reads the JVM's hsperfdata file: it costs the JVM nothing."""

    def __init__(self, pid: int, every_ms: int) -> None:
        self.samples: list[float] = []
        self.gcs = (0, 0)  # young, full collections so far
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        try:
            self.proc = subprocess.Popen(
                ["jstat", "-gc", str(pid), str(every_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:  # no JDK tools on this machine: the heap columns show n/a
            return
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str] | None) -> None:
        if out is None:
            return
        header: list[str] = []
        for line in out:
            cols = line.split()
            if not cols:
                continue
            if cols[0] == "S0C":
                header = cols
                continue
            try:
                row = dict(zip(header, (float(c.replace(",", ".")) for c in cols), strict=True))
                used = (row["S0U"] + row["S1U"] + row["EU"] + row["OU"]) / 1024
                gcs = (int(row.get("YGC", 0)), int(row.get("FGC", 0)))
            except (ValueError, KeyError):
                continue
            with self._lock:
                self.samples.append(used)
                self.gcs = gcs

    def take(self) -> dict[str, float]:
        """Floor, peak and last heap used since the previous call (NaN when jstat saw nothing)."""
        with self._lock:
            got, self.samples = self.samples, []
            young, full = self.gcs
        if not got:
            return {"floor": float("nan"), "peak": float("nan"), "young_gcs": young, "full_gcs": full}
        return {"floor": min(got), "peak": max(got), "young_gcs": young, "full_gcs": full}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -------------------------------------------------------------------------------- flatness
def growth(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """(rise of the least-squares line over the span of ``ts``, mean of ``ys``); NaNs skipped."""
    pts = [(t, y) for t, y in zip(ts, ys, strict=True) if y == y]
    if len(pts) < 3:
        return float("nan"), float("nan")
    n = len(pts)
    mt, my = sum(t for t, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    slope = sum((t - mt) * (y - my) for t, y in pts) / var if var else 0.0
    return slope * (pts[-1][0] - pts[0][0]), my


def flatness(ts: list[float], ys: list[float], limit: float, min_abs: float = 0.0) -> dict[str, Any]:
    """The verdict on one series' second half: flat when the fitted rise is below ``limit`` of the
    mean (and, when ``min_abs`` is given, below that absolute amount too)."""
    half = ts[-1] / 2 if ts else 0.0
    second = [(t, y) for t, y in zip(ts, ys, strict=True) if t >= half]
    rise, mean = growth([t for t, _ in second], [y for _, y in second])
    if rise != rise:
        return {"rise": rise, "mean": mean, "relative": float("nan"), "flat": None}
    allowed = max(min_abs, limit * abs(mean))
    return {"rise": rise, "mean": mean, "relative": rise / mean if mean else 0.0, "flat": rise < allowed}


# ---------------------------------------------------------------------------------- the run
@dataclass
class Soak:
    rate: float
    minutes: float
    interval: float
    users: int
    max_lag_s: float
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.tag
        self.topics = {k: f"soak.{k.lower()}.{t}" for k in ("UPDATES", "TRADES", "BALANCES", "DLQ", "CHECKPOINT")}
        self.keyspace, self.group = f"soak_{t}", f"soak-{t}"
        self.gateway, self.feed, self.replay = (f"tcp://127.0.0.1:{_port()}" for _ in range(3))
        self.bridge_port, self.web_port = _port(), _port()
        self.latency_file = self.workdir / "latency.bin"
        self.journal = self.workdir / "journal"
        self.env = {
            **os.environ,
            "OHS_ENGINE_JOURNAL_DIR": str(self.journal),
            "OHS_ENGINE_GATEWAY_ENDPOINT": self.gateway,
            "OHS_ENGINE_FEED_ENDPOINT": self.feed,
            "OHS_ENGINE_REPLAY_ENDPOINT": self.replay,
            "OHS_BRIDGE_FEED_ENDPOINT": self.feed,
            "OHS_BRIDGE_REPLAY_ENDPOINT": self.replay,
            "OHS_BRIDGE_METRICS_PORT": str(self.bridge_port),
            "OHS_BRIDGE_BRIDGE_ID": f"soak-{t}",
            **{f"OHS_BRIDGE_TOPIC_{k}": v for k, v in self.topics.items()},
            "OHS_WORKER_TOPIC_UPDATES": self.topics["UPDATES"],
            "OHS_WORKER_TOPIC_DLQ": self.topics["DLQ"],
            "OHS_WORKER_GROUP": self.group,
            "OHS_WORKER_WEB_PORT": str(self.web_port),
            "OHS_WORKER_LATENCY_FILE": str(self.latency_file),
            "OHS_WORKER_DATA_DIR": str(self.workdir / "worker-data"),
            "OHS_KEYSPACE": self.keyspace,
        }

    def start(self, name: str, args: list[str]) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ohs.cli", *args], env=self.env, stdout=log, stderr=log, cwd=self.workdir
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise click.ClickException(f"{name} exited ({proc.returncode}); see {self.workdir / (name + '.log')}")

    def lag(self) -> tuple[int, float, bool]:
        """(records not committed, seconds behind, every partition committed) of the worker group."""
        from streams.lag import LagError, group_lag

        try:
            rows = group_lag(self.env.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092"), self.group)
        except LagError:
            return -1, float("nan"), False
        return (
            sum(r.lag_messages for r in rows),
            max((r.lag_seconds for r in rows), default=0.0),
            bool(rows) and all(r.committed > 0 for r in rows),
        )


def _latencies(path: Path, offset: int) -> tuple[list[float], int]:
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    usable = len(data) - len(data) % 8  # the worker may be mid-append
    values = array("d")
    values.frombytes(data[:usable])
    return sorted(values), offset + usable


def run_soak(soak: Soak, log: Any) -> dict[str, Any]:
    from engine.client import engine_info
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import connect

    s = WorkerSettings(_env_file=None, keyspace=soak.keyspace)  # type: ignore[call-arg]
    cluster, session = connect(s)
    migrate(session, s, soak.keyspace)
    servers = _server_pids()
    heaps: dict[str, HeapReader] = {}
    duration = soak.minutes * 60
    result: dict[str, Any] = {"died": None}
    try:
        soak.start("worker", ["worker"])
        soak.start("bridge", ["bridge"])
        deadline = time.monotonic() + 120
        while True:  # both up before the flow starts
            try:
                metric(soak.bridge_port, "ohs_bridge_received_total")
                metric(soak.web_port, "ohs_worker_records_total")
                break
            except OSError:
                soak.check_alive()
                if time.monotonic() > deadline:
                    raise click.ClickException(f"bridge/worker did not start; logs in {soak.workdir}") from None
                time.sleep(0.5)
        time.sleep(3)  # the worker's first rebalance
        sim = ["engine", "simulate", "--users", str(soak.users), "--rate", str(soak.rate)]
        soak.start("engine", [*sim, "--duration", str(duration), "--serve"])
        pids = {n: p.pid for n, p in soak.procs.items()} | servers
        tick_ms = max(1000, int(soak.interval * 1000 / 12))  # about a dozen heap readings per interval
        heaps = {n: HeapReader(pids[n], tick_ms) for n in JVMS if n in pids}
        t0 = time.monotonic()
        cpu_prev = {n: proc_cpu_seconds(pid) for n, pid in pids.items()}
        offset, next_at = 0, t0 + soak.interval
        try:
            while time.monotonic() - t0 < duration:
                time.sleep(max(0.0, min(next_at, t0 + duration) - time.monotonic()))
                soak.check_alive()
                if time.monotonic() < next_at:
                    break  # the flow ended between two samples: the drain below takes over
                next_at += soak.interval
                now = time.monotonic() - t0
                lat, offset = _latencies(soak.latency_file, offset)
                behind, lag_s, _ = soak.lag()
                watermark = metric(soak.bridge_port, "ohs_bridge_watermark")
                engine_seq = metric(soak.bridge_port, "ohs_bridge_engine_seq")
                cpu = {n: proc_cpu_seconds(pid) for n, pid in pids.items()}
                sample: dict[str, Any] = {
                    "t_s": round(now, 1),
                    "rss_mb": {n: round(rss_mb(pid), 1) for n, pid in pids.items()},
                    "fds": {n: open_fds(pid) for n, pid in pids.items()},
                    "cpu_pct": {n: round(100 * (cpu[n] - cpu_prev[n]) / soak.interval, 1) for n in pids},
                    "heap_mb": {n: h.take() for n, h in heaps.items()},
                    "lag_records": behind,
                    "lag_s": round(lag_s, 2),
                    "bridge_backlog": max(0, int(engine_seq - watermark)),
                    "updates": len(lat),
                    "updates_s": round(len(lat) / soak.interval, 1),
                    "latency_ms": {
                        q: round(1000 * _percentile(lat, v), 1)
                        for q, v in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
                    },
                }
                cpu_prev = cpu
                soak.samples.append(sample)
                log(_row(sample))
        except click.ClickException as exc:
            result["died"] = exc.message
            raise
        # The drain: the simulator's flow ends (its summary line), GTT orders expire within 3 s,
        # then the engine's last seq must be committed.
        deadline = time.monotonic() + 120
        while "commands_per_s=" not in (soak.workdir / "engine.log").read_text(errors="replace"):
            soak.check_alive()
            if time.monotonic() > deadline:
                raise click.ClickException("the simulator's flow did not end")
            time.sleep(0.5)
        time.sleep(4)
        info = engine_info(soak.replay)
        last = info[1] if info else int(metric(soak.bridge_port, "ohs_bridge_engine_seq"))
        flow_end = time.monotonic()
        drained_at = None
        while time.monotonic() - flow_end < 600:
            soak.check_alive()
            behind, _, all_committed = soak.lag()
            if behind == 0 and all_committed and metric(soak.bridge_port, "ohs_bridge_watermark") >= last:
                drained_at = time.monotonic() - flow_end
                break
            time.sleep(1)
        proc = soak.procs.pop("engine")
        proc.send_signal(signal.SIGTERM)  # the journal is final: the audit reads it
        proc.wait(120)
        result.update(last_seq=last, drain_s=drained_at)
        result["audit"] = _audit(soak) if drained_at is not None else {"ok": False, "error": "never drained"}
    finally:
        for h in heaps.values():
            h.close()
        for proc in soak.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in soak.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {soak.keyspace}", timeout=120)
        finally:
            cluster.shutdown()
    return result


def _audit(soak: Soak) -> dict[str, Any]:
    t = soak.topics
    cmd = [sys.executable, "-m", "ohs.cli", "audit", "--json", "--journal-dir", str(soak.journal)]
    cmd += ["--topic-updates", t["UPDATES"], "--topic-trades", t["TRADES"], "--topic-balances", t["BALANCES"]]
    cmd += ["--keyspace", soak.keyspace]
    proc = subprocess.run(cmd, env=soak.env, capture_output=True, text=True, timeout=3600, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return {"ok": False, "error": (proc.stdout + proc.stderr)[-2000:]}
    return {
        "ok": proc.returncode == 0 and bool(report.get("ok")),
        "events": report["journal"]["events"],
        "problems": len(report.get("problems", [])),
        "kafka_duplicates": report.get("kafka", {}).get("totals", {}).get("duplicates", 0),
        "seconds": report.get("timing", {}).get("elapsed_s"),
    }


# ------------------------------------------------------------------------------- reporting
_HEAD = (
    f"{'min':>5} | {'RSS MiB engine/bridge/worker/kafka/cassandra':>44} | {'fds e/b/w/k/c':>22} | "
    f"{'heap floor MiB k/c':>18} | {'lag rec':>7} {'lag s':>6} {'backlog':>7} | {'upd/s':>6} | "
    f"{'p50':>6} {'p99':>7} {'p99.9':>7} ms"
)


def _row(x: dict[str, Any]) -> str:
    rss = "/".join(f"{x['rss_mb'].get(n, float('nan')):.0f}" for n in PROCESSES)
    fds = "/".join(str(x["fds"].get(n, "-")) for n in PROCESSES)
    heap = "/".join(f"{x['heap_mb'][n]['floor']:.0f}" if n in x["heap_mb"] else "n/a" for n in JVMS)
    lat = x["latency_ms"]
    return (
        f"{x['t_s'] / 60:5.1f} | {rss:>44} | {fds:>22} | {heap:>18} | {x['lag_records']:>7} {x['lag_s']:>6.2f} "
        f"{x['bridge_backlog']:>7} | {x['updates_s']:>6.0f} | "
        f"{lat['p50']:>6.0f} {lat['p99']:>7.0f} {lat['p99.9']:>7.0f}"
    )


def verdicts(samples: list[dict[str, Any]], limit: float) -> dict[str, dict[str, Any]]:
    ts = [x["t_s"] for x in samples]
    out = {}
    for n in PROCESSES:
        if any(n in x["rss_mb"] for x in samples):
            out[f"rss {n}"] = flatness(ts, [x["rss_mb"].get(n, float("nan")) for x in samples], limit)
            fds = [float(x["fds"].get(n, -1)) for x in samples]
            out[f"fds {n}"] = flatness(ts, [v if v >= 0 else float("nan") for v in fds], limit, MIN_FD_GROWTH)
    for n in JVMS:
        if any(n in x["heap_mb"] for x in samples):
            floors = [x["heap_mb"].get(n, {}).get("floor", float("nan")) for x in samples]
            out[f"heap {n}"] = flatness(ts, floors, limit)
    return out


def lag_bounded(samples: list[dict[str, Any]], drain_s: float | None, max_lag_s: float) -> dict[str, Any]:
    half = samples[-1]["t_s"] / 2 if samples else 0.0
    second = [x for x in samples if x["t_s"] >= half]
    worst_p99 = max((x["latency_ms"]["p99"] / 1000 for x in second if x["updates"]), default=float("nan"))
    worst_lag = max((x["lag_s"] for x in second if x["lag_s"] == x["lag_s"]), default=float("nan"))
    ok = (
        drain_s is not None
        and bool(second)
        and worst_p99 <= max_lag_s
        and worst_lag <= max_lag_s + COMMIT_SLACK_S
        and drain_s <= max_lag_s + COMMIT_SLACK_S
    )
    return {"worst_p99_s": worst_p99, "worst_lag_s": worst_lag, "drain_s": drain_s, "bounded": ok}


def plot(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mins = [x["t_s"] / 60 for x in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax = axes[0][0]
    for n in PROCESSES:
        ax.plot(mins, [x["rss_mb"].get(n, float("nan")) for x in samples], marker=".", label=n)
    ax.set_ylabel("RSS (MiB)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for n in PROCESSES:
        ax.plot(mins, [x["fds"].get(n, float("nan")) for x in samples], marker=".", label=n)
    ax.set_ylabel("open file descriptors")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for n in JVMS:
        floors = [x["heap_mb"].get(n, {}).get("floor", float("nan")) for x in samples]
        peaks = [x["heap_mb"].get(n, {}).get("peak", float("nan")) for x in samples]
        (line,) = ax.plot(mins, floors, marker=".", label=f"{n} floor")
        ax.plot(mins, peaks, linestyle=":", color=line.get_color(), label=f"{n} peak")
    ax.set_ylabel("JVM heap used (MiB)")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    for q in ("p50", "p99", "p99.9"):
        ax.plot(mins, [max(x["latency_ms"][q], 0.1) for x in samples], marker=".", label=f"latency {q}")
    ax.plot(mins, [max(x["lag_s"] * 1000, 0.1) for x in samples], marker="x", label="consumer lag")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("soak")
@click.option("--minutes", default=30.0, show_default=True, help="Minutes of steady flow.")
@click.option("--rate", default=DEFAULT_RATE, show_default=True, help="Engine commands/s (~4.8 events each).")
@click.option("--interval", default=60.0, show_default=True, help="Seconds between samples.")
@click.option("--users", default=1000, show_default=True)
@click.option("--max-lag-s", default=5.0, show_default=True, help="Bound of the p99 latency and the lag.")
@click.option("--growth-limit", default=0.10, show_default=True, help="Largest flat rise, as a share of the mean.")
@click.option("--fail-on-growth", is_flag=True, help="Exit 1 when a series is not flat.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="soak.png", show_default=True)
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Keep logs and journal in this dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the samples and verdicts as one JSON document.")
def bench_soak(
    minutes: float,
    rate: float,
    interval: float,
    users: int,
    max_lag_s: float,
    growth_limit: float,
    fail_on_growth: bool,
    plot_path: str,
    keep: str | None,
    as_json: bool,
) -> None:
    """The full pipeline at a steady rate for --minutes: memory, fds, heap, lag and latency each
    interval; a table, a PNG, flatness verdicts and a final audit."""
    if minutes <= 0 or interval <= 0 or rate <= 0:
        raise click.BadParameter("--minutes, --interval and --rate must be positive")
    # SIGTERM unwinds like Ctrl-C, so the processes, jstat readers and keyspace are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def say(line: str) -> None:
        if not as_json:
            click.echo(line)

    say(f"soak: {rate:,.0f} cmd/s for {minutes:g} min, a sample every {interval:g} s ({machine()['summary']})")
    say(_HEAD)
    with tempfile.TemporaryDirectory(prefix="ohs-soak-") as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(rate, minutes, interval, users, max_lag_s, workdir)
        try:
            result = run_soak(soak, say)
        except click.ClickException as exc:
            result = {"died": exc.message, "audit": {"ok": False}, "drain_s": None}
    flat = verdicts(soak.samples, growth_limit)
    lag = lag_bounded(soak.samples, result.get("drain_s"), max_lag_s)
    if soak.samples:
        plot(soak.samples, Path(plot_path), f"soak: {rate:,.0f} cmd/s for {minutes:g} min")
    growing = [k for k, v in flat.items() if v["flat"] is False]
    ok = result.get("died") is None and result["audit"].get("ok") and lag["bounded"]
    ok = ok and not (fail_on_growth and growing)
    if as_json:
        doc = {"bench": "soak", "machine": machine(), "rate": rate, "minutes": minutes, "interval": interval}
        doc |= {"samples": soak.samples, "flatness": flat, "lag": lag, **result, "ok": ok}
        click.echo(json.dumps(doc, default=str))
    else:
        say("")
        say(f"flatness over the second half (rise of the fitted line; flat below {growth_limit:.0%} of the mean):")
        for name, v in flat.items():
            verdict = {True: "flat", False: "GROWING", None: "n/a"}[v["flat"]]
            say(f"  {name:16} rise {v['rise']:9.1f} on a mean of {v['mean']:9.1f} ({v['relative']:+7.1%})  {verdict}")
        say(
            f"lag: worst second-half p99 {lag['worst_p99_s']:.2f} s, consumer lag {lag['worst_lag_s']:.2f} s, "
            f"drained in {lag['drain_s'] if lag['drain_s'] is None else round(lag['drain_s'], 1)} s: "
            f"{'bounded' if lag['bounded'] else 'NOT BOUNDED'}"
        )
        a = result["audit"]
        if result.get("died"):
            say(f"a process died: {result['died']}")
        say(
            f"audit: {'clean' if a.get('ok') else 'NOT CLEAN'}, {a.get('events', 0):,} events, "
            f"{a.get('problems', 'n/a')} problems, {a.get('kafka_duplicates', 0)} Kafka duplicates"
            + (f" ({a['error']})" if a.get("error") else "")
        )
        say(f"plot: {plot_path}" if soak.samples else "no samples (shorter than one interval)")
        say(f"verdict: {'OK' if ok else 'FAILED'}" + (f"; not flat: {', '.join(growing)}" if growing else "; flat"))
    sys.exit(0 if ok else 1)
