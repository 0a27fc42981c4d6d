"""Settings of the bridge process (``ohs bridge``), read once at the entry point."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from kit.auth import KafkaClientSettings
from kit.runtime import gc_threshold0_field

__all__ = ["BridgeSettings"]


class BridgeSettings(KafkaClientSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_BRIDGE_", frozen=True, extra="ignore")

    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=AliasChoices("OHS_BRIDGE_LOG_FORMAT", "OHS_LOG_FORMAT"),
        description="Log lines as text, or one JSON object per line.",
    )
    gc_threshold0: int = gc_threshold0_field("OHS_BRIDGE_")
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("OHS_BRIDGE_KAFKA_BOOTSTRAP", "OHS_KAFKA_BOOTSTRAP"),
        description="Kafka/Redpanda bootstrap servers.",
    )
    feed_endpoint: str = Field(
        default="tcp://127.0.0.1:5556",
        description="Engine feed (PUB) to subscribe to (connect); several may be given, comma-separated.",
    )
    feed_rcvhwm: int = Field(
        default=2_000,
        ge=1,
        description=(
            "Feed messages (batches of up to ~64 KiB) queued for this bridge before ZeroMQ drops the rest "
            "(found missing and replayed from the engine)."
        ),
    )
    replay_endpoint: str = Field(default="tcp://127.0.0.1:5557", description="Engine replay service (connect).")
    topic_updates: str = Field(default="orders.updates", description="OrderUpdate topic.")
    topic_trades: str = Field(default="orders.trades", description="Trade topic (one record per side).")
    topic_balances: str = Field(default="balances.updates", description="BalanceUpdate topic.")
    topic_dlq: str = Field(default="orders.dlq", description="Dead-letter topic for input the bridge cannot relay.")
    topic_checkpoint: str = Field(
        default="bridge.watermark", description="Compacted topic holding the acknowledged watermark."
    )
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OHS_BRIDGE_SCHEMA_REGISTRY_URL", "OHS_SCHEMA_REGISTRY_URL"),
        description="Confluent-compatible schema registry: register the schemas, write its wire format.",
    )
    partitions: int = Field(default=6, description="Partitions of the event topics when the bridge creates them.")
    replication_factor: int = Field(
        default=1,
        ge=1,
        description="Replicas of every topic the bridge creates (events, dead letters, checkpoint): 3 in production.",
    )
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, description="Retention of the event topics it creates.")
    max_message_bytes: int = Field(
        default=1_000_000,
        ge=16_384,
        description=(
            "Largest record the bridge produces (value + key + headers): larger events are dead-lettered, and "
            "dead letters are cut to fit. Keep it below the broker's message.max.bytes (1 MiB by default)."
        ),
    )
    max_frame_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=65_536,
        description="Largest feed frame ZeroMQ accepts; a peer sending more is disconnected (the seq is replayed).",
    )
    gap_wait_ms: int = Field(default=100, description="How long a hole may stay open before a replay is requested.")
    replay_timeout_ms: int = Field(default=5_000, description="How long to wait for the engine's replay service.")
    max_in_flight: int = Field(
        default=200_000, ge=1, description="Unacknowledged or waiting records before the bridge stops reading."
    )
    max_pending: int = Field(
        default=100_000, ge=1, description="Early seqs waiting above a hole before the bridge stops reading."
    )
    ceiling_lease: int = Field(
        default=100_000,
        ge=2,
        description="Seqs of the ceiling lease: the checkpoint's ceiling is renewed to received + this, at half-way.",
    )
    epoch_check_ms: int = Field(
        default=1_000, ge=0, description="How long the replay service's answer about its epoch is reused."
    )
    connect_backoff_max_ms: int = Field(
        default=10_000, ge=100, description="Longest wait between attempts to reach Kafka at start (jittered)."
    )
    kafka_timeout_ms: int = Field(
        default=10_000, ge=100, description="Timeout of one metadata/admin/checkpoint read at start."
    )
    checkpoint_ms: int = Field(default=200, description="How often the watermark is written to the checkpoint topic.")
    linger_ms: int = Field(default=5, description="Producer linger (batching).")
    compression: str = Field(default="lz4", description="Producer compression codec.")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of /metrics and /health (0.0.0.0 in a container)."
    )
    metrics_port: int = Field(default=9464, description="Prometheus /metrics port (0 disables).")
    bridge_id: str = Field(default="bridge-1", description="Key of this bridge's checkpoint record.")
