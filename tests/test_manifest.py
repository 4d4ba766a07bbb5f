"""The SQLite manifest's own tests (its file, schema text, free pages); what every back end
must do is in test_manifest_contract.py."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cafs.digest import digest_of_bytes
from cafs.errors import ManifestError, StoreError
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
    the manifest, and turns its sqlite3 errors into CafsErrors the same way. One benchmark
    speaks SQL on purpose: the S3 bench's floor, a durable one-row commit per file on a
    table of its own, measures the server with no cafs at all; so does the write floor's
    journal applier (bench/null_fs.py --apply), a store's least work with no cafs at all."""
    root = Path(__file__).resolve().parent.parent
    allowed = {root / "cafs" / "schema.py", root / "cafs" / "bundle_index.py",
               root / "bench" / "s3_bench.py", root / "bench" / "null_fs.py"}
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


def test_checkpoints_run_in_their_own_thread_and_the_wal_goes_at_close(tmp_path: Path) -> None:
    """On a roomy filesystem the WAL is copied into the database file by a thread of its own
    (every 256 commits), not inside a commit on the caller's thread; SQLite's own checkpoint
    only bounds the WAL at ten times its usual size. Closing leaves no WAL."""
    path = tmp_path / "manifest.sqlite"
    others = checkpoint_threads()  # of manifests other tests left open
    manifest = Manifest(path)
    manifest.limit_wal(1 << 30)
    assert manifest.admin().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    size = path.stat().st_size
    layer = manifest.node(manifest.node(make_file(manifest)).parent)  # type: ignore[union-attr]
    assert layer is not None
    for index in range(300):  # every one a commit
        manifest.add_node(layer.ino, f"d{index}", Kind.DIR, 0o755, 0, 0, 1)
    deadline = time.monotonic() + 20
    while path.stat().st_size == size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size > size, "no checkpoint reached the database file"
    assert checkpoint_threads() - others
    manifest.close()
    assert not checkpoint_threads() - others
    assert not path.with_name("manifest.sqlite-wal").exists()
    assert len(Manifest(path).children(manifest_layer(path), -1, 1000)) == 301


def checkpoint_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "cafs-checkpoint"}


def manifest_layer(path: Path) -> int:
    reopened = Manifest(path)
    execution = reopened.child(RUNS_INODE, "e1")
    assert execution is not None
    layer = reopened.child(execution.ino, "train")
    assert layer is not None
    reopened.close()
    return layer.ino


def test_a_small_filesystem_checkpoints_inline_within_its_share(tmp_path: Path) -> None:
    """Where the reserve is small, limit_wal keeps SQLite's own checkpoint at a quarter of it,
    on the writer's thread, as before: the WAL never outgrows what the reserve allows."""
    others = checkpoint_threads()
    manifest = Manifest(tmp_path / "manifest.sqlite")
    manifest.limit_wal(64 * 4096)
    assert manifest.admin().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 64
    make_file(manifest)
    execution = manifest.child(RUNS_INODE, "e1")
    assert execution is not None
    for index in range(300):
        manifest.add_node(execution.ino, f"l{index}", Kind.LAYER, 0o755, 0, 0, 1)
    assert not checkpoint_threads() - others
    manifest.close()


def committed_names(path: Path) -> set[str]:
    """The names another connection sees: what is committed."""
    other = sqlite3.connect(path)
    try:
        return {row[0] for row in other.execute("SELECT name FROM nodes")}
    finally:
        other.close()


def test_a_new_file_row_commits_with_its_first_publish(tmp_path: Path) -> None:
    """A new file's row waits for the next commit: its create and first publish are one
    commit. A directory commits at once."""
    path = tmp_path / "manifest.sqlite"
    manifest = Manifest(path)
    node_id = make_file(manifest)
    assert {"e1", "train"} <= committed_names(path)
    assert "a.csv" not in committed_names(path)
    manifest.publish(stored(b"x"), version(node_id))
    assert "a.csv" in committed_names(path)
    manifest.close()


def test_a_failed_change_leaves_a_pending_new_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite"
    manifest = Manifest(path)
    first = make_file(manifest, "a.csv")
    layer = manifest.node(first)
    assert layer is not None
    with pytest.raises(ManifestError):  # the namespace checks first; the row is unique too
        manifest.add_node(layer.parent, "a.csv", Kind.DIR, 0o755, 0, 0, 1)
    second = make_file(manifest, "b.csv")
    manifest.publish(stored(b"x"), version(second))
    assert {"a.csv", "b.csv"} <= committed_names(path)
    manifest.close()


def test_the_ids_of_lost_new_files_are_never_given_again(tmp_path: Path) -> None:
    """If the transaction holding new files' rows is lost (its commit failed), the kernel may
    still know their inode numbers: the next node gets a number above them."""
    path = tmp_path / "manifest.sqlite"
    manifest = Manifest(path)
    lost = make_file(manifest, "lost.csv")
    manifest._db.execute("ROLLBACK")  # what SQLite does when a commit fails
    manifest._lost()
    assert "lost.csv" not in committed_names(path)
    again = make_file(manifest, "again.csv")
    assert again > lost
    manifest.publish(stored(b"y"), version(again))
    manifest.close()
    reopened = Manifest(path)
    assert make_file(reopened, "later.csv") > lost
    reopened.close()
