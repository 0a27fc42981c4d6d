"""``ohs audit``: Kafka and Cassandra compared with the engine's journal, the pipeline's drop copy.

Exit status 0 only when everything matches (duplicates in Kafka are at-least-once delivery and
do not count), 1 otherwise: a lost or changed event, a row or record the journal never produced
(``beyond_journal``), or a journaled event that cannot be published (``journal unpublishable``,
its own category: the journal holds history no consumer will see, which is not ``lost``).
The checks live in ``audit.core``, ``audit.kafka`` and ``audit.cassandra``; this module
reads the settings once, runs them and renders the report.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from audit.core import INFO_CATEGORIES, AuditError, Findings, check_journal, load_truth
from bridge.settings import BridgeSettings
from engine.settings import EngineSettings
from streams.settings import WorkerSettings
from streams.trades import TradesSettings

__all__ = ["audit"]

_TABLES = (
    "user_updates",
    "active_orders",
    "order_history",
    "orders_by_id",
    "order_statistics",
    "user_trades",
    "user_trade_months",
)


def _totals(f: Findings, areas: list[str]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for area in areas:
        out.update(f.area(area))
    return dict(out)


def _render(report: dict[str, Any], f: Findings) -> None:
    console = Console(highlight=False)
    table = Table("area", "read", "expected", "problems", "information", title=f"audit of {report['journal']['dir']}")
    areas = [("journal", report["journal_check"])]
    areas += [(f"kafka {name}", v) for name, v in report["kafka"].items() if isinstance(v, dict) and "read" in v]
    areas += list(report["cassandra"].get("tables", {}).items())
    for name, counts in areas:
        bad = ", ".join(f"{c} {n}" for c, n in counts.items() if n and c not in (*INFO_CATEGORIES, "read", "expected"))
        info = ", ".join(f"{c} {n}" for c, n in counts.items() if n and c in INFO_CATEGORIES)
        table.add_row(name, str(counts["read"]), str(counts["expected"]), f"[red]{bad}[/]" if bad else "-", info)
    console.print(table)
    for line in report["notes"] + report["info"]:
        console.print(f"note: {line}")
    for ex in report["problems"]:
        rest = " ".join(f"{k}={v}" for k, v in ex.items() if k not in ("area", "category"))
        console.print(f"  {ex['area']} {ex['category']}: {rest}")
    worst = sorted(((sum(c.values()), u) for u, c in f.per_user.items()), reverse=True)[: f.limit]
    if worst:
        console.print(f"{len(f.per_user)} users with problems, most: " + ", ".join(f"{u} ({n})" for n, u in worst))
    t = report["timing"]
    phases = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in t.items() if k not in ("elapsed_s", "events_per_s"))
    events = report["journal"]["events"]
    console.print(f"{events} events in {t['elapsed_s']:.2f}s ({t['events_per_s']:,.0f} events/s; {phases})")
    console.print("[green]OK: everything matches the journal[/]" if report["ok"] else "[red]MISMATCH[/]")


@click.command()
@click.option("--journal-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: the engine's.")
@click.option("--keyspace", help="Keyspace of the worker's tables (default: the worker's).")
@click.option("--topic-prefix", default="", help="Prefix put before the configured topic names.")
@click.option("--topic-updates", help="OrderUpdate topic (default: the bridge's).")
@click.option("--topic-trades", help="Trade topic (default: the bridge's).")
@click.option("--topic-balances", help="BalanceUpdate topic (default: the bridge's).")
@click.option("--epoch", type=int, help="Epoch expected in the journal (default: whatever it holds).")
@click.option("--skip-kafka", is_flag=True, help="Do not read Kafka.")
@click.option("--skip-cassandra", is_flag=True, help="Do not read Cassandra.")
@click.option(
    "--schema-registry-url", help="For records in the registry wire format (default: OHS_SCHEMA_REGISTRY_URL)."
)
@click.option("--examples", default=10, show_default=True, help="Problems listed per area and category.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def audit(
    journal_dir: Path | None,
    keyspace: str | None,
    topic_prefix: str,
    topic_updates: str | None,
    topic_trades: str | None,
    topic_balances: str | None,
    epoch: int | None,
    skip_kafka: bool,
    skip_cassandra: bool,
    schema_registry_url: str | None,
    examples: int,
    as_json: bool,
) -> None:
    """Every journaled event in Kafka and its effects in Cassandra, per user and overall."""
    es, bs, ws = EngineSettings(), BridgeSettings(), WorkerSettings()
    topics = {
        "updates": topic_updates or topic_prefix + bs.topic_updates,
        "trades": topic_trades or topic_prefix + bs.topic_trades,
        "balances": topic_balances or topic_prefix + bs.topic_balances,
    }
    keyspace = keyspace or ws.keyspace
    f, timing = Findings(limit=examples), {}
    t0 = time.monotonic()
    try:
        with load_truth(
            journal_dir or es.journal_dir,
            es.symbol_specs(),
            maker_fee_bps=es.maker_fee_bps,
            taker_fee_bps=es.taker_fee_bps,
            fee_account=es.fee_account,
            epoch=epoch,
        ) as truth:
            timing["journal_s"] = time.monotonic() - t0
            check_journal(truth, f)
            kafka: dict[str, Any] = {"skipped": skip_kafka}
            if not skip_kafka:
                from audit.kafka import check_kafka  # the Kafka client only when it is used

                kafka["topics"] = check_kafka(
                    truth,
                    f,
                    bs.kafka_bootstrap,
                    topics,
                    schema_registry_url or bs.schema_registry_url,
                    bs.kafka_auth.librdkafka(),
                )
                timing["kafka_s"] = time.monotonic() - t0 - sum(timing.values())
                roles = [f"kafka.{role}" for role in topics]
                kafka.update({"totals": _totals(f, roles), **{r.split(".")[1]: f.area(r) for r in roles}})
            cassandra: dict[str, Any] = {"skipped": skip_cassandra, "keyspace": keyspace}
            if not skip_cassandra:
                from audit.cassandra import check_cassandra

                fills = TradesSettings().trades
                if not fills:
                    f.info.append("fills (user_trades) not audited: the worker's trades consumer is off")
                check_cassandra(truth, f, ws, keyspace, fills=fills)
                timing["cassandra_s"] = time.monotonic() - t0 - sum(timing.values())
                cassandra["tables"] = {name: f.area(name) for name in _TABLES}
            journal = truth.summary()
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    timing["elapsed_s"] = elapsed = time.monotonic() - t0
    timing["events_per_s"] = journal["events"] / elapsed if elapsed > 0 else 0.0
    report = {
        "ok": f.ok,
        "journal": journal,
        "journal_check": f.area("journal"),
        "kafka": kafka,
        "cassandra": cassandra,
        "notes": f.notes,
        "info": f.info,
        "problems": f.examples,
        "per_user": {str(u): dict(c) for u, c in sorted(f.per_user.items())},
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        _render(report, f)
    sys.exit(0 if f.ok else 1)
