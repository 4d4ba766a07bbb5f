"""The read side at page-cache speed (issue 14), on real mounts: what the shortcuts must never
change. Blobs are opened at the first READ and kept open (idle) after the last close; the kernel
remembers names that do not exist; a directory handle keeps its page of entries; reads that
would wait go to worker threads, with read-ahead. Each test checks a guarantee through them:
checked reads (EIO, never wrong bytes), no stale names or attributes, the descriptor cap."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from backends import StoredBlobs
from conftest import Mount, cafs, sh, started, xattr


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
    names = [f"f{i:04d}" for i in range(1300)]  # more than two pages of the manifest
    for name in names:
        (layer / name).write_bytes(name.encode())
    first = ls_attributes(layer)
    assert first == stat_attributes(layer) and len(first) == 1300
    # Changes after the kernel cached the listing: mode, content and size, mtime, a rename, an
    # unlink, a new file.
    os.chmod(layer / "f0007", 0o600)
    (layer / "f0600").write_bytes(b"longer content now\n")
    os.utime(layer / "f1200", ns=(1_000_000_000, 1_000_000_000))
    os.rename(layer / "f0100", layer / "renamed")
    os.unlink(layer / "f0200")
    (layer / "zz-new").write_bytes(b"new\n")
    after = ls_attributes(layer)
    assert after == stat_attributes(layer)
    assert after["f0007"][0] == "-rw-------"
    assert after["f0600"][1] == len(b"longer content now\n")
    assert after["f1200"][2] == "1.000000000"
    assert "renamed" in after and "f0100" not in after and "f0200" not in after
    assert "zz-new" in after and len(after) == 1300
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
