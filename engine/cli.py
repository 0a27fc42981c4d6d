"""``ohs engine run | simulate | info``."""

from __future__ import annotations

import json
import signal
import time
from types import FrameType

import click

from engine.settings import EngineSettings

__all__ = ["engine"]


class _Stop:
    """SIGTERM/SIGINT set a flag; the single engine loop finishes its step and closes cleanly."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


@click.group()
@click.pass_context
def engine(ctx: click.Context) -> None:
    """The matching engine: gateway, feed, replay service, simulator."""
    from ohs.logs import setup_logging

    ctx.obj = EngineSettings()  # read once, here; the subcommands take it from the context
    setup_logging(ctx.obj.log_format)


@engine.command()
@click.pass_obj
def run(settings: EngineSettings) -> None:
    """Serve the command gateway, the feed and the replay service until SIGTERM."""
    from engine.service import EngineService

    service = EngineService(settings)
    stop = _Stop()
    click.echo(f"engine epoch={service.engine.epoch} last_seq={service.engine.last_seq} serving", err=True)
    try:
        service.run(stop)
    finally:
        service.close()


@engine.command()
@click.option("--users", default=1000, show_default=True, help="Simulated users.")
@click.option("--symbols", "n_symbols", default=4, show_default=True, help="How many configured symbols to trade.")
@click.option("--rate", default=20_000.0, show_default=True, help="Commands per second.")
@click.option("--duration", default=30.0, show_default=True, help="Seconds of order flow.")
@click.option("--seed", default=1, show_default=True, help="Seed of the command sequence.")
@click.option("--linger", default=2.0, show_default=True, help="Keep serving replay/heartbeats this long after.")
@click.option("--serve", is_flag=True, help="After the flow, keep serving until SIGTERM.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def simulate(
    settings: EngineSettings,
    users: int,
    n_symbols: int,
    rate: float,
    duration: float,
    seed: int,
    linger: float,
    serve: bool,
    as_json: bool,
) -> None:
    """Drive a realistic seeded order flow through the real engine, journal and feed."""
    from engine.service import EngineService
    from engine.simulator import simulate as run_flow

    specs = settings.symbol_specs()
    if not 1 <= n_symbols <= len(specs):
        raise click.BadParameter(f"between 1 and {len(specs)} (configured symbols)", param_hint="--symbols")
    service = EngineService(settings)
    stop = _Stop()
    try:
        report = run_flow(service, users, rate, duration, seed, n_symbols=n_symbols, should_stop=stop)
        summary = {
            "epoch": report.epoch,
            "last_seq": report.last_seq,
            "commands": report.commands,
            "events": report.events,
            "rejected": report.rejected,
            "seconds": round(report.seconds, 3),
            "commands_per_s": round(report.rate, 1),
            "feed_dropped": report.feed_dropped,
        }
        click.echo(json.dumps(summary) if as_json else " ".join(f"{k}={v}" for k, v in summary.items()))
        deadline = time.monotonic() + linger
        while (serve or time.monotonic() < deadline) and not stop():
            service.service_io(timeout_ms=50)
    finally:
        service.close()


@engine.command()
@click.pass_obj
def info(settings: EngineSettings) -> None:
    """Epoch and last seq of the journal (recovering it, which also verifies it)."""
    from engine.journal import Journal
    from engine.recovery import recover

    journal = Journal.open(settings.journal_dir, settings.symbol_specs(), fsync="never")
    eng, commands = recover(journal)
    click.echo(json.dumps({"epoch": eng.epoch, "last_seq": eng.last_seq, "commands": commands}))
