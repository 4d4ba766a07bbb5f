"""The read side at page-cache speed (issue 14), on real mounts: what the shortcuts must never
change. Blobs are opened at the first READ and kept open (idle) after the last close; the kernel
remembers names that do not exist; a directory handle keeps its page of entries; reads that
would wait go to worker threads, with read-ahead. Each test checks a guarantee through them:
checked reads (EIO, never wrong bytes), no stale names or attributes, the descriptor cap."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from backends import StoredBlobs
from conftest import Mount, cafs, sh, started, unmount_whatever_state, wait_dead, xattr

from cafs.blobstore.zstd_seekable import DEFAULT_FRAME_SIZE
from cafs.namespace import READDIR_PAGE


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def blob_file(mount: Mount, path: Path) -> Path:
    digest = xattr(path, "user.cafs.sha256")
    return StoredBlobs(mount.store).path(digest)


def flip_in_place(blob: Path, at: int) -> None:
    """Change one byte of the blob file without replacing the file: a descriptor the daemon
    holds open on it sees the change."""
    with open(blob, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize(("compressible", "size"), [(False, 900_000), (True, 0),
                                                    (False, 12 << 20)],
                         ids=["raw+xxh64", "zstd", "raw+xxh64-streamed"])
def test_a_blob_damaged_after_its_reader_was_kept_reads_eio(mount: Mount, compressible: bool,
                                                             size: int) -> None:
    # (A large raw blob read cold in order streams past the page cache: raw_xxh64._Stream.)
    layer = mount.layer()
    rng = random.Random(2)
    data = (b"".join(f"{i},{rng.random():.6f}\n".encode() for i in range(60_000))
            if compressible else os.urandom(size))
    (layer / "victim").write_bytes(data)
    drop_caches()
    assert (layer / "victim").read_bytes() == data  # its reader is opened, then kept idle
    blob = blob_file(mount, layer / "victim")
    flip_in_place(blob, blob.stat().st_size // 3)
    drop_caches()  # the kernel's pages go, the daemon's idle reader stays
    result = sh(f"cat {layer}/victim", check=False)
    if StoredBlobs(mount.store).remote:
        # On S3 the damaged file is the cache's copy: it is fetched again (once), and the
        # read gets the true bytes; the object in the bucket was never damaged.
        assert result.returncode == 0 and result.stdout == data
        if not compressible:  # (zstd: the frames may come from the frame cache, checked)
            digest = xattr(layer / "victim", "user.cafs.sha256")
            assert blob.read_bytes() == StoredBlobs(mount.store).read(digest)  # whole again
        mount.log_problems(accept=True)
        return
    if compressible:
        # Frames decompressed and checked before the damage may still be in the daemon's
        # frame cache: those are the true bytes. Anything else is EIO.
        assert result.stdout == data or (
            b"Input/output error" in result.stderr and data.startswith(result.stdout))
    else:  # the idle reader's block checksums catch it
        assert result.returncode != 0 and b"Input/output error" in result.stderr
        assert data.startswith(result.stdout) and len(result.stdout) < len(data)
        problems = mount.log_problems()
        assert problems and all("fails its checksum" in line for line in problems), problems
    mount.log_problems(accept=True)
    assert mount.fsck("--full").returncode == 1
    # fsck --repair through the daemon marks it damaged and drops idle readers; writing the
    # same bytes again heals it, and the next read opens the new blob file, not the old one.
    assert mount.fsck("--repair").returncode == 0
    (mount.layer("e1", "again") / "copy").write_bytes(data)
    drop_caches()
    assert (layer / "victim").read_bytes() == data


def test_a_name_appears_after_a_lookup_found_it_missing(mount: Mount, tmp_path: Path) -> None:
    layer = mount.layer()
    sub = layer / "sub"
    sub.mkdir()
    for path in (layer / "late", sub / "late", layer / "moved", layer / "dir"):
        for _ in range(2):  # the second answer may come from the kernel's negative entry
            assert not path.exists()
    (layer / "late").write_bytes(b"written\n")  # create
    (sub / "source").write_bytes(b"moved\n")
    os.rename(sub / "source", layer / "moved")  # rename into the missing name
    (layer / "dir").mkdir()  # mkdir
    sh(f"cp {layer}/late {sub}/late")  # cp, in a sub-directory
    assert (layer / "late").read_bytes() == b"written\n"
    assert (layer / "moved").read_bytes() == b"moved\n"
    assert (layer / "dir").is_dir() and (sub / "late").read_bytes() == b"written\n"
    # Removed again: missing again, and back once more.
    os.unlink(layer / "late")
    assert not (layer / "late").exists()
    (layer / "late").write_bytes(b"again\n")
    assert (layer / "late").read_bytes() == b"again\n"
    # runs/ is not cached negatively: a run imported behind the kernel's back appears.
    bundle = tmp_path / "e1.tar"
    cafs("export", str(mount.runs / "e1"), "-o", str(bundle))
    for _ in range(2):
        assert not (mount.runs / "imported").exists()
    cafs("import", str(bundle), "--as", "imported", "--store", str(mount.store))
    assert (mount.runs / "imported" / "train" / "moved").read_bytes() == b"moved\n"


def ls_attributes(directory: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (mode, size, mtime) as ls -l shows them (from READDIRPLUS and the kernel)."""
    out = subprocess.run(["ls", "-l", "--time-style=+%s.%N", str(directory)], check=True,
                         capture_output=True, text=True).stdout
    shown = {}
    for line in out.splitlines()[1:]:
        mode, _links, _user, _group, size, mtime, name = line.split(maxsplit=6)
        shown[name] = (mode, int(size), mtime)
    return shown


def stat_attributes(directory: Path) -> dict[str, tuple[str, int, str]]:
    import stat as stat_module
    shown = {}
    for name in os.listdir(directory):
        info = os.lstat(directory / name)
        mtime = f"{info.st_mtime_ns // 10**9}.{info.st_mtime_ns % 10**9:09d}"
        shown[name] = (stat_module.filemode(info.st_mode), info.st_size, mtime)
    return shown


def test_ls_l_shows_what_stat_shows_after_changes(mount: Mount) -> None:
    layer = mount.layer()
    names = [f"f{i:04d}" for i in range(2 * READDIR_PAGE + 276)]  # three pages of the manifest
    for name in names:
        (layer / name).write_bytes(name.encode())
    first = ls_attributes(layer)
    assert first == stat_attributes(layer) and len(first) == len(names)
    # Changes after the kernel cached the listing: mode, content and size, mtime, a rename, an
    # unlink, a new file.
    os.chmod(layer / "f0007", 0o600)
    (layer / "f0600").write_bytes(b"longer content now\n")
    os.utime(layer / "f4200", ns=(1_000_000_000, 1_000_000_000))
    os.rename(layer / "f0100", layer / "renamed")
    os.unlink(layer / "f0200")
    (layer / "zz-new").write_bytes(b"new\n")
    after = ls_attributes(layer)
    assert after == stat_attributes(layer)
    assert after["f0007"][0] == "-rw-------"
    assert after["f0600"][1] == len(b"longer content now\n")
    assert after["f4200"][2] == "1.000000000"
    assert "renamed" in after and "f0100" not in after and "f0200" not in after
    assert "zz-new" in after and len(after) == len(names)
    # A listing read in small pieces (readdir with a tiny buffer through Python's scandir is
    # not possible; find uses the kernel's buffer): every name exactly once.
    listed = sh(f"find {layer} -mindepth 1 -printf '%f\\n'").stdout.decode().split()
    assert sorted(listed) == sorted(after)


def test_the_descriptor_cap_holds_with_blobs_opened_at_the_first_read(mount: Mount) -> None:
    layer = mount.layer()
    for i in range(12):
        (layer / f"f{i}").write_bytes(f"content {i}\n".encode() * 1000)
    mount.stop()
    with started(mount, "max_open_files=8"):
        drop_caches()
        held = [os.open(layer / f"f{i}", os.O_RDONLY) for i in range(8)]
        try:
            # Nothing read yet, nothing opened in the store: the cap counts them anyway.
            with pytest.raises(OSError) as refused:
                os.open(layer / "f8", os.O_RDONLY)
            assert refused.value.errno == errno.EMFILE
            for i, fd in enumerate(held):
                assert os.pread(fd, 100, 0) == (f"content {i}\n".encode() * 1000)[:100]
        finally:
            for fd in held:
                os.close(fd)
        # Idle readers kept after those closes give their descriptors back to new opens.
        drop_caches()
        again = [os.open(layer / f"f{i}", os.O_RDONLY) for i in range(4, 12)]
        try:
            for i, fd in zip(range(4, 12), again, strict=True):
                assert os.pread(fd, 20, 0) == (f"content {i}\n".encode() * 2)[:20]
        finally:
            for fd in again:
                os.close(fd)
        mount.log_problems(accept=True)  # EMFILE is logged as a warning


def test_an_unlinked_file_opened_but_never_read_survives_gc(mount: Mount) -> None:
    layer = mount.layer()
    data = os.urandom(300_000)
    (layer / "doomed").write_bytes(data)
    drop_caches()
    fd = os.open(layer / "doomed", os.O_RDONLY)  # the blob is not opened yet
    try:
        os.unlink(layer / "doomed")
        cafs("gc", "--keep-versions", "0", "--orphan-grace", "0", "--store", str(mount.store))
        got = b""
        while chunk := os.pread(fd, 1 << 20, len(got)):
            got += chunk
        assert got == data
    finally:
        os.close(fd)
    cafs("gc", "--keep-versions", "0", "--orphan-grace", "0", "--store", str(mount.store))


def test_sequential_and_random_reads_of_large_artifacts(mount: Mount) -> None:
    layer = mount.layer()
    rng = random.Random(4)
    text = b"".join(f"{i},{rng.random():.6f},label{i % 7}\n".encode() for i in range(400_000))
    noise = rng.randbytes(12 << 20)
    (layer / "text.csv").write_bytes(text)
    (layer / "noise.bin").write_bytes(noise)
    assert xattr(layer / "text.csv", "user.cafs.encoding") == "zstd"
    assert xattr(layer / "noise.bin", "user.cafs.encoding") == "raw+xxh64"
    for name, data in (("text.csv", text), ("noise.bin", noise)):
        drop_caches()
        digest = sh(f"cat {layer}/{name} | sha256sum").stdout.split()[0].decode()
        assert digest == hashlib.sha256(data).hexdigest()
        drop_caches()
        fd = os.open(layer / name, os.O_RDONLY)
        try:
            for _ in range(300):
                at = rng.randrange(len(data))
                assert os.pread(fd, 4096, at) == data[at:at + 4096]
        finally:
            os.close(fd)
    # Two readers interleaved, one sequential and one random, on the same content.
    drop_caches()
    with open(layer / "text.csv", "rb") as seq, open(layer / "text.csv", "rb") as rnd:
        got = bytearray()
        while chunk := seq.read(300_000):
            got += chunk
            at = rng.randrange(len(text))
            rnd.seek(at)
            assert rnd.read(5000) == text[at:at + 5000]
        assert bytes(got) == text


def test_a_short_read_waits_in_a_thread_only_while_a_request_is_queued() -> None:
    """A small READ that must wait for the disk runs on the event loop when no request waits
    in /dev/fuse (the thread hop costs more than the read), in a worker thread when one does
    (it must not wait behind the disk). A pipe stands in for /dev/fuse."""
    import threading

    import trio

    from cafs.daemon import TrioRuntime

    runtime = TrioRuntime()
    readable, writable = os.pipe()
    try:
        runtime.watch_requests(readable)

        async def where() -> str:
            return await runtime.run_short(lambda: threading.current_thread().name)

        main = threading.current_thread().name
        assert trio.run(where) == main  # nothing queued: on the loop
        assert not runtime.requests_waiting()  # (a small READ then skips read_nowait)
        os.write(writable, b"request")
        assert runtime.requests_waiting()
        assert trio.run(where) != main  # a request waits: in a worker thread
        os.read(readable, 7)
        assert trio.run(where) == main
        assert trio.run(TrioRuntime().run_short, lambda: threading.current_thread().name) \
            != main  # no /dev/fuse known: always a thread, as before
        assert TrioRuntime().requests_waiting()
    finally:
        os.close(readable)
        os.close(writable)


# -- the page cache filled with the rest of a frame a random read decompressed ---------------

FRAME = DEFAULT_FRAME_SIZE


def csv_rows(seed: int, rows: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(f"{seed},{i},{rng.random():.6f},label{i % 7}\n".encode()
                    for i in range(rows))


def first_difference(got: bytes, expected: bytes) -> int:
    """Where `got` first differs from `expected` (the shorter one's length if one is a prefix
    of the other): for a failure's message."""
    same = min(len(got), len(expected))
    return next((i for i in range(same) if got[i] != expected[i]), same)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the kernel's page cache (fincore: mincore over a mapping)."""
    return int(sh(f"fincore --bytes --raw --noheadings --output RES '{path}'").stdout)


def wait_resident(path: Path, wanted: int) -> int:
    """The file's resident bytes once they reach `wanted` (fills are sent by a thread, just
    after the READ's reply), or what they are after 5 s."""
    deadline = time.monotonic() + 5
    while (resident := resident_bytes(path)) < wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    return resident


def test_a_random_read_leaves_its_whole_frame_in_the_page_cache(mount: Mount) -> None:
    """One random 4 KiB read of a compressed artifact decompresses a 64 KiB frame; the kernel
    gets all of it, so reads of the frame's other pages need no request. Exactly that frame:
    its neighbours stay out, and every byte the kernel now serves is right."""
    text = csv_rows(1, 200_000)  # ~6 MB of text: zstd, ~90 frames
    path = mount.layer() / "rows.csv"
    path.write_bytes(text)
    assert xattr(path, "user.cafs.encoding") == "zstd"
    drop_caches()
    assert resident_bytes(path) == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 17 * FRAME + 5 * 4096
        assert os.pread(fd, 4096, at) == text[at:at + 4096]
        assert wait_resident(path, FRAME) == FRAME  # without the fill: 4096
        time.sleep(0.2)
        assert resident_bytes(path) == FRAME  # the frame, not its neighbours
        # Served by the kernel from the filled pages: the frame's bytes, page by page.
        for page in range(0, FRAME, 4096):
            assert os.pread(fd, 4096, 17 * FRAME + page) == text[17 * FRAME + page:
                                                                 17 * FRAME + page + 4096]
        assert resident_bytes(path) == FRAME
        # The last frame is partial: it fills up to the end of the file.
        assert len(text) % FRAME
        tail_pages = -(-(len(text) % FRAME) // 4096) * 4096
        assert os.pread(fd, 100, len(text) - 100) == text[-100:]
        assert wait_resident(path, FRAME + tail_pages) == FRAME + tail_pages
        assert os.fstat(fd).st_size == len(text)
    finally:
        os.close(fd)


def random_reader(path: Path, size: int, stop: threading.Event) -> None:
    """Random 4 KiB reads through fresh opens until told to stop: each decompresses a frame
    and queues a fill, racing whatever changes the file."""
    rng = random.Random(7)
    while not stop.is_set():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            for _ in range(20):
                os.pread(fd, 4096, rng.randrange(0, size) & ~4095)
        finally:
            os.close(fd)


@pytest.mark.parametrize("rewrite", ["in place", "truncate and write", "truncate(2)"])
def test_fills_never_outlive_a_change_of_the_file(mount: Mount, rewrite: str) -> None:
    """A fill is the old content's bytes sent a little after the READ that found them. A
    write or truncate that came between must win: opens for writing and truncates wait for the
    fills queued before them. Readers hammer the file with random reads (each queues a fill)
    while it is rewritten; after each change, a new open reads exactly the new content (a
    stale fill shows as old bytes in the page cache, or as a size grown back). A truncate(2)
    on the path keeps the file open itself: the readers' last close during it once discarded
    the temp it was publishing (EBADF, seen on PostgreSQL + S3)."""
    path = mount.layer() / "hot.csv"
    versions = [csv_rows(seed, 60_000) for seed in range(6)]  # ~1.8 MB each: zstd
    size = min(len(v) for v in versions)
    versions = [v[:size] for v in versions]
    path.write_bytes(versions[0])
    assert xattr(path, "user.cafs.encoding") == "zstd"
    stop = threading.Event()
    readers = [threading.Thread(target=random_reader, args=(path, size, stop))
               for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for round_no in range(1, 13):
            time.sleep(0.05)  # reads (and their fills) pile up
            new = versions[round_no % len(versions)]
            if rewrite == "in place":  # no truncate: the old pages stay until overwritten
                with open(path, "r+b") as f:
                    f.write(new)
                expected = new
            elif rewrite == "truncate and write":
                path.write_bytes(new)
                expected = new
            else:  # truncate(2) on the path: no open for writing at all
                cut = size // 2 - round_no * 5000
                os.truncate(path, cut)
                expected = versions[(round_no - 1) % len(versions)][:cut]
                time.sleep(0.05)
                assert path.stat().st_size == cut
                assert hashlib.sha256(path.read_bytes()).hexdigest() == \
                    hashlib.sha256(expected).hexdigest(), f"round {round_no}"
                path.write_bytes(versions[round_no % len(versions)])
                continue
            time.sleep(0.05)  # fills queued before the change had every chance to land
            got = path.read_bytes()
            assert len(got) == len(expected), f"round {round_no}"
            assert got == expected, \
                f"round {round_no}: stale bytes at {first_difference(got, expected)}"
    finally:
        stop.set()
        for reader in readers:
            reader.join()


@pytest.mark.parametrize("change", ["write in place", "truncate(2)"])
def test_a_change_waits_for_the_fill_queued_before_it(mount: Mount, change: str) -> None:
    """The sending thread is held just before a fill (CAFS_PAUSE_AT) while the file changes:
    the open for writing (or the truncate) must wait for that fill, or the fill would put the
    old bytes back in the page cache after the new ones (or grow the file back to the end of
    the frame it fills)."""
    path = mount.layer() / "held.csv"
    old, new = csv_rows(1, 100_000), csv_rows(2, 100_000)
    size = min(len(old), len(new))
    old, new = old[:size], new[:size]
    path.write_bytes(old)
    assert xattr(path, "user.cafs.encoding") == "zstd"
    mount.stop()
    mount.start(env={"CAFS_PAUSE_AT": "before-page-fill:1.5"})
    drop_caches()
    with open(path, "rb", buffering=0) as reader:
        at = 3 * FRAME + 5 * 4096
        assert os.pread(reader.fileno(), 4096, at) == old[at:at + 4096]
        deadline = time.monotonic() + 5
        while "pause point before-page-fill" not in (mount.store / "daemon.log").read_text():
            assert time.monotonic() < deadline, "the fill was never queued"
            time.sleep(0.01)
        if change == "write in place":
            with open(path, "r+b") as writer:
                writer.write(new)
            expected = new
        else:
            cut = 2 * FRAME + 100  # before the frame being filled
            os.truncate(path, cut)
            expected = old[:cut]
        # The kernel takes the new attributes now, and drops pages cached before them (its
        # auto_inval_data): a fill that came after this would stay.
        assert path.stat().st_size == len(expected)
        time.sleep(2)  # the held fill has long been sent
        assert path.stat().st_size == len(expected)
        assert os.fstat(reader.fileno()).st_size == len(expected)
        got = path.read_bytes()
        assert got == expected, f"stale bytes at {first_difference(got, expected)}"


RANDOM_READER = """
import os, random, sys
rng = random.Random(os.getpid())
while True:
    try:
        fd = os.open(rng.choice(sys.argv[1:]), os.O_RDONLY)
        try:
            for _ in range(10):
                os.pread(fd, 4096, rng.randrange(0, os.fstat(fd).st_size) & ~4095)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next reads go to cafs
        finally:
            os.close(fd)
    except OSError:  # the mount is going: done
        sys.exit(0)
"""


def test_sigterm_under_random_readers_exits(mount: Mount, tmp_path: Path) -> None:
    """A fill waits for the pages a READ in flight holds locked. SIGTERM while processes read
    at random (fills queued, READs in flight): the daemon must stop sending fills while it
    still answers READs, or its sending thread waits in the kernel for a READ never answered
    (uninterruptibly: the daemon could not exit, not even on SIGKILL)."""
    paths = [mount.layer() / f"f{i}.csv" for i in range(12)]
    for i, path in enumerate(paths):
        path.write_bytes(csv_rows(i, 20_000 + i))
    script = tmp_path / "reader.py"
    script.write_text(RANDOM_READER)
    drop_caches()
    readers = [subprocess.Popen([sys.executable, str(script), *map(str, paths)])
               for _ in range(6)]
    try:
        time.sleep(1.5)
        pid = mount.daemon_pid()
        os.kill(pid, signal.SIGTERM)
        assert wait_dead(pid, timeout=15), "the daemon did not exit after SIGTERM"
    finally:
        for reader in readers:
            reader.kill()
        for reader in readers:  # (one waiting on a READ never answered cannot die: no hang)
            with contextlib.suppress(subprocess.TimeoutExpired):
                reader.wait(timeout=5)
    unmount_whatever_state(mount.mountpoint)
    assert mount.log_problems() == []
    mount.start()
    assert all(path.read_bytes() == csv_rows(i, 20_000 + i) for i, path in enumerate(paths))
