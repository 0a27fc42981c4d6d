"""What goes on the wire for one event: its frames, or why it cannot be published.

Shared by the engine (``schemas.wire.event_entry`` is what the service journals and sends) and
``ohs audit`` (which expects an unpublishable seq nowhere downstream, and hashes the payload of
every other), so both decide alike and see the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import Event
from schemas.wire import ENTRY, event_entry, parse_marker

__all__ = ["Unpublishable", "frames_or_problem"]


@dataclass(frozen=True, slots=True)
class Unpublishable:
    reason: str
    """out_of_range | bad_text | oversized | unencodable"""
    detail: str


def frames_or_problem(ev: Event) -> tuple[bytes, bytes] | Unpublishable:
    """(header, payload) of a publishable event, else why it is not."""
    entry, record = event_entry(ev)
    if record is None:
        return entry[4 : ENTRY.size], entry[ENTRY.size :]
    body = parse_marker(entry[ENTRY.size :])
    return Unpublishable(str(body["reason"]), str(body["detail"]))
