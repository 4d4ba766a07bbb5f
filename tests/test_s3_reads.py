"""Reads on a real mount whose blobs are on S3 (a real `weed mini`), through an empty cache:
opening a file whose blob the cache lacks starts its download, and those of the next files of
its directory, in the background (cafs.blobstore.s3, read_ahead); every byte read is still
right, and what is read ahead stays within its share of the cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import WeedServer
from conftest import Mount, checked_after, mount_with_config

from cafs.blobstore.s3 import READ_AHEAD_FILES


@pytest.fixture
def s3_mount(tmp_path: Path, weed: WeedServer,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Mount]:
    """A mount whose blobs are on S3, whatever CAFS_TEST_BACKEND says."""
    with checked_after(mount_with_config(tmp_path, monkeypatch,
                                         f'blobs = "{weed.url(weed.new_prefix())}"\n'
                                         f'cache_size = {8 << 20}\n')) as mounted:
        yield mounted


def cached(mount: Mount, data: bytes) -> bool:
    return (mount.store / "cache" / hashlib.sha256(data).hexdigest()).exists()


def cached_bytes(mount: Mount) -> int:
    """Bytes of the cache's blob files (not downloads in progress)."""
    total = 0
    with os.scandir(mount.store / "cache") as entries:
        for entry in entries:
            if not entry.name.startswith("fetch-"):
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                    total += entry.stat().st_size
    return total


def wait_until(condition: object, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_open_fetches_its_blob_and_the_next_files_ones_and_reads_stay_right(
        s3_mount: Mount) -> None:
    layer = s3_mount.layer()
    files = {f"part{i:02d}": os.urandom(100_000 + i) for i in range(READ_AHEAD_FILES + 3)}
    for name, data in files.items():
        (layer / name).write_bytes(data)
    s3_mount.stop()
    shutil.rmtree(s3_mount.store / "cache")  # a new host: nothing cached
    s3_mount.start()
    names = sorted(os.listdir(layer))  # the listing the daemon keeps, as a reader's walk
    assert names == sorted(files)
    with open(layer / "part01", "rb"):  # opened, nothing read yet
        ahead = [files[name] for name in names[1:READ_AHEAD_FILES + 2]]
        assert wait_until(lambda: all(cached(s3_mount, data) for data in ahead))
    time.sleep(0.3)
    assert not cached(s3_mount, files["part00"])  # before it in the directory
    assert not cached(s3_mount, files[names[READ_AHEAD_FILES + 2]])  # past the read-ahead
    for name, data in files.items():
        assert (layer / name).read_bytes() == data


def test_reading_a_directory_through_an_empty_cache_keeps_the_cache_bounded(
        s3_mount: Mount) -> None:
    """Many files after the one opened, together more than the cache: what is read ahead
    never pushes the cache past its bound, and every file reads right."""
    layer = s3_mount.layer()
    files = {f"shard{i:02d}": os.urandom(1_500_000 + i) for i in range(12)}  # 18 MB, cache 8
    for name, data in files.items():
        (layer / name).write_bytes(data)
    s3_mount.stop()
    shutil.rmtree(s3_mount.store / "cache")
    s3_mount.start()
    for name in sorted(os.listdir(layer)):
        assert (layer / name).read_bytes() == files[name]
        assert cached_bytes(s3_mount) <= 8 << 20
