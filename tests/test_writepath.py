"""Write-path holes on a real mount: writes through a shared mapping after close(), bytes of a
failed rewrite left in the kernel's cache, a main loop that fails unexpectedly, fallocate."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Mount,
    cafs,
    is_mounted,
    require_fuse,
    sh,
    unmount_whatever_state,
    wait_dead,
    write_artifact,
)

# Maps the file with libc's mmap, which keeps no descriptor of its own (Python's mmap module
# keeps a dup, whose close sends a FLUSH), then closes the only descriptor before writing: the
# kernel sends the WRITEs and then RELEASE, never another FLUSH. HOW ends it: munmap, msync
# (MS_SYNC sends FSYNC) then munmap, or process exit with the mapping still in place.
MAP_AFTER_CLOSE = textwrap.dedent("""
    import ctypes, mmap, os, sys
    path, size, fill, how = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    os.close(fd)
    ctypes.memmove(addr, fill * size, size)
    if how == "msync":
        if libc.msync(addr, size, 4) != 0:  # MS_SYNC
            sys.exit(f"msync: {os.strerror(ctypes.get_errno())}")
        print("synced", flush=True)
        sys.stdin.read()  # the test crashes the daemon now; the mapping stays until then
    if how in ("munmap", "msync"):
        libc.munmap(addr, size)
    os._exit(0)
""")


def map_after_close(path: Path, size: int, fill: bytes, how: str) -> None:
    subprocess.run([sys.executable, "-c", MAP_AFTER_CLOSE, str(path), str(size), fill.decode(),
                    how], check=True, timeout=60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remount(mount: Mount) -> None:
    mount.stop()
    mount.start()


@pytest.mark.parametrize("how", ["munmap", "exit"])
def test_shared_mapping_written_after_close_is_published(mount: Mount, how: str) -> None:
    layer = mount.layer()
    size = 3 * 4096 + 100
    map_after_close(layer / "new", size, b"B", how)  # a new file
    write_artifact(layer / "old", b"o" * 50_000)
    map_after_close(layer / "old", size, b"C", how)  # a rewrite in place (truncated to size)
    remount(mount)
    assert sha((layer / "new").read_bytes()) == sha(b"B" * size)
    assert sha((layer / "old").read_bytes()) == sha(b"C" * size)
    out = sh(f"sha256sum {layer}/new {layer}/old").stdout.decode().split()
    assert out[0] == sha(b"B" * size) and out[2] == sha(b"C" * size)


def test_msync_of_a_mapping_after_close_makes_it_durable(unstarted_mount: Mount) -> None:
    """msync(MS_SYNC) sends FSYNC: the bytes survive a crash of the daemon right after it."""
    mount = unstarted_mount
    mount.start()
    layer = mount.layer()
    size = 2 * 4096
    script = [sys.executable, "-c", MAP_AFTER_CLOSE, str(layer / "synced"), str(size), "S",
              "msync"]
    with subprocess.Popen(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as writer:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == b"synced\n"
        mount.kill9()  # the writer still maps the file: no RELEASE has come
        writer.stdin.close()
        writer.wait(timeout=30)
    mount.start()
    assert (layer / "synced").read_bytes() == b"S" * size
    mount.stop()
    assert not mount.log_problems()
    assert mount.fsck("--full").returncode == 0


def test_python_mmap_flows(mount: Mount) -> None:
    """Python's mmap module and the np.memmap pattern: open, map, close the file, write,
    flush (msync), del."""
    layer = mount.layer()
    size = 5 * 4096 + 7
    with open(layer / "memmap", "w+b") as f:  # np.memmap(mode="w+")
        f.truncate(size)
        mapped = mmap.mmap(f.fileno(), size)
    mapped[:] = b"M" * size
    mapped.flush()
    del mapped
    with open(layer / "memmap", "r+b") as f:  # np.memmap(mode="r+"): change a few bytes
        mapped = mmap.mmap(f.fileno(), size)
    mapped[4096:4100] = b"edit"
    mapped.close()
    with open(layer / "plain", "w+b") as f:  # written while the descriptor is open
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as mapped:
            mapped[:] = b"P" * size
    expected = bytearray(b"M" * size)
    expected[4096:4100] = b"edit"
    remount(mount)
    assert sha((layer / "memmap").read_bytes()) == sha(bytes(expected))
    assert (layer / "plain").read_bytes() == b"P" * size


@pytest.fixture
def capped(unstarted_mount: Mount) -> Iterator[Mount]:
    unstarted_mount.options = ("max_artifact_size=1048576",)
    unstarted_mount.start()
    yield unstarted_mount
    unstarted_mount.stop()
    assert not unstarted_mount.log_problems()
    assert unstarted_mount.fsck("--full").returncode == 0


def read_elsewhere(path: Path) -> bytes:
    """Read as another process would: a new descriptor, through the kernel's caches."""
    return sh(f"cat {path}").stdout


@pytest.mark.parametrize("old_size", [64 * 1024, 4096])
def test_failed_rewrite_leaves_no_unpublished_bytes_in_the_cache(capped: Mount,
                                                                 old_size: int) -> None:
    layer = capped.layer()
    path = layer / "artifact"
    write_artifact(path, b"A" * old_size)
    assert read_elsewhere(path) == b"A" * old_size  # in the kernel's page cache now
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"N" * (64 * 1024), 0)  # succeeds: the kernel caches these pages
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 1 << 20)  # beyond max_artifact_size
        assert info.value.errno == errno.EFBIG
        assert read_elsewhere(path) == b"A" * old_size
        assert os.stat(path).st_size == old_size
    finally:
        with pytest.raises(OSError):
            os.close(fd)  # sticky: nothing is published
    assert read_elsewhere(path) == b"A" * old_size
    assert path.read_bytes() == b"A" * old_size and os.stat(path).st_size == old_size


def test_a_truncate_beyond_the_maximum_fails_the_descriptor_as_a_whole(capped: Mount) -> None:
    """ftruncate beyond max_artifact_size fails like a write beyond it: sticky, so close()
    reports EFBIG and the rewrite before it is never published. truncate(2) by path beyond the
    maximum just fails."""
    layer = capped.layer()
    path = layer / "artifact"
    write_artifact(path, b"A" * 4096)
    version = os.getxattr(path, "user.cafs.version")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"F" * 10, 0)
        with pytest.raises(OSError) as info:
            os.ftruncate(fd, 3 << 20)
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"G", 0)
        assert info.value.errno == errno.EFBIG
    finally:
        with pytest.raises(OSError) as info:
            os.close(fd)
    assert info.value.errno == errno.EFBIG
    assert read_elsewhere(path) == b"A" * 4096
    assert path.read_bytes() == b"A" * 4096 and os.stat(path).st_size == 4096
    assert os.getxattr(path, "user.cafs.version") == version  # no new version published
    with pytest.raises(OSError) as info:
        os.truncate(path, 3 << 20)
    assert info.value.errno == errno.EFBIG
    os.truncate(path, 10)  # nothing sticks to the path
    assert read_elsewhere(path) == b"A" * 10


def test_failed_rewrite_on_a_full_disk_leaves_no_unpublished_bytes(tmp_path: Path) -> None:
    """ENOSPC instead of EFBIG: the store on a 12 MiB tmpfs. (Here the failed writes grew the
    file, and the kernel drops its pages when it sees the size change back; the test above
    keeps the size.)"""
    require_fuse()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=700", "tmpfs", str(small)],
                   check=True)
    mount = Mount(small / "store", tmp_path / "mnt")
    mount.mountpoint.mkdir()
    try:
        mount.start()
        path = mount.layer() / "artifact"
        write_artifact(path, b"A" * 65536)
        assert read_elsewhere(path) == b"A" * 65536
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"N" * 65536, 0)
            with pytest.raises(OSError) as info:
                for offset in range(65536, 64 << 20, 1 << 20):
                    os.pwrite(fd, os.urandom(1 << 20), offset)
            assert info.value.errno == errno.ENOSPC
            assert read_elsewhere(path) == b"A" * 65536
            assert os.stat(path).st_size == 65536
        finally:
            with pytest.raises(OSError):
                os.close(fd)
        assert path.read_bytes() == b"A" * 65536
        mount.stop()
        assert not mount.log_problems()
        assert mount.fsck("--full").returncode == 0
    finally:
        unmount_whatever_state(mount.mountpoint)
        subprocess.run(["umount", str(small)], check=True)


def test_unexpected_failure_of_the_main_loop_leaves_a_dead_mount(unstarted_mount: Mount
                                                                 ) -> None:
    """Writers must get ENOTCONN, never write into the directory under the mount."""
    mount = unstarted_mount
    mount.start()
    write_artifact(mount.layer() / "kept", b"kept")
    mount.stop()
    mount.start(env={"CAFS_CRASH_AT": "raise-in-main-loop"})
    pid = mount.daemon_pid()
    assert wait_dead(pid, timeout=30)
    assert is_mounted(mount.mountpoint)
    with pytest.raises(OSError) as info:
        (mount.mountpoint / "stray").write_bytes(b"lost")
    assert info.value.errno == errno.ENOTCONN
    for call in (os.listdir, os.mkdir):
        with pytest.raises(OSError) as info:
            call(mount.runs / "e2")
        assert info.value.errno == errno.ENOTCONN
    assert "InjectedFailure" in mount.log()  # the unexpected failure is logged with its traceback
    mount.log_problems(accept=True)
    result = cafs("mount", "--store", str(mount.store), str(mount.mountpoint), check=False)
    assert result.returncode != 0 and "cafs umount" in result.stderr
    assert "Traceback" not in result.stderr
    cafs("umount", str(mount.mountpoint))  # no --lazy needed for a dead mount
    assert not is_mounted(mount.mountpoint)
    assert os.listdir(mount.mountpoint) == []  # nothing landed underneath
    mount.start()
    assert (mount.runs / "e1" / "train" / "kept").read_bytes() == b"kept"
    mount.stop()
    assert not mount.log_problems()
    assert mount.fsck("--full").returncode == 0


def test_fallocate(mount: Mount) -> None:
    """pyfuse3 has no fallocate handler, so the kernel answers EOPNOTSUPP; glibc's
    posix_fallocate falls back to writing, which works. Nothing worse than ext4 results."""
    layer = mount.layer()
    result = sh(f"fallocate -l 1M {layer}/new", check=False)
    assert result.returncode != 0 and b"Operation not supported" in result.stderr
    # The file was created before fallocate failed (as on any filesystem where it fails).
    assert (layer / "new").read_bytes() == b""
    write_artifact(layer / "old", b"old content")
    version = os.getxattr(layer / "old", "user.cafs.version")
    result = sh(f"fallocate -l 1M {layer}/old", check=False)
    assert result.returncode != 0
    assert (layer / "old").read_bytes() == b"old content"  # untouched, no new version
    assert os.getxattr(layer / "old", "user.cafs.version") == version
    sh(f"fallocate -x -l 1M {layer}/posix")  # posix_fallocate: glibc writes zeros
    fd = os.open(layer / "py", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 100_000)
    finally:
        os.close(fd)
    remount(mount)
    assert (layer / "posix").read_bytes() == bytes(1 << 20)
    assert (layer / "py").read_bytes() == bytes(100_000)
    assert (layer / "old").read_bytes() == b"old content"


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"partial" * 1000)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)  # exits normally without closing: the exit closes it, and it publishes
""")


def test_a_writer_killed_by_a_signal_publishes_nothing(mount: Mount) -> None:
    layer = mount.layer()
    write_artifact(layer / "old", b"old content")
    for name in ("new", "old"):
        result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(layer / name), "kill"],
                                timeout=60)
        assert result.returncode == -9
    assert not (layer / "new").exists()
    assert (layer / "old").read_bytes() == b"old content"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(layer / "exited"), "exit"],
                   check=True, timeout=60)
    assert (layer / "exited").read_bytes() == b"partial" * 1000
    remount(mount)
    assert sorted(os.listdir(layer)) == ["exited", "old"]
    assert (layer / "old").read_bytes() == b"old content"
