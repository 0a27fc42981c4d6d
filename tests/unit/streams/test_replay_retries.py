"""Replay's steps retry with jittered back-off (kit.retry): driver errors until they pass, a
ReplayError (or any error its class calls final) at once, and a stop abandons the step."""

from __future__ import annotations

import asyncio

import pytest

from streams.errors import SinkRejected
from streams.replay import Replay, ReplayError, ReplayOptions, _Abandoned
from streams.settings import WorkerSettings


def _replay() -> Replay:
    return Replay(WorkerSettings(retry_initial_s=0.001, retry_max_s=0.002), ReplayOptions())


def _flaky(failures: list[BaseException]):
    calls = []

    def step() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    return step, calls


def test_library_errors_are_retried_until_the_step_passes():
    step, calls = _flaky([TimeoutError("not acknowledged yet"), OSError("reset"), RuntimeError("driver")])
    assert asyncio.run(_replay()._until_done("a step", step)) == "done"
    assert len(calls) == 4


@pytest.mark.parametrize("final", [ReplayError("refused"), SinkRejected("schema")])
def test_an_error_whose_class_is_final_propagates_at_once(final):
    step, calls = _flaky([final])
    with pytest.raises(type(final)):
        asyncio.run(_replay()._until_done("a step", step))
    assert len(calls) == 1


def test_a_stop_abandons_a_step_that_still_fails():
    replay = _replay()
    calls = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 2:
            replay.stop(15)
        raise OSError("still down")

    with pytest.raises(_Abandoned):
        asyncio.run(replay._until_done("a step", step))
    assert len(calls) == 2
