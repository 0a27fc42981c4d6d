"""Settings of the query API (``ohs api``), read once at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from kit.auth import CqlClientSettings, KafkaClientSettings
from schemas.symbols import DEFAULT_SYMBOLS, SymbolSpec, parse_symbols

__all__ = ["ApiSettings"]


class ApiSettings(KafkaClientSettings, CqlClientSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_API_", frozen=True, extra="ignore")

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("OHS_API_KAFKA_BOOTSTRAP", "OHS_KAFKA_BOOTSTRAP"),
        description="Kafka/Redpanda bootstrap servers (the live stream tails the updates topic).",
    )
    cql_contact_points: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("OHS_API_CQL_CONTACT_POINTS", "OHS_CQL_CONTACT_POINTS"),
        description="Comma-separated Cassandra/ScyllaDB contact points.",
    )
    cql_port: int = Field(
        default=9042,
        validation_alias=AliasChoices("OHS_API_CQL_PORT", "OHS_CQL_PORT"),
        description="CQL port.",
    )
    keyspace: str = Field(
        default="ohs",
        validation_alias=AliasChoices("OHS_API_KEYSPACE", "OHS_KEYSPACE"),
        description="Keyspace the worker writes (the API only reads it).",
    )
    cql_consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "ALL"] = Field(
        default="LOCAL_QUORUM",
        description="Consistency level of every read. The live stream's hand-off needs a read to see what the "
        "worker wrote, so reads and writes must overlap (LOCAL_QUORUM here, or LOCAL_ONE with RF=1).",
    )
    cql_request_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one CQL request.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port the HTTP server binds.")
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OHS_API_SCHEMA_REGISTRY_URL", "OHS_SCHEMA_REGISTRY_URL"),
        description="Schema registry, when the bridge writes its wire format (the live tail decodes it).",
    )
    topic_updates: str = Field(default="orders.updates", description="OrderUpdate topic the live stream tails.")
    topic_trades: str = Field(
        default="orders.trades",
        validation_alias=AliasChoices("OHS_API_TOPIC_TRADES", "OHS_BRIDGE_TOPIC_TRADES"),
        description="Trade topic the live stream tails for fills (the bridge's; the worker's trades agent commits it).",
    )
    symbols: str = Field(
        default=DEFAULT_SYMBOLS,
        validation_alias=AliasChoices("OHS_API_SYMBOLS", "OHS_ENGINE_SYMBOLS"),
        description="The engine's symbol definitions (NAME:BASE:QUOTE:TICK:LOT, comma-separated), served by "
        "/symbols: give the API the engine's OHS_ENGINE_SYMBOLS.",
    )
    symbol_decimals: str = Field(
        default="",
        description="Display decimals per symbol, NAME:PRICE_DECIMALS:QTY_DECIMALS comma-separated (0:0 for any "
        "symbol not named): a price of p ticks reads p / 10**PRICE_DECIMALS.",
    )
    scan_max: int = Field(
        default=2000,
        ge=1,
        description="Rows a filtered page (symbol, side, status, order id) may read before it ends early with a "
        "`next` cursor: bounds the work of one request whatever the filter.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=AliasChoices("OHS_API_LOG_FORMAT", "OHS_LOG_FORMAT"),
        description="Log lines as text, or one JSON object per line.",
    )
    worker_group: str = Field(
        default="ohs-order-history",
        description="Consumer group of the Faust worker: an event is streamed only once this group has committed "
        "past it, i.e. once it is durable in Cassandra.",
    )
    tokens_file: Path | None = Field(
        default=None,
        description='JSON file mapping bearer token -> {"user_id": <int>} or {"role": "operator"} (optional '
        '"name" for logs). Merged with OHS_API_TOKENS.',
    )
    tokens: SecretStr | None = Field(
        default=None,
        description="The same JSON mapping as tokens_file, inline (for secrets injected as env vars).",
    )
    page_size_default: int = Field(default=100, ge=1, description="Orders per history page when no limit is given.")
    page_size_max: int = Field(default=500, ge=1, description="Largest accepted history page size (limit).")
    stream_lookback_days: int = Field(
        default=7,
        ge=1,
        description="Days of user_updates a stream resuming from from_seq may replay; older events are not sent.",
    )
    stream_hole_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="A stream resuming from from_seq holds stored updates back behind a missing user_seq (one "
        "the worker is still writing) until it is filled, a later update is released live, or this long has passed.",
    )
    stream_queue_size: int = Field(
        default=1000,
        ge=1,
        description="Events buffered per stream subscriber; a client that falls further behind is closed "
        "(code 1013) and reconnects with from_seq.",
    )
    live_poll_interval_s: float = Field(
        default=0.2, gt=0, description="How often the live tail reads the worker group's committed offsets."
    )
    live_max_pending: int = Field(
        default=50_000,
        ge=1,
        description="Records per partition the live tail holds while the worker has not committed them; "
        "above it the partition is paused (a stopped worker must not grow the API's memory).",
    )

    @model_validator(mode="after")
    def _page_sizes(self) -> ApiSettings:
        if self.page_size_default > self.page_size_max:
            raise ValueError("page_size_default must not exceed page_size_max")
        self.symbol_specs()  # a bad definition stops the start, not a request
        self.decimals()
        return self

    def symbol_specs(self) -> list[SymbolSpec]:
        """The symbols, parsed exactly as the engine parses the same text."""
        return parse_symbols(self.symbols)

    def decimals(self) -> dict[str, tuple[int, int]]:
        """Symbol -> (price decimals, quantity decimals): how a client turns integer ticks and lots into
        the decimal numbers people read (price / 10**price_decimals)."""
        out: dict[str, tuple[int, int]] = {}
        for item in filter(None, (i.strip() for i in self.symbol_decimals.split(","))):
            name, price, qty = item.split(":")
            if not (price.isdigit() and qty.isdigit() and int(price) <= 30 and int(qty) <= 30):
                raise ValueError(f"symbol_decimals {item!r}: NAME:PRICE_DECIMALS:QTY_DECIMALS, each 0..30")
            out[name] = (int(price), int(qty))
        return out

    @property
    def hosts(self) -> list[str]:
        return [h.strip() for h in self.cql_contact_points.split(",") if h.strip()]
