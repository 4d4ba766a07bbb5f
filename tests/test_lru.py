"""The one LRU helper: eviction by count and by measured size, oversize values, replacement."""

from __future__ import annotations

from cafs.lru import Lru


def test_count_bound_evicts_the_least_recently_used() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c"), len(cache)) == (1, 3, 2)


def test_size_bound_counts_what_the_caller_measures() -> None:
    cache: Lru[int, bytes] = Lru(10, size=len, threadsafe=True)
    cache.put(1, b"12345")
    cache.put(2, b"12345")
    assert cache.used == 10
    cache.put(3, b"123")
    assert cache.get(1) is None and cache.used == 8
    cache.put(2, b"1")  # replacing a value gives its size back
    assert cache.used == 4
    cache.put(4, b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(4) is None and len(cache) == 2
    assert cache.pop(3) == b"123" and cache.used == 1
