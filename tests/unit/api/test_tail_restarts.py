"""The live tail's restarts: jittered back-off (kit.retry) after a failure, at once after a
reassignment, and nothing but a stop (or the API's loop closing) ends the thread."""

from __future__ import annotations

import asyncio

from confluent_kafka import KafkaError, KafkaException

import api.live as live
from api.settings import ApiSettings


def _tail(monkeypatch, outcomes: list[BaseException | None]) -> tuple[live.Tail, list[float], list[int]]:
    monkeypatch.setattr(live, "_RESTART_MIN_S", 0.001)
    monkeypatch.setattr(live, "_RESTART_MAX_S", 0.002)
    loop = asyncio.new_event_loop()
    tail = live.Tail(ApiSettings(), live.Hub(8), loop)
    sessions: list[int] = []
    waits: list[float] = []
    real_wait = tail._stop.wait

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return real_wait(seconds)

    def session() -> None:
        sessions.append(1)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(tail._stop, "wait", wait)
    monkeypatch.setattr(tail, "_session", session)
    return tail, waits, sessions


def test_failures_back_off_and_a_reassignment_restarts_at_once(monkeypatch):
    down = KafkaException(KafkaError(KafkaError._TRANSPORT, "down"))
    tail, waits, sessions = _tail(monkeypatch, [down, ValueError("bug"), live._Reassign(), None])
    tail._run()
    assert len(sessions) == 4
    assert len(waits) == 2 and all(0.0005 <= w <= 0.002 for w in waits)  # none after the reassignment
    tail.loop.close()


def test_a_stop_ends_the_restarts(monkeypatch):
    tail, _waits, sessions = _tail(monkeypatch, [])

    def failing() -> None:
        sessions.append(1)
        if len(sessions) == 3:
            tail._stop.set()
        raise OSError("down")

    monkeypatch.setattr(tail, "_session", failing)
    tail._run()
    assert len(sessions) == 3
    tail.loop.close()


def test_the_loop_closing_ends_the_tail(monkeypatch):
    tail, waits, sessions = _tail(monkeypatch, [RuntimeError("Event loop is closed")])
    tail.loop.close()
    tail._run()
    assert (len(sessions), waits) == (1, [])
