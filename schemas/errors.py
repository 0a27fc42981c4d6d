"""The schemas package's exception root: every contract error (codec, Avro, checkpoint, feed frame).

``retriable`` is declared per class: whether trying the same thing again can succeed. Only an
unreachable schema registry (``RegistryUnavailable``) is; a payload that does not decode never is.
Standard library only.
"""

from __future__ import annotations

__all__ = ["SchemaError"]


class SchemaError(Exception):
    """Root of the schemas package's errors: bytes or documents that are not what the contract says."""

    retriable: bool = False
