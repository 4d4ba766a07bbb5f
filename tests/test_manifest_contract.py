"""The manifest's contract, run against every back end: SQLite (a file) and PostgreSQL (a fresh
database on a cluster the tests start). One test, one meaning: a back end passes all of them
or it is not a manifest."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from backends import PgCluster

from cafs.digest import digest_of_bytes
from cafs.errors import AlreadyExists, CafsError, ManifestError
from cafs.manifest_api import BulkArtifact, DirStats, Manifest, NewVersion
from cafs.model import FIRST_NODE_ID, RUNS_INODE, Kind, StoredBlob, TreeEntry, Version
from cafs.pg_manifest import PgManifest
from cafs.sqlite_manifest import SqliteManifest


@pytest.fixture(params=["sqlite", "postgresql"])
def manifest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        opened: Any = SqliteManifest(tmp_path / "manifest.sqlite")
    else:
        opened = PgManifest(request.getfixturevalue("pg_url"))
    yield opened
    opened.close()


def raw(manifest: Any, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """A statement outside the interface (a test breaking a row on purpose), on either back
    end: the PostgreSQL connection speaks the same SQL."""
    return list(manifest._db.execute(sql, params))


def stored(data: bytes) -> StoredBlob:
    return StoredBlob(digest_of_bytes(data), len(data), len(data), "raw")


def version(node_id: int, now: int = 1) -> NewVersion:
    return NewVersion(node_id, 0o644, 1000, 1000, now, now, "text/csv", now)


def make_file(manifest: Manifest, name: str = "a.csv", layer_name: str = "train") -> int:
    execution = manifest.child(RUNS_INODE, "e1") or manifest.add_node(
        RUNS_INODE, "e1", Kind.EXECUTION, 0o755, 0, 0, 1)
    layer = manifest.child(execution.ino, layer_name) or manifest.add_node(
        execution.ino, layer_name, Kind.LAYER, 0o755, 0, 0, 1)
    return manifest.add_node(layer.ino, name, Kind.FILE, 0o644, 0, 0, 1).ino


def test_node_ids_start_above_the_fixed_inodes(manifest: Manifest) -> None:
    node = manifest.add_node(RUNS_INODE, "e1", Kind.EXECUTION, 0o755, 0, 0, 1)
    assert node.ino >= FIRST_NODE_ID
    assert manifest.path_of(node.ino) == "runs/e1"
    assert manifest.resolve("runs/e1") == node and manifest.count_executions() == 1


def test_publish_counts_references_and_keeps_history(manifest: Manifest) -> None:
    a = make_file(manifest, "a.csv")
    b = make_file(manifest, "b.csv")
    manifest.publish(stored(b"same"), version(a))
    node = manifest.publish(stored(b"same"), version(b))
    assert node.blob is not None and node.blob.digest == digest_of_bytes(b"same")
    assert manifest.refcount(node.blob.blob_id) == 2
    manifest.publish(stored(b"other"), version(a, now=2))
    assert manifest.refcount(node.blob.blob_id) == 1
    totals = manifest.totals()
    assert (totals.artifacts, totals.blobs, totals.versions) == (2, 2, 3)
    assert manifest.refcount_drift() == [] and manifest.dangling() == []
    history = manifest.history(a, "runs/e1/train/a.csv")
    assert [(v.number, v.digest, v.replaced_ns) for v in history] == [
        (1, digest_of_bytes(b"same"), 2), (2, digest_of_bytes(b"other"), None)]
    assert manifest.nodes_holding(digest_of_bytes(b"same")) == {b}
    assert manifest.known_digests([digest_of_bytes(b"same"), "0" * 64]) == {
        digest_of_bytes(b"same")}
    assert isinstance(totals.logical_bytes, int) and totals.logical_bytes == 4 + 5
    # A first publish (its own statements on PostgreSQL) leaves what a later one does.
    assert raw(manifest, "SELECT path, number FROM versions WHERE node_id = ?", b) == [
        ("runs/e1/train/b.csv", 1)]
    assert manifest.aggregate_drift() == (0, [])


def test_a_version_is_never_older_than_the_one_it_replaces(manifest: Manifest) -> None:
    """A publish's time is taken before it waits for the node's lock: one that waited behind
    another host's (or came from a host whose clock is behind) still ends newest in history."""
    a = make_file(manifest)
    manifest.publish(stored(b"first"), version(a, now=1_000))
    manifest.publish(stored(b"waited"), version(a, now=400))
    manifest.publish(stored(b"tied"), version(a, now=1_001))
    history = manifest.history(a, "runs/e1/train/a.csv")
    assert [(v.number, v.created_ns, v.replaced_ns) for v in history] == [
        (1, 1_000, 1_001), (2, 1_001, 1_002), (3, 1_002, None)]
    newest = max(history, key=lambda v: v.created_ns)
    assert newest.number == 3 and manifest.node(a).version_id == newest.version_id


def test_removing_a_file_drops_its_reference(manifest: Manifest) -> None:
    a = make_file(manifest)
    node = manifest.publish(stored(b"data"), version(a))
    manifest.remove_node(node, 5)
    assert node.blob is not None
    assert manifest.refcount(node.blob.blob_id) == 0
    assert manifest.totals().artifacts == 0
    assert manifest.totals().versions == 1  # history stays until gc
    # rm then re-create continues the path's history
    again = manifest.publish(stored(b"new"), version(make_file(manifest), now=6))
    assert [v.number for v in manifest.history(again.ino, "runs/e1/train/a.csv")] == [1, 2]


def test_rename_over_a_file_joins_the_history_parked_there(manifest: Manifest) -> None:
    target = manifest.publish(stored(b"v1"), version(make_file(manifest, "model.bin")))
    temp = manifest.publish(stored(b"v2"), version(make_file(manifest, ".model.tmp"), now=2))
    layer = manifest.resolve("runs/e1/train")
    assert layer is not None
    manifest.rename(temp, layer.ino, "model.bin", target, 3)
    moved = manifest.resolve("runs/e1/train/model.bin")
    assert moved is not None and moved.ino == temp.ino
    assert [v.number for v in manifest.history(moved.ino, "runs/e1/train/model.bin")] == [1, 2]
    assert manifest.child(layer.ino, ".model.tmp") is None
    assert manifest.dangling() == [] and manifest.aggregate_drift() == (0, [])


def test_directories_list_in_pages_and_walk_parents_first(manifest: Manifest) -> None:
    ids = [make_file(manifest, f"f{index}") for index in range(5)]
    layer = manifest.resolve("runs/e1/train")
    assert layer is not None and manifest.has_children(layer.ino)
    first = manifest.children(layer.ino, 0, 3)
    rest = manifest.children(layer.ino, first[-1].ino, 3)
    assert [n.ino for n in first + rest] == ids
    execution = manifest.resolve("runs/e1")
    assert execution is not None
    assert [rel for rel, _ in manifest.subtree(execution.ino)] == [
        "train", *(f"train/f{index}" for index in range(5))]
    assert manifest.readable_by(execution.ino, 1234, 1234)
    manifest.set_attrs(ids[0], mode=0o600, uid=0, gid=0, mtime_ns=7, ctime_ns=7, atime_ns=5)
    assert not manifest.readable_by(execution.ino, 1234, 1234)
    node = manifest.node(ids[0])
    assert node is not None and (node.mode, node.atime_ns) == (0o600, 5)


def test_records_can_leave_out_the_directories_a_reader_may_not_list(
        manifest: Manifest) -> None:
    """restricted_dirs finds every directory someone may not list, at any depth and whatever
    their ids' order; visible_stats sums what is left, first and last writes included."""
    execution = manifest.add_node(RUNS_INODE, "e1", Kind.EXECUTION, 0o755, 0, 0, 1)

    def directory(parent: int, name: str, mode: int = 0o755) -> int:
        kind = Kind.LAYER if parent == execution.ino else Kind.DIR
        return manifest.add_node(parent, name, kind, mode, 0, 0, 1).ino

    def publish(parent: int, name: str, data: bytes, now: int) -> None:
        node = manifest.add_node(parent, name, Kind.FILE, 0o644, 0, 0, now).ino
        manifest.publish(stored(data), version(node, now))

    late = directory(execution.ino, "late", 0o700)  # made before its future parent
    shut = directory(execution.ino, "shut", 0o700)
    train = directory(execution.ino, "train")
    deep = directory(directory(train, "a"), "b", 0o750)
    inner = directory(deep, "c", 0o700)
    publish(inner, "oldest", b"1" * 7, 10)
    publish(train, "x", b"2" * 3, 20)
    publish(shut, "newest", b"3" * 50, 40)
    publish(late, "y", b"4" * 5, 30)
    moving = manifest.node(late)
    assert moving is not None
    manifest.rename(moving, deep, "late", None, 35)

    restricted = {entry.ino: entry for entry in manifest.restricted_dirs(execution.ino)}
    assert set(restricted) == {shut, deep, inner, late}
    assert restricted[shut].fence is None and restricted[deep].fence is None
    assert restricted[inner].fence == deep and restricted[late].fence == deep
    assert {entry.ino for entry in manifest.restricted_dirs(train)} == {deep, inner, late}

    everything = manifest.dir_stats(execution.ino)
    assert everything == DirStats(4, 65, 10, 40)
    seen = manifest.visible_stats(execution.ino, [shut, inner])
    assert seen[execution.ino] == DirStats(2, 8, 20, 30)
    assert seen[train] == DirStats(2, 8, 20, 30)
    assert seen[deep] == DirStats(1, 5, 30, 30)
    assert shut not in seen and inner not in seen
    assert manifest.visible_stats(execution.ino, [shut, deep])[execution.ino] == DirStats(
        1, 3, 20, 20)
    assert manifest.visible_stats(train, [deep])[train] == DirStats(1, 3, 20, 20)
    assert manifest.visible_stats(execution.ino, [])[execution.ino] == everything


def test_tags_are_bytes_kept_per_node(manifest: Manifest) -> None:
    node = make_file(manifest)
    manifest.set_tag(node, "user.stage", b"\x00raw\xff", 2)
    manifest.set_tag(node, "user.big", b"x" * 70_000, 2)
    manifest.set_tag(node, "user.stage", b"clean", 3)
    assert manifest.tag(node, "user.stage") == b"clean"
    assert manifest.tag_names(node) == ["user.big", "user.stage"]
    assert list(manifest.tags_up_to(node, 100)) == [("user.big", None), ("user.stage", b"clean")]
    assert manifest.tag_usage(node, excluding="user.big") == (len("user.stage") + 1, 5)
    assert manifest.nodes_tagged("user.stage", b"clean") == {node}
    assert manifest.nodes_tagged("user.big", None) == {node}
    assert manifest.remove_tag(node, "user.big", 4) and not manifest.remove_tag(node, "x", 4)
    assert manifest.tags_of(node) == {"user.stage": b"clean"}


def test_unpublished_files_are_removed_at_start_up(manifest: Manifest) -> None:
    make_file(manifest, "never-closed.bin")
    assert manifest.unpublished_count() == 1
    assert manifest.remove_unpublished() == 1
    assert manifest.unpublished_count() == 0


def test_unpublished_files_go_in_batches(manifest: Manifest,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cafs.sqlite_manifest.namespace.GC_BATCH", 4)
    for index in range(10):
        make_file(manifest, f"never-closed-{index}")
    commits = manifest.changes
    assert manifest.remove_unpublished() == 10
    assert manifest.changes - commits == 3 and manifest.unpublished_count() == 0


def test_refcount_drift_is_found_and_repaired(manifest: Manifest) -> None:
    from cafs.manifest_api import RepairPlan
    a = make_file(manifest)
    manifest.publish(stored(b"data"), version(a))
    raw(manifest, "UPDATE blobs SET refcount = 7")
    assert [row[1:] for row in manifest.refcount_drift()] == [(7, 1)]
    assert manifest.repair(RepairPlan([], [], True, False), 9) == 1
    assert manifest.refcount_drift() == []


def test_names_are_unique_per_directory(manifest: Manifest) -> None:
    make_file(manifest, "x")
    with pytest.raises(CafsError) as failed:
        make_file(manifest, "x")
    # Where hosts share the manifest, another host may take a name this one saw free: EEXIST,
    # as create(2) says it. One host's namespace looks first: a duplicate is a bug there (EIO).
    if manifest.shared:
        assert isinstance(failed.value, AlreadyExists)
    else:
        assert isinstance(failed.value, ManifestError) and "UNIQUE" in str(failed.value)
        assert failed.value.errno == errno.EIO


def test_a_bulk_loaded_layer_is_what_publishing_each_file_leaves(manifest: Manifest) -> None:
    shared, other = stored(b"shared"), StoredBlob(digest_of_bytes(b"z"), 1, 40, "raw+xxh64")
    files = [BulkArtifact(f"f{i}", shared if i % 3 else other) for i in range(30)]
    first = manifest.bulk_load_layer("e1", "l0", files, mode=0o755, uid=7, gid=8, now_ns=5)
    manifest.bulk_load_layer("e1", "l1", files[:10], mode=0o755, uid=7, gid=8, now_ns=9)
    assert manifest.refcount_drift() == [] and manifest.dangling() == []
    assert manifest.aggregate_drift() == (0, [])
    execution = manifest.resolve("runs/e1")
    assert execution is not None and execution.nlink == 4
    logical = sum(f.blob.size for f in files) + sum(f.blob.size for f in files[:10])
    assert manifest.dir_stats(execution.ino) == DirStats(40, logical, 5, 9)
    node = manifest.resolve("runs/e1/l0/f0")
    assert node is not None and node.parent == first and node.mode == 0o644
    assert node.blob == manifest.blob(other.digest)
    assert node.blob is not None
    assert (node.blob.encoding, node.blob.stored_size) == ("raw+xxh64", 40)
    assert [v.path for v in manifest.history(node.ino, "runs/e1/l0/f0")] == ["runs/e1/l0/f0"]
    with pytest.raises(AlreadyExists):
        manifest.bulk_load_layer("e1", "l1", files, mode=0o755, uid=7, gid=8, now_ns=9)
    # a node made after the bulk load gets a new id (the ids it gave itself are taken)
    loaded = max(n.ino for n in manifest.children(first, 0, 99))
    assert make_file(manifest, "later", "l0") > loaded


def test_an_imported_tree_and_ids_after_it(manifest: Manifest) -> None:
    data = stored(b"imported")
    old = Version(0, 0, "runs/imp/l/f", data.digest, data.size, 0o644, 1, 1, 2, 2, None, 2, 3)
    new = Version(0, 0, "runs/imp/l/f", data.digest, data.size, 0o644, 1, 1, 4, 4, None, 4,
                  None)
    layer = TreeEntry("l", Kind.LAYER, 0o755, 1, 1, 1, 1, {"user.k": b"v"})
    entry = TreeEntry("l/f", Kind.FILE, 0o644, 1, 1, 4, 4, {})
    top = TreeEntry("", Kind.EXECUTION, 0o755, 1, 1, 1, 1, {})
    top_id = manifest.add_tree("imp", top, [(layer, []), (entry, [old, new])], [data], None, 9)
    node = manifest.resolve("runs/imp/l/f")
    assert node is not None and node.blob is not None and node.blob.digest == data.digest
    assert [v.number for v in manifest.history(node.ino, "runs/imp/l/f")] == [1, 2]
    assert manifest.dir_stats(top_id).artifacts == 1
    assert manifest.refcount_drift() == [] and manifest.dangling() == []
    later = manifest.add_node(RUNS_INODE, "after", Kind.EXECUTION, 0o755, 0, 0, 10)
    assert later.ino > node.ino
    with pytest.raises(AlreadyExists):
        manifest.add_tree("imp", top, [], [], None, 9)


def test_gc_removes_history_and_unreferenced_blobs(manifest: Manifest) -> None:
    a = make_file(manifest)
    manifest.publish(stored(b"old"), version(a, 1))
    manifest.publish(stored(b"new"), version(a, 2))
    gone = manifest.publish(stored(b"removed"), version(make_file(manifest, "b"), 3))
    manifest.remove_node(gone, 4)
    space = manifest.space()
    assert (space.live_blobs, space.history_versions, space.reclaimable_blobs) == (1, 2, 1)
    superseded = manifest.superseded_versions()
    assert len(superseded) == 2
    dry = manifest.collect([v for v, _, _ in superseded], keep_blobs=set(), dry_run=True)
    assert dry.versions == 2 and manifest.totals().versions == 3
    plan = manifest.collect([v for v, _, _ in superseded], keep_blobs=set(), dry_run=False)
    assert sorted(blob.digest for blob in plan.blobs) == sorted(
        [digest_of_bytes(b"old"), digest_of_bytes(b"removed")])
    assert manifest.totals().versions == 1 and manifest.totals().blobs == 1
    assert manifest.aggregate_drift() == (0, []) and manifest.dangling() == []


def test_gc_grace_keeps_a_blob_whose_last_reference_went_recently(manifest: Manifest) -> None:
    """On a shared manifest gc waits out the grace after a blob's refcount dropped to 0 (the
    server's clock); one host's manifest has no other readers to wait for."""
    gone = manifest.publish(stored(b"removed"), version(make_file(manifest), 1))
    manifest.remove_node(gone, 2)
    manifest.set_gc_grace(3600)
    kept = manifest.collect([v for v, _, _ in manifest.superseded_versions()],
                            keep_blobs=set(), dry_run=False)
    assert kept.blobs == ([] if manifest.shared else kept.blobs)
    manifest.set_gc_grace(0)
    plan = manifest.collect([], keep_blobs=set(), dry_run=False)
    assert [blob.digest for blob in plan.blobs + kept.blobs] == [digest_of_bytes(b"removed")]


def test_pins_of_another_connection_keep_blobs_from_gc(manifest: Manifest, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    """A write in flight on another host (here: another connection) pins its digest: gc's
    collect leaves that blob and lock_for_delete refuses it until unpinned."""
    if not manifest.shared:
        assert manifest.lock_for_delete(["ab" * 32]) == ["ab" * 32]
        return
    other = PgManifest(request.getfixturevalue("pg_url"))
    try:
        gone = manifest.publish(stored(b"pinned"), version(make_file(manifest), 1))
        manifest.remove_node(gone, 2)
        digest = digest_of_bytes(b"pinned")
        pin = other.pin(digest)
        assert manifest.collect([v for v, _, _ in manifest.superseded_versions()],
                                keep_blobs=set(), dry_run=False).blobs == []
        assert manifest.lock_for_delete([digest, "ab" * 32]) == ["ab" * 32]
        manifest.unlock_deleted(["ab" * 32])
        other.unpin(digest, pin)  # sent with that connection's next statement...
        assert manifest.lock_for_delete([digest]) == [] and other.has_pending()
        other.send_pending()  # ...or when the daemon finds it idle
        assert not other.has_pending()
        assert manifest.lock_for_delete([digest]) == [digest]
        manifest.unlock_deleted([digest])
        assert manifest.gc_lock() and not other.gc_lock()
        manifest.gc_unlock()
        assert other.gc_lock()
        other.gc_unlock()
    finally:
        other.close()


def test_a_publish_whose_pin_went_with_its_connection_fails_and_records_nothing(
        manifest: Manifest, request: pytest.FixtureRequest) -> None:
    """A pin is a lock of the connection that took it. If that connection drops before the
    publish commits (the publish reconnects), gc on another host may have deleted the blob
    meanwhile: the publish fails with EIO and records nothing, and the dead pin's unpin sends
    nothing on the new connection (it would release another publish's pin there)."""
    digest = digest_of_bytes(b"pinned then cut")
    node_id = make_file(manifest)
    pin = manifest.pin(digest)
    if manifest.shared:
        with psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True) as admin:
            cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                                "locktype = 'advisory' AND mode = 'ShareLock'").fetchall()
        assert cut == [(True,)]
        with pytest.raises(ManifestError) as failed:
            manifest.publish(stored(b"pinned then cut"),
                             replace(version(node_id), pin=pin))
        assert failed.value.errno == errno.EIO
        assert manifest.node(node_id).version_id is None and manifest.blob(digest) is None
        manifest.unpin(digest, pin)
        assert not manifest.has_pending()  # nothing to release on the new connection
        pin = manifest.pin(digest)
    published = manifest.publish(stored(b"pinned then cut"), replace(version(node_id), pin=pin))
    manifest.unpin(digest, pin)
    assert published.version_id is not None and published.blob.digest == digest


def test_unfinished_files_belong_to_their_session(manifest: Manifest,
                                                  request: pytest.FixtureRequest) -> None:
    """A new file's row is its session's until published; a dead session's unfinished files
    go with it; start-up recovery never removes a live session's."""
    if not manifest.shared:
        assert manifest.unpublished_is_mine(make_file(manifest))
        return
    pg: Any = manifest
    other: Any = PgManifest(request.getfixturevalue("pg_url"))
    try:
        pg.set_session_timeout(1)
        other.set_session_timeout(1)
        pg.start_session("a", "/mnt/a", 1)
        other.start_session("b", "/mnt/b", 2)
        mine = make_file(manifest, "mine")
        theirs = other.add_node(manifest.child(RUNS_INODE, "e1").ino, "theirs", Kind.FILE,
                                0o644, 0, 0, 1).ino
        published = make_file(manifest, "published")
        manifest.publish(stored(b"x"), version(published, 1))
        assert manifest.unpublished_is_mine(mine) and not manifest.unpublished_is_mine(theirs)
        assert not manifest.unpublished_is_mine(published)
        pg.set_session_where("a", "/mnt/a")
        assert manifest.remove_unpublished() == 0  # its own live session's, and b's: kept
        assert [row[0] for row in raw(manifest, "SELECT node_id FROM cafs_unfinished "
                                                "ORDER BY node_id")] == [mine, theirs]
        # b's beats stopped 5 s ago (the timeout is 1 s):
        raw(manifest, "UPDATE cafs_sessions SET beat_at = now() - interval '5 seconds' "
                      "WHERE id = ?", other.session_id)
        assert manifest.reap_dead_sessions() == (1, 1)  # type: ignore[attr-defined]
        assert manifest.node(theirs) is None and manifest.node(mine) is not None
        assert other.beat() is False  # declared dead: it must register again
        with pytest.raises(ManifestError):  # a create in the dead session is refused
            other.add_node(manifest.child(RUNS_INODE, "e1").ino, "late", Kind.FILE,
                           0o644, 0, 0, 1)
    finally:
        other.close()


def test_sealing_symlinks_and_stats(manifest: Manifest) -> None:
    node = manifest.publish(stored(b"12345"), version(make_file(manifest), 5))
    layer = manifest.resolve("runs/e1/train")
    assert layer is not None
    link = manifest.add_symlink(layer.ino, "ln", stored(b"a.csv"), uid=0, gid=0, now_ns=6)
    assert link.kind == Kind.SYMLINK and link.blob is not None
    execution = manifest.resolve("runs/e1")
    assert execution is not None
    assert manifest.dir_stats(execution.ino) == DirStats(2, 10, 5, 6)
    sharing = manifest.sharing_stats(execution.ino)
    assert (sharing.artifacts, sharing.unique_bytes) == (2, 10)
    assert manifest.seal(execution.ino, lambda: "f" * 64, 7) == "f" * 64
    assert manifest.root_of(execution.ino) == "f" * 64
    manifest.unseal(execution.ino, 8)
    assert manifest.root_of(execution.ino) is None
    assert node.blob is not None and manifest.nodes_holding_blobs([node.blob.blob_id]) == [
        node.ino]


def test_durable_point_and_roll_back(manifest: Manifest) -> None:
    a = make_file(manifest)
    manifest.publish(stored(b"synced"), version(a, 10))
    manifest.sync(20)
    assert manifest.synced_ns() == 20
    manifest.sync()  # an fsync of one file leaves the point where it was
    assert manifest.synced_ns() == 20
    late = manifest.publish(stored(b"late"), version(a, 30))
    assert [blob.digest for blob in manifest.blobs_stored_after(20)] == [digest_of_bytes(b"late")]
    assert late.blob is not None
    assert manifest.roll_back([late.blob.blob_id], 40) == [a]
    back = manifest.node(a)
    assert back is not None and back.blob is not None
    assert back.blob.digest == digest_of_bytes(b"synced")
    manifest.mark_checked(50)
    assert manifest.last_commit_ns() >= 50
    assert manifest.check_integrity() == [] and manifest.refcount_drift() == []


def test_every_database_error_leaves_the_manifest_as_a_manifest_error(
        manifest: Manifest) -> None:
    node = manifest.publish(stored(b"data"), version(make_file(manifest)))
    manifest.close()  # every call now fails inside the driver
    for call in (lambda: manifest.node(node.ino), lambda: list(manifest.all_blobs()),
                 lambda: manifest.totals(), lambda: manifest.remove_node(node, 2),
                 manifest.sync):
        with pytest.raises(ManifestError) as failed:
            call()
        assert failed.value.errno == errno.EIO


def test_postgresql_schema_is_documented(pg_cluster: PgCluster, pg_url: str) -> None:
    PgManifest(pg_url).close()
    again = PgManifest(pg_url)  # migrations run once
    again.close()
    database = pg_url.rsplit("/", 1)[1]
    bare = pg_cluster.psql(database, """
        SELECT c.table_name || '.' || c.column_name FROM information_schema.columns c
        JOIN pg_class t ON t.relname = c.table_name AND t.relkind = 'r'
        WHERE c.table_schema = 'public' AND c.table_name != 'cafs_migrations'
          AND col_description(t.oid, c.ordinal_position) IS NULL""")
    assert bare.split() == []
    types = pg_cluster.psql(database, """
        SELECT DISTINCT data_type FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name IN ('nodes', 'versions', 'blobs')
        ORDER BY 1""")
    assert types.split() == ["bigint", "text"]
