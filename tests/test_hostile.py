"""Hostile input on a real mount: the daemon stays up, logs no traceback, and answers with the
right errno. (Names, special files, a corrupt manifest and unsafe stores are covered in
test_mount.test_names_and_places and test_cli.)"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, sh, started


def expect_errno(code: int, call: object, *args: object) -> None:
    with pytest.raises(OSError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.errno == code, f"{info.value!r}, expected {errno.errorcode[code]}"


@pytest.fixture
def capped(unstarted_mount: Mount) -> Iterator[Mount]:
    """A mount with small limits: 1 MiB artifacts, 1000 descriptors for open files."""
    with started(unstarted_mount, "max_artifact_size=1048576", "max_open_files=1000") as mount:
        yield mount


def test_writes_beyond_the_maximum_artifact_size_get_efbig(capped: Mount) -> None:
    layer = capped.layer()
    fd = os.open(layer / "edge", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x", (1 << 20) - 1)  # the last byte allowed
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x", 1 << 20)
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x", 1 << 62)
    finally:
        expect_errno(errno.EFBIG, os.close, fd)  # the failure is sticky: nothing is published
    assert not (layer / "edge").exists()
    source = capped.store.parent / "two-mib"
    source.write_bytes(b"z" * (2 << 20))
    result = sh(f"cp {source} {layer}/big", check=False)
    assert result.returncode != 0 and b"File too large" in result.stderr
    assert not (layer / "big").exists()  # gone when cp's write failed, before its close
    (layer / "small").write_bytes(b"fits")
    result = sh(f"truncate -s 1T {layer}/small", check=False)
    assert result.returncode != 0 and b"File too large" in result.stderr
    assert (layer / "small").read_bytes() == b"fits"


def test_the_default_maximum_refuses_a_terabyte(mount: Mount) -> None:
    # 256 GiB by default: `truncate -s 1T` would have the daemon hash a terabyte of zeros.
    layer = mount.layer()
    (layer / "sparse").write_bytes(b"")
    result = sh(f"truncate -s 1T {layer}/sparse", check=False)
    assert result.returncode != 0 and b"File too large" in result.stderr
    assert (layer / "sparse").stat().st_size == 0


def test_thousands_of_open_files_meet_a_clean_emfile(capped: Mount) -> None:
    layer = capped.layer()
    (layer / "existing").write_bytes(b"closed before the others open\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    opened: list[int] = []
    refused = 0
    try:
        for index in range(2500):
            try:
                opened.append(os.open(layer / f"f{index}", os.O_WRONLY | os.O_CREAT, 0o644))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                refused += 1
        # The cap counts descriptors: a file open for writing holds two (its temp, and its
        # blob's reader once published), so 1000 descriptors are 500 such files.
        assert (len(opened), refused) == (500, 2000)
        expect_errno(errno.EMFILE, os.open, layer / "existing", os.O_RDONLY)
        os.close(os.open(layer / "f0", os.O_RDONLY))  # its descriptors are counted already
        for index, fd in enumerate(opened):
            os.write(fd, f"file {index}\n".encode())
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Every file that opened was published; none that was refused exists; opening works again.
    names = os.listdir(layer)
    assert len(names) == 501 and "f499" in names and "f500" not in names
    assert (layer / "f499").read_text() == "file 499\n"


def test_xattrs_at_and_over_the_limits(mount: Mount) -> None:
    path = mount.layer() / "tagged"
    path.write_bytes(b"data")
    largest = os.urandom(65536)  # XATTR_SIZE_MAX
    os.setxattr(path, "user.big", largest)
    assert os.getxattr(path, "user.big") == largest
    expect_errno(errno.E2BIG, os.setxattr, path, "user.bigger", largest + b"x")  # the kernel
    longest = "user." + "n" * 250  # XATTR_NAME_MAX = 255
    os.setxattr(path, longest, b"1")
    assert os.getxattr(path, longest) == b"1"
    expect_errno(errno.ERANGE, os.setxattr, path, longest + "n", b"1")
    # Per artifact: 1 MiB of values, then ENOSPC (as ext4 runs out of xattr space).
    stored = 0
    with pytest.raises(OSError) as info:
        for index in range(40):
            os.setxattr(path, f"user.v{index}", largest)
            stored += 1
    assert info.value.errno == errno.ENOSPC and 10 <= stored < 16
    # Names: listxattr must fit its 64 KiB buffer.
    os.removexattr(path, "user.big")
    with pytest.raises(OSError) as info:
        for index in range(2000):
            os.setxattr(path, f"user.{index:04d}" + "x" * 90, b"")
    assert info.value.errno == errno.ENOSPC
    names = os.listxattr(path)
    assert len(names) > 500 and "user.cafs.sha256" in names
    assert os.getxattr(path, "user.cafs.sha256").decode() == hashlib.sha256(b"data").hexdigest()
    assert "user.cafs.size" in sh(f"getfattr -d -m - {path}").stdout.decode()


def test_an_xattr_name_that_is_not_utf8(mount: Mount) -> None:
    """Tag names are text, as file names are: setting one that is not UTF-8 is EILSEQ, as
    creating such a file is (it was ENODATA, "No data available", an errno setxattr never
    gives); reading or removing it is ENODATA: no such attribute exists."""
    path = mount.layer() / "tagged"
    path.write_bytes(b"data")
    expect_errno(errno.EILSEQ, os.setxattr, path, b"user.\xff", b"v")
    expect_errno(errno.ENODATA, os.getxattr, path, b"user.\xff")
    expect_errno(errno.ENODATA, os.removexattr, path, b"user.\xff")
    assert not [name for name in os.listxattr(path) if not name.startswith("user.cafs.")]


def test_special_files_and_links_are_refused(mount: Mount) -> None:
    layer = mount.layer()
    (layer / "real").write_bytes(b"x")
    expect_errno(errno.EPERM, os.mknod, layer / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    expect_errno(errno.EPERM, os.mknod, layer / "sock", stat.S_IFSOCK | 0o600)
    expect_errno(errno.EPERM, os.mkfifo, layer / "fifo")
    expect_errno(errno.EPERM, os.link, layer / "real", layer / "hard")
    expect_errno(errno.EPERM, os.symlink, "/etc/passwd", layer.parent / "link")
    # A symlink is kept, not followed by cafs: the kernel follows it with the caller's rights.
    os.symlink("/etc/passwd", layer / "link")
    assert os.readlink(layer / "link") == "/etc/passwd"
    assert sorted(os.listdir(layer)) == ["link", "real"]


def blob_file(mount: Mount, artifact: Path) -> Path:
    digest = os.getxattr(artifact, "user.cafs.sha256").decode()
    return mount.store / "blobs" / digest[:2] / digest


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
def test_a_flipped_byte_in_a_blob_reads_eio_never_wrong_bytes(mount: Mount,
                                                             compressible: bool) -> None:
    layer = mount.layer()
    data = (b"epoch,loss\n" * 60_000) if compressible else os.urandom(600_000)
    (layer / "victim").write_bytes(data)
    blob = blob_file(mount, layer / "victim")
    mount.stop()
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    blob.write_bytes(bytes(raw))
    mount.start()
    result = sh(f"cat {layer}/victim", check=False)
    assert result.returncode != 0 and b"Input/output error" in result.stderr
    # What came out before the damaged block is the true content; nothing else ever does.
    assert data.startswith(result.stdout) and len(result.stdout) < len(data)
    assert (layer / "victim").stat().st_size == len(data)  # metadata still answers
    problems = mount.log_problems()
    mount.log_problems(accept=True)
    # A flipped byte fails the frame's (or block's) checksum, or zstd's own decoding first:
    # in a frame's content ("decompression error"), or in its header, where the byte in the
    # middle of the blob lands with 64 KiB frames ("... from frame header").
    damage = ("fails its checksum", "decompression error", "frame header")
    assert problems and all(any(d in line for d in damage) for line in problems), problems
    check = mount.fsck("--full")
    assert check.returncode == 1 and any(d in check.stdout for d in damage)
    # Repair marks it; writing the same bytes again heals it.
    assert mount.fsck("--repair").returncode == 0
    (mount.layer("e1", "again") / "copy").write_bytes(data)
    assert (layer / "victim").read_bytes() == data


def test_symlinks_planted_in_the_store_are_never_followed(mount: Mount, tmp_path: Path) -> None:
    layer = mount.layer()
    (layer / "artifact").write_bytes(b"genuine\n" * 10)
    blob = blob_file(mount, layer / "artifact")
    mount.stop()
    # blobs/: a link to a file with the very same bytes is still refused (O_NOFOLLOW).
    outside = tmp_path / "outside-blob"
    shutil.copyfile(blob, outside)
    blob.unlink()
    blob.symlink_to(outside)
    # tmp/: links to a precious file and to a directory; start-up removes the links only.
    precious = tmp_path / "precious"
    precious.write_text("do not touch\n")
    (mount.store / "tmp" / "w-planted").symlink_to(precious)
    (mount.store / "tmp" / "w-dir").symlink_to(tmp_path)
    mount.start()
    result = sh(f"cat {layer}/artifact", check=False)
    assert result.returncode != 0 and b"Input/output error" in result.stderr
    assert result.stdout == b""
    assert precious.read_text() == "do not touch\n" and outside.exists()
    assert sorted(os.listdir(mount.store / "tmp")) == []
    assert any("Too many levels of symbolic links" in line for line in mount.log_problems())
    mount.log_problems(accept=True)  # the refused blob was logged as an error, as it should
    blob.unlink()
    shutil.copyfile(outside, blob)
    assert (layer / "artifact").read_bytes() == b"genuine\n" * 10


def test_a_daemon_out_of_descriptors_fails_writes_cleanly(mount: Mount) -> None:
    """Below the cap, the daemon itself may run out (its limit lowered under it): writers get
    an errno, every close() that succeeded is published, nothing else is, fsck stays clean."""
    layer = mount.layer()
    pid = mount.daemon_pid()
    limits = sh(f"prlimit --pid {pid} --nofile --noheadings --output SOFT,HARD").stdout.split()
    sh(f"prlimit --pid {pid} --nofile=64:{limits[1].decode()}")  # only the soft limit
    # Over the 1 MiB a write may keep in memory, so every open file needs a temp file.
    shared = b"the same bytes everywhere\n" * 45_000
    (layer / "first").write_bytes(shared)
    published, failed = {"first": shared}, []
    try:
        opened = []  # until the daemon has no descriptor left
        for index in range(100):
            try:
                opened.append(os.open(layer / f"f{index}", os.O_WRONLY | os.O_CREAT))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        # Every file written before any is closed: each holds a temp file (content over the
        # 1 MiB kept in memory), so the daemon runs out while writes or closes are under way.
        # Content the store has: publishing needs no new blob, only a reader for it.
        for fd in opened:
            with contextlib.suppress(OSError):  # a failed write is sticky: close reports it
                os.write(fd, shared)  # (a short count when the second WRITE request fails)
        for index, fd in enumerate(opened):
            try:
                os.close(fd)
                published[f"f{index}"] = shared
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                failed.append(index)
    finally:
        sh(f"prlimit --pid {pid} --nofile={limits[0].decode()}:{limits[1].decode()}")
    assert failed and len(published) > 1  # some closes published, some failed
    assert {name: (layer / name).read_bytes() for name in os.listdir(layer)} == published
    assert mount.fsck("--full").returncode == 0
    mount.log_problems(accept=True)  # "Too many open files" is logged as a warning or error
