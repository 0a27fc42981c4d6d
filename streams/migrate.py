"""``ohs db migrate``: apply the versioned CQL files under ``streams/cql`` once each.

Files are applied in name order; each one's statements are idempotent
(``IF NOT EXISTS``) and its name is recorded in ``<ks>.schema_migrations``
afterwards, so running migrate again, or concurrently from two workers, is
harmless.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from streams.errors import SinkRejected
from streams.settings import WorkerSettings

__all__ = ["migrate", "statements"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


def statements(text: str, keyspace: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    body = "\n".join(lines).replace("{ks}", keyspace)
    return [stmt.strip() for stmt in body.split(";") if stmt.strip()]


def _execute(session: Any, stmt: str) -> None:
    """Run one DDL statement. ``ALTER TABLE ... ADD`` has no portable ``IF NOT EXISTS``
    (ScyllaDB lacks it): a column that exists already (a concurrent migrate, or one applied
    before its name was recorded) counts as done."""
    from cassandra import InvalidRequest

    try:
        session.execute(stmt, timeout=60)
    except InvalidRequest as exc:
        if not (stmt.upper().startswith("ALTER TABLE") and " ADD " in stmt.upper() and "exist" in str(exc)):
            raise


def migrate(session: Any, s: WorkerSettings, keyspace: str | None = None) -> list[str]:
    """Apply pending migrations to ``keyspace`` (default: the configured one); returns their names."""
    ks = keyspace or s.keyspace
    if not _NAME.match(ks):
        raise SinkRejected(f"invalid keyspace name {ks!r}")
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {s.replication}", timeout=60)
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (name text PRIMARY KEY, applied_at timestamp)",
        timeout=60,
    )
    done = {row.name for row in session.execute(f"SELECT name FROM {ks}.schema_migrations")}
    applied = []
    cql_dir = resources.files("streams").joinpath("cql")
    files = sorted((f for f in cql_dir.iterdir() if f.name.endswith(".cql")), key=lambda f: f.name)
    for f in files:
        if f.name in done:
            continue
        for stmt in statements(f.read_text(), ks):
            _execute(session, stmt)
        session.execute(
            f"INSERT INTO {ks}.schema_migrations (name, applied_at) VALUES (%s, toTimestamp(now()))",
            (f.name,),
        )
        applied.append(f.name)
    return applied
