"""The bridge and a Kafka that is not there: at start, and while it runs (with a restart of the
bridge in the middle of the outage). These tests stop and start the session's own Kafka (the
local stack, like the fault suite), so they need the local stack, not an external one."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from stack.lifecycle import down, up
from stack.settings import StackSettings
from tests.integration.bridge.test_bridge import _assert_log_matches_journal
from tests.integration.pipeline import Pipeline, free_port

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def local_stack(stack_endpoints) -> Iterator[StackSettings]:
    if os.environ.get("OHS_TEST_STACK") == "external":
        pytest.skip("stops Kafka: needs the local stack, not OHS_TEST_STACK=external")
    s = StackSettings()
    yield s
    up(s, log=lambda m: print(f"[stack] {m}"))  # whatever a failed test left stopped


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def _wait(cond, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_bridge_started_while_kafka_is_down_waits_then_relays_every_seq(local_stack, stack_endpoints, tmp_path):
    """Issue item 8 (bridge part): started while Kafka was down, the bridge exited after 31 s
    (BridgeError(retriable=True) not retried)."""
    p = Pipeline(stack_endpoints.env(), tmp_path)
    port = free_port()
    env = {"OHS_BRIDGE_METRICS_PORT": str(port), "OHS_BRIDGE_CONNECT_BACKOFF_MAX_MS": "4000"}
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        last = p.drive(client, 500, seed=61)  # events journaled before any bridge
        down(local_stack, only="kafka")
        started = time.monotonic()
        p.start("bridge", ["bridge"], env)
        _wait(lambda: _health(port)[0] == 503, "/health to answer while Kafka is down", 30)
        # Beyond the 31 s after which the old bridge gave up; the engine goes on meanwhile.
        last = max(last, p.drive(client, 300, seed=62))
        while time.monotonic() - started < 40:
            assert p.procs["bridge"].poll() is None, f"the bridge exited while Kafka was down:\n{p.log('bridge')}"
            code, body = _health(port)
            assert (code, body.get("status")) == (503, "starting"), body
            time.sleep(2)
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        _wait(lambda: _health(port)[0] == 200, "the bridge to run once Kafka is back", 180)
        last = max(last, p.drive(client, 300, seed=63))
        attempts = (p.workdir / "bridge.log").read_text().count("cannot start (attempt")
        # One line per attempt, at a sane rate: jittered back-off of up to 4 s over ~40 s.
        assert 3 <= attempts <= 60, attempts

        # Kafka goes away again under a running bridge, which is killed and restarted during the
        # outage: neither the running bridge nor the restarted one may exit.
        down(local_stack, only="kafka")
        last = max(last, p.drive(client, 500, seed=64))
        time.sleep(3)
        assert p.procs["bridge"].poll() is None, f"the bridge exited during the outage:\n{p.log('bridge')}"
        p.kill("bridge")  # kill -9: nothing acknowledged is lost, the rest is replayed
        p.start("bridge", ["bridge"], env)
        _wait(lambda: _health(port)[1].get("status") == "starting", "the restarted bridge to wait for Kafka", 30)
        time.sleep(5)
        assert p.procs["bridge"].poll() is None, p.log("bridge")
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        _wait(lambda: _health(port)[0] == 200, "the restarted bridge to run", 180)
        last = max(last, p.drive(client, 300, seed=65))
        client.close()
        _assert_log_matches_journal(p, stack_endpoints.kafka_bootstrap, last)
        assert p.procs["bridge"].poll() is None, p.log("bridge")
        p.kill("bridge", signal.SIGTERM)
    finally:
        p.stop_all()
