"""``ohs stack up | down | status | reset | env``."""

from __future__ import annotations

import json
import sys
import time

import click

from stack.errors import StackError
from stack.lifecycle import down, reset, status, up
from stack.settings import StackSettings

__all__ = ["stack"]


def _log(msg: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


@click.group()
@click.pass_context
def stack(ctx: click.Context) -> None:
    """The local Kafka (KRaft) + Cassandra stack, from Maven Central jars, on loopback."""
    ctx.obj = StackSettings()


@stack.command("up")
@click.option("--registry", is_flag=True, help="Also run the schema registry (same as OHS_REGISTRY=true).")
@click.pass_obj
def up_cmd(s: StackSettings, registry: bool) -> None:
    """Fetch the servers once, start them, and wait until they are usable."""
    if registry:
        s = s.model_copy(update={"registry": True})
    try:
        timings = up(s, _log, warm=True)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    _log("stack is up: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    _log(f"export OHS_KAFKA_BOOTSTRAP={s.kafka_bootstrap} OHS_CQL_CONTACT_POINTS={s.host}")
    _log(f"export OHS_CQL_PORT={s.cql_port}")
    if s.auth:
        _log("credentials are on (OHS_AUTH): `ohs stack env` prints the on-call principal's; docs/operations.md")
    if s.registry:
        _log(f"export OHS_SCHEMA_REGISTRY_URL={s.registry_url}")


@stack.command("down")
@click.argument("server", required=False, type=click.Choice(["kafka", "cassandra", "registry"]))
@click.pass_obj
def down_cmd(s: StackSettings, server: str | None) -> None:
    """Stop both servers (or SERVER) cleanly; data stays in the state dir. `up` restarts them."""
    down(s, _log, only=server)


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_cmd(s: StackSettings, as_json: bool) -> None:
    """Each server's pid, readiness and log path; exit 1 unless both are ready."""
    rows = status(s)
    if as_json:
        click.echo(json.dumps([_row(r) for r in rows]))
    else:
        for r in rows:
            state = "ready" if r.ready_error is None else f"NOT READY ({r.ready_error})"
            click.echo(f"{r.name:10} pid={r.pid or '-':<8} {r.endpoint:22} {state}  log: {r.log_file}")
    sys.exit(0 if all(r.ready_error is None for r in rows) else 1)


def _row(r: object) -> dict[str, object]:
    return {k: getattr(r, k) for k in ("name", "pid", "ready_error", "endpoint", "log_file")}


@stack.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def reset_cmd(s: StackSettings, yes: bool) -> None:
    """Stop both servers and wipe the state dir (every topic and table)."""
    if not yes:
        click.confirm(f"Delete {s.state_dir} with all topics and tables?", abort=True)
    reset(s, _log)


@stack.command("env")
@click.pass_obj
def env_cmd(s: StackSettings) -> None:
    """Print the client endpoint variables for this stack (eval "$(ohs stack env)")."""
    click.echo(f"export OHS_KAFKA_BOOTSTRAP={s.kafka_bootstrap}")
    click.echo(f"export OHS_CQL_CONTACT_POINTS={s.host}")
    click.echo(f"export OHS_CQL_PORT={s.cql_port}")
    if s.auth and "ops" in s.users:
        # With OHS_AUTH: the on-call principal, for `ohs lag`, `audit`, `orders` typed by hand.
        password = s.users["ops"]
        click.echo("export OHS_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT OHS_KAFKA_SASL_MECHANISM=PLAIN")
        click.echo(f"export OHS_KAFKA_SASL_USERNAME=ops OHS_KAFKA_SASL_PASSWORD={password}")
        click.echo(f"export OHS_CQL_USERNAME=ops OHS_CQL_PASSWORD={password}")
