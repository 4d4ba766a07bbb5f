"""Sessions of several hosts on one store (PostgreSQL + S3), with real daemons: a file being
written on A is invisible on B and never removed by B while A lives; what a killed A left is
removed by B once A's session expires; gc on one host never deletes what a write in flight on
the other is about to reference, waits out its grace period, and runs once at a time; status
and stats list the live mounts.

Hosts run with QUICK settings (session_timeout = 2 s, gc_grace = 2 s). Races are made real
with CAFS_PAUSE_AT (cafs.crashpoints): a daemon is held between two steps while the other
host acts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import cafs, sha, wait_dead
from hosts import Host, Shared
from hosts import quick_hosts as quick_hosts  # the fixtures
from hosts import shared as shared

TIMEOUT = 2.0  # QUICK's session_timeout


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def gc(host: Host, *args: str) -> dict[str, object]:
    result = cafs("gc", "--store", str(host.store), "--json", *args, env=host.command_env())
    return dict(json.loads(result.stdout))


def orphans(host: Host) -> list[str]:
    """Blob objects no manifest row names, as fsck lists them (while mounted: garbage)."""
    result = cafs("fsck", "--store", str(host.store), "--json", check=False,
                  env=host.command_env())
    report = json.loads(result.stdout)
    return [line for line in report["garbage"] + report["possible_lost_metadata"]
            if "not in the manifest" in line]


def sessions(shared: Shared) -> list[list[str]]:
    return shared.sql("SELECT id, mountpoint FROM cafs_sessions ORDER BY id")


def test_a_file_being_written_on_a_is_invisible_on_b_and_kept_while_a_lives(
        quick_hosts: list[Host], shared: Shared) -> None:
    a, b = quick_hosts
    (a.layer() / "done").write_bytes(b"done")
    data = os.urandom(200_000)
    with open(a.layer() / "growing", "wb") as writer:
        writer.write(data[:100_000])
        writer.flush()
        assert shared.count("SELECT count(*) FROM cafs_unfinished") == 1
        on_b = b.runs / "e1" / "train"
        assert sorted(os.listdir(on_b)) == ["done"]
        with pytest.raises(FileNotFoundError):
            os.stat(on_b / "growing")
        with pytest.raises(FileNotFoundError):
            (on_b / "growing").read_bytes()
        # Longer than the timeout: A beats, so B's clean-up leaves A's file alone; a lookup
        # on B (above) did not remove it, nor does B's start-up recovery.
        b.stop()
        b.start()
        time.sleep(TIMEOUT * 2)
        assert shared.count("SELECT count(*) FROM cafs_unfinished") == 1
        assert len(sessions(shared)) == 2
        writer.write(data[100_000:])
    assert sha((a.layer() / "growing").read_bytes()) == sha(data)
    assert shared.count("SELECT count(*) FROM cafs_unfinished") == 0  # published: nobody's

    # status and stats show both live mounts, on any host.
    status = json.loads(cafs("status", "--store", str(b.store), "--json",
                             env=b.command_env()).stdout)
    assert sorted(s["mountpoint"] for s in status["sessions"]) == \
        sorted([str(a.mountpoint), str(b.mountpoint)])
    assert all(s["last_beat_age"] < TIMEOUT for s in status["sessions"])
    text = cafs("status", "--store", str(a.store), env=a.command_env()).stdout
    assert "sessions    2 live mounts" in text and f":{b.mountpoint}  pid" in text
    stats = json.loads(cafs("stats", "--store", str(a.store), "--json",
                            env=a.command_env()).stdout)
    assert len(stats["sessions"]) == 2
    assert "last beat" in cafs("stats", "--store", str(b.store), env=b.command_env()).stdout


def test_a_dead_mount_is_cleaned_after_by_the_other_host_and_a_paused_one_comes_back(
        quick_hosts: list[Host], shared: Shared) -> None:
    """A stopped (SIGSTOP) longer than the timeout: B removes its session and the file it was
    writing; A notices at its next beat, registers again and writes as before, while that
    file's close() fails (EIO). Then A is killed with a file half written: B removes A's
    session and the file once the timeout passed."""
    a, b = quick_hosts
    pid = a.daemon_pid()
    # The writer is a process of its own: a descriptor into a stopped mount held by this one
    # would hang every subprocess it starts (the child closes it, and the close waits).
    paused = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'wb'); f.write(b'half'); "
         "f.flush(); print('written', flush=True); sys.stdin.readline(); f.close()",
         str(a.layer() / "paused")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert paused.stdout is not None and paused.stdout.readline() == "written\n"
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("B to remove A's session", lambda: len(sessions(shared)) == 1)
        assert shared.count("SELECT count(*) FROM cafs_unfinished") == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for("A to register again", lambda: len(sessions(shared)) == 2)
    assert "declared dead by another host" in a.log()
    _, errors = paused.communicate("close\n", timeout=30)
    assert paused.returncode != 0 and "[Errno 5]" in errors, errors  # EIO: its row is gone
    a.log_problems(accept=True)  # that failed publish is logged as an error
    (a.layer() / "after").write_bytes(b"after")
    assert (b.runs / "e1" / "train" / "after").read_bytes() == b"after"

    writer = open(a.layer() / "never-closed", "wb")  # noqa: SIM115 (its mount dies under it)
    writer.write(b"half")
    writer.flush()
    assert shared.count("SELECT count(*) FROM cafs_unfinished") == 1
    a.kill9()
    with contextlib.suppress(OSError):
        writer.close()
    wait_for("B to remove A's dead session", lambda: len(sessions(shared)) == 1)
    assert sessions(shared)[0][1] == str(b.mountpoint)
    assert shared.count("SELECT count(*) FROM nodes WHERE kind = 'file' "
                        "AND version_id IS NULL") == 0
    assert "removed 1 dead sessions of other mounts and 1 files" in b.log()
    a.start()
    assert sorted(os.listdir(a.layer())) == ["after"]


def test_kill_9_of_a_at_each_crash_point_b_sees_nothing_partial_and_gc_collects(
        quick_hosts: list[Host], shared: Shared) -> None:
    """Issue 17, test 4: A dies at each step of a write (one of them after the upload, before
    the manifest commit). B never sees a partial artifact; A's leftovers go once its session
    expires; gc removes the orphan object once older than the grace period."""
    a, b = quick_hosts
    written: dict[str, str] = {}
    points = ("after-temp-write", "after-temp-fsync", "after-blob-rename",
              "before-manifest-commit", "after-manifest-commit")
    for point in points:
        a.stop()
        a.start(env={"CAFS_CRASH_AT": point})
        pid = a.daemon_pid()
        data = os.urandom(150_000)
        written[point] = sha(data)
        with contextlib.suppress(OSError):
            (a.layer() / point).write_bytes(data)
        assert wait_dead(pid, timeout=30), f"A should have died at {point}"
        a.clear_dead_mount()
        a.log_problems(accept=True)
        on_b = b.runs / "e1" / "train"
        for name in os.listdir(on_b):  # whole, or not there
            assert sha((on_b / name).read_bytes()) == written[name], name
        # Restarted at the next point, A removes its own earlier session's leftovers; after
        # the last one it is not restarted: B must clean after it.
    wait_for("A's session to be removed by B", lambda: len(sessions(shared)) == 1)
    assert shared.count("SELECT count(*) FROM nodes WHERE kind = 'file' "
                        "AND version_id IS NULL") == 0
    assert shared.count("SELECT count(*) FROM cafs_unfinished") == 0
    # The object uploaded before the commit (after-blob-rename) is an orphan: kept while
    # young, collected once older than gc_grace, even with --orphan-grace 0. fsck --repair
    # keeps the same grace (asked here with gc_grace = 3600, so the orphans are young).
    assert len(orphans(b)) >= 1
    patient = Path(b.env["CAFS_CONFIG"]).with_name("patient.toml")
    patient.write_text(Path(b.env["CAFS_CONFIG"]).read_text().replace("gc_grace = 2",
                                                                       "gc_grace = 3600"))
    repaired = cafs("fsck", "--repair", "--store", str(b.store), "--json", "--orphan-grace", "0",
                    env={**b.command_env(), "CAFS_CONFIG": str(patient)})
    assert json.loads(repaired.stdout)["orphan_files_removed"] == 0
    assert len(orphans(b)) >= 1
    time.sleep(2.5)
    report = gc(b, "--orphan-grace", "0")
    assert report["orphan_files_removed"] >= 1
    assert orphans(b) == []
    a.start()
    for name in os.listdir(a.layer()):
        assert sha((a.layer() / name).read_bytes()) == written[name], name


def test_gc_on_b_never_deletes_content_a_publish_in_flight_on_a_references(
        quick_hosts: list[Host], shared: Shared) -> None:
    """Issue 17, test 6, both orders. (1) A found the content stored (a dedup hit) and is held
    before recording its version while B's gc collects that very blob: A's pin keeps it.
    (2) B's gc is held after choosing the blob, about to delete its object, while A publishes
    the same content: A waits for the delete, then stores it anew. Nothing is lost either way;
    a second gc meanwhile says another runs (exit 1)."""
    a, b = quick_hosts
    data = os.urandom(120_000)
    digest = sha(data)
    blob_rows = f"SELECT count(*) FROM blobs WHERE sha256 = '{digest}'"

    def unreferenced() -> None:
        (a.layer() / "first").write_bytes(data)
        (a.layer() / "first").unlink()
        assert gc(b)["blobs_removed"] == 0  # within the grace period: kept
        time.sleep(2.5)

    def write_in_background(name: str) -> threading.Thread:
        thread = threading.Thread(target=(a.layer() / name).write_bytes, args=(data,))
        thread.start()
        return thread

    # (1) A held after its dedup check, its pin taken.
    unreferenced()
    a.stop()
    a.start(env={"CAFS_PAUSE_AT": "after-dedup-check:3"})
    writer = write_in_background("second")
    wait_for("A to hold", lambda: "pause point after-dedup-check" in a.log())
    report = gc(b)
    assert report["blobs_removed"] == 0, report  # pinned by A
    writer.join(timeout=30)
    assert shared.count(blob_rows) == 1
    assert sha((b.runs / "e1" / "train" / "second").read_bytes()) == digest

    # (2) B's gc held with the blob chosen and locked, its object not yet deleted.
    (a.layer() / "second").unlink()
    time.sleep(2.5)
    b.stop()
    b.start(env={"CAFS_PAUSE_AT": "gc-before-delete:1.5"})
    collecting = threading.Thread(target=gc, args=(b,))
    collecting.start()
    wait_for("B's gc to hold", lambda: "pause point gc-before-delete" in b.log())
    busy = cafs("gc", "--store", str(a.store), check=False, env=a.command_env())
    assert busy.returncode == 1 and "another cafs gc is running" in busy.stderr, busy.stderr
    writer = write_in_background("third")
    collecting.join(timeout=30)
    writer.join(timeout=30)
    assert sha((b.runs / "e1" / "train" / "third").read_bytes()) == digest
    assert shared.count(blob_rows) == 1
    assert orphans(a) == []


def test_a_publish_whose_pin_went_with_a_dropped_connection_fails_and_gc_loses_nothing(
        quick_hosts: list[Host], shared: Shared) -> None:
    """A found the content stored (a dedup hit) and pinned it; then its connection to
    PostgreSQL dropped, and the pin with it. B's gc may now collect that blob, object and
    row: A's publish must not then record a version naming it. A's close fails (EIO),
    nothing is visible, nothing is lost, fsck is clean, and A writes again normally."""
    a, b = quick_hosts
    data = os.urandom(120_000)
    digest = sha(data)
    (a.layer() / "first").write_bytes(data)
    (a.layer() / "first").unlink()
    time.sleep(2.5)  # past gc_grace: the unreferenced blob is collectable
    a.stop()
    a.start(env={"CAFS_PAUSE_AT": "after-dedup-check:6"})
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            (a.layer() / "second").write_bytes(data)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    wait_for("A to hold", lambda: "pause point after-dedup-check" in a.log())
    cut = shared.sql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                     "locktype = 'advisory' AND mode = 'ShareLock'")
    assert cut == [["t"]], cut  # A's pin, on the connection it was taken on
    assert gc(b)["blobs_removed"] == 1  # nothing pins it any more
    writer.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
    assert outcome[0].errno == errno.EIO
    assert not (b.runs / "e1" / "train" / "second").exists()
    assert shared.count(f"SELECT count(*) FROM blobs WHERE sha256 = '{digest}'") == 0
    a.log_problems(accept=True)
    check = cafs("fsck", "--store", str(b.store), "--json", check=False, env=b.command_env())
    assert json.loads(check.stdout)["damage"] == [], check.stdout
    (a.layer() / "second").write_bytes(data)  # stored anew
    assert sha((b.runs / "e1" / "train" / "second").read_bytes()) == digest
