"""One bounded least-recently-used cache, for every cache of cafs (nodes, directory entries,
decompressed frames, records, root-hash readers).

Owns: eviction by count or by a size the caller measures (bytes), and thread safety for caches
that worker threads touch. Stdlib only; must not know what it caches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class Lru(Generic[K, V]):
    """At most `capacity` units of values, the least recently used evicted first.

    `size` measures a value (default: each counts 1, so capacity is an entry count); a value
    larger than the whole capacity is not kept. `threadsafe` guards every call with a lock, for
    caches that worker threads share with the event loop."""

    def __init__(self, capacity: int, *, size: Callable[[V], int] = _one,
                 threadsafe: bool = False) -> None:
        self.capacity = capacity
        self._size = size
        self._used = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock() if threadsafe else None
        self._guard: AbstractContextManager[object] = self._lock or nullcontext()

    def get(self, key: K) -> V | None:
        if self._lock is None:  # the hot path of every stat, lookup and open: no context
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        cost = self._size(value)
        with self._guard:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= self._size(old)
            if cost > self.capacity:
                return
            self._items[key] = value
            self._used += cost
            while self._used > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._used -= self._size(evicted)

    def pop(self, key: K) -> V | None:
        with self._guard:
            value = self._items.pop(key, None)
            if value is not None:
                self._used -= self._size(value)
            return value

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, least recently used first."""
        with self._guard:
            return list(self._items.items())

    def clear(self) -> None:
        with self._guard:
            self._items.clear()
            self._used = 0

    @property
    def used(self) -> int:
        """Units held now (entries, or the measured size)."""
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
