"""Real mounts driven with the ordinary tools users use."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from backends import StoredBlobs
from conftest import Mount, cafs, manifest_sql, sh, started, xattr


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_contents(mount: Mount, path: str) -> list[bytes]:
    """The content of every version of an artifact, oldest first, read through blobs/."""
    digests = [row[0] for row in manifest_sql(
        mount.store, "SELECT b.sha256 FROM versions v JOIN blobs b ON b.id = v.blob_id "
        "WHERE v.path = ? ORDER BY v.id", (path,))]
    return [(mount.mountpoint / "blobs" / digest).read_bytes() for digest in digests]


def stats(mount: Mount) -> dict[str, int]:
    return json.loads(cafs("stats", "--store", str(mount.store), "--json").stdout)


def test_cp_in_cat_out_byte_for_byte(mount: Mount, source_tree: Path) -> None:
    layer = mount.layer()
    source = source_tree / "weights" / "model.bin"
    sh(f"cp {source} {layer}/model.bin")
    out = sh(f"cat {layer}/model.bin").stdout
    assert out == source.read_bytes()
    sums = sh(f"sha256sum {source} {layer}/model.bin").stdout.decode().split()
    assert sums[0] == sums[2] == xattr(layer / "model.bin", "user.cafs.sha256")


def test_same_content_under_two_names_is_stored_once(mount: Mount, source_tree: Path) -> None:
    csv = source_tree / "metrics" / "per_epoch" / "epoch1.csv"
    for execution in ("e1", "e2", "e3"):
        sh(f"cp {csv} {mount.layer(execution, 'prepare')}/data.csv")
    sh(f"cp {csv} {mount.layer('e1', 'prepare')}/copy.csv")
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    files = [mount.runs / e / "prepare" / "data.csv" for e in ("e1", "e2", "e3")]
    assert {xattr(f, "user.cafs.sha256") for f in files} == {digest}
    assert xattr(files[0], "user.cafs.refcount") == "4"
    counts = stats(mount)
    assert counts["artifacts"] == 4
    assert counts["blobs"] == 1
    assert counts["logical_bytes"] == 4 * csv.stat().st_size
    # One file on disk, and it is compressed text.
    assert StoredBlobs(mount.store).names() == [digest]
    assert xattr(files[0], "user.cafs.encoding") == "zstd"
    assert int(xattr(files[0], "user.cafs.stored_size")) < csv.stat().st_size // 3
    # The content is also reachable by its hash, read-only.
    assert (mount.mountpoint / "blobs" / digest).read_bytes() == csv.read_bytes()
    with pytest.raises(OSError) as info:
        (mount.mountpoint / "blobs" / digest).write_bytes(b"x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_read_after_close_sees_content_and_size_at_once(mount: Mount) -> None:
    layer = mount.layer()
    for i in range(40):
        data = os.urandom(random.randint(0, 300_000)) if i % 2 else b"line\n" * (i * 100)
        path = layer / f"f{i}.bin"
        with open(path, "wb") as out:
            out.write(data)
        assert os.stat(path).st_size == len(data)
        assert path.read_bytes() == data
        assert xattr(path, "user.cafs.sha256") == hashlib.sha256(data).hexdigest()


def test_overwrite_and_append_make_new_versions(mount: Mount) -> None:
    layer = mount.layer()
    path = layer / "log.txt"
    sh(f"echo first > {path}")
    first = xattr(path, "user.cafs.sha256")
    sh(f"echo second >> {path}")
    assert path.read_text() == "first\nsecond\n"
    sh(f"echo third > {path}")
    assert path.read_text() == "third\n"
    assert xattr(path, "user.cafs.sha256") == hashlib.sha256(b"third\n").hexdigest()
    # The first version stays reachable by its hash.
    assert (mount.mountpoint / "blobs" / first).read_text() == "first\n"
    # History holds each content in order, one version per open-for-write: bash closes a dup
    # of the descriptor before writing, and the empty file that close publishes is replaced
    # in history by what the same open file publishes next.
    history = version_contents(mount, "runs/e1/train/log.txt")
    assert history == [b"first\n", b"first\nsecond\n", b"third\n"]
    # cp over an existing artifact.
    sh(f"printf 'fourth' > {layer}/other && cp {layer}/other {path}")
    assert path.read_text() == "fourth"


def test_partial_overwrite_in_place_keeps_the_rest(mount: Mount) -> None:
    layer = mount.layer()
    path = layer / "blob.bin"
    original = os.urandom(2_500_000)
    path.write_bytes(original)
    with open(path, "r+b") as f:  # no truncation: copy-on-write of the current content
        f.seek(1_000_000)
        f.write(b"X" * 10)
    expected = original[:1_000_000] + b"X" * 10 + original[1_000_010:]
    assert path.read_bytes() == expected
    assert xattr(path, "user.cafs.sha256") == hashlib.sha256(expected).hexdigest()


def test_unlink_while_open_keeps_reader_reading(mount: Mount) -> None:
    layer = mount.layer()
    data = os.urandom(1_500_000)
    path = layer / "victim.bin"
    path.write_bytes(data)
    with open(path, "rb") as reader:
        head = reader.read(1000)
        sh(f"rm {path}")
        assert not path.exists()
        assert os.fstat(reader.fileno()).st_nlink == 0
        rest = reader.read()
    assert head + rest == data
    assert path.name not in os.listdir(layer)


def test_random_reads_inside_a_large_compressed_artifact(mount: Mount, tmp_path: Path) -> None:
    rows = "".join(f"{i},{i * 7 % 1000},sample-{i % 97}\n" for i in range(600_000))
    source = tmp_path / "big.csv"
    source.write_text(rows)
    data = source.read_bytes()
    target = mount.layer() / "big.csv"
    sh(f"cp {source} {target}")
    assert xattr(target, "user.cafs.encoding") == "zstd"
    assert len(data) > 8 * 1024 * 1024
    rng = random.Random(7)
    fd = os.open(target, os.O_RDONLY)
    try:
        for _ in range(300):
            offset = rng.randrange(0, len(data))
            length = rng.choice([1, 100, 4096, 70_000, 1_100_000])
            assert os.pread(fd, length, offset) == data[offset:offset + length]
        assert os.pread(fd, 10, len(data)) == b""
    finally:
        os.close(fd)


def test_names_and_places(mount: Mount) -> None:
    layer = mount.layer()
    ok = layer / ("a" * 255)
    ok.write_text("fine")
    assert ok.read_text() == "fine"
    for bad in (layer / ("b" * 256), layer / ("c" * 4000)):
        with pytest.raises(OSError) as info:
            bad.write_text("x")
        assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        os.mkdir(layer / ("d" * 256))
    assert info.value.errno == errno.ENAMETOOLONG
    # Files directly in runs/ or in an execution, and anything new at the root: EPERM.
    for bad in (mount.runs / "loose.txt", mount.runs / "e1" / "loose.txt",
                mount.mountpoint / "loose.txt"):
        with pytest.raises(PermissionError) as info:
            bad.write_text("x")
        assert info.value.errno == errno.EPERM
    with pytest.raises(PermissionError):
        os.mkdir(mount.mountpoint / "other")
    # Names are UTF-8; control characters are allowed, invalid UTF-8 is not.
    weird = layer / "tab\there ünïcode"
    weird.write_text("ok")
    assert weird.read_text() == "ok"
    with pytest.raises(OSError) as info:
        os.open(os.fsencode(layer) + b"/bad\xff\xfe", os.O_CREAT | os.O_WRONLY, 0o644)
    assert info.value.errno == errno.EILSEQ
    # Special files and hard links are refused (symlinks: tests/test_symlinks.py).
    with pytest.raises(PermissionError):
        os.link(ok, layer / "hardlink")
    with pytest.raises(PermissionError):
        os.mkfifo(layer / "fifo")
    # The fixed layout cannot be removed or renamed.
    with pytest.raises(OSError):
        os.rmdir(mount.runs)
    with pytest.raises(OSError):
        os.rename(mount.mountpoint / "blobs", mount.mountpoint / "b2")


def test_cp_r_rsync_diff_tar(mount: Mount, source_tree: Path, tmp_path: Path) -> None:
    layer = mount.layer("e1", "train")
    sh(f"cp -r {source_tree} {layer}/")
    sh(f"diff -r {source_tree} {layer}/outdir")
    sh(f"rsync -a {source_tree}/ {mount.layer('e2', 'train')}/")
    sh(f"diff -r {source_tree} {mount.runs}/e2/train")
    # rsync -a keeps modification times (it writes a temp file, then renames it over).
    summary = mount.runs / "e2" / "train" / "metrics" / "summary.json"
    assert summary.stat().st_mtime_ns == 1_600_000_000_000_000_000
    # A second rsync after a change transfers it via temp+rename: a new version.
    (source_tree / "metrics" / "summary.json").write_text('{"loss": 0.1}\n')
    sh(f"rsync -a {source_tree}/ {mount.runs}/e2/train/")
    sh(f"diff -r {source_tree} {mount.runs}/e2/train")
    # tar out of the mount and back into another layer.
    sh(f"tar -C {layer} -cf {tmp_path}/out.tar outdir")
    listing = sh(f"tar -tf {tmp_path}/out.tar").stdout.decode().split()
    assert "outdir/weights/model.bin" in listing
    target = mount.layer("e3", "unpacked")
    sh(f"tar -C {target} -xf {tmp_path}/out.tar")
    sh(f"diff -r {layer}/outdir {target}/outdir")
    # find and du see everything; df reports the store's filesystem.
    found = sh(f"find {mount.runs}/e1 -type f").stdout.decode().split()
    expected = sum(1 for p in source_tree.rglob("*") if p.is_file())
    assert len(found) == expected
    du_kib = int(sh(f"du -sk {mount.runs}/e1").stdout.split()[0])
    assert du_kib >= 3 * 1024  # the random weights cannot compress
    df = sh(f"df -P {mount.mountpoint}").stdout.decode().splitlines()[1].split()
    assert int(df[1]) > 0 and int(df[3]) > 0
    assert os.statvfs(mount.mountpoint).f_namemax == 255


def test_mv_rename_and_rm_rf(mount: Mount, source_tree: Path) -> None:
    layer = mount.layer()
    sh(f"cp -r {source_tree} {layer}/out")
    sh(f"mv {layer}/out/weights/small.bin {layer}/small-moved.bin")
    assert (layer / "small-moved.bin").read_bytes() == (
        source_tree / "weights" / "small.bin").read_bytes()
    # Rename over an existing file replaces it.
    sh(f"echo old > {layer}/target && echo new > {layer}/source && mv {layer}/source "
       f"{layer}/target")
    assert (layer / "target").read_text() == "new\n"
    assert not (layer / "source").exists()
    # Directories move, layers move between executions, executions get renamed.
    sh(f"mv {layer}/out/metrics {layer}/metrics2")
    sh(f"diff -r {source_tree}/metrics {layer}/metrics2")
    mount.layer("e2", "eval")
    sh(f"mv {mount.runs}/e1/train {mount.runs}/e2/train")
    sh(f"mv {mount.runs}/e2 {mount.runs}/e2-renamed")
    assert (mount.runs / "e2-renamed" / "train" / "target").read_text() == "new\n"
    # A directory cannot move into itself; a file cannot go into an execution.
    with pytest.raises(OSError) as info:
        os.rename(mount.runs / "e2-renamed" / "train" / "metrics2",
                  mount.runs / "e2-renamed" / "train" / "metrics2" / "per_epoch" / "x")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(PermissionError):
        os.rename(mount.runs / "e2-renamed" / "train" / "target", mount.runs / "e2-renamed" / "t")
    # rmdir of a non-empty directory fails; rm -rf removes a whole run.
    with pytest.raises(OSError) as info:
        os.rmdir(mount.runs / "e2-renamed")
    assert info.value.errno == errno.ENOTEMPTY
    sh(f"rm -rf {mount.runs}/e2-renamed")
    assert os.listdir(mount.runs) == ["e1"]
    assert stats(mount)["artifacts"] == 0


def test_stat_chmod_touch_truncate(mount: Mount) -> None:
    layer = mount.layer()
    path = layer / "a.bin"
    path.write_bytes(b"0123456789")
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert info.st_nlink == 1 and info.st_size == 10
    assert (info.st_mode & 0o777) == 0o644  # umask 022 applied
    sh(f"chmod 600 {path}")
    assert path.stat().st_mode & 0o7777 == 0o600
    sh(f"chmod u+s {path}")  # no setuid artifacts
    assert path.stat().st_mode & 0o7777 == 0o600
    sh(f"touch -d '2001-02-03 04:05:06 UTC' {path}")
    assert int(path.stat().st_mtime) == 981173106
    sh(f"truncate -s 4 {path}")
    assert path.read_bytes() == b"0123"
    sh(f"truncate -s 8 {path}")
    assert path.read_bytes() == b"0123\0\0\0\0"
    assert xattr(path, "user.cafs.sha256") == hashlib.sha256(b"0123\0\0\0\0").hexdigest()
    # Directory link counts: 2 + sub-directories.
    (layer / "sub1").mkdir()
    (layer / "sub2").mkdir()
    assert layer.stat().st_nlink == 4
    assert (mount.runs / "e1").stat().st_nlink == 3


def test_xattrs_tags_and_read_only_attributes(mount: Mount, store: Path) -> None:
    layer = mount.layer()
    path = layer / "model.bin"
    path.write_bytes(b"weights" * 100)
    sh(f"setfattr -n user.stage -v production {path}")
    sh(f"setfattr -n user.owner -v team-a {layer}")
    dump = sh(f"getfattr -d {path}").stdout.decode()
    assert 'user.stage="production"' in dump
    assert 'user.cafs.size="700"' in dump
    assert 'user.cafs.refcount="1"' in dump
    denied = sh(f"setfattr -n user.cafs.sha256 -v 00 {path}", check=False)
    assert denied.returncode != 0 and b"Operation not permitted" in denied.stderr
    with pytest.raises(OSError) as info:
        os.setxattr(path, "trusted.x", b"1")
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EPERM)
    with pytest.raises(OSError) as info:
        os.getxattr(path, "user.missing")
    assert info.value.errno == errno.ENODATA
    sh(f"setfattr -x user.owner {layer}")
    # Tags survive a remount.
    mount.stop()
    mount.start()
    assert xattr(path, "user.stage") == "production"
    assert "user.owner" not in os.listxattr(layer)


def test_kill9_then_remount_keeps_every_closed_artifact(mount: Mount) -> None:
    layer = mount.layer()
    expected = {}
    for i in range(30):
        data = os.urandom(random.randint(0, 200_000)) if i % 3 else (b"row\n" * 5000 * i)
        (layer / f"a{i}").write_bytes(data)
        expected[f"a{i}"] = hashlib.sha256(data).hexdigest()
    # A write in progress when the daemon dies must vanish, not appear half-written.
    pending = open(layer / "in-progress.bin", "wb")  # noqa: SIM115 (closed after the kill)
    pending.write(b"partial" * 200_000)  # over the 1 MiB a write keeps in memory: a temp file
    pending.flush()
    mount.kill9()
    with pytest.raises(OSError):
        pending.close()
    assert list((mount.store / "tmp").iterdir()), "the write in progress had a temp file"
    mount.start()
    assert sorted(os.listdir(layer)) == sorted(expected)
    for name, digest in expected.items():
        assert sha256_of(layer / name) == digest
    assert list((mount.store / "tmp").iterdir()) == []
    assert "recovered after an unclean stop" in mount.log()
    report = mount.fsck("--full")
    assert report.returncode == 0, report.stdout


def test_the_store_refuses_a_second_daemon(mount: Mount, tmp_path: Path) -> None:
    other = tmp_path / "mnt2"
    other.mkdir()
    result = cafs("mount", "--store", str(mount.store), str(other), check=False)
    assert result.returncode == 3
    assert "in use" in result.stderr and "Traceback" not in result.stderr
    mount.log_problems(accept=True)


def test_writes_are_visible_while_in_progress(mount: Mount) -> None:
    path = mount.layer() / "growing.log"
    with open(path, "wb") as out:
        out.write(b"a" * 5000)
        out.flush()
        assert os.stat(path).st_size == 5000
        with open(path, "rb") as reader:
            assert reader.read() == b"a" * 5000
        out.write(b"b" * 10)
    assert path.read_bytes() == b"a" * 5000 + b"b" * 10


def test_fsync_publishes_and_later_writes_continue(mount: Mount) -> None:
    path = mount.layer() / "journal"
    with open(path, "wb") as out:
        out.write(b"one\n")
        out.flush()
        os.fsync(out.fileno())
        assert xattr(path, "user.cafs.sha256") == hashlib.sha256(b"one\n").hexdigest()
        out.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20, (1 << 20) + 1, 5_000_000])
def test_sizes_round_trip(mount: Mount, size: int) -> None:
    data = (b"abc" * (size // 3 + 1))[:size] if size % 2 else os.urandom(size)
    path = mount.layer() / f"s{size}"
    path.write_bytes(data)
    assert path.stat().st_size == size
    assert path.read_bytes() == data


def test_concurrent_writers_and_readers(mount: Mount, tmp_path: Path) -> None:
    layer = mount.layer()
    script = tmp_path / "worker.sh"
    script.write_text(
        "set -e\nfor i in $(seq 1 20); do head -c $((RANDOM * 7)) /dev/urandom > "
        f"{tmp_path}/src.$1.$i; cp {tmp_path}/src.$1.$i {layer}/w$1.$i; "
        f"cmp {tmp_path}/src.$1.$i {layer}/w$1.$i; done\n"
    )
    workers = [subprocess.Popen(["bash", str(script), str(n)]) for n in range(4)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0, 0, 0]
    assert len(os.listdir(layer)) == 80


def test_writing_lost_content_again_restores_its_blob(mount: Mount) -> None:
    layer = mount.layer()
    data = b"precious result\n" * 1000
    (layer / "original").write_bytes(data)
    digest = xattr(layer / "original", "user.cafs.sha256")
    mount.stop()
    StoredBlobs(mount.store).remove(digest)  # damage behind cafs's back
    assert mount.fsck().returncode == 1
    mount.start()
    (layer / "again").write_bytes(data)  # a dedup hit on a missing file: write it, don't trust
    assert (layer / "original").read_bytes() == data
    assert "restored from a new write" in mount.log()
    assert mount.fsck("--full").returncode == 0


def test_compression_level_zero_stores_raw_and_fast_levels_store_zstd(
        unstarted_mount: Mount) -> None:
    """-o compression=0 stores every blob raw (with its block sums), a negative level zstd's
    fast frames; both read back byte for byte, at that mount and the next at the default
    level, and fsck --full finds them whole."""
    text = b"".join(b"%d,%d,cat\n" % (i, i * 7) for i in range(200_000))  # ~2.6 MB, compressible
    contents: dict[str, bytes] = {}
    for level, encoding in (("0", "raw+xxh64"), ("-5", "zstd"), ("1", "zstd")):
        with started(unstarted_mount, f"compression={level}") as mount:
            layer = mount.layer("e1", f"level{level.replace('-', 'm')}")
            data = text + level.encode()  # a content of its own: no dedup hit
            sh(f"cat > {layer}/table.csv", input=data)
            assert (layer / "table.csv").read_bytes() == data
            assert xattr(layer / "table.csv", "user.cafs.encoding") == encoding
            stored = int(xattr(layer / "table.csv", "user.cafs.stored_size"))
            assert stored > len(data) if encoding == "raw+xxh64" else stored < len(data)
            contents[f"e1/{layer.name}/table.csv"] = data
    with started(unstarted_mount) as mount:
        for path, data in contents.items():
            assert (mount.runs / path).read_bytes() == data
