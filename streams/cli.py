"""``ohs db migrate | drop-keyspace`` and ``ohs worker`` (the same as ``faust -A streams.app worker``)."""

from __future__ import annotations

import os
import sys

import click

__all__ = ["db", "worker"]


@click.group()
def db() -> None:
    """The Cassandra/ScyllaDB schema."""


@db.command("migrate")
@click.option("--keyspace", default=None, help="Keyspace (default: OHS_KEYSPACE).")
def migrate_cmd(keyspace: str | None) -> None:
    """Create the keyspace and apply pending CQL migrations (idempotent)."""
    from streams.errors import SinkError
    from streams.migrate import migrate
    from streams.settings import WorkerSettings
    from streams.sink import connect

    s = WorkerSettings()
    try:
        cluster, session = connect(s)
    except SinkError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        applied = migrate(session, s, keyspace)
    finally:
        cluster.shutdown()
    click.echo(f"keyspace {keyspace or s.keyspace}: applied {applied or 'nothing (up to date)'}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run the Faust worker (exec of `faust -A streams.app worker -l info ARGS`)."""
    faust = os.path.join(os.path.dirname(sys.executable), "faust")
    os.execv(faust, [faust, "-A", "streams.app", "worker", "-l", "info", *args])
