"""Other users on a shared mount (allow_other + default_permissions): the kernel enforces the
permissions cafs reports, and nothing bypasses them. The other user is `nobody`, via setpriv."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOBODY, Mount, as_nobody, mounted_for_everyone, reachable_dir, require_fuse


def denied(result: subprocess.CompletedProcess[str]) -> bool:
    """EACCES, or EPERM where POSIX says only the owner may (chmod, chown, touch -d)."""
    return result.returncode != 0 and (
        "Permission denied" in result.stderr or "Operation not permitted" in result.stderr)


@pytest.fixture
def shared(store: Path) -> Iterator[Mount]:
    """Mounted with allow_other at a mountpoint other users can reach (tmp_path is 0700)."""
    require_fuse()
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("the other-user tests need root and setpriv (util-linux)")
    with reachable_dir("cafs-shared-") as parent, mounted_for_everyone(store, parent) as mount:
        yield mount


def test_another_user_cannot_write_in_or_read_past_the_permissions(shared: Mount) -> None:
    layer = shared.layer("e1", "train")
    (layer / "public.txt").write_text("for everyone\n")
    secret = layer / "secret.bin"
    secret.write_bytes(b"keys\n")
    secret.chmod(0o600)
    digest = os.getxattr(secret, "user.cafs.sha256").decode()
    here = shared.mountpoint

    assert as_nobody("cat runs/e1/train/public.txt", here).stdout == "for everyone\n"
    for command in (
        "cat runs/e1/train/secret.bin",
        "getfattr -n user.cafs.sha256 runs/e1/train/secret.bin",
        f"cat blobs/{digest}",  # blobs/ would bypass the artifact's mode: owner only
        "ls blobs",
        "echo x > runs/e1/train/new.txt",
        "echo x >> runs/e1/train/public.txt",
        "mkdir runs/e1/mine",
        "rm runs/e1/train/public.txt",
        "mv runs/e1/train/public.txt runs/e1/train/moved.txt",
        "setfattr -n user.stage -v hacked runs/e1/train/public.txt",
        "chmod 666 runs/e1/train/public.txt",
        "touch -d 2001-01-01 runs/e1/train/public.txt",
    ):
        assert denied(as_nobody(command, here)), command
    assert sorted(os.listdir(layer)) == ["public.txt", "secret.bin"]
    assert (layer / "public.txt").read_text() == "for everyone\n"
    # runs/ is sticky like /tmp: anyone may start an execution, only its owner removes one.
    result = as_nobody("rm -rf runs/e1", here)
    assert result.returncode != 0 and (layer / "public.txt").exists()
    # The layer's record tells what `ls -l` tells, to those who may list the layer.
    assert '"kind": "layer"' in as_nobody("cat runs/e1/train/.record.json", here).stdout


def test_another_user_owns_what_they_make_and_gets_no_setuid(shared: Mount) -> None:
    here = shared.mountpoint
    result = as_nobody("mkdir -p runs/n1/out && echo mine > runs/n1/out/tool && "
                       "chmod 4755 runs/n1/out/tool && chmod g+s runs/n1/out/tool", here)
    assert result.returncode == 0, result.stderr
    tool = shared.runs / "n1" / "out" / "tool"
    info = tool.stat()
    assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(info.st_mode) == 0o755  # setuid and setgid dropped
    assert denied(as_nobody("chown root runs/n1/out/tool", here))
    assert tool.stat().st_uid == NOBODY
    # The store holds every user's bytes: only its owner may enter it.
    assert stat.S_IMODE(shared.store.stat().st_mode) == 0o700
    assert denied(as_nobody(f"ls {shared.store}", Path("/")))
    # The mount itself can carry no devices and no setuid programs.
    with open("/proc/self/mountinfo") as mounts:
        line = next(line for line in mounts if line.split()[4] == str(here))
    options = set(line.split()[5].split(","))
    assert {"nosuid", "nodev"} <= options, line
    super_options = set(line.split(" - ")[1].split()[2].split(","))
    assert {"default_permissions", "allow_other"} <= super_options, line
