"""Process-wide tuning every long-running process applies once, at its entry point.

CPython's cyclic garbage collector is the largest single cost the profiles of the hot paths did
not show: py-spy charges a collection to whatever line allocated last. With the default
thresholds (700, 10, 10) the youngest generation is collected every 700 container allocations,
and up to every 100th collection is a full one, which walks every live object. Measured with
``gc.callbacks``: the engine's service loop (which keeps each batch's events alive until they are
journaled and sent) paid ~100 ms per full collection in its benchmark, a quarter of its time;
the worker (~10^5 objects once Faust, aiokafka and the drivers are imported, more with their
buffers and caches) 75-140 ms about once a second, up to a third of its CPU in ``ohs bench sink``,
each one a pause of its event loop (docs/benchmarks.md, sink section).

Nothing here depends on the collector for correctness: reference counting frees almost
everything the hot paths allocate, and the collector only has to find the rare cycle. Two
changes (the threshold is a setting of each process):

- ``gc.freeze()`` once start-up is done: what exists then (modules, classes, the recovered state)
  lives as long as the process, so full collections stop walking it;
- a larger first threshold: the young generation is collected every ``threshold0`` allocations
  instead of 700, and with it the older ones ~70x less often. A cycle is found that many
  allocations later at most: up to ~50,000 more objects of garbage waiting (an estimate, a few
  MiB), never a leak.
"""

from __future__ import annotations

import gc
from typing import Any

from pydantic import AliasChoices, Field

__all__ = ["GC_THRESHOLD0_DEFAULT", "gc_threshold0_field", "tune_gc"]

GC_THRESHOLD0_DEFAULT = 50_000
"""Measured with ``ohs bench sink`` (30,000 updates): the worker collected for 1.3 s of its 4.9
CPU-s with 700 (14 full collections), 0.5 s with 10,000 and 0.3 s with 50,000 (2 full ones)."""


def gc_threshold0_field(env_prefix: str) -> Any:
    """The ``gc_threshold0`` field of a process's settings: ``<PREFIX>GC_THRESHOLD0``, or
    ``OHS_GC_THRESHOLD0`` for every process at once."""
    return Field(
        default=GC_THRESHOLD0_DEFAULT,
        ge=700,
        le=10_000_000,
        validation_alias=AliasChoices(f"{env_prefix}GC_THRESHOLD0", "OHS_GC_THRESHOLD0"),
        description=(
            "Allocations between collections of Python's youngest garbage-collector generation (CPython's "
            "default: 700). Higher means fewer full collections, which pause the process for 75-140 ms each."
        ),
    )


def tune_gc(threshold0: int, freeze: bool = True) -> None:
    """Apply the collector's settings for a long-running process (``threshold0`` 700 and
    ``freeze=False`` are CPython's defaults). Call it once start-up is done."""
    if freeze:
        gc.collect()  # garbage that exists now would be frozen with the rest, never to be freed
        gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, threshold2)
