"""Settings of the Faust worker and of ``ohs db``, read once at the entry point."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_WORKER_", frozen=True, extra="ignore")

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
    store: str = Field(
        default="rocksdb://",
        description="Faust table store: rocksdb:// (production: state survives a restart locally) or memory://.",
    )
    data_dir: str = Field(
        default="ohs-worker-data",
        description="Faust data dir (RocksDB tables), relative to the working dir; one per worker on a host.",
    )
    web_port: int = Field(default=6066, description="Faust web port (metrics, health).")
    batch_size: int = Field(default=2000, description="Most events per sink batch (stream.take_events).")
    batch_window_s: float = Field(default=0.05, description="Longest wait to fill a batch.")
    stream_buckets: int = Field(default=16, description="Buckets per day of order_updates_stream.")
    retry_initial_s: float = Field(default=0.2, description="First back-off of a failed batch write.")
    retry_max_s: float = Field(default=10.0, description="Longest back-off between batch write attempts.")
    latency_file: str | None = Field(
        default=None,
        description="Benchmarks: append each applied event's emit-to-durable latency (float64 s) to this file.",
    )
    lag_interval_s: float = Field(default=10.0, description="How often the consumer lag gauges are refreshed.")
    request_timeout_s: float = Field(default=10.0, description="CQL request timeout; a timed-out batch is retried.")
    write_concurrency: int = Field(default=64, description="CQL statements in flight per batch.")

    @property
    def hosts(self) -> list[str]:
        return [h.strip() for h in self.cql_contact_points.split(",") if h.strip()]
