"""The running build's version, for ``ohs --version`` and every process's ``ohs_build_info``.

Standard library only at import time (every process imports it at start, ``ohs --version``
must be instant): the Prometheus client is imported by ``register_build_info`` alone.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Any

__all__ = ["DISTRIBUTION", "build_version", "register_build_info"]

DISTRIBUTION = "order-history-service"


@functools.cache
def build_version() -> str:
    """The installed distribution's version; ``OHS_BUILD_VERSION`` overrides it (an image built
    from a tagged commit can say which); ``0+unknown`` when run from a tree that is not installed."""
    override = os.environ.get("OHS_BUILD_VERSION", "").strip()
    if override:
        return override[:64]
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


_registered: dict[tuple[str, int], Any] = {}


def register_build_info(component: str, registry: Any = None) -> Any:
    """Export ``ohs_build_info{component, version} 1`` in ``registry`` (default: the process's
    global one) and return the gauge. Idempotent per registry: a second call with another
    component adds its series to the same gauge.

    Every process calls it once from its metrics module, e.g. ``register_build_info("worker")``.
    """
    from prometheus_client import REGISTRY, Gauge

    reg = REGISTRY if registry is None else registry
    key = ("ohs_build_info", id(reg))
    gauge = _registered.get(key)
    if gauge is None:
        gauge = _registered[key] = Gauge(
            "ohs_build_info", "Version of the running build (always 1)", ["component", "version"], registry=reg
        )
    gauge.labels(component, build_version()).set(1)
    return gauge
