"""Settings of the engine process (``ohs engine run | simulate``), read once at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.interfaces import SymbolSpec

__all__ = ["DEFAULT_SYMBOLS", "EngineSettings"]

DEFAULT_SYMBOLS = "BTC-USD:BTC:USD:1:1,ETH-USD:ETH:USD:1:1,SOL-USD:SOL:USD:1:1,XRP-USD:XRP:USD:1:1"


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OHS_ENGINE_", frozen=True, extra="ignore")

    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=AliasChoices("OHS_ENGINE_LOG_FORMAT", "OHS_LOG_FORMAT"),
        description="Log lines as text, or one JSON object per line.",
    )
    journal_dir: Path = Field(default=Path(".ohs/engine/journal"), description="Journal directory.")
    fsync: Literal["always", "interval", "never"] = Field(default="interval", description="Journal fsync policy.")
    fsync_interval_ms: int = Field(default=5, description="With fsync=interval: the most a machine crash can lose.")
    feed_endpoint: str = Field(default="tcp://127.0.0.1:5556", description="ZMQ PUSH feed (bind).")
    replay_endpoint: str = Field(default="tcp://127.0.0.1:5557", description="ZMQ ROUTER replay service (bind).")
    gateway_endpoint: str = Field(default="tcp://127.0.0.1:5555", description="ZMQ ROUTER command gateway (bind).")
    heartbeat_ms: int = Field(default=200, description="Feed heartbeat period (carries the last seq).")
    tick_ms: int = Field(default=100, description="AdvanceTime period (GTT expiry granularity).")
    feed_hwm: int = Field(
        default=200_000, description="Feed send high-water mark; beyond it events are left to replay."
    )
    symbols: str = Field(
        default=DEFAULT_SYMBOLS, description="Comma-separated NAME:BASE:QUOTE:TICK:LOT symbol definitions."
    )
    maker_fee_bps: int = Field(default=0, description="Maker fee in basis points (floored).")
    taker_fee_bps: int = Field(default=0, description="Taker fee in basis points (floored).")
    fee_account: int = Field(default=0, description="User id that receives fees (0 is never a client).")

    def symbol_specs(self) -> list[SymbolSpec]:
        specs = []
        for item in self.symbols.split(","):
            name, base, quote, tick, lot = item.strip().split(":")
            specs.append(SymbolSpec(name, base, quote, int(tick), int(lot)))
        return specs
