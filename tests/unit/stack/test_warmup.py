"""The warm-up is best effort: servers that do not answer make it log and return, never raise."""

from __future__ import annotations

import os

import pytest

from stack import warmup
from stack.settings import StackSettings
from tests.ports import free_port


def test_servers_that_do_not_answer_are_logged_and_up_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "_CONNECT_S", 1.0)
    s = StackSettings(_env_file=None, kafka_port=free_port(), cql_port=free_port())  # type: ignore[call-arg]
    logs: list[str] = []
    report = warmup.warm_up(s, 0.5, {"kafka", "cassandra"}, logs.append)
    assert report.kafka_records == 0 and report.cassandra_rows == 0
    assert sorted(e.split(":")[0] for e in report.errors or []) == ["cassandra", "kafka"]
    assert len(logs) == 2 and all(m.startswith("warm-up: ") for m in logs), logs


def test_compiler_cpu_is_zero_for_a_process_without_jit_threads_or_gone() -> None:
    assert warmup.compiler_cpu_s(os.getpid()) == 0.0  # CPython has no compiler threads
    assert warmup.compiler_cpu_s(2**22 + 7) == 0.0  # above pid_max's default: no such process
