"""Small writes in memory (TempBlob with a MemoryBudget): no temp file unless it spills, the
budget holds under many writers at once, growing past the bound spills mid-write, and a full
disk while spilling fails the write cleanly. Core tests, then real mounts."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import (
    Mount,
    require_fuse,
    sha,
    small_tmpfs,
    unmount_whatever_state,
    write_artifact,
)

from cafs.blobstore import BlobStore
from cafs.blobstore import temp as temp_module
from cafs.blobstore.temp import MEMORY_FILE_LIMIT


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path)
    store.create_layout()
    return store


def tmp_files(blobs: BlobStore) -> list[Path]:
    return list(blobs.tmp_dir.iterdir())


def test_a_small_write_never_makes_a_temp_file(blobs: BlobStore) -> None:
    temp = blobs.new_temp(streaming=True)
    temp.write(0, b"hello ")
    temp.write(6, b"world")
    temp.write(20, b"!")  # a gap reads as zeros, as in a file
    assert temp.in_memory and tmp_files(blobs) == []
    assert temp.read(0, 100) == b"hello world" + bytes(9) + b"!"
    temp.truncate(5)
    assert temp.read(0, 100) == b"hello" and temp.digest() == hashlib.sha256(b"hello").hexdigest()
    assert blobs.memory.used == 5
    temp.discard()
    assert blobs.memory.used == 0 and tmp_files(blobs) == []


def test_a_dedup_hit_and_a_compressed_blob_write_only_the_blob(blobs: BlobStore) -> None:
    data = b"a,b,c\n" * 20_000
    for _ in range(2):
        temp = blobs.new_temp(streaming=True)
        temp.write(0, data)
        digest = temp.digest()
        if not os.path.exists(blobs.path_of(digest)):
            assert blobs.publish(temp, digest).encoding == "zstd"
        assert temp.in_memory  # the source never needed a file
        temp.discard()
    assert tmp_files(blobs) == [] and blobs.memory.used == 0


def test_a_raw_blob_goes_from_memory_to_its_file_at_publish(blobs: BlobStore) -> None:
    data = os.urandom(50_000)
    temp = blobs.new_temp(streaming=True)
    temp.write(0, data)
    digest = temp.digest()
    stored = blobs.publish(temp, digest)
    assert stored.encoding == "raw+xxh64" and not temp.in_memory
    temp.discard()
    reader = blobs.open(digest, stored.encoding)
    assert reader.read(0, len(data)) == data
    reader.close()
    assert blobs.memory.used == 0


def test_growing_past_the_bound_spills_mid_write(blobs: BlobStore) -> None:
    data = os.urandom(MEMORY_FILE_LIMIT + 300_000)
    temp = blobs.new_temp(streaming=True)
    piece = 128 * 1024
    for offset in range(0, len(data), piece):
        temp.write(offset, data[offset:offset + piece])
        assert temp.in_memory == (offset + piece <= MEMORY_FILE_LIMIT)
    assert len(tmp_files(blobs)) == 1 and blobs.memory.used == 0
    assert temp.read(0, len(data)) == data
    assert temp.digest() == hashlib.sha256(data).hexdigest()
    temp.discard()
    assert tmp_files(blobs) == []


def test_many_writers_at_once_stay_within_the_budget(blobs: BlobStore) -> None:
    blobs.memory.limit = 2 << 20
    rng = random.Random(5)
    temps = [blobs.new_temp(streaming=True) for _ in range(40)]
    contents = [bytearray() for _ in temps]
    peak = 0
    for _ in range(30):  # interleaved appends, as 40 writers at once would send them
        for temp, content in zip(temps, contents, strict=True):
            piece = rng.randbytes(rng.randrange(1, 20_000))
            temp.write(len(content), piece)
            content += piece
            peak = max(peak, blobs.memory.used)
    assert peak <= blobs.memory.limit
    assert any(temp.in_memory for temp in temps) and not all(temp.in_memory for temp in temps)
    for temp, content in zip(temps, contents, strict=True):
        assert temp.read(0, len(content)) == content
        digest = temp.digest()
        stored = blobs.publish(temp, digest)
        temp.discard()
        reader = blobs.open(digest, stored.encoding)
        assert reader.read(0, len(content)) == content
        reader.close()
    assert blobs.memory.used == 0 and tmp_files(blobs) == []


def test_a_full_disk_while_spilling_fails_the_write_and_leaves_nothing(
        blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = blobs.new_temp(streaming=True)
    temp.write(0, b"x" * 1000)

    def full(fd: int, data: object, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(temp_module, "pwrite_all", full)
    with pytest.raises(OSError) as info:
        temp.write(1000, b"y" * MEMORY_FILE_LIMIT)
    assert info.value.errno == errno.ENOSPC
    assert temp.in_memory and tmp_files(blobs) == []  # as it was before the write
    temp.discard()
    assert blobs.memory.used == 0


# -- through a mount ------------------------------------------------------------------------

WRITERS = r"""
import os, sys, threading, random, time
layer, count = sys.argv[1], int(sys.argv[2])
def writer(n):
    rng = random.Random(n)
    data = rng.randbytes(rng.randrange(1, 3 << 20))  # some stay in memory, some spill
    fd = os.open(os.path.join(layer, f"f{n:03d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for offset in range(0, len(data), 64 * 1024):
        os.write(fd, data[offset:offset + 64 * 1024])
        time.sleep(0.001)  # all writers hold their files open at once
    os.close(fd)
threads = [threading.Thread(target=writer, args=(n,)) for n in range(count)]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_many_concurrent_writers_through_the_mount(mount: Mount) -> None:
    layer = mount.layer()
    subprocess.run([sys.executable, "-c", WRITERS, str(layer), "48"], check=True,
                   timeout=300)
    for n in range(48):
        rng = random.Random(n)
        expected = rng.randbytes(rng.randrange(1, 3 << 20))
        assert sha((layer / f"f{n:03d}").read_bytes()) == sha(expected)
    assert list((mount.store / "tmp").iterdir()) == []


def test_a_full_disk_while_spilling_through_the_mount(tmp_path: Path) -> None:
    """The store on a small tmpfs: a file that outgrows memory on a full disk gets ENOSPC at
    write or close, is not published, and leaves no temp; the mount stays usable."""
    require_fuse()
    small = small_tmpfs(tmp_path / "small", "12m")
    parent = Path(tempfile.mkdtemp(prefix="cafs-spill-"))
    mountpoint = parent / "mnt"
    mountpoint.mkdir()
    mount = Mount(small / "store", mountpoint)
    try:
        mount.start()
        layer = mount.layer()
        failed = None
        for n in range(20):  # 3 MiB incompressible files until the disk is full
            path = layer / f"big{n}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT)
                try:
                    os.write(fd, b"s" * 1000)  # in memory
                    for _ in range(3):
                        os.write(fd, os.urandom(1 << 20))  # spills past 1 MiB
                finally:
                    os.close(fd)
            except OSError as exc:
                failed = (n, exc.errno)
                break
        assert failed is not None and failed[1] == errno.ENOSPC, failed
        assert not (layer / f"big{failed[0]}").exists()
        assert list((mount.store / "tmp").iterdir()) == []
        for n in range(failed[0]):
            assert (layer / f"big{n}").stat().st_size == 1000 + (3 << 20)
        (layer / "big0").unlink()
        write_artifact(layer / "after", b"room again")  # the mount goes on
        mount.stop()
        mount.assert_clean()
    finally:
        unmount_whatever_state(mountpoint)
        subprocess.run(["umount", "-l", str(small)], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def test_the_io_size_is_the_largest_write_the_kernel_sends(mount: Mount) -> None:
    """st_blksize is 1 MiB, so cp (and Python's buffered files) write a file of up to 1 MiB
    in one WRITE request instead of eight."""
    layer = mount.layer()
    (layer / "f").write_bytes(b"x")
    for path in (layer, layer / "f"):
        assert os.stat(path).st_blksize == 1 << 20
    assert subprocess.run(["stat", "-c", "%o", str(layer / "f")], capture_output=True,
                          text=True, check=True).stdout.strip() == str(1 << 20)
