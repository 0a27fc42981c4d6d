"""Tools of the fault suite: metrics of a process, bounded waits, TCP proxies that delay or cut
(partition) a connection, kill -9 and ordered restarts of the stack's servers, and the audit."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(cond, what: str, timeout: float = 120.0, explain=None) -> None:  # type: ignore[no-untyped-def]
    """Until ``cond()``; a timeout's message carries ``explain()`` (e.g. ``diagnose``) when given."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:  # the process is not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{explain()}" if explain else ""))
        time.sleep(0.5)


class DelayProxy:
    """A loopback TCP proxy that holds every chunk ``delay`` seconds in each direction: a server
    that answers, slowly (write timeouts in the client), without touching the server itself."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.delay = 0.0
        self.target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            if self._closed.is_set():  # closed meanwhile: these would outlive it (a ResourceWarning later)
                for sock in (client, upstream):
                    sock.close()
                return
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                queue: deque[tuple[float, bytes]] = deque()
                ready = threading.Condition()
                threading.Thread(target=self._read, args=(src, queue, ready), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, queue, ready), daemon=True).start()

    def _read(self, src: socket.socket, queue: deque[tuple[float, bytes]], ready: threading.Condition) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with ready:
                queue.append((time.monotonic() + self.delay, data))
                ready.notify()
            if not data:
                return

    def _write(self, dst: socket.socket, queue: deque[tuple[float, bytes]], ready: threading.Condition) -> None:
        while not self._closed.is_set():
            with ready:
                while not queue:
                    ready.wait(0.5)
                    if self._closed.is_set():
                        return
                due, data = queue.popleft()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return


def server_pid(state_dir, name: str) -> int:  # type: ignore[no-untyped-def]
    """Pid of a server of the local stack (kafka, cassandra), from the pid file it recorded."""
    from stack.process import ManagedProcess

    pid = ManagedProcess(name, state_dir / f"{name}.pid", state_dir / name / "console.log").pid()
    if pid is None:
        raise AssertionError(f"{name} is not running")
    return pid


def audit(p, bootstrap: str, *args: str, faults: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """`ohs audit` of a settled pipeline must come out clean: exit 0, nothing lost, nothing twice.
    ``faults``: how many faults the scenario injected, recorded with the figures when given."""
    import json
    import subprocess
    import sys

    t = p.topics
    cmd = [sys.executable, "-m", "ohs.cli", "audit", "--json", "--journal-dir", str(p.workdir / "journal")]
    cmd += ["--topic-updates", t["updates"], "--topic-trades", t["trades"], "--topic-balances", t["balances"]]
    cmd += ["--keyspace", p.keyspace] if hasattr(p, "keyspace") else ["--skip-cassandra"]
    cmd += list(args)
    env = {**p.env(), "OHS_KAFKA_BOOTSTRAP": bootstrap}
    # The callers wait for the order rows before auditing, not for the worker's second agent to
    # have written the fills of the last trades: a failing audit is repeated (bounded) until the
    # rows have settled. A real loss or a row applied twice persists, and still fails.
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert proc.returncode == 0, f"audit failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    assert report["ok"], "the audit printed a failing report with exit 0"
    record = os.environ.get("OHS_CHAOS_REPORT")
    if record:  # figures for docs/reliability.md: events under each fault, lost (must be 0)
        duplicates = report["kafka"].get("totals", {}).get("duplicates", 0)
        line = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
            "events": report["journal"]["events"],
            "ok": report["ok"],
            "problems": len(report["problems"]),
            "kafka_duplicates": duplicates,
            "faults": faults,
            "lost": _lost(report),
        }
        with open(record, "a") as f:
            f.write(json.dumps(line) + "\n")


def _lost(report: dict) -> int:  # type: ignore[type-arg]
    """Events the audit found missing: records lost in Kafka plus rows lost in Cassandra."""
    kafka = report.get("kafka", {}).get("totals", {}).get("lost", 0)
    tables = report.get("cassandra", {}).get("tables") or {}
    return int(kafka) + sum(int(t.get("lost", 0)) for t in tables.values())


class PartitionProxy:
    """A loopback TCP proxy that can cut the link without closing it, like a network partition:
    while cut, no byte crosses in either direction and no connection is closed or reset, so the
    peers see their requests time out and nothing else. New connections are accepted (the
    kernel completes the handshake) and hang too. ``heal`` resumes every connection where it
    stopped: bytes are held, never dropped, as TCP would retransmit them."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.connections = 0
        """Connections accepted so far: proof that a client really goes through the proxy."""
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._link = threading.Event()
        self._link.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, sock: socket.socket) -> bool:
        """Keep ``sock`` to close with the proxy; False (and closed at once) if the proxy is closed
        already: a socket the pipe threads open while ``close`` runs must not outlive it (its
        ResourceWarning would fail whichever later test the garbage collector runs in)."""
        with self._lock:
            if not self._closed.is_set():
                self._socks.append(sock)
                return True
        with contextlib.suppress(OSError):
            sock.close()
        return False

    def cut(self) -> None:
        self._link.clear()

    def heal(self) -> None:
        self._link.set()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            socks, self._socks = self._socks, []
        self._link.set()  # the pipes waiting for the link see the proxy closed
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _linked(self) -> bool:
        """Wait while the link is cut; False once the proxy is closed."""
        while not self._link.wait(0.5):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._track(client):
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if not self._linked():  # a connection made during the cut reaches the server at the heal
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        if not self._track(upstream):
            return
        ends = [2]  # both directions end before the sockets are closed
        lock = threading.Lock()
        threading.Thread(target=self._pipe, args=(upstream, client, ends, lock), daemon=True).start()
        self._pipe(client, upstream, ends, lock)

    def _pipe(self, src: socket.socket, dst: socket.socket, ends: list[int], lock: threading.Lock) -> None:
        failed = False
        while self._linked():
            try:
                data = src.recv(65536)
            except OSError:
                failed = True
                break
            if not self._linked():  # a chunk read as the link was cut waits for the heal
                return
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(data)
            except OSError:
                failed = True
                break
        with lock:
            ends[0] -= 1
            last = ends[0] == 0
        if failed or last:  # an error on one side ends the connection on both, as a reset would
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def kill9(state_dir, *names: str) -> None:  # type: ignore[no-untyped-def]
    """kill -9 servers of the local stack at the same moment, then wait until each is gone: the
    data directories stay as a crash leaves them (no flush, no clean shutdown)."""
    import signal

    from stack.process import ManagedProcess

    procs = {n: ManagedProcess(n, state_dir / f"{n}.pid", state_dir / n / "console.log") for n in names}
    pids = {n: server_pid(state_dir, n) for n in names}
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    for name, proc in procs.items():
        while proc.pid() is not None:  # a zombie counts as gone (pid() checks the start time)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pids[name], os.WNOHANG)  # the server is our child when this session started it
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} (pid {pids[name]}) survived kill -9 for 60 s")
            time.sleep(0.05)


def start_server(s, name: str, extra_config: str = "") -> float:  # type: ignore[no-untyped-def]
    """Start one server of the local stack and wait until it serves; returns the seconds it took.
    ``up`` starts every stopped server at once; the fault suite restarts them in a chosen order.
    ``extra_config``: lines appended to Kafka's server.properties (a later key wins)."""
    from stack import lifecycle
    from stack.fetch import ensure_dist

    proc = lifecycle._process(s, name)
    if proc.alive():
        raise AssertionError(f"{name} is already running")
    lib = ensure_dist(s.cache_dir, name, getattr(s, lifecycle._VERSION[name]), print)
    spec = lifecycle._SPEC[name](s, lib)
    if extra_config:
        with (spec.home / "server.properties").open("a") as f:
            f.write("\n" + extra_config + "\n")
    taken = lifecycle._taken_ports(s.host, spec.ports)
    if taken:
        raise AssertionError(f"{name} cannot start: ports {taken} are taken")
    t0 = time.monotonic()
    proc.start(spec.argv, cwd=spec.home)
    last = None
    while time.monotonic() - t0 < s.start_timeout_s:
        if not proc.alive():
            raise AssertionError(f"{name} exited during startup; see {spec.log_file}")
        last = lifecycle._READY[name](s)
        if last is None:
            return time.monotonic() - t0
        time.sleep(1.0)
    raise AssertionError(f"{name} not ready after {s.start_timeout_s:.0f} s: {last}")


def kafka_via_proxy(s) -> PartitionProxy:  # type: ignore[no-untyped-def]
    """Restart Kafka (cleanly) with a second listener advertised at a PartitionProxy in front of it.

    A Kafka client learns every broker address from the metadata, so a proxy in front of the
    bootstrap address alone would be bypassed after the first request. A client bootstrapped at
    ``127.0.0.1:<proxy.port>`` talks to the PROXIED listener, whose metadata names the proxy: all
    of its traffic (metadata, produce, coordinator) crosses the proxy. Every other client keeps
    the ordinary listener. The extra listener stays until the next restart of the broker; nothing
    but such a client ever learns its address."""
    from stack.lifecycle import down
    from tests.ports import free_port

    listener = free_port()
    proxy = PartitionProxy(listener, s.host)
    down(s, only="kafka", log=lambda m: print(f"[stack] {m}"))
    h = s.host
    props = [
        f"listeners=PLAINTEXT://{h}:{s.kafka_port},CONTROLLER://{h}:{s.kafka_controller_port},PROXIED://{h}:{listener}",
        f"advertised.listeners=PLAINTEXT://{h}:{s.kafka_port},PROXIED://{h}:{proxy.port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,PROXIED:PLAINTEXT",
    ]
    start_server(s, "kafka", "\n".join(props))
    return proxy


def committed(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offset per partition."""
    from streams.lag import group_lag

    return {(r.topic, r.partition): r.committed for r in group_lag(bootstrap, group)}


def settled_committed(
    bootstrap: str, group: str, quiet_s: float = 4.0, timeout: float = 60.0
) -> dict[tuple[str, int], int]:
    """The group's committed offsets once they have stopped moving for ``quiet_s``.

    After a fault cuts the worker off from Cassandra, a batch made durable just before it may
    still be committed a moment later (the committer flushes the producer first; on a loaded
    machine that takes seconds). That commit is correct; what must not happen is a commit after
    the offsets have settled, while no write can succeed. So the baseline is the settled value,
    not a fixed delay after the fault."""
    deadline = time.monotonic() + timeout
    last = committed(bootstrap, group)
    while True:
        time.sleep(quiet_s)
        now = committed(bootstrap, group)
        if now == last:
            return now
        assert time.monotonic() < deadline, f"committed offsets kept moving for {timeout:.0f} s with the writes failing"
        last = now


class Background:
    """``fn(*args)`` in a thread (load that keeps flowing while a fault is injected); ``join``
    returns its result or raises its exception."""

    def __init__(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:  # type: ignore[no-untyped-def]
        try:
            self.result = fn(*args)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 300.0):  # type: ignore[no-untyped-def]
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the background load did not finish in {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result


MAX_IN_FLIGHT = 500
"""The bridge's bound on unacknowledged records in the scenarios below (small: an outage fills it)."""
IN_FLIGHT_BOUND = MAX_IN_FLIGHT + 2_000
"""What may really be in flight: the bridge checks the bound between feed messages, and the message
it is handling then is relayed whole (a batch of ~64 KiB: ~900 of the smallest events at most,
more only for one command's many events)."""


def start_pipeline(p, bridge_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Engine, bridge (metrics on ``p.bridge_port``) and worker (web on ``p.worker_port``) of one
    scenario; the environments are kept on ``p`` so that a scenario can restart a process as it
    was. Returns a client of the engine's gateway."""
    from tests.integration.pipeline import free_port
    from tests.integration.streams.test_worker import _worker_env

    p.bridge_port = free_port()
    p.bridge_env = {
        "OHS_BRIDGE_METRICS_PORT": str(p.bridge_port),
        "OHS_BRIDGE_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        **(bridge_env or {}),
    }
    p.worker_env = {**_worker_env(p, p.group), **(worker_env or {})}
    p.worker_port = int(p.worker_env["OHS_WORKER_WEB_PORT"])
    p.start("engine", ["engine", "run"])
    client = p.client()
    p.start("bridge", ["bridge"], p.bridge_env)
    p.start("worker", ["worker"], p.worker_env)
    return client


def alive(p, *names: str) -> None:  # type: ignore[no-untyped-def]
    """Each named process of the pipeline still runs (the failure shows its log)."""
    for name in names:
        assert p.procs[name].poll() is None, f"{name} died:\n{p.log(name)}"


def finish(p, client, cql_session, bootstrap: str, seed: int, faults: int) -> None:  # type: ignore[no-untyped-def]
    """More flow after the faults, then the proofs: the rows equal the engine's truth, Kafka holds
    exactly the journal's seqs (re-sends only where at-least-once allows them), the audit is clean."""
    from tests.integration.bridge.test_bridge import _assert_log_matches_journal
    from tests.integration.streams.test_worker import USERS, _check_rows, _truth

    last = p.drive(client, 300, seed=seed, users=USERS)
    client.close()
    p.settle()
    engine, updates = _truth(p)
    try:
        _check_rows(cql_session, p.keyspace, engine, updates)
    except AssertionError as exc:  # with where the flow stopped, if a process stopped making progress
        raise AssertionError(f"{exc}\n{diagnose(p, bootstrap)}") from exc
    _assert_log_matches_journal(p, bootstrap, last)  # also stops the engine: the journal is final
    alive(p, "bridge", "worker")
    audit(p, bootstrap, faults=faults)


def diagnose(p, bootstrap: str) -> str:  # type: ignore[no-untyped-def]
    """Where the flow stopped, most telling first (CI shows the head and tail of a long message):
    whether the worker still runs, the engine's last seq, the bridge's watermark, the group's
    committed offsets against the topic's ends, the worker's counters and health, then its log
    and every thread's stack."""
    from streams.lag import describe_lag

    def attempt(what: str, fn) -> str:  # type: ignore[no-untyped-def]
        try:
            return f"{what}: {fn()}"
        except Exception as exc:  # a diagnosis never hides the failure it explains
            return f"{what}: unavailable ({exc!r})"

    def group() -> str:
        lag = describe_lag(bootstrap, p.group, [p.topics["updates"], p.topics["trades"]])
        parts = ", ".join(f"{r.topic.split('.')[1]} p{r.partition} {r.committed}/{r.end}" for r in lag.partitions)
        return f"state {lag.state}, {lag.members} members, committed/end {parts}"

    def worker() -> str:
        m = metrics(p.worker_port)
        keys = (
            "applied_total",
            "records_total",
            "trade_records_total",
            "fills_total",
            "consumer_gaps_total",
            "last_durable_timestamp_seconds",
            "last_commit_timestamp_seconds",
        )
        found = {k: m.get(f"ohs_worker_{k}") for k in keys}
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.worker_port}/metrics", timeout=10).read().decode()
        dead = [line for line in text.splitlines() if line.startswith("ohs_worker_dead_lettered_total{")]
        return f"{found}, dead letters {dead} (now {time.time():.0f})"

    def health() -> str:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{p.worker_port}/health", timeout=10).read().decode()
        except urllib.error.HTTPError as exc:
            return f"{exc.code} {exc.read().decode(errors='replace')}"

    def running() -> str:
        proc = p.procs.get("worker")
        return "not started" if proc is None else f"pid {proc.pid}, exit code {proc.poll()}"

    lines = [
        attempt("worker process", running),
        attempt("engine last seq", lambda: p.engine_info()[1]),
        attempt("bridge watermark", lambda: metrics(p.bridge_port).get("ohs_bridge_watermark")),
        attempt("worker group", group),
        attempt("worker metrics", worker),
        attempt("worker health", health),
        "worker log (tail):",
        p.log("worker")[-2500:],
        "worker stacks:",
        p.stacks("worker"),
    ]
    return "\n".join(lines)


def cql_retry(session, query: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    """A query of the test's own session, retried while its driver reconnects after a restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list(session.execute(query, timeout=30))
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
