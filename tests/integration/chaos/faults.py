"""Tools of the fault suite: metrics of a process, bounded waits, a TCP proxy that delays."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
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


def wait_for(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:  # the process is not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
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


def audit(p, bootstrap: str, *args: str) -> None:  # type: ignore[no-untyped-def]
    """`ohs audit` of a settled pipeline must come out clean: exit 0, nothing lost, nothing twice."""
    import json
    import subprocess
    import sys

    t = p.topics
    cmd = [sys.executable, "-m", "ohs.cli", "audit", "--json", "--journal-dir", str(p.workdir / "journal")]
    cmd += ["--topic-updates", t["updates"], "--topic-trades", t["trades"], "--topic-balances", t["balances"]]
    cmd += ["--keyspace", p.keyspace] if hasattr(p, "keyspace") else ["--skip-cassandra"]
    cmd += list(args)
    env = {**p.env(), "OHS_KAFKA_BOOTSTRAP": bootstrap}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
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
        }
        with open(record, "a") as f:
            f.write(json.dumps(line) + "\n")
