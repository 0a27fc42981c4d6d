"""The fault suite's fixture: the local stack whose servers it may stop (left running after)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from stack.lifecycle import up
from stack.settings import StackSettings


@pytest.fixture
def local_stack(stack_endpoints) -> Iterator[StackSettings]:
    if os.environ.get("OHS_TEST_STACK") == "external":
        pytest.skip("restarts a server: needs the local stack, not OHS_TEST_STACK=external")
    s = StackSettings()
    yield s
    up(s, log=lambda m: print(f"[stack] {m}"))  # whatever a failed test left stopped
