"""The blob store: immutable files named by the SHA-256 of their uncompressed bytes.

One module per role:
    api            the `Blobs` and `BlobReader` protocols, `Encoding`, `read_chunks`
    local          LocalBlobStore: the local-directory implementation (blobs/ab/<hex>, tmp/)
    temp           TempBlob: a write in progress, hashed while written, holes kept
    s3, s3_objects S3BlobStore: blobs in an S3 bucket (s3_objects: the S3 calls, timeouts)
    cache          BlobCache: the S3 store's local cache of whole blob files, bounded by size
    space          SpaceGuard: free-space accounting and the manifest's reserve
    raw            the "raw" encoding (legacy, read-only)
    raw_xxh64      the "raw+xxh64" encoding: content, XXH64 per 64 KiB block, footer
    zstd_seekable  the "zstd" encoding: independent frames, seek table, frame checksums
    fileio         shared helpers (whole pwrite, directory fsync, the buffer of zeros)

Owns: this package is the only importer of zstandard (in zstd_seekable). Must not know about
paths in the namespace, the manifest, or FUSE. Callers import from here; `BlobStore` is the
old name of the local implementation, kept because callers construct the store by it.
"""

from dataclasses import dataclass
from pathlib import Path

from cafs.blobstore.api import BlobReader, Blobs, Encoding, read_chunks
from cafs.blobstore.local import LocalBlobStore
from cafs.blobstore.raw import RawReader
from cafs.blobstore.raw_xxh64 import CHECK_BLOCK_SIZE, BlockSums, CheckedRawReader, checked_raw_size
from cafs.blobstore.space import SpaceGuard
from cafs.blobstore.temp import TempBlob
from cafs.blobstore.zstd_seekable import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    MIN_COMPRESS_SIZE,
    WORTHWHILE_RATIO,
    FrameCache,
    SeekTable,
    ZstdReader,
)

BlobStore = LocalBlobStore


@dataclass(frozen=True)
class BlobsSpec:
    """Where a store's blobs live: `url` None for its own blobs/ directory, else
    `s3://bucket/prefix?endpoint=...` with a local cache (`cache_dir`, default <store>/cache;
    `cache_size` bytes, default 10 GiB)."""

    url: str | None = None
    cache_dir: Path | None = None
    cache_size: int | None = None


def open_blob_store(root: Path, spec: BlobsSpec | None = None, *,
                    level: int = DEFAULT_LEVEL) -> Blobs:
    """The blob store of the store at `root`, as `spec` says."""
    if spec is None or not spec.url:
        return LocalBlobStore(root, level=level)
    from cafs.blobstore.s3 import DEFAULT_CACHE_SIZE, S3BlobStore, S3Location

    # 0 is a size (keep only what open files read), not "the default".
    size = DEFAULT_CACHE_SIZE if spec.cache_size is None else spec.cache_size
    return S3BlobStore(root, S3Location.parse(spec.url), cache_dir=spec.cache_dir,
                       cache_size=size, level=level)

# The encodings by their old names (tests and callers import these).
RAW = Encoding.RAW
RAW_CHECKED = Encoding.RAW_CHECKED
ZSTD = Encoding.ZSTD
ENCODINGS = tuple(Encoding)

__all__ = [
    "CHECK_BLOCK_SIZE",
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_LEVEL",
    "ENCODINGS",
    "MIN_COMPRESS_SIZE",
    "RAW",
    "RAW_CHECKED",
    "WORTHWHILE_RATIO",
    "ZSTD",
    "BlobReader",
    "BlobStore",
    "Blobs",
    "BlobsSpec",
    "BlockSums",
    "CheckedRawReader",
    "Encoding",
    "FrameCache",
    "LocalBlobStore",
    "RawReader",
    "SeekTable",
    "SpaceGuard",
    "TempBlob",
    "ZstdReader",
    "checked_raw_size",
    "open_blob_store",
    "read_chunks",
]
