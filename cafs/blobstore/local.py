"""The local-directory blob store: the `Blobs` implementation of the embedded default.

Layout: `blobs/ab/<64 hex>` (256 shard directories, made when the store is created) and
`tmp/` for the temps of writes in progress.

Owns: everything under `<store>/blobs/` and `<store>/tmp/` — naming temps, the choice of
encoding at publish (zstd when worthwhile, else raw+xxh64), the durable publish (fsync, rename,
fsync of the shard directory), opening a blob with its encoding's reader, and listing, sizing
and deleting blob files. Must not know about paths in the namespace, the manifest, or FUSE;
the formats themselves live in their modules (raw, raw_xxh64, zstd_seekable).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cafs import crashpoints
from cafs.blobstore.api import BlobReader, Blobs, Encoding, digest_of_reader
from cafs.blobstore.fileio import fsync_dir
from cafs.blobstore.raw import RawReader
from cafs.blobstore.raw_xxh64 import CheckedRawReader
from cafs.blobstore.space import SpaceGuard
from cafs.blobstore.temp import MemoryBudget, TempBlob
from cafs.blobstore.zstd_seekable import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    FrameCache,
    SeekableWriter,
    ZstdReader,
    new_frame_cache,
)
from cafs.digest import Digest, is_digest
from cafs.errors import Corrupt
from cafs.model import BlobRef, StoredBlob


def _find_syncfs() -> Callable[[int], int] | None:
    try:
        return cast("Callable[[int], int]", ctypes.CDLL(None, use_errno=True).syncfs)
    except (OSError, AttributeError):
        return None


_libc_syncfs = _find_syncfs()
# Blob files up to this size are read whole into the page cache when opened (see open).
WHOLE_BLOB_AHEAD = 1 << 20

QUARANTINE_DIR = "quarantine"  # beside blobs/: damaged blob files, kept for forensics


def reader_of_fd(fd: int, digest: Digest, encoding: Encoding, frame_cache: FrameCache, *,
                 from_disk: bool = False) -> BlobReader:
    """The reader of a blob file open at `fd` (which it takes over, closed on failure too).
    `from_disk`: no frame decompressed earlier is used (see LocalBlobStore.open)."""
    try:
        if encoding is Encoding.RAW_CHECKED:
            return CheckedRawReader(fd, digest)
        if encoding is Encoding.ZSTD:
            if from_disk:
                return ZstdReader(fd, digest, new_frame_cache(0), read_ahead=False)
            return ZstdReader(fd, digest, frame_cache)
        return RawReader(fd)
    except BaseException:
        os.close(fd)
        raise


class LocalBlobStore:
    """Immutable blobs by digest in a local directory, plus the temp files that become them."""

    remote = False  # blob calls are local file I/O: small ones may run on the event loop
    where = "blobs/"

    def __init__(
        self,
        root: Path,
        *,
        level: int = DEFAULT_LEVEL,
        frame_size: int = DEFAULT_FRAME_SIZE,
        frame_cache_bytes: int = 64 << 20,
    ) -> None:
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.frame_cache: FrameCache = new_frame_cache(frame_cache_bytes)
        self.space = SpaceGuard(root)
        self._zstd = SeekableWriter(level, frame_size)
        self._temp_serial = 0
        # True: every publish fsyncs its blob and the shard directory (admin commands on an
        # unmounted store). A daemon with a group sync sets it False: close() then needs only
        # the page cache (it survives a dead daemon), fsync() syncs the one blob (sync_blob),
        # and the group sync (sync_all) bounds what power loss can take.
        self.sync_each_publish = True
        self.memory = MemoryBudget()  # what in-memory temps hold, in all

    # -- set-up ---------------------------------------------------------------------------

    def create_layout(self) -> None:
        for directory in (self.blob_dir, self.tmp_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        for shard in range(256):
            (self.blob_dir / f"{shard:02x}").mkdir(mode=0o700, exist_ok=True)

    def clean_tmp(self) -> int:
        """Remove every temp file: writes that were in progress when the daemon stopped."""
        removed = 0
        # tmp/ itself is opened without following a symlink (cafs.store refuses a store where
        # it is one; this holds even if the check was skipped), and emptied through that
        # descriptor: start-up must never empty a directory a symlink points at.
        fd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    # Never follow a planted symlink; remove the link itself.
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
        finally:
            os.close(fd)
        return removed

    # -- writing --------------------------------------------------------------------------

    def new_temp(self, *, streaming: bool = False) -> TempBlob:
        """A new temp. `streaming` (a write through the mount): kept in memory while small
        (see MemoryBudget), and its bytes compressed into zstd frames while they arrive (see
        FrameStream), each within its bounds."""
        self._temp_serial += 1
        name = f"w-{os.getpid()}-{self._temp_serial}-{os.urandom(4).hex()}"
        path = self.tmp_dir / name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        if streaming:  # in memory until it grows (its file is made when it spills)
            return TempBlob(-1, path, self.space, self._zstd.new_stream(), memory=self.memory)
        return TempBlob(os.open(path, flags, 0o600), path, self.space)

    def path_of(self, digest: Digest) -> Path:
        return self.blob_dir / digest[:2] / digest

    def has(self, digest: Digest) -> bool:
        return os.path.lexists(self.path_of(digest))

    def read_ahead(self, opened: BlobRef, following: Iterable[BlobRef]) -> None:
        """Nothing to bring in: the kernel reads ahead in the blob files themselves."""

    def publish(self, temp: TempBlob, digest: Digest) -> StoredBlob:
        """Turn a finished temp into the blob `digest`, durably.

        Compresses when worthwhile, fsyncs, renames into place and fsyncs the shard directory,
        so that a manifest row written afterwards never points at a partial blob. The temp's
        file descriptor stays open (readers may still use it); the caller discards the temp.
        """
        final = self.path_of(digest)
        chosen, encoding, compressed = self.encode(temp)
        try:
            chosen.materialize()  # a small raw content goes from memory to its file here
            # Its mtime from the precise clock, not the kernel's coarse one (a tick, ~4 ms,
            # behind): it stays before the row this publish commits and after every row
            # committed before, so fsck can tell an orphan written after the manifest's last
            # commit (possible lost metadata) from older garbage.
            now = time.time_ns()
            os.utime(chosen.fd, ns=(now, now))
            if self.sync_each_publish:
                os.fsync(chosen.fd)
            crashpoints.reached("after-temp-fsync")
            stored_size = os.fstat(chosen.fd).st_size
            os.rename(chosen.path, final)
            if self.sync_each_publish:
                fsync_dir(final.parent)
            crashpoints.reached("after-blob-rename")
        finally:
            if compressed is not None:
                compressed.discard()
        return StoredBlob(digest, temp.size, stored_size, encoding)

    def encode(self, temp: TempBlob) -> tuple[TempBlob, Encoding, TempBlob | None]:
        """The temp holding the blob's stored bytes (the compressed one when worthwhile, else
        `temp` with its block sums appended), their encoding, and the compressed temp the
        caller discards (None if raw)."""
        compressed = self._zstd.compress_if_worthwhile(temp, self.new_temp)
        if compressed is not None:
            return compressed, Encoding.ZSTD, compressed
        temp.append_block_sums()  # raw+xxh64 is written in place
        return temp, Encoding.RAW_CHECKED, None

    def sync_blob(self, digest: Digest) -> None:
        """Make one blob file and its name durable (an fsync through the mount)."""
        path = self.path_of(digest)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def sync_all(self) -> None:
        """Make every blob file written so far durable, with one syncfs(2) of the store's
        filesystem (a group sync: what ext4's commit interval is to its files)."""
        fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc_syncfs is None or _libc_syncfs(fd) != 0:
                os.sync()  # no syncfs: every filesystem, the same guarantee
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------

    def open(self, digest: Digest, encoding: str, *, size: int | None = None,
             from_disk: bool = False) -> BlobReader:
        """`from_disk`: every byte comes from the file and is checked now, none from the
        frames other readers decompressed (and checked) before: what a check of the file
        (fsck) must see."""
        try:
            known = Encoding(encoding)
        except ValueError:
            raise Corrupt(f"blob {digest}: unknown encoding {encoding!r}") from None
        try:
            fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise Corrupt(f"blob {digest} is missing") from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise  # the daemon is short of resources; the blob is fine
            raise Corrupt(f"blob {digest}: {exc.strerror}") from exc
        # A small blob is asked for whole before its footer is read: one disk read brings
        # footer, sums and content, and the READ that opened it (the first) is answered from
        # the page cache on the event loop, with no hop to a worker thread.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size <= WHOLE_BLOB_AHEAD:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return reader_of_fd(fd, digest, known, self.frame_cache, from_disk=from_disk)

    # -- administration -------------------------------------------------------------------

    def claim(self, store_id: str | None, *, create: bool) -> None:
        """blobs/ is in the store's own directory: no other store can name it."""

    def has_blob_files(self) -> bool:
        """True if any blob file exists (stops at the first one found)."""
        try:
            shards = sorted(os.listdir(self.blob_dir))
        except FileNotFoundError:
            return False
        for shard in shards:
            try:
                with os.scandir(self.blob_dir / shard) as entries:
                    if any(is_digest(entry.name) for entry in entries):
                        return True
            except NotADirectoryError:
                continue
        return False

    def iter_digests(self) -> Iterator[Digest]:
        """Every blob file's digest, shard by shard. Files not named like a digest are skipped."""
        for shard in sorted(os.listdir(self.blob_dir)):
            shard_dir = self.blob_dir / shard
            if not shard_dir.is_dir():
                continue
            for name in os.listdir(shard_dir):
                if is_digest(name) and name.startswith(shard):
                    yield Digest(name)

    def blob_files(self) -> Iterator[tuple[Digest, int, int]]:
        """Every blob file: its digest, stored size and mtime (ns)."""
        for digest in self.iter_digests():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                info = os.lstat(self.path_of(digest))
                yield digest, info.st_size, info.st_mtime_ns

    def quarantine(self, digest: Digest) -> str | None:
        """Move a blob file whose bytes are wrong to <store>/quarantine/ (kept for forensics,
        out of every read path); its name there, None if there was no file."""
        target = self.blob_dir.parent / QUARANTINE_DIR
        target.mkdir(mode=0o700, exist_ok=True)
        name = f"{digest}.{time.time_ns()}"
        try:
            os.rename(self.path_of(digest), target / name)
        except FileNotFoundError:
            return None
        return name

    def stored_size(self, digest: Digest) -> int:
        return os.lstat(self.path_of(digest)).st_size

    def compute_digest(self, digest: Digest, encoding: str) -> tuple[Digest, int]:
        """Re-hash a blob's uncompressed bytes (checks frame checksums on the way)."""
        return digest_of_reader(self.open(digest, encoding, from_disk=True))

    def delete(self, digest: Digest) -> None:
        os.unlink(self.path_of(digest))

    def deleting(self, digests: list[Digest]) -> None:
        """Nothing to do: deletes run on the event loop, between publishes."""

    def deleted(self, digests: list[Digest]) -> None:
        """Nothing to do (see deleting)."""


if TYPE_CHECKING:  # mypy holds the implementation to the protocol, member by member
    _IMPLEMENTS: type[Blobs] = LocalBlobStore
