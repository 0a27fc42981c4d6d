"""The bridge package's exception root.

``retriable`` is declared per class: ``BridgeError`` itself is a refusal waiting cannot fix (a
setting the broker rejects, a registry that refuses the schema); ``BridgeUnavailable`` is Kafka or
the schema registry not answering yet, which ``BridgeService.start`` waits out. Kafka's and the
registry's errors are translated into these once, in ``bridge.kafka`` and ``bridge.service``.
"""

from __future__ import annotations

__all__ = ["BridgeError", "BridgeUnavailable"]


class BridgeError(Exception):
    """The bridge cannot continue (Kafka refused a setting, the replay service cannot help)."""

    retriable: bool = False


class BridgeUnavailable(BridgeError):
    """Kafka or the schema registry did not answer (down, still starting): waiting can help."""

    retriable = True
