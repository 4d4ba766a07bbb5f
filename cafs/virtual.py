"""The nodes cafs makes up rather than stores: the fixed root, runs/ and blobs/, the
`blobs/<sha256>` views of stored contents, and the `.record.json` of layers and executions.

Owns: their inode numbers and attributes, the names they answer to, and the cache of built
records (bounded by bytes, dropped whenever the manifest changed). Must not change the manifest,
and must not know about open files or the kernel: the namespace (cafs.namespace) resolves these
nodes beside the stored ones and caches them with the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace

from cafs.blobstore import BlobReader
from cafs.digest import Digest, is_digest
from cafs.errors import NotFound
from cafs.lru import Lru
from cafs.manifest import Manifest
from cafs.model import (
    BLOB_INODE_BASE,
    BLOBS_INODE,
    RECORD_INODE_BASE,
    RECORD_NAME,
    ROOT_INODE,
    RUNS_INODE,
    Caller,
    Kind,
    Node,
)
from cafs.records import build_record
from cafs.visibility import Visibility

# Records are cached until the manifest changes, within a budget of bytes (not entries: a record
# with many layers is large); a record larger than RECORD_CACHE_MAX is rebuilt when read.
RECORD_CACHE_BYTES = 4 << 20
RECORD_CACHE_MAX = 256 << 10
BLOBS_PAGE = 512

# A cached record: (manifest.changes when it was built, its bytes).
CachedRecord = tuple[int, bytes]
# Which record: (directory, shows the root hash, the directories below it left out).
RecordView = tuple[int, bool, tuple[int, ...]]


def is_made_up(ino: int) -> bool:
    """A blob view or a record: built from the manifest, never a row of its own."""
    return ino >= RECORD_INODE_BASE


def is_computed(ino: int) -> bool:
    """Records: generated from the manifest at open, so never cached by the kernel."""
    return RECORD_INODE_BASE <= ino < BLOB_INODE_BASE


class MemoryReader(BlobReader):
    """A computed file (a record): bytes fixed when it was opened."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return self._data[offset:offset + length]

    def idle(self) -> None:
        """Nothing held but the bytes."""

    def close(self) -> None:
        return None


def _fixed(ino: int, name: str, kind: Kind, mode: int, nlink: int, now: int) -> Node:
    return Node(ino, ROOT_INODE, name, kind, mode, 0, 0, now, now, nlink)


def _record_size(entry: CachedRecord) -> int:
    return len(entry[1])


class VirtualNodes:
    def __init__(self, manifest: Manifest, visibility: Visibility) -> None:
        self.manifest = manifest
        self.visibility = visibility
        now = time.time_ns()
        self.root = _fixed(ROOT_INODE, "", Kind.ROOT, 0o755, 4, now)
        # runs/ is like /tmp: anyone may make an execution; only its owner may remove it.
        self._runs = _fixed(RUNS_INODE, "runs", Kind.RUNS, 0o1777, 2, now)
        self._runs_nlink: int | None = None  # 2 + executions, counted when first asked
        # blobs/ reads any content by its hash, bypassing the permissions of the artifacts
        # holding it: only the user who mounted the store may enter it.
        self.blobs = replace(_fixed(BLOBS_INODE, "blobs", Kind.BLOBS, 0o500, 2, now),
                             uid=visibility.owner_uid, gid=os.getegid())
        # Records by (directory, shows the root hash, the directories below it left out): each
        # view is built apart, and shared by every reader who gets it.
        self.records: Lru[RecordView, CachedRecord] = Lru(RECORD_CACHE_BYTES, size=_record_size)

    # -- the fixed layout -----------------------------------------------------------------

    def fixed(self, ino: int) -> Node | None:
        """The root, runs/ or blobs/; None for any other inode."""
        if ino == ROOT_INODE:
            return self.root
        if ino == RUNS_INODE:
            return self.runs()
        if ino == BLOBS_INODE:
            return self.blobs
        return None

    def runs(self) -> Node:
        if self._runs_nlink is None:
            self._runs_nlink = 2 + self.manifest.count_executions()
        return replace(self._runs, nlink=self._runs_nlink)

    def runs_changed(self) -> None:
        """An execution came or went: runs/' link count is counted again when next asked."""
        self._runs_nlink = None

    def forget(self) -> None:
        """Another mount changed the manifest: records are keyed on this process's count of
        changes (Manifest.changes), which did not move, so they go; and per-user answers."""
        self.records.clear()
        self._runs_nlink = None
        self.visibility.forget()

    def root_child(self, name: str) -> Node:
        if name == "runs":
            return self.runs()
        if name == "blobs":
            return self.blobs
        raise NotFound(name)

    def root_entries(self) -> list[Node]:
        return [self.runs(), self.blobs]

    # -- blobs/<sha256> and .record.json --------------------------------------------------

    def made_up(self, ino: int) -> Node | None:
        """The blob view or record behind `ino` (see is_made_up), None if it is gone."""
        if ino >= BLOB_INODE_BASE:
            return self._blob_node(ino)
        return self._record_node(ino - RECORD_INODE_BASE)

    def blob_ino(self, name: str) -> int:
        """The inode of blobs/<name>; NotFound unless the store holds that content."""
        blob = self.manifest.blob(Digest(name)) if is_digest(name) else None
        if blob is None:
            raise NotFound(name)
        return BLOB_INODE_BASE + blob.blob_id

    def blob_listing(self, after: int) -> Iterator[tuple[int, int]]:
        """(inode, position) of every blob after the position `after`, page by page."""
        while blobs := self.manifest.blobs_page(after, BLOBS_PAGE):
            for blob in blobs:
                yield BLOB_INODE_BASE + blob.blob_id, blob.blob_id
            after = blobs[-1].blob_id

    @staticmethod
    def record_ino(directory: Node) -> int | None:
        """The inode of a directory's .record.json, None if that kind has none."""
        return RECORD_INODE_BASE + directory.ino if directory.kind.has_record else None

    def _blob_node(self, ino: int) -> Node | None:
        blob = self.manifest.blob_by_id(ino - BLOB_INODE_BASE)
        if blob is None:
            return None
        created = self.manifest.blob_created_ns(blob.blob_id)
        return Node(ino, BLOBS_INODE, blob.digest, Kind.BLOB, 0o444, 0, 0, created, created, 1,
                    blob=blob)

    def _record_node(self, dir_ino: int) -> Node | None:
        directory = self.manifest.node(dir_ino)
        if directory is None or not directory.kind.has_record:
            return None
        # Readable by whoever may list the directory: it tells no more than ls -l and xattrs.
        return Node(RECORD_INODE_BASE + dir_ino, dir_ino, RECORD_NAME, Kind.RECORD,
                    directory.mode & 0o444, directory.uid, directory.gid, directory.mtime_ns,
                    directory.ctime_ns, 1)

    def record_bytes(self, directory: Node, execution: Node, caller: Caller | None) -> bytes:
        """The record of `directory` (in `execution`) as `caller` may see it, rebuilt only when
        the manifest changed since. Cached per view, not per reader: every reader who may list
        the same directories below it, and may or may not see the root hash alike, shares one."""
        key = (directory.ino, self.visibility.shows_root(execution, caller),
               self.visibility.unlisted_below(directory, caller))
        cached = self.records.get(key)
        if cached is not None and cached[0] == self.manifest.changes:
            return cached[1]
        data = build_record(self.manifest, directory, execution, root=key[1], unlisted=key[2])
        if len(data) <= RECORD_CACHE_MAX:
            self.records.put(key, (self.manifest.changes, data))
        else:
            self.records.pop(key)  # the stale one
        return data
