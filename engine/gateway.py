"""The command gateway's request format, parsed defensively: ``[CMD, json]`` -> commands.

A request is two frames after the ROUTER's identity: ``CMD`` and a UTF-8 JSON
body, one command object or a list of them. Everything about it is bounded
before it is looked at: the number of frames, their total size, the JSON's
nesting (two levels is all a valid body has, and nothing deeper ever reaches
the recursive C parser) and the number of commands. Field types are checked
here; ranges and lengths are the core's wire-range rules (``engine.core``),
which reject with a result and journal nothing.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.commands import Command
from engine.interfaces import EngineError
from engine.journal import command_from_dict
from schemas.wire import loads_bounded

__all__ = ["MAX_DEPTH", "RequestError", "parse_request"]

MAX_DEPTH = 2
"""A list of flat command objects."""


class RequestError(EngineError, ValueError):
    """The request is refused as a whole (answered ERR); the message says why."""

    retriable = False


def parse_request(
    parts: Sequence[bytes], *, frames: int, size: int, max_bytes: int, max_commands: int
) -> list[Command]:
    """Commands (``ts_ns`` 0: the engine stamps them) from the frames after the identity.

    ``parts`` may be fewer than ``frames`` (the receiver keeps only the first few of a message
    with many); ``size`` is the total bytes of all of them."""
    if frames != 2:
        raise RequestError(f"expected [CMD, json], got {frames} frames")
    if size > max_bytes:
        raise RequestError(f"request of {size} bytes exceeds the limit of {max_bytes}")
    if parts[0] != b"CMD":
        raise RequestError("expected [CMD, json]")
    try:
        body = loads_bounded(parts[1], MAX_DEPTH)
    except ValueError as exc:
        raise RequestError(f"body is not JSON of at most {MAX_DEPTH} levels: {str(exc)[:200]}") from exc
    items: list[Any] = body if isinstance(body, list) else [body]
    if not items or len(items) > max_commands:
        raise RequestError(f"a request holds 1 to {max_commands} commands")
    commands = []
    for item in items:
        if not isinstance(item, dict) or item.get("type") not in ("place", "cancel", "deposit", "withdraw"):
            raise RequestError("each command is an object with a type: place|cancel|deposit|withdraw")
        try:
            # The client's clock is never trusted: the engine stamps every command.
            commands.append(command_from_dict({**item, "ts_ns": 0}))
        except (ValueError, KeyError, TypeError) as exc:
            raise RequestError(f"{item['type']}: {str(exc)[:200]}") from exc
    return commands
