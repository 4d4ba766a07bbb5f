"""POSIX semantics of the cafs namespace, over the manifest and the blob store.

Owns: what every filesystem operation means — which names may exist where, the write path
(temp file, hash while writing, publish on flush), copy-on-write, unlink of open files, the
in-memory node cache, xattrs and tags. Must not import pyfuse3 or trio: the event-loop primitives
it needs (a lock, running heavy work in a thread) come in through `Runtime`.

Concurrency rule: every method runs on the event loop's thread. Synchronous methods are atomic.
Async methods await only under the open inode's lock, and only for work that does not touch the
manifest (hashing, compressing, fsync); the manifest change that follows happens without an
await, so each operation is one transaction that no other handler interleaves with.

Inodes are node ids, never reused, and every piece of per-inode memory is either a bounded cache
(refillable from the manifest) or tied to an open handle; so the kernel's lookup counts need no
bookkeeping here: `forget` has nothing to free.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from cafs.blobstore import BlobReader, BlobStore, TempBlob
from cafs.digest import Digest, is_digest
from cafs.errors import (
    AccessDenied,
    AlreadyExists,
    BadHandle,
    CafsError,
    Damaged,
    FileTooBig,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    OutOfSpace,
    ReadOnly,
    TooManyOpenFiles,
)
from cafs.manifest import Manifest, NewVersion
from cafs.model import (
    BLOB_INODE_BASE,
    BLOBS_INODE,
    MAX_NAME_BYTES,
    RECORD_INODE_BASE,
    RECORD_NAME,
    ROOT_INODE,
    RUNS_INODE,
    Attr,
    AttrChanges,
    BlobRef,
    Caller,
    Kind,
    Node,
    StoredBlob,
)
from cafs.records import build_record
from cafs.rules import (  # shared with bundle imports: they must accept no more than we do
    DEFAULT_MAX_ARTIFACT_SIZE,
    tag_space_left,
)
from cafs.rules import file_mode as _file_mode
from cafs.rules import new_name as _new_name

T = TypeVar("T")
log = logging.getLogger(__name__)

# Heavy work on more than this many bytes goes to a worker thread; below it, the thread hop
# costs more than the work (measured: offloading every 128 KiB step halved read throughput).
OFFLOAD_BYTES = 1 << 20
DEFAULT_MAX_OPEN_FILES = 10_000
# About what one new row (a name, a version, a tag without its bytes) adds to the manifest's
# files: WAL frames of the pages it touches. Charged to the part of the reserve that growth of
# the manifest may use (SpaceGuard.take_metadata), so a user filling the disk with empty files,
# tags or versions stops while deletes and gc still commit.
ROW_COST = 16 << 10
READDIR_PAGE = 512
XATTR_PREFIX = "user.cafs."
# Read-only xattrs every artifact (and blob) carries; artifacts also carry user.cafs.version.
VIRTUAL_XATTRS = ("sha256", "size", "stored_size", "encoding", "refcount")
# Records are cached until the manifest changes, within a budget of bytes (not entries: a record
# with many layers is large); a record larger than RECORD_CACHE_MAX is rebuilt when read.
RECORD_CACHE_BYTES = 4 << 20
RECORD_CACHE_MAX = 256 << 10
# Facts about which contents other artifacts hold as well: only for callers who see sharing
# (see Vfs.sees_sharing).
SHARING_XATTRS = ("refcount",)
# Whether a user may read every file of a sealed run (so may see its root hash), per run.
ROOT_READERS_CACHED = 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Runtime(Protocol):
    """What the core needs from the event loop."""

    def new_lock(self) -> AbstractAsyncContextManager[object]: ...

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T: ...


class KernelNotifier(Protocol):
    """Tells the kernel to drop what it cached about a node or a name (changed behind it)."""

    def inode_changed(self, ino: int) -> None: ...

    def entry_gone(self, parent: int, name: str) -> None: ...


class NoKernel:
    def inode_changed(self, ino: int) -> None:
        return None

    def entry_gone(self, parent: int, name: str) -> None:
        return None


class MemoryReader(BlobReader):
    """A computed file (a record): bytes fixed when it was opened."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]

    def close(self) -> None:
        return None


class NodeCache:
    """Bounded LRU of nodes by inode and of directory entries by (parent, name)."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._nodes: OrderedDict[int, Node] = OrderedDict()
        self._entries: OrderedDict[tuple[int, str], int] = OrderedDict()

    def node(self, ino: int) -> Node | None:
        node = self._nodes.get(ino)
        if node is not None:
            self._nodes.move_to_end(ino)
        return node

    def entry(self, parent: int, name: str) -> int | None:
        ino = self._entries.get((parent, name))
        if ino is not None:
            self._entries.move_to_end((parent, name))
        return ino

    def put(self, node: Node) -> None:
        self._nodes[node.ino] = node
        self._nodes.move_to_end(node.ino)
        self._entries[(node.parent, node.name)] = node.ino
        self._entries.move_to_end((node.parent, node.name))
        while len(self._nodes) > self._max:
            self._nodes.popitem(last=False)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, ino: int) -> None:
        node = self._nodes.pop(ino, None)
        if node is not None:
            self._entries.pop((node.parent, node.name), None)

    def drop_entry(self, parent: int, name: str) -> None:
        self._entries.pop((parent, name), None)

    def __len__(self) -> int:
        return len(self._nodes)


@dataclass(eq=False)
class OpenInode:
    """An inode with open handles: its readable content and the write in progress, if any."""

    node: Node
    lock: AbstractAsyncContextManager[object]
    handles: list[Handle] = field(default_factory=list)
    reader: BlobReader | None = None
    temp: TempBlob | None = None
    # Bumped for every new temp; a handle that wrote into the current temp carries its serial.
    temp_serial: int = 0
    mtime_ns: int | None = None  # set by writes, recorded at publish
    changed_ns: int | None = None  # when a write or truncate in progress last changed the content
    unlinked: bool = False
    damaged: bool = False  # its content is marked damaged: reads give EIO
    # Descriptors counted against max_open_files for it: the most its reader and temp may
    # hold at once (see Vfs._open_inode), so a write or publish never meets the cap.
    descriptors: int = 0


@dataclass(eq=False)
class Handle:
    fh: int
    inode: OpenInode
    writable: bool
    caller: Caller
    wrote_serial: int = -1  # temp_serial of the temp this handle last wrote into
    error: int | None = None  # sticky errno: once a write/publish failed, every later call fails
    # The version this handle published last. Publishing again through the same open file
    # replaces it in history: one version per open-for-write, not one per close of a dup'ed
    # descriptor (a shell redirect) or per fsync.
    published_version: int | None = None


def _fixed(ino: int, name: str, kind: Kind, mode: int, parent: int, nlink: int, now: int) -> Node:
    return Node(ino, parent, name, kind, mode, 0, 0, now, now, nlink)


class Vfs:
    def __init__(
        self,
        manifest: Manifest,
        blobs: BlobStore,
        runtime: Runtime,
        *,
        max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        cache_entries: int = 100_000,
        kernel: KernelNotifier | None = None,
    ) -> None:
        self.manifest = manifest
        self.blobs = blobs
        self.runtime = runtime
        self.max_artifact_size = max_artifact_size
        self.max_open_files = max_open_files
        self.cache = NodeCache(cache_entries)
        self._open: dict[int, OpenInode] = {}
        self._handles: dict[int, Handle] = {}
        self._descriptors = 0  # the sum of OpenInode.descriptors
        self._next_fh = 1
        self.kernel = kernel or NoKernel()
        # Digests whose blob files a publish in flight is writing or about to reference: gc
        # must leave those files alone (see Vfs._publish and cafs.admin.gc).
        self._pinned: Counter[str] = Counter()
        # Records by (directory, shows the root hash): each view is built apart.
        self._records: OrderedDict[tuple[int, bool], tuple[int, bytes]] = OrderedDict()
        self._records_bytes = 0
        self._root_readers: OrderedDict[tuple[int, int, int, int], bool] = OrderedDict()
        # The user who mounted: blobs/ is theirs, so they may read every content anyway.
        self.owner_uid = os.geteuid()
        self._runs_nlink: int | None = None
        now = time.time_ns()
        self._root = _fixed(ROOT_INODE, "", Kind.ROOT, 0o755, ROOT_INODE, 4, now)
        # runs/ is like /tmp: anyone may make an execution; only its owner may remove it.
        self._runs = _fixed(RUNS_INODE, "runs", Kind.RUNS, 0o1777, ROOT_INODE, 2, now)
        # blobs/ reads any content by its hash, bypassing the permissions of the artifacts
        # holding it: only the user who mounted the store may enter it.
        self._blobs = replace(_fixed(BLOBS_INODE, "blobs", Kind.BLOBS, 0o500, ROOT_INODE, 2, now),
                              uid=self.owner_uid, gid=os.getegid())

    # -- finding nodes --------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        if ino == ROOT_INODE:
            return self._root
        if ino == RUNS_INODE:
            if self._runs_nlink is None:
                self._runs_nlink = 2 + self.manifest.count_executions()
            return replace(self._runs, nlink=self._runs_nlink)
        if ino == BLOBS_INODE:
            return self._blobs
        node = self.cache.node(ino)
        if node is not None:
            return node
        if ino >= BLOB_INODE_BASE:
            node = self._blob_node(ino)
        elif ino >= RECORD_INODE_BASE:
            node = self._record_node(ino - RECORD_INODE_BASE)
        else:
            node = self.manifest.node(ino)
        if node is not None:
            self.cache.put(node)
            return node
        opened = self._open.get(ino)
        if opened is not None:  # unlinked while open: it lives on until the last release
            return opened.node
        raise NotFound(f"inode {ino}")

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

    def record_bytes(self, record: Node, caller: Caller | None = None) -> bytes:
        """A directory's record as `caller` may see it, recomputed only when the manifest
        changed since."""
        directory = self.node(record.parent)
        execution = self._execution_of(directory)
        assert execution is not None
        key = (record.parent, self._shows_root(execution, caller))
        cached = self._records.pop(key, None)
        if cached is not None:
            self._records_bytes -= len(cached[1])
            if cached[0] == self.manifest.changes:
                self._cache_record(key, cached)
                return cached[1]
        data = build_record(self.manifest, directory, execution, root=key[1])
        if len(data) <= RECORD_CACHE_MAX:
            self._cache_record(key, (self.manifest.changes, data))
        return data

    def _cache_record(self, key: tuple[int, bool], entry: tuple[int, bytes]) -> None:
        self._records[key] = entry
        self._records_bytes += len(entry[1])
        while self._records_bytes > RECORD_CACHE_BYTES:
            _, evicted = self._records.popitem(last=False)
            self._records_bytes -= len(evicted[1])

    def sees_sharing(self, caller: Caller | None) -> bool:
        """Whether `caller` may learn which contents other artifacts hold as well: refcounts,
        the unique bytes of records. Those answer "does anyone store this?" about content the
        caller may be unable to read (write a guess, ask whether it is shared), so only root
        and the user who mounted — who read every content through blobs/ anyway — get them.
        None is the daemon itself (and core tests)."""
        return caller is None or caller.uid in (0, self.owner_uid)

    def _shows_root(self, execution: Node, caller: Caller | None) -> bool:
        """Whether `caller` may see a sealed run's root hash: a hash over every file's hash,
        so with the hashes of the files they can read it tests guesses of those they cannot.
        Shown to whoever may list and read the whole run (they could compute it) and to those
        who see sharing."""
        if execution.sealed_ns is None:
            return False
        if caller is None or self.sees_sharing(caller):
            return True
        # A sealed run does not change (no chmod, no chown, no new file) until it is unsealed,
        # which changes sealed_ns: the answer holds for as long as the key does.
        key = (execution.ino, execution.sealed_ns, caller.uid, caller.gid)
        shown = self._root_readers.get(key)
        if shown is None:
            shown = self.manifest.readable_by(execution.ino, caller.uid, caller.gid)
            self._root_readers[key] = shown
            while len(self._root_readers) > ROOT_READERS_CACHED:
                self._root_readers.popitem(last=False)
        return shown

    def lookup(self, parent: int, raw_name: bytes, caller: Caller | None = None) -> Attr:
        name = _lookup_name(raw_name)
        return self.attr(self._child(self.node(parent), name), caller)

    def _child(self, parent: Node, name: str) -> Node:
        if not parent.kind.is_dir:
            raise NotADirectory()
        if parent.kind is Kind.ROOT:
            if name == "runs":
                return self.node(RUNS_INODE)
            if name == "blobs":
                return self._blobs
            raise NotFound(name)
        if parent.kind is Kind.BLOBS:
            blob = self.manifest.blob(Digest(name)) if is_digest(name) else None
            if blob is None:
                raise NotFound(name)
            return self.node(BLOB_INODE_BASE + blob.blob_id)
        if name == RECORD_NAME and parent.kind.has_record:
            return self.node(RECORD_INODE_BASE + parent.ino)
        ino = self.cache.entry(parent.ino, name)
        if ino is not None:
            cached = self.cache.node(ino)
            if cached is not None and not self._abandoned(cached):
                return cached
        node = self.manifest.child(parent.ino, name)
        if node is None:
            raise NotFound(name)
        if self._abandoned(node):
            # Seen again, so try again to drop it: create, mkdir and rename may then reuse
            # the name. If the manifest still cannot, start-up will.
            with suppress(CafsError):
                self._remove(node)
            raise NotFound(name)
        self.cache.put(node)
        return node

    def _abandoned(self, node: Node) -> bool:
        """A file row with no version that nobody has open: its first write failed and the
        manifest could not even drop the row (start-up will). Never visible."""
        return node.kind is Kind.FILE and node.version_id is None and node.ino not in self._open

    def _execution_of(self, node: Node) -> Node | None:
        """The execution a node lives in (itself for an execution); None outside runs/<exec>."""
        try:
            while node.kind is not Kind.EXECUTION:
                if node.kind in (Kind.ROOT, Kind.RUNS, Kind.BLOBS, Kind.BLOB):
                    return None
                node = self.node(node.parent)
        except NotFound:  # an unlinked file's directory may be gone too
            return None
        return node

    def _check_unsealed(self, *nodes: Node) -> None:
        """Sealed runs are immutable, for root too: EROFS for any change inside them."""
        for node in nodes:
            run = self._execution_of(node)
            if run is not None and run.sealed_ns is not None:
                raise ReadOnly(f"runs/{run.name} is sealed")

    def getattr(self, ino: int, caller: Caller | None = None) -> Attr:
        return self.attr(self.node(ino), caller)

    def attr(self, node: Node, caller: Caller | None = None) -> Attr:
        size, stored, mtime = node.size, node.blob.stored_size if node.blob else 0, node.mtime_ns
        ctime = node.ctime_ns
        if node.kind is Kind.RECORD:  # the size of the record the caller would read
            size = stored = len(self.record_bytes(node, caller))
        opened = self._open.get(node.ino)
        if opened is not None:
            node = opened.node if opened.unlinked else node
            ctime = node.ctime_ns
            if opened.temp is not None:
                size = stored = opened.temp.size
            if opened.mtime_ns is not None:
                mtime = opened.mtime_ns
            if opened.changed_ns is not None:
                # POSIX marks ctime whenever the content changes; the kernel caches what stat
                # (or ftruncate's reply) shows now, long after the publish at close.
                ctime = max(ctime, opened.changed_ns)
        return Attr(
            ino=node.ino,
            mode=node.st_mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            size=size,
            blocks=(stored + 511) // 512,
            mtime_ns=mtime,
            ctime_ns=ctime,
            volatile=node.kind is Kind.RECORD,
        )

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after the position `start` (0 = beginning), each with its next position."""
        directory = self.node(ino)
        if not directory.kind.is_dir:
            raise NotADirectory()
        if directory.kind is Kind.ROOT:
            fixed = [self.node(RUNS_INODE), self._blobs]
            for position, node in enumerate(fixed[start:], start + 1):
                yield node.name.encode(), self.attr(node), position
            return
        if directory.kind is Kind.BLOBS:
            after = start
            while blobs := self.manifest.blobs_page(after, READDIR_PAGE):
                for blob in blobs:
                    node = self.node(BLOB_INODE_BASE + blob.blob_id)
                    yield blob.digest.encode(), self.attr(node), blob.blob_id
                after = blobs[-1].blob_id
            return
        # .record.json is not listed: cp -r, rsync, tar, du and rm -rf must see only what users
        # stored (a listed record would be copied into the next run, or block rm -rf).
        after = start
        while page := self.manifest.children(ino, after, READDIR_PAGE):
            for node in page:
                if self._abandoned(node):
                    continue
                self.cache.put(node)
                yield node.name.encode(), self.attr(node), node.ino
            after = page[-1].ino

    def statfs(self) -> os.statvfs_result:
        return self.blobs.space.statvfs()

    # -- making and removing names --------------------------------------------------------

    def _new_child_kind(self, parent: Node, name: str, want_dir: bool) -> Kind:
        if parent.kind is Kind.BLOBS:
            raise ReadOnly("blobs/ is read-only")
        if not parent.kind.is_dir:
            raise NotADirectory()
        kind = parent.kind.child_kind(want_dir)
        if kind is None:
            places = {Kind.ROOT: "the mount root", Kind.RUNS: "runs/"}
            where = places.get(parent.kind, "an execution")
            what = "directories" if want_dir else "files"
            raise NotPermitted(f"no {what} may be made in {where}")
        try:
            self._child(parent, name)
        except NotFound:
            return kind
        raise AlreadyExists(name)

    def mkdir(self, parent_ino: int, raw_name: bytes, mode: int, caller: Caller) -> Attr:
        parent = self.node(parent_ino)
        name = _new_name(raw_name)
        self._check_unsealed(parent)
        kind = self._new_child_kind(parent, name, want_dir=True)
        self.blobs.space.take_metadata(ROW_COST)
        node = self.manifest.add_node(parent.ino, name, kind, mode & 0o7777, caller.uid,
                                      caller.gid, time.time_ns())
        self._directory_changed(parent.ino)
        self.cache.put(node)
        return self.attr(node)

    def create(self, parent_ino: int, raw_name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[int, Attr]:
        # Checked before the row exists: a refused create leaves nothing behind.
        self._descriptor_room(None, _descriptors_wanted(Kind.FILE, writable=True))
        parent = self.node(parent_ino)
        name = _new_name(raw_name)
        self._check_unsealed(parent)
        kind = self._new_child_kind(parent, name, want_dir=False)
        self.blobs.space.take_metadata(ROW_COST)
        # The row exists from now on (it gives the inode its number) but has no version until
        # the first publish; start-up removes such rows if the daemon died before that.
        node = self.manifest.add_node(parent.ino, name, kind, _file_mode(mode), caller.uid,
                                      caller.gid, time.time_ns())
        self._directory_changed(parent.ino)
        self.cache.put(node)
        inode = self._open_inode(node, writable=True)
        handle = self._new_handle(inode, writable=True, caller=caller)
        try:
            inode.temp = self.blobs.new_temp()
        except OSError:
            self.release(handle.fh)
            raise
        inode.temp_serial += 1
        # A new file is published at close even if nothing is written to it (touch).
        handle.wrote_serial = inode.temp_serial
        return handle.fh, self.attr(node)

    def unlink(self, parent_ino: int, raw_name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self._child(parent, _lookup_name(raw_name))
        self._check_removable(parent, node)
        self._check_unsealed(node)
        if node.kind.is_dir:
            raise IsADirectory()
        self._remove(node)

    def rmdir(self, parent_ino: int, raw_name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self._child(parent, _lookup_name(raw_name))
        self._check_removable(parent, node)
        self._check_unsealed(node)
        if not node.kind.is_dir:
            raise NotADirectory()
        if self.manifest.has_children(node.ino):
            raise NotEmpty()
        self._remove(node)

    def _check_removable(self, parent: Node, node: Node) -> None:
        if parent.kind is Kind.BLOBS:
            raise ReadOnly("blobs/ is read-only")
        if parent.kind is Kind.ROOT:
            raise NotPermitted(f"{node.name} is part of the mount's fixed layout")
        if node.kind is Kind.RECORD:
            raise NotPermitted(f"{RECORD_NAME} is computed by cafs")

    def _remove(self, node: Node) -> None:
        self.manifest.remove_node(node, time.time_ns())
        self.cache.drop(node.ino)
        self._directory_changed(node.parent)
        opened = self._open.get(node.ino)
        if opened is not None:
            opened.unlinked = True
            opened.node = replace(node, nlink=0)

    def rename(self, old_parent_ino: int, raw_old: bytes, new_parent_ino: int, raw_new: bytes,
               flags: int) -> None:
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_EXCHANGE is not supported")
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        node = self._child(old_parent, _lookup_name(raw_old))
        new_name = _new_name(raw_new)
        for directory in (old_parent, new_parent):
            if directory.kind is Kind.BLOBS:
                raise ReadOnly("blobs/ is read-only")
        self._check_removable(old_parent, node)
        self._check_unsealed(node, new_parent)
        if new_parent.kind.child_kind(node.kind.is_dir) is not node.kind:
            raise NotPermitted(f"a {node.kind.value} cannot move into a {new_parent.kind.value}")
        if node.kind.is_dir:
            self._refuse_move_into_itself(node, new_parent)
        try:
            replaced: Node | None = self._child(new_parent, new_name)
        except NotFound:
            replaced = None
        if replaced is not None:
            if replaced.ino == node.ino:
                return
            if replaced.kind is Kind.RECORD:
                raise NotPermitted(f"{RECORD_NAME} is computed by cafs")
            if flags & RENAME_NOREPLACE:
                raise AlreadyExists(new_name)
            if replaced.kind.is_dir and not node.kind.is_dir:
                raise IsADirectory()
            if node.kind.is_dir and not replaced.kind.is_dir:
                raise NotADirectory()
            if replaced.kind.is_dir and self.manifest.has_children(replaced.ino):
                raise NotEmpty()
        if len(new_name) > len(node.name):  # a longer name grows the manifest; others do not
            self.blobs.space.take_metadata(ROW_COST)
        self.manifest.rename(node, new_parent.ino, new_name, replaced, time.time_ns())
        self.cache.drop(node.ino)
        self.cache.drop_entry(old_parent.ino, node.name)
        self._directory_changed(old_parent.ino)
        self._directory_changed(new_parent.ino)
        if replaced is not None:
            self.cache.drop(replaced.ino)
            opened = self._open.get(replaced.ino)
            if opened is not None:
                opened.unlinked = True
                opened.node = replace(replaced, nlink=0)
        moved = self.manifest.node(node.ino)
        if moved is not None:
            self.cache.put(moved)
            if node.ino in self._open:
                self._open[node.ino].node = moved

    def _refuse_move_into_itself(self, node: Node, new_parent: Node) -> None:
        ancestor = new_parent
        while ancestor.kind not in (Kind.RUNS, Kind.ROOT):
            if ancestor.ino == node.ino:
                raise InvalidArgument("cannot move a directory into itself")
            ancestor = self.node(ancestor.parent)

    def _directory_changed(self, ino: int) -> None:
        if ino == RUNS_INODE:
            self._runs_nlink = None
        else:
            self.cache.drop(ino)

    # -- attributes -----------------------------------------------------------------------

    async def setattr(self, ino: int, changes: AttrChanges, fh: int | None,
                      caller: Caller) -> Attr:
        node = self.node(ino)
        _refuse_fixed_change(node)
        self._check_unsealed(node)
        handle = self._handle(fh) if fh is not None else None
        if changes.size is not None:
            if node.kind.is_dir:
                raise IsADirectory()
            await self._truncate(node, changes.size, handle, caller)
            node = self.node(ino)
        if (changes.mode, changes.uid, changes.gid, changes.mtime_ns) != (None,) * 4:
            now = time.time_ns()
            mode = node.mode if changes.mode is None else changes.mode & 0o7777
            if node.kind is Kind.FILE:
                mode = _file_mode(mode)
            opened = self._open.get(ino)
            mtime = node.mtime_ns
            if changes.mtime_ns is not None:
                mtime = changes.mtime_ns
                if opened is not None and opened.mtime_ns is not None:
                    opened.mtime_ns = mtime
            elif opened is not None and opened.mtime_ns is not None:
                mtime = opened.mtime_ns
            uid = node.uid if changes.uid is None else changes.uid
            gid = node.gid if changes.gid is None else changes.gid
            if not (opened is not None and opened.unlinked):
                self.manifest.set_attrs(ino, mode=mode, uid=uid, gid=gid, mtime_ns=mtime,
                                        ctime_ns=now)
            node = replace(node, mode=mode, uid=uid, gid=gid, mtime_ns=mtime, ctime_ns=now)
            self.cache.drop(ino)
            if opened is not None:
                opened.node = replace(opened.node, mode=mode, uid=uid, gid=gid, mtime_ns=mtime,
                                      ctime_ns=now)
        return self.attr(node) if node.kind is Kind.FILE else self.getattr(ino)

    async def _truncate(self, node: Node, size: int, handle: Handle | None,
                        caller: Caller) -> None:
        if size > self.max_artifact_size:
            if handle is not None and handle.writable:
                # ftruncate fails like a write beyond the maximum: the descriptor's writes fail
                # as a whole (sticky, so close() says EFBIG), and nothing is published.
                async with handle.inode.lock:
                    self._fail(handle.inode, handle, errno.EFBIG)
            raise FileTooBig(f"{size} bytes is over the maximum artifact size")
        if handle is not None:
            self._check_writable(handle)
        transient = node.ino not in self._open
        inode = self._open_inode(node, writable=True)
        try:
            async with inode.lock:
                had_temp = inode.temp is not None
                try:
                    await self._ensure_temp(inode, keep_content=size > 0)
                    assert inode.temp is not None
                    inode.temp.truncate(size)
                except (OSError, CafsError) as exc:  # I/O, disk full, bad blob
                    self._fail(inode, handle, exc.errno or errno.EIO)
                    raise
                inode.mtime_ns = inode.changed_ns = time.time_ns()
                if handle is not None:
                    handle.wrote_serial = inode.temp_serial
            # truncate(2) on a path, with no write in progress: the new content is complete now.
            if handle is None and not had_temp:
                await self._publish(inode, caller)
        finally:
            if transient:
                self._close_inode(inode)

    # -- open, read, write, publish -------------------------------------------------------

    async def open(self, ino: int, flags: int, caller: Caller) -> int:
        node = self.node(ino)
        if node.kind.is_dir:
            raise IsADirectory()
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            _refuse_fixed_change(node)
            self._check_unsealed(node)
        inode = self._open_inode(node, writable, caller)
        handle = self._new_handle(inode, writable, caller)
        # libfuse negotiates atomic O_TRUNC: truncation arrives here, not as setattr(size=0).
        if writable and flags & os.O_TRUNC:
            try:
                await self._truncate(node, 0, handle, caller)
            except BaseException:
                self.release(handle.fh)
                raise
        return handle.fh

    def _open_inode(self, node: Node, writable: bool, caller: Caller | None = None
                    ) -> OpenInode:
        """The inode's open state, counting the descriptors it may need against the cap
        (EMFILE if there is no room) before opening anything."""
        if node.kind is Kind.RECORD:
            # Not shared between opens: each caller reads the record as they may see it. Built
            # in memory, it holds no descriptor.
            record = OpenInode(node=node, lock=self.runtime.new_lock())
            record.reader = MemoryReader(self.record_bytes(node, caller))
            return record
        extra = self._descriptor_room(node.ino, _descriptors_wanted(node.kind, writable))
        inode = self._open.get(node.ino)
        if inode is None:
            inode = OpenInode(node=node, lock=self.runtime.new_lock())
            if node.blob is not None and node.blob.damaged:
                inode.damaged = True  # opening works (rewriting it heals it); reading fails
            elif node.blob is not None:
                inode.reader = self.blobs.open(node.blob.digest, node.blob.encoding)
            self._open[node.ino] = inode
        inode.descriptors += extra
        self._descriptors += extra
        return inode

    def _descriptor_room(self, ino: int | None, wanted: int) -> int:
        """How many descriptors the inode needs beyond those counted for it already; EMFILE
        if the cap leaves no room for them. The cap counts descriptors, not handles: a file
        being rewritten holds two (its reader and its temp), and the daemon's own descriptors
        (manifest, control socket, /dev/fuse) live in the reserve the cap leaves."""
        inode = self._open.get(ino) if ino is not None else None
        extra = max(0, wanted - (inode.descriptors if inode is not None else 0))
        if extra and self._descriptors + extra > self.max_open_files:
            raise TooManyOpenFiles(f"open files in this mount hold {self._descriptors} "
                                   f"descriptors (max_open_files={self.max_open_files})")
        return extra

    def _new_handle(self, inode: OpenInode, writable: bool, caller: Caller) -> Handle:
        handle = Handle(self._next_fh, inode, writable, caller)
        self._next_fh += 1
        self._handles[handle.fh] = handle
        inode.handles.append(handle)
        return handle

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise BadHandle(f"no open file {fh}") from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        inode = self._handle(fh).inode
        # Reads see the bytes written so far. A temp being published keeps its descriptor open
        # until the new blob replaces it, so this never reads a closed file.
        if inode.temp is not None:
            return inode.temp.read(offset, size)
        if inode.damaged:
            raise _damaged(inode.node)
        if inode.reader is not None:
            return inode.reader.read(offset, size)
        return b""

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        self._check_writable(handle)
        # No sealed-run check per write: a writable handle cannot exist inside a sealed run
        # (open refuses it, sealing waits for none, nothing moves into a sealed run), and
        # publishing checks again.
        inode = handle.inode
        async with inode.lock:
            self._check_writable(handle)
            try:
                # Failing like any other write (sticky, nothing published), and under the lock:
                # a publish in flight may be reading the temp that failing discards.
                if offset + len(data) > self.max_artifact_size:
                    raise FileTooBig("write beyond the maximum artifact size")
                await self._ensure_temp(inode, keep_content=True)
                assert inode.temp is not None
                written = inode.temp.write(offset, data)
            except (OSError, CafsError) as exc:  # I/O, disk full, bad blob
                self._fail(inode, handle, exc.errno or errno.EIO)
                raise
            inode.mtime_ns = inode.changed_ns = time.time_ns()
            handle.wrote_serial = inode.temp_serial
        return written

    def _check_writable(self, handle: Handle) -> None:
        if not handle.writable:
            raise BadHandle("file not open for writing")
        if handle.error is not None:
            raise CafsError("an earlier write to this file failed", handle.error)

    async def _ensure_temp(self, inode: OpenInode, *, keep_content: bool) -> None:
        """Give the inode a temp to write into; copy-on-write of the current content."""
        if inode.temp is not None:
            return
        if keep_content and inode.damaged:
            raise _damaged(inode.node)
        temp = self.blobs.new_temp()
        try:
            reader = inode.reader
            if keep_content and reader is not None and reader.size:
                await self._maybe_offload(reader.size, temp.fill_from, reader)
        except BaseException:
            temp.discard()
            raise
        inode.temp = temp
        inode.temp_serial += 1

    async def flush(self, fh: int) -> None:
        """close(2) waits for this: publish what this handle wrote, or report why not."""
        handle = self._handle(fh)
        if handle.error is not None:
            raise CafsError("an earlier write to this file failed", handle.error)
        inode = handle.inode
        if handle.writable and inode.temp is not None and handle.wrote_serial == inode.temp_serial:
            if killed_by_signal(handle.caller.pid):  # its exit closes the file: cut short
                log.info("%s: its writer (pid %d) was killed by a signal: nothing published",
                         inode.node.name, handle.caller.pid)
                async with inode.lock:
                    self._fail(inode, handle, errno.EINTR)
                return
            await self._publish(inode, handle.caller, handle)

    async def fsync(self, fh: int) -> None:
        """Publish, then make the manifest durable: the artifact survives power loss."""
        await self.flush(fh)
        self.manifest.sync()

    async def _publish(self, inode: OpenInode, writer: Caller, handle: Handle | None = None
                       ) -> None:
        async with inode.lock:
            temp = inode.temp
            if temp is None or inode.unlinked:
                return
            try:
                self._check_unsealed(inode.node)
            except ReadOnly:
                self._fail(inode, None, errno.EROFS)
                raise
            try:
                if temp.needs_rehash:
                    digest = await self._maybe_offload(temp.size, temp.digest)
                else:
                    digest = temp.digest()
            except (OSError, CafsError) as exc:  # I/O, disk full, bad blob
                self._fail(inode, None, exc.errno or errno.EIO)
                raise
            self._pinned[digest] += 1
            try:
                await self._publish_pinned(inode, temp, digest, writer, handle)
            finally:
                self._pinned[digest] -= 1
                if not self._pinned[digest]:
                    del self._pinned[digest]

    async def _publish_pinned(self, inode: OpenInode, temp: TempBlob, digest: Digest,
                              writer: Caller, handle: Handle | None) -> None:
        """Store the blob (unless the store has it) and record the version. The digest is
        pinned throughout, so gc leaves its blob file alone."""
        try:
            # A version row (a dedup hit or an empty file writes no blob bytes to charge).
            self.blobs.space.take_metadata(ROW_COST)
            known = self.manifest.blob(digest)
            if known is not None and not known.damaged and self.blobs.has(digest):
                stored = StoredBlob(digest, known.size, known.stored_size, known.encoding,
                                    fresh=False)
            else:
                if known is not None:  # damage: the bytes just written can restore it
                    log.warning("blob %s was missing or damaged; restored from a new write",
                                digest)
                stored = await self._maybe_offload(temp.size, self.blobs.publish, temp, digest)
        except (OSError, CafsError) as exc:  # I/O, disk full, bad blob
            self._fail(inode, None, exc.errno or errno.EIO)
            raise
        if inode.unlinked:  # unlinked while the blob was being written: nothing to record
            return
        # From here on no await: the manifest change and the swap of readers are atomic. The
        # new reader is opened first: once the version is committed nothing may fail.
        try:
            new_reader = self.blobs.open(digest, stored.encoding)
        except (OSError, CafsError) as exc:  # out of descriptors, or the blob is bad
            self._fail(inode, None, exc.errno or errno.EIO)
            raise
        now = time.time_ns()
        node = inode.node
        try:
            new_node = self.manifest.publish(stored, NewVersion(
                node_id=node.ino, mode=node.mode, uid=writer.uid, gid=writer.gid,
                mtime_ns=inode.mtime_ns or now, ctime_ns=now,
                content_type=mimetypes.guess_type(node.name)[0], now_ns=now,
                collapses=handle.published_version if handle else None,
            ))
        except CafsError as exc:
            # The temp may already be the blob file (renamed): it must take no more writes.
            # The blob stays as an orphan that gc or fsck --repair removes.
            new_reader.close()
            self._fail(inode, None, exc.errno)
            raise
        if handle is not None:
            handle.published_version = new_node.version_id
        if known is not None and known.damaged:  # healed: other artifacts hold it too
            self.nodes_changed(self.manifest.nodes_holding_blobs([known.blob_id]))
        old_reader = inode.reader
        inode.reader = new_reader
        inode.damaged = False
        if old_reader is not None:
            old_reader.close()
        temp.discard()
        inode.temp = None
        inode.mtime_ns = inode.changed_ns = None
        inode.node = new_node
        self.cache.put(new_node)
        # No kernel cache invalidation here: the content changed through this kernel (its page
        # cache saw every write, atomic O_TRUNC truncated it, writes invalidated attributes).
        # Measured: invalidating each published inode cost ~1.1 ms per small file.

    def _fail(self, inode: OpenInode, handle: Handle | None, errno_: int) -> None:
        """A write or publish failed: every handle that wrote into this temp gets the error
        from now on, and the temp is dropped so nothing partial is ever published."""
        for other in inode.handles:
            if other.wrote_serial == inode.temp_serial and other.writable:
                other.error = errno_
        if handle is not None:
            handle.error = errno_
        if inode.temp is not None:
            inode.temp.discard()
            inode.temp = None
            inode.mtime_ns = inode.changed_ns = None
        # The kernel cached the pages of the writes that succeeded before this failure, and
        # their size: without this, readers would see bytes never published until the
        # attribute timeout. (Queued by the notifier: the failing request still holds pages.)
        self.kernel.inode_changed(inode.node.ino)
        # A new file whose first write failed goes now, not at the last release (which the
        # kernel sends after close() has returned): `cp` fails and the name is gone.
        with suppress(CafsError):  # if the manifest cannot say so now, release tries again
            self._drop_if_unpublished(inode)

    async def publish_and_release(self, fh: int) -> None:
        """The kernel's RELEASE of an open file. Writes that came after its last FLUSH are
        published now: a shared mapping written after close(fd) sends its WRITEs at munmap,
        msync or exit, then RELEASE and no FLUSH. The kernel discards errors of RELEASE and
        close() returned long ago, so a failure here can only be logged."""
        handle = self._handles.get(fh)
        try:
            if handle is not None and self._unflushed(handle):
                await self._publish(handle.inode, handle.caller, handle)
        except (OSError, CafsError) as exc:
            assert handle is not None
            log.error("%s (inode %d): writes made after its last close (through a shared "
                      "mapping) are lost, they could not be published: %s",
                      handle.inode.node.name, handle.inode.node.ino, exc)
        finally:
            self.release(fh)

    def _unflushed(self, handle: Handle) -> bool:
        """This handle wrote into the current temp and no FLUSH or fsync has published it."""
        inode = handle.inode
        return (handle.writable and handle.error is None and inode.temp is not None
                and handle.wrote_serial == inode.temp_serial and not inode.unlinked)

    def release(self, fh: int) -> None:
        """Forget an open file; publishes nothing (see publish_and_release)."""
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        inode = handle.inode
        inode.handles.remove(handle)
        if not inode.handles:
            self._close_inode(inode)

    def _close_inode(self, inode: OpenInode) -> None:
        if inode.handles:
            return
        self._open.pop(inode.node.ino, None)
        self._descriptors -= inode.descriptors
        inode.descriptors = 0
        if inode.temp is not None:
            inode.temp.discard()
            inode.temp = None
        if inode.reader is not None:
            inode.reader.close()
            inode.reader = None
        self._drop_if_unpublished(inode)

    def _drop_if_unpublished(self, inode: OpenInode) -> None:
        """A file created but never published (its writer failed) must not stay visible."""
        node = inode.node
        if node.kind is Kind.FILE and node.version_id is None and not inode.unlinked:
            current = self.manifest.node(node.ino)
            if current is not None and current.version_id is not None:
                inode.node = current  # published after all (a failure came after the commit)
                return
            self.kernel.entry_gone(node.parent, node.name)
            self._remove(node)

    async def _maybe_offload(self, size: int, fn: Callable[..., T], *args: object) -> T:
        if size >= OFFLOAD_BYTES:
            return await self.runtime.run_in_thread(fn, *args)
        return fn(*args)

    def is_computed(self, ino: int) -> bool:
        """Records: generated from the manifest at open, so never cached by the kernel."""
        return RECORD_INODE_BASE <= ino < BLOB_INODE_BASE

    def open_handles(self) -> int:
        return len(self._handles)

    def open_descriptors(self) -> int:
        """Descriptors counted against max_open_files."""
        return self._descriptors

    # -- what admin commands ask of a running mount (cafs.admin.Live) ---------------------

    def pinned_digests(self) -> set[str]:
        return set(self._pinned)

    def writers_in(self, execution_ino: int) -> int:
        """Handles open for writing inside a run (sealing waits for none)."""
        count = 0
        for handle in self._handles.values():
            if handle.writable:
                run = self._execution_of(handle.inode.node)
                count += run is not None and run.ino == execution_ino
        return count

    def nodes_changed(self, inos: Iterable[int]) -> None:
        """Nodes changed behind the kernel's back: forget them here and in the kernel."""
        for ino in inos:
            self._directory_changed(ino)  # drops the cached node (or runs/' link count)
            self.kernel.inode_changed(ino)

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None:
        for blob in blobs:
            self.cache.drop(BLOB_INODE_BASE + blob.blob_id)
            self.kernel.entry_gone(BLOBS_INODE, blob.digest)

    # -- extended attributes --------------------------------------------------------------

    def getxattr(self, ino: int, raw_name: bytes, caller: Caller | None = None) -> bytes:
        if not raw_name.startswith(b"user."):
            # cafs keeps only user.* attributes. EOPNOTSUPP (not ENODATA) lets tools such as
            # ls remember that for the whole mount instead of asking for security.selinux and
            # system.posix_acl_access on every file (two round trips per entry of `ls -l`).
            raise NotSupported("only user.* attributes are kept")
        node = self.node(ino)
        name = _xattr_name(raw_name)
        if name.startswith(XATTR_PREFIX):
            return self._virtual_xattr(node, name[len(XATTR_PREFIX):], caller)
        if _has_tags(node):
            value = self.manifest.tag(ino, name)
            if value is not None:
                return value
        raise NoAttribute(name)

    def listxattr(self, ino: int, caller: Caller | None = None) -> list[bytes]:
        node = self.node(ino)
        names = []
        if node.blob is not None:
            sharing = self.sees_sharing(caller)
            names = [f"{XATTR_PREFIX}{key}" for key in VIRTUAL_XATTRS
                     if sharing or key not in SHARING_XATTRS]
        if node.kind is Kind.FILE and node.version_id is not None:
            names.append(f"{XATTR_PREFIX}version")
        if node.kind is Kind.EXECUTION and self._shows_root(node, caller):
            names.append(f"{XATTR_PREFIX}root")
        if _has_tags(node):
            names += self.manifest.tag_names(ino)
        return [name.encode() for name in names]

    def setxattr(self, ino: int, raw_name: bytes, value: bytes) -> None:
        node = self.node(ino)
        name = _xattr_name(raw_name)
        _refuse_fixed_change(node)
        self._check_unsealed(node)
        if not name.startswith("user."):
            raise NotSupported("only user.* attributes are kept")
        if name.startswith(XATTR_PREFIX):
            raise NotPermitted(f"{name} is read-only")
        names_bytes, values_bytes = self.manifest.tag_usage(ino, excluding=name)
        if not tag_space_left(names_bytes + len(raw_name) + 1, values_bytes + len(value)):
            raise OutOfSpace(f"no room for more tags on {node.name}")
        # The value is stored twice: in the row and in the (name, value) index of find --tag.
        self.blobs.space.take_metadata(ROW_COST + 2 * (len(raw_name) + len(value)))
        self.manifest.set_tag(ino, name, bytes(value), time.time_ns())
        self.cache.drop(ino)

    def removexattr(self, ino: int, raw_name: bytes) -> None:
        node = self.node(ino)
        name = _xattr_name(raw_name)
        _refuse_fixed_change(node)
        self._check_unsealed(node)
        if name.startswith(XATTR_PREFIX):
            raise NotPermitted(f"{name} is read-only")
        if not name.startswith("user.") or not self.manifest.remove_tag(ino, name, time.time_ns()):
            raise NoAttribute(name)
        self.cache.drop(ino)

    def _virtual_xattr(self, node: Node, key: str, caller: Caller | None) -> bytes:
        if key == "version" and node.kind is Kind.FILE and node.version_id is not None:
            return str(node.version_id).encode()
        if key == "root" and node.kind is Kind.EXECUTION and node.sealed_ns is not None:
            if not self._shows_root(node, caller):
                raise AccessDenied(f"{XATTR_PREFIX}root is shown only to who may read every "
                                   "file of the run")
            root = self.manifest.root_of(node.ino)
            if root is not None:
                return root.encode()
        blob = node.blob
        if blob is None or key not in VIRTUAL_XATTRS:
            raise NoAttribute(f"{XATTR_PREFIX}{key}")
        if key in SHARING_XATTRS and not self.sees_sharing(caller):
            raise AccessDenied(f"{XATTR_PREFIX}{key} is shown only to root and the user who "
                               "mounted the store")
        if key == "refcount":
            return str(self.manifest.refcount(blob.blob_id)).encode()
        value = {"sha256": blob.digest, "size": blob.size, "stored_size": blob.stored_size,
                 "encoding": blob.encoding}[key]
        return str(value).encode()


# Flags of a task in /proc/<pid>/stat (field 9): exiting, and because a signal killed it.
PF_EXITING = 0x4
PF_SIGNALED = 0x400


def killed_by_signal(pid: int) -> bool:
    """True while `pid` exits because a signal killed it. Its exit closes (FLUSH) every file
    it held, and a write cut short must publish nothing. FLUSH carries no pid, so this asks
    about the process that opened the file: if that one is gone, or ends otherwise, the close
    publishes as usual."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            flags = int(stat_file.read().rsplit(b")", 1)[1].split()[6])
    except (OSError, IndexError, ValueError):
        return False
    return bool(flags & PF_EXITING and flags & PF_SIGNALED)


def _descriptors_wanted(kind: Kind, writable: bool) -> int:
    """The most descriptors an open inode holds at once: the reader of its blob (a record is
    built in memory: none) and, once open for writing, a temp beside it (a new file gets its
    reader at the first publish, while writes may follow into a new temp)."""
    return (kind is not Kind.RECORD) + writable


def _has_tags(node: Node) -> bool:
    return node.kind in (Kind.EXECUTION, Kind.LAYER, Kind.DIR, Kind.FILE)


def _damaged(node: Node) -> Damaged:
    digest = node.blob.digest if node.blob else "?"
    return Damaged(f"{node.name}: its content {digest} is damaged (see cafs fsck)")


def _refuse_fixed_change(node: Node) -> None:
    if node.kind is Kind.BLOB or node.kind is Kind.BLOBS:
        raise ReadOnly("blobs/ is read-only")
    if node.kind is Kind.RECORD:
        raise ReadOnly(f"{RECORD_NAME} is read-only")
    if node.kind in (Kind.ROOT, Kind.RUNS):
        raise NotPermitted("the mount's fixed layout cannot change")


def _lookup_name(raw: bytes) -> str:
    if len(raw) > MAX_NAME_BYTES:
        raise NameTooLong()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound("no such name") from None  # only UTF-8 names can exist


def _xattr_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NoAttribute("attribute names must be UTF-8") from None

