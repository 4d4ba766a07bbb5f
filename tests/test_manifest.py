"""The SQLite manifest's own tests (its file, schema text, free pages); what every back end
must do is in test_manifest_contract.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cafs.digest import digest_of_bytes
from cafs.errors import StoreError
from cafs.manifest import Manifest, NewVersion
from cafs.model import RUNS_INODE, Kind, StoredBlob


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return Manifest(tmp_path / "manifest.sqlite")


def stored(data: bytes) -> StoredBlob:
    return StoredBlob(digest_of_bytes(data), len(data), len(data), "raw")


def version(node_id: int, now: int = 1) -> NewVersion:
    return NewVersion(node_id, 0o644, 1000, 1000, now, now, "text/csv", now)


def make_file(manifest: Manifest, name: str = "a.csv") -> int:
    execution = manifest.child(RUNS_INODE, "e1") or manifest.add_node(
        RUNS_INODE, "e1", Kind.EXECUTION, 0o755, 0, 0, 1)
    layer = manifest.child(execution.ino, "train") or manifest.add_node(
        execution.ino, "train", Kind.LAYER, 0o755, 0, 0, 1)
    return manifest.add_node(layer.ino, name, Kind.FILE, 0o644, 0, 0, 1).ino


def test_schema_is_documented_and_migrations_are_idempotent(tmp_path: Path) -> None:
    Manifest(tmp_path / "m.sqlite").close()
    reopened = Manifest(tmp_path / "m.sqlite")
    sql = {name: text for name, text in reopened.admin().execute(
        "SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()}
    for table in ("blobs", "nodes", "versions", "tags"):
        body = sql[table]
        columns = [line for line in body.splitlines()[1:] if line.strip().split()[0].islower()]
        assert columns and all("--" in line for line in columns), f"{table} has bare columns"
    assert {"executions", "layers", "artifacts"} <= set(sql)
    assert reopened.admin().execute("PRAGMA journal_mode").fetchone()[0] == "wal"












def test_free_pages_left_by_deletes_are_room_for_new_rows(manifest: Manifest) -> None:
    """What the space reserve's metadata charge asks (SpaceGuard.manifest_room): free pages
    inside the file, promised until the next commit reads the free list again."""
    assert not manifest.claim_free_pages(16 << 10)  # a new manifest has none
    nodes = [manifest.node(make_file(manifest, f"n{index:04d}" + "x" * 200))
             for index in range(300)]
    for node in nodes:
        manifest.remove_node(node, 5)
    assert manifest.claim_free_pages(16 << 10)
    while manifest.claim_free_pages(16 << 10):  # each claim counts until the next commit
        pass
    make_file(manifest, "after")  # a commit: the free list is read again
    assert manifest.claim_free_pages(16 << 10)




def test_a_file_that_is_not_a_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable cafs manifest"):
        Manifest(path)








def test_no_module_outside_the_manifest_speaks_sql() -> None:
    """SQL, and the sqlite3 errors callers would otherwise have to catch, stay behind the
    manifest's interface (cafs/sqlite_manifest/, cafs/schema.py). The one other SQLite file,
    a bundle's scratch index (cafs/bundle_index.py), is private to an export or import, never
    the manifest, and turns its sqlite3 errors into CafsErrors the same way."""
    root = Path(__file__).resolve().parent.parent
    allowed = {root / "cafs" / "schema.py", root / "cafs" / "bundle_index.py"}
    packages = {root / "cafs" / "sqlite_manifest", root / "cafs" / "pg_manifest"}
    offenders = []
    for source in [*(root / "cafs").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        if source in allowed or packages & set(source.parents):
            continue
        text = source.read_text()
        if re.search(r"^\s*(import sqlite3|from sqlite3|import sqlite_utils|from sqlite_utils)",
                     text, re.M) or ".execute(" in text:
            offenders.append(str(source.relative_to(root)))
    assert offenders == []
