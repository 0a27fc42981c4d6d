"""The optional C builds in tests: a test module of one skips without it, except on CI."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def built(module: str) -> ModuleType:
    """The optional build ``module``; without it the calling test module skips, unless
    OHS_REQUIRE_NATIVE=1 (CI sets it: there a build must not fail unnoticed), where it is an error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("OHS_REQUIRE_NATIVE") == "1":
            raise RuntimeError(f"{module} was not built (OHS_REQUIRE_NATIVE=1): see the pip install output") from None
        pytest.skip(f"{module} was not built (no C compiler or Python headers)", allow_module_level=True)
