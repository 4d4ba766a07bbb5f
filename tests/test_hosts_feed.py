"""Close-to-open across hosts, and the change feed behind it (issue 17, tests 1, 2 and 5).

Two daemons on this machine play two hosts on one store (tests/hosts.py): one PostgreSQL
database, one S3 prefix, each its own store directory, cache and mountpoint. What one host's
close() made, the other's next open() reads; names made or removed on one show on the other
within a second; a descriptor already open keeps the version it opened. Faults come from a
loopback proxy in front of one host's S3 or PostgreSQL (tests/tcp_proxy.py), or a restart of
a cluster of the test's own. The feed reader itself is tested against a real server: commits
that land out of the order their rows were written are each read once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from backends import PgCluster, WeedServer, running_pg_cluster, wait_for_pg
from conftest import (
    as_nobody,
    as_reader,
    cafs,
    reachable_dir,
    require_fuse,
    unmount_whatever_state,
)
from hosts import Host, running_hosts, shared_config
from hosts import hosts as hosts  # the fixture
from tcp_proxy import TcpProxy

from cafs.model import Kind
from cafs.pg_manifest import PgManifest, feed
from cafs.pg_manifest.feed import ChangeFeed

SOON = 1.0  # the promise: new and removed names show on the other host within this


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` held (polled every 10 ms); fails after `seconds`."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.01)


def gone(path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return True
    return False


def listing(root: Path) -> str:
    """`ls -R` of a tree, as a user compares two hosts."""
    return subprocess.run(["ls", "-R", str(root)], capture_output=True, text=True,
                          check=True).stdout.replace(str(root), "ROOT")


@contextlib.contextmanager
def two_hosts(tmp_path: Path, config_a: list[str], config_b: list[str]
              ) -> Iterator[tuple[Host, Host]]:
    """Hosts a and b with configurations of their own (one of them behind a proxy)."""
    require_fuse()
    a = Host("a", tmp_path / "host-a", config_a)
    b = Host("b", tmp_path / "host-b", config_b)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        for host in (a, b):
            unmount_whatever_state(host.mountpoint)


# -- issue 17, test 1: close-to-open, and a held descriptor keeps its version -------------

@pytest.mark.parametrize("new_size", [200_000, 300_000, 450_000])
def test_b_reads_what_a_closed_and_a_held_descriptor_keeps_its_version(
        hosts: list[Host], new_size: int) -> None:
    a, b = hosts
    old = os.urandom(300_000)
    path_a = a.layer("e1", "train") / "model.bin"
    path_b = b.runs / "e1" / "train" / "model.bin"
    path_a.write_bytes(old)
    within(SOON, lambda: path_b.read_bytes() == old)

    held = open(path_b, "rb")  # noqa: SIM115 (held across the overwrite)
    try:
        assert held.read(4096) == old[:4096]  # the kernel caches pages of the old version
        new = os.urandom(new_size)
        with open(path_a, "wb") as file:
            file.write(new)
        # close() on a returned: b's next open reads the new bytes, at once.
        assert path_b.read_bytes() == new
        # ... while the descriptor b held reads on the version it opened, whole (the size
        # b shows stays the longer one's while it is held: see the README).
        assert held.read() == old[4096:]
        held.seek(0)
        assert held.read() == old
        assert path_b.read_bytes() == new
    finally:
        held.close()
    # Once it is closed, nothing of the old version is left in b's kernel.
    within(SOON, lambda: path_b.stat().st_size == new_size)
    assert path_b.read_bytes() == new
    assert path_b.read_bytes() == new  # and a re-read (page cache kept) too


def test_every_overwrite_reads_back_on_the_other_host_at_once(hosts: list[Host]) -> None:
    """A tight loop of close on a, open on b, both ways: never an old or a torn read."""
    a, b = hosts
    path = {a: a.layer() / "f", b: b.runs / "e1" / "train" / "f"}
    (path[a]).write_bytes(b"start")
    within(SOON, lambda: path[b].read_bytes() == b"start")
    for round_ in range(30):
        writer, reader = (a, b) if round_ % 2 == 0 else (b, a)
        data = os.urandom(1000 + round_ * 997)
        with open(path[writer], "wb") as file:
            file.write(data)
        assert path[reader].read_bytes() == data, f"round {round_}"


# -- issue 17, test 2: mv and rm -rf on a; b gets ENOENT within a second ------------------

def test_mv_and_rm_rf_on_a_show_on_b_within_a_second(hosts: list[Host]) -> None:
    a, b = hosts
    for layer in ("train", "eval"):
        directory = a.layer("e1", layer)
        (directory / "sub").mkdir()
        for i in range(5):
            (directory / f"f{i}").write_bytes(os.urandom(100 + i))
        (directory / "sub" / "deep").write_bytes(b"deep")
    a.layer("e2", "train")
    (a.runs / "e2" / "train" / "keep").write_bytes(b"keep")
    # b has looked at everything: its kernel and its daemon cache all of it.
    within(SOON, lambda: listing(b.runs) == listing(a.runs))
    assert (b.runs / "e1" / "train" / "f0").read_bytes() == (a.runs / "e1" / "train" /
                                                             "f0").read_bytes()

    subprocess.run(["mv", str(a.runs / "e1" / "train" / "f0"),
                    str(a.runs / "e1" / "train" / "moved")], check=True)
    subprocess.run(["mv", str(a.runs / "e1" / "eval"), str(a.runs / "e2" / "eval")],
                   check=True)
    within(SOON, lambda: gone(b.runs / "e1" / "train" / "f0"))
    within(SOON, lambda: gone(b.runs / "e1" / "eval" / "sub" / "deep"))
    with pytest.raises(FileNotFoundError):
        (b.runs / "e1" / "train" / "f0").read_bytes()
    assert (b.runs / "e1" / "train" / "moved").read_bytes() == (a.runs / "e1" / "train" /
                                                                "moved").read_bytes()
    assert (b.runs / "e2" / "eval" / "sub" / "deep").read_bytes() == b"deep"
    within(SOON, lambda: listing(b.runs) == listing(a.runs))

    subprocess.run(["rm", "-rf", str(a.runs / "e1")], check=True)
    within(SOON, lambda: gone(b.runs / "e1"))
    with pytest.raises(FileNotFoundError):
        (b.runs / "e1" / "train" / "moved").read_bytes()
    within(SOON, lambda: listing(b.runs) == listing(a.runs))
    assert sorted(os.listdir(b.runs)) == ["e2"]


def test_a_name_b_found_missing_appears_within_a_second(hosts: list[Host]) -> None:
    """b's kernel remembers a name as missing (a negative entry); a makes it: b sees it."""
    a, b = hosts
    a.layer()
    later = b.runs / "e1" / "train" / "later"
    within(SOON, lambda: (b.runs / "e1" / "train").is_dir())
    for _ in range(3):
        assert gone(later)
    (a.runs / "e1" / "train" / "later").write_bytes(b"now")
    within(SOON, lambda: later.read_bytes() == b"now")


def test_a_file_being_written_on_a_is_invisible_on_b_until_it_is_closed(
        hosts: list[Host]) -> None:
    a, b = hosts
    a.layer()
    path_b = b.runs / "e1" / "train" / "slow"
    with open(a.runs / "e1" / "train" / "slow", "wb") as file:
        file.write(b"x" * 1000)
        file.flush()
        for _ in range(20):  # b looks (and must not remove a's row: a publishes it below)
            assert gone(path_b)
            assert "slow" not in os.listdir(path_b.parent)
            time.sleep(0.01)
    within(SOON, lambda: path_b.read_bytes() == b"x" * 1000)


# -- issue 17, test 5: S3 refused or hung on a ---------------------------------------------

@pytest.mark.parametrize("fault", ["refuse", "hang"])
def test_s3_out_on_a_gives_eio_there_and_nothing_on_b_then_recovers(
        tmp_path: Path, pg_cluster: PgCluster, weed: WeedServer, fault: str) -> None:
    manifest = f'manifest = "{pg_cluster.url(pg_cluster.new_database())}"'
    prefix = weed.new_prefix()
    with TcpProxy(weed.port) as proxy, two_hosts(
            tmp_path, [manifest, f'blobs = "{weed.url(prefix, f"http://{proxy.url_host}")}"'],
            [manifest, f'blobs = "{weed.url(prefix)}"']) as (a, b):
        layer = a.layer()
        (layer / "before").write_bytes(b"before" * 1000)
        getattr(proxy, fault)()
        proxy.drop()
        started = time.monotonic()
        with pytest.raises(OSError) as failed, open(layer / "during", "wb") as file:
            file.write(os.urandom(300_000))
        assert failed.value.errno == errno.EIO
        assert time.monotonic() - started < 15
        assert gone(layer / "during")
        b_layer = b.runs / "e1" / "train"
        for _ in range(int(SOON / 0.05)):  # nothing of it shows on b, at any moment
            assert gone(b_layer / "during")
            assert sorted(os.listdir(b_layer)) == ["before"]
            time.sleep(0.05)
        assert (b_layer / "before").read_bytes() == b"before" * 1000
        proxy.heal()
        after = os.urandom(300_000)
        (layer / "after").write_bytes(after)  # recovered by itself
        within(SOON, lambda: (b_layer / "after").read_bytes() == after)
        a.log_problems(accept=True)  # the failed publish was logged: expected
        b.assert_clean()


# -- the feed after a lost connection: reconnect, flush, nothing stale ---------------------

def test_b_reconnects_after_its_database_link_drops_and_flushes_what_it_cached(
        tmp_path: Path, pg_cluster: PgCluster, weed: WeedServer) -> None:
    """b's link to PostgreSQL is cut while a changes things; its feed missed the NOTIFYs (a
    disconnected listener gets none): after it reconnects it flushes, and b's listing and
    contents are a's again."""
    database = pg_cluster.new_database()
    blobs = f'blobs = "{weed.url(weed.new_prefix())}"'
    with TcpProxy(pg_cluster.port) as proxy, two_hosts(
            tmp_path, [f'manifest = "{pg_cluster.url(database)}"', blobs],
            [f'manifest = "{pg_cluster.url(database, proxy.port)}"', blobs]) as (a, b):
        layer = a.layer()
        for name in ("stays", "goes", "changes"):
            (layer / name).write_bytes(name.encode())
        b_layer = b.runs / "e1" / "train"
        within(SOON, lambda: sorted(os.listdir(b_layer)) == ["changes", "goes", "stays"])
        proxy.refuse()
        proxy.drop()
        (layer / "goes").unlink()
        (layer / "new").write_bytes(b"new")
        (layer / "changes").write_bytes(b"changed")
        time.sleep(0.3)
        proxy.heal()
        within(3.0, lambda: sorted(os.listdir(b_layer)) == ["changes", "new", "stays"])
        assert (b_layer / "changes").read_bytes() == b"changed"
        assert (b_layer / "new").read_bytes() == b"new"
        b.log_problems(accept=True)  # the lost link was logged: expected


def test_after_a_postgresql_restart_the_feed_reconnects_and_b_sees_new_changes(
        tmp_path: Path, weed: WeedServer) -> None:
    with running_pg_cluster("cafs-feed-") as cluster:
        config = [f'manifest = "{cluster.url(cluster.new_database())}"',
                  f'blobs = "{weed.url(weed.new_prefix())}"']
        with two_hosts(tmp_path, config, config) as (a, b):
            layer = a.layer()
            (layer / "one").write_bytes(b"1")
            b_layer = b.runs / "e1" / "train"
            within(SOON, lambda: os.listdir(b_layer) == ["one"])
            cluster.restart()
            wait_for_pg(cluster)
            # a's next change may meet its dropped connection once: it retries by itself.
            (layer / "two").write_bytes(b"2")
            (layer / "one").unlink()
            within(3.0, lambda: os.listdir(b_layer) == ["two"])
            assert (b_layer / "two").read_bytes() == b"2"
            for host in (a, b):
                host.log_problems(accept=True)


# -- the feed reader against a real server --------------------------------------------------

def _insert_dir(conn: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    conn.execute("INSERT INTO nodes (parent_id, name, kind, mode, uid, gid, mtime_ns, ctime_ns)"
                 " VALUES (2, %s, 'execution', 493, 0, 0, 0, 0)", (name,))


def _names(batch: feed.Batch) -> list[str]:
    return sorted(change.name or "" for change in batch.changes)


def test_the_feed_reads_every_commit_once_whatever_the_order_they_land_in(
        pg_url: str) -> None:
    PgManifest(pg_url).close()  # the schema, with the feed's triggers
    reader = ChangeFeed(pg_url, session_id=None)
    reader.connect()
    assert reader.read().flush  # a new reader knows nothing yet: it flushes
    assert reader.read().changes == ()
    with psycopg.connect(pg_url) as slow, psycopg.connect(pg_url, autocommit=True) as quick:
        _insert_dir(slow, "first-written")  # its row is written first, and not committed
        _insert_dir(quick, "second-written")  # written later, committed first
        batch = reader.read()
        assert _names(batch) == ["second-written"]
        assert not batch.flush
        assert reader.read().changes == ()  # read once
        slow.commit()  # lands after a row written later: a counter would have passed it
    assert _names(reader.read()) == ["first-written"]
    assert reader.read().changes == ()
    # Many interleaved writers: each change read exactly once.
    conns = [psycopg.connect(pg_url) for _ in range(4)]
    try:
        seen: list[str] = []
        for round_ in range(10):
            for i, conn in enumerate(conns):
                _insert_dir(conn, f"r{round_}-c{i}")
            for conn in conns[round_ % 4:] + conns[:round_ % 4]:
                conn.commit()
                seen += _names(reader.read())
        assert sorted(seen) == sorted(f"r{r}-c{i}" for r in range(10) for i in range(4))
    finally:
        for conn in conns:
            conn.close()
    reader.close()


def test_the_feed_wakes_for_other_mounts_changes_only_and_flushes_after_a_gap(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = PgManifest(pg_url)
    session = manifest.start_session("here", "/mnt", os.getpid())
    reader = ChangeFeed(pg_url, session_id=session)
    reader.connect()
    reader.read()
    manifest.add_node(2, "mine", Kind.EXECUTION, 0o755, 0, 0, time.time_ns())
    time.sleep(0.3)
    assert not reader.notified()  # its own change: no wake-up
    with psycopg.connect(pg_url, autocommit=True) as other:
        _insert_dir(other, "theirs")
    within(2.0, lambda: reader.notified())
    assert _names(reader.read()) == ["theirs"]  # its own changes are not read either
    reader.connect()  # a reconnect: notifications were lost meanwhile
    assert reader.read().flush
    assert not reader.read().flush
    monkeypatch.setattr(feed, "KEEP_UP", 0.0)  # silent longer than rows are surely kept
    time.sleep(0.01)
    assert reader.read().flush
    manifest.close()
    reader.close()


def test_old_change_rows_are_trimmed(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PgManifest(pg_url).close()
    monkeypatch.setattr(feed, "TRIM_AFTER", 0.0)
    monkeypatch.setattr(feed, "TRIM_EVERY", 0.0)
    reader = ChangeFeed(pg_url, session_id=None)
    reader.connect()
    with psycopg.connect(pg_url, autocommit=True) as other:
        for i in range(5):
            _insert_dir(other, f"d{i}")
        reader.read()  # samples the snapshot's xmin: every row above is older
        _insert_dir(other, "newer")
        assert reader.trim() == 5
        count = other.execute("SELECT count(*) FROM cafs_changes").fetchone()
        assert count is not None and count[0] == 1
    reader.close()


def test_tags_and_records_changed_on_a_show_on_b(hosts: list[Host]) -> None:
    """What b computes or caches from many rows (a layer's .record.json) and the user tags it
    reads follow a's changes too."""
    a, b = hosts
    layer_a = a.layer()
    (layer_a / "one").write_bytes(b"1")
    record_b = b.runs / "e1" / "train" / ".record.json"
    within(SOON, lambda: json.loads(record_b.read_bytes())["artifacts"] == 1)
    (layer_a / "two").write_bytes(b"22")
    within(SOON, lambda: json.loads(record_b.read_bytes())["artifacts"] == 2)
    subprocess.run(["setfattr", "-n", "user.stage", "-v", "eval", str(layer_a / "one")],
                   check=True)
    file_b = b.runs / "e1" / "train" / "one"
    within(SOON, lambda: os.getxattr(file_b, "user.stage") == b"eval")
    within(SOON, lambda: json.loads(record_b.read_bytes())["logical_bytes"] == 3)


def test_a_layer_closed_on_a_leaves_the_records_b_serves_other_users(
        pg_cluster: PgCluster, weed: WeedServer) -> None:
    """Records are cached per view (the directories a reader may not list): a chmod 700 on a
    must drop that on b too, or another user reading b's record of the run would go on seeing
    the closed layer's name and totals."""
    with (reachable_dir("cafs-hosts-") as parent,
          running_hosts(parent, [*shared_config(pg_cluster, weed), "allow_other = true"])
          as (a, b)):
        made = as_nobody("mkdir -p runs/e1/open runs/e1/shut && echo 1 > runs/e1/open/x && "
                         "head -c 5000 /dev/urandom > runs/e1/shut/weights.bin", a.mountpoint)
        assert made.returncode == 0, made.stderr

        def reader_sees() -> dict[str, Any]:
            seen = as_reader("cat runs/e1/.record.json", b.mountpoint)
            assert seen.returncode == 0, seen.stderr
            return cast(dict[str, Any], json.loads(seen.stdout))

        within(SOON, lambda: reader_sees()["logical_bytes"] == 5002)
        assert as_nobody("chmod 700 runs/e1/shut", a.mountpoint).returncode == 0
        within(SOON, lambda: reader_sees()["logical_bytes"] == 2)
        seen = reader_sees()
        assert [layer["name"] for layer in seen["layers"]] == ["open"]
        assert seen["unlisted_directories"] == 1 and "shut" not in json.dumps(seen)
        owner = json.loads(as_nobody("cat runs/e1/.record.json", b.mountpoint).stdout)
        assert owner["logical_bytes"] == 5002 and len(owner["layers"]) == 2


def test_a_run_sealed_on_a_refuses_changes_on_b(hosts: list[Host]) -> None:
    a, b = hosts
    (a.layer() / "f").write_bytes(b"f")
    target = b.runs / "e1" / "train" / "f"
    within(SOON, lambda: target.read_bytes() == b"f")
    assert (target.parent / "g").write_bytes(b"g") == 1  # b may write while it is open
    cafs("seal", str(a.runs / "e1"), env=a.command_env())
    record = b.runs / "e1" / ".record.json"
    within(SOON, lambda: json.loads(record.read_bytes())["sealed"] is True)
    with pytest.raises(OSError) as refused:
        (target.parent / "h").write_bytes(b"h")
    assert refused.value.errno == errno.EROFS
    assert sorted(os.listdir(target.parent)) == ["f", "g"]


def test_b_rereading_a_file_a_keeps_rewriting_reads_only_whole_versions(
        hosts: list[Host]) -> None:
    """Reads on b while a rewrites the file, shorter and longer by turns: every read on b is
    a version a wrote (it failed: a short version read on b when a longer one came went on
    to the longer size as zeros, up to a page or a read-ahead boundary)."""
    a, b = hosts
    path_a = a.layer("e1", "train") / "f"
    path_b = b.runs / "e1" / "train" / "f"
    written = {b"first"}
    path_a.write_bytes(b"first")
    within(SOON, lambda: path_b.exists())
    stop = threading.Event()
    bad: list[str] = []

    def write() -> None:
        index = 0
        while not stop.is_set():
            data = os.urandom((index % 2) * 1_200_000 + 1000 + index)
            written.add(data)
            path_a.write_bytes(data)
            index += 1

    def read() -> None:
        while not stop.is_set():
            data = path_b.read_bytes()
            if data not in written:
                how = [("prefix" if v.startswith(data) else "then-zeros"
                        if data.startswith(v) and not data[len(v):].strip(b"\0") else "")
                       + f" of {len(v)}" for v in list(written)]
                bad.append(f"read {len(data)} bytes: {[h for h in how if h[0] != ' ']}")

    threads = [threading.Thread(target=write), threading.Thread(target=read),
               threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    time.sleep(float(os.environ.get("CAFS_REREAD_SECONDS", "15")))
    stop.set()
    for thread in threads:
        thread.join()
    assert not bad, bad[:5]
