"""Two bridges on one engine's PUB feed, each with its own topics and bridge id: both get every seq.

Before, the feed was a PUSH socket: with two bridges connected each received every other seq and
replayed the rest. Now the engine publishes, every subscriber receives every event, and each
bridge recovers on its own what it missed (its late start, PUB/SUB's slow joiner, its own kill)
from the replay service. Real engine and bridge processes, real Kafka; ``ohs audit`` of each topic
set against the journal must be clean.
"""

from __future__ import annotations

import signal

import pytest

from tests.integration.chaos.faults import audit, metrics, wait_for
from tests.integration.pipeline import Pipeline, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def two(stack_endpoints, tmp_path):
    """Two pipelines sharing one engine (its journal and endpoints), each with its own topic set."""
    a = Pipeline(stack_endpoints.env(), tmp_path)
    b = Pipeline(stack_endpoints.env(), tmp_path)
    b.gateway, b.feed, b.replay = a.gateway, a.feed, a.replay
    yield a, b
    b.stop_all()
    a.stop_all()


def _watermark(port: int) -> float:
    return metrics(port).get("ohs_bridge_watermark", 0.0)


def test_two_bridges_each_hold_every_seq_a_late_one_catches_up_and_a_kill_disturbs_only_itself(two, stack_endpoints):
    a, b = two
    port_a, port_b = free_port(), free_port()
    a.start("engine", ["engine", "run"], {"OHS_ENGINE_METRICS_PORT": "0"})
    client = a.client()
    a.start("bridge-a", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(port_a)})
    a.drive(client, 1_000, seed=11)

    # B starts late, with nothing in its checkpoint: everything before its subscription comes
    # from the replay service, while the load goes on.
    b.start("bridge-b", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(port_b)})
    last = a.drive(client, 1_000, seed=12)
    wait_for(lambda: _watermark(port_b) >= last, "the late bridge to catch up from replay", timeout=180)

    # kill -9 A under load: B goes on by itself, up to what the engine has now.
    a.kill("bridge-a")
    last = a.drive(client, 1_000, seed=13)
    wait_for(lambda: _watermark(port_b) >= last, "bridge B to keep up while A is dead", timeout=180)
    assert "bridge-a" not in a.procs and b.procs["bridge-b"].poll() is None

    # A restarts from its checkpoint and replays what it missed; more load meanwhile.
    a.start("bridge-a", ["bridge"], {"OHS_BRIDGE_METRICS_PORT": str(port_a)})
    last = a.drive(client, 1_000, seed=14)
    for port, name in ((port_a, "A"), (port_b, "B")):
        wait_for(lambda port=port: _watermark(port) >= last, f"bridge {name} to catch up", timeout=180)

    # Both connected and caught up: each receives the new events from the feed itself (a PUSH feed
    # gave each every other seq, and each replayed the other half).
    before = {port: metrics(port)["ohs_bridge_replayed_total"] for port in (port_a, port_b)}
    first = last
    last = a.drive(client, 1_000, seed=15)
    for port in (port_a, port_b):
        wait_for(lambda port=port: _watermark(port) >= last, "both bridges to relay the last load", timeout=180)
        replayed = metrics(port)["ohs_bridge_replayed_total"] - before[port]
        assert replayed < (last - first) / 4, f"{replayed} of {last - first} events came from the replay service"
    assert metrics(port_b)["ohs_bridge_replayed_total"] > 0, "the late bridge's start came from replay"
    client.close()
    settled = a.settle()
    for port, name in ((port_a, "A"), (port_b, "B")):
        wait_for(lambda port=port: _watermark(port) >= settled, f"bridge {name} to reach seq {settled}", timeout=180)
    assert a.engine_info()[1] == settled, "the engine emitted more after settling"
    a.kill("engine", signal.SIGTERM)
    audit(a, stack_endpoints.kafka_bootstrap)
    audit(b, stack_endpoints.kafka_bootstrap)
    assert a.topics["updates"] != b.topics["updates"]
