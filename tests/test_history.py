"""History through a real mount: a path keeps every version it held through renames (rsync's
temp file, `mv` over it, an editor's save, `cp` over it, rm then re-create), per-path version
numbers 1..n that gc never renumbers and two writers never share, and `cafs stats` numbers
checked against what the test computes itself from the files it wrote."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from backends import StoredBlobs, uses
from conftest import (
    BEFORE_M006,
    Mount,
    cafs,
    cafs_bytes,
    code_of,
    log_of,
    old_cafs,
    sh,
    sha,
    xattr,
)


def shas(path: Path | str, *store: str) -> list[str]:
    return [version["sha256"] for version in log_of(path, *store)]


def numbers(path: Path | str, *store: str) -> list[int]:
    return [version["version"] for version in log_of(path, *store)]


def assert_every_version_readable(path: Path, contents: list[bytes]) -> None:
    """`cafs log` lists exactly these contents as versions 1..n, oldest first, the last one
    current, and `cafs cat PATH@N` gives each back."""
    versions = log_of(path)
    assert [v["sha256"] for v in versions] == [sha(c) for c in contents]
    assert [v["version"] for v in versions] == list(range(1, len(contents) + 1))
    assert [v["current"] for v in versions] == [False] * (len(contents) - 1) + [True]
    for number, content in enumerate(contents, start=1):
        assert cafs_bytes("cat", f"{path}@{number}") == content
    assert xattr(path, "user.cafs.version") == str(len(contents))


# -- history follows a path through renames --------------------------------------------------


def test_three_rsyncs_of_a_changing_file_leave_three_versions(mount: Mount, tmp_path: Path
                                                              ) -> None:
    layer = mount.layer("e", "l")
    source = tmp_path / "src"
    source.mkdir()
    contents = [f"lr: {rate}\nepochs: 10\n".encode() for rate in (0.1, 0.01, 0.001)]
    for content in contents:
        (source / "cfg.yaml").write_bytes(content)
        sh(f"rsync -a {source}/cfg.yaml {layer}/cfg.yaml")  # .cfg.yaml.XXXXXX, then rename
    assert (layer / "cfg.yaml").read_bytes() == contents[-1]
    assert_every_version_readable(layer / "cfg.yaml", contents)
    assert sorted(os.listdir(layer)) == ["cfg.yaml"]


def test_mv_over_a_file_twice_keeps_every_version_it_held(mount: Mount) -> None:
    layer = mount.layer()
    (layer / "b").write_bytes(b"b: the first\n")
    (layer / "a").write_bytes(b"a: one\n")
    sh(f"mv {layer}/a {layer}/b")
    (layer / "a").write_bytes(b"a: two\n")
    sh(f"mv {layer}/a {layer}/b")
    assert_every_version_readable(layer / "b", [b"b: the first\n", b"a: one\n", b"a: two\n"])
    # The versions went with the file: nothing is left under the old name.
    gone = cafs("log", str(layer / "a"), check=False)
    assert gone.returncode == 1 and "no such artifact" in gone.stderr


def test_cp_over_rm_then_recreate_and_an_editor_save_each_keep_the_history(
        mount: Mount, tmp_path: Path) -> None:
    layer = mount.layer()
    path = layer / "notes.txt"
    contents = [b"one\n", b"two: cp over it\n", b"three: after rm\n", b"four: editor save\n",
                b"five: editor save again\n"]
    source = tmp_path / "src.txt"
    path.write_bytes(contents[0])
    source.write_bytes(contents[1])
    sh(f"cp {source} {path}")
    sh(f"rm {path}")
    gone = log_of(path)  # removed: its history is still there, nothing current
    assert [v["sha256"] for v in gone] == [sha(c) for c in contents[:2]]
    assert not any(v["current"] for v in gone)
    sh(f"echo 'three: after rm' > {path}")
    for content in contents[3:]:
        # What editors (and atomic-write libraries) do: a temp file, fsync, rename over.
        temp = layer / ".notes.txt.swp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, content)
        os.fsync(fd)
        os.close(fd)
        os.rename(temp, path)
    assert_every_version_readable(path, contents)
    assert sorted(os.listdir(layer)) == ["notes.txt"]
    # The history, and its numbers, are the same through a remount.
    before = log_of(path)
    mount.stop()
    assert log_of("runs/e1/train/notes.txt", "--store", str(mount.store)) == before
    mount.start()


def test_a_moved_file_takes_its_history_and_a_directory_move_keeps_each_files(
        mount: Mount) -> None:
    layer = mount.layer()
    (layer / "d").mkdir()
    (layer / "d" / "f").write_bytes(b"f1\n")
    (layer / "d" / "f").write_bytes(b"f2\n")
    sh(f"mv {layer}/d/f {layer}/g")  # to a new name: numbers as they were
    assert shas(layer / "g") == [sha(b"f1\n"), sha(b"f2\n")]
    assert numbers(layer / "g") == [1, 2]
    sh(f"mv {layer}/d {layer}/d2")
    (layer / "d2" / "h").write_bytes(b"h1\n")
    sh(f"mv {layer}/d2 {mount.layer('e1', 'eval')}/")  # a directory between layers
    moved = mount.runs / "e1" / "eval" / "d2" / "h"
    assert numbers(moved) == [1] and moved.read_bytes() == b"h1\n"
    # A file removed in a directory, the directory moved away, another moved onto its name:
    # the removed file's history and the newcomer's join when the newcomer is removed too.
    (layer / "x").mkdir()
    (layer / "x" / "k").write_bytes(b"old k\n")
    sh(f"rm {layer}/x/k && rmdir {layer}/x")
    (layer / "y").mkdir()
    (layer / "y" / "k").write_bytes(b"new k\n")
    sh(f"mv {layer}/y {layer}/x")
    assert shas(layer / "x" / "k") == [sha(b"new k\n")]
    sh(f"rm {layer}/x/k")
    assert sorted(shas(layer / "x" / "k")) == sorted([sha(b"new k\n"), sha(b"old k\n")])
    (layer / "x" / "k").write_bytes(b"k again\n")
    assert numbers(layer / "x" / "k") == [1, 2, 3]


def test_numbers_stay_after_gc_and_continue(mount: Mount) -> None:
    layer = mount.layer()
    path = layer / "m.bin"
    contents = [os.urandom(3000) for _ in range(5)]
    for content in contents:
        path.write_bytes(content)
    result = json.loads(cafs("gc", "--json", "--store", str(mount.store),
                             "--keep-versions", "2").stdout)
    assert result["versions_removed"] == 2
    assert numbers(path) == [3, 4, 5]  # not renumbered
    assert cafs_bytes("cat", f"{path}@4") == contents[3]
    missing = cafs("cat", f"{path}@1", check=False)
    assert missing.returncode == 1 and "no version 1: cafs gc removed it" in missing.stderr
    path.write_bytes(b"sixth\n")
    assert numbers(path) == [3, 4, 5, 6] and xattr(path, "user.cafs.version") == "6"
    # The store-wide id is in --json, distinct from the number.
    ids = [v["id"] for v in log_of(path)]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    # A removed path's history goes with gc; written again, it starts at 1.
    sh(f"rm {path}")
    cafs("gc", "--store", str(mount.store))
    assert cafs("log", str(path), check=False).returncode == 1
    path.write_bytes(b"new life\n")
    assert numbers(path) == [1]


def test_an_fsync_inside_one_write_leaves_one_number(mount: Mount) -> None:
    path = mount.layer() / "f"
    path.write_bytes(b"first\n")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"partly")
    os.fsync(fd)  # published now...
    os.write(fd, b" written\n")
    os.close(fd)  # ...and replaced by the whole, under the same number
    assert_every_version_readable(path, [b"first\n", b"partly written\n"])


def test_two_writers_of_one_path_get_distinct_consecutive_numbers(mount: Mount,
                                                                  tmp_path: Path) -> None:
    layer = mount.layer()
    rounds = 15

    def writer(name: str) -> None:
        for index in range(rounds):
            (layer / "shared.txt").write_bytes(f"{name} {index}\n".encode())

    def rsyncer(name: str) -> None:
        source = tmp_path / name
        source.mkdir()
        for index in range(rounds):
            (source / "shared.txt").write_bytes(f"{name} rsync {index}\n".encode())
            sh(f"rsync -a --checksum {source}/shared.txt {layer}/shared.txt")

    threads = [threading.Thread(target=writer, args=("a",)),
               threading.Thread(target=writer, args=("b",)),
               threading.Thread(target=rsyncer, args=("r",))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    versions = log_of(layer / "shared.txt")
    # Writes that overlap on one open file make one version (the write path's rule: how many
    # overlap depends on timing); each rsync is its own file renamed over the path, so all of
    # them are there, and the writers' last writes after them.
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert len({v["id"] for v in versions}) == len(versions) > rounds
    assert [v["current"] for v in versions].count(True) == 1 and versions[-1]["current"]
    assert versions[-1]["sha256"] == sha((layer / "shared.txt").read_bytes())
    for prefix, every in (("a", False), ("b", False), ("r rsync", True)):
        wanted = [sha(f"{prefix} {i}\n".encode()) for i in range(rounds)]
        mine = [v["sha256"] for v in versions if v["sha256"] in wanted]
        assert mine == sorted(mine, key=wanted.index)  # in the order that writer wrote them
        assert len(mine) == rounds or not every


# -- cafs stats ------------------------------------------------------------------------------


def blob_bytes(store: Path, digests: set[str] | None = None) -> int:
    """Bytes of the stored blobs (of these contents, or of all): files in blobs/, or objects
    in the bucket."""
    blobs = StoredBlobs(store)
    return sum(len(blobs.read(digest)) for digest in blobs.names()
               if digests is None or digest in digests)


def test_stats_separate_live_history_and_what_gc_reclaims(mount: Mount) -> None:
    text = "".join(f"{i},{i * 0.5:.3f},label{i % 7}\n" for i in range(20_000)).encode()
    weights, own = os.urandom(1_000_000), os.urandom(250_000)
    for run in ("e1", "e2"):  # the same two contents in two runs
        layer = mount.layer(run, "train")
        (layer / "data.csv").write_bytes(text)
        (layer / "weights.bin").write_bytes(weights)
    (mount.layer("e2", "train") / "own.bin").write_bytes(own)
    config = mount.layer("e1", "train") / "cfg.yaml"
    old_cfg, new_cfg = b"lr: 0.1\n" * 500, b"lr: 0.01\n" * 500
    config.write_bytes(old_cfg)  # kept as history of a live artifact
    config.write_bytes(new_cfg)
    gone = mount.layer("e3", "train") / "gone.bin"
    gone_contents = [os.urandom(300_000), os.urandom(200_000)]
    for content in gone_contents:
        gone.write_bytes(content)
    sh(f"rm {gone}")  # its history is what gc takes

    # What the test knows from the files, without asking cafs.
    listing = sh(f"cd {mount.runs} && find . -type f -print0 | xargs -0 sha256sum").stdout
    live = {line.split()[0] for line in listing.decode().splitlines()}
    sizes = sh(f"find {mount.runs} -type f -printf '%s\\n'").stdout.decode().split()
    logical = sum(map(int, sizes))
    assert logical == 2 * (len(text) + len(weights)) + len(own) + len(new_cfg)
    unique = len(text) + len(weights) + len(own) + len(new_cfg)
    assert len(live) == 4
    history = {sha(old_cfg), *map(sha, gone_contents)}
    reclaimable = set(map(sha, gone_contents))

    stats = json.loads(cafs("stats", "--json", "--store", str(mount.store)).stdout)
    assert stats["logical_bytes"] == stats["live"]["logical_bytes"] == logical
    assert stats["live"]["unique_bytes"] == unique and stats["live"]["blobs"] == 4
    assert stats["live"]["stored_bytes"] == blob_bytes(mount.store, live)
    assert stats["live"]["stored_bytes"] < unique  # the text compresses
    assert stats["history"] == {
        "versions": 3, "blobs": 3, "bytes": len(old_cfg) + sum(map(len, gone_contents)),
        "stored_bytes": blob_bytes(mount.store, history)}
    assert stats["reclaimable"] == {
        "versions": 2, "blobs": 2, "bytes": sum(map(len, gone_contents)),
        "stored_bytes": blob_bytes(mount.store, reclaimable)}
    assert stats["stored_bytes"] == blob_bytes(mount.store) and stats["blobs"] == 7
    assert stats["dedup_ratio"] == round(logical / unique, 3)
    assert stats["space_ratio"] == round(logical / blob_bytes(mount.store, live), 3)
    human = cafs("stats", "--store", str(mount.store)).stdout
    assert "gc reclaims" in human and "only they hold" in human and "dedup" in human

    # gc removes exactly what stats said, and stats then says nothing is left to reclaim.
    on_disk = blob_bytes(mount.store)
    dry = json.loads(cafs("gc", "--json", "--dry-run", "--store", str(mount.store)).stdout)
    assert dry["bytes_reclaimed"] == stats["reclaimable"]["stored_bytes"]
    done = json.loads(cafs("gc", "--json", "--store", str(mount.store)).stdout)
    assert done["bytes_reclaimed"] == stats["reclaimable"]["stored_bytes"]
    assert done["versions_removed"] == 2 and set(done["blobs"]) == reclaimable
    assert on_disk - blob_bytes(mount.store) == stats["reclaimable"]["stored_bytes"]
    after = json.loads(cafs("stats", "--json", "--store", str(mount.store)).stdout)
    assert after["reclaimable"] == {"versions": 0, "blobs": 0, "bytes": 0, "stored_bytes": 0}
    assert after["history"]["blobs"] == 1 and after["live"] == stats["live"]


# -- migration m007 --------------------------------------------------------------------------

# The code before path histories (schema up to m005): a store it made must keep, after m007,
# every version `cafs log` showed then, numbered 1..n.
@pytest.mark.skipif(uses("postgresql"), reason="a migration of manifest.sqlite")
def test_m007_backfills_the_histories_of_a_store_made_before_it(
        unstarted_mount: Mount, tmp_path: Path) -> None:
    code = code_of(BEFORE_M006, tmp_path / "old")
    mount = unstarted_mount
    old_cafs(code, "mount", "--store", str(mount.store), str(mount.mountpoint))
    layer = mount.layer("e", "l")
    source = tmp_path / "src"
    source.mkdir()
    for rate in (0.1, 0.01, 0.001):
        (source / "cfg.yaml").write_text(f"lr: {rate}\n")
        sh(f"rsync -a {source}/cfg.yaml {layer}/cfg.yaml")
    for content in (b"m1\n", b"m2\n", b"m3\n"):
        (layer / "model.bin").write_bytes(content)
    (layer / "b").write_bytes(b"b0\n")
    for content in (b"a1\n", b"a2\n"):
        (layer / "a").write_bytes(content)
        sh(f"mv {layer}/a {layer}/b")
    (layer / "removed").write_bytes(b"r1\n")
    (layer / "removed").write_bytes(b"r2\n")
    sh(f"rm {layer}/removed")
    paths = ["cfg.yaml", "model.bin", "b", "removed"]
    before = {name: json.loads(old_cafs(code, "log", "--json", str(layer / name)).stdout)
              for name in paths}
    old_cafs(code, "umount", str(mount.mountpoint))

    mount.start()  # this code: migrates the store
    for name in paths:
        after = log_of(layer / name)
        assert [v["sha256"] for v in after] == [v["sha256"] for v in before[name]["versions"]]
        assert [v["id"] for v in after] == [v["version"] for v in before[name]["versions"]]
        assert [v["version"] for v in after] == list(range(1, len(after) + 1))
        assert [v["current"] for v in after] == [v["current"] for v in before[name]["versions"]]
    assert numbers(layer / "model.bin") == [1, 2, 3]
    assert cafs_bytes("cat", f"{layer}/model.bin@2") == b"m2\n"
    # New versions continue the numbers; the removed path's history continues too.
    (layer / "model.bin").write_bytes(b"m4\n")
    assert numbers(layer / "model.bin") == [1, 2, 3, 4]
    (source / "cfg.yaml").write_text("lr: 1e-4\n")
    sh(f"rsync -a {source}/cfg.yaml {layer}/cfg.yaml")
    assert len(numbers(layer / "cfg.yaml")) == len(before["cfg.yaml"]["versions"]) + 1
    (layer / "removed").write_bytes(b"r3\n")
    assert shas(layer / "removed") == [sha(b"r1\n"), sha(b"r2\n"), sha(b"r3\n")]
    assert xattr(layer / "removed", "user.cafs.version") == "3"
    mount.stop()
    mount.assert_clean()
