"""The API's Prometheus metrics (names are part of the alert rules' and the dashboard's contract), served
on the API's own port at ``/metrics`` without a token, and the middleware that counts requests.

``route`` is the route's template (``/users/{user_id}/orders``), never the path: one series per
endpoint, however many users ask. A request no route matches counts as ``unmatched``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from kit.version import register_build_info

__all__ = ["A", "RequestMetrics"]


class _Metrics:
    def __init__(self) -> None:
        self.requests = Counter("ohs_api_requests_total", "HTTP requests answered", ["route", "status"])
        self.latency = Histogram(
            "ohs_api_request_seconds",
            "Time to answer an HTTP request",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.ws_subscribers = Gauge("ohs_api_ws_subscribers", "Open live-stream WebSockets")
        self.live_tail_delay = Gauge(
            "ohs_api_live_tail_delay_seconds",
            "Age of the oldest record the live tail holds for the worker's commit (0 when none waits)",
        )


A = _Metrics()
register_build_info("api")


class RequestMetrics:
    """Pure ASGI middleware: requests by route template and status, and their duration."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering
        start = time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            A.requests.labels(route, str(status)).inc()
            A.latency.labels(route).observe(time.perf_counter() - start)
