"""A store whose manifest is on PostgreSQL: where the URL comes from and what is refused (a
password in it, another URL than the store's, a database without cafs's schema beside blob
files), what stays SQLite's only (backups, cafs ui)."""

from __future__ import annotations

from pathlib import Path

import pytest
from backends import PgCluster
from conftest import cafs

from cafs.digest import digest_of_bytes
from cafs.model import RUNS_INODE, Kind


def test_a_url_with_a_password_is_refused(tmp_path: Path) -> None:
    result = cafs("stats", "--store", str(tmp_path / "s"), "--manifest",
                  "postgresql://cafs:secret@127.0.0.1:1/db", check=False)
    assert result.returncode == 2 and "password" in result.stderr
    assert "secret" not in result.stderr


@pytest.mark.parametrize("url", [
    "postgresql://cafs@127.0.0.1:1/db?passw%6Frd=S3CRET",  # libpq decodes the key
    "postgresql:///db?host=127.0.0.1&user=cafs&%70assword=S3CRET",
    "postgresql://cafs@127.0.0.1:1/db?sslpassword=S3CRET",
])
def test_a_password_in_the_url_is_refused_however_it_is_spelled(tmp_path: Path,
                                                                url: str) -> None:
    result = cafs("stats", "--store", str(tmp_path / "s"), "--manifest", url, check=False)
    assert result.returncode == 2 and "password" in result.stderr
    assert "S3CRET" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_password_in_cafs_manifest_is_refused_and_never_recorded(
        tmp_path: Path, pg_cluster: PgCluster) -> None:
    """$CAFS_MANIFEST set by hand goes through the same check as --manifest: the password
    would otherwise land in manifest.url and in every message that names the URL."""
    import os

    url = pg_cluster.url(pg_cluster.new_database()).replace("postgres@", "postgres:S3CRET@")
    store = tmp_path / "s"
    env = {**os.environ, "CAFS_MANIFEST": url}
    (tmp_path / "m").mkdir()
    result = cafs("mount", "--store", str(store), str(tmp_path / "m"), env=env, check=False)
    if result.returncode == 0:
        cafs("umount", str(tmp_path / "m"))
    url_file = store / "manifest.url"
    assert not url_file.exists() or "S3CRET" not in url_file.read_text()
    assert result.returncode == 2 and "password" in result.stderr
    assert "S3CRET" not in result.stderr


def test_a_password_in_the_configuration_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "cafs.toml"
    config.write_text('manifest = "postgresql://cafs:secret@127.0.0.1:1/db"\n')
    result = cafs("stats", "--store", str(tmp_path / "s"), "--config", str(config), check=False)
    assert result.returncode == 2 and "password" in result.stderr
    assert "secret" not in result.stderr


def test_a_store_keeps_the_manifest_it_was_made_with(
        tmp_path: Path, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.errors import NeedsRepair, StoreError
    from cafs.store import Store

    first = pg_cluster.url(pg_cluster.new_database())
    monkeypatch.setenv("CAFS_MANIFEST", first)
    store = tmp_path / "store"
    Store.open(store).close()
    assert (store / "manifest.url").read_text().strip() == first
    monkeypatch.delenv("CAFS_MANIFEST")
    opened = Store.open(store, create=False)  # found again without being told
    assert opened.manifest_url == first and not opened.keeps_backups
    opened.close()
    monkeypatch.setenv("CAFS_MANIFEST", pg_cluster.url(pg_cluster.new_database()))
    with pytest.raises(StoreError, match="keeps its manifest at"):
        Store.open(store)
    # a store on manifest.sqlite is never switched to PostgreSQL by a flag
    local = tmp_path / "local"
    monkeypatch.delenv("CAFS_MANIFEST")
    made = Store.open(local)
    made.manifest.add_node(RUNS_INODE, "e", Kind.EXECUTION, 0o755, 0, 0, 1)
    made.close()
    monkeypatch.setenv("CAFS_MANIFEST", first)
    with pytest.raises(StoreError, match=r"keeps its manifest in manifest\.sqlite"):
        Store.open(local)
    # an empty database for a store whose blob files exist: a wrong URL, not a new manifest
    data = b"a blob"
    digest = digest_of_bytes(data)
    (store / "blobs" / digest[:2] / digest).write_bytes(data)
    (store / "manifest.url").unlink()
    monkeypatch.setenv("CAFS_MANIFEST", pg_cluster.url(pg_cluster.new_database()))
    with pytest.raises(NeedsRepair, match="holds no cafs manifest"):
        Store.open(store)


def test_ui_refuses_a_postgresql_store_and_backups_are_pg_dumps(
        tmp_path: Path, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.store import Store

    monkeypatch.setenv("CAFS_CONFIG", "")  # this store's own database, whatever the backend
    monkeypatch.setenv("CAFS_MANIFEST", pg_cluster.url(pg_cluster.new_database()))
    store = tmp_path / "store"
    opened = Store.open(store)
    assert opened.backup() is None  # no copy: pg_dump's job
    opened.close()
    monkeypatch.delenv("CAFS_MANIFEST")
    result = cafs("ui", "--store", str(store), check=False)
    assert result.returncode == 3 and "PostgreSQL" in result.stderr
    result = cafs("restore", "--store", str(store), check=False)
    assert result.returncode != 0 and "pg_restore" in result.stderr
    assert cafs("stats", "--store", str(store), "--json").returncode == 0


def test_admin_commands_on_postgresql_stores(
        tmp_path: Path, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """stats, gc, fsck --full, export and import, mounted and not, on two stores whose
    manifests are two PostgreSQL databases."""
    import json
    import os

    from conftest import Mount, require_fuse

    require_fuse()
    monkeypatch.setenv("CAFS_CONFIG", "")
    first_url = pg_cluster.url(pg_cluster.new_database())
    second_url = pg_cluster.url(pg_cluster.new_database())
    first = Mount(tmp_path / "store1", tmp_path / "mnt1")
    first.mountpoint.mkdir()
    env_second = {**os.environ, "CAFS_MANIFEST": second_url}
    cafs("mount", "--manifest", first_url, "--store", str(first.store), str(first.mountpoint))
    try:
        layer = first.layer("e1", "train")
        contents = {f"f{i}": os.urandom(5000 + i) for i in range(5)}
        for name, data in contents.items():
            (layer / name).write_bytes(data)
        (layer / "f0").write_bytes(b"replaced")  # a second version
        (layer / "gone").write_bytes(b"to be removed")
        (layer / "gone").unlink()
        stats = json.loads(cafs("stats", "--store", str(first.store), "--json").stdout)
        assert stats["artifacts"] == 5
        gc = json.loads(cafs("gc", "--store", str(first.store), "--json").stdout)
        assert gc["blobs_removed"] >= 1
        bundle = tmp_path / "e1.tar"
        cafs("export", str(first.runs / "e1"), "-o", str(bundle))
    finally:
        cafs("umount", str(first.mountpoint))
    # unmounted, no flag: the store's recorded manifest is found
    assert cafs("fsck", "--store", str(first.store), "--full").returncode == 0
    result = cafs("import", "--store", str(tmp_path / "store2"), str(bundle), env=env_second)
    assert "imported runs/e1" in result.stdout
    assert cafs("fsck", "--store", str(tmp_path / "store2"), "--full").returncode == 0
    second = Mount(tmp_path / "store2", tmp_path / "mnt2")
    second.mountpoint.mkdir()
    cafs("mount", "--store", str(second.store), str(second.mountpoint), env=env_second)
    try:
        imported = second.runs / "e1" / "train"
        assert (imported / "f0").read_bytes() == b"replaced"
        for name in ("f1", "f2", "f3", "f4"):
            assert (imported / name).read_bytes() == contents[name]
    finally:
        cafs("umount", str(second.mountpoint))
    assert second.log_problems() == [] and first.log_problems() == []


def test_another_stores_database_is_refused_for_a_new_store_directory(
        tmp_path: Path, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second store directory given the first one's database would mount the first one's
    artifacts over its own blobs (every read EIO; its fsck --repair would mark them all damaged
    in the first store's manifest), with a lock of its own beside the first one's daemon."""
    from conftest import Mount, require_fuse

    require_fuse()
    monkeypatch.setenv("CAFS_CONFIG", "")
    url = pg_cluster.url(pg_cluster.new_database())
    first = Mount(tmp_path / "a", tmp_path / "ma")
    first.mountpoint.mkdir()
    cafs("mount", "--manifest", url, "--store", str(first.store), str(first.mountpoint))
    try:
        (first.layer() / "f").write_bytes(b"x" * 5000)
        (tmp_path / "mb").mkdir()
        result = cafs("mount", "--manifest", url, "--store", str(tmp_path / "b"),
                      str(tmp_path / "mb"), check=False)
        if result.returncode == 0:
            cafs("umount", str(tmp_path / "mb"))
        assert result.returncode == 3, result.stderr
        assert "already holds" in result.stderr and "manifest.url" in result.stderr
        assert not (tmp_path / "b" / "manifest.url").exists()
        assert (first.layer() / "f").read_bytes() == b"x" * 5000
    finally:
        cafs("umount", str(first.mountpoint))
    assert cafs("fsck", "--full", "--store", str(first.store), check=False).returncode == 0


def test_a_database_with_an_empty_manifest_is_taken(
        tmp_path: Path, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first mount that stopped after making the schema and before recording manifest.url
    left an empty manifest: the next mount takes it."""
    from cafs.store import Store

    monkeypatch.setenv("CAFS_MANIFEST", pg_cluster.url(pg_cluster.new_database()))
    Store.open(tmp_path / "s").close()
    (tmp_path / "s" / "manifest.url").unlink()
    Store.open(tmp_path / "s").close()
    assert (tmp_path / "s" / "manifest.url").exists()
