"""The command line: clear one-line errors with documented exit codes, help for every command,
and fsck finding each kind of damage."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CAFS, Mount, cafs, require_fuse, sh, small_tmpfs

from cafs import schema
from cafs.cli import cli, helper_form


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    for name, command in cli.commands.items():  # type: ignore[attr-defined]
        out = runner.invoke(cli, [name, "--help"]).output
        assert "Example:" in out, f"cafs {name} --help has no example"
        assert command.help, name


def test_missing_mountpoint(tmp_path: Path) -> None:
    result = cafs("mount", "--store", str(tmp_path / "s"), str(tmp_path / "nope"), check=False)
    assert_clean_failure(result, 4, "does not exist")


def test_a_mistyped_command_is_not_taken_for_a_store(tmp_path: Path) -> None:
    """`cafs unmount MNT` once ran as mount(8)'s helper form, mounting a store named
    "unmount" in the working directory (or saying MNT was already mounted). It is a usage
    error that names the command it meant; the helper form still takes a path."""
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([*CAFS, "unmount", str(tmp_path / "mnt")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No such command 'unmount'" in result.stderr and "umount" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unmount").exists()
    assert helper_form(["store", "mnt", "-o", "rw"])[:3] == ["mount", "--store", "store"]
    assert helper_form(["/srv/cafs", "/mnt/a"])[:3] == ["mount", "--store", "/srv/cafs"]
    assert helper_form(["unmount", "/mnt/a"]) == ["unmount", "/mnt/a"]


def test_store_inside_mountpoint_and_the_reverse(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = cafs("mount", "--store", str(mnt / "store"), str(mnt), check=False)
    assert_clean_failure(result, 3, "inside the mountpoint")
    store = tmp_path / "store"
    (store / "m").mkdir(parents=True, mode=0o700)
    result = cafs("mount", "--store", str(store), str(store / "m"), check=False)
    assert_clean_failure(result, 3, "inside the store")


def test_unusable_stores(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    not_a_dir = tmp_path / "file-store"
    not_a_dir.write_text("x")
    assert_clean_failure(cafs("mount", "--store", str(not_a_dir), str(mnt), check=False), 3,
                         "not a directory")
    open_to_all = tmp_path / "open-store"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert_clean_failure(cafs("mount", "--store", str(open_to_all), str(mnt), check=False), 3,
                         "world-writable")
    assert_clean_failure(cafs("stats", "--store", str(tmp_path / "none"), check=False), 3,
                         "no store")
    assert_clean_failure(cafs("umount", str(mnt), check=False), 4, "not a cafs mount")
    result = cafs("mount", "-o", "bogus", "--store", str(tmp_path / "s"), str(mnt), check=False)
    assert result.returncode == 2 and "unknown mount option" in result.stderr


def test_corrupt_manifest_refuses_to_mount(tmp_path: Path) -> None:
    require_fuse()
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    (store / "manifest.sqlite").write_bytes(b"garbage" * 1000)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = cafs("mount", "--store", str(store), str(mnt), check=False)
    assert_clean_failure(result, 3, "not a usable cafs manifest")
    assert "Traceback" not in (store / "daemon.log").read_text()
    assert not os.path.ismount(mnt)


def populate(mount: Mount) -> dict[str, Path]:
    layer = mount.layer()
    (layer / "text.csv").write_text("".join(f"{i},{i * i % 977},x{i % 13}\n"
                                            for i in range(50_000)))
    (layer / "raw.bin").write_bytes(os.urandom(50_000))
    (layer / "shared1").write_text("shared\n")
    (layer / "shared2").write_text("shared\n")
    return {name: layer / name for name in ("text.csv", "raw.bin", "shared1")}


def blob_path(mount: Mount, artifact: Path) -> Path:
    digest = os.getxattr(artifact, "user.cafs.sha256").decode()
    return mount.store / "blobs" / digest[:2] / digest


def test_fsck_finds_each_kind_of_damage(mount: Mount) -> None:
    files = populate(mount)
    blobs = {name: blob_path(mount, path) for name, path in files.items()}
    mount.stop()
    assert mount.fsck("--full").returncode == 0
    # Garbage (what a crash leaves) is listed but is not damage.
    (mount.store / "tmp" / "w-stray").write_bytes(b"x")
    orphan = mount.store / "blobs" / "ab" / ("ab" + "0" * 62)
    orphan.write_bytes(b"orphan")
    os.utime(orphan, (1_600_000_000, 1_600_000_000))  # older than the manifest's last commit
    report = mount.fsck()
    assert report.returncode == 0
    assert "temp file w-stray" in report.stdout and "orphan" in report.stdout
    # A flipped byte in a compressed blob: found by --full only.
    raw = bytearray(blobs["text.csv"].read_bytes())
    raw[100] ^= 0xFF
    blobs["text.csv"].write_bytes(bytes(raw))
    assert mount.fsck().returncode == 0
    report = mount.fsck("--full")
    assert report.returncode == 1 and "DAMAGE" in report.stdout
    # A deleted blob and a wrong refcount: found by the quick check.
    blobs["raw.bin"].unlink()
    with sqlite3.connect(mount.store / "manifest.sqlite") as db:
        db.execute("UPDATE blobs SET refcount = 9 WHERE refcount = 2")
    report = mount.fsck()
    assert report.returncode == 1
    assert "missing" in report.stdout and "refcount 9, but 2" in report.stdout
    # Reading damaged artifacts through the mount gives EIO, never wrong bytes.
    mount.start()
    for name in ("text.csv", "raw.bin"):
        with pytest.raises(OSError) as info:
            files[name].read_bytes()
        assert info.value.errno == errno.EIO
    mount.log_problems(accept=True)
    # Undo the damage so the fixture's closing fsck is about the daemon, not this test.
    mount.stop()
    blobs["text.csv"].write_bytes(bytes(raw[:100]) + bytes([raw[100] ^ 0xFF]) + bytes(raw[101:]))
    orphan.unlink()
    with sqlite3.connect(mount.store / "manifest.sqlite") as db:
        db.execute("UPDATE blobs SET refcount = 2 WHERE refcount = 9")
        db.execute("DELETE FROM nodes WHERE name = 'raw.bin'")
        db.execute("UPDATE blobs SET refcount = 0 WHERE sha256 = ?", (blobs["raw.bin"].name,))
        db.execute("DELETE FROM versions WHERE blob_id = (SELECT id FROM blobs WHERE sha256 = ?)",
                   (blobs["raw.bin"].name,))
        db.execute("DELETE FROM blobs WHERE sha256 = ?", (blobs["raw.bin"].name,))
        schema.recompute_aggregates(db)  # the directories' totals without raw.bin
    mount.start()


def test_enospc_reaches_the_writer_and_publishes_nothing(tmp_path: Path) -> None:
    """A real full disk: the store on a 12 MiB tmpfs. Writers get ENOSPC while a reserve
    (2 MiB here) stays free for the manifest, so renames, tags and deletes still commit; df
    reports the space above the reserve; after rm and gc everything works again."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a small tmpfs")
    small = small_tmpfs(tmp_path / "small", "12m")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = Mount(small / "store", mnt)
    try:
        mount.start()
        layer = mount.layer()
        reserve = 2 << 20

        def available(path: Path) -> int:
            info = os.statvfs(path)
            return info.f_bavail * info.f_frsize

        assert abs(available(mnt) - (available(small) - reserve)) <= 8192
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(20 << 20))
        result = sh(f"cp {big} {layer}/big.bin", check=False)
        assert result.returncode != 0 and b"No space left" in result.stderr
        assert not (layer / "big.bin").exists()
        assert list((mount.store / "tmp").iterdir()) == []
        # Fill it with closed artifacts until the next one does not fit.
        stored = 0
        for index in range(20):
            result = sh(f"head -c 1000000 /dev/urandom > {layer}/part{index}", check=False)
            if result.returncode != 0:
                assert b"No space left" in result.stderr
                break
            stored += 1
        assert 5 <= stored < 12 and available(mnt) < 1 << 20
        assert 0 < available(small) <= reserve + (1 << 20)  # the reserve is still there
        # Manifest changes still commit on the full disk.
        os.rename(layer / "part0", layer / "renamed")
        os.setxattr(layer / "renamed", "user.note", b"written on a full disk")
        (mount.runs / "e1" / "notes").mkdir()
        for index in range(1, stored):
            (layer / f"part{index}").unlink()
        cafs("gc", "--store", str(mount.store))  # the blobs' space comes back
        assert available(mnt) > 6 << 20
        (layer / "after.bin").write_bytes(b"x" * (3 << 20))
        assert (layer / "after.bin").read_bytes() == b"x" * (3 << 20)
        assert os.getxattr(layer / "renamed", "user.note") == b"written on a full disk"
        assert cafs("fsck", "--full", "--store", str(mount.store)).returncode == 0
        assert not mount.log_problems()
    finally:
        mount.stop()
        subprocess.run(["umount", str(small)], check=True)
