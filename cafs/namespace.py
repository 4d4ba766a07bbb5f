"""The tree of names: what may exist where, and the operations that change it.

Owns: resolving an inode or a (directory, name) to a node, stored or made up (cafs.virtual);
attributes as stat shows them; readdir; mkdir, the row of a new file, unlink, rmdir, rename and
chmod/chown/utimens; the placement rules (which kind of node may be made, moved or removed where,
sealed runs unchanged); the bounded node cache. Reads the open-file table (cafs.openfiles) to show
writes in progress and to keep an unlinked open file alive, but never opens, writes or publishes.
Must not import pyfuse3 or trio.

Concurrency rule: every method runs on the event loop's thread and none awaits, so each one is
atomic; a manifest change is one synchronous call with nothing interleaving.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import replace
from typing import TYPE_CHECKING

from cafs.blobstore import SpaceGuard
from cafs.digest import Digest
from cafs.errors import (
    AlreadyExists,
    CafsError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
)
from cafs.lru import Lru
from cafs.manifest import Manifest
from cafs.model import (
    BLOB_INODE_BASE,
    BLOBS_INODE,
    MAX_NAME_BYTES,
    RECORD_NAME,
    RUNS_INODE,
    Attr,
    AttrChanges,
    BlobRef,
    Caller,
    Change,
    Kind,
    Node,
)
from cafs.rules import file_mode, new_name
from cafs.runtime import KernelNotifier
from cafs.virtual import VirtualNodes, is_made_up

if TYPE_CHECKING:
    from cafs.openfiles import OpenInode, OpenTable

# About what one new row (a name, a version, a tag without its bytes) adds to the manifest's
# files: WAL frames of the pages it touches. Charged to the part of the reserve that growth of
# the manifest may use (SpaceGuard.take_metadata), so a user filling the disk with empty files,
# tags or versions stops while deletes and gc still commit.
ROW_COST = 16 << 10
READDIR_PAGE = 2048
# Attributes kept with their nodes (NodeCache.attr): a 10,000-entry `ls -l` fits; ~150 bytes each.
ATTRS_KEPT = 32_768
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class NodeCache:
    """Bounded LRU of nodes by inode and of directory entries by (parent, name), and the
    attributes last computed for a node object (nodes are immutable: a change makes a new one,
    so a memo kept with the very object it was computed from is never stale)."""

    def __init__(self, max_entries: int) -> None:
        self._nodes: Lru[int, Node] = Lru(max_entries)
        self._entries: Lru[tuple[int, str], int] = Lru(max_entries)
        self._attrs: dict[int, tuple[Node, Attr]] = {}
        self._max_attrs = min(max_entries, ATTRS_KEPT)

    def attr(self, node: Node) -> Attr | None:
        memo = self._attrs.get(node.ino)
        return memo[1] if memo is not None and memo[0] is node else None

    def keep_attr(self, node: Node, attr: Attr) -> None:
        if len(self._attrs) >= self._max_attrs:  # cheaper than an LRU per stat; refilled
            self._attrs.clear()
        self._attrs[node.ino] = (node, attr)

    def node(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def entry(self, parent: int, name: str) -> int | None:
        return self._entries.get((parent, name))

    def put(self, node: Node) -> None:
        self._nodes.put(node.ino, node)
        self._entries.put((node.parent, node.name), node.ino)

    def drop(self, ino: int) -> None:
        node = self._nodes.pop(ino)
        if node is not None:
            self._entries.pop((node.parent, node.name))

    def drop_entry(self, parent: int, name: str) -> None:
        self._entries.pop((parent, name))

    def clear(self) -> None:
        self._nodes.clear()
        self._entries.clear()
        self._attrs.clear()


class Listing:
    """One opendir of a stored directory: the page of children last read from the manifest.
    The kernel's readdir buffer holds ~25 entries with their attributes, so a listing of 10,000
    entries is ~400 READDIRs; each resumes in this page instead of querying READDIR_PAGE rows
    again. Entries are a snapshot taken when their page is read (POSIX leaves it open whether
    names made after opendir appear); attributes are not: each is the node as it is now."""

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.after = -1  # the position the page was read after (-1: no page yet)
        self.page: list[Node] = []
        self.inos: list[int] = []

    def resume(self, start: int) -> list[Node] | None:
        """The page's entries after position `start`, or None if the page does not hold it."""
        if self.after < 0 or start < self.after or (self.inos and start > self.inos[-1]):
            return None
        rest = self.page[bisect.bisect_right(self.inos, start):]
        if not rest and len(self.page) >= READDIR_PAGE:
            return None  # a full page is done: the next one is read after it
        return rest

    def keep(self, after: int, page: list[Node]) -> None:
        self.after, self.page, self.inos = after, page, [node.ino for node in page]


class Pages:
    """Pages of stored directories' children as the manifest gave them, by directory and the
    position they start after; bounded by entries in all. A directory's pages go whenever a
    name in it is added, removed or moved (Namespace.directory_changed), so `ls` and `find`
    of an unchanged directory query nothing. Entries carry the node as read: readdir answers
    with the node as it is now (Namespace._current)."""

    def __init__(self, max_entries: int) -> None:
        self._dirs: Lru[int, dict[int, list[Node]]] = Lru(
            max_entries, size=lambda pages: 1 + sum(len(page) for page in pages.values()))

    def page(self, ino: int, after: int) -> list[Node] | None:
        pages = self._dirs.get(ino)
        return None if pages is None else pages.get(after)

    def keep(self, ino: int, after: int, page: list[Node]) -> None:
        pages = self._dirs.pop(ino) or {}
        pages[after] = page
        self._dirs.put(ino, pages)

    def drop(self, ino: int) -> None:
        self._dirs.pop(ino)

    def clear(self) -> None:
        self._dirs.clear()

    def after(self, ino: int, position: int) -> Iterator[Node]:
        """The directory's children after `position` (an ino: listings are in ino order), as
        far as the pages kept hold them; asks the manifest nothing."""
        pages = self._dirs.get(ino)
        if pages is None:
            return
        for start in sorted(pages):
            page = pages[start]
            if page and page[-1].ino > position:
                yield from (node for node in page if node.ino > position)


def lookup_name(raw: bytes) -> str:
    """A name to look up: one that cannot exist is simply not found."""
    if len(raw) > MAX_NAME_BYTES:
        raise NameTooLong()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound("no such name") from None  # only UTF-8 names can exist


def refuse_fixed_change(node: Node) -> None:
    """Nodes no request may change: the fixed layout and everything cafs computes."""
    if node.kind is Kind.BLOB or node.kind is Kind.BLOBS:
        raise ReadOnly("blobs/ is read-only")
    if node.kind is Kind.RECORD:
        raise ReadOnly(f"{RECORD_NAME} is read-only")
    if node.kind in (Kind.ROOT, Kind.RUNS):
        raise NotPermitted("the mount's fixed layout cannot change")


def _check_removable(parent: Node, node: Node) -> None:
    if parent.kind is Kind.BLOBS:
        raise ReadOnly("blobs/ is read-only")
    if parent.kind is Kind.ROOT:
        raise NotPermitted(f"{node.name} is part of the mount's fixed layout")
    if node.kind is Kind.RECORD:
        raise NotPermitted(f"{RECORD_NAME} is computed by cafs")


def _check_replaceable(node: Node, replaced: Node, new_name: str, flags: int,
                       has_children: bool) -> None:
    """rename(2)'s rules for a target name that exists (and is another node)."""
    if replaced.kind is Kind.RECORD:
        raise NotPermitted(f"{RECORD_NAME} is computed by cafs")
    if flags & RENAME_NOREPLACE:
        raise AlreadyExists(new_name)
    if replaced.kind.is_dir and not node.kind.is_dir:
        raise IsADirectory()
    if node.kind.is_dir and not replaced.kind.is_dir:
        raise NotADirectory()
    if has_children:
        raise NotEmpty()


log = logging.getLogger(__name__)

# What each level of the namespace holds: the rule a refused write broke, for the log.
PLACEMENT_RULES = {
    Kind.ROOT: "the mount root holds only runs/ and blobs/",
    Kind.RUNS: "runs/ holds only executions (directories): artifacts go in "
               "runs/<execution>/<layer>/",
    Kind.EXECUTION: "an execution holds only layers (directories): artifacts go in "
                    "runs/<execution>/<layer>/",
}
REFUSALS_REMEMBERED = 4096  # directories whose refusal was logged (bounded memory)


class PlacementRefusals:
    """Says in the daemon's log why a write in the wrong place got EPERM, once per directory:
    a user sees only the errno, and a tool retrying in a loop must not fill the log."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._logged: Lru[int, bool] = Lru(REFUSALS_REMEMBERED)

    def refused(self, directory: Node, what: str, caller_uid: int | None = None) -> None:
        if self._logged.get(directory.ino) is not None:
            return
        self._logged.put(directory.ino, True)
        where = {Kind.ROOT: "the mount root", Kind.RUNS: "runs/"}.get(directory.kind)
        if where is None:
            where = self._manifest.path_of(directory.ino)
        rule = PLACEMENT_RULES.get(directory.kind, f"a {directory.kind.value} cannot hold it")
        log.warning("EPERM: %s in %s refused%s: %s (logged once per directory)", what, where,
                    "" if caller_uid is None else f" (uid {caller_uid})", rule)


class Namespace:
    def __init__(self, manifest: Manifest, space: SpaceGuard, virtual: VirtualNodes,
                 opened: OpenTable, kernel: KernelNotifier, cache_entries: int,
                 shared: bool = False) -> None:
        self.manifest = manifest
        # Other hosts' mounts change this manifest too (PostgreSQL): a row seen without a
        # version may be a file another host is writing, and the kernel is told which version
        # of each file its attributes describe (OpenTable.told).
        self.shared = shared
        self.space = space
        self.virtual = virtual
        self.opened = opened
        self.kernel = kernel
        self.cache = NodeCache(cache_entries)
        self.refusals = PlacementRefusals(manifest)
        self.pages = Pages(cache_entries)

    # -- finding nodes --------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        fixed = self.virtual.fixed(ino)
        if fixed is not None:
            return fixed
        node = self.cache.node(ino)
        if node is not None:
            return node
        node = self.virtual.made_up(ino) if is_made_up(ino) else self.manifest.node(ino)
        if node is not None:
            self.cache.put(node)
            return node
        opened = self.opened.inode(ino)
        if opened is not None:  # unlinked while open: it lives on until the last release
            return opened.node
        raise NotFound(f"inode {ino}")

    def lookup(self, parent: int, raw_name: bytes, caller: Caller | None = None) -> Attr:
        return self.attr(self.child(self.node(parent), lookup_name(raw_name)), caller)

    def absence_is_final(self, parent_ino: int) -> bool:
        """True if a name found missing in this directory can appear only through the kernel
        (create, mkdir, rename), which then replaces its negative entry itself: the kernel may
        remember the absence. Inside executions, layers and their sub-directories, yes. Not in
        runs/ (an import adds a run behind the kernel's back) nor blobs/ (a publish anywhere
        adds a name there), nor at the fixed root."""
        try:
            parent = self.node(parent_ino)
        except NotFound:
            return False
        return parent.kind in (Kind.EXECUTION, Kind.LAYER, Kind.DIR)

    def child(self, parent: Node, name: str) -> Node:
        if not parent.kind.is_dir:
            raise NotADirectory()
        if parent.kind is Kind.ROOT:
            return self.virtual.root_child(name)
        if parent.kind is Kind.BLOBS:
            return self.node(self.virtual.blob_ino(name))
        record = self.virtual.record_ino(parent)
        if name == RECORD_NAME and record is not None:
            return self.node(record)
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
            # the name. If the manifest still cannot, start-up will. Where hosts share the
            # manifest it may be another host's create in progress: invisible, never dropped
            # here (a create of the name then writes it too, see OpenFiles.create).
            if not self.manifest.shared:
                with suppress(CafsError):
                    self.remove(node)
            raise NotFound(name)
        self.cache.put(node)
        return node

    def _abandoned(self, node: Node) -> bool:
        """A file row with no version that nobody has open: its first write failed and the
        manifest could not even drop the row (start-up will). Never visible."""
        return (node.version_id is None and node.kind is Kind.FILE
                and self.opened.inode(node.ino) is None)

    def execution_of(self, node: Node) -> Node | None:
        """The execution a node lives in (itself for an execution); None outside runs/<exec>."""
        try:
            while node.kind is not Kind.EXECUTION:
                if node.kind in (Kind.ROOT, Kind.RUNS, Kind.BLOBS, Kind.BLOB):
                    return None
                node = self.node(node.parent)
        except NotFound:  # an unlinked file's directory may be gone too
            return None
        return node

    def check_unsealed(self, *nodes: Node) -> None:
        """Sealed runs are immutable, for root too: EROFS for any change inside them."""
        for node in nodes:
            run = self.execution_of(node)
            if run is not None and run.sealed_ns is not None:
                raise ReadOnly(f"runs/{run.name} is sealed")

    def record_bytes(self, record: Node, caller: Caller | None = None) -> bytes:
        """A directory's record as `caller` may see it (see cafs.virtual)."""
        directory = self.node(record.parent)
        execution = self.execution_of(directory)
        assert execution is not None  # records exist only for layers and executions
        return self.virtual.record_bytes(directory, execution, caller)

    # -- attributes and listings ----------------------------------------------------------

    def getattr(self, ino: int, caller: Caller | None = None) -> Attr:
        return self.attr(self.node(ino), caller)

    def attr(self, node: Node, caller: Caller | None = None) -> Attr:
        if self.shared and node.kind is Kind.FILE:
            # What the kernel will hold (see OpenFiles.open). While an older version is
            # still read here through the page cache, the kernel's one size must be the size
            # of what those reads get (the largest such): not a shorter newer one's, or they
            # would end early; not a longer newer one's, or they would read zeros from their
            # end up to it (seen in the soak: a short version, then zeros up to a page or a
            # read-ahead boundary).
            # Opens of the newer version read past the page cache and that size (direct_io,
            # OpenFiles._page_cache) until the older version's last handle is gone.
            if self.opened.tell(node.ino, node.version_id):
                self.kernel.inode_changed(node.ino)
            older = self.opened.older_open_size(node)
            if older is not None:
                current = self.opened.inode(node.ino)
                attr = self._attr(node, caller, current)
                writing = current is not None and current.temp is not None
                return replace(attr, size=max(older, attr.size) if writing else older)
        known = self.cache.attr(node)  # never a record's
        opened = self.opened.inode(node.ino)
        if opened is None:
            if known is None:
                known = self._attr(node, caller, None)
                if node.kind is not Kind.RECORD:  # else a function of the node alone
                    self.cache.keep_attr(node, known)
            return known
        return self._attr(node, caller, opened)

    def _attr(self, node: Node, caller: Caller | None, opened: OpenInode | None) -> Attr:
        size, stored, mtime = node.size, node.blob.stored_size if node.blob else 0, node.mtime_ns
        ctime = node.ctime_ns
        if node.kind is Kind.RECORD:  # the size of the record the caller would read
            size = stored = len(self.record_bytes(node, caller))
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
            atime_ns=node.atime_ns,
        )

    def readdir(self, ino: int, start: int, listing: Listing | None = None
                ) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after the position `start` (0 = beginning), each with its next position;
        `listing` (the opendir's) saves re-reading pages of a stored directory."""
        directory = self.node(ino)
        if not directory.kind.is_dir:
            raise NotADirectory()
        if directory.kind is Kind.ROOT:
            fixed = self.virtual.root_entries()
            for position, node in enumerate(fixed[start:], start + 1):
                yield node.name.encode(), self.attr(node), position
            return
        if directory.kind is Kind.BLOBS:
            for blob_ino, position in self.virtual.blob_listing(start):
                node = self.node(blob_ino)
                yield node.name.encode(), self.attr(node), position
            return
        # .record.json is not listed: cp -r, rsync, tar, du and rm -rf must see only what users
        # stored (a listed record would be copied into the next run, or block rm -rf).
        listing = listing or Listing(ino)
        after = start
        while True:
            page = listing.resume(after)
            if page is None:
                page = self.pages.page(ino, after)
                if page is None:
                    page = self.manifest.children(ino, after, READDIR_PAGE)
                    for node in page:
                        self.cache.put(node)
                    self.pages.keep(ino, after, page)
                listing.keep(after, page)
            cached = self.cache.node
            for node in page:
                current = node if cached(node.ino) is node else self._current(node)
                if current is None or (current.version_id is None and self._abandoned(current)):
                    continue
                yield current.name.encode(), self.attr(current), current.ino
            if len(listing.page) < READDIR_PAGE:
                return  # that was the last page
            after = listing.inos[-1]

    def files_after(self, node: Node) -> Iterator[BlobRef]:
        """The contents of the files listed after `node` in its directory (what a reader of
        the directory's files one after another opens next), from the listings this daemon
        keeps: none if it keeps none. Lazy, and asks the manifest nothing."""
        cached = self.cache.node
        for sibling in self.pages.after(node.parent, node.ino):
            current = cached(sibling.ino) or sibling
            if current.kind is Kind.FILE and current.blob is not None:
                yield current.blob

    def _current(self, node: Node) -> Node | None:
        """The node as it is now (a page may be older than a chmod or a publish), or None if
        it is gone or has moved to another directory."""
        if self.cache.node(node.ino) is node:
            return node
        try:
            current = self.node(node.ino)
        except NotFound:
            return None
        opened = self.opened.inode(node.ino)
        if current.parent != node.parent or (opened is not None and opened.unlinked):
            return None
        return current

    def set_attrs(self, node: Node, changes: AttrChanges) -> Node:
        """chmod, chown, utimens (not the size: see cafs.openfiles). An open file's write in
        progress keeps the new mtime for its publish."""
        if (changes.mode, changes.uid, changes.gid, changes.mtime_ns,
                changes.atime_ns) == (None,) * 5:
            return node
        atime = node.atime_ns if changes.atime_ns is None else changes.atime_ns
        now = time.time_ns()
        mode = node.mode if changes.mode is None else changes.mode & 0o7777
        if node.kind is Kind.FILE:
            mode = file_mode(mode)
        elif node.kind is Kind.SYMLINK:  # Linux has no lchmod: its bits are always 0777
            mode = node.mode
        opened = self.opened.inode(node.ino)
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
            self.manifest.set_attrs(node.ino, mode=mode, uid=uid, gid=gid, mtime_ns=mtime,
                                    ctime_ns=now, atime_ns=changes.atime_ns)
        self.cache.drop(node.ino)
        if opened is not None:
            opened.node = replace(opened.node, mode=mode, uid=uid, gid=gid, mtime_ns=mtime,
                                  ctime_ns=now, atime_ns=atime)
        return replace(node, mode=mode, uid=uid, gid=gid, mtime_ns=mtime, ctime_ns=now,
                       atime_ns=atime)

    # -- making and removing names --------------------------------------------------------

    def _new_child_kind(self, parent: Node, name: str, want_dir: bool,
                        caller_uid: int | None = None, *, ask: bool = True) -> Kind:
        if parent.kind is Kind.BLOBS:
            raise ReadOnly("blobs/ is read-only")
        if not parent.kind.is_dir:
            raise NotADirectory()
        kind = parent.kind.child_kind(want_dir)
        if kind is None:
            places = {Kind.ROOT: "the mount root", Kind.RUNS: "runs/"}
            where = places.get(parent.kind, "an execution")
            what = "directories" if want_dir else "files"
            self.refusals.refused(parent, f"{'directory' if want_dir else 'file'} {name!r}",
                                  caller_uid)
            raise NotPermitted(f"no {what} may be made in {where}")
        if not ask:  # the cache only: the caller's insert is refused if the name is taken
            ino = self.cache.entry(parent.ino, name)
            cached = self.cache.node(ino) if ino is not None else None
            if cached is not None and not self._abandoned(cached):
                raise AlreadyExists(name)
            return kind
        try:
            self.child(parent, name)
        except NotFound:
            return kind
        raise AlreadyExists(name)

    def place_new(self, parent_ino: int, raw_name: bytes, want_dir: bool,
                  caller_uid: int | None = None, *, ask: bool = True
                  ) -> tuple[Node, str, Kind]:
        """The directory, name and kind for a new node, checked (name, sealed run, placement,
        not taken). A symlink asks as a file does (want_dir False): same places, same errnos.
        `ask=False`: whether the name is taken is asked of the cache only (the caller's
        add_node refuses a taken name itself)."""
        parent = self.node(parent_ino)
        name = new_name(raw_name)
        self.check_unsealed(parent)
        return parent, name, self._new_child_kind(parent, name, want_dir, caller_uid, ask=ask)

    def _add(self, parent_ino: int, raw_name: bytes, mode: int, caller: Caller,
             want_dir: bool) -> Node:
        # Where hosts share the manifest, add_node refuses a name taken (AlreadyExists, from
        # the unique index), on this host or another: the kernel's LOOKUP of the name has just
        # asked the manifest, and asking again cost a round trip per create.
        parent, name, kind = self.place_new(parent_ino, raw_name, want_dir, caller.uid,
                                            ask=not self.manifest.shared)
        self.space.take_metadata(ROW_COST)
        now = time.time_ns()
        try:
            node = self.manifest.add_node(parent.ino, name, kind, mode, caller.uid,
                                          caller.gid, now)
        except AlreadyExists:
            # Made on another host, unseen here: the kernel may remember the name as absent.
            self.kernel.entry_gone(parent.ino, name)
            raise
        except ReadOnly:
            self.sealed_elsewhere(parent)  # sealed on another host
            raise
        self.directory_changed(parent.ino)
        if parent.ino != RUNS_INODE:
            # The directory as add_node left it (its times, a sub-directory's link), kept in
            # the cache: the publish that follows a create looks it up again (is the run
            # sealed?), and reading it back cost a query per file.
            self.cache.put(replace(parent, mtime_ns=now, ctime_ns=now,
                                   nlink=parent.nlink + kind.is_dir))
        self.cache.put(node)
        return node

    def mkdir(self, parent_ino: int, raw_name: bytes, mode: int, caller: Caller) -> Attr:
        return self.attr(self._add(parent_ino, raw_name, mode & 0o7777, caller, want_dir=True))

    def add_file(self, parent_ino: int, raw_name: bytes, mode: int, caller: Caller) -> Node:
        """The row of a new file (create). It exists from now on (it gives the inode its
        number) but has no version until the first publish; start-up removes such rows if the
        daemon died before that."""
        return self._add(parent_ino, raw_name, file_mode(mode), caller, want_dir=False)

    def unlink(self, parent_ino: int, raw_name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self.child(parent, lookup_name(raw_name))
        _check_removable(parent, node)
        self.check_unsealed(node)
        if node.kind.is_dir:
            raise IsADirectory()
        self.remove(node)

    def rmdir(self, parent_ino: int, raw_name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self.child(parent, lookup_name(raw_name))
        _check_removable(parent, node)
        self.check_unsealed(node)
        if not node.kind.is_dir:
            raise NotADirectory()
        if self.manifest.has_children(node.ino):
            raise NotEmpty()
        self.remove(node)

    def remove(self, node: Node) -> None:
        """Drop a name; an open file lives on, unlinked, until its last release."""
        self.manifest.remove_node(node, time.time_ns())
        self.forget_removed(node)

    def forget_removed(self, node: Node) -> None:
        """A node the manifest no longer has: forget it here."""
        self.cache.drop(node.ino)
        self.directory_changed(node.parent)
        self._unlinked_while_open(node)

    def sealed_elsewhere(self, node: Node) -> None:
        """The manifest refused a change below `node` because its run is sealed, which this
        host had not seen (another host sealed it): forget the run as cached here."""
        run = self.execution_of(node)
        if run is not None:
            self.nodes_changed([run.ino])

    def _unlinked_while_open(self, node: Node) -> None:
        opened = self.opened.inode(node.ino)
        if opened is not None:
            opened.unlinked = True
            opened.node = replace(node, nlink=0)

    def rename(self, old_parent_ino: int, raw_old: bytes, new_parent_ino: int, raw_new: bytes,
               flags: int) -> None:
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_EXCHANGE is not supported")
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        node = self.child(old_parent, lookup_name(raw_old))
        name = new_name(raw_new)
        for directory in (old_parent, new_parent):
            if directory.kind is Kind.BLOBS:
                raise ReadOnly("blobs/ is read-only")
        _check_removable(old_parent, node)
        self.check_unsealed(node, new_parent)
        if not new_parent.kind.accepts(node.kind):
            self.refusals.refused(new_parent, f"moving {node.kind.value} {node.name!r} as {name!r}")
            raise NotPermitted(f"a {node.kind.value} cannot move into a {new_parent.kind.value}")
        if node.kind.is_dir:
            self._refuse_move_into_itself(node, new_parent)
        try:
            replaced: Node | None = self.child(new_parent, name)
        except NotFound:
            replaced = None
        if replaced is not None:
            if replaced.ino == node.ino:
                return
            _check_replaceable(node, replaced, name, flags, replaced.kind.is_dir
                               and self.manifest.has_children(replaced.ino))
        if len(name) > len(node.name):  # a longer name grows the manifest; others do not
            self.space.take_metadata(ROW_COST)
        self.manifest.rename(node, new_parent.ino, name, replaced, time.time_ns())
        self.cache.drop(node.ino)
        self.cache.drop_entry(old_parent.ino, node.name)
        self.directory_changed(old_parent.ino)
        self.directory_changed(new_parent.ino)
        if replaced is not None:
            self.cache.drop(replaced.ino)
            self._unlinked_while_open(replaced)
        moved = self.manifest.node(node.ino)
        if moved is not None:
            self.cache.put(moved)
            opened = self.opened.inode(node.ino)
            if opened is not None:
                opened.node = moved

    def _refuse_move_into_itself(self, node: Node, new_parent: Node) -> None:
        ancestor = new_parent
        while ancestor.kind not in (Kind.RUNS, Kind.ROOT):
            if ancestor.ino == node.ino:
                raise InvalidArgument("cannot move a directory into itself")
            ancestor = self.node(ancestor.parent)

    def directory_changed(self, ino: int) -> None:
        self.pages.drop(ino)
        if ino == RUNS_INODE:
            self.virtual.runs_changed()
        else:
            self.cache.drop(ino)

    # -- changes made behind the kernel's back (admin commands) ---------------------------

    def nodes_changed(self, inos: Iterable[int]) -> None:
        """Nodes changed behind the kernel's back: forget them here and in the kernel."""
        for ino in inos:
            self.directory_changed(ino)  # drops the cached node (or runs/' link count)
            self.kernel.inode_changed(ino)
        # Content may have been marked damaged, quarantined or healed: no idle reader of an
        # old file may serve it again.
        self.opened.idle.clear()

    def blobs_removed(self, blobs: Iterable[BlobRef]) -> None:
        self.opened.idle.clear()
        for blob in blobs:
            self.cache.drop(BLOB_INODE_BASE + blob.blob_id)
            self.kernel.entry_gone(BLOBS_INODE, blob.digest)

    def statfs(self) -> os.statvfs_result:
        return self.space.statvfs()

    # -- changes made by other mounts of a shared manifest (its change feed) --------------

    def changed_elsewhere(self, changes: Iterable[Change]) -> None:
        """Rows another mount changed: forget what this mount cached of them and tell the
        kernel (queued: this runs outside any request). Records and per-user answers are
        dropped whole: they summarize many rows."""
        removed: list[BlobRef] = []
        for change in changes:
            if change.what == "tags":  # read from the manifest at each call; records below
                self.cache.drop(change.id)
                continue
            if change.what == "blob":
                removed.append(BlobRef(change.id, Digest(change.name or ""), 0, 0, "raw"))
            elif change.what == "damage":
                self.forget_everything()  # every artifact holding it reads or fails anew
            else:
                self._node_changed_elsewhere(change)
        if removed:
            self.blobs_removed(removed)
        self.virtual.forget()

    def _node_changed_elsewhere(self, change: Change) -> None:
        ino = change.id
        self.cache.drop(ino)
        self.opened.told.pop(ino, None)
        self.kernel.inode_changed(ino)
        if change.what == "changed":
            return  # same name, same place: listings and the kernel's entry stand
        if change.what == "removed":
            opened = self.opened.inode(ino)
            if opened is not None and not opened.unlinked:
                # As an unlink here: open descriptors read on; a write in progress here has
                # nothing left to publish to.
                opened.unlinked = True
                opened.node = replace(opened.node, nlink=0)
        places = [(change.parent_id, change.name), (change.old_parent_id, change.old_name)]
        for parent, name in places:
            if parent is None or name is None:
                continue
            self.cache.drop_entry(parent, name)
            self.directory_changed(parent)
            # A name gone, or one that came where the kernel remembers its absence.
            self.kernel.entry_gone(parent, name)

    def forget_everything(self) -> None:
        """Every cached node, listing, record and page-cache promise may be stale (the change
        feed reconnected or may have missed rows): forget them. The kernel's entries and
        attributes of runs/ expire within a second on a shared manifest (cafs.ops); pages are
        kept only for versions it is told of again (OpenFiles.open)."""
        self.cache.clear()
        self.pages.clear()
        self.virtual.forget()
        self.opened.forget_told()
        self.opened.idle.clear()
