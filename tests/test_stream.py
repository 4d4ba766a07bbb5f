"""Hashing and zstd frames built while writes arrive (cafs.blobstore.stream, FrameStream),
without FUSE: the blob is the same as one compressed at publish, the work is done before
publish, anything out of order falls back, and what streams hold stays bounded."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest
import zstandard

from cafs.blobstore import RAW_CHECKED, ZSTD, BlobStore, TempBlob, stream, zstd_seekable
from cafs.blobstore.stream import SerialFeed
from cafs.blobstore.zstd_seekable import FrameStream

FRAME = 64 * 1024


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path, frame_size=FRAME, frame_cache_bytes=256 * 1024)
    store.create_layout()
    return store


def text(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += f"{rng.randrange(10**6)},{rng.choice(['cat', 'dog', 'cow'])}\n".encode()
    return bytes(out[:size])


def write_in_pieces(temp: TempBlob, data: bytes, piece: int = 100_000) -> None:
    for offset in range(0, len(data), piece):
        temp.write(offset, data[offset:offset + piece])


def publish_and_read(blobs: BlobStore, temp: TempBlob) -> tuple[str, bytes]:
    digest = temp.digest()
    stored = blobs.publish(temp, digest)
    temp.discard()
    reader = blobs.open(digest, stored.encoding)
    try:
        return stored.encoding, reader.read(0, reader.size)
    finally:
        reader.close()


def no_compression_at_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> object:
        raise AssertionError("publish compressed a frame: the stream should have")
    monkeypatch.setattr(zstd_seekable.SeekableWriter, "_compress_frame", refuse)


def test_frames_are_compressed_while_written(blobs: BlobStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = text(5 * FRAME + 12_345)
    temp = blobs.new_temp(streaming=True)
    assert isinstance(temp.frame_sink, FrameStream)
    write_in_pieces(temp, data)
    no_compression_at_publish(monkeypatch)
    encoding, back = publish_and_read(blobs, temp)
    assert encoding == ZSTD and back == data
    digest = hashlib.sha256(data).hexdigest()
    assert blobs.compute_digest(digest, ZSTD) == (digest, len(data))  # type: ignore[arg-type]
    # An ordinary zstd stream, frames without a content size included.
    with open(blobs.path_of(digest), "rb") as blob:  # type: ignore[arg-type]
        whole = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
        assert whole.read() == data


def test_a_small_file_is_one_streamed_frame(blobs: BlobStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = text(9_000)
    temp = blobs.new_temp(streaming=True)
    temp.write(0, data)
    no_compression_at_publish(monkeypatch)
    assert publish_and_read(blobs, temp) == (ZSTD, data)


def test_incompressible_bytes_are_judged_by_the_first_frame(
        blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * FRAME)
    temp = blobs.new_temp(streaming=True)
    write_in_pieces(temp, data, 50_000)
    no_compression_at_publish(monkeypatch)
    assert publish_and_read(blobs, temp) == (RAW_CHECKED, data)
    assert blobs._zstd.streams == 0


@pytest.mark.parametrize("change", ["rewrite", "gap", "truncate-shorter", "truncate-zero"])
def test_out_of_order_changes_fall_back_to_compressing_at_publish(
        blobs: BlobStore, change: str) -> None:
    data = bytearray(text(4 * FRAME))
    temp = blobs.new_temp(streaming=True)
    write_in_pieces(temp, bytes(data), 30_000)
    if change == "rewrite":
        temp.write(1000, b"X" * 5000)
        data[1000:6000] = b"X" * 5000
    elif change == "gap":
        temp.write(len(data) + 70_000, b"tail")
        data += bytes(70_000) + b"tail"
    elif change == "truncate-shorter":
        temp.truncate(FRAME + 7)
        del data[FRAME + 7:]
    else:
        temp.truncate(0)
        data = bytearray(text(2 * FRAME, seed=2))
        write_in_pieces(temp, bytes(data), 30_000)
    assert publish_and_read(blobs, temp) == (ZSTD, bytes(data))
    assert blobs._zstd.streams == 0 and blobs._zstd.held == 0


def test_streams_are_bounded_and_their_slots_come_back(blobs: BlobStore) -> None:
    temps = [blobs.new_temp(streaming=True) for _ in range(zstd_seekable.MAX_STREAMS + 5)]
    sinks = [temp.frame_sink for temp in temps]
    assert sum(sink is not None for sink in sinks) == zstd_seekable.MAX_STREAMS
    data = text(3 * FRAME)
    for temp in temps:
        write_in_pieces(temp, data)
    for temp in temps:  # without a stream: compressed at publish, the same blob
        assert publish_and_read(blobs, temp) == (ZSTD, data)
    assert blobs._zstd.streams == 0 and blobs._zstd.held == 0
    assert blobs.new_temp(streaming=True).frame_sink is not None


def test_held_bytes_are_bounded(blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zstd_seekable, "MAX_HELD_BYTES", 3 * FRAME)
    temps = [blobs.new_temp(streaming=True) for _ in range(6)]
    datas = [text(8 * FRAME, seed=n) for n in range(6)]
    for temp, data in zip(temps, datas, strict=True):
        write_in_pieces(temp, data)
        temp.fed_whole()
        assert blobs._zstd.held <= 3 * FRAME
    for temp, data in zip(temps, datas, strict=True):
        assert publish_and_read(blobs, temp) == (ZSTD, data)
    assert blobs._zstd.streams == 0 and blobs._zstd.held == 0


def test_discarding_mid_write_releases_everything(blobs: BlobStore) -> None:
    temp = blobs.new_temp(streaming=True)
    write_in_pieces(temp, text(6 * FRAME), 200_000)
    temp.discard()  # while the worker may still be compressing
    assert blobs._zstd.streams == 0 and blobs._zstd.held == 0
    assert not temp.path.exists()


def test_a_feed_faster_than_its_worker_waits_instead_of_queueing_without_bound() -> None:
    consumed: list[int] = []
    peak = 0

    def slow(data: bytes | memoryview) -> None:
        nonlocal peak
        peak = max(peak, feed._pending_bytes)
        time.sleep(0.002)
        consumed.append(len(data))

    feed = SerialFeed(slow)
    piece = bytes(1 << 20)
    for _ in range(40):  # 40 MiB, far faster than the worker takes it
        feed.feed(piece)
        assert feed._pending_bytes <= stream.MAX_PENDING_BYTES
    feed.wait()
    assert sum(consumed) == 40 << 20 and peak <= stream.MAX_PENDING_BYTES


@pytest.mark.parametrize("streaming", [True, False])
def test_level_zero_stores_compressible_bytes_raw_without_compressing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    """compression = 0: no frames built while written, none at publish; the blob is raw with
    its block sums, and checks whole."""
    blobs = BlobStore(tmp_path, level=0, frame_size=FRAME)
    blobs.create_layout()
    data = text(3 * FRAME + 7)
    temp = blobs.new_temp(streaming=streaming)
    assert temp.frame_sink is None
    write_in_pieces(temp, data)
    no_compression_at_publish(monkeypatch)
    assert publish_and_read(blobs, temp) == (RAW_CHECKED, data)
    digest = hashlib.sha256(data).hexdigest()
    assert blobs.compute_digest(digest, RAW_CHECKED) == (digest, len(data))  # type: ignore[arg-type]


def test_a_fast_negative_level_streams_zstd_frames(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = BlobStore(tmp_path, level=-5, frame_size=FRAME)
    blobs.create_layout()
    data = text(4 * FRAME + 99)
    temp = blobs.new_temp(streaming=True)
    write_in_pieces(temp, data)
    no_compression_at_publish(monkeypatch)
    assert publish_and_read(blobs, temp) == (ZSTD, data)
