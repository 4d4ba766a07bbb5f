"""The blob store's interface: what the layers above (vfs, store, admin, fsck, bundle) may ask
of any blob store, whatever holds the blobs.

Owns: the `Blobs` and `BlobReader` protocols, the `Encoding` names the manifest records, and
`read_chunks`, the one way to stream a reader's bytes. Must not name files, directories or any
other detail of one implementation: a second implementation (S3 with a local verified cache)
sits behind the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from cafs.blobstore.fileio import CHUNK
from cafs.digest import Digest, digest_of_chunks
from cafs.model import BlobRef, StoredBlob

if TYPE_CHECKING:
    from pathlib import Path

    from cafs.blobstore.space import SpaceGuard
    from cafs.blobstore.temp import TempBlob


class Encoding(StrEnum):
    """How a blob's bytes are stored. The value is the text the manifest's `blobs.encoding`
    column holds (its CHECK lists the same three), so a member compares and stores as that
    text. Each has its module, holding its writer, its reader and its format."""

    RAW = "raw"  # cafs.blobstore.raw: legacy, read-only
    RAW_CHECKED = "raw+xxh64"  # cafs.blobstore.raw_xxh64
    ZSTD = "zstd"  # cafs.blobstore.zstd_seekable


class BlobReader(Protocol):
    """Random access to one blob's uncompressed bytes. Reads may run in several threads at
    once (the daemon reads in worker threads); close() only once none runs."""

    size: int  # uncompressed bytes

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end); Corrupt if they fail
        their checksum."""
        ...

    def read_nowait(self, offset: int, length: int) -> bytes | memoryview | None:
        """As read, if the bytes are at hand (page cache, decompressed frames, a stream's
        chunks) so no wait for the disk or decompression is needed; else None: read() them in
        a worker thread. A memoryview (a read-only view of a reader's buffer, which it reuses
        only once the view is gone) is meant to be handed on, not kept."""
        ...

    def idle(self) -> None:
        """No file reads through it now (it is kept for the next open): let go of what only
        reads in progress need (read-ahead, a stream's buffers); its descriptor stays."""
        ...

    def close(self) -> None: ...


def read_chunks(reader: BlobReader, start: int = 0) -> Iterator[bytes]:
    """The reader's bytes from `start` in pieces of at most CHUNK; stops early only if the
    blob is shorter than its size says (the caller compares what it got)."""
    offset = start
    while offset < reader.size:
        chunk = reader.read(offset, CHUNK)
        if not chunk:
            return
        yield chunk
        offset += len(chunk)


def digest_of_reader(reader: BlobReader) -> tuple[Digest, int]:
    """The SHA-256 and length of all the reader's bytes (checked on the way); closes it."""
    try:
        return digest_of_chunks(read_chunks(reader))
    finally:
        reader.close()


class Blobs(Protocol):
    """Immutable blobs named by the SHA-256 of their uncompressed bytes, and the temps that
    become them. A blob is written once (publish) and never changed; reads check checksums,
    so damage gives Corrupt (EIO), never wrong bytes."""

    # Space accounting on the filesystem that temps (and the manifest) are written to.
    space: SpaceGuard
    # Where temps live (always local, in the store directory): bundles spool there too.
    tmp_dir: Path
    # True: every publish makes its blob durable before it returns (see LocalBlobStore).
    sync_each_publish: bool
    # True: blob calls (publish, has, delete, listing, reading what is not cached) go over the
    # network and may block for seconds: the daemon runs them in worker threads.
    remote: bool
    # Where the blobs live, as the store records it (`blobs/`, `s3://bucket/prefix/`): a store
    # is never opened with its blobs looked for somewhere else.
    where: str

    def create_layout(self) -> None:
        """Make what a new store needs (directories, the cache)."""
        ...

    def new_temp(self, *, streaming: bool = False) -> TempBlob:
        """An empty temp for a write in progress; the caller discards it."""
        ...

    def publish(self, temp: TempBlob, digest: Digest) -> StoredBlob:
        """Store a finished temp as the blob `digest` before it returns (a manifest row
        written afterwards never points at a partial blob): fsynced, unless the caller makes it
        durable later (sync_blob, sync_all). The temp stays open."""
        ...

    def sync_blob(self, digest: Digest) -> None:
        """Make one blob durable against power loss."""
        ...

    def sync_all(self) -> None:
        """Make every blob written so far durable against power loss."""
        ...

    def open(self, digest: Digest, encoding: str, *, size: int | None = None) -> BlobReader:
        """A reader of the blob; Corrupt if it is missing or unreadable. `size` (the
        uncompressed size the manifest records) lets a remote store open without fetching:
        it never downloads then, its reader's read() does."""
        ...

    def read_ahead(self, opened: BlobRef, following: Iterable[BlobRef]) -> None:
        """A file of content `opened` was just opened for reading; `following` are the
        contents of the files after it in its directory (a lazy iterable). A remote store whose
        cache lacks `opened` starts bringing it and the first few of `following` into its cache
        in the background (bounded), so the reads to come wait less for downloads; else (and on
        a local store) it does nothing and never looks at `following`. Never waits for the
        network, never fails."""
        ...

    def has(self, digest: Digest) -> bool: ...

    def delete(self, digest: Digest) -> None:
        """Remove the blob; FileNotFoundError if there is none."""
        ...

    def deleting(self, digests: list[Digest]) -> None:
        """These blobs are about to be deleted (each by delete(), maybe in another thread):
        until then, has() says False and a publish of one waits, then stores it anew."""
        ...

    def deleted(self, digests: list[Digest]) -> None:
        """The deletes announced by deleting() are over (done, or given up)."""
        ...

    def stored_size(self, digest: Digest) -> int:
        """Bytes the blob takes as stored (encoded); FileNotFoundError if missing."""
        ...

    def compute_digest(self, digest: Digest, encoding: str) -> tuple[Digest, int]:
        """Re-hash the blob's uncompressed bytes: (their SHA-256, their length)."""
        ...

    def iter_digests(self) -> Iterator[Digest]:
        """Every stored blob's digest, whether the manifest knows it or not."""
        ...

    def blob_files(self) -> Iterator[tuple[Digest, int, int]]:
        """Every stored blob: (digest, stored size, when it was stored in ns)."""
        ...

    def quarantine(self, digest: Digest) -> str | None:
        """Move a blob whose bytes are wrong out of every read path, kept for forensics; the
        name it is kept under, None if there was none."""
        ...

    def has_blob_files(self) -> bool:
        """True if any blob is stored (stops at the first one found)."""
        ...

    def claim(self, store_id: str | None, *, create: bool) -> None:
        """Shared blob storage belongs to one store (its id: every host mounting that store
        gives the same): the first opener records `store_id` there (`create`), a later one
        with another id (or with none yet: a new store) is refused with StoreError. Storage
        only one store can see (blobs/) claims nothing."""
        ...

    def clean_tmp(self) -> int:
        """Remove every temp: writes in progress when the daemon stopped. Returns how many."""
        ...
