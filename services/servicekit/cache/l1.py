"""The in-process level: a dict bounded by size (least recently used out first)
and by each entry's lifetime on the cache's clock."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from ..clock import Clock

MISSING: Final = object()


class L1:
    """``max_entries`` = 0 disables it; ``ttl_cap`` bounds every entry's lifetime
    (and so the staleness an invalidation lost in transit can cause)."""

    def __init__(self, max_entries: int, ttl_cap: float | None, clock: Clock) -> None:
        if max_entries < 0:
            raise ValueError("l1_max_entries must be >= 0")
        self._max = max_entries
        self.ttl_cap = ttl_cap
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The value, or MISSING (expired entries are dropped on the way)."""
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        if entry[0] > self._clock.monotonic():
            self._entries.move_to_end(key)
            return entry[1]
        del self._entries[key]
        return MISSING

    def put(self, key: str, value: Any, ttl: float) -> None:
        if self._max == 0:
            return
        if self.ttl_cap is not None:
            ttl = min(ttl, self.ttl_cap)
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop_prefix(self, prefix: str) -> None:
        if not prefix:
            self._entries.clear()
            return
        for key in [k for k in self._entries if k.startswith(prefix)]:
            del self._entries[key]
