"""Symlinks inside layers, on a real mount, driven by the tools people use (ln, readlink, ls,
mv, rm, touch, cp -a, rsync -a, tar, cafs): made, read, renamed, removed, versioned, sealed,
hashed, exported and imported; refused where files are refused; hard links refused with their
explanation in the daemon's log. Also: migration m006 on a store whose schema is main's, and
hostile bundles holding symlinks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_bundles
from backends import another_store_env, uses
from conftest import (
    BEFORE_M006,
    Mount,
    cafs,
    code_of,
    old_cafs,
    require_fuse,
    sh,
    sha,
    started,
    unmount_whatever_state,
)
from test_bundles import (
    T0,
    bundle,
    entry,
    format2_members,
    format2_records,
    good_header,
    member,
    refused,
    run_import,
    tar_bytes,
    version,
)

from cafs.admin import root_hash
from cafs.model import Kind


def error(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "0"


@contextlib.contextmanager
def unmounted_at_the_end(mountpoint: Path) -> Iterator[None]:
    """A failing check inside `started` must not leave its mount behind."""
    try:
        yield
    finally:
        unmount_whatever_state(mountpoint)


@pytest.fixture
def layer(mount: Mount) -> Path:
    return mount.layer("e1", "train")


def test_ln_s_readlink_ls_and_lstat(layer: Path) -> None:
    (layer / "model.bin").write_bytes(b"weights")
    (layer / "sub").mkdir()
    sh("ln -s model.bin latest && ln -s /etc/hostname abs && ln -s nowhere dangling "
       "&& ln -s ../model.bin sub/up", cwd=layer)
    assert sh("readlink latest", cwd=layer).stdout == b"model.bin\n"
    assert (layer / "latest").read_bytes() == b"weights"  # followed by the kernel
    assert (layer / "sub" / "up").read_bytes() == b"weights"
    assert os.readlink(layer / "abs") == "/etc/hostname"
    assert (layer / "abs").read_bytes() == Path("/etc/hostname").read_bytes()
    assert error(os.stat, layer / "dangling") == "ENOENT"
    info = os.lstat(layer / "latest")
    assert stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o777
    assert info.st_size == len("model.bin") and info.st_nlink == 1
    listing = sh("ls -l", cwd=layer).stdout.decode()
    assert "latest -> model.bin" in listing and listing.count("lrwxrwxrwx") == 3
    assert sorted(os.listdir(layer)) == ["abs", "dangling", "latest", "model.bin", "sub"]
    # Loops: the kernel counts the links it follows and gives ELOOP.
    sh("ln -s loop1 loop2 && ln -s loop2 loop1", cwd=layer)
    assert error(os.stat, layer / "loop1") == "ELOOP"
    assert error(os.open, layer / "latest", os.O_RDONLY | os.O_NOFOLLOW) == "ELOOP"


def test_target_length_limits(layer: Path) -> None:
    longest = "t/" * 2047 + "x"  # 4095 bytes: PATH_MAX without its NUL
    os.symlink(longest, layer / "long")
    assert os.readlink(layer / "long") == longest
    assert os.lstat(layer / "long").st_size == 4095
    assert error(os.symlink, longest + "y", layer / "longer") == "ENAMETOOLONG"
    assert error(os.symlink, "", layer / "empty") == "ENOENT"
    assert error(os.symlink, "x", layer / ("n" * 256)) == "ENAMETOOLONG"
    assert sorted(os.listdir(layer)) == ["long"]


def test_rename_replace_and_remove(layer: Path, mount: Mount) -> None:
    (layer / "a.bin").write_bytes(b"a")
    (layer / "b.bin").write_bytes(b"b")
    os.symlink("a.bin", layer / "cur")
    (layer / "d").mkdir()
    sh("mv cur d/cur && ln -sfn ../b.bin d/cur", cwd=layer)  # ln -sfn: new link renamed over
    assert os.readlink(layer / "d" / "cur") == "../b.bin"
    # A symlink renamed over a file replaces it, and a file over a symlink.
    os.symlink("b.bin", layer / "tmp")
    os.rename(layer / "tmp", layer / "a.bin")
    assert os.readlink(layer / "a.bin") == "b.bin"
    os.rename(layer / "b.bin", layer / "d" / "cur")
    assert not os.path.islink(layer / "d" / "cur")
    assert (layer / "d" / "cur").read_bytes() == b"b"
    # Moves into other layers and runs work; into an execution directory or runs/ not.
    other = mount.layer("e2", "eval")
    os.rename(layer / "a.bin", other / "link")
    assert os.readlink(other / "link") == "b.bin"
    assert error(os.rename, other / "link", mount.runs / "e2" / "link") == "EPERM"
    assert error(os.rename, other / "link", mount.runs / "link") == "EPERM"
    os.unlink(other / "link")
    assert os.listdir(other) == []
    sh("ln -s x d/deep && rm -rf d", cwd=layer)
    assert os.listdir(layer) == []


def test_touch_h_sets_the_links_own_time(layer: Path) -> None:
    (layer / "f").write_bytes(b"f")
    os.utime(layer / "f", ns=(1_600_000_000 * 10**9,) * 2)
    os.symlink("f", layer / "l")
    sh("touch -h -d @1500000000 l", cwd=layer)
    assert os.lstat(layer / "l").st_mtime == 1_500_000_000
    assert os.stat(layer / "f").st_mtime == 1_600_000_000  # the target is untouched
    os.chmod(layer / "l", 0o600)  # Linux has no lchmod: chmod follows the link
    assert stat.S_IMODE(os.stat(layer / "f").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(layer / "l").st_mode) == 0o777
    os.chown(layer / "l", 1234, 1234, follow_symlinks=False)
    assert (os.lstat(layer / "l").st_uid, os.stat(layer / "f").st_uid) == (1234, 0)


def test_refused_where_files_are_refused(mount: Mount) -> None:
    mount.layer("e1", "train")
    assert error(os.symlink, "x", mount.runs / "l") == "EPERM"
    assert error(os.symlink, "x", mount.runs / "e1" / "l") == "EPERM"
    assert error(os.symlink, "x", mount.mountpoint / "l") == "EPERM"
    assert error(os.symlink, "x", mount.mountpoint / "blobs" / "l") == "EROFS"
    assert error(os.symlink, "x", mount.runs / "e1" / "train" / ".record.json") == "EEXIST"
    assert os.listdir(mount.runs / "e1" / "train") == []


def test_hard_links_are_eperm_and_explained_once(layer: Path, mount: Mount) -> None:
    (layer / "f").write_bytes(b"f")
    assert error(os.link, layer / "f", layer / "g") == "EPERM"
    assert error(os.link, layer / "f", layer / "h") == "EPERM"
    explained = [line for line in mount.log().splitlines() if "hard link refused" in line]
    assert len(explained) == 1 and "tar --hard-dereference" in explained[0]
    assert os.stat(layer / "f").st_nlink == 1


def _tree_with_links(root: Path) -> Path:
    (root / "snapshots" / "abc").mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "blobs" / "1f2e").write_bytes(os.urandom(5000))
    (root / "model.bin").write_bytes(b"model" * 100)
    os.symlink("model.bin", root / "latest")
    os.symlink("../../blobs/1f2e", root / "snapshots" / "abc" / "config.json")  # HF cache shape
    os.symlink("/nonexistent/target", root / "dangling")
    return root


def test_cp_a_rsync_a_and_tar_keep_symlinks(layer: Path, tmp_path: Path) -> None:
    source = _tree_with_links(tmp_path / "src")
    sh(f"cp -a {source} {layer}/cp")
    sh(f"rsync -a {source}/ {layer}/rsync/")
    sh(f"tar cf {tmp_path}/t.tar -C {source} .")
    (layer / "tar").mkdir()
    result = sh(f"tar xf {tmp_path}/t.tar -C {layer}/tar")
    assert result.returncode == 0 and result.stderr == b""
    for copy in ("cp", "rsync", "tar"):
        sh(f"diff -r --no-dereference {source} {layer}/{copy}")
        assert os.readlink(layer / copy / "latest") == "model.bin"
        assert (layer / copy / "snapshots" / "abc" / "config.json").read_bytes() == \
            (source / "blobs" / "1f2e").read_bytes()
    # And back out again, as symlinks.
    sh(f"cp -a {layer}/tar {tmp_path}/back")
    assert os.readlink(tmp_path / "back" / "dangling") == "/nonexistent/target"


def test_a_tarball_with_latest_unpacks(layer: Path, tmp_path: Path) -> None:
    """The report's case: `latest -> model.bin` in a tarball failed with EPERM, rc 2."""
    with tarfile.open(tmp_path / "m.tar", "w") as tar:
        data = tmp_path / "model.bin"
        data.write_bytes(b"m" * 1000)
        tar.add(data, "model.bin")
        link = tarfile.TarInfo("latest")
        link.type, link.linkname = tarfile.SYMTYPE, "model.bin"
        tar.addfile(link)
    result = subprocess.run(["tar", "xf", str(tmp_path / "m.tar")], cwd=layer,
                            capture_output=True)
    assert (result.returncode, result.stderr) == (0, b"")
    assert (layer / "latest").read_bytes() == b"m" * 1000


def test_history_records_find_and_gc(layer: Path, mount: Mount) -> None:
    (layer / "model.bin").write_bytes(b"m")
    sh("ln -s run-1 latest && ln -sfn run-2 latest", cwd=layer)
    log = json.loads(cafs("log", "--json", str(layer / "latest")).stdout)
    assert [v["sha256"] for v in log["versions"]] == [sha(b"run-1"), sha(b"run-2")]
    assert [v["current"] for v in log["versions"]] == [False, True]
    assert cafs("cat", f"{layer}/latest@{log['versions'][0]['version']}").stdout == "run-1"
    record = json.loads((layer / ".record.json").read_bytes())
    assert (record["artifacts"], record["logical_bytes"]) == (2, 1 + len("run-2"))
    found = json.loads(cafs("find", "--store", str(mount.store), "--run", "e1",
                            "--json").stdout)
    assert sorted(found["paths"]) == ["runs/e1/train/latest", "runs/e1/train/model.bin"]
    assert cafs("find", "--store", str(mount.store), "--sha256", sha(b"run-2")
                ).stdout.split() == ["runs/e1/train/latest"]
    # The target is a blob like any content: gc keeps it while history holds it.
    os.unlink(layer / "latest")
    gc = json.loads(cafs("gc", "--store", str(mount.store), "--json").stdout)
    assert gc["blobs_removed"] == 2  # both targets: the deleted link's history went with it
    assert not os.path.lexists(mount.mountpoint / "blobs" / sha(b"run-2"))


def test_sealed_runs_refuse_symlink_changes(layer: Path, mount: Mount) -> None:
    (layer / "f").write_bytes(b"f")
    os.symlink("f", layer / "l")
    cafs("seal", str(mount.runs / "e1"))
    assert error(os.symlink, "f", layer / "m") == "EROFS"
    assert error(os.unlink, layer / "l") == "EROFS"
    assert error(os.rename, layer / "l", layer / "l2") == "EROFS"
    assert error(os.utime, layer / "l", (1, 1), follow_symlinks=False) == "EROFS"
    assert error(os.rename, layer / "f", layer / "l") == "EROFS"
    assert os.readlink(layer / "l") == "f"
    cafs("unseal", str(mount.runs / "e1"))


def test_root_hash_tells_a_symlink_from_a_file(mount: Mount) -> None:
    a, b = mount.layer("a", "l"), mount.layer("b", "l")
    (a / "x").write_bytes(b"model.bin")
    os.symlink("model.bin", b / "x")
    roots = []
    for run in ("a", "b"):
        cafs("seal", str(mount.runs / run))
        roots.append(os.getxattr(mount.runs / run, "user.cafs.root").decode())
    assert roots[0] != roots[1]
    assert roots[0] == root_hash([("l/x", sha(b"model.bin"))])  # files: as before m006
    assert roots[1] == root_hash([("l/x", sha(b"model.bin"), Kind.SYMLINK)])
    for run in ("a", "b"):
        cafs("unseal", str(mount.runs / run))


def test_export_import_round_trip(layer: Path, mount: Mount, tmp_path: Path) -> None:
    (layer / "model.bin").write_bytes(b"weights")
    (layer / "d").mkdir()
    (layer / "d" / "was-file").write_bytes(os.urandom(5000))
    sh("ln -s model.bin latest && ln -sfn ../model.bin d/up && ln -s /abs/path d/abs "
       "&& ln -sfn ../../model.bin d/up && ln -sfn ../model.bin d/was-file", cwd=layer)
    cafs("seal", str(mount.runs / "e1"))
    root = os.getxattr(mount.runs / "e1", "user.cafs.root").decode()
    out = tmp_path / "e1.tar"
    cafs("export", str(mount.runs / "e1"), "-o", str(out))
    cafs("unseal", str(mount.runs / "e1"))
    other = Mount(tmp_path / "other", tmp_path / "other-mnt")
    other.env = another_store_env(tmp_path)
    other.mountpoint.mkdir()
    with unmounted_at_the_end(other.mountpoint), started(other):  # a store's first mount
        pass  # makes it
    cafs("import", "--store", str(other.store), str(out), env=other.env)
    with unmounted_at_the_end(other.mountpoint), started(other):
        there = other.runs / "e1" / "train"
        assert os.readlink(there / "latest") == "model.bin"
        assert os.readlink(there / "d" / "up") == "../../model.bin"
        assert os.readlink(there / "d" / "abs") == "/abs/path"
        assert os.getxattr(other.runs / "e1", "user.cafs.root").decode() == root
        log = json.loads(cafs("log", "--json", str(there / "d" / "up")).stdout)
        assert len(log["versions"]) == 2
        assert os.readlink(there / "d" / "was-file") == "../model.bin"  # not the file it replaced
        sh(f"diff -r --no-dereference {layer} {there}")


# -- hostile bundles holding symlinks ------------------------------------------------------


def _link_header(target: bytes, name: str = "latest", **version_fields: object
                 ) -> dict[str, Any]:
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry(f"train/{name}", "symlink", mode=0o777,
                                   versions=[version(target, **version_fields)]))
    header["blobs"].append({"sha256": sha(target), "size": len(target)})
    return header


def _link_bundle(target: bytes, name: str = "latest", **version_fields: object) -> bytes:
    return bundle(_link_header(target, name, **version_fields), [b"m", target])


@pytest.fixture(params=[1, 2])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The bundle format test_bundles builds in: 1 (one header), 2 (header, then lines)."""
    monkeypatch.setattr(test_bundles, "LAYOUT", request.param)
    return int(request.param)


def test_bundles_with_bad_symlinks_are_refused(mount: Mount, layout: int) -> None:
    store = mount.store
    refused(store, _link_bundle(b"t" * 5000), "a symlink's target is 5000 bytes, not 1 to 4095")
    refused(store, _link_bundle(b""), "a symlink's target is 0 bytes, not 1 to 4095")
    refused(store, _link_bundle(b"a\0b"), "train/latest: a symlink's target cannot hold NUL")
    refused(store, _link_bundle(b"x", name=".."), "bad name in bundle")
    refused(store, _link_bundle(b"x", name="a" * 256), "bad name in bundle")
    refused(store, _link_bundle(b"x", name=".record.json"), "the name .record.json is reserved")
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry("link", "symlink", versions=[version(b"x")]))
    header["blobs"].append({"sha256": sha(b"x"), "size": 1})
    refused(store, bundle(header, [b"m", b"x"]), "a symlink cannot be in a execution")
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry("train/l", "symlink"))
    refused(store, bundle(header, [b"m"]), "train/l: versions is not a list" if layout == 1
            else "train/l: an artifact without any version")
    # An older version of the link holding NUL is refused as its current one is.
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry("train/l", "symlink", versions=[
        version(b"bad\0old", created_ns=T0 - 1), version(b"model.bin")]))
    header["blobs"] += [{"sha256": sha(b"bad\0old"), "size": 7},
                        {"sha256": sha(b"model.bin"), "size": 9}]
    refused(store, bundle(header, [b"m", b"bad\0old", b"model.bin"]), "cannot hold NUL")
    # The same bundle with a sound target imports, its mode forced to 0777.
    result = run_import(store, _link_bundle(b"model.bin", mode=0o600), "--as", "ok")
    assert result.returncode == 0, result.stderr
    link = mount.runs / "ok" / "train" / "latest"
    assert os.readlink(link) == "model.bin"
    assert stat.S_IMODE(os.lstat(link).st_mode) == 0o777


def test_a_target_the_store_or_a_file_holds_is_still_checked(mount: Mount, layout: int) -> None:
    """A target's bytes are checked whoever else uses them: content the store already has (so
    the import does not store it) and a file of the same bundle holding the same bytes."""
    store = mount.store
    (mount.layer("e0") / "has-nul").write_bytes(b"a\0b")
    refused(store, _link_bundle(b"a\0b"), "train/latest: a symlink's target cannot hold NUL")
    header = good_header({"model.bin": b"m", "copy": b"c\0d"})
    header["entries"].append(entry("train/l", "symlink", versions=[version(b"c\0d")]))
    refused(store, bundle(header, [b"m", b"c\0d"]), "train/l: a symlink's target cannot hold NUL")


def test_format_2_symlink_lines_are_held_to_the_same_rules(mount: Mount) -> None:
    """Pieces only format 2 has: versions belong on lines of their own, a version follows its
    symlink's entry, and a symlink's version line is checked as a target."""
    store = mount.store
    header, records, blobs = format2_records(_link_header(b"model.bin"))
    link = next(i for i, r in enumerate(records) if r.get("kind") == "symlink")

    def build(records: list[dict[str, object]], header: dict[str, object] = header) -> bytes:
        return tar_bytes([*format2_members(header, records, blobs),
                          member(f"blobs/{sha(b'm')}", b"m"),
                          member(f"blobs/{sha(b'model.bin')}", b"model.bin")])

    assert run_import(store, build(records), "--as", "fine").returncode == 0
    inline = [*records[:link], {**records[link], "versions": []}, *records[link + 1:]]
    refused(store, build(inline), "train/latest: versions belong on lines of their own")
    swapped = [*records[:link], records[link + 1], records[link], *records[link + 2:]]
    refused(store, build(swapped), "a version of 'train/latest' that does not follow")
    big = [*records[:link + 1], {**records[link + 1], "size": 4096}, *records[link + 2:]]
    refused(store, build(big), "a symlink's target is 4096 bytes, not 1 to 4095")


def test_a_sealed_run_with_symlinks_imports_in_format_2(mount: Mount, layout: int) -> None:
    """Its root is checked as seal computes it: a symlink's line marked as one. A bundle whose
    root treats the symlink as a file holding its target is inconsistent."""
    store = mount.store
    header = _link_header(b"model.bin")
    as_file = root_hash([("train/model.bin", sha(b"m")), ("train/latest", sha(b"model.bin"))])
    header["execution"].update(sealed_ns=T0, root_sha256=as_file)
    refused(store, bundle(header, [b"m", b"model.bin"]), "do not give its recorded root hash")
    root = root_hash([("train/model.bin", sha(b"m")),
                      ("train/latest", sha(b"model.bin"), Kind.SYMLINK)])
    header["execution"]["root_sha256"] = root
    result = run_import(store, bundle(header, [b"m", b"model.bin"]), "--as", "sealed")
    assert result.returncode == 0, result.stderr
    run = mount.runs / "sealed"
    assert os.getxattr(run, "user.cafs.root").decode() == root
    assert os.readlink(run / "train" / "latest") == "model.bin"
    cafs("unseal", str(run))
    cafs("seal", str(run))  # computed again from the manifest: the same root
    assert os.getxattr(run, "user.cafs.root").decode() == root
    cafs("unseal", str(run))


# -- migration m006 on a store made before it ----------------------------------------------


@pytest.mark.skipif(uses("postgresql"), reason="a migration of manifest.sqlite")
def test_migration_m006_on_a_store_made_before_it(unstarted_mount: Mount,
                                                  tmp_path: Path) -> None:
    require_fuse()
    code = code_of(BEFORE_M006, tmp_path / "old")
    mount = unstarted_mount
    old_cafs(code, "mount", "--store", str(mount.store), str(mount.mountpoint))
    layer = mount.layer("e1", "train")
    (layer / "sub").mkdir()
    (layer / "sub" / "a.csv").write_text("a,b\n1,2\n")
    (layer / "gone").write_bytes(b"x")
    os.unlink(layer / "gone")  # the highest inode number is now free: it must stay unused
    gone_ino_floor = os.stat(layer / "sub").st_ino + 2
    os.setxattr(layer / "sub" / "a.csv", "user.stage", b"prod")
    old_cafs(code, "umount", str(mount.mountpoint))
    old = sqlite3.connect(f"file:{mount.store}/manifest.sqlite?mode=ro", uri=True)
    try:  # the old schema refuses a symlink row
        assert "'symlink'" not in old.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'nodes'").fetchone()[0]
    finally:
        old.close()
    mount.start()  # migrates
    assert (layer / "sub" / "a.csv").read_text() == "a,b\n1,2\n"
    assert os.getxattr(layer / "sub" / "a.csv", "user.stage") == b"prod"
    os.symlink("sub/a.csv", layer / "latest")
    assert (layer / "latest").read_text() == "a,b\n1,2\n"
    assert os.lstat(layer / "latest").st_ino > gone_ino_floor  # never reused
    assert cafs("find", "--store", str(mount.store), "--tag", "stage=prod"
                ).stdout.split() == ["runs/e1/train/sub/a.csv"]
    mount.stop()
    db = sqlite3.connect(f"file:{mount.store}/manifest.sqlite?mode=ro", uri=True)
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"executions", "layers", "artifacts", "nodes_unpublished", "nodes_first_write",
            "nodes_last_write", "tags_value", "versions_path"} <= names
    assert db.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 1
    db.close()
    mount.assert_clean()
