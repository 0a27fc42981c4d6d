"""Settings of the Faust worker and of ``ohs db``, read once at the entry point."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from kit.auth import CqlClientSettings, KafkaClientSettings
from kit.runtime import gc_threshold0_field

__all__ = ["WorkerSettings"]


class WorkerSettings(KafkaClientSettings, CqlClientSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_WORKER_", frozen=True, extra="ignore")

    gc_threshold0: int = gc_threshold0_field("OHS_WORKER_")
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("OHS_WORKER_KAFKA_BOOTSTRAP", "OHS_KAFKA_BOOTSTRAP"),
        description="Kafka/Redpanda bootstrap servers.",
    )
    cql_contact_points: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("OHS_WORKER_CQL_CONTACT_POINTS", "OHS_CQL_CONTACT_POINTS"),
        description="Comma-separated Cassandra/ScyllaDB contact points.",
    )
    cql_port: int = Field(
        default=9042,
        validation_alias=AliasChoices("OHS_WORKER_CQL_PORT", "OHS_CQL_PORT"),
        description="CQL port.",
    )
    keyspace: str = Field(
        default="ohs",
        validation_alias=AliasChoices("OHS_WORKER_KEYSPACE", "OHS_KEYSPACE"),
        description="Keyspace.",
    )
    replication: str = Field(
        default="{'class': 'SimpleStrategy', 'replication_factor': 1}",
        description="Keyspace replication map used by `ohs db migrate` when it creates the keyspace.",
    )
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OHS_WORKER_SCHEMA_REGISTRY_URL", "OHS_SCHEMA_REGISTRY_URL"),
        description="Schema registry to resolve records in its wire format (single-object needs none).",
    )
    group: str = Field(default="ohs-order-history", description="Consumer group / Faust app id.")
    topic_updates: str = Field(default="orders.updates", description="OrderUpdate topic to consume.")
    topic_dlq: str = Field(default="orders.dlq", description="Dead-letter topic for records the worker cannot apply.")
    partitions: int = Field(default=6, description="Partitions of the source topic (tables are co-partitioned).")
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        description="Replicas of the topics the worker creates (table changelogs, dead letters): 3 in production.",
    )
    store: str = Field(
        default="rocksdb://",
        description="Faust table store: rocksdb:// (production: state survives a restart locally) or memory://.",
    )
    data_dir: str = Field(
        default="ohs-worker-data",
        description="Faust data dir (RocksDB tables), relative to the working dir; one per worker on a host.",
    )
    rocksdb_write_buffer_mb: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="RocksDB memtable size per table partition (two are kept): Faust's default, 64 MiB x 3, "
        "grows a worker by ~200 MiB per partition before the first flush.",
    )
    rocksdb_block_cache_mb: int = Field(
        default=16,
        ge=1,
        le=16384,
        description="RocksDB block cache per table partition (Faust's default is 2 GiB per partition). Reads "
        "mostly hit the worker's own state cache, so a small one suffices.",
    )
    web_port: int = Field(default=6066, description="Faust web port (/metrics, /health).")
    web_bind: str = Field(
        default="127.0.0.1",
        description="Address the web port listens on: loopback unless a scraper elsewhere needs it (0.0.0.0).",
    )
    batch_size: int = Field(default=2000, description="Most records per batch.")
    session_timeout_s: float = Field(
        default=45.0,
        ge=6.0,
        le=300.0,
        description="Kafka consumer session timeout: how long the group waits for a worker that "
        "stopped heartbeating (killed, partitioned) before its partitions move; also how long a "
        "restarted worker may wait to rejoin. 45 s is Kafka's default (KIP-735).",
    )
    stream_buffer: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Records fetched ahead of the batch loop (Faust's stream_buffer_maxsize): "
        "more smooths bursts, at the cost of memory and of re-fetching them after a rebalance.",
    )
    fetch_max_wait_ms: int = Field(
        default=50,
        ge=1,
        le=30_000,
        description="How long a consumer fetch may wait at the broker for records (Faust's fixed value is "
        "1,500 ms, which made records reach the batch loop in bursts 1-2 s old at 1,000 commands/s).",
    )
    batch_window_s: float = Field(
        default=0.0,
        description="Extra wait for a batch to fill when fewer than batch_size records are queued; "
        "0 writes what has arrived at once, so batches grow only under load.",
    )
    batch_max_statements: int = Field(
        default=250, description="Most CQL statements per UNLOGGED batch request (one replica set each)."
    )
    batch_max_bytes: int = Field(
        default=256 * 1024,
        description="Most bytes of values per batch request; keep it below Cassandra's batch_size_fail_threshold.",
    )
    cql_protocol_version: int = Field(
        default=4,
        validation_alias=AliasChoices("OHS_WORKER_CQL_PROTOCOL_VERSION", "OHS_CQL_PROTOCOL_VERSION"),
        description="CQL native protocol version (v4 costs the Python driver less CPU than v5).",
    )
    cql_driver: Literal["acsylla", "cassandra-driver"] = Field(
        default="acsylla",
        description="Driver of the worker's writes (acsylla: the C++ driver, ~5x less client CPU per row; "
        "cassandra-driver: pure Python). Migrations and cluster metadata always use cassandra-driver.",
    )
    seq_guard: bool = Field(
        default=True,
        description="Dead-letter records whose (epoch, seq) lies beyond the bridge's acknowledged seq ceiling.",
    )
    topic_checkpoint: str = Field(
        default="bridge.watermark",
        validation_alias=AliasChoices("OHS_WORKER_TOPIC_CHECKPOINT", "OHS_BRIDGE_TOPIC_CHECKPOINT"),
        description="The bridge's checkpoint topic (watermark and seq ceiling) the seq guard reads.",
    )
    bridge_id: str = Field(
        default="bridge-1",
        validation_alias=AliasChoices("OHS_WORKER_BRIDGE_ID", "OHS_BRIDGE_BRIDGE_ID"),
        description="Which bridge's checkpoint record describes the topic this worker reads.",
    )
    write_pipeline: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Batches being written at once: the next batch is prepared and sent while the previous "
        "one is still in flight (1: one batch at a time).",
    )
    state_cache_users: int = Field(
        default=50_000,
        description="Users whose state the worker keeps decoded in memory between batches (a read cache of its "
        "own writes, ~1 KB each; states of batches in flight are always held).",
    )
    health_stall_s: float = Field(
        default=60.0,
        description="/health fails when no batch became durable for this long while records wait.",
    )
    retry_initial_s: float = Field(default=0.2, description="First back-off of a failed batch write.")
    retry_max_s: float = Field(default=10.0, description="Longest back-off between batch write attempts.")
    latency_file: str | None = Field(
        default=None,
        description="Benchmarks: append each applied event's emit-to-durable latency (float64 s) to this file.",
    )
    lag_interval_s: float = Field(default=10.0, description="How often the consumer lag gauges are refreshed.")
    request_timeout_s: float = Field(default=10.0, description="CQL request timeout; a timed-out batch is retried.")
    write_concurrency: int = Field(default=32, description="CQL requests in flight per batch.")

    @property
    def hosts(self) -> list[str]:
        return [h.strip() for h in self.cql_contact_points.split(",") if h.strip()]
