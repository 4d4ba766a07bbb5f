"""What every part of the admin commands shares: where they run and how their results travel.

Owns: the `Runtime` admin code awaits (the daemon passes its trio one; the `cafs` command runs
admin code under asyncio with `LocalRuntime`), the `Live` view of a running mount and its
`NotMounted` stand-in, `AdminContext` (the store and those, which cafs.maintenance,
cafs.lifecycle and cafs.transfer build on), and `JsonResult`, the one way a typed result becomes
JSON for the control socket and back.

Must not import trio, pyfuse3 or the daemon: `cafs fsck`, `cafs gc` and `cafs log` on an
unmounted store run this code in the `cafs` process itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

from cafs.blobstore import Blobs
from cafs.errors import InvalidArgument, NotFound
from cafs.manifest import Manifest
from cafs.model import BlobRef, Kind, Node
from cafs.rules import DEFAULT_MAX_ARTIFACT_SIZE
from cafs.store import Store

T = TypeVar("T")

Progress = Callable[[str, int, int], None]  # (what, done, total); may be called from threads


class Runtime(Protocol):
    """The event loop admin code runs on."""

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T: ...

    async def checkpoint(self) -> None: ...


class LocalRuntime:
    """The Runtime of the `cafs` command working on an unmounted store: asyncio, so an admin
    command never loads trio (nothing else runs meanwhile; checkpoints only yield)."""

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T:
        # As trio's to_thread.run_sync does, a cancelled caller (^C) still waits for the thread:
        # the clean-up that follows (a failed import removing what it stored) must not race
        # the work it cleans up after.
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)


class Live(Protocol):
    """What a running mount tells admin commands, and what they tell it (cafs.vfs.Vfs)."""

    def pinned_digests(self) -> set[str]: ...

    def writers_in(self, execution_ino: int) -> int: ...

    def nodes_changed(self, inos: Iterable[int]) -> None: ...

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None: ...


class NotMounted:
    """The Live of a store no daemon serves: nothing in flight, no kernel to tell."""

    def pinned_digests(self) -> set[str]:
        return set()

    def writers_in(self, execution_ino: int) -> int:
        return 0

    def nodes_changed(self, inos: Iterable[int]) -> None:
        return None

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None:
        return None


@dataclass
class AdminContext:
    """A store as an admin command sees it, and where the command runs."""

    store: Store
    runtime: Runtime
    live: Live
    # True inside the daemon: temp files and unpublished rows are writes in progress then.
    mounted: bool
    progress: Progress = lambda what, done, total: None
    # What the mount would let one artifact grow to; an import holds its bundle to it too.
    max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE

    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    @property
    def blobs(self) -> Blobs:
        return self.store.blobs

    def _node(self, path: str) -> Node:
        node = self.manifest.resolve(path)
        if node is None:
            raise NotFound(f"{path}: no such artifact or directory")
        return node

    def _execution(self, path: str) -> Node:
        node = self._node(path)
        if node.kind is not Kind.EXECUTION:
            raise InvalidArgument(f"{path} is not an execution (runs/<execution>)")
        return node


class JsonResult:
    """A frozen dataclass result that crosses the control socket as a JSON object: one field,
    one key (tuples as lists, nested results as objects), decoded back into the same type."""

    def to_json(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return {field.name: _plain(getattr(self, field.name))
                for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        assert dataclasses.is_dataclass(cls)
        hints = typing.get_type_hints(cls)
        return cls(**{field.name: _typed(hints[field.name], data[field.name])
                      for field in dataclasses.fields(cls) if field.name in data})


def _plain(value: object) -> object:
    if isinstance(value, JsonResult):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _typed(hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        item = typing.get_args(hint)[0]
        return tuple(_typed(item, element) for element in value)
    if isinstance(hint, type) and issubclass(hint, JsonResult) and isinstance(value, dict):
        return hint.from_json(value)
    return value
