"""``ohs dlq``: list, show and re-drive the dead-letter topic (see streams/dlq.py).

Exit status: 0 done; 1 ``show`` found no such record, or ``redrive`` refused or failed some
record (or matched none); 2 usage error; 3 Kafka unreachable or the topic missing. Failures are
one line on stderr.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from streams.dlq import DlqError, Letter, Redrive, decode_letter, plan_redrive, read_letters, redrive, topic_partitions

__all__ = ["dlq"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


@dataclass(frozen=True)
class _Env:
    bootstrap: str
    topic: str
    registry_url: str | None
    timeout_s: float
    kafka: dict[str, Any] = field(default_factory=dict)
    """This process's Kafka credentials (librdkafka options)."""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ohs dlq: {message}", err=True)
    sys.exit(code)


def _env(ctx: click.Context) -> _Env:
    env: _Env = ctx.obj
    return env


@click.group()
@click.option(
    "--bootstrap-server",
    "bootstrap",
    metavar="HOST:PORT",
    help="Kafka bootstrap servers [default: OHS_WORKER_KAFKA_BOOTSTRAP / OHS_KAFKA_BOOTSTRAP, else 127.0.0.1:9092].",
)
@click.option("--topic", help="Dead-letter topic [default: OHS_WORKER_TOPIC_DLQ, else orders.dlq].")
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0.5), default=10.0, show_default=True, help="Kafka timeout (s)."
)
@click.pass_context
def dlq(ctx: click.Context, bootstrap: str | None, topic: str | None, timeout_s: float) -> None:
    """The dead-letter topic: what could not be relayed or applied, why, and from where.

    Defaults come from the worker's settings (OHS_WORKER_*, OHS_KAFKA_BOOTSTRAP).
    """
    from pydantic import ValidationError

    from streams.settings import WorkerSettings

    try:
        s = WorkerSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"bad environment: {'.'.join(map(str, err['loc']))}: {err['msg']}", EXIT_USAGE)
    ctx.obj = _Env(
        bootstrap or s.kafka_bootstrap,
        topic or s.topic_dlq,
        s.schema_registry_url,
        timeout_s,
        s.kafka_auth.librdkafka(),
    )


def _select(
    env: _Env,
    *,
    partition: int | None,
    from_offset: int | None,
    to_offset: int | None,
    offsets: tuple[int, ...] = (),
    reasons: tuple[str, ...] = (),
    sources: tuple[str, ...] = (),
) -> Iterator[Letter]:
    lo = min(offsets) if offsets else from_offset
    hi = max(offsets) if offsets else to_offset
    try:
        for letter in read_letters(
            env.bootstrap,
            env.topic,
            partitions=None if partition is None else [partition],
            from_offset=lo,
            to_offset=hi,
            timeout_s=env.timeout_s,
            config=env.kafka,
        ):
            if offsets and letter.offset not in offsets:
                continue
            if reasons and letter.reason not in reasons:
                continue
            if sources and letter.source not in sources:
                continue
            yield letter
    except DlqError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _registry(env: _Env) -> Any:
    if not env.registry_url:
        return None
    from schemas.registry import Registry

    return Registry(env.registry_url)


_FILTERS = [
    click.option("--reason", "reasons", multiple=True, help="Only this reason (repeatable)."),
    click.option(
        "--source",
        "sources",
        multiple=True,
        type=click.Choice(["worker", "bridge", "replay"]),
        help="Only dead letters of this writer (repeatable).",
    ),
    click.option("--partition", type=click.IntRange(min=0), default=None, help="Only this DLQ partition."),
    click.option("--from-offset", type=click.IntRange(min=0), default=None, help="First DLQ offset."),
    click.option("--to-offset", type=click.IntRange(min=0), default=None, help="Last DLQ offset (inclusive)."),
]


def _filters(f: Any) -> Any:
    for option in reversed(_FILTERS):
        f = option(f)
    return f


@dlq.command("list")
@_filters
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Show the newest N that match."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter (one line each).")
@click.pass_context
def list_(
    ctx: click.Context,
    reasons: tuple[str, ...],
    sources: tuple[str, ...],
    partition: int | None,
    from_offset: int | None,
    to_offset: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """Dead letters with their reason, source record (topic[partition]@offset) and sizes."""
    env = _env(ctx)
    matched: list[Letter] = []
    counts: Counter[tuple[str, str]] = Counter()
    for letter in _select(
        env, partition=partition, from_offset=from_offset, to_offset=to_offset, reasons=reasons, sources=sources
    ):
        counts[(letter.source, letter.reason)] += 1
        matched.append(letter)
        if len(matched) > limit:
            del matched[0]
    if as_json:
        for letter in matched:
            click.echo(json.dumps(letter.as_dict(), separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{env.topic}: {sum(counts.values())} dead letter(s), newest {len(matched)} shown")
    for name in ("part", "offset", "time (UTC)", "source", "reason", "from", "key", "bytes", "detail"):
        table.add_column(name, justify="right" if name in ("part", "offset", "bytes") else "left", overflow="fold")
    for letter in matched:
        size = f"{letter.size}" if not letter.truncated else f"{letter.size} of {letter.original_size}"
        table.add_row(
            str(letter.partition),
            str(letter.offset),
            _when(letter.timestamp),
            letter.source,
            letter.reason,
            letter.where,
            _text(letter.key, 24),
            size,
            letter.detail[:80],
        )
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for (source, reason), n in sorted(counts.items()):
        console.print(f"  {n:>6}  {source:7} {reason}")


def _text(data: bytes | None, most: int) -> str:
    if data is None:
        return "-"
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= most else text[: most - 1] + "…"


@dlq.command("show")
@click.argument("offset", type=click.IntRange(min=0))
@click.option("--partition", type=click.IntRange(min=0), default=0, show_default=True, help="DLQ partition.")
@click.option("--json", "as_json", is_flag=True, help="The dead letter and its decoded payload as one JSON object.")
@click.pass_context
def show(ctx: click.Context, offset: int, partition: int, as_json: bool) -> None:
    """One dead letter: every header, the key, the sizes, and the payload decoded (Avro) when it is one."""
    env = _env(ctx)
    found = list(_select(env, partition=partition, from_offset=offset, to_offset=offset))
    if not found:
        _fail(f"no dead letter at {env.topic}[{partition}]@{offset}", EXIT_FAILED)
    letter = found[0]
    decoded = decode_letter(letter, _registry(env))
    doc = letter.as_dict()
    if isinstance(decoded, tuple):
        doc["decoded"] = {"type": decoded[0], "record": decoded[1]}
    else:
        doc["decoded"] = None
        doc["not_decoded"] = decoded
        doc["value_head"] = (letter.value or b"")[:256].hex()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{env.topic}[{partition}]@{offset}  {_when(letter.timestamp)}")
    click.echo(f"  source {letter.source}, reason {letter.reason}, from {letter.where}")
    size = f"{letter.size} bytes" + (f" (cut from {letter.original_size})" if letter.truncated else "")
    click.echo(f"  key {_text(letter.key, 80)}, value {size}")
    click.echo("  headers:")
    for k, v in doc["headers"].items():
        click.echo(f"    {k}: {v}")
    if isinstance(decoded, tuple):
        click.echo(f"  decoded {decoded[0]}:")
        for k, v in decoded[1].items():
            click.echo(f"    {k}: {v}")
    else:
        click.echo(f"  payload: {decoded}")
        click.echo(f"  first bytes: {doc['value_head'][:128]}")


@dlq.command("redrive")
@_filters
@click.option("--offset", "offsets", multiple=True, type=click.IntRange(min=0), help="This DLQ offset (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every dead letter of the range (no other selector needed).")
@click.option("--dry-run", is_flag=True, help="Say what would be re-driven; produce nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per selected dead letter.")
@click.pass_context
def redrive_(
    ctx: click.Context,
    reasons: tuple[str, ...],
    sources: tuple[str, ...],
    partition: int | None,
    from_offset: int | None,
    to_offset: int | None,
    offsets: tuple[int, ...],
    everything: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-produce selected dead letters to their source topic once the cause is fixed.

    Key and value as they were, the record's epoch/seq headers and `redriven-from`; an
    idempotent producer with the bridge's partitioner. The worker applies each update once
    (deduplication by user_seq): re-driving twice is harmless. Dead letters of the bridge, cut
    ones and tombstones are refused. Select with --offset, --from-offset/--to-offset, --reason,
    --source, or --all.
    """
    env = _env(ctx)
    if not (offsets or reasons or sources or everything or from_offset is not None or to_offset is not None):
        raise click.UsageError("select dead letters: --offset, --from-offset/--to-offset, --reason, --source or --all")
    selected = list(
        _select(
            env,
            partition=partition,
            from_offset=from_offset,
            to_offset=to_offset,
            offsets=offsets,
            reasons=reasons,
            sources=sources,
        )
    )
    if not selected:
        _fail("no dead letter matches", EXIT_FAILED)
    try:
        topics = topic_partitions(env.bootstrap, env.timeout_s, env.kafka)
    except DlqError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    plan = plan_redrive(selected, topics, _registry(env))
    if not dry_run:
        try:
            plan = redrive(env.bootstrap, plan, timeout_s=max(env.timeout_s, 30.0), config=env.kafka)
        except DlqError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
    _report(plan, dry_run, as_json)
    refused = [r for r in plan if r.refused]
    sys.exit(EXIT_FAILED if refused else EXIT_OK)


def _report(plan: Iterable[Redrive], dry_run: bool, as_json: bool) -> None:
    plan = list(plan)
    for r in plan:
        if as_json:
            click.echo(json.dumps({**r.as_dict(), "dry_run": dry_run}, separators=(",", ":")))
            continue
        where = f"[{r.letter.partition}]@{r.letter.offset} {r.letter.reason}"
        if r.refused:
            click.echo(f"refused     {where}: {r.refused}")
        else:
            to = f"{r.letter.source_topic}" + (f"[{r.partition}]" if r.partition is not None else "")
            click.echo(f"{'would send' if dry_run else 'sent':11} {where} -> {to}")
    sent = sum(1 for r in plan if not r.refused)
    verb = "would be re-driven" if dry_run else "re-driven"
    click.echo(f"{sent} {verb}, {len(plan) - sent} refused", err=as_json)
