"""The manifest on PostgreSQL when the server or the network fails: a dropped connection
mid-publish, a COMMIT whose answer was lost, a hung server, a refused one, a server restarted
under a mount that keeps writing. Every call ends in bounded time; every close either succeeded
and the artifact is intact, or failed and nothing of it is visible; fsck stays clean; the
daemon recovers by itself once the server is back.

The server is a real PostgreSQL cluster the tests start (tests/backends.py); the faults come
from a loopback TCP proxy in front of it (tests/tcp_proxy.py), or from restarting the server."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from backends import PgCluster, running_pg_cluster, wait_for_pg
from conftest import Mount, write_artifact
from tcp_proxy import TcpProxy

from cafs.digest import digest_of_bytes
from cafs.errors import ManifestError
from cafs.manifest_api import NewVersion
from cafs.model import RUNS_INODE, Kind, StoredBlob
from cafs.pg_manifest import PgManifest
from cafs.pg_manifest.connection import DAEMON, PgConnection


@pytest.fixture
def proxy(pg_cluster: PgCluster) -> Iterator[TcpProxy]:
    with TcpProxy(pg_cluster.port) as running:
        yield running


@pytest.fixture
def proxied_url(pg_cluster: PgCluster, proxy: TcpProxy) -> str:
    return pg_cluster.url(pg_cluster.new_database(), port=proxy.port)


def stored(data: bytes) -> StoredBlob:
    return StoredBlob(digest_of_bytes(data), len(data), len(data), "raw")


def new_file(manifest: PgManifest, name: str) -> int:
    execution = manifest.child(RUNS_INODE, "e1") or manifest.add_node(
        RUNS_INODE, "e1", Kind.EXECUTION, 0o755, 0, 0, 1)
    layer = manifest.child(execution.ino, "l") or manifest.add_node(
        execution.ino, "l", Kind.LAYER, 0o755, 0, 0, 1)
    return manifest.add_node(layer.ino, name, Kind.FILE, 0o644, 0, 0, 1).ino


def version(node_id: int, now: int = 5) -> NewVersion:
    return NewVersion(node_id, 0o644, 0, 0, now, now, None, now)


def test_a_connection_dropped_before_commit_is_retried_whole(
        proxied_url: str, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops while the publish's transaction is open: nothing of it landed, so
    the whole publish runs again on a new connection, once."""
    manifest = PgManifest(proxied_url, serving=True)
    node_id = new_file(manifest, "a")
    dropped = []

    def drop_once(point: str) -> None:
        if point == "before-manifest-commit" and not dropped:
            dropped.append(point)
            proxy.drop()

    monkeypatch.setattr("cafs.crashpoints.reached", drop_once)
    node = manifest.publish(stored(b"data"), version(node_id))
    assert dropped and node.blob is not None
    assert manifest.totals().versions == 1 and manifest.refcount(node.blob.blob_id) == 1
    assert manifest.refcount_drift() == [] and manifest.dangling() == []
    manifest.close()


def test_a_commit_whose_answer_was_lost_is_resolved_not_repeated(
        proxied_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server committed, then the connection died before its answer arrived: the caller
    learns it succeeded (asked on a new connection), and nothing is written twice."""
    manifest = PgManifest(proxied_url, serving=True)
    node_id = new_file(manifest, "a")
    real_leave = PgConnection._leave_pipeline
    lost = []

    def leave(self: PgConnection, *, quietly: bool) -> None:
        real_leave(self, quietly=quietly)  # COMMIT (sent in the pipeline) answered here
        if not quietly and not lost:
            lost.append(self._xid)
            self.close_quietly()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(PgConnection, "_leave_pipeline", leave)
    node = manifest.publish(stored(b"data"), version(node_id))
    assert lost and node.blob is not None
    assert manifest.totals().versions == 1 and manifest.refcount(node.blob.blob_id) == 1
    manifest.close()


def test_a_hung_server_costs_seconds_then_eio_and_recovery(
        proxied_url: str, proxy: TcpProxy) -> None:
    manifest = PgManifest(proxied_url, serving=True)
    node_id = new_file(manifest, "a")
    proxy.hang()
    for call in (lambda: manifest.publish(stored(b"x"), version(node_id)),
                 lambda: manifest.node(node_id)):
        started = time.monotonic()
        with pytest.raises(ManifestError) as failed:
            call()
        took = time.monotonic() - started
        assert failed.value.errno == errno.EIO
        assert took < DAEMON.call + 3, f"a hung server held a call for {took:.1f} s"
    proxy.heal()
    assert manifest.node(node_id) is not None  # reconnected by itself
    node = manifest.publish(stored(b"y"), version(node_id, 6))
    assert node.blob is not None and manifest.totals().versions == 1
    manifest.close()


def test_a_refused_server_fails_fast(proxied_url: str, proxy: TcpProxy) -> None:
    manifest = PgManifest(proxied_url, serving=True)
    node_id = new_file(manifest, "a")
    proxy.refuse()
    proxy.drop()
    started = time.monotonic()
    with pytest.raises(ManifestError) as failed:
        manifest.publish(stored(b"x"), version(node_id))
    assert failed.value.errno == errno.EIO and time.monotonic() - started < DAEMON.call + 3
    proxy.heal()
    assert manifest.publish(stored(b"x"), version(node_id)).blob is not None
    manifest.close()


# -- on a real mount ------------------------------------------------------------------------


def writes_during(mount: Mount, fault: Any, count: int = 60) -> tuple[dict[str, bytes], int]:
    """Write `count` artifacts (each its own open/write/close) while `fault()` runs in another
    thread; then check every outcome: a close that succeeded left its artifact whole, one that
    failed left nothing. Returns (the artifacts written, how many failed)."""
    layer = mount.layer()
    written: dict[str, bytes] = {}
    failed: list[str] = []
    breaker = threading.Thread(target=fault)
    breaker.start()
    for index in range(count):
        name = f"f{index:03d}"
        data = os.urandom(4096) + name.encode()
        try:
            write_artifact(layer / name, data)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            failed.append(name)
        else:
            written[name] = data
        time.sleep(0.02)
    breaker.join()
    for name, data in written.items():
        assert (layer / name).read_bytes() == data, name
    listed = set(os.listdir(layer))
    for name in failed:
        assert name not in listed, f"{name}: its close failed, yet it is visible"
    return written, len(failed)


def accept_manifest_errors(mount: Mount) -> None:
    """The daemon logs each failed call (EIO) as an error; a traceback would be a bug."""
    text = mount.log()
    assert "Traceback" not in text and "unexpected error" not in text
    mount.log_problems(accept=True)


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: it is restarted under a mount."""
    with running_pg_cluster("cafs-pg-own-") as cluster:
        yield cluster


def test_a_postgresql_restart_during_writes_on_a_mount(
        unstarted_mount: Mount, own_cluster: PgCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFS_MANIFEST", own_cluster.url(own_cluster.new_database()))
    mount = unstarted_mount
    mount.start()

    def restart_twice() -> None:
        for _ in range(2):
            time.sleep(0.3)
            own_cluster.stop("fast")
            time.sleep(0.5)
            own_cluster.start()
            wait_for_pg(own_cluster)

    written, failures = writes_during(mount, restart_twice)
    assert written, "no write succeeded at all"
    # recovered by itself: the same daemon writes again
    write_artifact(mount.layer() / "after", b"after the restarts")
    assert (mount.layer() / "after").read_bytes() == b"after the restarts"
    mount.stop()
    accept_manifest_errors(mount)
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr
    print(f"{len(written)} closes succeeded, {failures} failed (EIO) across two restarts")


def test_dropped_connections_during_writes_on_a_mount(
        unstarted_mount: Mount, proxied_url: str, proxy: TcpProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFS_MANIFEST", proxied_url)
    mount = unstarted_mount
    mount.start()

    def drop_repeatedly() -> None:
        for _ in range(8):
            time.sleep(0.1)
            proxy.drop()

    written, failures = writes_during(mount, drop_repeatedly)
    assert len(written) + failures == 60
    mount.stop()
    accept_manifest_errors(mount)
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_a_hung_server_under_a_mount_gives_eio_in_bounded_time(
        unstarted_mount: Mount, proxied_url: str, proxy: TcpProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFS_MANIFEST", proxied_url)
    mount = unstarted_mount
    mount.start()
    layer = mount.layer()
    write_artifact(layer / "before", b"before")
    fd = os.open(layer / "during", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"written while the server hangs")
    proxy.hang()
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        os.close(fd)
    took = time.monotonic() - started
    assert failed.value.errno == errno.EIO
    assert took < DAEMON.call + 5, f"close took {took:.1f} s against a hung server"
    proxy.heal()
    assert "during" not in os.listdir(layer)
    write_artifact(layer / "after", b"after")  # the daemon recovered by itself
    assert (layer / "before").read_bytes() == b"before"
    mount.stop()
    accept_manifest_errors(mount)
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_a_deadlock_victim_is_retried_whole(pg_cluster: PgCluster, pg_url: str) -> None:
    """Another session holds the new content's blob row and then asks for the artifact's
    node row, which the publish holds: PostgreSQL breaks the cycle by aborting the publish
    (it waited first), which runs again once the other session is done, and lands once."""
    manifest = PgManifest(pg_url)
    node_id = new_file(manifest, "a")
    data = b"contended"
    digest = digest_of_bytes(data)
    manifest.add_symlink(manifest.node(node_id).parent, "holder", stored(data), uid=0, gid=0,
                         now_ns=2)  # the blob row exists
    other = psycopg.connect(pg_url, autocommit=False)
    other.execute("SELECT id FROM blobs WHERE sha256 = %s FOR UPDATE", (digest,))
    outcome: list[Any] = []
    publisher = threading.Thread(
        target=lambda: outcome.append(manifest.publish(stored(data), version(node_id))))
    publisher.start()
    time.sleep(0.3)  # the publish holds the node row and waits for the blob row
    other.execute("SELECT id FROM nodes WHERE id = %s FOR UPDATE", (node_id,))  # the cycle
    time.sleep(0.3)
    other.commit()
    publisher.join(timeout=30)
    other.close()
    assert outcome and outcome[0].blob is not None and outcome[0].blob.digest == digest
    assert manifest.history(node_id, "runs/e1/l/a")[-1].digest == digest
    assert manifest.refcount(outcome[0].blob.blob_id) == 2 and manifest.refcount_drift() == []
    manifest.close()


def test_point_reads_survive_a_rollback_and_a_dropped_connection(
        pg_cluster: PgCluster, proxy: TcpProxy, proxied_url: str) -> None:
    """Reads outside a transaction run on statements prepared once per connection (libpq
    directly). psycopg deallocates every prepared statement of the session after a ROLLBACK,
    and a new connection has none: either way the next read prepares again and answers."""
    conn = PgConnection(proxied_url, bounds=DAEMON)
    try:
        conn.execute_raw("CREATE TABLE point (id BIGINT PRIMARY KEY, name TEXT)")
        conn.execute_raw("INSERT INTO point VALUES (1, 'one'), (2, NULL)")
        select = "SELECT name, id FROM point WHERE id = ?"
        for _ in range(3):
            assert conn.execute(select, (1,)).fetchone() == ("one", 1)
        assert conn._prepared  # the fast path served it
        conn.begin(pipelined=False)
        for _ in range(3):  # inside a transaction: psycopg's path, which prepares it too
            assert conn.execute(select, (1,)).fetchone() == ("one", 1)
        conn.rollback()  # psycopg then deallocates all (its statements and ours)
        assert conn.execute(select, (2,)).fetchone() == (None, 2)
        proxy.drop()  # the connection breaks under the next read, which reconnects
        conn.deadline = time.monotonic() + 5
        assert conn.execute(select, (1,)).fetchone() == ("one", 1)
        assert conn.execute("SELECT count(*) FROM point WHERE name LIKE '%n%'").fetchone() == (1,)
    finally:
        conn.close()
