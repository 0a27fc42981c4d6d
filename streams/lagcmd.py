"""``ohs lag``: consumer lag per group and partition, for people and for scripts.

Exit status (the same in ``--json`` mode; with ``--watch``, that of the last round):

* 0: every partition within the thresholds (or none given);
* 1: a threshold (``--max-lag``, ``--max-lag-seconds``) is breached;
* 2: usage error (bad option, bad environment);
* 3: Kafka cannot be reached, a group does not exist, or a ``--topic`` does not.

Each failure is one line on stderr (``ohs lag: ...``), never a traceback or librdkafka's log.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from streams.lag import GroupLag, LagError, PartitionLag, describe_lag

__all__ = ["EXIT_BREACHED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "lag"]

EXIT_OK, EXIT_BREACHED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_WATCH_S = 5.0


class _OneLineUsageError(click.UsageError):
    """click's usage errors print the usage and a hint over several lines: a script wants one."""

    def show(self, file: Any = None) -> None:
        click.echo(f"ohs lag: {self.format_message()} (see `ohs lag --help`)", err=True)


class _LagCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if isinstance(exc, _OneLineUsageError):
                raise
            raise _OneLineUsageError(exc.format_message(), ctx) from None


@dataclass(frozen=True)
class Round:
    """One look at the groups: what was read, what breaches, the exit status it stands for."""

    groups: list[GroupLag]
    breaches: list[str]
    errors: list[str]

    @property
    def code(self) -> int:
        if self.errors:
            return EXIT_UNREACHABLE
        return EXIT_BREACHED if self.breaches else EXIT_OK

    @property
    def rows(self) -> list[PartitionLag]:
        return [r for g in self.groups for r in g.partitions]


def breaches(rows: Sequence[PartitionLag], max_lag: int | None, max_lag_seconds: float | None) -> list[str]:
    out = []
    for r in rows:
        where = f"{r.group} {r.topic}[{r.partition}]"
        if max_lag is not None and r.lag_messages > max_lag:
            out.append(f"{where}: lag {r.lag_messages} messages > --max-lag {max_lag}")
        if max_lag_seconds is not None and r.lag_seconds > max_lag_seconds:
            out.append(f"{where}: lag {r.lag_seconds:.1f}s > --max-lag-seconds {max_lag_seconds:g}")
    return out


def look(
    bootstrap: str,
    groups: Sequence[str],
    topics: Sequence[str],
    max_lag: int | None,
    max_lag_seconds: float | None,
    timeout_s: float,
    config: dict[str, Any] | None = None,
) -> Round:
    read: list[GroupLag] = []
    errors: list[str] = []
    for group in groups:
        try:
            g = describe_lag(bootstrap, group, list(topics) or None, timeout_s=timeout_s, config=config)
        except LagError as exc:
            errors.append(str(exc))
            if not read and "cannot reach Kafka" in str(exc):
                break  # the other groups would only wait out the same timeout
            continue
        if g.missing_topics:
            errors.append(f"topic {', '.join(map(repr, g.missing_topics))} does not exist")
        read.append(g)
    rows = [r for g in read for r in g.partitions]
    return Round(read, breaches(rows, max_lag, max_lag_seconds), errors)


def summary(r: Round, most: int = 3) -> str:
    """The errors, else the breaches, of a round as one line."""
    items, what = (r.errors, "") if r.errors else (r.breaches, "threshold breached: ")
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return what + "; ".join(items[:most]) + more


def table(r: Round) -> str:
    """Columns of ``kafka-consumer-groups --describe``, plus the lag in seconds."""
    head = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG-S", "CONSUMER-ID", "HOST", "CLIENT-ID")
    body = [
        (
            p.group,
            p.topic,
            str(p.partition),
            str(p.committed) if p.committed >= 0 else "-",
            str(p.end),
            str(p.lag_messages),
            f"{p.lag_seconds:.1f}",
            p.consumer_id or "-",
            p.host or "-",
            p.client_id or "-",
        )
        for p in r.rows
    ]
    numeric = {2, 3, 4, 5, 6}
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row))
        for row in [head, *body]
    ]
    for g in r.groups:
        lines.append(f"group {g.group}: {g.state.lower()}, {g.members} member(s)")
    total = sum(p.lag_messages for p in r.rows)
    worst = max((p.lag_seconds for p in r.rows), default=0.0)
    lines.append(f"total lag: {total} messages; oldest unconsumed: {worst:.1f}s")
    return "\n".join(line.rstrip() for line in lines)


def document(r: Round) -> dict[str, Any]:
    return {
        "at": time.time(),
        "exit": r.code,
        "status": {EXIT_OK: "ok", EXIT_BREACHED: "breached", EXIT_UNREACHABLE: "error"}[r.code],
        "groups": [{k: v for k, v in g.as_dict().items() if k != "partitions"} for g in r.groups],
        "partitions": [p.as_dict() for p in r.rows],
        "breaches": r.breaches,
        "errors": r.errors,
    }


def _defaults() -> tuple[str, str, dict[str, Any]]:
    """(bootstrap, group, credentials) from the worker's settings (OHS_WORKER_*, OHS_KAFKA_*)."""
    from pydantic import ValidationError

    from streams.settings import WorkerSettings

    try:
        s = WorkerSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _OneLineUsageError(f"bad environment: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return s.kafka_bootstrap, s.group, s.kafka_auth.librdkafka()


def _finish(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.exit(code)


@click.command(cls=_LagCommand)
@click.option(
    "--bootstrap-server",
    "bootstrap",
    metavar="HOST:PORT",
    help="Kafka bootstrap servers [default: OHS_WORKER_KAFKA_BOOTSTRAP / OHS_KAFKA_BOOTSTRAP, else 127.0.0.1:9092].",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Consumer group (repeatable) [default: OHS_WORKER_GROUP, else ohs-order-history].",
)
@click.option("--topic", "topics", multiple=True, help="Only these topics (default: all the group reads).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=DEFAULT_WATCH_S,
    default=None,
    metavar="[SECONDS]",
    help=f"Refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; thresholds apply to every round "
    "and the exit status is the last round's.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch: stop after this many rounds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per round (one line each).")
@click.option("--max-lag", type=click.IntRange(min=0), default=None, help="Exit 1 if a partition lags more messages.")
@click.option(
    "--max-lag-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit 1 if a partition's oldest unconsumed record is older.",
)
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0.5), default=10.0, show_default=True, help="Kafka timeout (s)."
)
def lag(
    bootstrap: str | None,
    groups: tuple[str, ...],
    topics: tuple[str, ...],
    watch: float | None,
    count: int | None,
    as_json: bool,
    max_lag: int | None,
    max_lag_seconds: float | None,
    timeout_s: float,
) -> None:
    """Committed offset, end offset, lag in messages and in seconds, and the member owning each
    partition, per group and partition.

    Exit status: 0 OK, 1 a threshold is breached, 2 usage error, 3 Kafka unreachable or no such
    group or topic. With --watch, every round applies the thresholds; Ctrl-C (or --count rounds)
    ends it with the last round's status.
    """
    if count is not None and watch is None:
        raise _OneLineUsageError("--count needs --watch")
    default_bootstrap, default_group, kafka = _defaults()
    bootstrap = bootstrap or default_bootstrap
    names = list(dict.fromkeys(groups)) or [default_group]

    # Ctrl-C or SIGTERM between rounds (or inside one) ends with the last round's status.
    # The handlers only set a flag: an exception raised from a handler would land wherever the
    # main thread is, possibly inside a librdkafka call or callback that swallows it (the watch
    # then never ended). The loop looks at the flag after each round and while it sleeps.
    last = {"code": EXIT_OK}
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()

    if watch is not None:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    rounds = 0
    try:
        while True:
            r = look(bootstrap, names, topics, max_lag, max_lag_seconds, timeout_s, kafka)
            rounds += 1
            last["code"] = r.code
            if as_json:
                click.echo(json.dumps(document(r), separators=(",", ":")))
            else:
                if watch is not None and sys.stdout.isatty():
                    click.clear()
                if r.groups:
                    click.echo(table(r))
            if r.errors or r.breaches:
                click.echo(f"ohs lag: {summary(r)}", err=True)
            if watch is None or (count is not None and rounds >= count) or stopping.is_set():
                _finish(r.code)
            sys.stdout.flush()
            if stopping.wait(watch):
                _finish(last["code"])
    except KeyboardInterrupt:
        _finish(last["code"])
