"""A careless configuration of the S3 store's cache under a real mount (a real `weed mini`):
a cache of size 0 or of a few bytes still reads every artifact right, concurrently, and keeps
no more than it was given."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import WeedServer
from conftest import Mount, checked_after, mount_with_config, unmount_whatever_state


def _mount(tmp_path: Path, weed: WeedServer, monkeypatch: pytest.MonkeyPatch,
           cache_size: int) -> Mount:
    return mount_with_config(tmp_path, monkeypatch,
                             f'blobs = "{weed.url(weed.new_prefix())}"\n'
                             f'cache_dir = "{tmp_path / "cache"}"\ncache_size = {cache_size}\n')


def _cached_bytes(tmp_path: Path) -> int:
    total = 0
    with os.scandir(tmp_path / "cache") as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                total += entry.stat().st_size
    return total


@pytest.fixture
def tiny_cache(tmp_path: Path, weed: WeedServer,
               monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Mount]:
    with checked_after(_mount(tmp_path, weed, monkeypatch, request.param)) as mounted:
        yield mounted


@pytest.mark.parametrize("tiny_cache", [0, 1, 5000], indirect=True)
def test_a_tiny_cache_reads_everything_right_and_keeps_no_more(
        tiny_cache: Mount, tmp_path: Path, weed: WeedServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tiny_cache.layer()
    files = {f"f{i}.bin": os.urandom(1000 + 70_000 * i) for i in range(6)}
    for name, data in files.items():
        (layer / name).write_bytes(data)
    # A new mount: nothing is in the kernel's page cache, every read goes to the daemon.
    tiny_cache.stop()
    tiny_cache.start()
    layer = tiny_cache.layer()
    failures: list[str] = []

    def read_all() -> None:
        for name, data in files.items():
            try:
                got = (layer / name).read_bytes()
            except OSError as exc:
                failures.append(f"{name}: {exc}")
                continue
            if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                failures.append(f"{name}: wrong bytes")

    readers = [threading.Thread(target=read_all) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert failures == []
    capacity = int((tmp_path / "cafs.toml").read_text().split("cache_size = ")[1])
    # The kernel sends RELEASE after close returns: the last pins go a moment later.
    deadline = time.monotonic() + 5
    while _cached_bytes(tmp_path) > capacity and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cached_bytes(tmp_path) <= capacity


@pytest.fixture
def full_cache_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB filesystem for the cache: full at the first download."""
    disk = tmp_path / "cache"
    disk.mkdir(mode=0o700)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs",
                           str(disk)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_cache_on_a_full_disk_fails_reads_cleanly_and_recovers(
        tmp_path: Path, weed: WeedServer, monkeypatch: pytest.MonkeyPatch,
        full_cache_disk: Path) -> None:
    mounted = _mount(tmp_path, weed, monkeypatch, 10 << 20)
    try:
        layer = mounted.layer()
        data = os.urandom(600_000)
        (layer / "big.bin").write_bytes(data)  # published; its cache copy does not fit
        mounted.stop()
        mounted.start()
        layer = mounted.layer()
        try:
            got = (layer / "big.bin").read_bytes()
        except OSError as exc:
            got = None
            assert exc.errno in (errno.EIO, errno.ENOSPC), exc
        assert got is None or got == data
        assert [entry.name for entry in full_cache_disk.iterdir()] == []  # no temp left
        assert (layer / "big.bin").stat().st_size == len(data)  # the daemon still serves
        subprocess.run(["mount", "-o", "remount,size=4m", str(full_cache_disk)], check=True)
        time.sleep(2.5)  # past the retry pause of a failed fetch
        assert (layer / "big.bin").read_bytes() == data
    finally:
        unmount_whatever_state(mounted.mountpoint)
    problems = mounted.log_problems(accept=True)
    assert not any("Traceback" in line or "unexpected" in line for line in problems), problems
    assert "Traceback" not in mounted.log()


@pytest.mark.parametrize("damage", ["truncate", "swap"])
@pytest.mark.parametrize("compressible", [False, True], ids=["raw+xxh64", "zstd"])
def test_a_cache_file_cut_or_swapped_under_an_open_reader_never_gives_wrong_bytes(
        tmp_path: Path, weed: WeedServer, monkeypatch: pytest.MonkeyPatch, damage: str,
        compressible: bool) -> None:
    from test_reads import drop_caches

    mounted = _mount(tmp_path, weed, monkeypatch, 64 << 20)
    try:
        layer = mounted.layer()
        data = (b"".join(f"{i},{i * 7 % 1000}\n".encode() for i in range(400_000))
                if compressible else os.urandom(3_000_000))
        other = os.urandom(len(data) // 3)  # (one of the same size would pass: see README)
        (layer / "victim").write_bytes(data)
        (layer / "other").write_bytes(other)
        digest = os.getxattr(layer / "victim", "user.cafs.sha256").decode()
        cached = tmp_path / "cache" / digest
        drop_caches()
        with open(layer / "victim", "rb", buffering=0) as reader:
            head = reader.read(65536)
            assert head == data[:65536]
            if damage == "truncate":
                os.truncate(cached, cached.stat().st_size // 2)
            else:  # another blob's file under this digest's name
                other_digest = os.getxattr(layer / "other", "user.cafs.sha256").decode()
                os.link(tmp_path / "cache" / other_digest, tmp_path / "cache" / "x")
                os.rename(tmp_path / "cache" / "x", cached)
            drop_caches()
            try:
                rest = reader.read()
            except OSError as exc:
                assert exc.errno == errno.EIO
            else:
                assert head + rest == data
        drop_caches()
        assert (layer / "victim").read_bytes() == data  # fetched again
    finally:
        unmount_whatever_state(mounted.mountpoint)
    mounted.log_problems(accept=True)
    report = mounted.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_a_cache_directory_shared_by_two_stores_keeps_the_others_fetches(
        tmp_path: Path) -> None:
    """One cafs.toml (/etc/cafs/cafs.toml) names one cache_dir for every store on the host:
    a daemon (or an admin command) starting must not delete the temps another live process is
    downloading into; those of a process that is gone are removed."""
    from cafs.blobstore.cache import FETCH_PREFIX, BlobCache

    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    child = subprocess.Popen(["sleep", "60"])
    try:
        live = directory / f"{FETCH_PREFIX}{child.pid}-1-abcd"
        live.write_bytes(b"half a download")
        dead = subprocess.Popen(["true"])
        dead.wait()
        gone = directory / f"{FETCH_PREFIX}{dead.pid}-1-abcd"
        gone.write_bytes(b"left by a crash")
        odd = directory / f"{FETCH_PREFIX}junk"
        odd.write_bytes(b"no pid in its name")
        BlobCache(directory, 1 << 20).load()
        assert live.exists()
        assert not gone.exists() and not odd.exists()
    finally:
        child.kill()
        child.wait()
