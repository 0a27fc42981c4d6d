"""The state cache: batches in flight share their states; only unpinned ones are evicted."""

from __future__ import annotations

import pytest

from streams.statecache import StateCache


def test_a_pinned_state_is_never_evicted_and_is_shared_by_later_batches():
    cache = StateCache(bound=2)
    reads: list[bytes] = []

    def read(key: bytes):
        return lambda: reads.append(key) or {"key": key}

    first = cache.get(b"a", read(b"a"))  # batch 1 pins a
    for k in (b"b", b"c", b"d"):
        cache.get(k, read(k))
        cache.release([k])
    assert len(cache) == 2 and cache.get(b"a", read(b"a")) is first  # a survived, the same object
    assert reads == [b"a", b"b", b"c", b"d"]
    cache.release([b"a", b"a"])
    cache.get(b"x", read(b"x"))
    cache.release([b"x"])
    assert cache.pinned() == 0 and len(cache) == 2


def test_it_cannot_be_cleared_while_a_batch_holds_states():
    cache = StateCache(bound=10)
    cache.get(b"a", lambda: 1)
    with pytest.raises(RuntimeError):
        cache.clear()
    cache.release([b"a"])
    cache.clear()
    assert len(cache) == 0
