"""``ohs orders``: one user's orders, read from Cassandra as the worker wrote them (no CQL needed).

Modes (one at a time; the default is ``--history``):

* ``--history``: the user's orders, newest first, latest state each (``order_history``);
* ``--active``: the user's open orders (``active_orders``);
* ``--order ID``: one order and its events in seq order (``orders_by_id`` locates it, the
  events are the ``events`` map of its ``order_history`` row, or the ``order_events`` rows that
  older versions wrote);
* ``--stats``: the user's statistics per symbol (``order_statistics``; ``*`` = all symbols).

It connects with the worker's settings (``OHS_CQL_CONTACT_POINTS``, ``OHS_CQL_PORT``,
``OHS_KEYSPACE``, ...) and selects explicit columns only. Exit status: 0 done (an empty list
included), 1 no such order for that user, 2 usage error, 3 Cassandra unreachable or the keyspace
missing; failures are one line on stderr.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

__all__ = ["orders"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

HISTORY_COLUMNS = (
    "epoch", "order_id", "client_order_id", "symbol", "side", "order_type", "time_in_force", "price", "qty",
    "quote_budget", "filled_qty", "remaining_qty", "quote_filled", "status", "reason", "created_ns", "updated_ns",
    "expire_ns", "seq",
)  # fmt: skip
ACTIVE_COLUMNS = (
    "epoch", "order_id", "client_order_id", "symbol", "side", "order_type", "time_in_force", "price", "qty",
    "quote_budget", "filled_qty", "remaining_qty", "quote_filled", "status", "created_ns", "updated_ns",
    "expire_ns", "seq",
)  # fmt: skip
EVENT_COLUMNS = (
    "seq", "user_seq", "status", "filled_qty", "remaining_qty", "last_fill_qty", "last_fill_price", "trade_id",
    "reason", "ts_ns",
)  # fmt: skip
_TABLE_COLUMNS = ("epoch", "order_id", "symbol", "side", "type", "tif", "price", "qty", "filled", "status", "updated")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ohs orders: {message}", err=True)
    sys.exit(code)


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class _Reader:
    """The few reads of this command, on a session opened with the worker's settings."""

    def __init__(self, s: Any) -> None:
        from cassandra import ConsistencyLevel
        from cassandra.cluster import ExecutionProfile

        from kit.cql import load_balancing, make_cluster

        # The driver logs every failed connection attempt as a warning: one line of ours instead.
        logging.getLogger("cassandra").setLevel(logging.CRITICAL)
        profile = ExecutionProfile(
            load_balancing_policy=load_balancing(s.cql_local_dc),
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            request_timeout=s.request_timeout_s,
        )
        self.ks = s.keyspace
        self.cluster = make_cluster(s.hosts, s.cql_port, profile, s.cql_protocol_version, s.cql_auth)
        try:
            self.session = self.cluster.connect()
        except Exception as exc:
            self.cluster.shutdown()
            _fail(f"cannot reach Cassandra at {','.join(s.hosts)}:{s.cql_port}: {_short(exc)}", EXIT_UNREACHABLE)
        if self.ks not in self.cluster.metadata.keyspaces:
            self.close()
            _fail(f"keyspace {self.ks!r} does not exist (run `ohs db migrate` or start the worker)", EXIT_UNREACHABLE)

    def rows(self, cql: str, params: Sequence[Any]) -> list[Any]:
        try:
            return list(self.session.execute(cql, tuple(params)))
        except Exception as exc:
            from cassandra import InvalidRequest

            if isinstance(exc, InvalidRequest):
                raise
            _fail(f"Cassandra query failed: {_short(exc)}", EXIT_UNREACHABLE)

    def close(self) -> None:
        self.cluster.shutdown()

    # ------------------------------------------------------------------ reads
    def history(self, user: int, limit: int) -> list[dict[str, Any]]:
        cql = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM {self.ks}.order_history WHERE user_id = %s LIMIT %s"
        return [row._asdict() for row in self.rows(cql, (user, limit))]

    def active(self, user: int) -> list[dict[str, Any]]:
        cql = f"SELECT {', '.join(ACTIVE_COLUMNS)} FROM {self.ks}.active_orders WHERE user_id = %s"
        return [row._asdict() for row in self.rows(cql, (user,))]

    def stats(self, user: int) -> list[dict[str, Any]]:
        from streams.state import STAT_FIELDS

        cols = ", ".join(("symbol", *STAT_FIELDS, "last_epoch", "last_seq"))
        return [
            row._asdict()
            for row in self.rows(f"SELECT {cols} FROM {self.ks}.order_statistics WHERE user_id = %s", (user,))
        ]

    def order(self, user: int, order_id: int, epoch: int | None) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The order's latest state and its events, or None when this user has no such order."""
        cql = f"SELECT epoch, user_id FROM {self.ks}.orders_by_id WHERE order_id = %s"
        params: tuple[Any, ...] = (order_id,)
        if epoch is not None:
            cql += " AND epoch = %s"
            params += (epoch,)
        # Order ids start again in a new epoch: the newest epoch in which it is this user's.
        refs = [r for r in self.rows(cql, params) if r.user_id == user]
        if not refs:
            return None
        epoch = refs[0].epoch
        # A keyspace not migrated to 002_fewer_rows has no events column: its events are rows of
        # order_events.
        table = self.cluster.metadata.keyspaces[self.ks].tables.get("order_history")
        has_events = table is not None and "events" in table.columns
        cols = ", ".join((*HISTORY_COLUMNS, "events") if has_events else HISTORY_COLUMNS)
        rows = self.rows(
            f"SELECT {cols} FROM {self.ks}.order_history WHERE user_id = %s AND epoch = %s AND order_id = %s",
            (user, epoch, order_id),
        )
        if not rows:
            return None
        state = rows[0]._asdict()
        payloads: dict[int, bytes] = dict(state.pop("events", None) or {})
        if not payloads:
            payloads = self._legacy_events(epoch, order_id)
        return state, [_event(seq, payloads[seq]) for seq in sorted(payloads)]

    def _legacy_events(self, epoch: int, order_id: int) -> dict[int, bytes]:
        from cassandra import InvalidRequest

        cql = f"SELECT seq, payload FROM {self.ks}.order_events WHERE epoch = %s AND order_id = %s"
        try:
            return {r.seq: r.payload for r in self.rows(cql, (epoch, order_id))}
        except InvalidRequest:  # the table was dropped (docs: it may be, once nothing reads it)
            return {}


def _event(seq: int, payload: bytes) -> dict[str, Any]:
    from schemas.codec import CodecError, decode
    from schemas.events import OrderUpdate

    try:
        ev = decode(payload)
    except CodecError as exc:
        return {"seq": seq, "error": f"not decodable: {exc}"}
    if not isinstance(ev, OrderUpdate):
        return {"seq": seq, "error": f"a {type(ev).__name__}, not an order update"}
    out = {}
    for name in EVENT_COLUMNS:
        value = getattr(ev, name)
        out[name] = getattr(value, "value", value)
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _order_cells(o: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(o["epoch"]),
        str(o["order_id"]),
        o["symbol"] or "",
        o["side"] or "",
        o["order_type"] or "",
        o["time_in_force"] or "",
        str(o["price"]),
        str(o["qty"]),
        str(o["filled_qty"]),
        o["status"] or "",
        _when(o["updated_ns"]),
    )


def _print_orders(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in _TABLE_COLUMNS:
        table.add_column(name, justify="right" if name in ("epoch", "order_id", "price", "qty", "filled") else "left")
    for o in rows:
        table.add_row(*_order_cells(o))
    Console(width=max(Console().width, 140)).print(table)


def _jsonable(doc: Any) -> str:
    return json.dumps(doc, default=str, indent=2)


@click.command()
@click.option("--user", "user_id", type=click.IntRange(min=1, max=2**63 - 1), required=True, help="User id.")
@click.option("--history", "mode", flag_value="history", default=True, help="Orders newest first (default).")
@click.option("--active", "mode", flag_value="active", help="Open orders only.")
@click.option("--stats", "mode", flag_value="stats", help="Statistics per symbol ('*' = all).")
@click.option("--order", "order_id", type=click.IntRange(min=1, max=2**63 - 1), help="One order and its events.")
@click.option("--epoch", type=click.IntRange(min=1), default=None, help="With --order: the engine epoch.")
@click.option(
    "--limit", type=click.IntRange(min=1, max=10_000), default=20, show_default=True, help="Most orders (history)."
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def orders(user_id: int, mode: str, order_id: int | None, epoch: int | None, limit: int, as_json: bool) -> None:
    """A user's orders, open orders, one order with its events, or statistics, from Cassandra."""
    from pydantic import ValidationError

    from streams.settings import WorkerSettings

    if epoch is not None and order_id is None:
        raise click.UsageError("--epoch needs --order")
    if order_id is not None and mode != "history":
        raise click.UsageError("--order cannot be combined with --active or --stats")
    try:
        s = WorkerSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"bad environment: {'.'.join(map(str, err['loc']))}: {err['msg']}", EXIT_USAGE)
    reader = _Reader(s)
    try:
        if order_id is not None:
            found = reader.order(user_id, order_id, epoch)
            if found is None:
                _fail(f"user {user_id} has no order {order_id}" + (f" in epoch {epoch}" if epoch else ""), 1)
            state, events = found
            if as_json:
                click.echo(_jsonable({"user_id": user_id, "order": state, "events": events}))
                return
            _print_orders(f"user {user_id}: order {order_id}", [state])
            _print_events(events)
        elif mode == "active":
            rows = reader.active(user_id)
            if as_json:
                click.echo(_jsonable({"user_id": user_id, "active": rows}))
                return
            _print_orders(f"user {user_id}: {len(rows)} open order(s)", rows)
        elif mode == "stats":
            rows = reader.stats(user_id)
            if as_json:
                click.echo(_jsonable({"user_id": user_id, "statistics": rows}))
                return
            _print_stats(user_id, rows)
        else:
            rows = reader.history(user_id, limit)
            if as_json:
                click.echo(_jsonable({"user_id": user_id, "orders": rows}))
                return
            _print_orders(f"user {user_id}: newest {len(rows)} order(s)", rows)
    finally:
        reader.close()


def _print_events(events: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(events)} event(s)")
    for name in ("seq", "user_seq", "status", "filled", "remaining", "fill", "trade", "reason", "time"):
        table.add_column(name, justify="left" if name in ("status", "reason", "time") else "right")
    for e in events:
        if "error" in e:
            table.add_row(str(e["seq"]), "", e["error"], "", "", "", "", "", "")
            continue
        fill = f"{e['last_fill_qty']} @ {e['last_fill_price']}" if e["last_fill_qty"] else "-"
        table.add_row(
            str(e["seq"]),
            str(e["user_seq"]),
            e["status"],
            str(e["filled_qty"]),
            str(e["remaining_qty"]),
            fill,
            str(e["trade_id"] or "-"),
            e["reason"],
            _when(e["ts_ns"]),
        )
    Console(width=max(Console().width, 140)).print(table)


def _print_stats(user_id: int, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"user {user_id}: statistics")
    names = [k for k in (rows[0] if rows else {}) if k != "symbol"]
    table.add_column("symbol")
    for name in names:
        table.add_column(name.removeprefix("orders_"), justify="right")
    for r in rows:
        table.add_row(r["symbol"], *(str(r[n]) for n in names))
    Console(width=max(Console().width, 160)).print(table)
