"""The matching engine: its pure core (``book``, ``ledger``, ``core``), journal, service, gateway
and replay.

The core may run compiled: setup.py compiles its modules (and ``batch``) with mypyc (an optional build,
docs/engine.md) from the same source that runs without it. Python imports an extension module
before a source file of the same name, so without a check a build made from older source would
run after an edit. This package checks once, when it is first imported: the compiled modules run
only when the SHA-256 of each source matches what the build recorded (``_core_build.json``),
and ``OHS_ENGINE_PURE=1`` runs the source anyway (tests and benchmarks compare the two; it is
read here and not in a settings class because it must act before the modules are imported).
``core_build()`` says which runs, and why.

Standard library only.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED_MODULES", "core_build"]

COMPILED_MODULES = ("engine.book", "engine.ledger", "engine.core", "engine.batch")
"""What setup.py compiles when it can (its ``CORE`` names the same files)."""

_HERE = Path(__file__).resolve().parent


def _source(name: str) -> Path:
    return _HERE / f"{name.rpartition('.')[2]}.py"


def _why_source() -> str | None:
    """Why the Python source must run although a build may be there; None when the build may run."""
    if os.environ.get("OHS_ENGINE_PURE") == "1":
        return "OHS_ENGINE_PURE=1"
    try:
        recorded = json.loads((_HERE / "_core_build.json").read_text())["sources"]
    except FileNotFoundError:
        return "not built"
    except (ValueError, KeyError, TypeError) as exc:
        return f"engine/_core_build.json is unreadable ({exc!r})"
    for name in COMPILED_MODULES:
        digest = hashlib.sha256(_source(name).read_bytes()).hexdigest()
        if recorded.get(name) != digest:
            rebuild = "`make venv` (or `pip install -e .`) rebuilds it"
            return f"{_source(name).name} changed since it was compiled: {rebuild}"
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the core's modules as source files, ahead of the extension modules beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(fullname))


_WHY_SOURCE = _why_source()
if _WHY_SOURCE is not None:
    sys.meta_path.insert(0, _SourceFinder())


def core_build() -> str:
    """Which core runs: "compiled (mypyc)", or "Python (<why>)". Imports the core."""
    import engine.core

    if (engine.core.__file__ or "").endswith(".py"):
        return f"Python ({_WHY_SOURCE or 'not built'})"
    return "compiled (mypyc)"
