"""Production credentials, rehearsed on a private stack: Kafka with SASL/PLAIN on its only client
listener, Cassandra with PasswordAuthenticator and CassandraAuthorizer (``ohs stack up`` with
``OHS_AUTH=true``; issue 15, item 4).

Every process runs as its own principal, as in production: the bridge, the worker, the API and
the on-call tools (``ohs lag``, ``ohs audit``, ``ohs orders``) connect with their credentials and
do their job, and each is refused without them (or with the wrong ones). Cassandra's grants are
real: the API's role and the bridge's cannot write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cassandra import Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable
from confluent_kafka.admin import AdminClient

from stack.lifecycle import reset, up
from stack.settings import StackSettings
from tests.integration.pipeline import Pipeline, free_port
from tests.integration.streams.test_worker import USERS, _check_rows, _truth, _worker_env

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, stack_endpoints: Any) -> Iterator[StackSettings]:
    # stack_endpoints: the session's stack has fetched the jars; this one reuses the cache.
    s = StackSettings(
        state=tmp_path_factory.mktemp("secure") / "state",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        cql_port=free_port(),
        cassandra_storage_port=free_port(),
        cassandra_jmx_port=free_port(),
        kafka_heap="512m",
        cassandra_heap="1g",
        auth=True,
    )
    try:
        up(s, log=lambda m: print(f"[secure stack] {m}"))
        yield s
    finally:
        reset(s, log=lambda m: None)


def creds(s: StackSettings, user: str, password: str | None = None) -> dict[str, str]:
    """One principal's environment: the same user name for Kafka (SASL) and Cassandra (role)."""
    pw = password if password is not None else s.users[user]
    return {
        "OHS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "OHS_KAFKA_SASL_MECHANISM": "PLAIN",
        "OHS_KAFKA_SASL_USERNAME": user,
        "OHS_KAFKA_SASL_PASSWORD": pw,
        "OHS_CQL_USERNAME": user,
        "OHS_CQL_PASSWORD": pw,
    }


def session_as(s: StackSettings, user: str, password: str) -> tuple[Cluster, Any]:
    cluster = Cluster(
        ["127.0.0.1"], port=s.cql_port, protocol_version=5, auth_provider=PlainTextAuthProvider(user, password)
    )
    return cluster, cluster.connect()


def ohs(p: Pipeline, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ohs.cli", *args],
        env=p.env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=p.workdir,
    )


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_until(cond: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_every_process_connects_as_its_principal_and_is_refused_without(secure: StackSettings, tmp_path: Path) -> None:
    s = secure
    env = {
        "OHS_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "OHS_CQL_CONTACT_POINTS": "127.0.0.1",
        "OHS_CQL_PORT": str(s.cql_port),
    }
    # Nothing of the session's own environment may lend a credential (or the shared stack's endpoints).
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OHS_KAFKA_", "OHS_CQL_"))}
    p = Pipeline({**base, **env}, tmp_path)
    p.keyspace = f"sec_{uuid.uuid4().hex[:8]}"
    p.group = f"g-{p.tag}"
    admin, superuser = session_as(s, "cassandra", s.cassandra_superuser_password.get_secret_value())
    try:
        bridge_port, worker_env = free_port(), _worker_env(p, p.group)
        p.start("engine", ["engine", "run"])
        client = p.client()
        p.start("bridge", ["bridge"], {**creds(s, "bridge"), "OHS_BRIDGE_METRICS_PORT": str(bridge_port)})
        p.start("worker", ["worker"], {**creds(s, "worker"), **worker_env})
        p.drive(client, 300, seed=71, users=USERS)
        client.close()
        p.settle()

        # The bridge (SASL) relayed, the worker (SASL + its role) wrote what the engine says.
        engine, updates = _truth(p)
        _check_rows(superuser, p.keyspace, engine, updates)
        status, body = http_status(f"http://127.0.0.1:{bridge_port}/health")
        assert status == 200, body

        # The API: its own principal reads Cassandra and tails Kafka.
        api_port = free_port()
        token = f"op-{uuid.uuid4().hex}"
        api_env = {
            **creds(s, "api"),
            "OHS_KEYSPACE": p.keyspace,
            "OHS_API_TOPIC_UPDATES": p.topics["updates"],
            "OHS_API_TOPIC_TRADES": p.topics["trades"],
            "OHS_API_WORKER_GROUP": p.group,
            "OHS_API_TOKENS": json.dumps({token: {"role": "operator"}}),
        }
        p.start("api", ["api", "--port", str(api_port)], api_env)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=15) as http:
            wait_until(lambda: http_status(f"http://127.0.0.1:{api_port}/health")[0] == 200, "the API to be healthy")
            user = updates[-1].user_id
            resp = http.get(f"/users/{user}/orders", headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 200, resp.text
            mine = {e.order_id for e in updates if e.user_id == user}
            assert {o["order_id"] for o in resp.json()["orders"]} <= mine and resp.json()["orders"]

        # The on-call tools, as the ops principal.
        ops = creds(s, "ops")
        lag = ohs(p, ops, "lag", "--group", p.group, "--topic", p.topics["updates"], "--max-lag", "0")
        assert lag.returncode == 0, lag.stdout + lag.stderr
        t = p.topics
        audit = ohs(
            p, ops, "audit", "--json", "--journal-dir", str(p.workdir / "journal"), "--topic-updates", t["updates"],
            "--topic-trades", t["trades"], "--topic-balances", t["balances"], "--keyspace", p.keyspace,
            timeout=300,
        )  # fmt: skip
        assert audit.returncode == 0 and json.loads(audit.stdout)["ok"], audit.stdout[-3000:] + audit.stderr[-2000:]
        orders = ohs(p, {**ops, "OHS_KEYSPACE": p.keyspace}, "orders", "--user", str(user), "--json")
        assert orders.returncode == 0, orders.stderr

        # Refused without credentials, or with the wrong ones.
        for bad in ({}, creds(s, "ops", "not-the-password")):
            lag = ohs(p, bad, "lag", "--group", p.group)
            assert lag.returncode == 3, lag.stdout + lag.stderr  # 3: cannot reach Kafka
            orders = ohs(p, {**bad, "OHS_KEYSPACE": p.keyspace}, "orders", "--user", str(user))
            assert orders.returncode != 0 and "auth" in (orders.stdout + orders.stderr).lower(), orders.stderr
        with pytest.raises(NoHostAvailable, match=r"(?i)auth"):
            session_as(s, "worker", "not-the-password")

        # A bridge without credentials never gets to Kafka: it says so on /health, and creates nothing.
        lone_port = free_port()
        lone_topics = {
            "OHS_BRIDGE_TOPIC_UPDATES": f"lone.{p.tag}",
            "OHS_BRIDGE_TOPIC_CHECKPOINT": f"lone.cp.{p.tag}",
            "OHS_BRIDGE_METRICS_PORT": str(lone_port),
            "OHS_BRIDGE_BRIDGE_ID": f"lone-{p.tag}",
        }
        p.start("lone-bridge", ["bridge"], lone_topics)
        # A worker whose role password is wrong: alive, unhealthy, and saying why.
        bad_worker = {**creds(s, "worker"), "OHS_CQL_PASSWORD": "not-the-password", **_worker_env(p, f"bad-{p.tag}")}
        bad_worker["OHS_WORKER_WEB_PORT"] = str(free_port())
        p.start("bad-worker", ["worker"], bad_worker)
        time.sleep(15)
        status, body = http_status(f"http://127.0.0.1:{lone_port}/health")
        assert status == 503 and "starting" in body, body
        assert p.procs["lone-bridge"].poll() is None, p.log("lone-bridge")
        existing = AdminClient({"bootstrap.servers": s.kafka_bootstrap, **s.kafka_admin_config()}).list_topics(
            timeout=30
        )
        assert f"lone.{p.tag}" not in existing.topics  # it never got to create its topics
        status, body = http_status(f"http://127.0.0.1:{bad_worker['OHS_WORKER_WEB_PORT']}/health")
        assert status == 503 and "cassandra unavailable" in body.lower(), body
        assert p.procs["bad-worker"].poll() is None, p.log("bad-worker")

        # Grants: only the worker writes Cassandra; the API's role and the bridge's may not.
        for role in ("api", "bridge"):
            cluster, session = session_as(s, role, s.users[role])
            try:
                with pytest.raises(Unauthorized):
                    session.execute(
                        f"INSERT INTO {p.keyspace}.user_updates (user_id, day, epoch, seq) VALUES (1, 0, 1, 1)"
                    )
            finally:
                cluster.shutdown()
    finally:
        p.stop_all()
        admin.shutdown()
