"""``ohs engine run | simulate | info | migrate-journal``."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from engine.settings import EngineSettings
from kit.runtime import tune_gc

if TYPE_CHECKING:
    from engine.service import EngineService

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
    from kit.logs import setup_logging

    ctx.obj = EngineSettings()  # read once, here; the subcommands take it from the context
    setup_logging(ctx.obj.log_format)


def _serve_http(settings: EngineSettings, service: EngineService) -> None:
    """/metrics and /health on OHS_ENGINE_METRICS_PORT, from a thread (0 disables)."""
    if settings.metrics_port:
        from engine.http import serve

        serve(
            settings.metrics_port,
            lambda: service.stats,
            service.status,
            host=settings.metrics_host,
            stale_after_s=max(10.0, 5 * max(settings.tick_ms, settings.heartbeat_ms) / 1000.0),
        )


@engine.command()
@click.pass_obj
def run(settings: EngineSettings) -> None:
    """Serve the command gateway, the feed and the replay service until SIGTERM."""
    from engine.service import EngineService

    service = EngineService(settings)
    tune_gc(settings.gc_threshold0)  # after recovery: the recovered state is frozen too
    _serve_http(settings, service)
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
    tune_gc(settings.gc_threshold0)  # after recovery: the recovered state is frozen too
    _serve_http(settings, service)
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
    from engine.recovery import RecoveryReport, recover

    report = RecoveryReport()
    with Journal.open(settings.journal_dir, settings.symbol_specs(), fsync="never") as journal:
        eng, commands = recover(journal, report)
    out: dict[str, object] = {"epoch": eng.epoch, "last_seq": eng.last_seq, "commands": commands}
    if report.unchecked or report.unpublishable:
        out.update(unchecked=report.unchecked, unpublishable=report.unpublishable)
        out["unpublishable_examples"] = [list(e) for e in report.examples]
    click.echo(json.dumps(out))


@engine.command("migrate-journal")
@click.option(
    "--journal-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of the journal to migrate (default: OHS_ENGINE_JOURNAL_DIR).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the format-3 journal (default: journal.format3.log beside the old one).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.pass_obj
def migrate_journal(settings: EngineSettings, journal_dir: Path | None, out: Path | None, force: bool) -> None:
    """Re-execute a format 1/2 journal, verify every event, and write its format-3 journal beside it.

    The old journal is not touched. Switch with the engine stopped:
    mv journal.log journal.format2.log && mv journal.format3.log journal.log (docs/engine.md)."""
    from engine.journal import JournalError
    from engine.migrate import migrate

    directory = journal_dir or settings.journal_dir
    try:
        report = migrate(directory, target=out, force=force)
    except JournalError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.as_dict()))
    old = report.source.with_name(f"journal.format{report.format}.log")
    click.echo(
        f"verified {report.commands} commands and {report.events} events (epoch {report.epoch}, last seq "
        f"{report.last_seq}). To switch, with the engine stopped:\n  mv {report.source} {old}\n"
        f"  mv {report.target} {report.source}",
        err=True,
    )
