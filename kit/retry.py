"""Retries with jittered exponential back-off: one way for every package, tenacity underneath.

``backoff(initial, maximum)`` is the wait: attempt ``n`` failed, so wait a uniform random time in
``[c/2, c]`` with ``c = min(initial * 2**(n-1), maximum)`` ("equal jitter": replicas that failed
together do not retry in step, and no wait is ever near zero). ``retrying`` (async) and
``retrying_sync`` build a tenacity retrier on it that retries only what ``retry`` accepts, by
default the exceptions whose class declares ``retriable = True`` (each package's errors do), calls
``on_retry`` before each wait (metrics, a log line) and re-raises the last exception when it stops.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_never
from tenacity.wait import wait_base, wait_exponential

__all__ = ["any_error", "backoff", "is_retriable", "retrying", "retrying_sync", "unless_final"]


class _EqualJitter(wait_exponential):
    def __call__(self, retry_state: RetryCallState) -> float:
        high = super().__call__(retry_state)
        return random.uniform(high / 2, high)


def backoff(initial: float, maximum: float) -> wait_base:
    """The wait after failed attempt n: uniform in [c/2, c], c = min(initial * 2**(n-1), maximum).
    A ``maximum`` below ``initial`` is read as ``initial`` (every wait the same ceiling)."""
    if initial < 0 or maximum < 0:
        raise ValueError(f"a back-off cannot be negative: {initial}, {maximum}")
    return _EqualJitter(multiplier=initial, exp_base=2, min=0, max=max(initial, maximum))


def is_retriable(exc: BaseException) -> bool:
    """The exception's class says trying again can help (``retriable = True``)."""
    return isinstance(exc, Exception) and getattr(type(exc), "retriable", False) is True


def unless_final(exc: BaseException) -> bool:
    """Any exception but one whose class says retrying cannot help: for steps that call libraries
    whose errors share no base class (each worth a retry), next to the project's own errors."""
    return isinstance(exc, Exception) and getattr(type(exc), "retriable", True) is not False


def any_error(exc: BaseException) -> bool:
    """Every ``Exception`` (never a cancellation or an exit)."""
    return isinstance(exc, Exception)


def _options(
    initial: float,
    maximum: float,
    retry: Callable[[BaseException], bool],
    on_retry: Callable[[RetryCallState], None] | None,
    what: str | None,
    log: logging.Logger | None,
    stop: Callable[[], bool] | None,
) -> dict[str, Any]:
    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None:
            on_retry(state)
        if log is not None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s failed (attempt %d, retry in %.1fs): %s", what, state.attempt_number, wait, exc)

    return {
        "wait": backoff(initial, maximum),
        "retry": retry_if_exception(retry),
        "before_sleep": before_sleep,
        "stop": stop_never if stop is None else (lambda _state: stop()),
        "reraise": True,
    }


def retrying(
    initial: float,
    maximum: float,
    *,
    retry: Callable[[BaseException], bool] = is_retriable,
    on_retry: Callable[[RetryCallState], None] | None = None,
    what: str | None = None,
    log: logging.Logger | None = None,
    stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Awaitable[Any]] | None = None,
) -> AsyncRetrying:
    """``async for attempt in retrying(...): with attempt: ...``: retried with ``backoff`` while
    ``retry(exc)`` holds, until it succeeds or ``stop()`` is true after a failure (never, by
    default); then the last exception is raised as it was. ``what`` and ``log``: a warning per retry."""
    options = _options(initial, maximum, retry, on_retry, what, log, stop)
    if sleep is not None:
        options["sleep"] = sleep
    return AsyncRetrying(**options)


def retrying_sync(
    initial: float,
    maximum: float,
    *,
    retry: Callable[[BaseException], bool] = is_retriable,
    on_retry: Callable[[RetryCallState], None] | None = None,
    what: str | None = None,
    log: logging.Logger | None = None,
    stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Any] | None = None,
) -> Retrying:
    """``retrying`` for a thread: ``for attempt in retrying_sync(...): with attempt: ...``.
    ``sleep`` may return early (an ``Event.wait``) so a stop need not wait out the back-off."""
    options = _options(initial, maximum, retry, on_retry, what, log, stop)
    if sleep is not None:
        options["sleep"] = sleep
    return Retrying(**options)
