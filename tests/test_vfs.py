"""The core without a mount: POSIX semantics of Vfs, driven directly under trio."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from cafs.errors import CafsError
from cafs.model import BLOBS_INODE, ROOT_INODE, RUNS_INODE, AttrChanges, Caller
from cafs.namespace import READDIR_PAGE
from cafs.store import Store
from cafs.vfs import Vfs

T = TypeVar("T")
ALICE = Caller(uid=1000, gid=1000)


class Runtime:
    def new_lock(self) -> trio.Lock:
        return trio.Lock()

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    async def run_short(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    def requests_waiting(self) -> bool:
        return True


@pytest.fixture
def vfs(tmp_path: Path) -> Vfs:
    store = Store.open(tmp_path / "store")
    return Vfs(store.manifest, store.blobs, Runtime())


def layer(vfs: Vfs) -> int:
    execution = vfs.mkdir(RUNS_INODE, b"e1", 0o755, ALICE).ino
    return vfs.mkdir(execution, b"train", 0o755, ALICE).ino


def write_file(vfs: Vfs, parent: int, name: bytes, data: bytes) -> int:
    async def go() -> int:
        fh, attr = await vfs.create(parent, name, 0o644, os.O_WRONLY, ALICE)
        await vfs.write(fh, 0, data)
        await vfs.flush(fh)
        vfs.release(fh)
        return attr.ino
    return trio.run(go)


def read_all(vfs: Vfs, ino: int) -> bytes:
    async def go() -> bytes:
        fh = await vfs.open(ino, os.O_RDONLY, ALICE)
        data = await vfs.read(fh, 0, 1 << 30)
        vfs.release(fh)
        return data
    return trio.run(go)


def expect_errno(code: int, fn: Callable[[], object]) -> None:
    with pytest.raises(CafsError) as info:
        fn()
    assert info.value.errno == code


def test_layout_rules(vfs: Vfs) -> None:
    parent = layer(vfs)
    expect_errno(errno.EPERM, lambda: trio.run(vfs.create, RUNS_INODE, b"f", 0o644, 0, ALICE))
    expect_errno(errno.EPERM, lambda: trio.run(vfs.create, ROOT_INODE, b"f", 0o644, 0, ALICE))
    expect_errno(errno.EPERM, lambda: vfs.mkdir(ROOT_INODE, b"d", 0o755, ALICE))
    expect_errno(errno.EROFS, lambda: vfs.mkdir(BLOBS_INODE, b"d", 0o755, ALICE))
    expect_errno(errno.EEXIST, lambda: vfs.mkdir(RUNS_INODE, b"e1", 0o755, ALICE))
    expect_errno(errno.ENAMETOOLONG, lambda: vfs.mkdir(parent, b"x" * 256, 0o755, ALICE))
    expect_errno(errno.EILSEQ, lambda: vfs.mkdir(parent, b"\xff", 0o755, ALICE))
    expect_errno(errno.ENOENT, lambda: vfs.lookup(parent, b"missing"))
    sub = vfs.mkdir(parent, b"sub", 0o755, ALICE)
    assert vfs.getattr(parent).nlink == 3
    assert sub.uid == ALICE.uid


def test_write_publish_read_and_dedup(vfs: Vfs) -> None:
    parent = layer(vfs)
    data = os.urandom(3 << 20)  # large enough to hash and publish in a worker thread
    a = write_file(vfs, parent, b"a", data)
    b = write_file(vfs, parent, b"b", data)
    assert read_all(vfs, a) == data == read_all(vfs, b)
    digest = vfs.getxattr(a, b"user.cafs.sha256").decode()
    assert digest == hashlib.sha256(data).hexdigest()
    assert vfs.getxattr(b, b"user.cafs.refcount") == b"2"
    assert vfs.lookup(BLOBS_INODE, digest.encode()).size == len(data)
    assert vfs.manifest.totals().blobs == 1


def test_failed_write_is_sticky_and_nothing_is_published(vfs: Vfs) -> None:
    parent = layer(vfs)

    async def go() -> None:
        fh, _attr = await vfs.create(parent, b"broken", 0o644, os.O_WRONLY, ALICE)
        await vfs.write(fh, 0, b"good start")
        inode = vfs._handles[fh].inode
        assert inode.temp is not None
        inode.temp.materialize()  # a small write is in memory: give it its file
        os.close(inode.temp.fd)  # the temp file's descriptor goes bad: writes now fail
        with pytest.raises(OSError):
            await vfs.write(fh, 10, b"more")
        for call in (vfs.write(fh, 14, b"x"), vfs.flush(fh), vfs.fsync(fh)):
            with pytest.raises(CafsError) as info:
                await call
            assert info.value.errno == errno.EBADF
        assert inode.temp is None  # dropped at the failure: nothing left to publish
        vfs.release(fh)

    trio.run(go)
    expect_errno(errno.ENOENT, lambda: vfs.lookup(parent, b"broken"))
    assert vfs.manifest.totals().artifacts == 0
    assert list(vfs.blobs.tmp_dir.iterdir()) == []


def test_copy_on_write_and_reads_of_work_in_progress(vfs: Vfs) -> None:
    parent = layer(vfs)
    ino = write_file(vfs, parent, b"f", b"0123456789")

    async def go() -> None:
        fh = await vfs.open(ino, os.O_RDWR, ALICE)
        await vfs.write(fh, 2, b"ab")
        assert await vfs.read(fh, 0, 100) == b"01ab456789"  # readers see the write in progress
        assert vfs.getattr(ino).size == 10
        assert vfs.getxattr(ino, b"user.cafs.sha256").decode() == hashlib.sha256(
            b"0123456789").hexdigest()  # not published yet
        await vfs.flush(fh)
        vfs.release(fh)
        await vfs.setattr(ino, AttrChanges(size=4), None, ALICE)

    trio.run(go)
    assert read_all(vfs, ino) == b"01ab"
    assert vfs.manifest.totals().versions == 3


def test_unlink_while_open_then_release(vfs: Vfs) -> None:
    parent = layer(vfs)
    ino = write_file(vfs, parent, b"f", b"content")

    async def go() -> None:
        fh = await vfs.open(ino, os.O_RDONLY, ALICE)
        vfs.unlink(parent, b"f")
        assert vfs.getattr(ino).nlink == 0
        assert await vfs.read(fh, 0, 100) == b"content"
        vfs.release(fh)

    trio.run(go)
    expect_errno(errno.ENOENT, lambda: vfs.getattr(ino))


def test_rename_rules(vfs: Vfs) -> None:
    parent = layer(vfs)
    write_file(vfs, parent, b"a", b"A")
    write_file(vfs, parent, b"b", b"B")
    sub = vfs.mkdir(parent, b"d", 0o755, ALICE).ino
    expect_errno(errno.EEXIST, lambda: vfs.rename(parent, b"a", parent, b"b", 1))
    expect_errno(errno.EINVAL, lambda: vfs.rename(parent, b"d", sub, b"inner", 0))
    expect_errno(errno.EPERM, lambda: vfs.rename(parent, b"a", RUNS_INODE, b"a", 0))
    expect_errno(errno.EISDIR, lambda: vfs.rename(parent, b"a", parent, b"d", 0))
    vfs.rename(parent, b"a", parent, b"b", 0)
    assert read_all(vfs, vfs.lookup(parent, b"b").ino) == b"A"
    assert vfs.manifest.totals().artifacts == 1
    assert vfs.manifest.refcount_drift() == []


def test_readdir_pages_through_large_directories(vfs: Vfs) -> None:
    parent = layer(vfs)
    names = {f"f{i:04d}".encode() for i in range(2 * READDIR_PAGE + 176)}  # three pages
    for name in names:
        vfs.mkdir(parent, name, 0o755, ALICE)
    seen = []
    position = 0
    while True:  # resume from the last position, as the kernel does
        batch = []
        for name, _attr, next_position in vfs.readdir(parent, position):
            batch.append(name)
            position = next_position
            if len(batch) == 100:
                break
        if not batch:
            break
        seen += batch
    assert len(seen) == len(names) and set(seen) == names


def test_only_user_xattrs_and_one_errno_for_the_others(vfs: Vfs) -> None:
    parent = layer(vfs)
    ino = write_file(vfs, parent, b"f", b"data")
    blob = vfs.lookup(BLOBS_INODE, vfs.getxattr(ino, b"user.cafs.sha256")).ino
    # Names outside user.* get EOPNOTSUPP from every call, wherever they point (ls caches it).
    calls: list[Callable[[int, bytes], object]] = [
        vfs.getxattr, lambda node, name: vfs.setxattr(node, name, b"v"), vfs.removexattr]
    for node in (ino, parent, blob, ROOT_INODE):
        for name in (b"security.selinux", b"trusted.x", b"system.posix_acl_access"):
            for call in calls:
                expect_errno(errno.EOPNOTSUPP, functools.partial(call, node, name))
    vfs.setxattr(ino, b"user.stage", b"prod")
    assert vfs.getxattr(ino, b"user.stage") == b"prod"
    assert b"user.stage" in vfs.listxattr(ino)
    expect_errno(errno.EPERM, lambda: vfs.setxattr(ino, b"user.cafs.sha256", b"00"))
    expect_errno(errno.EPERM, lambda: vfs.removexattr(ino, b"user.cafs.size"))
    expect_errno(errno.EROFS, lambda: vfs.setxattr(blob, b"user.x", b"v"))
    vfs.removexattr(ino, b"user.stage")
    expect_errno(errno.ENODATA, lambda: vfs.getxattr(ino, b"user.stage"))
    expect_errno(errno.ENODATA, lambda: vfs.removexattr(ino, b"user.stage"))


def test_the_kernel_drops_attributes_two_racing_answers_may_have_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Of two answers about one file in flight, the kernel keeps the first it applies: once
    an answer gives another version than the last one did, the kernel must drop what it
    holds (OpenTable.tell is True), or a page-cache read of one version runs with another's
    size (test_hosts_feed's rereading test)."""
    from cafs import openfiles
    table = openfiles.OpenTable(max_open_files=100)
    assert not table.tell(5, 1)  # never told: the kernel holds nothing of it
    assert not table.tell(5, 1)
    assert table.tell(5, 2)
    assert not table.tell(5, 2)
    table.told_by_writes(5, 3)  # the kernel saw the bytes written: nothing to drop
    assert not table.tell(5, 3)
    table.forget_told()  # the change feed may have missed rows
    assert table.tell(5, 3)
    assert table.told[5] == 3
    # Bounded: the inode told least recently goes first.
    monkeypatch.setattr(openfiles, "TOLD_KEPT", 2)
    table.tell(6, 1)
    table.tell(5, 3)  # told again: now the most recent
    table.tell(7, 1)
    assert sorted(table.told) == [5, 7]
    table.told_by_writes(8, 1)  # publishes count against the same bound
    assert sorted(table.told) == [7, 8]
