"""Who may learn which facts about sharing: refcounts and the root hash of a sealed run.

Owns: the two rules, shared by the xattrs (cafs.xattrs) and the records (cafs.virtual) so both
show a caller the same, and the cache of per-user answers about sealed runs. Must not decide
anything else about access: the kernel checks permissions (default_permissions).
"""

from __future__ import annotations

import os

from cafs.lru import Lru
from cafs.manifest import Manifest
from cafs.model import Caller, Node

# Whether a user may read every file of a sealed run (so may see its root hash), per run.
ROOT_READERS_CACHED = 1024


class Visibility:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        # The user who mounted: blobs/ is theirs, so they may read every content anyway.
        self.owner_uid = os.geteuid()
        # (execution, sealed_ns, uid, gid) -> may that user read every file of the run.
        self._root_readers: Lru[tuple[int, int, int, int], bool] = Lru(ROOT_READERS_CACHED)

    def forget(self) -> None:
        """Modes or owners may have changed elsewhere (another host's mount)."""
        self._root_readers.clear()

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
