"""Generate docs/configuration.md from the settings classes of every process.

The reference is generated, never written by hand, and a unit test fails when
the committed file and the code disagree: `ohs config-doc --write` fixes it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click
from pydantic_settings import BaseSettings

__all__ = ["SETTINGS_CLASSES", "config_doc", "render"]

# process -> "module:Class". A class whose module is not importable yet is skipped.
SETTINGS_CLASSES: dict[str, str] = {
    "ohs stack (local Kafka + Cassandra)": "stack.settings:StackSettings",
    "ohs engine": "engine.settings:EngineSettings",
    "ohs bridge": "bridge.settings:BridgeSettings",
    "faust worker / ohs db / ohs replay": "streams.settings:WorkerSettings",
    "ohs api": "api.settings:ApiSettings",
}

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _env_names(cls: type[BaseSettings], name: str, field: Any) -> str:
    if field.validation_alias is not None:
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            return " / ".join(str(c).upper() for c in choices)
        return str(alias).upper()
    prefix = cls.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value!r}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the settings classes by `ohs config-doc --write`; a test fails when this",
        "file and the code disagree. Every setting is read from the environment once, at the",
        "process's entry point.",
        "",
    ]
    for process, target in SETTINGS_CLASSES.items():
        module_name, cls_name = target.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue
        out += [f"## {process}", "", f"`{target.replace(':', '.')}`", ""]
        out += ["| env var | default | meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{_env_names(cls, name, field)}` | {_default(field)} | {desc} |")
        out.append("")
    return "\n".join(out)


@click.command("config-doc")
@click.option("--write", is_flag=True, help=f"Write {DOC.name} instead of printing it.")
def config_doc(write: bool) -> None:
    """Print (or --write) the configuration reference generated from the settings classes."""
    text = render()
    if write:
        DOC.write_text(text)
        click.echo(f"wrote {DOC}")
    else:
        click.echo(text)
