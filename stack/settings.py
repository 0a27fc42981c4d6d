"""Settings of the local stack launcher (``ohs stack ...``), read once at the entry point."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["StackSettings"]


def _java_feature(java_home: Path) -> int:
    """The Java feature version of a JDK home, from its ``release`` file (0 if unknown)."""
    try:
        for line in (java_home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                return int(line.split("=", 1)[1].strip('"').split(".")[0])
    except (OSError, ValueError):
        pass
    return 0


def _default_registry_java() -> str:
    """A Java 21+ for the schema registry (Apicurio 3): JAVA_HOME if new enough, else the newest
    JDK under /usr/lib/jvm; "" when there is none (the registry then cannot start)."""
    candidates = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += sorted(jvm.iterdir(), key=_java_feature, reverse=True)
    for home in candidates:
        if _java_feature(home) >= 21 and (home / "bin" / "java").exists():
            return str(home / "bin" / "java")
    return ""


def _default_java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java") or "java"


class StackSettings(BaseSettings):
    """Where the servers come from, where their state lives, and how they listen.

    Ports and heaps default to a 2-core / 24 GiB developer machine; every field
    can be set from the environment (``OHS_`` + the upper-case field name).
    """

    model_config = SettingsConfigDict(env_prefix="OHS_", frozen=True, extra="ignore")

    cache: Path = Field(default=Path("~/.cache/ohs"), description="Maven-fetched jars (outside the repo).")
    state: Path = Field(default=Path(".ohs"), description="Configs, data, logs and pid files of the local stack.")
    host: str = Field(default="127.0.0.1", description="Loopback address every server binds to.")
    kafka_port: int = Field(default=9092, description="Kafka client listener.")
    kafka_controller_port: int = Field(default=9093, description="KRaft controller listener.")
    cql_port: int = Field(default=9042, description="Cassandra native (CQL) port.")
    cassandra_storage_port: int = Field(default=7000, description="Cassandra inter-node port (bound, unused).")
    cassandra_jmx_port: int = Field(default=7199, description="Cassandra local JMX port (nodetool).")
    kafka_version: str = Field(default="4.1.1", description="Apache Kafka release fetched from Maven Central.")
    cassandra_version: str = Field(default="5.0.6", description="Apache Cassandra release (5.0.x runs on Java 17).")
    # Two cores are shared by both servers and the Python pipeline: heaps are sized so that
    # GC stays cheap (no swap, short pauses) rather than for throughput of a dedicated box.
    kafka_heap: str = Field(default="1g", description="Kafka -Xmx/-Xms.")
    cassandra_heap: str = Field(default="2g", description="Cassandra -Xmx/-Xms.")
    java: str = Field(default_factory=_default_java, description="java executable (Java 17+).")
    registry: bool = Field(
        default=False, description="Also run a schema registry (Apicurio, Confluent-compatible API)."
    )
    registry_port: int = Field(default=8081, description="Schema registry HTTP port.")
    registry_management_port: int = Field(default=8082, description="Schema registry health/metrics port.")
    registry_version: str = Field(default="3.3.3", description="Apicurio Registry release fetched from Maven Central.")
    registry_heap: str = Field(default="512m", description="Schema registry -Xmx.")
    registry_java: str = Field(
        default_factory=_default_registry_java, description="java executable for the registry (Java 21+)."
    )
    kafka_partitions: int = Field(default=6, description="Broker default partition count.")
    auth: bool = Field(
        default=False,
        description="Rehearse production credentials: Kafka's client listener takes SASL/PLAIN only "
        "(SASL_PLAINTEXT) and Cassandra requires a password (PasswordAuthenticator, CassandraAuthorizer).",
    )
    auth_users: SecretStr = Field(
        default=SecretStr("bridge:bridge-secret,worker:worker-secret,api:api-secret,ops:ops-secret"),
        description="With auth: the principals as user:password pairs, each a Kafka SASL user and a Cassandra "
        "role (grants: docs/operations.md). The servers' own: Kafka admin, Cassandra's cassandra superuser.",
    )
    kafka_admin_password: SecretStr = Field(
        default=SecretStr("admin-secret"), description="With auth: password of Kafka's admin user (inter-broker)."
    )
    cassandra_superuser_password: SecretStr = Field(
        default=SecretStr("cassandra"),
        description="With auth: password of Cassandra's superuser `cassandra` (the server creates it so).",
    )
    start_timeout_s: float = Field(default=180.0, description="How long `up` waits for each server.")
    stop_timeout_s: float = Field(default=90.0, description="How long `down` waits before SIGKILL.")
    warmup_s: float = Field(
        default=45.0,
        ge=0.0,
        le=600.0,
        description="Seconds `up` drives the servers it has just started through the pipeline's paths, so "
        "their JIT compilers are done before anything is measured (stack/warmup.py); 0 skips it.",
    )

    @property
    def users(self) -> dict[str, str]:
        """With auth: each principal's password, by name."""
        out = {}
        for pair in self.auth_users.get_secret_value().split(","):
            name, sep, password = pair.strip().partition(":")
            if not sep or not name or not password:
                raise ValueError(f"OHS_AUTH_USERS: {pair.strip()!r} is not user:password")
            out[name] = password
        return out

    def kafka_admin_config(self) -> dict[str, str]:
        """librdkafka options of the stack's own Kafka clients (readiness, smoke, tests' admin)."""
        if not self.auth:
            return {}
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "admin",
            "sasl.password": self.kafka_admin_password.get_secret_value(),
        }

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        """Base URL of the registry's Confluent-compatible API (what OHS_SCHEMA_REGISTRY_URL takes)."""
        return f"http://{self.host}:{self.registry_port}/apis/ccompat/v7"

    @property
    def servers(self) -> tuple[str, ...]:
        return ("kafka", "cassandra", "registry") if self.registry else ("kafka", "cassandra")

    @property
    def state_dir(self) -> Path:
        return self.state.resolve()

    @property
    def cache_dir(self) -> Path:
        return self.cache.expanduser().resolve()
