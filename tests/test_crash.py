"""Crash safety, on real mounts: the daemon dies at each named step of the write path and of gc
(CAFS_CRASH_AT), and by kill -9 at random moments under concurrent writers.

After every restart: each artifact whose close() returned success is there with its exact
SHA-256; every visible artifact holds exactly the bytes some writer wrote to it (nothing partial);
tmp/ is empty; `cafs fsck --full` finds no damage. The soak runs CAFS_SOAK_CYCLES restarts
(default 8, a few CI minutes at most; 200 with CAFS_SOAK=1). A third of the writes fork a
child mid-write whose exit closes a copy of the descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount, cafs, is_mounted, process_alive, sha, wait_dead, write_artifact

from cafs.blobstore.zstd_seekable import DEFAULT_FRAME_SIZE as FRAME
from cafs.crashpoints import POINTS

GC_POINTS = ("inside-gc", "gc-before-delete")
READ_POINTS = ("before-page-fill",)
WRITE_POINTS = [point for point in POINTS if point not in GC_POINTS + READ_POINTS
                and not point.startswith("raise-")]
# What a writer sees when the daemon dies under it.
DAEMON_GONE = (errno.ENOTCONN, errno.ECONNABORTED)


@functools.lru_cache(maxsize=64)
def content(name: str) -> bytes:
    """The bytes an artifact called `name` is written with: its name says what kind it is."""
    rng = random.Random(name)
    if name.startswith("empty"):
        return b""
    if name.startswith("dedup"):
        return b"the same bytes in many runs\n" * 100
    if name.startswith("large"):  # compressible, several zstd frames, hashed in a thread
        words = [b"epoch", b"loss", b"0.125", b"acc", b"\n"]
        return b" ".join(rng.choices(words, k=1_300_000))
    size = rng.choice([1, 1000, 70_000, 300_000]) if name.startswith("soak") else 1000
    return rng.randbytes(size)


def write_forking(path: Path, data: bytes) -> None:
    """Write half, fork a child that exits at once (its exit closes its copy of the
    descriptor: a FLUSH), write the rest, close. Only the close may publish."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        half = len(data) // 2
        os.write(fd, data[:half])
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        view = memoryview(data)[half:]
        while view:
            view = view[os.write(fd, view[:1 << 20]):]
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    os.close(fd)


def check_invariants(mount: Mount, acked: dict[str, str], allowed: dict[str, set[str]],
                     unacked: dict[str, set[str]] | None = None) -> None:
    """Right after a restart, before any new write: see the module docstring."""
    assert list((mount.store / "tmp").iterdir()) == []
    seen = {}
    for directory, _, files in os.walk(mount.runs):
        for name in files:
            path = Path(directory, name)
            seen[str(path.relative_to(mount.runs))] = sha(path.read_bytes())
    for rel, digest in acked.items():
        # A later write whose close() or fsync() saw the daemon die may be there, whole: it
        # may have been published just before the kill (an fsync syncs after publishing).
        later = unacked.get(rel, set()) if unacked is not None else set()
        assert seen.get(rel) == digest or seen.get(rel) in later, \
            f"{rel}: close() succeeded, yet it is {seen.get(rel)}"
    for rel, digest in seen.items():
        assert digest in allowed.get(rel, set()), f"{rel}: holds bytes nobody wrote there"


def restart_after_crash(mount: Mount, pid: int) -> None:
    assert wait_dead(pid, timeout=30), "the daemon should have died"
    mount.clear_dead_mount()


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_a_crash_at_each_step_of_a_write_loses_nothing_acknowledged(
        point: str, unstarted_mount: Mount) -> None:
    mount = unstarted_mount
    acked: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}

    def attempt(rel: str) -> bool:
        """Write one artifact; True if its close() succeeded."""
        data = content(Path(rel).name)
        allowed.setdefault(rel, set()).add(sha(data))
        try:
            write_artifact(mount.runs / rel, data)
        except OSError as exc:
            assert exc.errno in DAEMON_GONE, exc
            return False
        acked[rel] = sha(data)
        return True

    mount.start()
    mount.layer("base", "l")
    assert attempt("base/l/dedup-base") and attempt("base/l/small-base")
    mount.stop()
    crashed = []
    for kind in ("empty", "small", "dedup", "large"):
        mount.start(env={"CAFS_CRASH_AT": point})
        check_invariants(mount, acked, allowed)
        pid = mount.daemon_pid()
        mount.layer("victims", kind)
        if attempt(f"victims/{kind}/{kind}-victim"):
            # Not every kind passes every point: an empty write never writes a temp, and a
            # dedup hit renames no blob. Then the daemon must simply have carried on.
            assert process_alive(pid)
            mount.stop()
        else:
            crashed.append(kind)
            restart_after_crash(mount, pid)
    mount.start()
    check_invariants(mount, acked, allowed)
    mount.stop()
    assert "crash point" in mount.log()
    expected = {"small", "large"} | ({"empty"} if point != "after-temp-write" else set())
    if point == "after-dedup-check":  # only a write whose content is stored already
        expected = {"dedup"}
    assert expected <= set(crashed), f"{point}: crashed writing {crashed}"
    assert not mount.log_problems()
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


@pytest.mark.parametrize("mounted", [True, False])
def test_a_crash_inside_gc_leaves_only_orphans_that_the_next_gc_removes(
        unstarted_mount: Mount, mounted: bool) -> None:
    mount = unstarted_mount
    store = mount.store
    crash = {"CAFS_CRASH_AT": "inside-gc"}
    mount.start(env=crash if mounted else None)  # gc runs in the daemon while mounted
    layer = mount.layer("e1", "l")
    for index in range(6):
        write_artifact(layer / f"small-{index}", content(f"small-{index}"))
    for index in range(3):
        (layer / f"small-{index}").unlink()
    kept = {f"e1/l/small-{index}": sha(content(f"small-{index}")) for index in range(3, 6)}
    if mounted:
        pid = mount.daemon_pid()
        result = cafs("gc", "--store", str(store), check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        restart_after_crash(mount, pid)
    else:
        mount.stop()
        result = cafs("gc", "--store", str(store), check=False, env={**os.environ, **crash})
        assert result.returncode < 0 and "Traceback" not in result.stderr  # killed by the point
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr
    assert report.stdout.count("orphan") == 3, report.stdout
    mount.start()
    check_invariants(mount, kept, {path: {digest} for path, digest in kept.items()})
    gc = cafs("gc", "--store", str(store), "--orphan-grace", "0")  # they are seconds old
    assert "3 orphan" in gc.stdout or '"orphan_files_removed": 3' in gc.stdout, gc.stdout
    mount.stop()
    report = mount.fsck("--full")
    assert report.returncode == 0 and "orphan" not in report.stdout, report.stdout
    assert not mount.log_problems()


def test_kill9_soak_under_concurrent_writers(unstarted_mount: Mount) -> None:
    """Writers keep writing while the daemon is killed at random moments and restarted."""
    cycles = int(os.environ.get("CAFS_SOAK_CYCLES",
                                "200" if os.environ.get("CAFS_SOAK") == "1" else "8"))
    seed = os.environ.get("CAFS_SOAK_SEED", "1")
    rng = random.Random(seed)
    mount = unstarted_mount
    acked: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    unacked: dict[str, set[str]] = {}  # attempts on a path since its last acknowledged write
    # Writers start a write only while `up` is true, and count themselves in `in_flight`, so
    # that the checks after a restart run with no write in progress.
    state = threading.Condition()
    up, in_flight, stop = False, 0, False
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        nonlocal in_flight
        own = random.Random(f"{seed}-{number}")
        sequence = 0
        while True:
            with state:
                state.wait_for(lambda: up or stop)
                if stop:
                    return
                in_flight += 1
            sequence += 1
            # Mostly new artifacts; every fourth write rewrites this writer's "latest" in place.
            if sequence % 4 == 0:
                name, data = f"latest-{number}", content(f"soak-{number}-{sequence}")
            else:
                kind = own.choice(["soak", "soak", "dedup", "large", "empty"])
                name = f"{kind}-{number}-{sequence}"
                data = content(name)
            rel = f"soak/w{number}/{name}"
            try:
                with state:
                    allowed.setdefault(rel, set()).add(sha(data))
                    unacked.setdefault(rel, set()).add(sha(data))
                if sequence % 3 == 0:  # forks a child mid-write, as ML data loaders do
                    write_forking(mount.runs / rel, data)
                else:
                    write_artifact(mount.runs / rel, data, fsync=sequence % 7 == 0)
                with state:
                    acked[rel] = sha(data)
                    unacked[rel] = set()
                    if name.startswith("latest"):  # older bytes may no longer be there
                        allowed[rel] = {sha(data)}
            except OSError as exc:
                # The daemon died under this write, or its dead mount was already cleared
                # (then the bare mountpoint has no runs/).
                if exc.errno not in (*DAEMON_GONE, errno.ENOENT):
                    errors.append(exc)
            except BaseException as exc:
                errors.append(exc)
            finally:
                with state:
                    in_flight -= 1
                    state.notify_all()

    def set_up(value: bool) -> None:
        nonlocal up
        with state:
            up = value
            state.notify_all()

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(3)]
    mount.start()
    for number in range(3):
        mount.layer("soak", f"w{number}")
    for thread in threads:
        thread.start()
    try:
        for _ in range(cycles):
            pid = mount.daemon_pid()
            set_up(True)
            time.sleep(rng.uniform(0.2, 1.5))
            set_up(False)
            os.kill(pid, 9)
            restart_after_crash(mount, pid)
            with state:
                assert state.wait_for(lambda: in_flight == 0, timeout=60)
            mount.start()
            check_invariants(mount, acked, allowed, unacked)
            assert not errors, (errors, mount.log()[-4000:])
    finally:
        with state:
            stop = True
            state.notify_all()
        for thread in threads:
            thread.join(timeout=60)
        if is_mounted(mount.mountpoint):
            mount.stop()
    assert not errors, (errors, mount.log()[-4000:])
    print(f"soak: {cycles} kills, {len(acked)} writes acknowledged, "
          f"{sum(len(digests) for digests in allowed.values())} attempted")
    assert len(acked) > cycles, f"only {len(acked)} writes acknowledged"
    assert not mount.log_problems()
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr


def test_a_crash_while_a_page_cache_fill_is_queued(unstarted_mount: Mount) -> None:
    """The daemon killed in its sending thread, just before a fill of the page cache that a
    random read of a compressed artifact queued: the reader gets an error, never wrong bytes;
    the remount serves the artifact whole and fsck finds nothing."""
    mount = unstarted_mount
    data = content("large-read")
    mount.start()
    path = mount.layer("e1", "l") / "large-read"
    write_artifact(path, data)
    mount.stop()
    mount.start(env={"CAFS_CRASH_AT": "before-page-fill"})
    pid = mount.daemon_pid()
    fd = os.open(path, os.O_RDONLY)
    try:
        for at in range(3 * FRAME + 4096, len(data), 5 * FRAME):  # random reads, one per frame
            try:
                got = os.pread(fd, 4096, at)
            except OSError as exc:
                assert exc.errno in DAEMON_GONE, exc
                break
            assert got == data[at:at + 4096]
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    restart_after_crash(mount, pid)
    mount.start()
    assert sha(path.read_bytes()) == sha(data)
    mount.stop()
    assert "crash point before-page-fill" in mount.log()
    assert not mount.log_problems()
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout + report.stderr
