"""Admin commands in the core, without a mount: gc against writes in flight, bundle validation,
root hashes."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import sha
from test_vfs import Runtime, layer, read_all, write_file

from cafs.admin import Admin, root_hash
from cafs.bundle import BadBundle, BundleReader, parse_header
from cafs.daemon import TrioRuntime
from cafs.digest import Digest
from cafs.store import Store
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
    (header([entry("train", "layer", tags={"user.x": "not base64!"})]), "malformed"),
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
    reader = BundleReader(buffer)
    with pytest.raises(BadBundle, match="incomplete"):
        reader.store_blobs({sha(data)}, opened.blobs, lambda done, total: None, {})
    assert list(opened.blobs.iter_digests()) == []
    assert os.listdir(opened.blobs.tmp_dir) == []
