"""The query API through a Kafka outage and a Cassandra outage: it stays up, says so on /health, and recovers.

These stop and restart servers of the stack, so they run only on a local stack of their own
(``OHS_STATE`` and a port block, see tests/conftest.py), never against an external one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.models import update_dict
from schemas.events import OrderUpdate
from stack.lifecycle import down, up
from stack.settings import StackSettings
from tests.integration.api.test_api import truth
from tests.integration.chaos.faults import wait_for
from tests.integration.pipeline import Pipeline, free_port

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

USERS = 6
OPERATOR = f"operator-{uuid.uuid4().hex}"
TOKENS = {u: f"user-{u}-{uuid.uuid4().hex}" for u in range(1, USERS + 1)}
OUTAGE_S = 40.0


@pytest.fixture
def local_stack(stack_endpoints: Any) -> Iterator[StackSettings]:
    import os

    if os.environ.get("OHS_TEST_STACK") == "external":
        pytest.skip("stops a server: needs a local stack of its own, not OHS_TEST_STACK=external")
    s = StackSettings()
    yield s
    up(s, log=lambda m: print(f"[stack] {m}"))  # whatever a failed test left stopped


def _auth(user: int | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR if user is None else TOKENS[user]}"}


def _api_env(keyspace: str, topic: str, group: str) -> dict[str, str]:
    tokens = {OPERATOR: {"role": "operator"}} | {t: {"user_id": u} for u, t in TOKENS.items()}
    return {
        "OHS_KEYSPACE": keyspace,
        "OHS_API_TOPIC_UPDATES": topic,
        "OHS_API_WORKER_GROUP": group,
        "OHS_API_TOKENS": json.dumps(tokens),
    }


def _start_api(p: Pipeline, port: int, env: dict[str, str]) -> httpx.Client:
    """Start ``ohs api`` and wait until it answers HTTP at all (whatever /health says)."""
    p.start("api", ["api", "--port", str(port)], env)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20)
    deadline = time.monotonic() + 60
    while True:
        assert p.procs["api"].poll() is None, f"the API exited with {p.procs['api'].returncode}:\n{p.log('api')}"
        try:
            http.get("/health")
            return http
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the API never answered:\n{p.log('api')}"
        time.sleep(0.3)


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets, read as a consumer of the group that never joins it."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=15).topics[topic]
        tps = c.committed([TopicPartition(topic, p) for p in meta.partitions], timeout=15)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def _ends(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
    try:
        meta = c.list_topics(topic, timeout=15).topics[topic]
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in meta.partitions}
    finally:
        c.close()


def _caught_up(bootstrap: str, group: str, topic: str) -> bool:
    try:
        ends = _ends(bootstrap, topic)
        return sum(ends.values()) > 0 and _committed(bootstrap, group, topic) == ends
    except KafkaException:  # a broker just restarted: leaders are being elected
        return False


class Listener:
    """One live stream client, reading in a thread (the sync client answers pings on its own)."""

    def __init__(self, ws_base: str, user: int, from_seq: int) -> None:
        self.user = user
        self.messages: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self.ws: ClientConnection = connect(
            f"{ws_base}/users/{user}/stream?from_seq={from_seq}", additional_headers=_auth(user), max_queue=None
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                self.messages.append(json.loads(self.ws.recv()))
        except ConnectionClosed as exc:
            self.closed = exc

    def wait_for(self, want: list[OrderUpdate], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < len(want) and self.closed is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # a duplicate or a foreign event would arrive right behind the last one
        assert self.closed is None, f"user {self.user}: the stream was closed: {self.closed}"
        got = [m["seq"] for m in self.messages]
        assert got == [ev.seq for ev in want], f"user {self.user}: gap or duplicate in the stream"
        assert self.messages == [update_dict(ev) for ev in want]

    def close(self) -> None:
        self.ws.close()


def _of(updates: list[OrderUpdate], user: int) -> list[OrderUpdate]:
    return [ev for ev in updates if ev.user_id == user]


def test_the_api_rides_out_a_kafka_outage_and_its_streams_resume(
    local_stack: StackSettings, stack_endpoints: Any, tmp_path: Any, keyspace_factory: Any
) -> None:
    """Before: the API aborted in librdkafka (``rd_kafka_enq_once_del_source_return: Assertion
    'eonce->refcnt > 0' failed``) from the tail's AdminClient ListConsumerGroupOffsets calls."""
    p = Pipeline(stack_endpoints.env(), tmp_path)
    keyspace = keyspace_factory("api_kafka")
    group = f"g-{p.tag}"
    bootstrap = stack_endpoints.kafka_bootstrap
    topic = p.topics["updates"]
    listeners: list[Listener] = []
    http: httpx.Client | None = None
    worker_env = {
        "OHS_WORKER_GROUP": group,
        "OHS_WORKER_TOPIC_UPDATES": topic,
        "OHS_WORKER_TOPIC_DLQ": p.topics["dlq"],
        "OHS_WORKER_PARTITIONS": "3",
        "OHS_KEYSPACE": keyspace,
        "OHS_WORKER_WEB_PORT": str(free_port()),
        "OHS_WORKER_BATCH_WINDOW_S": "0.05",
        "OHS_WORKER_STORE": "memory://",
    }
    try:
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"])
        p.start("worker", ["worker"], worker_env)
        p.drive(client, 300, seed=71, users=USERS)
        p.settle()
        wait_for(lambda: _caught_up(bootstrap, group, topic), "the worker to commit the first flow", 180)
        port = free_port()
        http = _start_api(p, port, _api_env(keyspace, topic, group))
        ready = {"status": "ok", "cassandra": True, "live_tail": True}
        wait_for(lambda: http.get("/health").json() == ready, "the API to be ready", 60)
        ws_base = f"ws://127.0.0.1:{port}"
        listeners = [Listener(ws_base, u, 0) for u in (1, 2, 3)]
        _, updates = truth(p)
        for listener in listeners:
            listener.wait_for(_of(updates, listener.user), timeout=60)

        down(local_stack, only="kafka")
        stopped = time.monotonic()
        p.drive(client, 300, seed=72, users=USERS)  # the engine goes on; its journal keeps everything
        wait_for(lambda: http.get("/health").json()["live_tail"] is False, "/health to report the tail down", 60)
        # A client arriving mid-outage gets its stored history, then waits for the live part.
        late = Listener(ws_base, 4, 0)
        listeners.append(late)
        while time.monotonic() - stopped < OUTAGE_S:
            assert p.procs["api"].poll() is None, f"the API died during the outage:\n{p.log('api')}"
            health = http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok", health.text  # Cassandra is up
            time.sleep(1.0)

        up(local_stack, log=lambda m: print(f"[stack] {m}"))

        def worker_caught_up() -> bool:
            if p.procs["worker"].poll() is not None:
                # The worker's own outage handling is another test's subject (issue 12, item 7): here
                # it only has to commit what the API may then stream.
                p.procs.pop("worker")
                p.start("worker", ["worker"], worker_env)
            return _caught_up(bootstrap, group, topic)

        p.drive(client, 200, seed=73, users=USERS)
        client.close()
        p.settle()
        wait_for(worker_caught_up, "the worker to commit everything", 240)
        _, updates = truth(p)
        for listener in listeners:
            listener.wait_for(_of(updates, listener.user), timeout=60)
        assert p.procs["api"].poll() is None, p.log("api")
        wait_for(lambda: http.get("/health").json()["live_tail"], "/health to report the tail up again", 60)
        assert "Assertion" not in p.log("api")
    finally:
        for listener in listeners:
            listener.close()
        if http is not None:
            http.close()
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        p.stop_all()


def test_the_api_starts_while_cassandra_is_down_and_serves_once_it_is_up(
    local_stack: StackSettings, stack_endpoints: Any, tmp_path: Any, keyspace_factory: Any, topic_factory: Any
) -> None:
    """Before: ``ohs api`` exited with rc 3 (lifespan failed: NoHostAvailable) while Cassandra was down."""
    p = Pipeline(stack_endpoints.env(), tmp_path)
    keyspace = keyspace_factory("api_cql")
    migrate = [sys.executable, "-m", "ohs.cli", "db", "migrate", "--keyspace", keyspace]
    done = subprocess.run(migrate, env=p.env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    topic = topic_factory("updates", partitions=3)
    data_paths = ["/users/1/stats", "/users/1/orders/active", "/users/1/orders", "/orders/5", "/orders/5/events"]
    http: httpx.Client | None = None
    try:
        down(local_stack, only="cassandra")
        port = free_port()
        http = _start_api(p, port, _api_env(keyspace, topic, f"g-{p.tag}"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:  # several connection attempts
            assert p.procs["api"].poll() is None, f"the API exited with {p.procs['api'].returncode}:\n{p.log('api')}"
            health = http.get("/health")
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "unavailable" and health.json()["cassandra"] is False
            for path in data_paths:
                resp = http.get(path, headers=_auth(1))
                assert resp.status_code == 503, (path, resp.text)
                assert resp.json() == {"detail": "storage unavailable, retry later"}
            assert http.get("/users/1/stats").status_code == 401, "authentication still comes first"
            time.sleep(1.0)
        with connect(f"ws://127.0.0.1:{port}/users/1/stream?from_seq=0", additional_headers=_auth(1)) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013  # try again later

        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        wait_for(lambda: http.get("/health").status_code == 200, "/health to turn 200", 120)
        assert http.get("/health").json() == {"status": "ok", "cassandra": True, "live_tail": True}
        stats = http.get("/users/1/stats", headers=_auth(1))
        assert stats.status_code == 200 and stats.json() == {"user_id": 1, "symbols": []}, stats.text
        assert http.get("/users/1/orders/active", headers=_auth(1)).json() == {"user_id": 1, "orders": [], "next": None}
        assert http.get("/orders/5", headers=_auth(1)).status_code == 404
        assert p.procs["api"].poll() is None
        log = (p.workdir / "api.log").read_text()
        assert log.count("Cassandra not reachable") >= 2, log[-3000:]  # it kept retrying, with back-off
    finally:
        if http is not None:
            http.close()
        up(local_stack, log=lambda m: print(f"[stack] {m}"))
        p.stop_all()
