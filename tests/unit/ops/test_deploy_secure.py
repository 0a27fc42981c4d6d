"""docker-compose.secure.yml, read as compose merges it over docker-compose.yml: every process runs
as its own principal with settings it really reads, only the bridge may write the event topics,
only the worker may write Cassandra. (No Docker engine here: the same credentials run for real in
tests/integration/ops/test_credentials.py on the local stack.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from tests.unit.ops.test_deploy import (
    PROCESS_SETTINGS,
    all_setting_names,
    env_names,
    interpolate,
    only_env,
    settings_class,
)

ROOT = Path(__file__).resolve().parents[3]
BASE, OVERRIDE = ROOT / "docker-compose.yml", ROOT / "docker-compose.secure.yml"
EVENT_TOPICS = {"orders.updates", "orders.trades", "balances.updates"}
WRITES = {"write", "all"}


def merged() -> dict[str, dict[str, Any]]:
    """Services as ``docker compose -f base -f override`` merges them: maps merged, lists of volumes
    and depends_on added, scalars and commands replaced."""
    base = yaml.safe_load(BASE.read_text())["services"]
    over = yaml.safe_load(OVERRIDE.read_text())["services"]
    out = {name: dict(svc) for name, svc in base.items()}
    for name, svc in over.items():
        target = out.setdefault(name, {})
        for key, value in svc.items():
            if key in ("environment", "depends_on") and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            elif key == "volumes" and key in target:
                target[key] = [*target[key], *value]
            elif key == "healthcheck" and key in target:
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return out


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in (svc.get("environment") or {}).items()}


def process_of(svc: dict[str, Any]) -> str | None:
    cmd = svc.get("command") or []
    return cmd[0] if "build" in svc and cmd and cmd[0] in PROCESS_SETTINGS else None


def test_every_process_runs_as_its_own_principal_with_settings_it_reads() -> None:
    valid = all_setting_names()
    principals = {}
    for name, svc in merged().items():
        proc = process_of(svc)
        env = env_of(svc)
        ohs_vars = {k for k in env if k.startswith("OHS_")}
        assert ohs_vars <= valid, f"{name}: {sorted(ohs_vars - valid)} are not settings"
        if proc is None or proc == "engine":
            continue
        cls = settings_class(PROCESS_SETTINGS[proc])
        assert ohs_vars <= env_names(cls), f"{name}: {cls.__name__} does not read {sorted(ohs_vars - env_names(cls))}"
        with only_env(env):
            s: Any = cls()
        if proc != "db":
            assert s.kafka_auth.sasl and s.kafka_auth.mechanism == "SCRAM-SHA-256", name
            assert s.kafka_auth.password, f"{name}: no Kafka password"
            principals[name] = s.kafka_auth.username
        if proc in ("worker", "db", "api"):
            assert s.cql_auth.username and s.cql_auth.password, f"{name}: no Cassandra role"
            assert s.cql_auth.username == ("worker" if proc in ("worker", "db") else "api"), name
        if proc == "bridge":
            assert not hasattr(s, "cql_auth"), "the bridge has no Cassandra credentials to give"
    assert principals == {"bridge": "bridge", "worker": "worker", "api": "api"}


def _acls() -> list[tuple[str, set[str], set[str]]]:
    """(principal, operations, topics) of every `acl` line of the Kafka ACL script, variables expanded."""
    text = (ROOT / "deploy" / "redpanda" / "kafka-acl.sh").read_text()
    arrays = {m[1]: m[2] for m in re.finditer(r"^(\w+)=\((.*)\)$", text, re.M)}
    out = []
    for line in text.splitlines():
        if not line.startswith("acl "):
            continue
        for var, value in arrays.items():
            line = line.replace(f'"${{{var}[@]}}"', value)
        words = shlex.split(line)
        args = dict(zip(words[1::2], words[2::2], strict=False))
        topics = {words[i + 1] for i, w in enumerate(words) if w == "--topic"}
        out.append((args["--allow-principal"], set(args["--operation"].split(",")), topics))
    return out


def test_only_the_bridge_may_write_the_event_topics() -> None:
    acls = _acls()
    assert acls, "no ACL in the script"
    writers = {principal for principal, ops, topics in acls if ops & WRITES and topics & EVENT_TOPICS}
    assert writers == {"User:bridge"}
    readers = {principal for principal, ops, topics in acls if {"read"} <= ops and topics & EVENT_TOPICS}
    assert readers == {"User:worker", "User:api", "User:ops"}


def test_only_the_worker_may_write_cassandra() -> None:
    text = (ROOT / "deploy" / "scylla" / "cql-roles.sh").read_text()
    grants = re.findall(r"GRANT (\w+) ON ALL KEYSPACES TO (\w+)", text)
    assert grants
    writers = {role for perm, role in grants if perm in ("CREATE", "MODIFY", "ALTER", "ALL")}
    assert writers == {"worker"}
    assert "bridge" not in {role for _, role in grants} and "role bridge" not in text


def test_the_local_stack_grants_as_compose_does() -> None:
    from stack.health import GRANTS

    text = (ROOT / "deploy" / "scylla" / "cql-roles.sh").read_text()
    script = {(perm, role) for perm, role in re.findall(r"GRANT (\w+) ON ALL KEYSPACES TO (\w+)", text)}
    stack = {(grant.split()[0], role) for role, grants in GRANTS.items() for grant in grants}
    assert stack == script


def test_the_override_mounts_files_that_exist_and_waits_for_the_one_shots() -> None:
    services = merged()
    for name, svc in services.items():
        for volume in svc.get("volumes") or []:
            src = volume.split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} is missing"
    for name in ("bridge", "worker", "api"):
        assert services[name]["depends_on"]["kafka-acl"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["cql-roles"]["condition"] == "service_completed_successfully"
