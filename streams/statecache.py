"""The worker's users' states in memory between batches, as a bounded LRU with pins.

Pure (standard library only). The Faust table stays the source of truth; this is a read cache
of the worker's own writes, and the place batches in flight share their states: a batch
being written has changed its users' states in place, and the next batch (prepared while the
first is still being written) must see those changes, never the older value the table still
holds. So a state is *pinned* from the moment a batch loads it until that batch has stored it,
and only unpinned states are evicted. The caller clears the cache (with nothing in flight)
whenever its assignment changes: another worker may have changed those users meanwhile.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["StateCache"]


class StateCache:
    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._states: OrderedDict[bytes, Any] = OrderedDict()
        self._pins: Counter[bytes] = Counter()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: bytes, read: Callable[[], Any]) -> Any:
        """The user's state, read from the table only if not held; pinned until ``release``."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = read()
        else:
            self._states.move_to_end(key)
        self._pins[key] += 1
        return state

    def release(self, keys: Iterable[bytes]) -> None:
        """A batch that pinned ``keys`` has stored their states: they may be evicted again."""
        for key in keys:
            left = self._pins[key] - 1
            if left > 0:
                self._pins[key] = left
            else:
                del self._pins[key]
        self._evict()

    def pinned(self) -> int:
        return len(self._pins)

    def clear(self) -> None:
        if self._pins:
            raise RuntimeError("the state cache cannot be cleared while batches hold states")
        self._states.clear()

    def _evict(self) -> None:
        states, pins = self._states, self._pins
        tries = len(states)
        while len(states) > self.bound and tries > 0:
            tries -= 1
            key = next(iter(states))  # the least recently used
            if key in pins:
                states.move_to_end(key)  # in use by a batch in flight: recent by definition
            else:
                del states[key]
