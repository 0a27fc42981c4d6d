"""The bridge's HTTP endpoint: ``/metrics`` (Prometheus) and ``/health`` (JSON).

``/health`` answers 200 while the bridge is running and its main loop has
turned within the last ``stale_after_s`` seconds; 503 with ``status``
``starting`` while it is still trying to reach Kafka (the endpoint is served
before the first attempt), ``stale`` when the loop is stuck, ``stopping`` on
the way out. It also reports the epoch, watermark, acknowledged seq ceiling,
the engine's last seq and the records in flight or waiting.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["serve"]


def serve(
    port: int, status: Callable[[], dict[str, object]], stale_after_s: float = 10.0, host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """Start the endpoint on ``host:port`` in a daemon thread; ``status()`` must be cheap."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, code, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/health"):
                st = status()
                age = time.monotonic() - float(st.pop("last_loop", 0.0))  # type: ignore[arg-type]
                st["loop_age_s"] = round(age, 3)
                phase = st.get("phase", "running")
                code = 200 if phase == "running" and age < stale_after_s else 503
                st["status"] = "ok" if code == 200 else ("stale" if phase == "running" else phase)
                body, ctype = json.dumps(st).encode(), "application/json"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: no log
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="bridge-http", daemon=True).start()
    return server
