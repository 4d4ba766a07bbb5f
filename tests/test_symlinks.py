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

import pytest
from conftest import Mount, cafs, require_fuse, sh, sha, started, unmount_whatever_state
from test_bundles import bundle, entry, good_header, refused, run_import, version

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
    other.mountpoint.mkdir()
    with unmounted_at_the_end(other.mountpoint), started(other):  # a store's first mount
        pass  # makes it
    cafs("import", "--store", str(other.store), str(out))
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


def _link_bundle(target: bytes, name: str = "latest", **version_fields: object) -> bytes:
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry(f"train/{name}", "symlink", mode=0o777,
                                   versions=[version(target, **version_fields)]))
    header["blobs"].append({"sha256": sha(target), "size": len(target)})
    return bundle(header, [b"m", target])


def test_bundles_with_bad_symlinks_are_refused(mount: Mount) -> None:
    store = mount.store
    refused(store, _link_bundle(b"t" * 5000), "a symlink's target is 5000 bytes, not 1 to 4095")
    refused(store, _link_bundle(b"a\0b"), "cannot hold NUL")
    refused(store, _link_bundle(b"x", name=".."), "bad name in bundle")
    refused(store, _link_bundle(b"x", name="a" * 256), "bad name in bundle")
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry("link", "symlink", versions=[version(b"x")]))
    header["blobs"].append({"sha256": sha(b"x"), "size": 1})
    refused(store, bundle(header, [b"m", b"x"]), "a symlink cannot be in a execution")
    header = good_header({"model.bin": b"m"})
    header["entries"].append(entry("train/l", "symlink"))
    refused(store, bundle(header, [b"m"]), "train/l: versions is not a list")
    # The same bundle with a sound target imports, its mode forced to 0777.
    result = run_import(store, _link_bundle(b"model.bin", mode=0o600), "--as", "ok")
    assert result.returncode == 0, result.stderr
    link = mount.runs / "ok" / "train" / "latest"
    assert os.readlink(link) == "model.bin"
    assert stat.S_IMODE(os.lstat(link).st_mode) == 0o777


# -- migration m006 on a store made before it ----------------------------------------------


def _as_before_m006(manifest: Path) -> None:
    """Put the schema back exactly as stores made before m006 have it (checked against a fresh
    schema built up to m005), keeping every row: what a store made by the current main holds."""
    from sqlite_utils import Database

    from cafs import schema

    fresh = Database(sqlite3.connect(":memory:"))
    schema.migrations.apply(fresh, stop_before="m006_symlinks")
    for statement in schema._M008:  # a later column (m008, atime) is in the store too
        fresh.execute(statement)
    main_sql = fresh.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'nodes'").fetchone()[0]
    db = sqlite3.connect(manifest)
    sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'nodes'").fetchone()[0]
    old = sql.replace(schema._KIND_AFTER, schema._KIND_BEFORE).replace(
        'CREATE TABLE "nodes" (', "CREATE TABLE nodes (")
    assert old == main_sql
    version = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'nodes'", (old,))
    db.execute(f"PRAGMA schema_version = {version + 1}")
    db.execute("PRAGMA writable_schema = OFF")
    db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm006_symlinks'")
    db.commit()
    db.close()
    check = sqlite3.connect(manifest)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    try:
        check.execute("INSERT INTO nodes (parent_id, name, kind, mode, uid, gid, mtime_ns, "
                      "ctime_ns) VALUES (2, 'x', 'symlink', 511, 0, 0, 0, 0)")
        raise AssertionError("the old CHECK should refuse a symlink")
    except sqlite3.IntegrityError:
        pass
    check.close()


def test_migration_m006_on_a_store_made_before_it(unstarted_mount: Mount) -> None:
    require_fuse()
    mount = unstarted_mount
    mount.start()
    layer = mount.layer("e1", "train")
    (layer / "sub").mkdir()
    (layer / "sub" / "a.csv").write_text("a,b\n1,2\n")
    (layer / "gone").write_bytes(b"x")
    os.unlink(layer / "gone")  # the highest inode number is now free: it must stay unused
    gone_ino_floor = os.stat(layer / "sub").st_ino + 2
    os.setxattr(layer / "sub" / "a.csv", "user.stage", b"prod")
    mount.stop()
    _as_before_m006(mount.store / "manifest.sqlite")
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
