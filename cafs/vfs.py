"""The filesystem core's one front: the calls the FUSE adapter (cafs.ops), the daemon and the
admin commands (cafs.admin.Live) make, each passed to the part that owns it.

Owns: the wiring of the parts, nothing else —
    cafs.namespace   names, placement rules, lookup/readdir, mkdir/unlink/rmdir/rename, chmod
    cafs.openfiles   open files, the descriptor budget, reads, writes, the publish state machine
    cafs.xattrs      tags and the read-only user.cafs.* attributes
    cafs.symlinks    symlink, readlink; link (EPERM)
    cafs.virtual     the fixed root, runs/ and blobs/, blobs/<sha256>, .record.json
    cafs.visibility  who may learn which facts about sharing
Must not import pyfuse3 or trio: the event-loop primitives the core needs (a lock, running heavy
work in a thread) come in through `Runtime`, the kernel's caches through `KernelNotifier`.

Concurrency rule (every part keeps it): every method runs on the event loop's thread. Synchronous
methods are atomic. Async methods await only under the open inode's lock, and only for work that
does not touch the manifest (hashing, compressing, fsync); the manifest change that follows
happens without an await, so each operation is one transaction that no other handler interleaves
with.

Inodes are node ids, never reused, and every piece of per-inode memory is either a bounded cache
(refillable from the manifest) or tied to an open handle; so the kernel's lookup counts need no
bookkeeping here: `forget` has nothing to free.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator

from cafs.blobstore import Blobs
from cafs.errors import BadHandle, NotFound
from cafs.manifest import Manifest
from cafs.model import Attr, AttrChanges, BlobRef, Caller, Change, Kind, Node
from cafs.namespace import Listing, Namespace, refuse_fixed_change
from cafs.openfiles import (
    DEFAULT_MAX_OPEN_FILES,
    Handle,
    OpenFiles,
    OpenTable,
    Publisher,
)
from cafs.rules import DEFAULT_MAX_ARTIFACT_SIZE
from cafs.runtime import KernelNotifier, NoKernel, Runtime
from cafs.symlinks import Symlinks
from cafs.virtual import CachedRecord, RecordView, VirtualNodes, is_computed
from cafs.visibility import Visibility
from cafs.writers import Processes
from cafs.xattrs import Xattrs

__all__ = ["DEFAULT_MAX_ARTIFACT_SIZE", "DEFAULT_MAX_OPEN_FILES", "KernelNotifier", "Runtime",
           "Vfs"]


class Vfs:
    def __init__(
        self,
        manifest: Manifest,
        blobs: Blobs,
        runtime: Runtime,
        *,
        max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        cache_entries: int = 100_000,
        kernel: KernelNotifier | None = None,
        processes: Processes | None = None,
        shared: bool = False,
    ) -> None:
        """`shared`: other hosts' mounts change the manifest too (PostgreSQL): opens check
        the current version, and the daemon feeds in their changes (changed_elsewhere)."""
        self.manifest = manifest
        self.blobs = blobs
        self.runtime = runtime
        self.max_artifact_size = max_artifact_size
        self.max_open_files = max_open_files
        self.shared = shared
        self.kernel = kernel or NoKernel()
        self.visibility = Visibility(manifest)
        self.virtual = VirtualNodes(manifest, self.visibility)
        self.table = OpenTable(max_open_files)
        self.tree = Namespace(manifest, blobs.space, self.virtual, self.table, self.kernel,
                              cache_entries, shared)
        self.publisher = Publisher(self.tree, manifest, blobs, runtime, self.kernel)
        self.files = OpenFiles(self.tree, blobs, runtime, self.table, self.publisher,
                               max_artifact_size, processes)
        self.xattrs = Xattrs(self.tree, self.visibility, manifest, blobs.space)
        self.symlinks = Symlinks(self.tree, manifest, blobs)
        self._listings: dict[int, Listing] = {}  # open directories (opendir .. releasedir)
        self._next_dir = 0

    # -- the namespace --------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self.tree.node(ino)

    def lookup(self, parent: int, raw_name: bytes, caller: Caller | None = None) -> Attr:
        return self.tree.lookup(parent, raw_name, caller)

    def lookup_entry(self, parent: int, raw_name: bytes, caller: Caller | None = None
                     ) -> Attr | None:
        """lookup, except that None means: no such name, and the kernel may cache that
        (a negative entry) until a create, mkdir or rename through it adds the name."""
        try:
            return self.tree.lookup(parent, raw_name, caller)
        except NotFound:
            if self.tree.absence_is_final(parent):
                return None
            raise

    def getattr(self, ino: int, caller: Caller | None = None) -> Attr:
        return self.tree.getattr(ino, caller)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        return self.tree.readdir(ino, start)

    def opendir(self, ino: int) -> int:
        """A directory handle: its listing keeps the page of entries last read."""
        self.tree.getattr(ino)  # ENOENT for a vanished directory
        self._next_dir += 1
        self._listings[self._next_dir] = Listing(ino)
        return self._next_dir

    def readdir_handle(self, fh: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        listing = self._listings.get(fh)
        if listing is None:
            raise BadHandle(f"no open directory {fh}")
        return self.tree.readdir(listing.ino, start, listing)

    def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    def statfs(self) -> os.statvfs_result:
        return self.tree.statfs()

    def mkdir(self, parent_ino: int, raw_name: bytes, mode: int, caller: Caller) -> Attr:
        return self.tree.mkdir(parent_ino, raw_name, mode, caller)

    def unlink(self, parent_ino: int, raw_name: bytes) -> None:
        self.tree.unlink(parent_ino, raw_name)

    def rmdir(self, parent_ino: int, raw_name: bytes) -> None:
        self.tree.rmdir(parent_ino, raw_name)

    def rename(self, old_parent_ino: int, raw_old: bytes, new_parent_ino: int, raw_new: bytes,
               flags: int) -> None:
        self.tree.rename(old_parent_ino, raw_old, new_parent_ino, raw_new, flags)

    def symlink(self, parent_ino: int, raw_name: bytes, target: bytes, caller: Caller) -> Attr:
        return self.symlinks.symlink(parent_ino, raw_name, target, caller)

    def readlink(self, ino: int) -> bytes:
        return self.symlinks.readlink(ino)

    def link(self, ino: int, new_parent_ino: int, raw_name: bytes) -> Attr:
        self.symlinks.link()

    async def setattr(self, ino: int, changes: AttrChanges, fh: int | None,
                      caller: Caller) -> Attr:
        """The size goes to the open file's write path, the rest to the namespace."""
        node = self.tree.node(ino)
        refuse_fixed_change(node)
        self.tree.check_unsealed(node)
        handle = self.table.handle(fh) if fh is not None else None
        if changes.size is not None:
            await self.files.truncate(node, changes.size, handle, caller)
            node = self.tree.node(ino)
        node = self.tree.set_attrs(node, changes)
        return self.tree.attr(node) if node.kind is Kind.FILE else self.tree.getattr(ino)

    # -- open files -----------------------------------------------------------------------

    async def create(self, parent_ino: int, raw_name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[int, Attr]:
        return await self.files.create(parent_ino, raw_name, mode, caller, flags)

    async def open(self, ino: int, flags: int, caller: Caller) -> int:
        return await self.files.open(ino, flags, caller)

    def page_cache(self, fh: int) -> tuple[bool, bool]:
        """(keep_cache, direct_io) for the kernel's answer to the open of `fh`."""
        return self.files.page_cache(fh)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        return await self.files.read(fh, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.files.write(fh, offset, data)

    async def flush(self, fh: int) -> None:
        await self.files.flush(fh)

    async def fsync(self, fh: int) -> None:
        await self.files.fsync(fh)

    async def publish_and_release(self, fh: int) -> None:
        await self.files.publish_and_release(fh)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    def is_computed(self, ino: int) -> bool:
        return is_computed(ino)

    def record_bytes(self, record: Node, caller: Caller | None = None) -> bytes:
        return self.tree.record_bytes(record, caller)

    # -- extended attributes --------------------------------------------------------------

    def getxattr(self, ino: int, raw_name: bytes, caller: Caller | None = None) -> bytes:
        return self.xattrs.getxattr(ino, raw_name, caller)

    def listxattr(self, ino: int, caller: Caller | None = None) -> list[bytes]:
        return self.xattrs.listxattr(ino, caller)

    def setxattr(self, ino: int, raw_name: bytes, value: bytes) -> None:
        self.xattrs.setxattr(ino, raw_name, value)

    def removexattr(self, ino: int, raw_name: bytes) -> None:
        self.xattrs.removexattr(ino, raw_name)

    # -- what admin commands ask of a running mount (cafs.admin.Live) ---------------------

    def pinned_digests(self) -> set[str]:
        # Open files whose blob is opened lazily hold no descriptor on it yet: pinned too.
        return set(self.publisher.pinned) | self.files.unopened_digests()

    def writers_in(self, execution_ino: int) -> int:
        return self.files.writers_in(execution_ino)

    def nodes_changed(self, inos: Iterable[int]) -> None:
        self.tree.nodes_changed(inos)

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None:
        self.tree.blobs_removed(blobs)

    # -- what other hosts' mounts changed (the daemon follows the change feed) ------------

    def changed_elsewhere(self, changes: Iterable[Change]) -> None:
        self.tree.changed_elsewhere(changes)

    def forget_everything(self) -> None:
        self.tree.forget_everything()

    # -- for tests that look inside -------------------------------------------------------

    @property
    def _pinned(self) -> Counter[str]:
        return self.publisher.pinned

    @property
    def _handles(self) -> dict[int, Handle]:
        return self.table.handles

    @property
    def _records(self) -> dict[RecordView, CachedRecord]:
        return dict(self.virtual.records.items())

    @property
    def _records_bytes(self) -> int:
        return self.virtual.records.used
