"""What the filesystem core needs from outside it: the event loop and the kernel's caches.

Owns: the two protocols the daemon implements for the core (cafs.daemon's TrioRuntime and
PyfuseKernel) and the do-nothing kernel of core tests and admin commands. Must not import pyfuse3
or trio: the core stays runnable without either.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

T = TypeVar("T")


class Runtime(Protocol):
    """What the core needs from the event loop."""

    def new_lock(self) -> AbstractAsyncContextManager[object]: ...

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T: ...

    async def run_short(self, fn: Callable[..., T], *args: object) -> T:
        """A short blocking call (one small read of a local blob file): in a worker thread,
        or on the loop's own thread where that is cheaper and nothing waits (TrioRuntime)."""
        ...

    def requests_waiting(self) -> bool:
        """Whether a request waits to be served now (True where that cannot be known)."""
        ...


class KernelNotifier(Protocol):
    """Tells the kernel to drop what it cached about a node or a name (changed behind it), and
    hands it decompressed bytes to cache."""

    def inode_changed(self, ino: int) -> None: ...

    def dropping(self, ino: int) -> bool:
        """An inode_changed(ino) is queued that the kernel has not done yet."""
        ...

    def entry_gone(self, parent: int, name: str) -> None: ...

    def fill(self, ino: int, offset: int, data: memoryview) -> bool:
        """Queue `data` (whole pages of the content the kernel holds for `ino` now) for the
        kernel's page cache at `offset`, after every inode_changed queued before it. False if
        not queued (too many are). Only for content no write can change until
        fills_done(ino)."""
        ...

    async def fills_done(self, ino: int) -> None:
        """Return once no fill of `ino` is queued or in progress (before its content changes
        here: a fill done after a write would put the old bytes back in the page cache)."""
        ...


class NoKernel:
    """No kernel to tell: the core driven directly (tests, a store no daemon serves)."""

    def inode_changed(self, ino: int) -> None:
        return None

    def dropping(self, ino: int) -> bool:
        return False

    def entry_gone(self, parent: int, name: str) -> None:
        return None

    def fill(self, ino: int, offset: int, data: memoryview) -> bool:
        return False

    async def fills_done(self, ino: int) -> None:
        return None
