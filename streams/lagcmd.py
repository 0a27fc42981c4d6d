"""``ohs lag``: consumer lag per group and partition, for people and for alerting."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from streams.lag import LagError, PartitionLag, group_lag

__all__ = ["lag"]


def _table(rows: list[PartitionLag]) -> str:
    lines = [f"{'group':24} {'topic':22} {'part':>4} {'committed':>10} {'end':>10} {'lag':>8} {'lag_s':>8}"]
    for r in rows:
        lines.append(
            f"{r.group:24} {r.topic:22} {r.partition:>4} {r.committed:>10} {r.end:>10} "
            f"{r.lag_messages:>8} {r.lag_seconds:>8.1f}"
        )
    total = sum(r.lag_messages for r in rows)
    worst = max((r.lag_seconds for r in rows), default=0.0)
    lines.append(f"total lag: {total} messages; oldest unconsumed: {worst:.1f}s")
    return "\n".join(lines)


@click.command()
@click.option("--group", "groups", multiple=True, help="Consumer group (repeatable); default: the worker's.")
@click.option("--topic", "topics", multiple=True, help="Only these topics (default: all the group reads).")
@click.option("--watch", type=float, default=None, help="Refresh every N seconds until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per refresh.")
@click.option("--max-lag", type=int, default=None, help="Exit 2 if any partition lags more messages.")
@click.option("--max-lag-seconds", type=float, default=None, help="Exit 2 if any record is older unconsumed.")
def lag(
    groups: tuple[str, ...],
    topics: tuple[str, ...],
    watch: float | None,
    as_json: bool,
    max_lag: int | None,
    max_lag_seconds: float | None,
) -> None:
    """Committed offset, end offset, lag in messages and in seconds, per group and partition."""
    bootstrap = os.environ.get("OHS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    names = list(groups) or [os.environ.get("OHS_WORKER_GROUP", "ohs-order-history")]
    while True:
        try:
            rows = [r for g in names for r in group_lag(bootstrap, g, list(topics) or None)]
        except LagError as exc:
            raise click.ClickException(str(exc)) from exc
        if as_json:
            click.echo(json.dumps({"at": time.time(), "partitions": [r.as_dict() for r in rows]}))
        else:
            if watch:
                click.clear()
            click.echo(_table(rows))
        breached = (max_lag is not None and any(r.lag_messages > max_lag for r in rows)) or (
            max_lag_seconds is not None and any(r.lag_seconds > max_lag_seconds for r in rows)
        )
        if watch is None:
            sys.exit(2 if breached else 0)
        time.sleep(watch)
