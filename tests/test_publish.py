"""When a version is published and what survives what, on real mounts.

A version is what its writer finished: the close of a forked child's, a subprocess's, a pool
worker's or a dup'd copy of the descriptor publishes nothing while the process that opened the
file still holds it; a writer killed by a signal publishes nothing; the writer's own last close
(from any thread) publishes once. kill -9 of the daemon at the moment such a stray close has
happened must leave the artifact absent or at its previous version, never the prefix. And the
durability half: close() needs no fsync to survive a dead daemon; after a power loss (stood in
for by damaging the blobs newer than the durable point and restarting under another boot id)
artifacts hold their previous version or are absent, and what was fsynced is intact.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, cafs, sha, wait_dead, write_artifact

CHUNK = bytes(range(256)) * 4096  # 1 MiB
OLD = b"the previous version\n" * 1000

# A writer in its own process: opens OUT ("-": its stdout, as `cmd > file` gives it) with
# O_TRUNC, writes 1 MiB, makes the stray closes of SCENARIO happen, says so by creating READY,
# waits for GO, writes another MiB and closes (from another thread in the "thread" scenario).
WRITER = r"""
import multiprocessing, os, subprocess, sys, threading, time
out, scenario, ready, go = sys.argv[1:5]
CHUNK = bytes(range(256)) * 4096
def opened():
    if out == "-":
        return os.fdopen(1, "wb", buffering=0)
    return open(out, "wb", buffering=0)
if scenario == "thread":  # opened by a thread that is gone when the file is closed
    box = []
    opener = threading.Thread(target=lambda: box.append(opened()))
    opener.start(); opener.join()
    f = box[0]
else:
    f = opened()
f.write(CHUNK)
if scenario in ("fork", "thread", "shell"):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
if scenario in ("fork", "subprocess", "shell"):
    subprocess.run(["true"], check=True, close_fds=False)
    subprocess.run(["true"], check=True)
if scenario == "pool":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(abs, range(8))
if scenario == "dup":
    os.close(os.dup(f.fileno()))
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
f.write(CHUNK)
if scenario == "thread":
    closer = threading.Thread(target=f.close)
    closer.start(); closer.join()
else:
    f.close()
"""
SCENARIOS = ["fork", "subprocess", "shell", "pool", "thread", "dup"]
FINAL = CHUNK * 2


def start_writer(tmp_path: Path, target: Path, scenario: str) -> tuple[subprocess.Popen[bytes],
                                                                      Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ready, go = tmp_path / "ready", tmp_path / "go"
    for flag in (ready, go):
        flag.unlink(missing_ok=True)
    if scenario == "shell":
        command = f"exec {sys.executable} {script} - shell {ready} {go} > '{target}'"
        writer = subprocess.Popen(["sh", "-c", command], stderr=subprocess.PIPE)
    else:
        writer = subprocess.Popen([sys.executable, str(script), str(target), scenario,
                                   str(ready), str(go)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None, writer.communicate()[1].decode()
        assert time.monotonic() < deadline, "the writer never got ready"
        time.sleep(0.02)
    return writer, go


def versions(mount: Mount, path: Path) -> list[dict[str, object]]:
    result = cafs("log", "--json", str(path))
    data = json.loads(result.stdout)
    return list(data["versions"] if isinstance(data, dict) else data)


def manifest_query(store: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{store}/manifest.sqlite?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_stray_closes_mid_write_publish_nothing_that_a_crash_would_keep(
        unstarted_mount: Mount, tmp_path: Path, scenario: str) -> None:
    mount = unstarted_mount
    mount.start()
    target = mount.layer() / "model.bin"
    write_artifact(target, OLD)
    fresh = mount.layer() / "fresh.bin"
    writer, go = start_writer(tmp_path, target, scenario)
    other, other_go = (None, None)
    if scenario == "fork":  # a new file too: it must be absent after the crash
        (tmp_path / "second").mkdir()
        other, other_go = start_writer(tmp_path / "second", fresh, scenario)
    try:
        mount.kill9()
        mount.start()
        assert target.read_bytes() == OLD, "a stray close published the writer's prefix"
        assert not fresh.exists() or scenario != "fork"
        assert len(versions(mount, target)) == 1
    finally:
        for process, flag in ((writer, go), (other, other_go)):
            if process is not None and flag is not None:
                flag.touch()
                process.kill()
                process.wait()
    mount.stop()
    mount.assert_clean()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_one_version_per_writer_whatever_its_children_close(
        mount: Mount, tmp_path: Path, scenario: str) -> None:
    target = mount.layer() / "model.bin"
    write_artifact(target, OLD)
    writer, go = start_writer(tmp_path, target, scenario)
    assert len(versions(mount, target)) == 1  # the stray closes made no version
    go.touch()
    assert writer.wait(60) == 0, writer.communicate()[1].decode()
    assert target.read_bytes() == FINAL
    history = versions(mount, target)
    assert len(history) == 2, history
    assert history[-1]["sha256"] == sha(FINAL)


def test_a_writer_killed_by_a_signal_mid_rewrite_publishes_nothing(
        mount: Mount, tmp_path: Path) -> None:
    target = mount.layer() / "checkpoint.bin"
    write_artifact(target, OLD)
    writer, _ = start_writer(tmp_path, target, "fork")  # a child's close came first, too
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert target.read_bytes() == OLD
    assert len(versions(mount, target)) == 1
    assert "killed by a signal: nothing published" in mount.log()


def test_a_writer_that_exits_without_closing_publishes(mount: Mount) -> None:
    target = mount.layer() / "exit.bin"
    code = (f"import os; f = open({str(target)!r}, 'wb', buffering=0); "
            "f.write(b'x' * 70000); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert target.read_bytes() == b"x" * 70000


def test_two_o_trunc_rewriters_never_publish_each_others_bytes_in_progress(
        unstarted_mount: Mount) -> None:
    mount = unstarted_mount
    mount.start()
    target = mount.layer() / "shared.bin"
    write_artifact(target, OLD)
    first = os.open(target, os.O_WRONLY | os.O_TRUNC)
    os.write(first, b"A" * 5000)
    second = os.open(target, os.O_WRONLY | os.O_TRUNC)
    os.write(second, b"B" * 3000)  # in progress
    os.close(first)  # the first writer is done; the second is not
    mount.kill9()
    with pytest.raises(OSError):
        os.close(second)
    mount.start()
    assert target.read_bytes() == OLD
    first = os.open(target, os.O_WRONLY | os.O_TRUNC)
    os.write(first, b"A" * 5000)
    second = os.open(target, os.O_WRONLY | os.O_TRUNC)
    os.write(second, b"B" * 3000)
    os.close(first)
    os.close(second)
    assert target.read_bytes() == b"B" * 3000  # as on any filesystem: the second truncated
    assert len(versions(mount, target)) == 2
    mount.stop()
    mount.assert_clean()


MEMMAP = r"""
import sys
import numpy as np
m = np.memmap(sys.argv[1], dtype="uint8", mode="w+", shape=(3 << 20,))
m[:] = np.arange(3 << 20, dtype=np.uint64).astype("uint8")
m[-1] = 7
m.flush()
m[5] = 9  # after the last flush: published when the mapping goes
del m
"""


def test_numpy_memmap_written_flushed_deleted_then_read_elsewhere(mount: Mount) -> None:
    target = mount.layer() / "array.u8"
    subprocess.run([sys.executable, "-c", MEMMAP, str(target)], check=True)
    expected = bytearray(bytes(range(256)) * (3 << 12))
    expected[-1], expected[5] = 7, 9
    read = subprocess.run([sys.executable, "-c",
                           "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())",
                           str(target)], check=True, capture_output=True).stdout
    assert read == bytes(expected)


def test_power_loss_rolls_back_what_the_group_sync_did_not_cover(
        unstarted_mount: Mount) -> None:
    mount = unstarted_mount
    mount.options = ("sync_interval=3600",)  # no group sync during the test
    mount.start()
    layer = mount.layer()
    write_artifact(layer / "rewritten", OLD)
    write_artifact(layer / "kept", b"durable before the cut\n" * 100)
    mount.stop()  # a clean stop: everything so far is durable
    mount.start()
    rewritten_new = os.urandom(300_000)
    write_artifact(layer / "rewritten", rewritten_new)
    write_artifact(layer / "new", os.urandom(200_000))
    write_artifact(layer / "compressible", b"loss 0.125 acc 0.9\n" * 50_000)
    fsynced = os.urandom(100_000)
    write_artifact(layer / "fsynced", fsynced, fsync=True)
    mount.kill9()
    # The cut: what no sync covered did not reach the disk (zeroed, or cut short).
    (synced_ns,), = manifest_query(mount.store, "SELECT synced_ns FROM store_state")
    recent = manifest_query(mount.store, "SELECT sha256 FROM blobs WHERE created_ns > ?",
                            synced_ns)
    assert len(recent) == 4
    for index, (digest,) in enumerate(recent):
        if digest == sha(fsynced):
            continue
        blob = mount.store / "blobs" / str(digest)[:2] / str(digest)
        size = blob.stat().st_size
        if index % 2:
            os.truncate(blob, size // 3)
        else:
            blob.write_bytes(bytes(size))
    dirty = mount.store / "dirty"
    dirty.write_text(dirty.read_text().replace("boot ", "boot 0-another-boot-"))
    mount.start()
    assert (layer / "rewritten").read_bytes() == OLD
    assert not (layer / "new").exists()
    assert not (layer / "compressible").exists()
    assert (layer / "fsynced").read_bytes() == fsynced
    assert (layer / "kept").read_bytes() == b"durable before the cut\n" * 100
    assert len(versions(mount, layer / "rewritten")) == 1
    assert "rolled back" in mount.log()
    mount.stop()
    assert len(list((mount.store / "quarantine").iterdir())) == 3
    mount.log_problems(accept=True)  # the roll-back's warnings
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_a_daemon_crash_in_the_same_boot_keeps_every_close(unstarted_mount: Mount) -> None:
    mount = unstarted_mount
    mount.options = ("sync_interval=3600",)
    mount.start()
    data = os.urandom(500_000)
    write_artifact(mount.layer() / "closed", data)  # no fsync, no group sync
    mount.kill9()
    mount.start()
    assert (mount.layer() / "closed").read_bytes() == data
    assert "machine restarted" not in mount.log()
    mount.stop()
    mount.assert_clean()


def test_the_group_sync_moves_the_durable_point(unstarted_mount: Mount) -> None:
    mount = unstarted_mount
    mount.options = ("sync_interval=1",)
    mount.start()
    write_artifact(mount.layer() / "a", b"synced within a second\n")
    (created,), = manifest_query(mount.store, "SELECT max(created_ns) FROM blobs")
    deadline = time.monotonic() + 10
    while True:
        (synced,), = manifest_query(mount.store, "SELECT synced_ns FROM store_state")
        if synced is not None and int(synced) >= int(created):  # type: ignore[call-overload]
            break
        assert time.monotonic() < deadline, "no group sync within 10 s"
        time.sleep(0.2)
    mount.stop()
    mount.assert_clean()


def test_the_daemon_dies_while_a_writer_holds_a_file(unstarted_mount: Mount) -> None:
    """The writer's close after the crash fails; nothing of it appears after the restart."""
    mount = unstarted_mount
    mount.start()
    target = mount.layer() / "held"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 10_000)
    pid = mount.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid, 10)
    with pytest.raises(OSError):
        os.close(fd)
    mount.clear_dead_mount()
    mount.start()
    assert not target.exists()
    mount.stop()
    mount.log_problems(accept=True)
    assert mount.fsck("--full").returncode == 0
