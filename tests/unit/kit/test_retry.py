"""kit.retry: jittered back-off within its bounds, and only what is retriable is retried."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import RetryCallState

from kit.retry import any_error, backoff, is_retriable, retrying, retrying_sync, unless_final


class _Flaky(Exception):
    retriable = True


class _Final(Exception):
    retriable = False


def _state(attempt: int) -> RetryCallState:
    state = RetryCallState(None, lambda: None, (), {})
    state.attempt_number = attempt
    return state


def test_the_waits_vary_and_stay_within_half_to_the_whole_of_the_ceiling():
    wait = backoff(0.2, 10.0)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 6.4), (7, 10.0), (50, 10.0)]:
        waits = [wait(_state(attempt)) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 100  # jittered: replicas do not retry in step
        assert max(waits) - min(waits) > ceiling / 4


def test_a_back_off_needs_sane_bounds():
    with pytest.raises(ValueError):
        backoff(-1, 1)
    assert all(1.0 <= backoff(2, 1)(_state(n)) <= 2.0 for n in (1, 5))  # the ceiling is at least initial
    assert backoff(0, 0)(_state(3)) == 0


def test_the_predicates_read_the_class():
    assert is_retriable(_Flaky()) and not is_retriable(_Final()) and not is_retriable(OSError())
    assert unless_final(_Flaky()) and unless_final(OSError()) and not unless_final(_Final())
    assert any_error(_Final()) and not any_error(asyncio.CancelledError()) and not any_error(KeyboardInterrupt())


def test_retriable_errors_are_retried_with_a_callback_each_time():
    calls, seen, slept = [], [], []

    def step() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _Flaky("not yet")
        return "done"

    for attempt in retrying_sync(0.01, 0.02, on_retry=lambda s: seen.append(s.attempt_number), sleep=slept.append):
        with attempt:
            result = step()
    assert (result, len(calls), seen) == ("done", 4, [1, 2, 3])
    assert len(slept) == 3 and all(0.005 <= s <= 0.02 for s in slept)


def test_a_non_retriable_error_propagates_at_once():
    calls, slept = [], []
    with pytest.raises(_Final, match="no"):
        for attempt in retrying_sync(0.01, 0.02, sleep=slept.append):
            with attempt:
                calls.append(1)
                raise _Final("no")
    assert (len(calls), slept) == (1, [])
    # An exception that declares nothing is not retried by default either (translate it first).
    with pytest.raises(OSError):
        for attempt in retrying_sync(0.01, 0.02, sleep=slept.append):
            with attempt:
                raise OSError("driver")
    assert slept == []


def test_stop_ends_the_retries_with_the_last_error():
    calls = []
    with pytest.raises(_Flaky):
        for attempt in retrying_sync(0.01, 0.02, stop=lambda: len(calls) >= 2, sleep=lambda s: None):
            with attempt:
                calls.append(1)
                raise _Flaky(str(len(calls)))
    assert len(calls) == 2


def test_the_async_retrier_retries_and_propagates_the_same_way():
    async def main() -> tuple[int, int]:
        calls, slept = [0, 0], []

        async def sleep(s: float) -> None:
            slept.append(s)

        async for attempt in retrying(0.01, 0.02, sleep=sleep):
            with attempt:
                calls[0] += 1
                if calls[0] < 3:
                    raise _Flaky("not yet")
        with pytest.raises(_Final):
            async for attempt in retrying(0.01, 0.02, sleep=sleep):
                with attempt:
                    calls[1] += 1
                    raise _Final("no")
        assert len(slept) == 2
        return calls[0], calls[1]

    assert asyncio.run(main()) == (3, 1)


def test_a_cancellation_is_never_retried():
    async def main() -> int:
        calls = 0
        with pytest.raises(asyncio.CancelledError):
            async for attempt in retrying(0.01, 0.02, retry=any_error):
                with attempt:
                    calls += 1
                    raise asyncio.CancelledError
        return calls

    assert asyncio.run(main()) == 1
