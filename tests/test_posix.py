"""POSIX behaviour cafs means to support, written from the specification (POSIX.1-2017 and the
Linux man pages) for the areas pjdfstest covers: errno of open/create, unlink, rename, mkdir,
rmdir, chmod, chown, truncate and utimensat; permissions for another user on an allow_other
mount; which timestamps each call changes. Where cafs differs by design (README, "POSIX
conformance"), the test asserts the documented behaviour instead, so a change of either is seen.

All tests share one allow_other mount (a mount costs seconds); each works in its own layer.
The other user is uid/gid 65534, in a forked child that drops root exactly as setpriv does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NOBODY, Mount, mounted_for_everyone, reachable_dir, require_fuse

NAME_MAX = 255

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def renameat2(old: Path, new: Path, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0))


def error(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    """The errno name a call fails with, or "0" when it succeeds (an fd it returns is closed)."""
    try:
        result = call(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode[exc.errno] if exc.errno else str(exc)
    if call is os.open and isinstance(result, int):
        os.close(result)
    return "0"


def as_nobody(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    """error(call, ...) run as uid/gid 65534 with no supplementary groups, in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root the way setpriv --reuid --regid --clear-groups does
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.write(write_end, error(call, *args, **kwargs).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and answer, f"the child running {call.__name__} as nobody failed"
    return answer


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One allow_other mount at a mountpoint other users can reach, checked at the end."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("the POSIX tests need root (to act as another user and to chown)")
    store = tmp_path_factory.mktemp("posix") / "store"
    with reachable_dir("cafs-posix-") as parent, mounted_for_everyone(store, parent) as mount:
        yield mount


@pytest.fixture
def here(shared: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh layer for this test (mode 0755, owned by root)."""
    layer = shared.layer("posix", request.node.name.replace("[", "-").rstrip("]"))
    return layer


def make(path: Path, data: bytes = b"x", mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


# -- errno of the namespace operations --------------------------------------------------------


def test_names_longer_than_name_max_are_enametoolong(here: Path) -> None:
    longest, too_long = "n" * NAME_MAX, "n" * (NAME_MAX + 1)
    make(here / "f")
    assert error(os.open, here / too_long, os.O_CREAT | os.O_WRONLY, 0o644) == "ENAMETOOLONG"
    assert error(os.mkdir, here / too_long) == "ENAMETOOLONG"
    assert error(os.rename, here / "f", here / too_long) == "ENAMETOOLONG"
    assert error(os.stat, here / too_long) == "ENAMETOOLONG"
    assert error(os.unlink, here / too_long) == "ENAMETOOLONG"
    # NAME_MAX itself is a valid name, for files, directories and rename targets.
    assert error(os.open, here / longest, os.O_CREAT | os.O_WRONLY, 0o644) == "0"
    assert error(os.mkdir, here / ("d" * NAME_MAX)) == "0"
    assert error(os.rename, here / "f", here / ("r" * NAME_MAX)) == "0"
    assert os.statvfs(here).f_namemax == NAME_MAX


def test_an_existing_name_is_eexist(here: Path) -> None:
    make(here / "file")
    (here / "dir").mkdir()
    assert error(os.mkdir, here / "file") == "EEXIST"
    assert error(os.mkdir, here / "dir") == "EEXIST"
    exclusive = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    assert error(os.open, here / "file", exclusive, 0o644) == "EEXIST"
    assert error(os.open, here / "dir", exclusive, 0o644) == "EEXIST"
    make(here / "other")
    assert error(renameat2, here / "other", here / "file", RENAME_NOREPLACE) == "EEXIST"
    assert (here / "other").read_bytes() == b"x"


def test_a_directory_with_entries_is_enotempty(here: Path) -> None:
    (here / "full").mkdir()
    make(here / "full" / "f")
    (here / "full2").mkdir()
    (here / "full2" / "sub").mkdir()
    (here / "empty").mkdir()
    assert error(os.rmdir, here / "full") == "ENOTEMPTY"
    assert error(os.rmdir, here / "full2") == "ENOTEMPTY"
    assert error(os.rename, here / "empty", here / "full") == "ENOTEMPTY"
    assert sorted(os.listdir(here / "full")) == ["f"]
    assert error(os.rename, here / "full", here / "empty") == "0"  # onto an empty directory
    assert sorted(os.listdir(here)) == ["empty", "full2"]


def test_a_directory_where_a_file_is_needed_is_eisdir(here: Path) -> None:
    (here / "dir").mkdir()
    make(here / "file")
    assert error(os.open, here / "dir", os.O_WRONLY) == "EISDIR"
    assert error(os.open, here / "dir", os.O_RDWR) == "EISDIR"
    assert error(os.open, here / "dir", os.O_CREAT | os.O_WRONLY, 0o644) == "EISDIR"
    assert error(os.truncate, here / "dir", 0) == "EISDIR"
    assert error(os.unlink, here / "dir") == "EISDIR"
    assert error(os.rename, here / "file", here / "dir") == "EISDIR"
    assert (here / "dir").is_dir() and (here / "file").read_bytes() == b"x"


def test_a_file_where_a_directory_is_needed_is_enotdir(here: Path) -> None:
    make(here / "file")
    (here / "dir").mkdir()
    assert error(os.stat, here / "file" / "x") == "ENOTDIR"
    assert error(os.mkdir, here / "file" / "x") == "ENOTDIR"
    assert error(os.open, here / "file" / "x", os.O_CREAT | os.O_WRONLY, 0o644) == "ENOTDIR"
    assert error(os.rmdir, here / "file") == "ENOTDIR"
    assert error(os.rename, here / "dir", here / "file") == "ENOTDIR"
    assert error(os.open, here / "file", os.O_RDONLY | os.O_DIRECTORY) == "ENOTDIR"
    assert error(os.rename, here / "file", f"{here}/new/") == "ENOTDIR"


def test_a_missing_name_is_enoent(here: Path) -> None:
    missing = here / "missing"
    assert error(os.open, missing, os.O_RDONLY) == "ENOENT"
    assert error(os.open, missing / "x", os.O_CREAT | os.O_WRONLY, 0o644) == "ENOENT"
    assert error(os.unlink, missing) == "ENOENT"
    assert error(os.rmdir, missing) == "ENOENT"
    assert error(os.rename, missing, here / "other") == "ENOENT"
    assert error(os.mkdir, missing / "sub") == "ENOENT"
    assert error(os.chmod, missing, 0o600) == "ENOENT"
    assert error(os.chown, missing, 1, 1) == "ENOENT"
    assert error(os.truncate, missing, 0) == "ENOENT"
    assert error(os.utime, missing, None) == "ENOENT"
    assert error(os.open, here, os.O_RDONLY) == "0"  # and the directory itself is fine


def test_moving_a_directory_into_itself_is_einval(here: Path) -> None:
    (here / "a" / "b").mkdir(parents=True)
    assert error(os.rename, here / "a", here / "a" / "b" / "c") == "EINVAL"
    assert error(os.rename, here / "a", here / "a" / "c") == "EINVAL"
    assert error(os.rmdir, f"{here}/a/.") == "EINVAL"  # (pathlib would drop the ".")
    assert (here / "a" / "b").is_dir()


def test_rename_replaces_and_keeps_what_posix_says(here: Path) -> None:
    make(here / "old", b"old")
    make(here / "new", b"new")
    os.rename(here / "new", here / "old")  # over a file: atomically replaced
    assert sorted(os.listdir(here)) == ["old"] and (here / "old").read_bytes() == b"new"
    os.rename(here / "old", here / "old")  # onto itself: nothing happens
    assert (here / "old").read_bytes() == b"new"
    (here / "d1" / "inner").mkdir(parents=True)
    make(here / "d1" / "inner" / "f", b"deep")
    (here / "d2").mkdir()
    os.rename(here / "d1", here / "d2")  # a directory over an empty one
    assert (here / "d2" / "inner" / "f").read_bytes() == b"deep"
    assert not (here / "d1").exists()


def test_directory_link_counts_and_an_unlinked_open_file(here: Path) -> None:
    (here / "d").mkdir()
    assert os.stat(here / "d").st_nlink == 2
    (here / "d" / "s1").mkdir()
    (here / "d" / "s2").mkdir()
    make(here / "d" / "f")
    assert os.stat(here / "d").st_nlink == 4  # 2 + sub-directories; files do not count
    os.rmdir(here / "d" / "s1")
    assert os.stat(here / "d").st_nlink == 3
    make(here / "open", b"still here")
    with open(here / "open", "rb") as reader:
        os.unlink(here / "open")
        assert error(os.stat, here / "open") == "ENOENT"
        assert os.fstat(reader.fileno()).st_nlink == 0
        assert reader.read() == b"still here"


def test_modes_follow_the_request_and_the_umask(here: Path) -> None:
    old = os.umask(0o022)
    try:
        fd = os.open(here / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(here / "d", 0o777)
        os.umask(0)
        fd = os.open(here / "g", os.O_CREAT | os.O_WRONLY, 0o642)
        os.close(fd)
        os.mkdir(here / "e", 0o1751)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(here / "f").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(here / "d").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(here / "g").st_mode) == 0o642
    assert stat.S_IMODE(os.stat(here / "e").st_mode) == 0o1751  # sticky kept on directories
    for mode in (0o600, 0o444, 0o1644, 0o000, 0o777):
        os.chmod(here / "f", mode)
        assert stat.S_IMODE(os.stat(here / "f").st_mode) == mode
    # By design: setuid and setgid never stay on an artifact (create and chmod drop them).
    os.chmod(here / "f", 0o6755)
    assert stat.S_IMODE(os.stat(here / "f").st_mode) == 0o755


def test_chown_by_root_and_ownership_of_new_files(here: Path) -> None:
    make(here / "f")
    os.chown(here / "f", 123, 456)
    assert (os.stat(here / "f").st_uid, os.stat(here / "f").st_gid) == (123, 456)
    os.chown(here / "f", -1, 789)  # -1 leaves that id as it is
    assert (os.stat(here / "f").st_uid, os.stat(here / "f").st_gid) == (123, 789)
    (here / "d").mkdir()
    os.chown(here / "d", 321, 654)
    assert (os.stat(here / "d").st_uid, os.stat(here / "d").st_gid) == (321, 654)
    # A new file belongs to its creator's uid and gid.
    os.chmod(here, 0o777)
    assert as_nobody(make, here / "mine") == "0"
    assert (os.stat(here / "mine").st_uid, os.stat(here / "mine").st_gid) == (NOBODY, NOBODY)


def test_truncate_and_o_trunc_change_the_size(here: Path) -> None:
    make(here / "f", b"0123456789")
    os.truncate(here / "f", 4)
    assert (here / "f").read_bytes() == b"0123"
    os.truncate(here / "f", 8)
    assert (here / "f").read_bytes() == b"0123\0\0\0\0"
    with open(here / "f", "r+b") as handle:
        os.ftruncate(handle.fileno(), 2)
        assert os.fstat(handle.fileno()).st_size == 2
    assert (here / "f").read_bytes() == b"01"
    fd = os.open(here / "f", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(here / "f").st_size == 0
    fd = os.open(here / "f", os.O_RDONLY)
    try:
        assert error(os.ftruncate, fd, 0) == "EINVAL"  # not open for writing
    finally:
        os.close(fd)
    assert error(os.truncate, here / "f", -1) == "EINVAL"


# -- another user (the kernel checks what cafs reports: default_permissions) -----------------


def test_another_user_gets_eacces_without_permission(here: Path) -> None:
    make(here / "public", b"p", 0o644)
    make(here / "secret", b"s", 0o600)
    make(here / "writable", b"w", 0o666)
    (here / "closed").mkdir(mode=0o700)
    make(here / "closed" / "inside", b"i", 0o644)
    nobody_o = os.O_WRONLY | os.O_CREAT
    assert as_nobody(os.open, here / "new", nobody_o, 0o644) == "EACCES"  # 0755 root dir
    assert as_nobody(os.mkdir, here / "newdir") == "EACCES"
    assert as_nobody(os.unlink, here / "public") == "EACCES"
    assert as_nobody(os.rename, here / "public", here / "moved") == "EACCES"
    assert as_nobody(os.rmdir, here / "closed") == "EACCES"
    assert as_nobody(os.open, here / "secret", os.O_RDONLY) == "EACCES"
    assert as_nobody(os.open, here / "public", os.O_WRONLY) == "EACCES"
    assert as_nobody(os.truncate, here / "public", 0) == "EACCES"
    assert as_nobody(os.stat, here / "closed" / "inside") == "EACCES"  # no search permission
    assert as_nobody(os.listdir, here / "closed") == "EACCES"
    assert as_nobody(os.open, here / "public", os.O_RDONLY) == "0"
    # Setting the times to now needs write permission; other times need ownership.
    assert as_nobody(os.utime, here / "public", None) == "EACCES"
    assert as_nobody(os.utime, here / "writable", None) == "0"
    assert as_nobody(os.utime, here / "writable", (1, 1)) == "EPERM"
    assert as_nobody(os.truncate, here / "writable", 0) == "0"
    assert (here / "public").read_bytes() == b"p" and (here / "writable").read_bytes() == b""


def test_another_user_gets_eperm_for_what_only_the_owner_may_do(here: Path) -> None:
    make(here / "roots", b"r", 0o666)
    assert as_nobody(os.chmod, here / "roots", 0o777) == "EPERM"
    assert as_nobody(os.chown, here / "roots", NOBODY, NOBODY) == "EPERM"
    ctime = os.stat(here / "roots").st_ctime_ns
    assert stat.S_IMODE(os.stat(here / "roots").st_mode) == 0o666
    assert os.stat(here / "roots").st_ctime_ns == ctime  # a failed change changes nothing
    os.chmod(here, 0o777)
    assert as_nobody(make, here / "own", b"o", 0o644) == "0"
    assert as_nobody(os.chmod, here / "own", 0o600) == "0"  # the owner may
    assert stat.S_IMODE(os.stat(here / "own").st_mode) == 0o600
    assert as_nobody(os.chown, here / "own", 0, -1) == "EPERM"  # give it away: no
    assert as_nobody(os.chown, here / "own", -1, 0) == "EPERM"  # a group it is not in: no
    assert as_nobody(os.chown, here / "own", NOBODY, NOBODY) == "0"  # its own ids: yes
    # In a sticky directory, only a file's owner (or the directory's) may remove or rename it.
    os.chmod(here, 0o1777)
    make(here / "pinned", b"p", 0o666)
    assert as_nobody(os.unlink, here / "pinned") == "EPERM"
    assert as_nobody(os.rename, here / "pinned", here / "taken") == "EPERM"
    assert as_nobody(os.rename, here / "own", here / "own2") == "0"
    assert as_nobody(os.unlink, here / "own2") == "0"
    assert sorted(os.listdir(here)) == ["pinned", "roots"]


# -- timestamps ----------------------------------------------------------------------------


def times(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def later(before: tuple[int, int], after: tuple[int, int], *, mtime: bool, ctime: bool) -> None:
    """Assert which of (mtime, ctime) moved forward; the others must not have changed."""
    assert (after[0] > before[0]) if mtime else (after[0] == before[0]), ("mtime", before, after)
    assert (after[1] > before[1]) if ctime else (after[1] == before[1]), ("ctime", before, after)


def tick() -> None:
    """Let the clock move past the last timestamp (they are nanoseconds, set by the daemon)."""
    time.sleep(0.002)


def test_creating_and_removing_names_updates_the_directory(here: Path) -> None:
    (here / "d").mkdir()
    (here / "e").mkdir()
    for step in (
        lambda: make(here / "d" / "f"),
        lambda: os.mkdir(here / "d" / "sub"),
        lambda: os.rename(here / "d" / "f", here / "d" / "g"),
        lambda: os.unlink(here / "d" / "g"),
        lambda: os.rmdir(here / "d" / "sub"),
    ):
        before = times(here / "d")
        tick()
        step()
        later(before, times(here / "d"), mtime=True, ctime=True)
    # A rename between directories changes both, and the moved file's ctime, not its mtime.
    make(here / "d" / "moving")
    before_d, before_e = times(here / "d"), times(here / "e")
    before_f = times(here / "d" / "moving")
    tick()
    os.rename(here / "d" / "moving", here / "e" / "moved")
    later(before_d, times(here / "d"), mtime=True, ctime=True)
    later(before_e, times(here / "e"), mtime=True, ctime=True)
    later(before_f, times(here / "e" / "moved"), mtime=False, ctime=True)


def test_writing_and_truncating_update_mtime_and_ctime(here: Path) -> None:
    make(here / "f", b"0123456789")
    parent = times(here)
    for step in (
        lambda: (here / "f").write_bytes(b"new content"),
        lambda: os.truncate(here / "f", 3),
        lambda: os.truncate(here / "f", 30),
        lambda: os.close(os.open(here / "f", os.O_WRONLY | os.O_TRUNC)),
    ):
        before = times(here / "f")
        tick()
        step()
        later(before, times(here / "f"), mtime=True, ctime=True)
    make(here / "f", b"abc")
    with open(here / "f", "r+b") as handle:
        before = times(here / "f")
        tick()
        os.ftruncate(handle.fileno(), 1)
        handle.seek(0, os.SEEK_END)
        handle.write(b"appended")
    later(before, times(here / "f"), mtime=True, ctime=True)
    # Reading, and opening for writing without writing, change nothing.
    before = times(here / "f")
    tick()
    assert (here / "f").read_bytes() == b"aappended"
    os.close(os.open(here / "f", os.O_WRONLY))
    later(before, times(here / "f"), mtime=False, ctime=False)
    assert times(here) == parent  # writing a file does not change its directory


def test_ftruncate_and_write_update_ctime_before_the_close(here: Path) -> None:
    """pjdfstest ftruncate/00.t: a successful ftruncate marks ctime and mtime for update. cafs
    publishes at close, but stat must not wait for that, nor keep the ctime from before."""
    make(here / "f", b"0123456789")
    for step in (lambda fd: os.ftruncate(fd, 123), lambda fd: os.pwrite(fd, b"x", 3)):
        before = times(here / "f")
        tick()
        fd = os.open(here / "f", os.O_RDWR)
        try:
            step(fd)
            during = os.fstat(fd)
        finally:
            os.close(fd)
        later(before, (during.st_mtime_ns, during.st_ctime_ns), mtime=True, ctime=True)
        later(before, times(here / "f"), mtime=True, ctime=True)


def test_chmod_chown_and_utimensat_change_ctime(here: Path) -> None:
    make(here / "f")
    for step in (
        lambda: os.chmod(here / "f", 0o600),
        lambda: os.chown(here / "f", 12, 34),
    ):
        before = times(here / "f")
        tick()
        step()
        later(before, times(here / "f"), mtime=False, ctime=True)
    before = times(here / "f")
    tick()
    os.utime(here / "f", ns=(1_000_000_123, 2_000_000_456))
    mtime, ctime = times(here / "f")
    assert mtime == 2_000_000_456 and ctime > before[1]
    # UTIME_OMIT leaves mtime alone; UTIME_NOW sets it to now.
    utimensat(here / "f", (0, UTIME_NOW), (0, UTIME_OMIT))
    assert times(here / "f")[0] == 2_000_000_456
    start = time.time_ns()
    utimensat(here / "f", (0, UTIME_OMIT), (0, UTIME_NOW))
    assert start - 10_000_000 <= times(here / "f")[0] <= time.time_ns()
    # Times before 1970 and after 2038 are kept.
    for mtime_ns in (-1_000_000_000, 4_102_444_800_000_000_000):
        os.utime(here / "f", ns=(mtime_ns, mtime_ns))
        assert times(here / "f")[0] == mtime_ns
    # An access time set explicitly is kept (m008); reads never change it (noatime).
    os.utime(here / "f", ns=(5_000_000_000, 7_000_000_000))
    st = os.stat(here / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000, 7_000_000_000)
    (here / "f").read_bytes()
    assert os.stat(here / "f").st_atime_ns == 5_000_000_000


# -- what cafs does not support, by design -----------------------------------------------------


def test_special_files_and_links_are_eperm_by_design(here: Path) -> None:
    make(here / "f")
    assert error(os.link, here / "f", here / "hard") == "EPERM"  # symlinks: test_symlinks.py
    assert error(os.mkfifo, here / "fifo") == "EPERM"
    assert error(os.mknod, here / "node", stat.S_IFCHR | 0o644, os.makedev(1, 2)) == "EPERM"
    assert error(os.mknod, here / "plain", stat.S_IFREG | 0o644) == "EPERM"
    make(here / "g", b"g")
    assert error(renameat2, here / "f", here / "g", RENAME_EXCHANGE) == "EINVAL"
    assert sorted(os.listdir(here)) == ["f", "g"] and (here / "g").read_bytes() == b"g"
    assert os.stat(here / "f").st_nlink == 1
