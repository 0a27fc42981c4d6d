"""Start, find and stop one server process by its recorded pid.

A pid file holds the pid *and* the process start time read from
``/proc/<pid>/stat``: a pid alone can be reused by an unrelated process after
a reboot or a crash, and ``down`` must never signal a process it did not
start. Processes are never looked up or killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stack.errors import StackError

__all__ = ["ManagedProcess", "port_in_use", "tail"]

# Popen objects of servers started by this process, kept referenced so that their
# finalizer does not warn about a child "still running": outliving us is the point.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    return int(fields[19])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class ManagedProcess:
    """One server of the stack: its pid file and its console log."""

    name: str
    pid_file: Path
    log_file: Path

    def pid(self) -> int | None:
        """The recorded pid if that very process is still alive; clears a stale pid file."""
        try:
            record = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        pid, started = int(record["pid"]), int(record["start_time"])
        if _start_time(pid) == started:
            return pid
        # Stale: the process died (kill -9, reboot) or its pid now belongs to someone else.
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Own session: Ctrl-C in the terminal that ran `up` must not kill the servers.
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {self.name}: {exc}") from exc
        _CHILDREN.append(proc)
        started = _start_time(proc.pid)
        if started is None:
            raise StackError(f"{self.name} exited at once; last log lines:\n{tail(self.log_file)}")
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "start_time": started}))
        return proc.pid

    def alive(self) -> bool:
        return self.pid() is not None

    def stop(self, timeout_s: float) -> bool:
        """SIGTERM (the servers' clean shutdown hooks flush data), SIGKILL after ``timeout_s``.

        Returns True if a running process was stopped.
        """
        pid = self.pid()
        if pid is None:
            return False
        started = _start_time(pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _start_time(pid) != started:
                break
            _reap(pid)
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            while _start_time(pid) == started:
                _reap(pid)
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child (started in this process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
