"""Idle readers of recently read blobs, kept open for the next open of the same content.

Owns: a bounded set of readers nobody uses now, by digest; closing the ones it evicts or drops.
Opening a blob costs an open, an fstat and a pread of its footer or seek table: a file read again
and again (a loader that reopens its shards) pays that once. A reader checks every read against
its block or frame checksums, so one kept open across a change of the file on disk (damage,
quarantine) still gives Corrupt, never wrong bytes. Must not open blobs itself (the caller does)
or know why a digest is dropped.
"""

from __future__ import annotations

from collections import OrderedDict

from cafs.blobstore.api import BlobReader


class IdleReaders:
    """At most `capacity` idle readers, least recently returned closed first. Each holds a
    descriptor: the caller counts `len()` against its descriptor budget and calls `shrink` when
    it needs them back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._idle: OrderedDict[str, BlobReader] = OrderedDict()

    def take(self, digest: str) -> BlobReader | None:
        """The idle reader of `digest`, now the caller's; None if there is none."""
        return self._idle.pop(digest, None)

    def give(self, digest: str, reader: BlobReader) -> None:
        """The caller is done with `reader`: keep it (or close it if one is kept already)."""
        if self.capacity <= 0 or digest in self._idle:
            reader.close()
            return
        reader.idle()
        self._idle[digest] = reader
        self.shrink(self.capacity)

    def shrink(self, keep: int) -> int:
        """Close idle readers until at most `keep` are left; returns how many were closed."""
        closed = 0
        while len(self._idle) > max(0, keep):
            _, reader = self._idle.popitem(last=False)
            reader.close()
            closed += 1
        return closed

    def drop(self, digest: str) -> None:
        reader = self._idle.pop(digest, None)
        if reader is not None:
            reader.close()

    def clear(self) -> None:
        self.shrink(0)

    def __len__(self) -> int:
        return len(self._idle)
