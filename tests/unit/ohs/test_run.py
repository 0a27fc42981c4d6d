"""``ohs run``'s pieces that need no servers: the progress line, and children that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ohs.run import _healthy, _WorkerLag, progress_line
from tests.ports import free_port


def test_a_figure_that_cannot_be_read_is_na_never_zero() -> None:
    line = progress_line(1.6, None, None, None)
    assert line == "[   1.6s] engine seq       n/a  in Kafka       n/a  worker lag     n/a records     n/a"
    assert " 0" not in line
    assert (
        progress_line(12.0, 12_345, 0, (0, 0.0))
        == "[  12.0s] engine seq    12,345  in Kafka         0  worker lag       0 records   0.0 s"
    )
    assert "n/a" in progress_line(3.0, 7, None, (0, 0.0)) and "7" in progress_line(3.0, 7, None, (0, 0.0))


def test_the_worker_lag_shows_its_records_and_the_age_of_the_oldest() -> None:
    line = progress_line(30.0, 300_000, 299_000, (16_901, 4.25))
    assert line.endswith("worker lag  16,901 records   4.2 s")
    # Records behind whose age could not be read: the age is unknown, not 0.
    assert progress_line(31.0, 300_000, 299_000, (16_901, None)).endswith("worker lag  16,901 records     n/a")


def test_the_worker_lag_is_unknown_when_kafka_does_not_answer() -> None:
    lag = _WorkerLag("127.0.0.1:1", "ohs-order-history", "orders.updates")
    try:
        assert lag() is None
    finally:
        lag.close()


def test_the_worker_lag_sums_records_takes_the_oldest_age_and_keeps_its_peak() -> None:
    from streams.lag import PartitionLag

    def row(partition: int, records: int, seconds: float) -> PartitionLag:
        return PartitionLag("g", "t", partition, 0, records, records, seconds)

    class Reader:
        rows: list[PartitionLag] = []

        def read(self, topics: list[str], timeout_s: float = 2.0) -> list[PartitionLag]:
            return self.rows

    lag = _WorkerLag.__new__(_WorkerLag)
    lag.topic, lag.reader, lag.peak = "t", Reader(), (0, 0.0)  # type: ignore[assignment]
    Reader.rows = [row(0, 100, 1.5), row(1, 300, 4.0), row(2, 0, 0.0)]
    assert lag() == (400, 4.0)
    Reader.rows = [row(0, 50, 0.5), row(1, 0, 0.0)]
    assert lag() == (50, 0.5) and lag.peak == (400, 4.0)
    Reader.rows = [row(0, 900, 0.0)]  # behind, but its oldest record's time could not be read
    assert lag() == (900, None) and lag.peak == (900, 4.0)


def test_healthy_means_a_200_from_health_and_nothing_else() -> None:
    import http.server
    import threading

    status = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status["code"] if self.path == "/health" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert not _healthy(port)  # 503: starting, or Cassandra not open yet
        status["code"] = 200
        assert _healthy(port)
    finally:
        server.shutdown()
        server.server_close()
    assert not _healthy(free_port())  # nothing listens: not started yet


def _alive(pid: int) -> bool:
    """Running, and not a zombie (an orphan is reaped by whoever adopts it, maybe nobody in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_child_gets_sigterm_when_its_parent_is_killed_with_sigkill() -> None:
    # The parent starts a child exactly as `ohs run` starts its children, prints its pid, and waits.
    parent_code = textwrap.dedent(
        """
        import subprocess, sys, time
        from ohs.run import _die_with_parent
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            start_new_session=True, preexec_fn=_die_with_parent(),
        )
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.3)
        assert _alive(child), "the child must run while its parent does"
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no atexit, no finally can run
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its kill -9ed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
