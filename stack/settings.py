"""Settings of the local stack launcher (``ohs stack ...``), read once at the entry point."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["StackSettings"]


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
    kafka_partitions: int = Field(default=6, description="Broker default partition count.")
    start_timeout_s: float = Field(default=180.0, description="How long `up` waits for each server.")
    stop_timeout_s: float = Field(default=90.0, description="How long `down` waits before SIGKILL.")

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def state_dir(self) -> Path:
        return self.state.resolve()

    @property
    def cache_dir(self) -> Path:
        return self.cache.expanduser().resolve()
