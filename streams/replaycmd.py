"""``ohs replay``: re-apply a Kafka topic to the Cassandra tables (the logic: ``streams/replay.py``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
from types import FrameType

import click
from confluent_kafka import KafkaException
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from streams.errors import SinkError
from streams.replay import GROUPS, Replay, ReplayError, ReplayOptions, ReplaySummary
from streams.settings import WorkerSettings

__all__ = ["replay"]


def _instant(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.datetime | None:
    if value is None or value == "now":
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not ISO 8601 (e.g. 2025-01-31T12:00:00Z)") from exc
    # A time without a zone is UTC, like the servers' clocks; the local zone of a laptop is a trap.
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _offsets(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[int, int]:
    out: dict[int, int] = {}
    for value in values:
        partition, _, offset = value.partition(":")
        if not (partition.isdigit() and offset.isdigit()):
            raise click.BadParameter(f"{value!r} is not PARTITION:OFFSET")
        out[int(partition)] = int(offset)
    return out


def _table(s: ReplaySummary) -> str:
    cols = ("partition", "start", "end", "offset", "records", "applied", "duplicates", "dead_lettered")
    lines = [" ".join(f"{c:>13}" for c in cols)]
    lines += [" ".join(f"{getattr(p, c):>13}" for c in cols) for p in s.partitions]
    d = s.as_dict()
    applied = "fills" if s.what == "trades" else "applied"  # a trade's record is one fill, or two (self-trade)
    lines.append(
        f"{'dry run: ' if s.dry_run else ''}{d['records']} records read, {d['applied']} {applied}, "
        f"{d['duplicates']} duplicates, {d['dead_lettered']} dead-lettered, {s.retries} write retries, "
        f"in {s.elapsed_s:.1f}s ({d['rate']:,.0f} records/s); keyspace {s.keyspace}, group {s.group}"
    )
    lines.append(f"statistics {s.statistics_note}")
    if s.stopped_by is not None:
        lines.append(f"stopped by {signal.Signals(s.stopped_by).name}: the same command without --from-* goes on")
    return "\n".join(lines)


@click.command()
@click.option("--from-beginning", is_flag=True, help="Start every partition at its first record.")
@click.option(
    "--from-offset",
    "from_offsets",
    multiple=True,
    metavar="PARTITION:OFFSET",
    callback=_offsets,
    help="Replay only these partitions, from these offsets (repeatable).",
)
@click.option(
    "--from-timestamp",
    callback=_instant,
    metavar="ISO8601",
    help="Start each partition at its first record at or after this time (no zone: UTC).",
)
@click.option(
    "--until",
    default="now",
    show_default=True,
    callback=_instant,
    metavar="ISO8601|now",
    help="Stop at records later than this; now: at the end offsets taken at start.",
)
@click.option("--keyspace", default=None, help="Target keyspace, migrated first (default: the worker's, live).")
@click.option("--dry-run", is_flag=True, help="Read, decode and count per partition; write and commit nothing.")
@click.option(
    "--what",
    type=click.Choice(list(GROUPS)),
    default="updates",
    show_default=True,
    help="updates: the order tables from the updates topic; trades: the users' fills from the trades topic.",
)
@click.option(
    "--group",
    default=None,
    help=f"The replay's own consumer group (default: {', '.join(f'{g} for {w}' for w, g in GROUPS.items())}).",
)
@click.option("--topic", default=None, help="Topic to replay (default: the worker's topic of --what).")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=None, help="Records per write and commit.")
@click.option(
    "--lease-ttl",
    type=click.IntRange(3, 3600),
    default=30,
    show_default=True,
    help="Seconds the group's lease outlives a replay killed with -9 (one replay per group at a time).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
def replay(
    from_beginning: bool,
    from_offsets: dict[int, int],
    from_timestamp: dt.datetime | None,
    until: dt.datetime | None,
    keyspace: str | None,
    dry_run: bool,
    what: str,
    group: str | None,
    topic: str | None,
    batch_size: int | None,
    lease_ttl: int,
    as_json: bool,
) -> None:
    """Replay a topic into the Cassandra tables (backfill, rebuild); resumable with the same --group.

    --what trades rebuilds the users' fills (user_trades, user_trade_months) from the trades topic;
    the default, updates, the order tables from the updates topic: one run each.

    Without --from-* it goes on where the group stopped. Ctrl-C or SIGTERM finishes (or, after
    10 s, abandons) the batch being written, commits what is durable, prints the summary and
    exits 130 or 143; a second signal quits at once. A second replay into a group that one is
    replaying into is refused (exit 1) until the first ends, or --lease-ttl seconds after it was killed.
    """
    err = Console(stderr=True)
    handler = RichHandler(console=err) if err.is_terminal else logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(message)s" if err.is_terminal else "%(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    options = ReplayOptions(
        what=what,
        group=group or "",
        topic=topic,
        keyspace=keyspace,
        from_beginning=from_beginning,
        from_offsets=from_offsets,
        from_timestamp=from_timestamp,
        until=until,
        dry_run=dry_run,
        batch_size=batch_size,
        lease_ttl_s=lease_ttl,
    )
    try:
        job = Replay(WorkerSettings(), options)
    except ReplayError as exc:
        raise click.UsageError(str(exc)) from exc

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if job.stopping:
            os._exit(128 + signum)  # nothing uncommitted is lost: the next run redoes it
        err.print(f"{signal.Signals(signum).name}: stopping after the current batch (again to quit now)")
        job.stop(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[applied]} events, {task.fields[rate]:,.0f} records/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    # Only on a terminal: redirected output gets the summary alone, not a stream of redraws.
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        # Started by the first report (the plan is made, the keyspace migrated): the rate is the replay's own.
        task = bar.add_task("replay", start=False, total=None, applied=0, rate=0.0)

        def progress(s: ReplaySummary) -> None:
            bar.start_task(task)
            rate = s.sum("records") / max(bar.tasks[0].elapsed or 0.0, 1e-3)
            done, total = s.sum("offset") - s.sum("start"), s.sum("end") - s.sum("start")
            bar.update(task, total=total, completed=done, applied=s.sum("applied"), rate=rate)

        try:
            summary = job.run(progress)
        except (ReplayError, SinkError, KafkaException) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary.as_dict()) if as_json else _table(summary))
    if summary.stopped_by is not None:
        sys.exit(128 + summary.stopped_by)
