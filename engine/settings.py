"""Settings of the engine process (``ohs engine run | simulate``), read once at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kit.runtime import gc_threshold0_field
from schemas.events import INT64_MAX
from schemas.symbols import DEFAULT_SYMBOLS, SymbolSpec, parse_symbols

__all__ = ["DEFAULT_SYMBOLS", "EngineSettings"]


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_ENGINE_", frozen=True, extra="ignore")

    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=AliasChoices("OHS_ENGINE_LOG_FORMAT", "OHS_LOG_FORMAT"),
        description="Log lines as text, or one JSON object per line.",
    )
    gc_threshold0: int = gc_threshold0_field("OHS_ENGINE_")
    journal_dir: Path = Field(default=Path(".ohs/engine/journal"), description="Journal directory.")
    fsync: Literal["always", "interval", "never"] = Field(default="interval", description="Journal fsync policy.")
    fsync_interval_ms: int = Field(default=5, description="With fsync=interval: the most a machine crash can lose.")
    feed_endpoint: str = Field(
        default="tcp://127.0.0.1:5556", description="ZMQ PUB feed (bind): every subscriber gets every event."
    )
    replay_endpoint: str = Field(default="tcp://127.0.0.1:5557", description="ZMQ ROUTER replay service (bind).")
    gateway_endpoint: str = Field(default="tcp://127.0.0.1:5555", description="ZMQ ROUTER command gateway (bind).")
    heartbeat_ms: int = Field(default=200, description="Feed heartbeat period (carries the last seq).")
    tick_ms: int = Field(default=100, description="AdvanceTime period (GTT expiry granularity).")
    feed_hwm: int = Field(
        default=4_000,
        ge=1,
        description=(
            "Feed messages (batches of up to ~64 KiB of events) queued per subscriber; beyond it that subscriber "
            "loses them and replays them from the journal. The engine never waits."
        ),
    )
    metrics_port: int = Field(default=9465, ge=0, le=65535, description="Port of /metrics and /health (0 disables).")
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of /metrics and /health (0.0.0.0 in a container)."
    )
    symbols: str = Field(
        default=DEFAULT_SYMBOLS, description="Comma-separated NAME:BASE:QUOTE:TICK:LOT symbol definitions."
    )
    maker_fee_bps: int = Field(default=0, ge=0, le=10_000, description="Maker fee in basis points (floored).")
    taker_fee_bps: int = Field(default=0, ge=0, le=10_000, description="Taker fee in basis points (floored).")
    fee_account: int = Field(
        default=0, ge=0, le=INT64_MAX, description="User id that receives fees (0 is never a client)."
    )
    gateway_max_bytes: int = Field(
        default=1_048_576,
        ge=4096,
        description=(
            "Largest gateway request (all its frames); a larger one is answered ERR unread. Frames beyond 4x "
            "this make ZeroMQ drop the connection before they are read into memory."
        ),
    )
    gateway_max_commands: int = Field(default=10_000, ge=1, description="Most commands in one gateway request.")
    replay_chunk: int = Field(
        default=64, ge=1, description="Events one replay request may send per loop turn before the others' turn."
    )
    replay_turn_events: int = Field(
        default=256,
        ge=1,
        description="Events all replays together may send per loop turn: what a command may wait behind them.",
    )
    replay_max_active: int = Field(
        default=32, ge=1, description="Replays served at once (one per client); more are answered ERR busy."
    )
    replay_stall_ms: int = Field(
        default=30_000, ge=100, description="A replay whose client reads nothing for this long is abandoned."
    )

    def symbol_specs(self) -> list[SymbolSpec]:
        return parse_symbols(self.symbols)
