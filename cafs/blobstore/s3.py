"""Blobs on S3-compatible storage, read through a verified local cache: the `Blobs`
implementation for stores whose blobs live in a bucket.

Layout in the bucket, under the location's prefix: `blobs/<64 hex>` (exactly the bytes the
local store's blob file holds: the same encodings, chosen the same way) and
`quarantine/<64 hex>.<ns>` (damaged objects fsck --repair moved aside). Temps stay local
(`<store>/tmp/`, as in LocalBlobStore); the cache is a directory of whole blob files
(cafs.blobstore.cache).

Owns: publishing (encode as the local store does, then one PUT with `If-None-Match: *`: a
412 means someone stored the content already, which is fine), filling the cache (download
to a temp in the cache directory, re-hash it against the digest with the encoding's own
checks, rename into place), readers that never download in `open` or `read_nowait`, only in
`read` (worker threads), and that fetch a damaged cache file again once before they give
Corrupt; read-ahead (a file opened: its blob and the next files' fetched in background threads,
bounded). Must not know the manifest, paths in the namespace or FUSE.

Every call that talks to the service may block for seconds (see s3_objects for the bounds):
`remote = True` tells the daemon to make them in worker threads. `has()` answers from the
cache when it can, else with one quick HEAD (it is asked on the event loop, at publish).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cafs import crashpoints
from cafs.blobstore.api import BlobReader, Blobs, Encoding, digest_of_reader, read_chunks
from cafs.blobstore.cache import BlobCache
from cafs.blobstore.local import WHOLE_BLOB_AHEAD, LocalBlobStore, reader_of_fd
from cafs.blobstore.raw_xxh64 import BlockSums, checked_raw_size
from cafs.blobstore.s3_objects import Exists, S3Location, S3Objects, Unavailable
from cafs.blobstore.space import SpaceGuard
from cafs.blobstore.temp import TempBlob
from cafs.blobstore.zstd_seekable import (
    DEFAULT_LEVEL,
    FrameCache,
    SeekTable,
    StreamCheck,
    new_frame_cache,
)
from cafs.digest import Digest, digest_of_chunks, is_digest
from cafs.errors import Corrupt, StoreError
from cafs.model import BlobRef, StoredBlob

BLOBS = "blobs/"
QUARANTINE = "quarantine/"
OWNER = "store-id"  # the id of the store whose blobs these are (see claim)
ENCODING_KEY = "cafs-encoding"  # user metadata: the object's encoding
DEFAULT_CACHE_SIZE = 10 << 30
RETRY_AFTER = 0.5  # seconds after a failed fetch in which a read of it fails at once
HEAD_PAUSE = 5.0  # seconds has() answers False without asking after a HEAD failed
# Read-ahead (read_ahead): a file opened whose blob the cache lacks is downloaded at once in the
# background, with the blobs of up to this many files after it in its directory...
READ_AHEAD_FILES = 4
READ_AHEAD_THREADS = 2  # ...by this many threads (GETs in parallel besides the readers' own)...
READ_AHEAD_SHARE = 4  # ...at most capacity // this of stored bytes queued or downloading...
READ_AHEAD_MAX = 256 << 20  # ...and never more than this...
READ_AHEAD_QUEUED = 16  # ...nor more blobs than this (opens faster than the downloads).

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CACHE_SIZE", "S3BlobStore", "S3Location", "Unavailable"]


def _known(digest: Digest, encoding: str) -> Encoding:
    try:
        return Encoding(encoding)
    except ValueError:
        raise Corrupt(f"blob {digest}: unknown encoding {encoding!r}") from None


class S3BlobStore:
    """Immutable blobs by digest in a bucket, with a local cache of whole blob files."""

    remote = True

    def __init__(self, root: Path, location: S3Location, *, cache_dir: Path | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE, level: int = DEFAULT_LEVEL,
                 frame_cache_bytes: int = 64 << 20, objects: S3Objects | None = None) -> None:
        # Temps, their encoding and space accounting are the local store's, unchanged.
        self._local = LocalBlobStore(root, level=level, frame_cache_bytes=0)
        self.tmp_dir = self._local.tmp_dir
        self.space: SpaceGuard = self._local.space
        self.memory = self._local.memory
        self.frame_cache: FrameCache = new_frame_cache(frame_cache_bytes)
        self.location = location
        self.where = f"s3://{location.bucket}/{location.prefix}"
        self.objects = objects or S3Objects(location)
        self.cache = BlobCache(cache_dir or root / "cache", cache_size)
        self.cache.load()
        # One lock per digest being fetched (or waited for), with how many hold or wait for
        # it: removed with the last, so this holds only fetches in progress.
        self._fetching: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._fetching_lock = threading.Lock()
        # Digests gc chose to delete whose objects are not gone yet (see deleting).
        self._deleting: set[str] = set()
        self._deletes = threading.Condition()
        self._head_failed_at = -1e9  # when has()'s quick HEAD last failed (monotonic)
        # Digests whose last fetch failed for want of the service: when, and how.
        self._failed: dict[str, tuple[float, Unavailable]] = {}
        # Read-ahead: the digests queued or downloading (their stored bytes, in all), and the
        # queue its threads (daemon threads, started at the first use) take them from.
        self._ahead: dict[str, int] = {}
        self._ahead_bytes = 0
        self._ahead_lock = threading.Lock()
        self._ahead_queue: queue.SimpleQueue[tuple[Digest, Encoding, int]] = queue.SimpleQueue()
        self._ahead_threads: list[threading.Thread] = []

    # A PUT that returned is stored by the service: nothing to make durable later.
    @property
    def sync_each_publish(self) -> bool:
        return True

    @sync_each_publish.setter
    def sync_each_publish(self, value: bool) -> None:
        self._local.sync_each_publish = value  # temps only

    def create_layout(self) -> None:
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        self.cache.load()

    def clean_tmp(self) -> int:
        return self._local.clean_tmp()

    def new_temp(self, *, streaming: bool = False) -> TempBlob:
        return self._local.new_temp(streaming=streaming)

    # -- writing --------------------------------------------------------------------------

    def publish(self, temp: TempBlob, digest: Digest) -> StoredBlob:
        """Encode the temp as the local store would and upload it unless the bucket has it;
        then it enters the cache (a read after close needs no download). Unavailable (EIO)
        if the service fails: nothing is visible, the caller's manifest is not touched."""
        self._wait_for_delete(digest)
        chosen, encoding, compressed = self._local.encode(temp)
        try:
            chosen.materialize()
            stored_size = os.fstat(chosen.fd).st_size
            crashpoints.reached("after-temp-fsync")  # the encoded temp, not yet uploaded
            try:
                self.objects.put_new(BLOBS + digest, chosen.fd, stored_size,
                                     {ENCODING_KEY: str(encoding)})
            except Exists:  # stored already (another writer, an orphan, our own retry)
                try:
                    head = self.objects.head(BLOBS + digest)
                except FileNotFoundError:  # a 412 for no object (or deleted since): once more
                    self.objects.put_new(BLOBS + digest, chosen.fd, stored_size,
                                         {ENCODING_KEY: str(encoding)}, replace=True)
                    head = self.objects.head(BLOBS + digest)
                try:
                    theirs = Encoding(head.get("Metadata", {}).get(ENCODING_KEY, encoding))
                except ValueError:  # not one of ours: damaged, replaced below
                    theirs = None
                if theirs is None or theirs != encoding or head["ContentLength"] != stored_size \
                        or head.get("ETag", "").strip('"') != _md5_of(chosen.fd):
                    if theirs is not None and self._sound(digest, theirs):  # encoded otherwise
                        return StoredBlob(digest, temp.size, int(head["ContentLength"]), theirs)
                    # Damaged or cut short (a server may keep a PUT whose connection broke):
                    # ours replaces it.
                    self.objects.put_new(BLOBS + digest, chosen.fd, stored_size,
                                         {ENCODING_KEY: str(encoding)}, replace=True)
            crashpoints.reached("after-blob-rename")  # in the bucket; the manifest knows nothing
            self.cache.admit_copy(digest, chosen.path, chosen.fd)
        finally:
            if compressed is not None:
                compressed.discard()
        return StoredBlob(digest, temp.size, stored_size, encoding)

    def _sound(self, digest: Digest, encoding: Encoding) -> bool:
        """Whether the object in the bucket holds the digest's content, whole."""
        try:
            reader = self._fresh_reader(digest, encoding)
        except Corrupt:
            return False
        try:
            return digest_of_chunks(read_chunks(reader))[0] == digest
        except Corrupt:
            return False
        finally:
            reader.close()

    def sync_blob(self, digest: Digest) -> None:
        """Nothing to do: a PUT returns once the service stored the object."""

    def sync_all(self) -> None:
        """Nothing to do (see sync_blob)."""

    # -- reading --------------------------------------------------------------------------

    def open(self, digest: Digest, encoding: str, *, size: int | None = None,
             from_disk: bool = False) -> BlobReader:
        """A reader of the blob. Never downloads when `size` is given (the daemon opens on its
        event loop): the first read() does. `from_disk`: the object itself, downloaded now
        into a temp and checked whole (what fsck must see), not the cache."""
        known = _known(digest, encoding)
        if from_disk:
            return self._fresh_reader(digest, known)
        reader = S3Reader(self, digest, known, size)
        if size is None:
            try:
                reader.load()
            except BaseException:
                reader.close()
                raise
        return reader

    def read_ahead(self, opened: BlobRef, following: Iterable[BlobRef]) -> None:
        """Bring `opened` and the first READ_AHEAD_FILES of `following` into the cache in
        background threads if the cache lacks `opened` (a read of files one after another, as
        a loader or `cp -r` makes, then finds the next ones fetched or on their way: their GETs
        overlap the reads instead of following them). Bounded: at most a share of the cache's
        capacity queued or downloading; a blob larger than that is left to its reader. Each is
        fetched as a read fetches it (checked whole before it enters the cache); a read of one
        still on its way waits for that download instead of starting its own."""
        if self.cache.holds(opened.digest):
            return  # the warm path: nothing else is looked at
        wanted = [opened, *itertools.islice(following, READ_AHEAD_FILES)]
        budget = min(self.cache.capacity // READ_AHEAD_SHARE, READ_AHEAD_MAX)
        for blob in wanted:
            if blob.damaged or blob.size < 0 or self.cache.holds(blob.digest):
                continue
            try:
                encoding = Encoding(blob.encoding)
            except ValueError:
                continue  # its reader reports it
            with self._ahead_lock:
                if blob.digest in self._ahead or len(self._ahead) >= READ_AHEAD_QUEUED \
                        or self._ahead_bytes + blob.stored_size > budget:
                    continue
                self._ahead[blob.digest] = blob.stored_size
                self._ahead_bytes += blob.stored_size
                if len(self._ahead_threads) < READ_AHEAD_THREADS:
                    thread = threading.Thread(target=self._read_ahead_worker, daemon=True,
                                              name="cafs-read-ahead")
                    self._ahead_threads.append(thread)
                    thread.start()
            self._ahead_queue.put((blob.digest, encoding, blob.size))

    def _read_ahead_worker(self) -> None:
        """A daemon thread (a download in flight never holds up the daemon's exit; the
        temp it leaves is removed by the next start, BlobCache.load)."""
        while True:
            digest, encoding, size = self._ahead_queue.get()
            try:
                self.fetch(digest, encoding, size=size)
            except (Corrupt, Unavailable, OSError) as exc:  # its reader meets it again
                log.debug("read-ahead of blob %s: %s", digest, exc)
            finally:
                with self._ahead_lock:
                    self._ahead_bytes -= self._ahead.pop(digest, 0)

    def has(self, digest: Digest) -> bool:
        """From the cache if it holds the blob, else one quick HEAD; False if the service
        does not answer at once (the publish that follows uploads, in a worker thread, and a
        412 there says the bucket has it)."""
        with self._deletes:
            if digest in self._deleting:
                return False
        if self.cache.holds(digest):
            return True
        if time.monotonic() - self._head_failed_at < HEAD_PAUSE:
            return False  # the service just failed to answer: the loop does not wait again
        try:
            self.objects.head(BLOBS + digest, quick=True)
        except FileNotFoundError:
            return False
        except Unavailable:
            self._head_failed_at = time.monotonic()
            return False
        return True

    @contextlib.contextmanager
    def _fetch_turn(self, digest: str) -> Iterator[None]:
        """Held by one fetch of the digest at a time (the others wait, then find it cached)."""
        with self._fetching_lock:
            lock, users = self._fetching.setdefault(digest, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._fetching_lock:
                users[0] -= 1
                if not users[0]:
                    del self._fetching[digest]

    def cached_reader(self, digest: Digest, encoding: Encoding,
                      size: int | None = None) -> BlobReader | None:
        """A reader of the cached file, or None if the cache does not hold it. Local I/O.
        Corrupt if its content size is not `size` (the manifest's): block checks prove a file
        whole, not that it is this digest's, and a file put under another's name reads as a
        whole blob of the wrong size."""
        fd = self.cache.open_fd(digest)
        if fd is None:
            return None
        # As the local store does (LocalBlobStore.open): a small blob is asked for whole
        # before its footer is read, one disk read for footer, sums and content.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size <= WHOLE_BLOB_AHEAD:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        reader = reader_of_fd(fd, digest, encoding, self.frame_cache)
        if size is not None and size >= 0 and reader.size != size:
            reader.close()
            raise Corrupt(f"blob {digest}: its cached copy holds {reader.size} bytes, not {size}")
        return reader

    def fetch(self, digest: Digest, encoding: Encoding, *, again: bool = False,
              size: int | None = None) -> None:
        """Bring the blob into the cache: download into a temp there, check it whole against
        the digest (and the encoding's checks), then rename it into place. `again`: the cached
        file proved damaged: drop it and fetch anew. `size`: the content's size as the
        manifest knows it (lets a raw blob be checked while it downloads). Corrupt if the
        object is missing or its bytes are wrong; Unavailable if the service fails."""
        asked = time.monotonic()
        with self._fetch_turn(digest):
            if again:
                self.cache.drop(digest)
            elif self.cache.holds(digest):
                return  # another thread fetched it meanwhile
            failed = self._failed.get(digest)
            if failed is not None and (failed[0] >= asked
                                       or time.monotonic() - failed[0] < RETRY_AFTER):
                # The kernel sends several READs of one file at once (read-ahead), and asks
                # again for a page whose read-ahead failed: the ones that waited for a fetch
                # that failed meanwhile, or come right after it, fail with it, not each after
                # its own timeouts. A read asked later tries again.
                raise failed[1]
            temp = self.cache.temp_path()
            try:
                self._download_checked(digest, encoding, temp, size)
                self.cache.admit(digest, temp)
                self._failed.pop(digest, None)
            except Unavailable as exc:
                now = time.monotonic()
                if len(self._failed) > 1024:  # bounded: older failures matter to no one
                    self._failed = {key: value for key, value in self._failed.items()
                                    if now - value[0] < 60}
                self._failed[digest] = (now, exc)
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _download_checked(self, digest: Digest, encoding: Encoding, path: Path,
                          size: int | None) -> None:
        """Download into `path` and prove it the digest's blob before anyone reads it.

        It is checked while the bytes arrive, not re-read after: raw encodings by the
        SHA-256 of the content (and the raw+xxh64 trailer must be exactly the one that
        content makes); zstd frame by frame as each arrives whole (and the seek table must
        list exactly those frames), its frames then entering the shared frame cache, so
        the reads that follow do not decompress them again. Should that check not prove
        the blob, the whole file is checked again as fsck would (that says what is wrong).
        No byte of it is served before the whole blob is proved."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            raw = _RawCheck(encoding, size) if _RawCheck.applies(encoding, size) else None
            frames = StreamCheck(self.frame_cache.capacity // 2) \
                if encoding is Encoding.ZSTD else None
            try:
                got = self.objects.get_into(BLOBS + digest, fd, raw or frames)
            except FileNotFoundError:
                raise Corrupt(f"blob {digest} is missing from {self.location}") from None
            if raw is not None and raw.proves(digest, got):
                return
            if frames is not None and frames.proves(digest, fd, got):
                for key, frame in frames.frames(digest):
                    self.frame_cache.put(key, frame)
                return
            staged = self._staging_cache(fd, encoding)
            actual, _ = digest_of_reader(reader_of_fd(os.dup(fd), digest, encoding, staged,
                                                      from_disk=staged.capacity == 0))
            if actual != digest:
                raise Corrupt(f"blob {digest}: the object in {self.location} hashes to {actual}")
            for key, frame in staged.items():
                self.frame_cache.put(key, frame)
        finally:
            os.close(fd)

    def _staging_cache(self, fd: int, encoding: Encoding) -> FrameCache:
        """Where checking a zstd blob keeps the frames it decompressed: all of them if the
        blob fits in half the frame cache, else none (they would only push each other out)."""
        budget = self.frame_cache.capacity // 2
        if encoding is Encoding.ZSTD and budget > 0:
            try:
                plain = SeekTable.read_from(fd, os.fstat(fd).st_size).plain_size
            except (Corrupt, OSError):
                plain = budget + 1  # the check itself reports it
            if plain <= budget:
                return new_frame_cache(budget)
        return new_frame_cache(0)

    def _fresh_reader(self, digest: Digest, encoding: Encoding) -> BlobReader:
        """A reader of the object downloaded now into a temp (unlinked at once: the reader
        holds the only reference). For fsck: every byte from the bucket, checked as read."""
        path = self.tmp_dir / f"check-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        os.unlink(path)
        try:
            try:
                self.objects.get_into(BLOBS + digest, fd)
            except FileNotFoundError:
                raise Corrupt(f"blob {digest} is missing from {self.location}") from None
        except BaseException:
            os.close(fd)
            raise
        return reader_of_fd(fd, digest, encoding, self.frame_cache, from_disk=True)

    # -- administration -------------------------------------------------------------------

    def blob_files(self) -> Iterator[tuple[Digest, int, int]]:
        """Every object under blobs/: digest, size, LastModified (whole seconds: S3 gives no
        finer time)."""
        for item in self.objects.list(BLOBS):
            name = item["Key"][len(BLOBS):]
            if is_digest(name):
                yield Digest(name), int(item["Size"]), \
                    int(item["LastModified"].timestamp()) * 1_000_000_000

    def iter_digests(self) -> Iterator[Digest]:
        for digest, _, _ in self.blob_files():
            yield digest

    def claim(self, store_id: str | None, *, create: bool) -> None:
        """The object `store-id` beside blobs/ names the one store whose blobs these are: two
        stores on one prefix would each take the other's blobs for orphans, and gc would
        delete them. Written once, by the first opener (a PUT that never replaces)."""
        try:
            owner = self._owner()
            if owner is None and create and store_id is not None:
                with contextlib.suppress(Exists):  # a racing opener wrote it first
                    self.objects.put_small_new(OWNER, f"{store_id}\n".encode())
                owner = self._owner()
        except Unavailable as exc:
            raise StoreError(f"cannot check whose blobs {self.where} holds: {exc}") from None
        if owner is not None and owner != store_id:
            raise StoreError(f"{self.where} holds the blobs of another store (id {owner}): give "
                             "each store its own prefix, or to mount that store on this host "
                             "name its manifest too (manifest = ...)")

    def _owner(self) -> str | None:
        try:
            return self.objects.get_small(OWNER).decode(errors="replace").strip()
        except FileNotFoundError:
            return None

    def has_blob_files(self) -> bool:
        return any(is_digest(item["Key"][len(BLOBS):])
                   for item in self.objects.list(BLOBS, limit=16))

    def stored_size(self, digest: Digest) -> int:
        return int(self.objects.head(BLOBS + digest)["ContentLength"])

    def compute_digest(self, digest: Digest, encoding: str) -> tuple[Digest, int]:
        """Re-hash the object in the bucket (not the cache): what fsck --full checks."""
        return digest_of_reader(self.open(digest, encoding, from_disk=True))

    def delete(self, digest: Digest) -> None:
        try:
            self.objects.head(BLOBS + digest)  # FileNotFoundError if there is none
            self.cache.drop(digest)
            self.objects.delete(BLOBS + digest)
        finally:
            with self._deletes:
                self._deleting.discard(digest)
                self._deletes.notify_all()

    def deleting(self, digests: list[Digest]) -> None:
        with self._deletes:
            self._deleting.update(digests)

    def deleted(self, digests: list[Digest]) -> None:
        with self._deletes:
            self._deleting.difference_update(digests)
            self._deletes.notify_all()

    def _wait_for_delete(self, digest: Digest) -> None:
        """A publish of content gc is deleting waits for the delete: a PUT before it would
        get 412 for an object about to vanish."""
        with self._deletes:
            while digest in self._deleting:
                self._deletes.wait()

    def quarantine(self, digest: Digest) -> str | None:
        """Copy the object to quarantine/ and delete it from blobs/; the cache drops it."""
        self.cache.drop(digest)
        name = f"{digest}.{time.time_ns()}"
        try:
            self.objects.copy(BLOBS + digest, QUARANTINE + name)
        except FileNotFoundError:
            return None
        self.objects.delete(BLOBS + digest)
        return name


class _RawCheck:
    """Checks a raw or raw+xxh64 object while it downloads (the pieces come in order; offset
    0 starts over): SHA-256 of the content, and the block-sum trailer, which must be byte
    for byte the one that content makes (so its footer's size, block size and magic too)."""

    def __init__(self, encoding: Encoding, size: int | None) -> None:
        self._checked = encoding is Encoding.RAW_CHECKED
        self._size = size
        self._start()

    @staticmethod
    def applies(encoding: Encoding, size: int | None) -> bool:
        return encoding is Encoding.RAW or (encoding is Encoding.RAW_CHECKED
                                             and size is not None and size >= 0)

    def _start(self) -> None:
        self._sha256 = hashlib.sha256()
        self._blocks = BlockSums()
        self._trailer = bytearray()
        self._received = 0

    def __call__(self, offset: int, data: memoryview) -> None:
        if offset == 0:
            self._start()
        if offset != self._received:  # never expected: proves() then says no
            self._received = -1
            return
        content = len(data)
        if self._checked:
            assert self._size is not None
            content = max(0, min(len(data), self._size - offset))
        if content:
            piece = data[:content]
            self._sha256.update(piece)
            if self._checked:
                self._blocks.update(piece)
        if content < len(data):
            self._trailer += data[content:]
        self._received += len(data)

    def proves(self, digest: Digest, received: int) -> bool:
        """True if what arrived (`received` bytes) is the digest's blob, whole."""
        if received != self._received or self._sha256.hexdigest() != digest:
            return False
        if not self._checked:
            return True
        assert self._size is not None
        return (received == checked_raw_size(self._size)
                and bytes(self._trailer) == self._blocks.trailer(self._size))


def _md5_of(fd: int) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    offset = 0
    while piece := os.pread(fd, 1 << 20, offset):
        hasher.update(piece)
        offset += len(piece)
    return hasher.hexdigest()


class S3Reader:
    """A BlobReader over the cached file, opened at the first read that needs it. It pins the
    digest in the cache while open, so eviction never takes a file it reads.

    Kept idle for the next open of the same content (idle()), it keeps its file open and
    pinned only while the files idle readers pin stay within a share of the cache
    (BlobCache.hold_idle); otherwise it closes the file and unpins, and opens it again when
    used. Used again, it is as a new reader: pinned, and a damaged file is fetched again once."""

    def __init__(self, store: S3BlobStore, digest: Digest, encoding: Encoding,
                 size: int | None) -> None:
        self._store = store
        self._digest = digest
        self._encoding = encoding
        self._inner: BlobReader | None = None
        self._lock = threading.Lock()
        self._refetched = False
        self._closed = False
        self._idle = False
        self._held: int | None = None  # bytes it pins while idle (BlobCache.hold_idle)
        store.cache.pin(digest)
        self._pinned = True
        self._expected = size  # the manifest's: a cached file of another size is not this blob
        self.size = size if size is not None else -1
        self._open_if_cached()

    def _open_if_cached(self) -> None:
        """Opening the cached file is local and quick: done now if the cache holds it."""
        with contextlib.suppress(Corrupt):
            self._inner = self._store.cached_reader(self._digest, self._encoding,
                                                    self._expected)
            if self._inner is not None:
                self.size = self._inner.size

    def idle(self) -> None:
        with self._lock:
            if self._closed or self._idle:
                return
            self._idle = True
            inner = self._inner
            if inner is not None:
                self._held = self._store.cache.hold_idle(self._digest)
            keep = self._held is not None
            if not keep:  # beyond the idle share: let go of the file and its pin
                self._inner, self._pinned = None, False
        if keep:
            assert inner is not None
            inner.idle()
            return
        if inner is not None:
            inner.close()
        self._store.cache.unpin(self._digest)

    def _resume(self) -> None:
        """Used again after idle(): pinned as a new reader is, its idle bytes given back."""
        with self._lock:
            if not self._idle or self._closed:
                return
            self._idle = False
            self._refetched = False  # a new open: a damaged file is fetched again once more
            if self._held is not None:
                self._store.cache.end_idle(self._held)
                self._held = None
            if not self._pinned:
                self._store.cache.pin(self._digest)
                self._pinned = True
                self._open_if_cached()

    def _current(self) -> BlobReader | None:
        """The cached file's reader if one is open, after resuming an idle reader."""
        if self._idle:
            self._resume()
        return self._inner

    def load(self) -> BlobReader:
        """The reader of the cached file, fetching the blob first if the cache lacks it."""
        inner = self._current()
        if inner is not None:
            return inner
        with self._lock:
            if self._inner is None:
                try:
                    self._inner = self._store.cached_reader(self._digest, self._encoding,
                                                               self._expected)
                except Corrupt:
                    self._inner = None
                    self._refetch_locked()
                if self._inner is None:
                    self._store.fetch(self._digest, self._encoding, size=self._expected)
                    self._inner = self._open_cached()
                self.size = self._inner.size
            return self._inner

    def _open_cached(self) -> BlobReader:
        inner = self._store.cached_reader(self._digest, self._encoding, self._expected)
        if inner is None:  # evicted at once (a cache smaller than the blob): fetch again
            self._store.fetch(self._digest, self._encoding, size=self._expected)
            inner = self._store.cached_reader(self._digest, self._encoding, self._expected)
        if inner is None:
            raise Corrupt(f"blob {self._digest}: the cache cannot hold it")
        return inner

    def _refetch_locked(self) -> None:
        """The cached file is damaged: fetch it again, once in this reader's life."""
        if self._refetched:
            raise Corrupt(f"blob {self._digest}: its cached copy is damaged again")
        self._refetched = True
        old, self._inner = self._inner, None
        if old is not None:
            old.close()
        self._store.fetch(self._digest, self._encoding, again=True, size=self._expected)
        self._inner = self._open_cached()

    def read(self, offset: int, length: int) -> bytes:
        inner = self.load()
        try:
            return inner.read(offset, length)
        except Corrupt:
            with self._lock:
                if self._inner is inner:
                    self._refetch_locked()
                assert self._inner is not None
                fresh = self._inner
            return fresh.read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """As read, from the cached file this reader has open (local I/O, may wait for the
        disk), never a download: None if it has none open yet, or if the bytes fail their
        check (read() in a worker thread then fetches the blob again)."""
        inner = self._current()
        if inner is None:
            return None
        try:
            return inner.read(offset, length)
        except Corrupt:
            return None

    def read_nowait(self, offset: int, length: int) -> bytes | memoryview | None:
        inner = self._current()
        if inner is None:
            return None
        try:
            return inner.read_nowait(offset, length)
        except Corrupt:
            return None  # read() in a worker thread fetches the blob again

    def take_random_frame(self) -> tuple[int, bytes] | None:
        """The cached file's reader's (ZstdReader.take_random_frame), if it has one."""
        take = getattr(self._inner, "take_random_frame", None)
        return None if take is None else take()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inner, self._inner = self._inner, None
            held, self._held = self._held, None
            pinned, self._pinned = self._pinned, False
        if inner is not None:
            inner.close()
        if held is not None:
            self._store.cache.end_idle(held)
        if pinned:
            self._store.cache.unpin(self._digest)


if TYPE_CHECKING:  # mypy holds the implementation to the protocol, member by member
    _IMPLEMENTS: type[Blobs] = S3BlobStore
