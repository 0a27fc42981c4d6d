"""``ohs bench e2e``'s raw limits refuse a sample too short to hold an order update, before any I/O."""

from __future__ import annotations

import pytest

from bench.e2e import raw_limits
from bench.errors import BenchError


def test_a_raw_sample_of_deposits_only_is_refused_with_what_to_give() -> None:
    # No server runs in unit tests: the refusal must come before Kafka or Cassandra is reached
    # (it used to be a ZeroDivisionError after both had been written to).
    with pytest.raises(BenchError, match="--raw-events 10000"):
        raw_limits(1_000)
