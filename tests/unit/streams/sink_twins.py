"""An in-memory twin of cassandra-driver's ``Session`` for ``streams.sink.CassandraSink``.

``prepare`` returns a real ``PreparedStatement`` with one column per ``?`` of the CQL (so the
sink's ``Binder`` checks every row's value count), each serialized by ``repr``; ``execute_async``
returns a response future whose callbacks run on another thread, as the driver's I/O thread runs
them, after ``delay`` seconds, with the outcome ``outcome(request)`` chooses (None: success).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from cassandra.protocol import ColumnMetadata
from cassandra.query import PreparedStatement


class _ReprType:
    """A CQL type the Binder does not special-case: the driver's generic path, repr as bytes."""

    @staticmethod
    def serialize(value: Any, protocol_version: int) -> bytes:
        return repr(value).encode()


class ResponseFutureTwin:
    def __init__(self, session: SessionTwin, request: Any) -> None:
        self.session, self.request = session, request

    def add_callbacks(self, ok: Callable[[Any], None], failed: Callable[[BaseException], None]) -> None:
        outcome = self.session.outcome(self.request)

        def complete() -> None:
            time.sleep(self.session.delay)
            with self.session.lock:
                self.session.in_flight -= 1
            if outcome is None:
                ok([])
            else:
                failed(outcome)

        threading.Thread(target=complete, daemon=True).start()


class SessionTwin:
    """``prepare`` and ``execute_async`` of a session, and ``cluster.metadata`` of one node."""

    def __init__(self, hosts: int = 1) -> None:
        self.prepared: dict[str, PreparedStatement] = {}
        self.executed: list[Any] = []
        self.outcome: Callable[[Any], BaseException | None] = lambda request: None
        self.raise_at_once: BaseException | None = None
        self.delay = 0.0
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        metadata = SimpleNamespace(token_map=None, all_hosts=lambda: list(range(hosts)), keyspaces={})
        self.cluster = SimpleNamespace(metadata=metadata)

    def prepare(self, cql: str) -> PreparedStatement:
        cols = [ColumnMetadata("ks", "t", f"c{i}", _ReprType) for i in range(cql.count("?"))]
        stmt = PreparedStatement(cols, b"id", [0], cql, "ks", 4, [], None)
        self.prepared[cql] = stmt
        return stmt

    def execute_async(self, request: Any) -> ResponseFutureTwin:
        if self.raise_at_once is not None:
            raise self.raise_at_once
        with self.lock:
            self.executed.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return ResponseFutureTwin(self, request)
