"""Work on a write's bytes while they stream in: hashing and frame compression in a worker thread.

Owns: the serial queue that feeds a temp's in-order bytes to its hashes (SHA-256, block sums) and
to a FrameSink (zstd frames, see zstd_seekable.FrameStream) off the event loop, and the shared
worker threads. Must not know about files, encodings or the layout.

Why: a writer's close() waits for its publish, and before this the whole content was compressed
(and, above 1 MiB, hashed) at that moment, on the event loop, while every other request waited.
Fed as the writes arrive, the work overlaps with the writer producing the next bytes and with
other requests, on another core: hashlib and zstandard release the GIL. At publish only the tail
is left.

Order: the bytes of one temp are processed in the order they were fed (one drain at a time per
queue); queues of different temps run in parallel on the pool's threads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

# Below this, handing a piece to the worker costs more than the work (measured: ~50 us of
# CPU per hand-off, about what hashing 128 KiB costs): done on the caller's thread, when nothing
# is queued before it. FUSE writes are 128 KiB (cp) to 1 MiB (dd bs=1M).
INLINE_BYTES = 512 * 1024
# What one feed may have queued: beyond it, feed() waits for the worker (a writer faster than
# hashing — dd into page cache, a copy-on-write of a 10 GB artifact — must not queue gigabytes).
MAX_PENDING_BYTES = 8 << 20
_POOL_THREADS = 2
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="cafs-stream")
        return _pool


class FrameSink(Protocol):
    """What a stream feeds besides the hashes: compressed frames being built (or nothing)."""

    def update(self, data: bytes | memoryview) -> None: ...

    def completes_frame(self, size: int) -> bool: ...

    def abandon(self) -> None: ...


class SerialFeed:
    """Calls `consume` with each piece fed, in order, in a worker thread (small pieces fed while
    nothing is queued: on the caller's thread). `wait()` returns once all was consumed, raising
    what `consume` raised. Feeding and waiting come from one owner at a time."""

    def __init__(self, consume: Callable[[bytes | memoryview], None]) -> None:
        self._consume = consume
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # pending bytes went down
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_bytes = 0
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def feed(self, data: bytes | memoryview, heavy: bool = False) -> None:
        """Queue `data`; consumed at once on this thread if nothing is queued and it is small
        and not `heavy` (the caller knows it costs more than its size says)."""
        with self._lock:
            if self._error is not None:
                return
            if not self._running and not heavy and len(data) < INLINE_BYTES:
                inline = True
            else:
                inline = False
                self._pending.append(data)
                self._pending_bytes += len(data)
                if not self._running:
                    self._running = True
                    self._idle.clear()
                    _worker_pool().submit(self._drain)
                while self._pending_bytes > MAX_PENDING_BYTES and self._error is None:
                    self._drained.wait()
        if inline:
            try:
                self._consume(data)
            except BaseException as exc:
                self._error = exc

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._running = False
                    self._idle.set()
                    self._drained.notify_all()
                    return
                data = self._pending.popleft()
                self._pending_bytes -= len(data)
                self._drained.notify_all()
            try:
                self._consume(data)
            except BaseException as exc:  # kept for wait(): the owner decides what it means
                self._error = exc

    def wait(self) -> None:
        self._idle.wait()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Drop what is queued and wait for the piece in progress (if any) to end."""
        with self._lock:
            self._pending.clear()
            self._pending_bytes = 0
            self._drained.notify_all()
        self._idle.wait()
