"""A least-recently-used map bounded in bytes, with hit/miss counts (mixed MoBE bases, hot experts).

One owner for the eviction rule: an item larger than the whole budget is never kept (its user holds
it for the one forward that needs it); inserting evicts the oldest items until the total fits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        """The item (now most recent), counting a hit or a miss."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def peek(self, key: Hashable) -> V | None:
        """The item without counting or reordering."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)
