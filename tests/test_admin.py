"""Admin commands in the core, without a mount: gc against writes in flight, bundle validation,
root hashes."""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import sha
from test_vfs import ALICE, Runtime, layer, read_all, write_file

from cafs.admin import Admin, LocalRuntime, NotMounted, decode_result, root_hash, run_locally
from cafs.bundle import BadBundle, BundleReader, parse_header
from cafs.bundle_index import BundleIndex
from cafs.daemon import TrioRuntime
from cafs.digest import Digest
from cafs.errors import ManifestError
from cafs.lifecycle import History
from cafs.maintenance import (
    CheckReport,
    RepairReport,
    check,
    list_blob_files,
    orphan_blob_files,
    stray_temps,
)
from cafs.store import (
    Store,
    acquire_lock,
    command_owner,
    mount_owner,
    serving_daemon,
    store_holder,
)
from cafs.vfs import Vfs


@pytest.fixture
def opened(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def test_gc_leaves_blob_files_alone_while_a_write_is_publishing_them(opened: Store) -> None:
    vfs = Vfs(opened.manifest, opened.blobs, Runtime())
    parent = layer(vfs)
    write_file(vfs, parent, b"a", b"content that goes away")
    digest = sha(b"content that goes away")
    vfs.unlink(parent, b"a")
    # An orphan file as a publish leaves it between the rename and the commit.
    temp = opened.blobs.new_temp()
    temp.write(0, b"in flight")
    opened.blobs.publish(temp, Digest(sha(b"in flight")))
    temp.discard()
    admin = Admin(opened, TrioRuntime(), vfs, mounted=True)
    vfs._pinned[digest] += 1  # a write of the same content is being published
    vfs._pinned[sha(b"in flight")] += 1
    result = trio.run(admin.run, "gc", {}, [])
    assert result["versions_removed"] == 1 and result["blobs_removed"] == 0
    assert opened.blobs.has(Digest(digest)) and opened.blobs.has(Digest(sha(b"in flight")))
    vfs._pinned.clear()  # the writes finished (or failed): now both can go
    result = trio.run(admin.run, "gc", {"orphan_grace": 0}, [])
    assert result["blobs_removed"] == 1 and result["orphan_files_removed"] == 1
    assert not opened.blobs.has(Digest(digest))


def test_gc_spares_content_a_publish_brought_back(opened: Store) -> None:
    """A blob chosen for deletion whose content was published again before its file went."""
    vfs = Vfs(opened.manifest, opened.blobs, Runtime())
    parent = layer(vfs)
    write_file(vfs, parent, b"a", b"phoenix")
    vfs.unlink(parent, b"a")
    admin = Admin(opened, TrioRuntime(), vfs, mounted=True)
    plan = opened.manifest.collect([v for v, _, _ in opened.manifest.superseded_versions()],
                                   keep_blobs=set(), dry_run=False)
    assert [blob.digest for blob in plan.blobs] == [sha(b"phoenix")]
    again = write_file(vfs, parent, b"b", b"phoenix")  # the row is back before the unlinks
    removed = trio.run(admin._delete_unreferenced, [sha(b"phoenix")])
    assert removed == set()
    assert read_all(vfs, again) == b"phoenix"


def test_gc_commits_in_batches_and_a_stop_between_them_loses_nothing(
        opened: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc deletes at most GC_BATCH rows per transaction (one for all would need a WAL as large
    as what it frees, more than a full disk's reserve). A gc that fails after some batches
    leaves refcounts and aggregates exact, and the next gc removes the rest."""
    monkeypatch.setattr("cafs.sqlite_manifest.maintenance.GC_BATCH", 4)
    vfs = Vfs(opened.manifest, opened.blobs, Runtime())
    parent = layer(vfs)
    kept = {}
    for index in range(10):  # each keeps its current version, loses the superseded one
        ino = write_file(vfs, parent, f"kept{index}".encode(), b"old %02d" % index)

        async def rewrite(ino: int = ino, index: int = index) -> None:
            fh = await vfs.open(ino, os.O_RDWR, ALICE)
            await vfs.write(fh, 0, b"new %02d" % index)
            await vfs.flush(fh)
            vfs.release(fh)

        trio.run(rewrite)
        kept[ino] = b"new %02d" % index
    for index in range(10):  # deleted: their history and blobs go
        write_file(vfs, parent, f"gone{index}".encode(), b"gone %02d" % index)
        vfs.unlink(parent, f"gone{index}".encode())
    manifest = opened.manifest
    admin = Admin(opened, TrioRuntime(), vfs, mounted=True)
    real = manifest._delete_versions
    batches = 0

    def third_fails(chunk: list[int]) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:  # e.g. the disk filled up from outside
            raise ManifestError("manifest: database or disk is full", errno.ENOSPC)
        real(chunk)

    monkeypatch.setattr(manifest, "_delete_versions", third_fails)
    with pytest.raises(ManifestError):
        trio.run(admin.run, "gc", {"keep_versions": 0}, [])
    assert len(manifest.superseded_versions()) == 20 - 2 * 4  # two batches committed
    assert manifest.refcount_drift() == [] and manifest.aggregate_drift(limit=0)[0] == 0
    monkeypatch.setattr(manifest, "_delete_versions", real)
    commits = manifest.changes
    result = trio.run(admin.run, "gc", {"keep_versions": 0}, [])
    assert result["versions_removed"] == 12 and result["blobs_removed"] == 20
    assert manifest.changes - commits == 3 + 5  # 12 versions, then 20 blob rows, 4 a batch
    assert manifest.superseded_versions() == []
    assert manifest.refcount_drift() == [] and manifest.aggregate_drift(limit=0)[0] == 0
    assert {ino: read_all(vfs, ino) for ino in kept} == kept


def test_root_hash_depends_only_on_paths_and_contents() -> None:
    a = [("train/model.bin", sha(b"m")), ("eval/score.json", sha(b"s"))]
    assert root_hash(a) == root_hash(list(reversed(a)))
    assert root_hash(a) != root_hash([("train/model.bin", sha(b"m"))])
    assert root_hash(a) != root_hash([("train/model2.bin", sha(b"m")), a[1]])


def header(entries: list[dict[str, Any]], blobs: list[dict[str, Any]] | None = None,
           **execution: Any) -> bytes:
    top = {"name": "e1", "path": "", "kind": "execution", "mode": 0o755, "uid": 0, "gid": 0,
           "mtime_ns": 1, "ctime_ns": 1, "tags": {}, **execution}
    return json.dumps({"format": "cafs-bundle", "format_version": 1, "execution": top,
                       "entries": entries, "blobs": blobs or []}).encode()


def entry(path: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "kind": kind, "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 1,
            "ctime_ns": 1, "tags": {}, **extra}


def version(content: bytes) -> dict[str, Any]:
    return {"sha256": sha(content), "size": len(content), "mode": 0o644, "uid": 0, "gid": 0,
            "mtime_ns": 1, "ctime_ns": 1, "created_ns": 1, "replaced_ns": None}


@pytest.mark.parametrize("bad, message", [
    (header([entry("../etc", "layer")]), "bad name"),
    (header([entry("train", "layer"), entry("train/../../x", "file")]), "bad name"),
    (header([entry("/abs", "layer")]), "bad name"),
    (header([entry("train/x", "file")]), "not in the bundle"),
    (header([entry("train", "file", versions=[version(b"x")])],
            [{"sha256": sha(b"x"), "size": 1}]), "cannot be in"),
    (header([entry("train", "layer"), entry("train/f", "file", versions=[])]), "without any"),
    (header([entry("train", "layer"), entry("train/f", "file", versions=[version(b"x")])]),
     "is not in the bundle"),
    (header([entry("train", "layer"), entry("train/.record.json", "file",
                                            versions=[version(b"x")])],
            [{"sha256": sha(b"x"), "size": 1}]), "reserved"),
    (header([entry("train", "layer", tags={"trusted.x": base64.b64encode(b"v").decode()})]),
     "not a user tag"),
    (header([entry("train", "layer", tags={"user.x": "not base64!"})]), "not base64 text"),
    (header([], name="a/b"), "bad name"),
    (b"{not json", "malformed"),
    (json.dumps({"format": "zip"}).encode(), "unknown bundle format"),
])
def test_hostile_bundle_headers_are_refused(bad: bytes, message: str) -> None:
    with pytest.raises(BadBundle, match=message):
        parse_header(bad)


def test_a_bundle_missing_a_blob_stores_nothing(opened: Store) -> None:
    data = b"payload"
    text = header([entry("train", "layer"), entry("train/f", "file", versions=[version(data)])],
                  [{"sha256": sha(data), "size": len(data)}])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("cafs-bundle.json")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    buffer.seek(0)
    with BundleIndex.create(opened.blobs.tmp_dir) as index:
        reader = BundleReader(buffer, index, opened.blobs.space)
        with pytest.raises(BadBundle, match="incomplete"):
            reader.store_blobs(opened.blobs, lambda done, total: None)
    assert list(opened.blobs.iter_digests()) == []
    assert os.listdir(opened.blobs.tmp_dir) == []  # the scratch index too is gone


def test_results_cross_the_control_socket_as_json_and_come_back_as_the_same_types(
        opened: Store) -> None:
    """Admin.run answers JSON (the socket's side); decode_result gives the typed result back.
    Run here with the asyncio runtime the `cafs` command uses on an unmounted store."""
    vfs = Vfs(opened.manifest, opened.blobs, Runtime())
    parent = layer(vfs)
    ino = write_file(vfs, parent, b"a", b"one")

    async def rewrite() -> None:
        fh = await vfs.open(ino, os.O_WRONLY | os.O_TRUNC, ALICE)
        await vfs.write(fh, 0, b"two")
        await vfs.flush(fh)
        vfs.release(fh)
    trio.run(rewrite)
    orphan = opened.blobs.new_temp()  # a crash between the rename and the commit
    orphan.write(0, b"orphan")
    opened.blobs.publish(orphan, Digest(sha(b"orphan")))
    orphan.discard()
    (opened.blobs.tmp_dir / "stray").write_bytes(b"left by a crash")
    admin = Admin(opened, LocalRuntime(), NotMounted(), mounted=False)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("log", {"path": "runs/e1/train/a"}), ("version", {"path": "runs/e1/train/a"}),
        ("find", {"run": "e1"}), ("seal", {"path": "runs/e1"}), ("seal", {"path": "runs/e1"}),
        ("unseal", {"path": "runs/e1"}), ("gc", {"dry_run": True, "orphan_grace": 0}),
        ("repair", {"orphan_grace": 0})]
    for command, args in requests:
        result = run_locally(admin, command, args, [])
        wire = json.loads(json.dumps(result.to_json()))
        assert decode_result(command, wire) == result, command
    answer = asyncio.run(admin.run("log", {"path": "runs/e1/train/a"}, []))
    assert answer == run_locally(admin, "log", {"path": "runs/e1/train/a"}, []).to_json()
    history = run_locally(admin, "log", {"path": "runs/e1/train/a"}, [])
    assert isinstance(history, History)
    assert [v.sha256 for v in history.versions] == [sha(b"one"), sha(b"two")]
    assert history.versions[-1].current
    report = check(opened, full=True, mounted=False)
    assert report.clean and CheckReport.from_json(report.to_json()) == report


def test_orphans_and_stray_temps_are_found_one_way_for_check_repair_and_gc(
        opened: Store) -> None:
    temp = opened.blobs.new_temp()
    temp.write(0, b"orphan")
    opened.blobs.publish(temp, Digest(sha(b"orphan")))
    temp.discard()
    (opened.blobs.tmp_dir / "stray").write_bytes(b"x")
    (opened.blobs.tmp_dir / "a-directory").mkdir()  # never a temp file: left alone
    files = list_blob_files(opened.blobs)
    assert [f.digest for f in orphan_blob_files(opened.manifest, files)] == [sha(b"orphan")]
    assert stray_temps(opened.blobs, mounted=False) == ["stray"]
    assert stray_temps(opened.blobs, mounted=True) == []  # writes in progress then
    report = check(opened, full=False, mounted=False)
    assert any("orphan" in line or "lost metadata" in line
               for line in (*report.garbage, *report.lost_metadata))
    assert any("temp file stray" in line for line in report.garbage)
    admin = Admin(opened, LocalRuntime(), NotMounted(), mounted=False)
    repaired = run_locally(admin, "repair", {"orphan_grace": 0}, [])
    assert isinstance(repaired, RepairReport)
    assert (repaired.orphan_files_removed, repaired.temp_files_removed) == (1, 1)
    assert stray_temps(opened.blobs, mounted=False) == []
    assert orphan_blob_files(opened.manifest, list_blob_files(opened.blobs)) == []


def test_who_holds_a_store_is_read_from_its_lock_in_one_place(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root).close()
    assert store_holder(root) is None and serving_daemon(root) is None
    fd = acquire_lock(root, mount_owner(tmp_path / "mnt"))
    try:
        holder = serving_daemon(root)
        assert holder is not None and holder.pid == os.getpid()
        assert holder.mountpoint == tmp_path / "mnt" and holder.serves_mount
    finally:
        os.close(fd)
    fd = acquire_lock(root, command_owner("gc"))
    try:
        holder = store_holder(root)
        assert holder is not None and not holder.serves_mount
        assert "running cafs gc" in holder.description
        assert serving_daemon(root) is None
    finally:
        os.close(fd)


def test_admin_commands_load_neither_trio_nor_pyfuse3_nor_the_daemon() -> None:
    probe = ("import sys, cafs.cli_admin, cafs.admin, cafs.maintenance; "
             "print(sorted({'trio', 'pyfuse3', 'cafs.daemon'} & sys.modules.keys()))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
