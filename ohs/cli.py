"""``ohs``: the single command line of the project.

Each package owns its own subcommands (``stack/cli.py``, ``engine/cli.py``,
...); this module only names them. They are imported lazily so that
``ohs stack up`` does not pay for importing faust or the Cassandra driver,
and so that a broken optional package cannot take the whole CLI down.
"""

from __future__ import annotations

import faulthandler
import importlib
import importlib.util
from typing import Any

import click

# name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "stack": "stack.cli:stack",
    "engine": "engine.cli:engine",
    "bridge": "bridge.cli:bridge",
    "db": "streams.cli:db",
    "worker": "streams.cli:worker",
    "smoke": "stack.smoke:smoke",
    "run": "ohs.run:run",
    "bench": "bench.cli:bench",
    "config-doc": "ohs.configdoc:config_doc",
    "lag": "streams.lagcmd:lag",
    "replay": "streams.replaycmd:replay",
    "api": "api.cli:api",
    "audit": "audit.cli:audit",
    "orders": "streams.orderscmd:orders",
    "dlq": "streams.dlqcmd:dlq",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in SUBCOMMANDS.items() if _importable(target))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        command: Any = getattr(module, attr)
        return command  # type: ignore[no-any-return]


def _importable(target: str) -> bool:
    module_name = target.split(":")[0]
    return importlib.util.find_spec(module_name) is not None


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from kit.version import build_version

        click.echo(f"ohs {build_version()}")
        ctx.exit()


@click.group(cls=LazyGroup)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version, help="Print the version."
)
def main() -> None:
    """Order-history streaming service: engine -> ZeroMQ -> Kafka -> Faust -> Cassandra."""
    # Every `ohs ...` process passes here first: a fatal signal (SIGSEGV, SIGABRT, SIGFPE, SIGBUS,
    # SIGILL) prints every Python thread's stack on stderr before the process dies. Blind spot: a
    # crash on a thread that blocks all signals never reaches the handler (the kernel kills the
    # process with the default action) -- librdkafka's own threads do block them, so a crash inside
    # librdkafka shows only as rc 139/134; `gdb -batch -ex run -ex "thread apply all bt" --args ...`
    # or a core dump finds those. `ohs worker` execs faust: `ohs run` sets PYTHONFAULTHANDLER for it.
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


if __name__ == "__main__":
    main()
