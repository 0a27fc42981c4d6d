"""The engine's /metrics and /health: read from ServiceStats at scrape time, from a thread that
can neither slow nor stop the engine (a port in use, a failing scrape)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from engine.http import COUNTERS, serve, version
from engine.service import ServiceStats
from tests.ports import free_port

CONTRACT = {
    "ohs_engine_commands",
    "ohs_engine_events",
    "ohs_engine_rejected",
    "ohs_engine_feed_dropped",
    "ohs_engine_replay_requests",
    "ohs_engine_replayed_events",
    "ohs_engine_gateway_errors",
}


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_are_the_stats_at_scrape_time_and_health_follows_the_loop():
    stats = ServiceStats()
    status = {"phase": "running", "last_loop": time.monotonic(), "epoch": 1_700_000, "last_seq": 0, "replays": 0}
    port = free_port()
    server = serve(port, lambda: stats, lambda: dict(status), stale_after_s=1.0)
    assert server is not None
    try:
        stats.commands, stats.events, stats.gateway_errors, stats.replayed_events = 12, 34, 5, 6
        status["last_seq"] = 34
        code, body = _get(port, "/metrics")
        assert code == 200
        values = {s.name: (s.labels, s.value) for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert {name.removesuffix("_total") for name in values} >= CONTRACT
        assert set(COUNTERS) >= CONTRACT
        assert values["ohs_engine_commands_total"][1] == 12 and values["ohs_engine_events_total"][1] == 34
        assert values["ohs_engine_gateway_errors_total"][1] == 5
        assert values["ohs_engine_replayed_events_total"][1] == 6
        assert values["ohs_engine_last_seq"][1] == 34 and values["ohs_engine_epoch"][1] == 1_700_000
        assert values["ohs_build_info"] == ({"component": "engine", "version": version()}, 1.0)
        stats.commands = 13  # nothing cached: the next scrape reads the stats again
        assert b"ohs_engine_commands_total 13.0" in _get(port, "/metrics")[1]
        code, body = _get(port, "/health")
        assert code == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["last_seq"] == 34
        status["last_loop"] = time.monotonic() - 5  # the loop stopped turning
        code, body = _get(port, "/health")
        assert code == 503 and json.loads(body)["status"] == "stale"
        assert _get(port, "/nothing")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_failing_scrape_answers_500_and_the_endpoint_stays_up():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("a bug in the status")

    port = free_port()
    server = serve(port, ServiceStats, broken)
    assert server is not None
    try:
        assert _get(port, "/health")[0] == 500
        assert _get(port, "/metrics")[0] == 500
        assert len(calls) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_logged_and_the_engine_goes_on(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(port, ServiceStats, dict) is None
    assert "metrics endpoint not served" in caplog.text
