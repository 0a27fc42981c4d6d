"""The API's exception root: what a handler may raise, with whether retrying can help.

Driver errors are translated once, in ``api.store``; the app maps each class to one HTTP
status (and a WebSocket close code), all of them listed in the OpenAPI document.
"""

from __future__ import annotations

__all__ = ["ApiError", "StorageUnavailable"]


class ApiError(Exception):
    retriable: bool = False


class StorageUnavailable(ApiError):
    """Cassandra cannot answer now (not connected yet, down, timing out): 503, retry later."""

    retriable = True
