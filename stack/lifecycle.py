"""``up``, ``down``, ``status`` and ``reset`` of the local stack.

``up`` is idempotent: a server whose recorded process is alive is left alone
(and only checked for readiness), so running it twice, or from every test
session, is harmless. Both servers boot concurrently: Cassandra's ~40 s start
dominates, Kafka's few seconds hide inside it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stack.errors import StackError
from stack.fetch import ensure_dist
from stack.health import cassandra_ready, kafka_ready, provision_roles, registry_ready
from stack.process import ManagedProcess, port_in_use, tail
from stack.servers import ServerSpec, cassandra_spec, kafka_spec, registry_spec
from stack.settings import StackSettings
from stack.warmup import compiler_cpu_s, warm_up

__all__ = ["ServerStatus", "down", "reset", "status", "up"]

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ServerStatus:
    name: str
    pid: int | None
    ready_error: str | None
    """None when the server passed its readiness check."""
    endpoint: str
    log_file: str


def _process(s: StackSettings, name: str) -> ManagedProcess:
    return ManagedProcess(name, s.state_dir / f"{name}.pid", s.state_dir / name / "console.log")


_READY = {"kafka": kafka_ready, "cassandra": cassandra_ready, "registry": registry_ready}
_SPEC = {"kafka": kafka_spec, "cassandra": cassandra_spec, "registry": registry_spec}
_VERSION = {"kafka": "kafka_version", "cassandra": "cassandra_version", "registry": "registry_version"}
_LOG = {"kafka": "logs/server.log", "cassandra": "logs/system.log", "registry": "logs/registry.log"}
ALL = ("kafka", "cassandra", "registry")
"""Every server ``down`` and ``status`` look at, started or not by this ``up``."""


def _check(s: StackSettings, name: str) -> str | None:
    return _READY[name](s)


def _endpoint(s: StackSettings, name: str) -> str:
    if name == "kafka":
        return s.kafka_bootstrap
    return f"{s.host}:{s.cql_port}" if name == "cassandra" else s.registry_url


def up(s: StackSettings, log: Log = print, *, warm: bool = False) -> dict[str, float]:
    """Fetch (once), start and wait for both servers. Returns timings in seconds.

    ``warm``: then drive the servers this call started for ``s.warmup_s`` seconds
    (``stack.warmup``), as ``ohs stack up`` does. Tests that restart a server leave it off: a
    restart is about recovery, not speed, and each would cost the warm-up again."""
    t0 = time.monotonic()
    s.state_dir.mkdir(parents=True, exist_ok=True)
    names = s.servers
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {n: pool.submit(ensure_dist, s.cache_dir, n, getattr(s, _VERSION[n]), log) for n in names}
        libs = {n: f.result() for n, f in futures.items()}
    timings = {"fetch_s": time.monotonic() - t0}

    # Every port of every server is checked before anything starts, so a conflict leaves
    # nothing half-started behind.
    specs: dict[str, ServerSpec] = {}
    for name in names:
        proc = _process(s, name)
        if proc.alive():
            log(f"{name}: already running (pid {proc.pid()})")
            continue
        spec = _SPEC[name](s, libs[name])
        taken = _taken_ports(s.host, spec.ports)
        if taken:
            raise StackError(
                f"{name} cannot start: port(s) {taken} on {s.host} are in use by another process "
                f"(not one this stack started). Stop it, or choose other ports "
                f"(OHS_KAFKA_PORT, OHS_KAFKA_CONTROLLER_PORT, OHS_CQL_PORT, OHS_CASSANDRA_STORAGE_PORT, "
                f"OHS_CASSANDRA_JMX_PORT, OHS_REGISTRY_PORT, OHS_REGISTRY_MANAGEMENT_PORT).{_holders(taken)}"
            )
        specs[name] = spec
    for name, spec in specs.items():
        proc = _process(s, name)
        pid = proc.start(spec.argv, cwd=spec.home)
        log(f"{name}: started pid {pid}; log {spec.log_file} (console {proc.log_file})")

    start = time.monotonic()
    pending = list(names)
    deadline = start + s.start_timeout_s
    last_error: dict[str, str | None] = {}
    while pending:
        for name in list(pending):
            proc = _process(s, name)
            if not proc.alive():
                log_file = specs[name].log_file if name in specs else proc.log_file
                raise StackError(
                    f"{name} exited during startup. Last lines of {log_file}:\n{tail(log_file)}\n"
                    f"Console ({proc.log_file}):\n{tail(proc.log_file, 15)}"
                )
            err = _check(s, name)
            if err is None and name == "cassandra" and s.auth:
                provision_roles(s)
            if err is None:
                timings[f"{name}_ready_s"] = time.monotonic() - start
                log(f"{name}: ready at {_endpoint(s, name)} after {timings[f'{name}_ready_s']:.1f}s")
                pending.remove(name)
            elif err != last_error.get(name):
                last_error[name] = err
        if pending and time.monotonic() > deadline:
            name = pending[0]
            log_file = specs[name].log_file if name in specs else _process(s, name).log_file
            raise StackError(
                f"{name} not ready after {s.start_timeout_s:.0f}s (last check: {last_error.get(name)}). "
                f"Last lines of {log_file}:\n{tail(log_file)}"
            )
        if pending:
            time.sleep(1.0)
    started = set(specs) & {"kafka", "cassandra"}
    if warm and started and s.warmup_s > 0:
        log(f"warming up {' and '.join(sorted(started))} for {s.warmup_s:.0f}s (OHS_WARMUP_S=0 skips it)")
        report = warm_up(s, s.warmup_s, started, log)
        compiled = ", ".join(f"{n} {compiler_cpu_s(_process(s, n).pid() or 0):.1f}s" for n in sorted(started))
        log(
            f"warmed up in {report.seconds:.1f}s: {report.kafka_records:,} Kafka records, "
            f"{report.cassandra_rows:,} Cassandra rows; JIT compiler CPU so far: {compiled}"
        )
        timings["warmup_s"] = report.seconds
    timings["total_s"] = time.monotonic() - t0
    return timings


def _taken_ports(host: str, ports: list[int], grace_s: float = 20.0) -> list[int]:
    """Ports still taken after ``grace_s``: a server stopped a moment ago can hold its ports
    for a few seconds in the kernel after its process is gone."""
    deadline = time.monotonic() + grace_s
    while True:
        taken = [p for p in ports if port_in_use(host, p)]
        if not taken or time.monotonic() > deadline:
            return taken
        time.sleep(0.5)


def _holders(ports: list[int]) -> str:
    """What `ss` says holds the ports, when ss is installed (a hint, never required)."""
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        return ""
    lines = []
    for port in ports:
        out = subprocess.run(
            ["ss", "-Htanp", f"sport = :{port}"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            lines.append(out)
    return ("\nHeld by:\n" + "\n".join(lines)) if lines else ""


def down(s: StackSettings, log: Log = print, only: str | None = None) -> None:
    """Stop the servers (or ``only`` one of them) cleanly: SIGTERM lets them flush; SIGKILL
    only after the timeout. ``up`` starts again whatever is not running."""
    for name in ALL:
        if only is not None and name != only:
            continue
        proc = _process(s, name)
        t0 = time.monotonic()
        if proc.stop(s.stop_timeout_s):
            log(f"{name}: stopped in {time.monotonic() - t0:.1f}s")
        else:
            log(f"{name}: not running")


def status(s: StackSettings) -> list[ServerStatus]:
    out = []
    for name in ALL:
        proc = _process(s, name)
        pid = proc.pid()
        if name not in s.servers and pid is None:
            continue
        err = _check(s, name) if pid is not None else "not running"
        log_file = s.state_dir / name / _LOG[name]
        out.append(ServerStatus(name, pid, err, _endpoint(s, name), str(log_file)))
    return out


def reset(s: StackSettings, log: Log = print) -> None:
    """Stop everything and delete the state dir (all topics, tables and logs)."""
    down(s, log)
    if s.state_dir.exists():
        shutil.rmtree(s.state_dir)
        log(f"removed {s.state_dir}")
