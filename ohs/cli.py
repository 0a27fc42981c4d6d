"""``ohs``: the single command line of the project.

Each package owns its own subcommands (``stack/cli.py``, ``engine/cli.py``,
...); this module only names them. They are imported lazily so that
``ohs stack up`` does not pay for importing faust or the Cassandra driver,
and so that a broken optional package cannot take the whole CLI down.
"""

from __future__ import annotations

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
    "bench": "ohs.bench:bench",
    "config-doc": "ohs.configdoc:config_doc",
    "lag": "streams.lagcmd:lag",
    "replay": "streams.replaycmd:replay",
    "api": "api.cli:api",
    "audit": "ohs.audit:audit",
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


@click.group(cls=LazyGroup)
def main() -> None:
    """Order-history streaming service: engine -> ZeroMQ -> Kafka -> Faust -> Cassandra."""


if __name__ == "__main__":
    main()
