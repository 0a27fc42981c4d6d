"""The engine's HTTP endpoint: ``/metrics`` (Prometheus) and ``/health`` (JSON), from a thread.

Nothing here runs on the engine loop: the loop only bumps plain integers in ``ServiceStats``,
and a scrape reads them (a custom collector, evaluated at scrape time, in its own registry). A
failure to bind the port is logged and the engine runs on without the endpoint; a failing scrape
answers 500 and never reaches the loop.

``/health`` answers 200 while the loop has turned within the last ``stale_after_s`` seconds
(``status`` ``ok``), else 503 ``stale``; it reports the epoch, last seq and replays in progress.

Metric names are a contract with the alert rules (docs/engine.md): counters
``ohs_engine_commands_total``, ``ohs_engine_events_total``, ``ohs_engine_rejected_total``,
``ohs_engine_feed_dropped_total``, ``ohs_engine_replay_requests_total``,
``ohs_engine_replayed_events_total``, ``ohs_engine_gateway_errors_total`` (and a few more below),
gauges ``ohs_engine_last_seq``, ``ohs_engine_epoch``, and ``ohs_build_info{component="engine"}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["COUNTERS", "EngineCollector", "serve", "version"]

log = logging.getLogger("ohs.engine")

COUNTERS: dict[str, tuple[str, str]] = {
    # metric name (without _total) -> (ServiceStats field, help)
    "ohs_engine_commands": ("commands", "Commands submitted (gateway, simulator and ticks)"),
    "ohs_engine_events": ("events", "Events emitted, journaled and published"),
    "ohs_engine_rejected": ("rejected", "Commands rejected (business rules and wire ranges)"),
    "ohs_engine_out_of_range": ("out_of_range", "Commands rejected by the wire-range rules (never journaled)"),
    "ohs_engine_feed_messages": ("feed_messages", "Batches of events sent on the feed"),
    "ohs_engine_feed_dropped": (
        "feed_dropped",
        "Feed batches the socket refused (PUB drops for a slow subscriber silently: see the consumers' gaps)",
    ),
    "ohs_engine_replay_requests": ("replay_requests", "Replay requests accepted"),
    "ohs_engine_replayed_events": ("replayed_events", "Events sent by the replay service"),
    "ohs_engine_replay_busy": ("replay_busy", "Replay requests refused as busy (one per client, a global cap)"),
    "ohs_engine_replay_abandoned": ("replay_abandoned", "Replays abandoned because their client stopped reading"),
    "ohs_engine_replay_errors": ("replay_errors", "Malformed replay requests"),
    "ohs_engine_gateway_errors": ("gateway_errors", "Gateway requests refused as malformed"),
    "ohs_engine_handler_errors": ("handler_errors", "Unexpected errors in a request handler, survived"),
    "ohs_engine_unpublishable": ("unpublishable", "UNPUBLISHABLE markers sent in place of events (feed and replay)"),
}


def version() -> str:
    try:
        return metadata.version("order-history-service")
    except metadata.PackageNotFoundError:
        return "dev"


class EngineCollector(Collector):
    """Reads the service's counters when scraped: the engine loop pays nothing per event."""

    def __init__(self, stats: Callable[[], object], status: Callable[[], dict[str, object]]) -> None:
        self._stats, self._status, self._version = stats, status, version()

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        for name, (attr, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(getattr(stats, attr)))
        st = self._status()
        for name, key, doc in (
            ("ohs_engine_last_seq", "last_seq", "Seq of the last event emitted"),
            ("ohs_engine_epoch", "epoch", "Engine epoch (journal creation time, microseconds)"),
        ):
            yield GaugeMetricFamily(name, doc, value=float(st[key]))  # type: ignore[arg-type]
        info = GaugeMetricFamily("ohs_build_info", "Build of the running component", labels=["component", "version"])
        info.add_metric(["engine", self._version], 1.0)
        yield info


def serve(
    port: int,
    stats: Callable[[], object],
    status: Callable[[], dict[str, object]],
    *,
    host: str = "127.0.0.1",
    stale_after_s: float = 10.0,
) -> ThreadingHTTPServer | None:
    """Start the endpoint in a daemon thread; None (logged) if the port cannot be bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(stats, status))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path.startswith("/metrics"):
                    body, code, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/health"):
                    st = dict(status())
                    age = time.monotonic() - float(st.pop("last_loop", 0.0))  # type: ignore[arg-type]
                    st["loop_age_s"] = round(age, 3)
                    code = 200 if st.get("phase") == "running" and age < stale_after_s else 503
                    st["status"] = "ok" if code == 200 else "stale"
                    body, ctype = json.dumps(st).encode(), "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
            except Exception:  # a scrape must never take anything down
                log.exception("metrics endpoint failed")
                body, code, ctype = b"error\n", 500, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: no log
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        log.error("metrics endpoint not served: cannot bind %s:%d (%s); the engine runs on without it", host, port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="engine-http", daemon=True).start()
    return server
