"""AcsyllaSink.write against an in-memory session: every await of an answer is bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streams.acsylla_sink import AcsyllaSink
from streams.errors import SinkUnavailable
from streams.planning import Pending
from streams.settings import WorkerSettings


class _Session:
    """Answers every request at once, except those listed in ``silent``: their answer never comes."""

    def __init__(self, silent: set[str]) -> None:
        self.silent = silent
        self.sent: list[str] = []

    async def execute(self, request: str) -> None:
        self.sent.append(request)
        if request in self.silent:
            await asyncio.Event().wait()  # a future nobody resolves

    execute_batch = execute


def _sink(session: _Session) -> AcsyllaSink:
    s = WorkerSettings(_env_file=None, request_timeout_s=0.01)  # type: ignore[call-arg]
    sink = AcsyllaSink(session, {}, None, s)  # type: ignore[arg-type]
    sink.answer_bound_s = 0.2  # the bound under test, short for the test (2 x 10 s + 10 s by default)
    return sink


def test_an_answer_that_never_comes_is_a_retriable_failure_and_the_retry_resends_only_it() -> None:
    session = _Session(silent={"b"})
    sink = _sink(session)
    pending = Pending(["a", "b", "c"])

    async def run() -> Any:
        with pytest.raises(SinkUnavailable, match="no answer from Cassandra within") as info:
            await asyncio.wait_for(sink.write(pending), 30)  # the outer bound only catches a regression
        return info.value

    exc = asyncio.run(run())
    assert exc.retriable
    assert pending.done == [True, False, True]
    session.silent.clear()  # Cassandra answers again
    asyncio.run(sink.write(pending))
    assert pending.done == [True, True, True]
    assert session.sent == ["a", "b", "c", "b"]


def test_the_default_bound_leaves_the_drivers_own_timeout_room() -> None:
    s = WorkerSettings(_env_file=None)  # type: ignore[call-arg]
    sink = AcsyllaSink(_Session(set()), {}, None, s)  # type: ignore[arg-type]
    assert sink.answer_bound_s > 2 * s.request_timeout_s
