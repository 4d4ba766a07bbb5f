"""The blob store without FUSE: hashing while writing, encodings, frames, durability rules."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
from pathlib import Path

import pytest
import zstandard

from cafs.blobstore import (
    CHECK_BLOCK_SIZE,
    RAW,
    RAW_CHECKED,
    ZSTD,
    BlobReader,
    BlobStore,
    Encoding,
    checked_raw_size,
)
from cafs.blobstore.fileio import direct_reads
from cafs.blobstore.zstd_seekable import (
    DEFAULT_FRAME_SIZE,
    HOLE_FRAME_SIZE,
    StreamCheck,
    ZstdReader,
)
from cafs.digest import Digest, digest_of_chunks
from cafs.errors import Corrupt

MIB = 1 << 20


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path, frame_size=64 * 1024, frame_cache_bytes=256 * 1024)
    store.create_layout()
    return store


def put(blobs: BlobStore, data: bytes) -> tuple[Digest, str]:
    temp = blobs.new_temp()
    temp.write(0, data)
    digest = temp.digest()
    stored = blobs.publish(temp, digest)
    temp.discard()
    return digest, stored.encoding


def text(size: int) -> bytes:
    rng = random.Random(size)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"0.125", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b","
    return bytes(out[:size])


def test_in_order_writes_are_hashed_as_they_arrive(blobs: BlobStore) -> None:
    temp = blobs.new_temp()
    data = os.urandom(300_000)
    for offset in range(0, len(data), 70_000):
        temp.write(offset, data[offset:offset + 70_000])
    assert not temp.needs_rehash
    assert temp.digest() == hashlib.sha256(data).hexdigest()
    temp.discard()


def test_out_of_order_writes_are_hashed_again_at_the_end(blobs: BlobStore) -> None:
    temp = blobs.new_temp()
    temp.write(100, b"world")
    temp.write(0, b"hello")
    assert temp.needs_rehash
    expected = b"hello" + b"\0" * 95 + b"world"
    assert temp.digest() == hashlib.sha256(expected).hexdigest()
    temp.truncate(0)  # a truncate to zero starts the running hash afresh
    temp.write(0, b"abc")
    assert not temp.needs_rehash
    assert temp.digest() == hashlib.sha256(b"abc").hexdigest()
    temp.discard()
    assert list(blobs.tmp_dir.iterdir()) == []


def test_random_data_is_stored_raw_and_text_compressed(blobs: BlobStore) -> None:
    random_digest, random_encoding = put(blobs, os.urandom(200_000))
    text_digest, text_encoding = put(blobs, text(1_000_000))
    assert random_encoding == RAW_CHECKED
    assert text_encoding == ZSTD
    # 4 blocks of checksums and the footer: 48 bytes over the content.
    assert blobs.stored_size(random_digest) == checked_raw_size(200_000) == 200_048
    assert blobs.stored_size(text_digest) < 500_000
    assert put(blobs, b"tiny")[1] == RAW_CHECKED
    assert put(blobs, b"")[1] == RAW_CHECKED


def test_raw_blob_is_the_content_then_its_checksums(blobs: BlobStore) -> None:
    data = os.urandom(3 * CHECK_BLOCK_SIZE + 5)
    digest, encoding = put(blobs, data)
    assert blobs.path_of(digest).read_bytes()[:len(data)] == data
    reader = blobs.open(digest, encoding)
    rng = random.Random(2)
    for _ in range(200):
        offset = rng.randrange(len(data) + 10)
        length = rng.choice([1, 4096, CHECK_BLOCK_SIZE, CHECK_BLOCK_SIZE + 1, 1 << 20])
        assert reader.read(offset, length) == data[offset:offset + length]
    reader.close()


def test_out_of_order_writes_get_correct_block_checksums(blobs: BlobStore) -> None:
    data = os.urandom(2 * CHECK_BLOCK_SIZE + 100)
    temp = blobs.new_temp()
    temp.write(CHECK_BLOCK_SIZE, data[CHECK_BLOCK_SIZE:])
    temp.write(0, data[:CHECK_BLOCK_SIZE])
    digest = temp.digest()
    blobs.publish(temp, digest)
    temp.discard()
    assert blobs.compute_digest(digest, RAW_CHECKED) == (digest, len(data))


def test_legacy_raw_blobs_without_checksums_are_still_read(blobs: BlobStore) -> None:
    data = os.urandom(1000)
    digest = Digest(hashlib.sha256(data).hexdigest())
    blobs.path_of(digest).write_bytes(data)
    assert blobs.open(digest, RAW).read(0, 2000) == data


def test_compressed_blob_is_a_plain_zstd_stream(blobs: BlobStore) -> None:
    data = text(500_000)
    digest, encoding = put(blobs, data)
    assert encoding == ZSTD
    raw = blobs.path_of(digest).read_bytes()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
    assert reader.read() == data  # the seek table is a skippable frame


def test_reads_at_any_offset_decompress_only_covering_frames(blobs: BlobStore) -> None:
    data = text(1_000_003)
    digest, encoding = put(blobs, data)
    reader = blobs.open(digest, encoding)
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.choice([1, 10, 65536, 65537, 200_000])
        assert reader.read(offset, length) == data[offset:offset + length]
    assert reader.read(len(data), 10) == b""
    reader.close()


@pytest.mark.parametrize("compressible", [True, False])
def test_a_flipped_byte_in_a_blob_is_an_error_not_wrong_bytes(blobs: BlobStore,
                                                             compressible: bool) -> None:
    data = text(300_000) if compressible else os.urandom(300_000)
    digest, encoding = put(blobs, data)
    assert encoding == (ZSTD if compressible else RAW_CHECKED)
    path = blobs.path_of(digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    path.write_bytes(bytes(raw))
    blobs.frame_cache = type(blobs.frame_cache)(1 << 20)  # nothing cached from before
    reader = blobs.open(digest, encoding)
    with pytest.raises(Corrupt):
        reader.read(0, len(data))
    reader.close()
    with pytest.raises(Corrupt):
        blobs.compute_digest(digest, encoding)


@pytest.mark.parametrize("frame_size", [32 * 1024, 128 * 1024])
def test_blobs_written_in_other_frame_sizes_stay_readable_and_checked(tmp_path: Path,
                                                                      frame_size: int) -> None:
    data = text(1_000_003)
    other = BlobStore(tmp_path, frame_size=frame_size, frame_cache_bytes=0)
    other.create_layout()
    digest, encoding = put(other, data)
    store = BlobStore(tmp_path, frame_cache_bytes=1 << 20)  # today's frames: DEFAULT_FRAME_SIZE
    reader = store.open(digest, encoding)
    assert isinstance(reader, ZstdReader)
    assert reader.table.plain_offsets[1] == frame_size
    rng = random.Random(2)
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.choice([1, 4096, 32768, 65537, 200_000])
        assert reader.read(offset, length) == data[offset:offset + length]
    reader.close()
    new_digest, _ = put(store, data[:-1])
    new_reader = store.open(new_digest, encoding)
    assert isinstance(new_reader, ZstdReader)
    assert new_reader.table.plain_offsets[1] == DEFAULT_FRAME_SIZE
    new_reader.close()
    path = store.path_of(digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    store.frame_cache = type(store.frame_cache)(1 << 20)
    reader = store.open(digest, encoding)
    with pytest.raises(Corrupt):
        reader.read(0, len(data))
    reader.close()


def test_a_hole_is_few_large_frames_and_reads_back_checked(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, frame_cache_bytes=0)
    blobs.create_layout()
    temp = blobs.new_temp()
    head, island = text(100_000), text(200_000)
    expected = bytearray(9 * MIB + 123)
    temp.write(0, head)
    temp.truncate(len(expected))
    temp.write(5 * MIB - 7, island)  # data between holes, off the frame grid
    expected[:len(head)] = head
    expected[5 * MIB - 7:5 * MIB - 7 + len(island)] = island
    digest = temp.digest()
    stored = blobs.publish(temp, digest)
    temp.discard()
    assert stored.encoding == ZSTD
    reader = blobs.open(digest, ZSTD)
    assert isinstance(reader, ZstdReader)
    table = reader.table
    sizes = [b - a for a, b in itertools.pairwise(table.plain_offsets)]
    # Data frames on the grid of DEFAULT_FRAME_SIZE; each hole in frames of up to
    # HOLE_FRAME_SIZE that end on that grid, or at the end.
    assert max(sizes) == HOLE_FRAME_SIZE
    assert all(start % DEFAULT_FRAME_SIZE == 0 for start in table.plain_offsets[:-1])
    assert len(sizes) < 60, sizes  # 9 MiB in 64 KiB frames would be 145
    assert reader.read(0, len(expected)) == bytes(expected)
    rng = random.Random(3)
    for _ in range(100):
        offset = rng.randrange(len(expected))
        assert reader.read(offset, 4096) == bytes(expected[offset:offset + 4096])
    reader.close()
    # A damaged hole frame is an error too, not zeros.
    hole = sizes.index(HOLE_FRAME_SIZE)
    path = blobs.path_of(digest)
    raw = bytearray(path.read_bytes())
    raw[table.compressed_offsets[hole + 1] - 5] ^= 0x01
    path.write_bytes(bytes(raw))
    reader = blobs.open(digest, ZSTD)
    with pytest.raises(Corrupt):
        reader.read(table.plain_offsets[hole] + 12_345, 4096)
    reader.close()


def test_read_ahead_serves_checked_frames_and_leaves_a_damaged_one_to_its_read(
        tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, frame_cache_bytes=16 * MIB)
    blobs.create_layout()
    data = text(3 * MIB)
    digest, encoding = put(blobs, data)
    blobs.frame_cache = type(blobs.frame_cache)(16 * MIB)  # nothing cached from the write
    reader = blobs.open(digest, encoding)
    assert isinstance(reader, ZstdReader)
    table = reader.table
    damaged = 41  # inside a read-ahead task of several frames
    with open(blobs.path_of(digest), "r+b") as f:  # in place: the reader's descriptor sees it
        at = (table.compressed_offsets[damaged] + table.compressed_offsets[damaged + 1]) // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    bad_start, bad_end = table.plain_offsets[damaged], table.plain_offsets[damaged + 1]
    step = 100_000
    for offset in range(0, len(data), step):  # in order: read-ahead runs
        if offset < bad_end and offset + step > bad_start:
            with pytest.raises(Corrupt):
                reader.read(offset, step)
        else:
            assert reader.read(offset, step) == data[offset:offset + step]
    reader.close()


def test_missing_blob_is_an_io_error(blobs: BlobStore) -> None:
    with pytest.raises(Corrupt):
        blobs.open(Digest("0" * 64), RAW)


def test_clean_tmp_removes_leftovers_without_following_links(
        blobs: BlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    blobs.new_temp()
    os.symlink(outside, blobs.tmp_dir / "planted-link")
    assert blobs.clean_tmp() == 2
    assert outside.read_text() == "keep me"
    assert list(blobs.tmp_dir.iterdir()) == []


def test_iter_digests_lists_every_blob(blobs: BlobStore) -> None:
    digests = {put(blobs, os.urandom(100))[0] for _ in range(5)}
    (blobs.blob_dir / "00" / "not-a-blob").write_text("x")
    assert set(blobs.iter_digests()) == digests


def test_an_unknown_encoding_is_an_io_error_and_known_ones_keep_their_text(
        blobs: BlobStore) -> None:
    digest, encoding = put(blobs, b"some bytes")
    with pytest.raises(Corrupt):
        blobs.open(digest, "lz4")
    assert encoding == "raw+xxh64" and Encoding(encoding) is RAW_CHECKED
    assert [str(member) for member in Encoding] == ["raw", "raw+xxh64", "zstd"]


def test_digest_of_chunks_is_sha256_and_continues_a_running_hash() -> None:
    chunks = [b"abc", b"", b"x" * 100_000]
    assert digest_of_chunks(chunks) == (hashlib.sha256(b"".join(chunks)).hexdigest(), 100_003)
    running = hashlib.sha256(b"head")
    assert digest_of_chunks([b"tail"], into=running)[0] == hashlib.sha256(b"headtail").hexdigest()


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (only this file's: no root, no other reader's
    cache disturbed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_in_order(reader: BlobReader, size: int, step: int) -> list[bytes | memoryview]:
    """What the daemon does for READs in order: read_nowait, else read (in a thread there)."""
    got = []
    for offset in range(0, size, step):
        data = reader.read_nowait(offset, step)
        got.append(reader.read(offset, step) if data is None else data)
    return got


def test_a_large_cold_blob_read_in_order_streams_past_the_page_cache(blobs: BlobStore) -> None:
    data = random.Random(7).randbytes(21 << 20 | 12345)  # not a whole number of chunks
    digest, encoding = put(blobs, data)
    assert encoding == RAW_CHECKED
    evict(blobs.path_of(digest))
    reader = blobs.open(digest, encoding)
    try:
        got = read_in_order(reader, len(data), 1 << 20)
        # Served by the stream: views of its buffers, which stay as they were for as long as
        # they are held, however far the stream has gone on (buffers are reused only once
        # nothing refers to them).
        assert any(isinstance(part, memoryview) for part in got)
        assert b"".join(got) == data
        assert all(bytes(part) == data[i << 20:(i + 1) << 20] for i, part in enumerate(got))
        # Kept idle (its file closed), it lets its stream go: buffers and direct descriptor.
        assert direct_reads.streams == 1
        reader.idle()
        assert direct_reads.streams == 0
        assert reader.read(5 << 20, 1 << 20) == data[5 << 20:6 << 20]
    finally:
        reader.close()
    assert direct_reads.streams == 0


def test_a_damaged_block_of_a_streamed_blob_is_an_error_not_wrong_bytes(
        blobs: BlobStore) -> None:
    data = random.Random(8).randbytes(20 << 20)
    digest, encoding = put(blobs, data)
    path = blobs.path_of(digest)
    at = 13 * (1 << 20) + 777
    with open(path, "r+b") as f:  # in place, as a disk's bit rot would be
        f.seek(at)
        f.write(bytes([data[at] ^ 0x10]))
    evict(path)
    reader = blobs.open(digest, encoding)
    got = bytearray()
    try:
        with pytest.raises(Corrupt, match="fails its checksum"):
            for offset in range(0, len(data), 1 << 20):
                part = reader.read_nowait(offset, 1 << 20)
                got += reader.read(offset, 1 << 20) if part is None else part
    finally:
        reader.close()
    assert len(got) <= at and data.startswith(got)


def test_reads_out_of_order_go_on_streaming(blobs: BlobStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The order of READs the kernel's read-ahead sent on a mount (1 MiB each): it asks for
    # pages it skipped while congested after those past them.
    data = random.Random(9).randbytes(48 << 20)
    digest, encoding = put(blobs, data)
    evict(blobs.path_of(digest))
    opened = []
    real_open = direct_reads.open
    monkeypatch.setattr(direct_reads, "open", lambda fd: opened.append(fd) or real_open(fd))
    order = [*range(11), 14, 15, 16, 17, 11, 12, 13, *range(18, 36), 39, 40, 41, 42, 43,
             36, 37, 38]
    order += [mib for mib in range(48) if mib not in order]
    reader = blobs.open(digest, encoding)
    try:
        for mib in order:
            part = reader.read_nowait(mib << 20, 1 << 20)
            got = reader.read(mib << 20, 1 << 20) if part is None else part
            assert bytes(got) == data[mib << 20:(mib + 1) << 20], mib
        assert len(opened) == 1  # one stream all along: none ended and started again
    finally:
        reader.close()
    assert direct_reads.streams == 0


def test_a_read_the_stream_left_behind_is_checked(blobs: BlobStore) -> None:
    data = random.Random(10).randbytes(24 << 20)
    digest, encoding = put(blobs, data)
    path = blobs.path_of(digest)
    at = 5 * (1 << 20) + 99
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0x01]))
    evict(path)
    reader = blobs.open(digest, encoding)
    try:
        for mib in (0, 1, 2, 3, 16, 17, 18, 19):  # the stream keeps chunks 2.. (MiB 8..)
            part = reader.read_nowait(mib << 20, 1 << 20)
            got = reader.read(mib << 20, 1 << 20) if part is None else part
            assert bytes(got) == data[mib << 20:(mib + 1) << 20]
        # MiB 4 and 5, late: read through the page cache, each block checked
        assert reader.read_nowait(4 << 20, 1 << 20) is None
        assert reader.read(4 << 20, 1 << 20) == data[4 << 20:5 << 20]
        with pytest.raises(Corrupt, match="fails its checksum"):
            reader.read(5 << 20, 1 << 20)
        assert direct_reads.streams == 1  # and the stream went on
        got = reader.read_nowait(20 << 20, 1 << 20) or reader.read(20 << 20, 1 << 20)
        assert bytes(got) == data[20 << 20:21 << 20]
    finally:
        reader.close()
    assert direct_reads.streams == 0


def _streamed(check: StreamCheck, raw: bytes, piece: int) -> None:
    for offset in range(0, len(raw), piece):
        check(offset, memoryview(raw[offset:offset + piece]))


@pytest.mark.parametrize("piece", [1, 4096, 1 << 20])
def test_a_zstd_blob_is_checked_while_it_arrives_in_any_pieces(
        blobs: BlobStore, tmp_path: Path, piece: int) -> None:
    """The check of a download (S3 cache): frames decompressed as they arrive whole; the
    blob is proved only if the content hashes to its digest and the seek table lists
    exactly those frames. Starting over at offset 0 forgets what came before."""
    data = text(300_001)
    digest, encoding = put(blobs, data)
    assert encoding == ZSTD
    path = blobs.path_of(digest)
    raw = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        check = StreamCheck(keep=1 << 30)
        _streamed(check, raw[:1000], 100)  # a first attempt cut off ...
        _streamed(check, raw, piece)  # ... then the whole, from offset 0
        assert check.proves(digest, fd, len(raw))
        assert b"".join(frame for _, frame in check.frames(digest)) == data
        assert not check.proves(Digest("0" * 64), fd, len(raw))
        some = StreamCheck(keep=100_000)  # keeps the first frames that fit
        _streamed(some, raw, piece)
        assert some.proves(digest, fd, len(raw))
        assert 0 < sum(len(frame) for _, frame in some.frames(digest)) <= 100_000
    finally:
        os.close(fd)
    # A frame's bytes; in the seek table, the last frame's checksum and a compressed size.
    for where in (len(raw) // 3, len(raw) - 12, len(raw) - 30):
        damaged = bytearray(raw)
        damaged[where] ^= 0x01
        copy = tmp_path / "damaged"
        copy.write_bytes(bytes(damaged))
        fd = os.open(copy, os.O_RDONLY)
        try:
            check = StreamCheck(keep=1 << 30)
            _streamed(check, bytes(damaged), piece)
            assert not check.proves(digest, fd, len(damaged))
        finally:
            os.close(fd)
