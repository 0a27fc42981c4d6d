"""``ohs run`` never leaves its engine, bridge and worker behind, however it ends.

Before: a ``Segmentation fault`` of ``ohs run`` (rc 139, librdkafka's AdminClient on a fresh
cluster) left all three running with parent 1. Each test runs the real pipeline on its own
topics, keyspace and ports, and ends ``ohs run`` the hard way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.pipeline import Pipeline, free_port

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """Running, and not a zombie (an orphan is reaped by whoever adopts it, maybe nobody in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_run(stack_endpoints: Any, tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """``ohs run`` on names of its own; returns it and its children's pids once all three started."""
    p = Pipeline(stack_endpoints.env(), tmp_path)
    env = p.env(
        {
            "OHS_STATE": str(tmp_path),  # ohs run's logs: tmp_path/run
            "OHS_BRIDGE_METRICS_PORT": str(free_port()),
            "OHS_WORKER_GROUP": f"g-{p.tag}",
            "OHS_WORKER_TOPIC_UPDATES": p.topics["updates"],
            "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"],
            "OHS_WORKER_PARTITIONS": "3",
            "OHS_WORKER_WEB_PORT": str(free_port()),
            "OHS_WORKER_STORE": "memory://",
            "OHS_KEYSPACE": f"run_{p.tag}",
        }
    )
    cmd = [sys.executable, "-m", "ohs.cli", "run", "--duration", "120", "--rate", "100", "--users", "20"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: dict[str, int] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    healthy = False
    while len(pids) < 3:
        line = proc.stdout.readline()
        assert line, f"ohs run ended before starting its children (rc {proc.poll()})"
        healthy = healthy or line.startswith("worker and bridge healthy after")
        m = re.match(r"started (\w+) \(pid (\d+)\)", line)
        if m:
            pids[m[1]] = int(m[2])
            # The flow's source starts only once the worker and the bridge answer healthy.
            assert healthy == (m[1] == "engine"), (m[1], healthy)
        assert time.monotonic() < deadline
    # Past the start: the progress loop runs (its first line comes after a second or so).
    line = proc.stdout.readline()
    assert "engine seq" in line, line
    assert all(_alive(pid) for pid in pids.values()), pids
    return proc, pids


def _wait_gone(pids: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {name: pid for name, pid in pids.items() if _alive(pid)}
    for pid in left.values():
        os.kill(pid, signal.SIGKILL)  # leave nothing behind for the next test either
    assert not left, f"outlived ohs run: {left}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_kill_9_of_ohs_run_takes_its_children_down(stack_endpoints: Any, tmp_path: Path) -> None:
    proc, pids = _start_run(stack_endpoints, tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # like a segfault: no handler, no finally, no atexit runs
        proc.wait(10)
        _wait_gone(pids, timeout=60)  # SIGTERM from the kernel: each stops as cleanly as on a plain SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_ohs_run_stops_its_children_then_it_exits(stack_endpoints: Any, tmp_path: Path, sig: int) -> None:
    proc, pids = _start_run(stack_endpoints, tmp_path)
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 128 + sig, out[-3000:]
        # ohs run waited for them: they are gone the moment it exits, not "shortly after".
        assert not any(_alive(pid) for pid in pids.values()), pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _wait_gone(pids, timeout=5)
