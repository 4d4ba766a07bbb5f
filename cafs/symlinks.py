"""Symbolic links inside layers, and the refusal of hard links.

Owns: making a symlink (its target stored as a blob, its first version recorded with the node in
one manifest transaction), reading a target back (readlink, with a bounded cache), and the one
answer to link(2): EPERM, explained once in the daemon's log. Where a symlink may be made is the
namespace's rule for files (cafs.namespace.Namespace.place_new): a layer or a directory inside
one; elsewhere the same errno as a file gets. Must not import pyfuse3 or trio.

Why blobs: a symlink's target is versioned exactly as a file's bytes are, so dedup, history
(`cafs log`), records, the root hash, bundles, fsck and gc handle symlinks with the code they
have for files; the node's kind is what tells a target from content.

Concurrency rule: synchronous, no await between writing the target's blob and the manifest
commit, so gc (which runs between requests on the same loop) can never remove that blob in
between; the target is at most 4095 bytes, written inline like any small publish.
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

from cafs.blobstore import Blobs
from cafs.digest import Digest
from cafs.errors import Damaged, InvalidArgument, NotFound, NotPermitted
from cafs.lru import Lru
from cafs.manifest import Manifest
from cafs.model import Attr, Caller, Kind, StoredBlob
from cafs.namespace import ROW_COST, Namespace
from cafs.rules import check_target

log = logging.getLogger(__name__)

# Targets read back, by content: the kernel asks for a target at every path walk through the
# link (FUSE caches none by default). 1 MiB holds at least 256 of the longest.
TARGET_CACHE_BYTES = 1 << 20


class Symlinks:
    def __init__(self, tree: Namespace, manifest: Manifest, blobs: Blobs) -> None:
        self.tree = tree
        self.manifest = manifest
        self.blobs = blobs
        self.targets: Lru[str, bytes] = Lru(TARGET_CACHE_BYTES, size=len)
        self._link_explained = False

    def symlink(self, parent_ino: int, raw_name: bytes, target: bytes, caller: Caller) -> Attr:
        parent, name, _ = self.tree.place_new(parent_ino, raw_name, want_dir=False)
        check_target(target)
        self.tree.space.take_metadata(ROW_COST)
        stored = self._store(target)
        node = self.manifest.add_symlink(parent.ino, name, stored, uid=caller.uid,
                                         gid=caller.gid, now_ns=time.time_ns())
        self.targets.put(node.blob.digest if node.blob else stored.digest, target)
        self.tree.directory_changed(parent.ino)
        self.tree.cache.put(node)
        return self.tree.attr(node)

    def _store(self, target: bytes) -> StoredBlob:
        """The target's blob: found (dedup) or written durably before the manifest names it."""
        temp = self.blobs.new_temp()
        try:
            temp.write(0, target)
            digest = temp.digest()
            known = self.manifest.blob(digest)
            if known is not None and not known.damaged and self.blobs.has(digest):
                return StoredBlob(digest, known.size, known.stored_size, known.encoding,
                                  fresh=False)
            return self.blobs.publish(temp, digest)
        finally:
            temp.discard()

    def readlink(self, ino: int) -> bytes:
        node = self.tree.node(ino)
        if node.kind is not Kind.SYMLINK:
            raise InvalidArgument("not a symlink")
        blob = node.blob
        if blob is None:  # never: a symlink is made with its first version
            raise NotFound(f"symlink {ino} has no target")
        cached = self.targets.get(blob.digest)
        if cached is not None:
            return cached
        if blob.damaged:
            raise Damaged(f"the target of symlink {ino} ({blob.digest}) is damaged")
        reader = self.blobs.open(Digest(blob.digest), blob.encoding)
        try:
            target = reader.read(0, blob.size)
        finally:
            reader.close()
        self.targets.put(blob.digest, target)
        return target

    def link(self) -> NoReturn:
        """Hard links: EPERM (see the README, "Hard links"). Said once per daemon in its log,
        so whoever reads it after a failed `tar x` or `cp -a` learns why and what to do."""
        if not self._link_explained:
            self._link_explained = True
            log.warning("hard link refused (EPERM): an artifact has one path and one history, "
                        "so cafs keeps no hard links; a copy costs nothing (identical content "
                        "is stored once): use cp without --preserve=links, rsync without -H, "
                        "tar --hard-dereference when creating an archive (README: Hard links)")
        raise NotPermitted("hard links are not supported")
