"""Who may learn which facts about sharing, and which directories a record sums for whom:
refcounts, the root hash of a sealed run, the totals of directories a reader may not list.

Owns: the three rules, shared by the xattrs (cafs.xattrs) and the records (cafs.virtual) so both
show a caller the same, the cache of per-user answers about sealed runs and the cache of which
directories below a record's some user may not list. Must not decide anything else about
access: the kernel checks permissions (default_permissions).
"""

from __future__ import annotations

import os

from cafs.lru import Lru
from cafs.manifest import Manifest
from cafs.manifest_api import RestrictedDir
from cafs.model import Caller, Node

# Whether a user may read every file of a sealed run (so may see its root hash), per run.
ROOT_READERS_CACHED = 1024
# Directories some user may not list, below the records' directories: at most this many rows
# in all, ~1.5 MB (a directory holding more is walked again for each reader's first record).
RESTRICTED_CACHED = 16384
# Readers' answers (which directories below a record's they may not list), per directory.
UNLISTED_CACHED = 4096

# A directory's restricted sub-directories, as of the manifest's count of changes then.
CachedRestricted = tuple[int, tuple[RestrictedDir, ...]]


def may_list(mode: int, uid: int, gid: int, caller: Caller) -> bool:
    """Whether the mode lets `caller` read and search a directory (list it and stat what it
    holds). Only the primary group is known, so where it is not the directory's group both
    its group and other bits must allow (the caller may be in that group, whose bits apply):
    the rule of Manifest.readable_by."""
    if uid == caller.uid:
        return (mode >> 6) & 5 == 5
    if gid == caller.gid:
        return (mode >> 3) & 5 == 5
    return mode & 5 == 5 and (mode >> 3) & 5 == 5


def _rows(entry: CachedRestricted) -> int:
    return len(entry[1]) + 1


class Visibility:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        # The user who mounted: blobs/ is theirs, so they may read every content anyway.
        self.owner_uid = os.geteuid()
        # (execution, sealed_ns, uid, gid) -> may that user read every file of the run.
        self._root_readers: Lru[tuple[int, int, int, int], bool] = Lru(ROOT_READERS_CACHED)
        # directory -> its restricted sub-directories: the same for every reader, so one walk
        # serves them all until the manifest changes.
        self._restricted: Lru[int, CachedRestricted] = Lru(RESTRICTED_CACHED, size=_rows)
        # (directory, uid, gid) -> (manifest.changes, what that reader may not list below it):
        # a stat and a read of a record ask twice, and the answer costs a pass over the
        # restricted directories.
        self._unlisted: Lru[tuple[int, int, int], tuple[int, tuple[int, ...]]] = Lru(
            UNLISTED_CACHED)

    def forget(self) -> None:
        """Modes or owners may have changed elsewhere (another host's mount)."""
        self._root_readers.clear()
        self._restricted.clear()
        self._unlisted.clear()

    def unlisted_below(self, directory: Node, caller: Caller | None) -> tuple[int, ...]:
        """The directories below `directory` that `caller` may not list, outermost only (none
        inside another), in id order: what a record sums for them leaves these out, names
        and totals, as `ls` and `du` cannot see into them either. () for whoever sees sharing
        (root and the user who mounted read every content anyway) and where none is closed.
        Two readers with the same answer read the same record."""
        if caller is None or self.sees_sharing(caller):
            return ()
        key = (directory.ino, caller.uid, caller.gid)
        changes = self.manifest.changes
        known = self._unlisted.get(key)
        if known is not None and known[0] == changes:
            return known[1]
        unlisted = self._outermost_closed(self._restricted_below(directory.ino), caller)
        self._unlisted.put(key, (changes, unlisted))
        return unlisted

    @staticmethod
    def _outermost_closed(restricted: tuple[RestrictedDir, ...],
                          caller: Caller) -> tuple[int, ...]:
        """Those of `restricted` that `caller` may not list and that are not inside another
        such, in id order."""
        by_ino = {entry.ino: entry for entry in restricted}
        closed = {entry.ino: not may_list(entry.mode, entry.uid, entry.gid, caller)
                  for entry in restricted}

        def outermost(entry: RestrictedDir) -> bool:
            fence = entry.fence  # every fence is itself restricted, so in by_ino
            while fence is not None:
                if closed[fence]:
                    return False
                fence = by_ino[fence].fence
            return True

        return tuple(entry.ino for entry in restricted if closed[entry.ino] and outermost(entry))

    def _restricted_below(self, ino: int) -> tuple[RestrictedDir, ...]:
        changes = self.manifest.changes
        cached = self._restricted.get(ino)
        if cached is not None and cached[0] == changes:
            return cached[1]
        restricted = tuple(self.manifest.restricted_dirs(ino))
        self._restricted.put(ino, (changes, restricted))
        return restricted

    def sees_sharing(self, caller: Caller | None) -> bool:
        """Whether `caller` may learn which contents other artifacts hold as well: refcounts,
        the unique bytes of records. Those answer "does anyone store this?" about content the
        caller may be unable to read (write a guess, ask whether it is shared), so only root
        and the user who mounted — who read every content through blobs/ anyway — get them.
        None is the daemon itself (and core tests)."""
        return caller is None or caller.uid in (0, self.owner_uid)

    def shows_root(self, execution: Node, caller: Caller | None) -> bool:
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
            self._root_readers.put(key, shown)
        return shown
