"""``LRU``: the one bounded, thread-safe least-recently-used map of the batch tasks (input bytes
in ``tasks.pair.ObjectCache``, style targets in ``tasks.compute.TargetsCache``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRU"]

V = TypeVar("V")
_MISSING = object()


class LRU(Generic[V]):
    """At most ``capacity`` worth of values, each weighing ``weigh(value)`` (default 1: a count of
    entries); the least recently used go first. A value heavier than the capacity is not kept."""

    def __init__(self, capacity: int, weigh: Callable[[V], int] = lambda value: 1):
        self.capacity, self.weigh = capacity, weigh
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        with self._lock:
            value = self._items.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._items.move_to_end(key)
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (nothing if it is not held)."""
        with self._lock:
            old = self._items.pop(key, _MISSING)
            if old is not _MISSING:
                self._weight -= self.weigh(old)

    def put(self, key: Hashable, value: V) -> None:
        weight = self.weigh(value)
        with self._lock:
            old = self._items.pop(key, _MISSING)
            if old is not _MISSING:
                self._weight -= self.weigh(old)
            if weight > self.capacity:
                return
            self._items[key] = value
            self._weight += weight
            while self._weight > self.capacity:
                self._weight -= self.weigh(self._items.popitem(last=False)[1])
