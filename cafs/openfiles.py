"""Open files: handles, the descriptor budget, reads, writes and the publish state machine.

Owns: what an open file is (OpenInode: the content readers see, the write in progress; Handle:
one open(2)), how many descriptors they may hold, and the life of a write:

    open/create -> write/truncate into a temp (copy-on-write of the content) -> the writer's
    last close (a FLUSH once the opening process holds the file no more, see flush), fsync, or
    RELEASE after writes through a mapping: hash, store the blob unless the store has it,
    record the version -> the temp becomes the content readers see.

Any failure on the way (I/O, disk full, a bad blob, the manifest) fails the write in progress
(Publisher.fails): every handle that wrote into that temp keeps the errno, the temp is dropped, so
nothing partial is ever published, and a new file nobody managed to write disappears. Must not
decide which names exist where (cafs.namespace) and must not import pyfuse3 or trio.

Concurrency rule: every method runs on the event loop's thread. Async methods await only under
the open inode's lock, and only for work that does not touch the manifest (copying, hashing,
compressing, fsync); the manifest change that follows happens without an await, so each operation
is one transaction that no other handler interleaves with.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TypeVar

from cafs import crashpoints
from cafs.blobstore import BlobReader, Blobs, TempBlob
from cafs.blobstore.readers import IdleReaders
from cafs.digest import Digest
from cafs.errors import (
    AlreadyExists,
    BadHandle,
    CafsError,
    Damaged,
    FileTooBig,
    IsADirectory,
    ManifestError,
    NotFound,
    ReadOnly,
    TooManyOpenFiles,
)
from cafs.manifest import Manifest, NewVersion
from cafs.model import Attr, BlobRef, Caller, Kind, Node, StoredBlob
from cafs.namespace import ROW_COST, Namespace, lookup_name, refuse_fixed_change
from cafs.runtime import KernelNotifier, Runtime
from cafs.virtual import MemoryReader
from cafs.writers import NoProcesses, Processes

T = TypeVar("T")
log = logging.getLogger(__name__)

# Heavy work on more than this many bytes goes to a worker thread; below it, the thread hop
# costs more than the work (measured: offloading every 128 KiB step halved read throughput).
OFFLOAD_BYTES = 1 << 20
# A READ up to this size that must wait for the disk is read on the event loop when nothing
# else waits for it (Runtime.run_short): a random 4 KiB read is one frame or block.
INLINE_READ_BYTES = 128 << 10
# The kernel's page cache holds whole pages of this size.
PAGE_SIZE = os.sysconf("SC_PAGESIZE")
DEFAULT_MAX_OPEN_FILES = 10_000
# Readers of closed files kept open for the next open of the same content (at most this many,
# fewer under a small max_open_files: they count against it and go first when it is reached).
IDLE_READERS = 32
# Inodes whose version the kernel was last told of (OpenTable.told), at most; then the one
# told least recently is forgotten, and an open of it bypasses the page cache once (direct_io).
TOLD_KEPT = 65_536
# OpenTable.told's value for an inode whose attributes in the kernel may be of any version.
UNKNOWN_VERSION = -1


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
    # hold at once (see OpenFiles.open_inode), so a write or publish never meets the cap.
    descriptors: int = 0
    readers_in_threads: int = 0  # reads running in worker threads: the reader stays open
    # The manifest records this mount writing it (hosts share the manifest): ended when its
    # last writable handle goes (OpenFiles.end_writer).
    registered: bool = False
    # A newer version was opened since on a shared manifest: this one serves only the handles
    # that opened it, and is no longer the table's entry for its inode.
    superseded: bool = False
    # Content changes in progress with no handle (a truncate(2) on a path): they keep the
    # inode open, and no page cache fill may start meanwhile (OpenFiles._fill_page_cache).
    changing: int = 0
    # The mount's session when this inode was opened (hosts sharing the manifest): a file that
    # vanished from the manifest while the session changed was removed by the clean-up of a
    # mount declared dead, not by anyone's rm (see Publisher.publish).
    session: int | None = None


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
    # Who opened it, to tell the writer's last close from the close of a copy of its
    # descriptor (a forked child, a dup) at FLUSH, which carries no process: the opening
    # process (0: unknown) and the access mode it opened with.
    opener: int = 0
    accmode: int = os.O_RDWR
    # Its opener has closed it (or is gone): it no longer holds back another writer's publish.
    finished: bool = False
    # What the kernel is told at open (OpenFiles.open): keep the pages it cached of the file,
    # or read through it, past the page cache and the size it holds (another host's version).
    keep_cache: bool = True
    direct_io: bool = False


def descriptors_wanted(kind: Kind, writable: bool) -> int:
    """The most descriptors an open inode holds at once: the reader of its blob (a record is
    built in memory: none) and, once open for writing, a temp beside it (a new file gets its
    reader at the first publish, while writes may follow into a new temp)."""
    return (kind is not Kind.RECORD) + writable


def damaged(node: Node) -> Damaged:
    digest = node.blob.digest if node.blob else "?"
    return Damaged(f"{node.name}: its content {digest} is damaged (see cafs fsck)")


async def offload(runtime: Runtime, size: int, fn: Callable[..., T], *args: object) -> T:
    """Run `fn` in a worker thread if it works on `size` bytes or more (see OFFLOAD_BYTES)."""
    if size >= OFFLOAD_BYTES:
        return await runtime.run_in_thread(fn, *args)
    return fn(*args)


class OpenTable:
    """The open inodes by inode number, the handles by number, and the descriptor budget they
    share. Data only: the namespace reads it, OpenFiles changes it."""

    def __init__(self, max_open_files: int) -> None:
        self.max_open_files = max_open_files
        self.inodes: dict[int, OpenInode] = {}
        self.handles: dict[int, Handle] = {}
        self.descriptors = 0  # the sum of OpenInode.descriptors
        self.idle = IdleReaders(min(IDLE_READERS, max_open_files // 4))
        self._next_fh = 1
        # Shared manifests only: inode -> the version (versions.id) of the attributes last
        # given to the kernel, hence of any page it caches (libfuse's auto_inval_data drops
        # pages whenever new attributes show another size or mtime). The change feed forgets
        # an inode changed elsewhere; open compares with the current version.
        self.told: dict[int, int | None] = {}
        # Inodes with a superseded OpenInode still open: the page cache may hold its bytes.
        self.superseded: dict[int, list[OpenInode]] = {}

    def inode(self, ino: int) -> OpenInode | None:
        return self.inodes.get(ino)

    def tell(self, ino: int, version: int | None) -> bool:
        """The kernel is answered `version`'s attributes of `ino`. True if it may keep
        another version's instead, and must be told to drop them (OpenFiles._page_cache).

        The kernel applies an answer only if no other answer about the inode came in while
        its request was out: of two GETATTR or LOOKUP answered one after the other, the first
        (an older version) may stay and the second be dropped. Seen with two readers on one
        host while another host rewrote the file: a read through the page cache of a short
        version, with a longer one's size, went on in zeros."""
        return self._record_told(ino, version) != version

    def told_by_writes(self, ino: int, version: int | None) -> None:
        """The kernel saw every byte of `version` written through it (a publish here)."""
        self._record_told(ino, version)

    def _record_told(self, ino: int, version: int | None) -> int | None:
        """Record `version` as told for `ino`; the version told before (`version` if none)."""
        before = self.told.pop(ino, version)  # reinserted last: the least recent goes first
        self.told[ino] = version
        if len(self.told) > TOLD_KEPT:
            # Its answer was applied long ago (65,536 answers since): none is in flight.
            del self.told[next(iter(self.told))]
        return before

    def forget_told(self) -> None:
        """What the kernel holds of any inode is unknown (the change feed may have missed
        rows): the next answer about each has it drop what it has."""
        self.told = dict.fromkeys(self.told, UNKNOWN_VERSION)

    def supersede(self, inode: OpenInode) -> None:
        """A newer version of the inode is opened: `inode` keeps its handles, and the next
        open of the inode gets an OpenInode of its own."""
        if self.inodes.get(inode.node.ino) is inode:
            del self.inodes[inode.node.ino]
        if not inode.superseded:
            inode.superseded = True
            self.superseded.setdefault(inode.node.ino, []).append(inode)

    def older_open_size(self, node: Node) -> int | None:
        """The largest size of another version of `node` open here (None: none). The kernel
        keeps one size per file, and reads through its page cache end there: a descriptor
        still reading a longer version would end early, and one reading a shorter version
        would read zeros past its end (the kernel's cut at a short READ does not hold when
        its attributes changed meanwhile)."""
        inodes = list(self.superseded.get(node.ino, ()))
        current = self.inodes.get(node.ino)
        if current is not None and current.temp is None:
            inodes.append(current)
        return max((inode.node.size for inode in inodes
                    if inode.node.version_id != node.version_id), default=None)

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise BadHandle(f"no open file {fh}") from None

    def room(self, ino: int | None, wanted: int) -> int:
        """How many descriptors the inode needs beyond those counted for it already; EMFILE
        if the cap leaves no room for them. The cap counts descriptors, not handles: a file
        being rewritten holds two (its reader and its temp), and the daemon's own descriptors
        (manifest, control socket, /dev/fuse) live in the reserve the cap leaves."""
        inode = self.inodes.get(ino) if ino is not None else None
        extra = max(0, wanted - (inode.descriptors if inode is not None else 0))
        if extra:  # idle readers give their descriptors back first
            self.idle.shrink(self.max_open_files - self.descriptors - extra)
        if extra and self.descriptors + extra > self.max_open_files:
            raise TooManyOpenFiles(f"open files in this mount hold {self.descriptors} "
                                   f"descriptors (max_open_files={self.max_open_files})")
        return extra

    def charge(self, inode: OpenInode, extra: int) -> None:
        inode.descriptors += extra
        self.descriptors += extra

    def new_handle(self, inode: OpenInode, writable: bool, caller: Caller) -> Handle:
        handle = Handle(self._next_fh, inode, writable, caller)
        self._next_fh += 1
        self.handles[handle.fh] = handle
        inode.handles.append(handle)
        return handle

    def forget(self, inode: OpenInode) -> None:
        """The inode's last handle is gone: it leaves the table and returns its descriptors."""
        if self.inodes.get(inode.node.ino) is inode:  # not a later open of the same inode
            del self.inodes[inode.node.ino]
        self.descriptors -= inode.descriptors
        inode.descriptors = 0


class Publisher:
    """The end of a write: publish the temp as the inode's new content, or fail it."""

    def __init__(self, tree: Namespace, manifest: Manifest, blobs: Blobs, runtime: Runtime,
                 kernel: KernelNotifier) -> None:
        self.tree = tree
        self.manifest = manifest
        self.blobs = blobs
        self.runtime = runtime
        self.kernel = kernel
        # Digests whose blob files a publish in flight is writing or about to reference: gc
        # must leave those files alone (see publish and cafs.admin.gc).
        self.pinned: Counter[str] = Counter()
        # When each publish in flight began (its blob may be on disk before its row commits):
        # a durable point must not lie after one, or a blob written before it would be taken
        # for one whose row was committed before it (fsck's LOST? cut-off, power-loss checks).
        self._began: Counter[int] = Counter()

    @contextmanager
    def fails(self, inode: OpenInode, handle: Handle | None) -> Iterator[None]:
        """A failure inside fails the write in progress (see fail), then propagates."""
        try:
            yield
        except (OSError, CafsError) as exc:  # I/O, disk full, a bad blob, the manifest
            self.fail(inode, handle, exc.errno or errno.EIO)
            raise

    def fail(self, inode: OpenInode, handle: Handle | None, errno_: int) -> None:
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
            self.drop_if_unpublished(inode)

    def drop_if_unpublished(self, inode: OpenInode) -> None:
        """A file created but never published (its writer failed) must not stay visible.
        Where hosts share the manifest, another host may be writing it too: it stays then."""
        node = inode.node
        if node.kind is Kind.FILE and node.version_id is None and not inode.unlinked:
            gone = self.manifest.drop_abandoned(node, time.time_ns())
            inode.registered = False  # drop_abandoned ended this mount's writer
            if gone:
                self.kernel.entry_gone(node.parent, node.name)
                self.tree.forget_removed(node)
                return
            current = self.manifest.node(node.ino)
            if current is not None and current.version_id is not None:
                inode.node = current  # published after all (a failure came after the commit)

    async def publish(self, inode: OpenInode, writer: Caller, handle: Handle | None = None
                      ) -> None:
        async with inode.lock:
            temp = inode.temp
            if temp is not None and inode.unlinked:
                self.check_session(inode)
            if temp is None or inode.unlinked:
                return
            with self.fails(inode, None):
                self.tree.check_unsealed(inode.node)
                if temp.streaming:  # hashing/compressing the last writes: wait off the loop
                    await self.runtime.run_in_thread(temp.fed_whole)
                if temp.needs_rehash:
                    digest = await offload(self.runtime, temp.size, temp.digest)
                else:
                    digest = temp.digest()
            self.pinned[digest] += 1
            began = time.time_ns()
            self._began[began] += 1
            pin: int | None = None
            try:
                # Pinned for every host's gc too (a no-op on SQLite), before the store is
                # asked whether it has this content.
                with self.fails(inode, None):
                    # (What the manifest knows of the content is asked in the same call: one
                    # trip to a worker thread, see _ask.)
                    taken, known = await self._ask(self._pin_and_look, digest)
                pin = taken
                await self._publish_pinned(inode, temp, digest, known, writer, handle, taken)
            finally:
                if pin is not None:
                    try:
                        self.manifest.unpin(digest, pin)
                    except CafsError as exc:  # the lock went with a broken connection
                        log.debug("unpin %s: %s", digest, exc)
                self.pinned[digest] -= 1
                if not self.pinned[digest]:
                    del self.pinned[digest]
                self._began[began] -= 1
                if not self._began[began]:
                    del self._began[began]

    def _pin_and_look(self, digest: Digest) -> tuple[int, BlobRef | None]:
        """Pin the digest (see publish), then what the manifest knows of that content; with
        the pin's token."""
        pin = self.manifest.pin(digest)
        try:
            return pin, self.manifest.blob(digest)
        except BaseException:  # (a pin that failed was not taken)
            self.manifest.unpin(digest, pin)
            raise

    async def _ask(self, call: Callable[..., T], *args: object) -> T:
        """A manifest call of the publish. On a manifest behind a server each waits for round
        trips: in a worker thread (the manifest takes one call at a time), so the event loop
        serves other writers meanwhile; on SQLite at once."""
        if self.manifest.shared:
            return await self.runtime.run_in_thread(call, *args)
        return call(*args)

    def durable_point(self) -> int:
        """Now, or the start of the oldest publish still in flight if earlier: what a group
        sync may record as the time before which everything committed is on disk."""
        return min(self._began, default=time.time_ns())

    async def _publish_pinned(self, inode: OpenInode, temp: TempBlob, digest: Digest,
                              known: BlobRef | None, writer: Caller, handle: Handle | None,
                              pin: int) -> None:
        """Store the blob (unless the store has it) and record the version. The digest is
        pinned throughout, so gc leaves its blob file alone."""
        with self.fails(inode, None):
            stored = await self._store(temp, digest, known)
        if not stored.fresh:
            crashpoints.reached("after-dedup-check")
        if inode.unlinked:  # unlinked while the blob was being written: nothing to record
            self.check_session(inode)
            return
        # The new content's reader is opened at its first READ (reader_of), like any open's:
        # most files written are closed and released at once, and opening it here cost an
        # open, a footer read and a close per small file. Its descriptor is counted already
        # (open_inode), and gc leaves an unopened blob of an open file alone.
        now = time.time_ns()
        node = inode.node
        with self.fails(inode, None):
            # On failure the temp may already be the blob file (renamed): it takes no more
            # writes, and the blob stays as an orphan that gc or fsck --repair removes.
            try:
                new_node = await self._ask(self.manifest.publish, stored, NewVersion(
                    node_id=node.ino, mode=node.mode, uid=writer.uid, gid=writer.gid,
                    mtime_ns=inode.mtime_ns or now, ctime_ns=now,
                    content_type=mimetypes.guess_type(node.name)[0], now_ns=now,
                    collapses=handle.published_version if handle else None,
                    ends_writer=self._last_writer(inode, handle), pin=pin,
                ))
            except NotFound:
                self.check_session(inode)
                self._removed_elsewhere(inode, temp)
                return
        # From here on no await: the swap of readers is atomic. (Writes wait for the inode's
        # lock; reads meanwhile read the temp, the same bytes.) While a worker thread
        # published, the event loop may have renamed, unlinked or chmod-ed the node: its
        # view of the node wins, with the version just published.
        if inode.node is not node:
            new_node = replace(inode.node, version_id=new_node.version_id, blob=new_node.blob,
                               mtime_ns=new_node.mtime_ns,
                               ctime_ns=max(new_node.ctime_ns, inode.node.ctime_ns))
        if handle is not None:
            handle.published_version = new_node.version_id
        if self._last_writer(inode, handle):
            inode.registered = False  # ended in the publish's transaction
        if known is not None and known.damaged:  # healed: other artifacts hold it too
            self.tree.nodes_changed(self.manifest.nodes_holding_blobs([known.blob_id]))
        old_reader = inode.reader
        inode.reader = None
        inode.damaged = False
        if old_reader is not None:
            old_reader.close()
        temp.discard()
        inode.temp = None
        inode.mtime_ns = inode.changed_ns = None
        inode.node = new_node
        if not inode.unlinked:
            self.tree.cache.put(new_node)
        if self.tree.shared:  # the kernel saw every write: its pages are this version's
            self.tree.opened.told_by_writes(new_node.ino, new_node.version_id)
        # No kernel cache invalidation here: the content changed through this kernel (its page
        # cache saw every write, atomic O_TRUNC truncated it, writes invalidated attributes).
        # Measured: invalidating each published inode cost ~1.1 ms per small file.

    def check_session(self, inode: OpenInode) -> None:
        """A file removed while written here publishes nothing, and its writer's close()
        succeeds as after an unlink, unless the removal was the clean-up of this mount by
        another host that found it dead (paused or cut off past session_timeout): then the
        writer must hear that its bytes are lost (EIO)."""
        if inode.session != self.manifest.session_id:
            raise ManifestError(f"{inode.node.name}: this mount was declared dead by another "
                                "host (no heartbeat within session_timeout) and the file it "
                                "was writing was removed; nothing published")

    @staticmethod
    def _last_writer(inode: OpenInode, handle: Handle | None) -> bool:
        """This publish is at the last close of the last writer of the file on this mount
        (writes through a mapping after it publish again at release, unrecorded)."""
        return (inode.registered and handle is not None and handle.finished
                and not any(other.writable and not other.finished
                            for other in inode.handles if other is not handle))

    def _removed_elsewhere(self, inode: OpenInode, temp: TempBlob) -> None:
        """The file was removed on another host while this one wrote it: as for a file
        unlinked here while open, the write publishes nothing (its blob is an orphan)."""
        node = inode.node
        log.info("%s (inode %d) was removed on another host while written here: nothing "
                 "published", node.name, node.ino)
        temp.discard()
        inode.temp = None
        inode.mtime_ns = inode.changed_ns = None
        inode.registered = False  # the writer's row went with the node
        self.kernel.entry_gone(node.parent, node.name)
        self.tree.forget_removed(node)

    async def _store(self, temp: TempBlob, digest: Digest, known: BlobRef | None
                     ) -> StoredBlob:
        """The blob of `digest`, written from the temp unless the store has it intact
        (`known`: what the manifest knew of that content before)."""
        # A version row (a dedup hit or an empty file writes no blob bytes to charge).
        self.blobs.space.take_metadata(ROW_COST)
        if known is not None and not known.damaged and self.blobs.has(digest):
            return StoredBlob(digest, known.size, known.stored_size, known.encoding,
                              fresh=False)
        if known is not None:  # damage: the bytes just written can restore it
            log.warning("blob %s was missing or damaged; restored from a new write", digest)
        # A remote store's publish waits for the network: always in a worker thread.
        size = OFFLOAD_BYTES if self.blobs.remote else temp.size
        return await offload(self.runtime, size, self.blobs.publish, temp, digest)


class OpenFiles:
    """open, create, read, write, truncate, flush, fsync and release of artifacts and records."""

    def __init__(self, tree: Namespace, blobs: Blobs, runtime: Runtime, table: OpenTable,
                 publisher: Publisher, max_artifact_size: int,
                 processes: Processes | NoProcesses | None = None) -> None:
        self.tree = tree
        self.shared = tree.shared
        self.processes = processes or NoProcesses()
        self.blobs = blobs
        self.runtime = runtime
        self.table = table
        self.publisher = publisher
        self.max_artifact_size = max_artifact_size

    # -- opening and closing --------------------------------------------------------------

    async def create(self, parent_ino: int, raw_name: bytes, mode: int,
                     caller: Caller, flags: int = os.O_RDWR) -> tuple[int, Attr]:
        # Checked before the row exists: a refused create leaves nothing behind.
        self.table.room(None, descriptors_wanted(Kind.FILE, writable=True))
        for _ in range(3):
            try:
                node = self.tree.add_file(parent_ino, raw_name, mode, caller)
            except AlreadyExists:
                if flags & os.O_EXCL or not self.tree.manifest.shared:
                    raise
                # Another host made the name (this kernel took it for absent): a create
                # without O_EXCL opens it, as open(2) would, and this write becomes a version.
                existing = self.tree.manifest.child(parent_ino, lookup_name(raw_name))
                if existing is None:
                    continue  # removed meanwhile: make it again
                if existing.kind.is_dir:
                    raise IsADirectory() from None
                if existing.kind is not Kind.FILE:
                    raise
                if existing.version_id is not None:
                    self.tree.cache.put(existing)
                    fh = await self.open(existing.ino, flags, caller)
                    return fh, self.tree.attr(self.table.handle(fh).inode.node)
                joined = self._join_created(existing)  # another host's create in progress
                if joined is None:
                    continue
                return self._new_content(joined, caller, flags, registered=True)
            return self._new_content(node, caller, flags, registered=self.tree.manifest.shared)
        raise AlreadyExists(f"{raw_name!r}: made and removed on other hosts meanwhile")

    def _join_created(self, node: Node) -> Node | None:
        """Write a file another host is creating (no version yet): recorded as this mount's
        writer too, so neither host drops the row while the other writes it. None if it was
        removed meanwhile."""
        try:
            self.tree.manifest.open_writer(node)
        except NotFound:
            return None
        self.tree.cache.put(node)
        return node

    def _new_content(self, node: Node, caller: Caller, flags: int, *,
                     registered: bool) -> tuple[int, Attr]:
        """The handle of a file just created: an empty temp, published at close even if
        nothing is written to it (touch)."""
        try:
            inode = self.open_inode(node, writable=True)
        except BaseException:
            if registered:
                with suppress(CafsError):
                    self.tree.manifest.drop_abandoned(node, time.time_ns())
            raise
        inode.registered = inode.registered or registered
        handle = self.table.new_handle(inode, writable=True, caller=caller)
        self._note_opener(handle, flags)
        if inode.temp is None:
            try:
                inode.temp = self.blobs.new_temp(streaming=True)
            except OSError:
                self.release(handle.fh)
                raise
            inode.temp_serial += 1
        handle.wrote_serial = inode.temp_serial
        return handle.fh, self.tree.attr(node)

    async def open(self, ino: int, flags: int, caller: Caller) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:  # the kernel's pages change with the first write: no fill may follow it
            await self.publisher.kernel.fills_done(ino)
        # Nothing below waits until the handle exists (writable: no fill starts after this).
        node = self.tree.node(ino)
        if node.kind.is_dir:
            raise IsADirectory()
        registering = False
        if self.shared and node.kind is Kind.FILE:
            node = self._current(node)
        if writable:
            refuse_fixed_change(node)
            self.tree.check_unsealed(node)
            node, registering = self._register_writer(node)
        try:
            inode = self.open_inode(node, writable, caller)
        except BaseException:
            if registering:
                self._end_writer_of(node.ino)
            raise
        inode.registered = inode.registered or registering
        handle = self.table.new_handle(inode, writable, caller)
        if self.shared and node.kind is Kind.FILE:
            self._page_cache(handle)
        if self.blobs.remote and not writable and inode.reader is None \
                and node.kind is Kind.FILE and inode.node.blob is not None and not inode.damaged:
            # A blob the cache lacks starts downloading now, and the next files of the
            # directory with it (the store decides, bounded): never waited for here.
            self.blobs.read_ahead(inode.node.blob, self.tree.files_after(inode.node))
        if writable:
            self._note_opener(handle, flags)
        # libfuse negotiates atomic O_TRUNC: truncation arrives here, not as setattr(size=0).
        if writable and flags & os.O_TRUNC:
            try:
                await self.truncate(node, 0, handle, caller)
            except BaseException:
                self.release(handle.fh)
                raise
        return handle.fh

    def _register_writer(self, node: Node) -> tuple[Node, bool]:
        """Before an open for writing: where hosts share the manifest, record this mount as
        the file's writer (unless it is already), which also tells whether its run was sealed
        on another host (ReadOnly) or it was removed there (NotFound), and gives the version
        it holds now: a rewrite that keeps the content (no O_TRUNC) starts from the newest
        version, whichever host published it (unless the file is open here already). Returns
        the node and whether it registered."""
        opened = self.table.inode(node.ino)
        if opened is not None and opened.registered:
            return node, False
        try:
            current = self.tree.manifest.open_writer(node)
        except ReadOnly:
            self.tree.sealed_elsewhere(node)
            raise
        except NotFound:  # removed on another host
            self.tree.kernel.entry_gone(node.parent, node.name)
            self.tree.forget_removed(node)
            raise
        if current is None:  # a single host: nothing recorded
            return node, False
        if current.version_id != node.version_id:
            if opened is not None:
                # Open here (readers): they keep the version they opened, and this write
                # starts from it too; the other host's version stays in history.
                return opened.node, True
            # Another host published a version this host had not seen: serve it from now
            # on, and the kernel drops the old one's size and pages.
            self.tree.cache.put(current)
            self.tree.kernel.inode_changed(current.ino)
        return current, True

    def _end_writer_of(self, ino: int) -> None:
        try:
            self.tree.manifest.close_writer(ino)
        except CafsError as exc:  # it goes with this mount's session at the latest
            log.warning("inode %d: cannot record that this mount stopped writing it: %s",
                        ino, exc)

    def end_writer(self, inode: OpenInode) -> None:
        """The inode's last writable handle is gone: this mount no longer writes it."""
        if inode.registered and not any(handle.writable for handle in inode.handles):
            inode.registered = False
            self._end_writer_of(inode.node.ino)

    def _current(self, node: Node) -> Node:
        """Close-to-open on a shared manifest: the file's current version, asked of the
        manifest (one indexed read), whatever this mount cached; ENOENT if another host
        removed it. An open inode of an older version keeps its handles (they read on what
        they opened) and leaves the table to the new one."""
        existing = self.table.inode(node.ino)
        if existing is not None and (existing.temp is not None or existing.unlinked
                                     or any(h.writable for h in existing.handles)):
            return existing.node  # a write in progress here: what this host shows
        current = self.tree.manifest.node(node.ino)
        if current is None:
            self.tree.cache.drop(node.ino)
            raise NotFound(f"{node.name}: removed by another mount")
        if current != node:
            self.tree.cache.put(current)
        if existing is not None and existing.node.version_id != current.version_id:
            self.table.supersede(existing)
        return current

    def _page_cache(self, handle: Handle) -> None:
        """Keep the kernel's pages only if they are of the version this open serves: the
        kernel was told of this version (its size, so its pages), and no older one is still
        open here (its reads fill the same page cache). Otherwise read past the page cache and
        the size the kernel holds (direct_io), and have the kernel drop both after this
        request."""
        node = handle.inode.node
        kernel = self.publisher.kernel
        if (self.table.told.get(node.ino, UNKNOWN_VERSION) == node.version_id
                and node.ino not in self.table.superseded
                and not kernel.dropping(node.ino)):
            return
        handle.keep_cache, handle.direct_io = False, True
        kernel.inode_changed(node.ino)

    def _forget_older_pages(self, inode: OpenInode) -> None:
        """The last handle of a version other than the one the kernel was last told of is
        gone: its reads may have filled the page cache with its bytes, and the size the kernel
        holds may be its (older_open_size). Both are dropped."""
        ino = inode.node.ino
        if inode.superseded:
            inode.superseded = False
            older = self.table.superseded.get(ino, [])
            if inode in older:
                older.remove(inode)
            if not older:
                self.table.superseded.pop(ino, None)
        elif self.table.told.get(ino, UNKNOWN_VERSION) == inode.node.version_id:
            return
        self.table.told.pop(ino, None)
        self.publisher.kernel.inode_changed(ino)

    def page_cache(self, fh: int) -> tuple[bool, bool]:
        """(keep_cache, direct_io) for the kernel's answer to this open."""
        handle = self.table.handle(fh)
        return handle.keep_cache, handle.direct_io

    def _note_opener(self, handle: Handle, flags: int) -> None:
        """Remember which process opened a file for writing (OPEN and CREATE carry the
        calling thread's id: one read of /proc/<tid>/status, ~10 us)."""
        handle.opener = self.processes.process_of(handle.caller.pid)
        handle.accmode = flags & os.O_ACCMODE

    def open_inode(self, node: Node, writable: bool, caller: Caller | None = None
                   ) -> OpenInode:
        """The inode's open state, counting the descriptors it may need against the cap
        (EMFILE if there is no room) before opening anything."""
        if node.kind is Kind.RECORD:
            # Not shared between opens: each caller reads the record as they may see it. Built
            # in memory, it holds no descriptor.
            record = OpenInode(node=node, lock=self.runtime.new_lock())
            record.reader = MemoryReader(self.tree.record_bytes(node, caller))
            return record
        extra = self.table.room(node.ino, descriptors_wanted(node.kind, writable))
        inode = self.table.inode(node.ino)
        if inode is None:
            inode = OpenInode(node=node, lock=self.runtime.new_lock(),
                              session=self.tree.manifest.session_id)
            if node.blob is not None and node.blob.damaged:
                inode.damaged = True  # opening works (rewriting it heals it); reading fails
            # The blob is opened at the first READ (reader_of), not here: a re-read the page
            # cache answers (keep_cache) sends OPEN, FLUSH and RELEASE and no READ at all. Its
            # descriptor is counted now, so the cap holds whenever it is opened; until then gc
            # leaves the blob alone (Vfs.pinned_digests), as an open descriptor would keep it.
            if writable:  # a writer needs it for copy-on-write: a shortage shows at open
                self.reader_of(inode)
            self.table.inodes[node.ino] = inode
        elif writable:
            self.reader_of(inode)
        self.table.charge(inode, extra)
        return inode

    async def publish_and_release(self, fh: int) -> None:
        """The kernel's RELEASE of an open file. Writes that came after its last FLUSH are
        published now: a shared mapping written after close(fd) sends its WRITEs at munmap,
        msync or exit, then RELEASE and no FLUSH. The kernel discards errors of RELEASE and
        close() returned long ago, so a failure here can only be logged."""
        handle = self.table.handles.get(fh)
        try:
            # Not while another open still writes into the same content (two O_TRUNC
            # rewriters): the last of them to finish publishes, as at FLUSH. Seen under load:
            # the first rewriter's RELEASE, right after its close, published the second's
            # bytes in progress.
            if (handle is not None and self._unflushed(handle)
                    and not self._others_writing(handle)
                    and not self.processes.killed_by_signal(handle.opener)):
                await self.publisher.publish(handle.inode, handle.caller, handle)
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
        handle = self.table.handles.pop(fh, None)
        if handle is None:
            return
        inode = handle.inode
        inode.handles.remove(handle)
        if not inode.handles:
            self.close_inode(inode)
        elif handle.writable:
            self.end_writer(inode)

    def close_inode(self, inode: OpenInode) -> None:
        if inode.handles or inode.changing:  # a truncate(2) on its path closes it when done
            return
        if self.shared:
            self._forget_older_pages(inode)
        if inode.readers_in_threads:  # the last of them closes it (see read)
            self.table.forget(inode)
            return
        self.table.forget(inode)
        if inode.temp is not None:
            inode.temp.discard()
            inode.temp = None
        if inode.reader is not None:
            blob = inode.node.blob
            # On a remote store too: an idle reader keeps its cached file pinned only within
            # a share of the cache's size (S3Reader.idle), else it lets go of the file.
            if blob is not None and not inode.damaged and not inode.unlinked:
                self.table.idle.give(blob.digest, inode.reader)
            else:
                inode.reader.close()
            inode.reader = None
        self.publisher.drop_if_unpublished(inode)
        self.end_writer(inode)

    def reader_of(self, inode: OpenInode) -> BlobReader | None:
        """The reader of the inode's content, opened (or taken from the idle ones) at its
        first use; None for a file with no content yet."""
        if inode.reader is None and inode.node.blob is not None and not inode.damaged:
            blob = inode.node.blob
            inode.reader = (self.table.idle.take(blob.digest)
                            or self.blobs.open(blob.digest, blob.encoding, size=blob.size))
        return inode.reader

    def unopened_digests(self) -> set[str]:
        """Contents of open files whose blob is not opened yet: gc must keep their files."""
        return {inode.node.blob.digest for inode in self.table.inodes.values()
                if inode.reader is None and inode.node.blob is not None}

    # -- reading and writing --------------------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self.table.handle(fh)
        inode = handle.inode
        # Reads see the bytes written so far. A temp being published keeps its descriptor open
        # until the new blob replaces it, so this never reads a closed file.
        if inode.temp is not None:
            return inode.temp.read(offset, size)
        if inode.damaged:
            raise damaged(inode.node)
        reader = self.reader_of(inode)
        if reader is None:
            return b""
        data = await self._read_blob(inode, reader, offset, size)
        self._fill_page_cache(handle, reader, offset, len(data))
        return data

    async def _read_blob(self, inode: OpenInode, reader: BlobReader, offset: int,
                         size: int) -> bytes | memoryview:
        if size <= INLINE_READ_BYTES and not self.runtime.requests_waiting():
            # Read on the loop whatever it waits for (Runtime.run_short): nothing else waits,
            # and asking first whether the bytes are at hand costs a cold random read a probe
            # and a second pass through the reader. On a remote store only a blob its cache
            # holds, never a download (read_cached: None if the read needs one).
            if not self.blobs.remote:
                return reader.read(offset, size)
            read_cached = getattr(reader, "read_cached", None)
            data = None if read_cached is None else read_cached(offset, size)
            if data is not None:
                return data
        # What the page cache or the frame cache holds is answered at once; a read that would
        # wait for the disk or decompress goes to a worker thread, and the event loop serves
        # other requests meanwhile (the kernel sends read-ahead READs of the same file too).
        data = reader.read_nowait(offset, size)
        if data is not None:
            return data
        inode.readers_in_threads += 1
        try:
            # On a remote store read() may download the whole blob (or fetch a damaged cached
            # file again): never on the event loop.
            if size <= INLINE_READ_BYTES and not self.blobs.remote:
                return await self.runtime.run_short(reader.read, offset, size)
            return await self.runtime.run_in_thread(reader.read, offset, size)
        finally:
            inode.readers_in_threads -= 1
            if not inode.handles and not inode.readers_in_threads:
                self.close_inode(inode)  # released while this read ran

    def _fill_page_cache(self, handle: Handle, reader: BlobReader, offset: int,
                         length: int) -> None:
        """After a random READ that decompressed a frame: give the kernel the frame's other
        pages for its page cache, as a compressed filesystem reads a whole cluster (squashfs
        does the same). A later READ of any of them is then answered by the kernel alone, with
        no request and no decompression; a random 4 KiB read has nothing else to amortize its
        frame over. The pages of the READ itself come with its reply.

        A fill is what a READ through this handle would put in the page cache now, sent a
        little later (a worker thread: the kernel may wait on a page another READ holds). So
        it is sent only where nothing can change the content meanwhile unseen: the handle
        uses the page cache, no write or truncate is in progress or can start (opens for
        writing and truncates wait for queued fills: KernelNotifier.fills_done), no
        invalidation is pending, and the inode is the table's current one. A change from
        elsewhere queues its invalidation after the fill, so the kernel drops it in order."""
        take = getattr(reader, "take_random_frame", None)
        found = None if take is None else take()
        if found is None:
            return
        inode = handle.inode
        ino = inode.node.ino
        kernel = self.publisher.kernel
        if (handle.direct_io or inode.temp is not None or inode.changing or inode.superseded
                or any(other.writable for other in inode.handles)
                or self.table.inode(ino) is not inode or kernel.dropping(ino)):
            return
        frame_start, frame = found
        frame_end = frame_start + len(frame)
        # Whole pages only (a partial page is not marked up to date), but for the file's last.
        # The READ's own pages too, in the same call: the fill waits for its reply to unlock
        # them, then writes the same bytes.
        first = -(-frame_start // PAGE_SIZE) * PAGE_SIZE
        last = frame_end if frame_end == reader.size else frame_end - frame_end % PAGE_SIZE
        if first < last:
            kernel.fill(ino, first, memoryview(frame)[first - frame_start:last - frame_start])

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.table.handle(fh)
        _check_writable(handle)
        # No sealed-run check per write: a writable handle cannot exist inside a sealed run
        # (open refuses it, sealing waits for none, nothing moves into a sealed run), and
        # publishing checks again.
        inode = handle.inode
        async with inode.lock:
            _check_writable(handle)
            # Failing like any other write (sticky, nothing published), and under the lock: a
            # publish in flight may be reading the temp that failing discards.
            with self.publisher.fails(inode, handle):
                if offset + len(data) > self.max_artifact_size:
                    raise FileTooBig("write beyond the maximum artifact size")
                await self._ensure_temp(inode, keep_content=True)
                assert inode.temp is not None
                written = inode.temp.write(offset, data)
            inode.mtime_ns = inode.changed_ns = time.time_ns()
            handle.wrote_serial = inode.temp_serial
            handle.finished = False  # a copy of its descriptor writes on (a forked child)
        return written

    async def truncate(self, node: Node, size: int, handle: Handle | None,
                       caller: Caller) -> None:
        if node.kind.is_dir:
            raise IsADirectory()
        if size > self.max_artifact_size:
            if handle is not None and handle.writable:
                # ftruncate fails like a write beyond the maximum: the descriptor's writes fail
                # as a whole (sticky, so close() says EFBIG), and nothing is published.
                async with handle.inode.lock:
                    self.publisher.fail(handle.inode, handle, errno.EFBIG)
            raise FileTooBig(f"{size} bytes is over the maximum artifact size")
        if handle is not None:
            _check_writable(handle)
        transient = self.table.inode(node.ino) is None
        registering = False
        if handle is None:  # truncate(2) on a path: a writer for as long as it takes
            node, registering = self._register_writer(node)
        try:
            inode = self.open_inode(node, writable=True)
        except BaseException:
            if registering:
                self._end_writer_of(node.ino)
            raise
        inode.registered = inode.registered or registering
        inode.changing += 1
        try:
            # The kernel cuts its pages at the new size once this returns: no fill after it.
            await self.publisher.kernel.fills_done(node.ino)
            async with inode.lock:
                had_temp = inode.temp is not None
                with self.publisher.fails(inode, handle):
                    await self._ensure_temp(inode, keep_content=size > 0)
                    assert inode.temp is not None
                    inode.temp.truncate(size)
                inode.mtime_ns = inode.changed_ns = time.time_ns()
                if handle is not None:
                    handle.wrote_serial = inode.temp_serial
            # truncate(2) on a path, with no write in progress: the new content is complete now.
            if handle is None and not had_temp:
                await self.publisher.publish(inode, caller)
        finally:
            inode.changing -= 1
            if transient or not inode.handles:  # its handles may have closed meanwhile
                self.close_inode(inode)
            else:
                self.end_writer(inode)

    async def _ensure_temp(self, inode: OpenInode, *, keep_content: bool) -> None:
        """Give the inode a temp to write into; copy-on-write of the current content."""
        if inode.temp is not None:
            return
        if keep_content and inode.damaged:
            raise damaged(inode.node)
        temp = self.blobs.new_temp(streaming=True)
        try:
            reader = self.reader_of(inode) if keep_content else None
            if keep_content and reader is not None and reader.size:
                await offload(self.runtime, reader.size, temp.fill_from, reader)
        except BaseException:
            temp.discard()
            raise
        inode.temp = temp
        inode.temp_serial += 1

    # -- publishing -----------------------------------------------------------------------

    async def flush(self, fh: int) -> None:
        """close(2) waits for this. The kernel sends it for every close of every copy of the
        descriptor (a forked child's, a dup's, the exit of each process holding one), with no
        word of who closed. A version is published when the writer has finished: when the
        process that opened the file no longer holds it (its last close, or its exit) and no
        other open of the file is still writing into the same content. A writer killed by a
        signal publishes nothing."""
        handle = self.table.handle(fh)
        if handle.error is not None:
            raise CafsError("an earlier write to this file failed", handle.error)
        inode = handle.inode
        if handle.writable and inode.unlinked and inode.temp is not None \
                and not self._opener_holds(handle):
            self.publisher.check_session(inode)  # removed by a clean-up after this mount
        if not self._unflushed(handle) or self._opener_holds(handle):
            return
        handle.finished = True
        if self.processes.killed_by_signal(handle.opener):  # its exit closes it: cut short
            log.info("%s: its writer (pid %d) was killed by a signal: nothing published",
                     inode.node.name, handle.opener)
            async with inode.lock:
                self.publisher.fail(inode, handle, errno.EINTR)
            return
        if self._others_writing(handle):
            return  # the last of them to finish publishes what they wrote together
        await self.publisher.publish(inode, handle.caller, handle)

    def _opener_holds(self, handle: Handle) -> bool:
        """True if this FLUSH closed a copy of the descriptor while the process that opened
        the file still holds it: it counts its descriptors on the inode with the same access
        mode against its open files of that kind here. Cannot tell (None): False, and the
        close publishes, as every close once did."""
        node = handle.inode.node
        held = self.processes.descriptors_on(handle.opener, node.ino, node.name,
                                             handle.accmode)
        if held is None or held == 0:
            return False
        opens = sum(1 for other in handle.inode.handles if other.opener == handle.opener
                    and other.accmode == handle.accmode and not other.finished)
        return held >= opens

    def _others_writing(self, handle: Handle) -> bool:
        """Another open of the file wrote into the same content and has not finished (two
        rewrites with O_TRUNC): publishing now would publish its bytes in progress."""
        inode = handle.inode
        return any(other is not handle and other.writable and not other.finished
                   and other.error is None and other.wrote_serial == inode.temp_serial
                   for other in inode.handles)

    async def fsync(self, fh: int) -> None:
        """Publish what was written so far, whoever calls it, then make it durable: the blob
        file and the manifest's WAL are fsynced, and the artifact survives power loss."""
        handle = self.table.handle(fh)
        if handle.error is not None:
            raise CafsError("an earlier write to this file failed", handle.error)
        inode = handle.inode
        if self._unflushed(handle):
            await self.publisher.publish(inode, handle.caller, handle)
        blob = inode.node.blob
        if blob is not None and not self.blobs.sync_each_publish:
            await self.runtime.run_in_thread(self.blobs.sync_blob, blob.digest)
        self.tree.manifest.sync()

    # -- what admin commands ask of a running mount ---------------------------------------

    def writers_in(self, execution_ino: int) -> int:
        """Handles open for writing inside a run (sealing waits for none)."""
        count = 0
        for handle in self.table.handles.values():
            if handle.writable:
                run = self.tree.execution_of(handle.inode.node)
                count += run is not None and run.ino == execution_ino
        return count


def _check_writable(handle: Handle) -> None:
    if not handle.writable:
        raise BadHandle("file not open for writing")
    if handle.error is not None:
        raise CafsError("an earlier write to this file failed", handle.error)
